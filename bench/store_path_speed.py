"""Where the time of one eviction store and one load-back goes, step by step, on a GPU.

Builds an SGLang-shaped KV pool (per-layer [slots, heads, head_dim] buffers) of the 8B-class
geometry, then for one context times: gather from the pool, encode, put into the pinned host
arena, get, decode, scatter (the torch codecs); then the fused path the backend uses,
``kv_io.encode_from_pool`` and ``kv_io.decode_into_pool``, and the whole load (``get``, the
host-to-GPU copy, then ``decode_into_pool``), whose restored bf16 bytes per second issue 20
wants at least 0.8 x PCIe x the codec's ratio (PCIe: the bf16 blob's copy speed here);
each step synchronised so it is measured alone. Then once more
as the cache does it (fused), unsynchronised, behind work queued on the current stream (as the
scheduler's forward pass is under SGLang's overlap scheduler): how long the calling
thread is held by a store and by a load-back (it should not wait for the queued work),
and whether the bytes that came back are exactly those stored.

Usage: python bench/store_path_speed.py [--tokens 9000] [--host-gib 12] [--disk-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from evicpress_sglang.backend import kv_io
from evicpress_sglang.codecs import get_codec
from evicpress_sglang.tiers import DiskTier, HostTier


def timed(fn, sync=True):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def queue_work(x: torch.Tensor, n: int = 250) -> None:
    """About 0.35 s of matmuls queued on the current stream (on an H100)."""
    for _ in range(n):
        x = (x @ x).clamp_(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=9000)
    ap.add_argument("--pool-tokens", type=int, default=48000)
    ap.add_argument("--host-gib", type=float, default=12)
    ap.add_argument("--disk-dir", help="also time a disk-tier store here")
    ap.add_argument("--out")
    a = ap.parse_args()
    layers, heads, dim = 32, 8, 128
    pool = SimpleNamespace(k_buffer=[torch.randn(a.pool_tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
                                     for _ in range(layers)], store_dtype=torch.bfloat16)
    pool.v_buffer = [b.clone() for b in pool.k_buffer]
    slots = torch.randperm(a.pool_tokens, device="cuda")[: a.tokens]
    tier, alloc_s = timed(lambda: HostTier(int(a.host_gib * 2**30)))
    report = {"tokens": a.tokens, "raw_bytes": a.tokens * layers * heads * dim * 4, "host_arena_alloc_s": alloc_s,
              "pinned": tier.pinned, "codecs": {}, "checks": {}}
    checks = report["checks"]
    disk = DiskTier(a.disk_dir, 8 << 30) if a.disk_dir else None
    for name in ("bf16", "fp8", "int8", "int4", "int2"):
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
            fused, steps["encode_fused"] = timed(lambda: kv_io.encode_from_pool(pool, slots, codec))
            _, steps["decode_fused"] = timed(lambda: kv_io.decode_into_pool(pool, slots, codec, got))
            _, steps["load_fused"] = timed(lambda: kv_io.decode_into_pool(pool, slots, codec,
                                                                          tier.get(f"{name}{rep}", device="cuda")))
            tier.delete(f"{name}{rep}")
        checks[f"{name}_fused_encode_exact"] = bool(torch.equal(fused.payload, enc.payload))
        back_k, back_v = kv_io.gather(pool, slots)
        checks[f"{name}_fused_decode_exact"] = bool(torch.equal(back_k, ok) and torch.equal(back_v, ov))
        # The store and the load as the cache does them, behind ~0.35 s of work queued on the
        # current stream (a forward pass under SGLang's overlap scheduler): the time the calling
        # (scheduler) thread is held, then whether the bytes that came back are right.
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        steps["the_queued_work_alone"] = timed(lambda: queue_work(x))[1]
        ref = codec.encode(*kv_io.gather(pool, slots))
        torch.cuda.synchronize()
        queue_work(x)
        t0 = time.perf_counter()
        tier.put("busy", kv_io.encode_from_pool(pool, slots, codec))
        steps["store_behind_queued_work_caller_held"] = time.perf_counter() - t0
        torch.cuda.synchronize()
        queue_work(x)
        t0 = time.perf_counter()
        got = tier.get("busy", device="cuda")
        kv_io.decode_into_pool(pool, slots, codec, got)
        steps["load_behind_queued_work_caller_held"] = time.perf_counter() - t0
        # the freed range is rewritten at once by another store: the load above must not see it
        tier.delete("busy")
        tier.put("overwrite", kv_io.encode_from_pool(pool, slots.flip(0), codec))
        torch.cuda.synchronize()
        checks[f"{name}_load_exact_after_async_store"] = bool(torch.equal(got.payload, ref.payload))
        tier.delete("overwrite")
        if disk is not None:
            queue_work(x)
            t0 = time.perf_counter()
            disk.put("busy", kv_io.encode_from_pool(pool, slots, codec))
            steps["disk_store_behind_queued_work_caller_held"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            disk.flush()
            steps["disk_write_until_on_disk"] = time.perf_counter() - t0
            back = disk.get("busy", device="cuda")
            torch.cuda.synchronize()
            checks[f"{name}_disk_exact"] = bool(torch.equal(back.payload, ref.payload))
            disk.delete("busy")
        report["codecs"][name] = {"stored_bytes": enc.nbytes, **{k: round(s, 5) for k, s in steps.items()}}
        print(name, report["codecs"][name], flush=True)
    pcie = report["codecs"]["bf16"]["stored_bytes"] / report["codecs"]["bf16"]["get"]
    for name, row in report["codecs"].items():
        ratio = report["raw_bytes"] / row["stored_bytes"]
        row["restored_gbps"] = round(report["raw_bytes"] / row["load_fused"] / 1e9, 1)
        row["target_gbps"] = round(0.8 * pcie * ratio / 1e9, 1)
        print(name, f"ratio {ratio:.2f}: load restores {row['restored_gbps']} GB/s of bf16 KV, target "
              f"{row['target_gbps']} (0.8 x PCIe {pcie / 1e9:.1f} GB/s x ratio)", flush=True)
    print("checks", checks, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
