"""Where the time of one eviction store and one load-back goes, step by step, on a GPU.

Builds an SGLang-shaped KV pool (per-layer [slots, heads, head_dim] buffers) of the 8B-class
geometry, then for one context times: gather from the pool, encode, put into the pinned host
arena, get, decode, scatter; each step synchronised so it is measured alone, and once more
with the whole store unsynchronised while another stream keeps the GPU busy (as the
scheduler's forward pass does under SGLang's overlap scheduler), and once behind work
queued on its own stream.

Usage: python bench/store_path_speed.py [--tokens 9000] [--host-gib 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from evicpress_sglang.backend import kv_io
from evicpress_sglang.codecs import get_codec
from evicpress_sglang.tiers import HostTier


def timed(fn, sync=True):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=9000)
    ap.add_argument("--pool-tokens", type=int, default=48000)
    ap.add_argument("--host-gib", type=float, default=12)
    ap.add_argument("--out")
    a = ap.parse_args()
    layers, heads, dim = 32, 8, 128
    pool = SimpleNamespace(k_buffer=[torch.randn(a.pool_tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
                                     for _ in range(layers)], store_dtype=torch.bfloat16)
    pool.v_buffer = [b.clone() for b in pool.k_buffer]
    slots = torch.randperm(a.pool_tokens, device="cuda")[: a.tokens]
    tier, alloc_s = timed(lambda: HostTier(int(a.host_gib * 2**30)))
    report = {"tokens": a.tokens, "raw_bytes": a.tokens * layers * heads * dim * 4, "host_arena_alloc_s": alloc_s,
              "pinned": tier.pinned, "codecs": {}}
    for name in ("bf16", "int8", "int4"):
        codec = get_codec(name)
        steps = {}
        for rep in range(3):  # the last repetition is reported (first ones warm up allocator and kernels)
            (k, v), steps["gather"] = timed(lambda: kv_io.gather(pool, slots))
            enc, steps["encode"] = timed(lambda: codec.encode(k, v))
            _, steps["put"] = timed(lambda: tier.put(f"{name}{rep}", enc))
            got, steps["get"] = timed(lambda: tier.get(f"{name}{rep}", device="cuda"))
            ok, ov = torch.empty_like(k), torch.empty_like(v)
            _, steps["decode"] = timed(lambda: codec.decode(got, ok, ov))
            _, steps["scatter"] = timed(lambda: kv_io.scatter(pool, slots, ok, ov))
            tier.delete(f"{name}{rep}")
        # The store as the cache does it, while another stream keeps the GPU busy for ~0.3 s.
        busy = torch.cuda.Stream()
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        with torch.cuda.stream(busy):
            for _ in range(250):
                x = (x @ x).clamp_(-1, 1)
        t0 = time.perf_counter()
        tier.put("busy", codec.encode(*kv_io.gather(pool, slots)))
        steps["store_while_other_stream_busy"] = time.perf_counter() - t0
        torch.cuda.synchronize()
        tier.delete("busy")
        for _ in range(250):  # the same work queued on the stream the store uses
            x = (x @ x).clamp_(-1, 1)
        t0 = time.perf_counter()
        tier.put("busy", codec.encode(*kv_io.gather(pool, slots)))
        steps["store_behind_queued_work_same_stream"] = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(250):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()
        steps["the_queued_work_alone"] = time.perf_counter() - t0
        tier.delete("busy")
        report["codecs"][name] = {"stored_bytes": enc.nbytes, **{k: round(s, 5) for k, s in steps.items()}}
        print(name, report["codecs"][name], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
