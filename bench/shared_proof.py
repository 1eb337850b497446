"""GPU proof that two servers share contexts through one Mooncake Store (issue 19): server A
reads every document (its small pool pushes them into host memory, compressed, and so into
the store), then server B, which has never seen them, is asked about them. B's time to
first token on A's documents is compared with B's on fresh documents of the same length,
which it must prefill. Both servers run on this one GPU (each its share of memory) beside a
Mooncake master on 127.0.0.1.

Writes ``shared.json`` (per document B's TTFT, shared vs fresh, and both servers' status)
and the servers' and the store's logs to ``--out``.

Usage: python bench/shared_proof.py --model DIR --out DIR [--docs 8] [-- extra sglang args]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from evicpress_sglang.bench.server import Server, parse_server_args, server_command, server_parser
from evicpress_sglang.bench.workload import doc_texts, docqa_prompt, fact_question
from evicpress_sglang.tiers.mooncake_local import LOOPBACK, mooncake_server


def _args(argv: list[str]) -> argparse.Namespace:
    p = server_parser(__doc__.split("\n\n")[0], port=30400, docs=8, max_new_tokens=1)
    p.add_argument("--pool-tokens", type=int, default=12000, help="server A's pool: about two documents")
    p.add_argument("--codec", default="int4", help="what A stores (and so publishes) with")
    p.add_argument("--segment", default="32GiB", help="memory each server gives the store")
    p.add_argument("--b-settings", type=json.loads, default={},
                   help='JSON merged into server B\'s settings, e.g. \'{"prefill_s_per_token": 1e-4}\' to price its '
                        'prefill above the store\'s speed so that it loads from the store whatever the cost model says')
    return parse_server_args(p, argv)


def ask(url: str, prompt: str, n: int) -> dict:
    """One request; its latency with ``n`` = 1 new token is its time to first token."""
    start = time.perf_counter()
    r = requests.post(url + "/generate", json={"text": prompt, "sampling_params": {"temperature": 0,
                                                                                    "max_new_tokens": n}}, timeout=300)
    r.raise_for_status()
    out = r.json()
    return {"seconds": time.perf_counter() - start, "answer": out["text"],
            "prompt_tokens": out["meta_info"].get("prompt_tokens"), "cached_tokens": out["meta_info"].get("cached_tokens")}


def status(url: str) -> dict:
    return requests.get(url + "/evicpress/status", timeout=60).json()


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texts, _ = doc_texts(rng, args.docs, args.doc_chars, args.doc_chars + 1000)
    fresh, _ = doc_texts(np.random.default_rng(1), args.docs, args.doc_chars, args.doc_chars + 1000)
    fillers, _ = doc_texts(np.random.default_rng(2), 4, args.doc_chars, args.doc_chars + 1000)
    shared_prompts = [docqa_prompt(t, fact_question(d)) for d, t in enumerate(texts)]
    fresh_prompts = [docqa_prompt(t, fact_question(d)) for d, t in enumerate(fresh)]
    result: dict = {"command": shlex.join([sys.executable, *sys.argv])}
    os.environ["MC_TCP_BIND_ADDRESS"] = LOOPBACK  # the transfer engine advertises loopback only
    with mooncake_server(args.out / "mooncake") as store:
        remote = store.remote_config("shared-proof", global_segment_size=args.segment, local_buffer_size="2GiB")
        common = server_command(args) + ["--radix-cache-backend", "evicpress"]
        a_settings = {"policy": f"static:{args.codec}", "host_bytes": "16GiB", "remote": remote}
        b_settings = {"policy": "evicpress", "host_bytes": "16GiB", "remote": remote, **args.b_settings}
        result["settings"] = {"a": a_settings, "b": b_settings}
        servers = [
            Server(common + ["--port", str(args.port), "--max-total-tokens", str(args.pool_tokens)],
                   os.environ | {"EVICPRESS_CONFIG": json.dumps(a_settings)}, args.out / "a.log", args.port),
            Server(common + ["--port", str(args.port + 1)],
                   os.environ | {"EVICPRESS_CONFIG": json.dumps(b_settings)}, args.out / "b.log", args.port + 1)]
        with ThreadPoolExecutor(2) as pool:  # both start at once
            a_url, b_url = pool.map(lambda s: s.__enter__(), servers)
        try:
            for prompt in shared_prompts + [docqa_prompt(t, fact_question(0)) for t in fillers]:
                ask(a_url, prompt, args.max_new_tokens)  # the fillers push the last documents out too
            deadline = time.monotonic() + 120
            while status(a_url)["stats"]["published"] < args.docs and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(5)  # A's writer sends what it has queued
            result["a_status"] = status(a_url)
            ask(b_url, docqa_prompt(fillers[0], fact_question(1)), args.max_new_tokens)  # B's warm-up
            rows = []
            for d in range(args.docs):  # interleaved, so neither kind gets the warmer server
                rows.append({"doc": d, "shared": ask(b_url, shared_prompts[d], args.max_new_tokens),
                             "fresh": ask(b_url, fresh_prompts[d], args.max_new_tokens)})
            result["b_status"] = status(b_url)
        finally:
            for s in servers:
                s.stop()
    result["rows"] = rows
    shared_s = [r["shared"]["seconds"] for r in rows]
    fresh_s = [r["fresh"]["seconds"] for r in rows]
    stats = result["b_status"]["stats"]
    result["summary"] = {
        "b_ttft_shared_mean_ms": 1e3 * statistics.mean(shared_s), "b_ttft_shared_p50_ms": 1e3 * statistics.median(shared_s),
        "b_ttft_fresh_mean_ms": 1e3 * statistics.mean(fresh_s), "b_ttft_fresh_p50_ms": 1e3 * statistics.median(fresh_s),
        "speedup_mean": statistics.mean(fresh_s) / statistics.mean(shared_s),
        "a_published": result["a_status"]["stats"]["published"], "b_shared_hits": stats.get("shared_hits"),
        "b_loads": stats.get("hits"), "b_internal_errors": result["b_status"]["health"]["internal_errors"],
        "remote_bw": result["b_status"]["cost_model"].get("remote_bw"),
        "b_prefill_s_per_token": result["b_status"]["cost_model"].get("prefill_s_per_token"),
        "b_not_read_too_slow": result["b_status"]["tiers"]["remote"].get("too_large"),
    }
    (args.out / "shared.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
