"""Disk-tier entropy coding (issue 20): how fast a blob comes back from zstd, one frame on one
core against the chunked frames decoded on every core (``codecs/zstd.py``), next to no
entropy stage at all, and what each saves. Synthetic KV shaped like an 8B model's (randn,
quantised by our codecs), so the gains are a lower bound of real KV's.

Usage: python bench/zstd_speed.py [--mib 64] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import zstandard

from evicpress_sglang.codecs import KVShape, get_codec, zstd
from evicpress_sglang.timing import best_seconds


def measure(codec_name: str, mib: int) -> dict:
    layout = KVShape(32, 0, 8, 128, torch.bfloat16)  # Llama-8B-class KV: 128 KiB per token
    tokens = max(1, (mib << 20) // get_codec(codec_name).nbytes(layout.with_tokens(1)))
    g = torch.Generator().manual_seed(0)
    k = torch.randn(layout.with_tokens(tokens).tensor_shape, generator=g).to(torch.bfloat16)
    v = torch.randn(layout.with_tokens(tokens).tensor_shape, generator=g).to(torch.bfloat16)
    inner = get_codec(codec_name).encode(k, v)
    raw = inner.payload.numpy()
    single = zstandard.ZstdCompressor(level=zstd.LEVEL, write_checksum=True).compress(raw)
    chunked = zstd.compress(memoryview(raw).cast("B"))
    n = len(raw)
    rate = {
        "none (copy)": n / best_seconds(lambda: bytearray(raw), 3),
        "one frame, one core": n / best_seconds(lambda: zstandard.ZstdDecompressor().decompress(single), 3),
        f"chunked, {zstd.THREADS} threads": n / best_seconds(lambda: zstd.decompress(memoryview(chunked), n), 3),
    }
    encode = {
        "one frame, one core": n / best_seconds(lambda: zstandard.ZstdCompressor(level=zstd.LEVEL).compress(raw), 2),
        f"chunked, {zstd.THREADS} threads": n / best_seconds(lambda: zstd.compress(memoryview(raw).cast("B")), 2),
    }
    return {"codec": codec_name, "payload_bytes": n, "gain_one_frame": n / len(single), "gain_chunked": n / len(chunked),
            "decode_gb_s": {k_: r / 1e9 for k_, r in rate.items()}, "encode_gb_s": {k_: r / 1e9 for k_, r in encode.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64, help="payload size per codec")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    rows = [measure(c, args.mib) for c in ("bf16", "int8", "int4")]
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "threads": zstd.THREADS, "chunk_bytes": zstd.CHUNK, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
