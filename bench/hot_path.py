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
import shlex
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
from evicpress_sglang.bench.report import hist_percentile
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
        for background in [m == "background" for m in args.modes]:
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
                   "lock_wait_ms": cache.stats.evict_ms(waits=True),
                   "plan": dict(cache.stats.plan), "plans": cache.planner.plans if background else None,
                   "contexts_at_end": len(cache.table)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache
    return {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "gap_ms": args.gap_ms, "budget_ms": args.budget_ms, "rows": rows}


# -- GPU -----------------------------------------------------------------------------------

VOCAB_BASE, VOCAB_SPAN = 1000, 40_000  # token ids used: inside every Llama-style vocabulary


def context_ids(i: int, tokens: int) -> list[int]:
    """Context ``i``'s ``tokens`` token ids (no tokenizer involved): distinct from every other
    context's in their first two ids (for i < 1.6e9). No vocabulary has 100k first tokens, so
    beyond 40k contexts some share their first id, and the radix tree holds one-token parent
    nodes above them (counted among the cached contexts)."""
    ids = [VOCAB_BASE + i % VOCAB_SPAN, VOCAB_BASE + (i // VOCAB_SPAN) % VOCAB_SPAN]
    return (ids + [VOCAB_BASE + (i * 7919 + j * 104729) % VOCAB_SPAN for j in range(tokens - 2)])[:tokens]


def stream_chunks(lines):
    """The token chunks of an SGLang SSE stream, as they arrive (``data: {...}`` lines; the
    final ``data: [DONE]`` is not one); an error chunk raises."""
    for line in lines:
        if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if isinstance(chunk, dict) and "error" in chunk:
            raise RuntimeError(str(chunk["error"])[:300])
        yield chunk


def _stream(url: str, ids: list[int], max_new: int) -> tuple[float, list[float]]:
    """(TTFT, inter-token gaps) of one streamed request, in seconds."""
    import requests

    marks: list[float] = []
    t0 = time.perf_counter()
    with requests.post(url + "/generate", stream=True, timeout=600, json={
            "input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                                "ignore_eos": True}}) as r:
        r.raise_for_status()
        for _ in stream_chunks(r.iter_lines()):
            marks.append(time.perf_counter())
    return marks[0] - t0, list(np.diff(marks))


def _fill(url: str, first: int, count: int, tokens: int, workers: int, batch: int) -> None:
    """Prefill contexts ``first .. first+count-1`` (1 output token each), as batched requests
    (a list of prompts per /generate), ``workers`` requests at a time."""
    import requests

    failures: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for lo in range(first + k * batch, first + count, workers * batch):
                ids = [context_ids(i, tokens) for i in range(lo, min(lo + batch, first + count))]
                requests.post(url + "/generate", timeout=600, json={
                    "input_ids": ids, "sampling_params": {"max_new_tokens": 1}}).raise_for_status()
        except Exception as e:  # noqa: BLE001 - re-raised below: a half-filled cache is not measured
            failures.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        raise RuntimeError(f"filling {count} contexts of {tokens} tokens failed: {failures[0]!r}")


def _percentiles(prefix: str, seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    if ms.size == 0:  # every request failed: reported as such, the run goes on
        return {f"{prefix}_p50_ms": None, f"{prefix}_p99_ms": None, f"{prefix}_n": 0}
    return {f"{prefix}_p50_ms": float(np.percentile(ms, 50)), f"{prefix}_p99_ms": float(np.percentile(ms, 99)),
            f"{prefix}_n": int(ms.size)}


def evictions_between(before: dict, after: dict) -> dict:
    """p50 / p99 of ``evict()`` time and of its lock wait over the evictions between two
    statuses (the histograms' difference, so the fill and earlier context counts are out),
    at the histogram's resolution (each figure is a bucket's upper bound)."""
    h0, h1 = before["stats"]["evict_hist"], after["stats"]["evict_hist"]
    out = {"evictions": sum(h1["counts"]) - sum(h0["counts"])}
    for name, key in (("evict", "counts"), ("evict_lock_wait", "wait_counts")):
        diff = [a - b for a, b in zip(h1[key], h0[key])]
        for q in (50, 99):
            out[f"{name}_p{q}_ms"] = hist_percentile(h1["buckets_ms"], diff, q)
    steps = {}
    for kind, counts in h1.get("steps", {}).items():  # what the evictions' time is made of
        diff = [a - b for a, b in zip(counts, h0.get("steps", {}).get(kind, [0] * len(counts)))]
        if sum(diff):
            steps[kind] = {"n": sum(diff), **{f"p{q}_ms": hist_percentile(h1["buckets_ms"], diff, q)
                                               for q in (50, 99, 100)}}
    return out | {"evict_steps": steps}


def measure(url: str, policy: str, n: int, first: int, tokens: int, args: argparse.Namespace) -> dict:
    """Steady decode over the ``n`` contexts just filled, plus arrivals of new ones (each
    forcing an eviction) for ``args.seconds``; ITL from the decodes, TTFT from the arrivals."""
    import requests

    status = (lambda: requests.get(url + "/evicpress/status", timeout=60).json()) if policy == "evicpress" else None
    before = status() if status else None
    ttft, itl, errors = [], [], []
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds

    def loop(k: int, decode: bool) -> None:
        i = 0
        while time.monotonic() < stop:
            if decode:  # a known context, continued for decode_tokens
                ids, new = context_ids(first + (k * 7919 + i * 131) % n, tokens), args.decode_tokens
            else:  # a context never seen: its prefill needs room
                ids, new = context_ids(args.arrival_base + n * 1000 + k * 100_000 + i, tokens), 4
            try:
                t, gaps = _stream(url, ids, new)
            except Exception as e:  # a failed request is reported, and the run goes on
                with lock:
                    errors.append(repr(e)[:200])
                continue
            with lock:
                (itl.extend(gaps) if decode else ttft.append(t))
            i += 1

    threads = [threading.Thread(target=loop, args=(k, True)) for k in range(args.decoders)]
    threads += [threading.Thread(target=loop, args=(k, False)) for k in range(args.arrivals)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    row = {"contexts": n, "policy": policy, "context_tokens": tokens, "errors": len(errors),
           "first_errors": errors[:3], **_percentiles("itl", itl), **_percentiles("ttft", ttft),
           "evict_p50_ms": None, "evict_p99_ms": None}
    if status:
        st = status()
        row |= evictions_between(before, st) | {
                "cached_contexts_before": before["contexts"],
                "cached_contexts_after": st["contexts"], "plan": st["stats"]["plan"], "planner": st["planner"],
                "plan_before": before["stats"]["plan"], "internal_errors": st["health"]["internal_errors"],
                "stores": st["stats"]["stores"]}
    return row


def server_command(policy: str, args: argparse.Namespace) -> tuple[list[str], dict]:
    """The launch command and environment of the ``stock`` or ``evicpress`` server."""
    cmd = [*shlex.split(args.launcher), "--model-path", args.model, "--host", "127.0.0.1",
           "--port", str(args.port), "--max-total-tokens", str(args.pool_tokens), *args.sglang_args]
    env = dict(os.environ)
    if policy == "evicpress":
        cmd += ["--radix-cache-backend", "evicpress"]
        env["EVICPRESS_CONFIG"] = json.dumps({"host_bytes": args.host_bytes, "profile_share": 0.0,
                                              "evict_budget_ms": args.budget_ms})
    return cmd, env


def gpu(args: argparse.Namespace) -> dict:
    from evicpress_sglang.bench.server import Server

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for policy in args.policies:
        cmd, env = server_command(policy, args)
        with Server(cmd, env, args.out / f"{policy}.log", args.port, timeout=args.server_timeout) as url:
            first = 0
            for n in sorted(args.contexts):
                # n contexts fill the pool: every arrival then evicts, at about n cached contexts,
                # with the same prefill work (one pool of tokens) at every n.
                tokens = max(4, int(args.fill_share * args.pool_tokens) // n)
                t0 = time.perf_counter()
                _fill(url, first, n, tokens, args.fill_workers, args.fill_batch)
                fill_s = time.perf_counter() - t0
                row = measure(url, policy, n, first, tokens, args) | {"fill_s": fill_s}
                first += n
                rows.append(row)
                print(json.dumps(row), flush=True)
                (args.out / "hot_path.partial.json").write_text(json.dumps(rows, indent=1))
    by = {(r["contexts"], r["policy"]): r for r in rows}
    ratios = {str(n): by[(n, "evicpress")]["itl_p99_ms"] / by[(n, "stock")]["itl_p99_ms"]
              for n in args.contexts if (n, "evicpress") in by and (n, "stock") in by
              and by[(n, "evicpress")]["itl_p99_ms"] and by[(n, "stock")]["itl_p99_ms"]}
    return {"command": " ".join(["python"] + sys.argv), "rows": rows, "itl_p99_evicpress_over_stock": ratios}


def _modes(text: str) -> list[str]:
    modes = text.split(",")
    if not modes or set(modes) - {"sync", "background"}:
        raise argparse.ArgumentTypeError(f"expected sync and/or background, got {text!r}")
    return modes


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--out")
    c.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 10_000, 100_000])
    c.add_argument("--evictions", type=int, default=200)
    c.add_argument("--warmup", type=int, default=5)
    c.add_argument("--gap-ms", type=float, default=20.0, help="decode time between two evictions")
    c.add_argument("--budget-ms", type=float, default=1.0)
    c.add_argument("--modes", type=_modes, default=["sync", "background"],
                   help="sync (re-plan inside each eviction) and/or background (the planner thread)")
    g = sub.add_parser("gpu")
    g.add_argument("--model", required=True)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 10_000, 100_000])
    g.add_argument("--policies", type=lambda s: s.split(","), default=["stock", "evicpress"])
    g.add_argument("--pool-tokens", type=int, default=1_000_000, help="--max-total-tokens of each server")
    g.add_argument("--fill-share", type=float, default=0.9, help="share of the pool the n contexts fill")
    g.add_argument("--host-bytes", default="256MiB")
    g.add_argument("--budget-ms", type=float, default=1.0)
    g.add_argument("--seconds", type=float, default=30.0, help="measured traffic per context count")
    g.add_argument("--decoders", type=int, default=8)
    g.add_argument("--decode-tokens", type=int, default=128)
    g.add_argument("--arrivals", type=int, default=4)
    g.add_argument("--fill-workers", type=int, default=8)
    g.add_argument("--fill-batch", type=int, default=256, help="prompts per /generate request while filling")
    g.add_argument("--arrival-base", type=int, default=10_000_000, help="first context index of the arrivals")
    g.add_argument("--server-timeout", type=float, default=300)
    g.add_argument("--launcher", default=f"{sys.executable} -m sglang.launch_server",
                   help="the server command (tests use a stand-in)")
    g.add_argument("--port", type=int, default=31900)
    g.add_argument("sglang_args", nargs=argparse.REMAINDER)
    return ap


def main() -> None:
    args = parser().parse_args()
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
