"""GPU proof that stored contexts survive a kill -9: a server with a disk tier answers every
document's fact question (the documents overflow its KV pool onto disk), is killed with
SIGKILL, and a new server on the same disk directory answers them again from disk. Both
rounds' answers are compared with an unbounded-cache stock reference asked the same
questions in the same order (so a cached prefix is compared with a cached prefix).

Writes ``restart.json`` (answers, loads per tier before and after the restart, the
restarted server's status) and the servers' logs to ``--out``.

Usage: python bench/restart_proof.py --model DIR --out DIR [--docs 12] [-- extra sglang args]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time

import numpy as np
import requests

from evicpress_sglang.bench.server import Server, ask, parse_server_args, server_command, server_parser
from evicpress_sglang.bench.workload import doc_texts, docqa_prompt, fact_question


def _args(argv: list[str]) -> argparse.Namespace:
    p = server_parser(__doc__.split("\n\n")[0], port=30300, docs=12, max_new_tokens=16)
    p.add_argument("--pool-tokens", type=int, default=10000, help="about 4 documents")
    return parse_server_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    texts, codes = doc_texts(np.random.default_rng(0), args.docs, args.doc_chars, args.doc_chars + 1000)
    prompts = [docqa_prompt(t, fact_question(d)) for d, t in enumerate(texts)]
    common = server_command(args)
    settings = {"policy": "lru-offload", "host_bytes": "16MiB", "disk_dir": str(args.out / "disk"),
                "disk_bytes": "4GiB"}
    env = os.environ | {"EVICPRESS_CONFIG": json.dumps(settings)}
    ours = common + ["--port", str(args.port), "--radix-cache-backend", "evicpress", "--max-total-tokens",
                     str(args.pool_tokens)]
    result: dict = {"command": shlex.join([sys.executable, *sys.argv]), "settings": settings}
    with Server(common + ["--port", str(args.port + 1)], dict(os.environ), args.out / "reference.log",
                args.port + 1) as ref:
        reference = [[ask(ref, p, args.max_new_tokens) for p in prompts] for _ in range(2)]
    first = Server(ours, env, args.out / "before-kill.log", args.port)
    url = first.__enter__()
    try:
        before = [ask(url, p, args.max_new_tokens) for p in prompts]
        fillers, _ = doc_texts(np.random.default_rng(1), max(2, args.docs // 3), args.doc_chars, args.doc_chars + 1000)
        for text in fillers:  # other documents push the last ones out of the pool too
            ask(url, docqa_prompt(text, fact_question(0)), args.max_new_tokens)
        time.sleep(5)  # let the disk writer finish what it has queued
        result["status_before_kill"] = requests.get(url + "/evicpress/status", timeout=60).json()
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)  # kill -9, as a crash would
        first.proc.wait()
    result["files_after_kill"] = len(list((args.out / "disk").glob("*.kv")))
    with Server(ours, env, args.out / "after-restart.log", args.port) as url:
        result["status_at_restart"] = requests.get(url + "/evicpress/status", timeout=60).json()
        after = [ask(url, p, args.max_new_tokens) for p in prompts]
        result["status_after"] = requests.get(url + "/evicpress/status", timeout=60).json()
    rows = [{"doc": d, "code": codes[d], "before": before[d], "after": after[d], "reference": [r[d] for r in reference]}
            for d in range(args.docs)]
    stats = result["status_after"]["stats"]
    result["rows"] = rows
    result["checks"] = {
        "dormant_at_restart": result["status_at_restart"]["tiers"]["disk"]["dormant"],
        "found_by_content": stats["found_by_content"],
        "disk_loads_after_restart": {k: v for k, v in stats["hits"].items() if k.startswith("disk:")},
        "answers_before_equal_reference": sum(r["before"]["answer"] == r["reference"][0]["answer"] for r in rows),
        "answers_after_equal_reference": sum(r["after"]["answer"] == r["reference"][1]["answer"] for r in rows),
        "docs": args.docs,
        "internal_errors": result["status_after"]["health"]["internal_errors"],
    }
    (args.out / "restart.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["checks"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
