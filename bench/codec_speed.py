"""Encode and decode speed of every quantizer on a GPU: the fused kernels against the torch codecs.

The pool is a stand-in for SGLang's ``MHATokenToKVPool`` (per-layer ``[slots, heads, head_dim]``
K and V buffers; SGLang itself need not be installed) of the 8B-class geometry, 32 layers x 8 KV
heads x 128, bf16. A context sits at scattered slots (a random permutation, as a pool looks
after some churn). For each codec and context length it times, with CUDA events through
``triton.testing.do_bench`` (median, L2 flushed between runs):

* ``encode``: ``kv_io.encode_from_pool`` (fused) against gather + ``codec.encode`` (torch);
* ``decode``: ``kv_io.decode_into_pool`` (fused) against ``codec.decode`` into fresh tensors +
  scatter (torch);

and reports GB/s of bf16 KV (the context's uncompressed K and V bytes over the time), plus
whether the fused payload and the fused decode are bit-identical to the torch ones on this GPU.
A fused path that fails is an error in the report, never silently the torch numbers.

Usage: python bench/codec_speed.py [--tokens 1024 8192 32768] [--sweep] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch
import triton
import triton.testing

from evicpress_sglang.backend import kv_io
from evicpress_sglang.codecs import get_codec, kernels

LAYERS, HEADS, DIM = 32, 8, 128
#: KIVI tile settings tried by --sweep (int4 and int2 at 8k tokens; the same tile for both
#: directions): K's columns with V fixed, V's rows with K fixed, then warps. Each direction runs
#: one K and one V kernel, so a column's changes are that kernel's.
SWEEP = ([dict(KIVI_TILES={"encode": (c, 128), "decode": (c, 128)}, KIVI_WARPS=4) for c in (64, 128, 256, 512)]
         + [dict(KIVI_TILES={"encode": (128, r), "decode": (128, r)}, KIVI_WARPS=4) for r in (32, 64, 256, 512)]
         + [dict(KIVI_TILES={"encode": (128, 128), "decode": (128, 128)}, KIVI_WARPS=w) for w in (2, 8)])


def make_pool(slots: int) -> SimpleNamespace:
    """A stand-in for SGLang's MHA token pool: what kv_io reads of it."""
    g = torch.Generator(device="cuda").manual_seed(0)
    k = [torch.randn(slots, HEADS, DIM, device="cuda", generator=g).mul_(3).bfloat16() for _ in range(LAYERS)]
    v = [torch.randn(slots, HEADS, DIM, device="cuda", generator=g).bfloat16() for _ in range(LAYERS)]
    for buf in k:
        buf[..., 5] += 20  # an outlier channel, as real keys have
    return SimpleNamespace(k_buffer=k, v_buffer=v, store_dtype=torch.bfloat16)


def torch_encode(pool, slots, codec):
    return codec.device_codec.encode(*kv_io.gather(pool, slots))


def torch_decode(pool, slots, codec, enc) -> None:
    k, v, _ = kv_io.decode(codec.device_codec, enc, "cuda")
    kv_io.scatter(pool, slots, k, v)


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def measure(pool, slots: torch.Tensor, name: str, with_torch: bool = True) -> dict:
    """Seconds and GB/s of both directions, fused and (``with_torch``) torch, plus exactness."""
    codec = get_codec(name)
    raw = kv_io.pool_layout(pool).with_tokens(slots.numel()).raw_nbytes
    out: dict = {"codec": name, "tokens": slots.numel(), "raw_bytes": raw}
    ref = torch_encode(pool, slots, codec)
    out["stored_bytes"] = ref.nbytes
    enc = kv_io.encode_from_pool(pool, slots, codec)
    out["encode_exact"] = bool(torch.equal(enc.payload, ref.payload))
    into = slots[: codec.output_shape(ref.shape).tokens]
    before = kv_io.gather(pool, into)
    torch_decode(pool, into, codec, ref)
    want = kv_io.gather(pool, into)
    kv_io.decode_into_pool(pool, into, codec, ref)
    got = kv_io.gather(pool, into)
    out["decode_exact"] = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
    kv_io.scatter(pool, into, *before)  # leave the pool as it was for the next codec
    timings = {"encode_fused": lambda: kv_io.encode_from_pool(pool, slots, codec),
               "decode_fused": lambda: kv_io.decode_into_pool(pool, into, codec, ref)}
    if with_torch:
        timings |= {"encode_torch": lambda: torch_encode(pool, slots, codec),
                    "decode_torch": lambda: torch_decode(pool, into, codec, ref)}
    for key, fn in timings.items():
        t = ms(fn) / 1e3
        out[f"{key}_s"] = t
        out[f"{key}_gbps"] = round(raw / t / 1e9, 1)
    kv_io.scatter(pool, into, *before)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--codecs", nargs="+", default=["fp8", "int8", "int4", "int2", "bf16", "keep+int4"])
    ap.add_argument("--sweep", action="store_true", help="also time the tile settings in SWEEP at 8k tokens")
    ap.add_argument("--out")
    a = ap.parse_args()

    def refuse(quantizer, e):  # a failing kernel must show, not be replaced by the torch numbers
        raise e

    kv_io._give_up = refuse
    pool = make_pool(max(*a.tokens, 8192) + 4096)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "geometry": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "dtype": "bfloat16"},
              "results": [], "errors": {}, "sweep": []}
    perm = torch.randperm(pool.k_buffer[0].shape[0], device="cuda")
    for tokens in a.tokens:
        slots = perm[:tokens].clone()
        for name in a.codecs:
            try:
                row = measure(pool, slots, name)
            except Exception as e:  # noqa: BLE001 - reported, the other codecs still run
                report["errors"][f"{name}/{tokens}"] = f"{type(e).__name__}: {e}"
                print(name, tokens, "ERROR", e, flush=True)
                continue
            report["results"].append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}), flush=True)
    if a.sweep:
        slots = perm[:8192].clone()
        for setting in SWEEP:
            for key, value in setting.items():
                setattr(kernels, key, value)
            for name in ("int4", "int2"):
                row = {**setting, **measure(pool, slots, name, with_torch=False)}
                report["sweep"].append(row)
                print("sweep", json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
