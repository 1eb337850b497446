"""Eviction on the scheduler's critical path (issue 25).

``cpu``: the real cache over SGLang's CPU pools (a tiny KV layout, so encoding costs
little and the planning is what is measured), N contexts of 4 distinct tokens each; then
arrivals that each need an eviction of 16 slots, a few ms of "decode" between them (when
the background planner may run). Times each ``evict()`` call on the calling thread
(lock wait included), synchronous planning against the background planner. Usage:
``python bench/hot_path.py cpu --out bench/results/DIR/hot_path_cpu.json``

``gpu`` (for a GPU machine): one SGLang server per policy (stock, evicpress) with the
bundled SmolLM2; many short distinct prompts fill the cache to ``--contexts`` contexts,
then steady streaming decode traffic while new distinct prompts keep arriving (every
arrival forces evictions). ITL and TTFT p50/p99 from the streams, and evicpress's
``evict()`` hold time p50/p99/max from ``/evicpress/status``. Writes ``hot_path.json``
with one row per (contexts, policy). See the README's hot-path note for the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.settings import Settings

TOKENS = 4  # per context
EVICT = 16  # slots per eviction


def _cache(n: int, background: bool, budget_ms: float) -> EvicPressRadixCache:
    size = n * TOKENS + 4 * EVICT
    pool = MHATokenToKVPool(size=size, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=8, layer_num=1,
                            device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(size, torch.bfloat16, "cpu", pool, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(size=4, max_context_len=64, device="cpu",
                             enable_memory_saver=False), token_to_kv_pool_allocator=alloc, page_size=1)
    token_bytes = 2 * 8 * 2
    s = Settings(host_bytes=n * TOKENS * token_bytes // 3, host_codecs=["bf16", "int8"], disk_codecs=[],
                 async_plan_min_contexts=0 if background else None, evict_budget_ms=budget_ms, profile_share=0.0)
    return EvicPressRadixCache(params, s)


def _arrive(cache: EvicPressRadixCache, i: int) -> None:
    slots = cache.token_to_kv_pool_allocator.alloc(TOKENS)
    if slots is None:
        return
    cache.insert(InsertParams(key=RadixKey(list(range(TOKENS * i, TOKENS * i + TOKENS))), value=slots.to(torch.int64)))


def cpu(args: argparse.Namespace) -> dict:
    rows = []
    for n in args.contexts:
        for background in (False, True):
            cache = _cache(n, background, args.budget_ms)
            for i in range(n):
                _arrive(cache, i)
            times = []
            for j in range(args.warmup + args.evictions):
                t0 = time.perf_counter()
                cache.evict(EvictParams(num_tokens=EVICT))
                if j >= args.warmup:
                    times.append(time.perf_counter() - t0)
                for k in range(EVICT // TOKENS):
                    _arrive(cache, n + j * EVICT // TOKENS + k)
                time.sleep(args.gap_ms / 1e3)  # decode steps between evictions
            t = np.array(times) * 1e3
            row = {"contexts": n, "mode": "background" if background else "sync", "evictions": len(times),
                   "evict_p50_ms": round(float(np.percentile(t, 50)), 3),
                   "evict_p99_ms": round(float(np.percentile(t, 99)), 3), "evict_max_ms": round(float(t.max()), 3),
                   "plan": dict(cache.stats.plan), "plans": cache.planner.plans if background else None,
                   "contexts_at_end": len(cache.table)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache
    return {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "gap_ms": args.gap_ms, "budget_ms": args.budget_ms, "rows": rows}


# -- GPU -----------------------------------------------------------------------------------


def _stream(url: str, text: str, max_new: int) -> tuple[float, list[float]]:
    """(TTFT, inter-token gaps) of one streamed request, in seconds."""
    import requests

    t0 = time.perf_counter()
    marks = []
    with requests.post(url + "/generate", stream=True, timeout=600, json={
            "text": text, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                            "ignore_eos": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                marks.append(time.perf_counter())
    return marks[0] - t0, list(np.diff(marks))


def _prompt(i: int, words: int) -> str:
    """A distinct short prompt (about 3 SmolLM2 tokens per word): one context each."""
    return f"R{i:07d}: " + " ".join(f"w{(i * 7919 + j) % 100003}" for j in range(words))


def _fill(url: str, start: int, count: int, workers: int, words: int) -> None:
    """Prefill ``count`` distinct prompts (1 output token each), ``workers`` at a time."""
    import requests

    def run(k: int) -> None:
        for i in range(start + k, start + count, workers):
            requests.post(url + "/generate", timeout=600, json={"text": _prompt(i, words), "sampling_params": {
                "max_new_tokens": 1}}).raise_for_status()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def gpu(args: argparse.Namespace) -> dict:
    import requests

    from evicpress_sglang.bench.server import Server

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for policy in args.policies:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model, "--host", "127.0.0.1",
               "--port", str(args.port), "--max-total-tokens", str(args.pool_tokens), *args.sglang_args]
        env = dict(os.environ)
        if policy == "evicpress":
            cmd += ["--radix-cache-backend", "evicpress"]
            env["EVICPRESS_CONFIG"] = json.dumps({"host_bytes": args.host_bytes, "profile_share": 0.0,
                                                  "evict_budget_ms": args.budget_ms})
        with Server(cmd, env, args.out / f"{policy}.log", args.port) as url:
            filled = 0
            for n in sorted(args.contexts):
                # Prompts sized so that n of them fill the pool: every arrival then evicts, at
                # about n cached contexts, without n x long prefills.
                words = max(1, args.pool_tokens // n // 3 - 2)
                _fill(url, filled, n, args.fill_workers, words)
                filled += n
                before = requests.get(url + "/evicpress/status", timeout=60).json() if policy == "evicpress" else None
                ttft, itl, stop = [], [], time.monotonic() + args.seconds
                lock = threading.Lock()

                def decode(k: int) -> None:  # steady decode traffic over known prefixes
                    i = 0
                    while time.monotonic() < stop:
                        t, gaps = _stream(url, _prompt(filled - n + (k * 131 + i) % n, words), args.decode_tokens)
                        with lock:
                            itl.extend(gaps)
                        i += 1

                def arrive() -> None:  # new distinct prompts: each forces evictions
                    i = 0
                    while time.monotonic() < stop:
                        t, _ = _stream(url, _prompt(10_000_000 + n * 10 + i, words), 4)
                        with lock:
                            ttft.append(t)
                        i += 1

                threads = [threading.Thread(target=decode, args=(k,)) for k in range(args.decoders)]
                threads += [threading.Thread(target=arrive) for _ in range(args.arrivals)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                row = {"contexts": n, "policy": policy, "itl_p50_ms": float(np.percentile(itl, 50) * 1e3),
                       "itl_p99_ms": float(np.percentile(itl, 99) * 1e3),
                       "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
                       "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3), "requests": len(ttft), "evict_p99_ms": None}
                if policy == "evicpress":
                    st = requests.get(url + "/evicpress/status", timeout=60).json()
                    ev = st["stats"]["evict_ms"]
                    row |= {"evict_p50_ms": ev.get("p50"), "evict_p99_ms": ev.get("p99"), "evict_max_ms": ev.get("max"),
                            "cached_contexts": st["contexts"], "plan": st["stats"]["plan"], "planner": st["planner"],
                            "contexts_before": before["contexts"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"command": " ".join(["python"] + sys.argv), "rows": rows,
            "median_itl_ms": {p: statistics.median(r["itl_p50_ms"] for r in rows if r["policy"] == p)
                              for p in args.policies}}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--out")
    c.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 10_000, 100_000])
    c.add_argument("--evictions", type=int, default=200)
    c.add_argument("--warmup", type=int, default=5)
    c.add_argument("--gap-ms", type=float, default=20.0, help="decode time between two evictions")
    c.add_argument("--budget-ms", type=float, default=1.0)
    g = sub.add_parser("gpu")
    g.add_argument("--model", required=True)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 10_000])
    g.add_argument("--policies", type=lambda s: s.split(","), default=["stock", "evicpress"])
    g.add_argument("--pool-tokens", type=int, default=120_000, help="--max-total-tokens of each server")
    g.add_argument("--host-bytes", default="256MiB")
    g.add_argument("--budget-ms", type=float, default=1.0)
    g.add_argument("--seconds", type=float, default=30.0, help="measured traffic per context count")
    g.add_argument("--decoders", type=int, default=8)
    g.add_argument("--decode-tokens", type=int, default=128)
    g.add_argument("--arrivals", type=int, default=4)
    g.add_argument("--fill-workers", type=int, default=64)
    g.add_argument("--port", type=int, default=31900)
    g.add_argument("sglang_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.mode == "cpu":
        report = cpu(args)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    else:
        args.sglang_args = [x for x in args.sglang_args if x != "--"]
        report = gpu(args)
        (args.out / "hot_path.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
