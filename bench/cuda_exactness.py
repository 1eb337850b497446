"""Bit-exactness of the load-back path on the GPU: the CPU test scenario (tests/harness.py)
with SGLang's pools on CUDA. Lossless configurations must return the exact KV, lossy
ones stay within their bound. Usage: python bench/cuda_exactness.py [--out FILE]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import harness  # noqa: E402

from evicpress_sglang.backend.cache import EvicPressRadixCache  # noqa: E402
from evicpress_sglang.settings import Settings  # noqa: E402


def run(policy: str, disk_codecs: list[str], device: str) -> dict:
    harness.DEVICE = device
    s = Settings(policy=policy, host_bytes=120 * 2048, disk_dir=tempfile.mkdtemp(), disk_bytes=10**8,
                 host_codecs=["bf16", "int8", "int4"], disk_codecs=disk_codecs)
    cache = EvicPressRadixCache(harness.make_params(256), s)
    docs = [list(range(1000 * i, 1000 * i + 100)) for i in range(5)]
    for d in docs:
        harness.serve(cache, d + [1])
    worst, exact, loaded = 0.0, True, 0
    for d in docs:
        r = harness.serve(cache, d + [2])
        k, _ = harness.expected_kv(d + [2])
        k = k.to(r.k.device)
        loaded += r.loaded
        exact &= bool(torch.equal(r.k, k))
        worst = max(worst, ((r.k.float() - k.float()).norm() / k.float().norm()).item())
    return {"policy": policy, "disk_codecs": disk_codecs, "tokens_loaded": loaded, "bit_exact": exact,
            "worst_rel_l2": worst, "stores": dict(cache.stats.stores), "slots_accounted": harness.free_slots_accounted(cache)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [run("lru-offload", ["bf16"], device), run("static:int4", ["int4+zstd"], device),
            run("evicpress", ["bf16+zstd", "int4+zstd"], device)]
    out = {"command": " ".join(["python", *sys.argv]), "device": device, "rows": rows}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
