"""GPU entropy coding for the disk tier (issue 20, item 3, "the disk tier pays where it can"):
how fast nvCOMP compresses and decompresses our KV payloads on the GPU, next to a plain device
copy (no entropy stage), the host->GPU copy of the raw and of the compressed bytes, and our CPU
zstd (``codecs/zstd.py``) on the same bytes, so one JSON says whether a smaller transfer plus
GPU decompression beats moving the raw payload. Payloads as in ``bench/zstd_speed.py``
(synthetic 8B-shaped KV quantised by our codecs), plus real SmolLM2 KV with ``--model``.
All rates are GB/s of uncompressed payload; the load columns add their stages in series (disk
read of the stored bytes, pinned host->GPU copy, decompression), with no overlap.

Usage: python bench/gpu_compress_speed.py [--mib 64] [--model DIR] [--chunk-kib N] [--repeats 5]
       [--disk-gb-s 1.2] [--out FILE.json]
Exits 2 with one line when ``nvidia.nvcomp`` cannot be imported or there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from evicpress_sglang.codecs import KVShape, get_codec, zstd
from evicpress_sglang.timing import best_seconds

CODECS = ("bf16", "int8", "int4")
VIEWS = {"|u1": torch.uint8, "<i2": torch.int16, "<f2": torch.float16}  # nvCOMP data_type -> torch view


def variants(word: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, nvCOMP algorithm, Codec options) to try on a payload whose elements are ``word``."""
    out: list[tuple[str, str, dict[str, Any]]] = [
        ("Zstd", "Zstd", {}), ("LZ4", "LZ4", {}), ("GDeflate", "GDeflate", {}),
        ("GDeflate entropy-only", "GDeflate", {"algorithm_type": 0}), ("ANS", "ANS", {}),
        ("Bitcomp", "Bitcomp", {"data_type": word}), ("Cascaded", "Cascaded", {"data_type": word})]
    if word == "<i2":  # bf16 bits: let ANS see 16-bit symbols too (lossless either way; checked below)
        out.append(("ANS <f2", "ANS", {"data_type": "<f2"}))
    return out


def synthetic_payload(codec_name: str, mib: int) -> torch.Tensor:
    """The bytes ``bench/zstd_speed.py`` measures: randn KV of an 8B shape through our codec (CPU uint8)."""
    layout = KVShape(32, 0, 8, 128, torch.bfloat16)  # Llama-8B-class KV: 128 KiB per token
    tokens = max(1, (mib << 20) // get_codec(codec_name).nbytes(layout.with_tokens(1)))
    g = torch.Generator().manual_seed(0)
    k = torch.randn(layout.with_tokens(tokens).tensor_shape, generator=g).to(torch.bfloat16)
    v = torch.randn(layout.with_tokens(tokens).tensor_shape, generator=g).to(torch.bfloat16)
    return get_codec(codec_name).encode(k, v).payload.reshape(-1).view(torch.uint8)


def real_payloads(model_dir: str, mib: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    """SmolLM2 KV of real text through each codec, about ``mib`` MiB of bf16 KV ({} without transformers)."""
    try:
        from evicpress_sglang.kv_sample import real_kv
        k, v = real_kv(model_dir, max(16, (mib << 20) // (2 * 30 * 3 * 64 * 2)), device=device)  # SmolLM2-135M
    except Exception as e:  # noqa: BLE001 -- transformers missing, or not a model directory: the synthetic rows still run
        print(f"real KV skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return {}
    k, v = k.cpu(), v.cpu()
    return {f"smollm2 {c}": get_codec(c).encode(k, v).payload.reshape(-1).view(torch.uint8) for c in CODECS}


def as_nv(nv: Any, t: torch.Tensor, stream: int) -> Any:
    """A zero-copy nvCOMP Array over a CUDA tensor (as_array, else through a DLPack capsule)."""
    try:
        return nv.as_array(t, cuda_stream=stream)
    except Exception:  # noqa: BLE001
        return nv.from_dlpack(torch.utils.dlpack.to_dlpack(t), cuda_stream=stream)


def to_torch(arr: Any) -> torch.Tensor:
    """The bytes of an nvCOMP Array as a flat uint8 CUDA tensor, without a copy (DLPack, else CUDA array interface)."""
    try:
        t = torch.from_dlpack(arr)
    except Exception:  # noqa: BLE001
        t = torch.as_tensor(arr, device="cuda")
    return t.reshape(-1).view(torch.uint8)


def gpu_row(nv: Any, algo: str, opts: dict[str, Any], payload: torch.Tensor, ctx: dict[str, Any]) -> dict[str, Any]:
    """Compress ``payload`` (uint8, on the GPU) with one nvCOMP algorithm, check and time the round trip."""
    n, s = payload.numel(), ctx["stream"].cuda_stream
    kw = {"algorithm": algo, "cuda_stream": s, **opts}
    if ctx["chunk"]:
        kw["uncomp_chunk_size"] = ctx["chunk"]
    codec = nv.Codec(**kw)
    src = as_nv(nv, payload.view(VIEWS[opts.get("data_type", "|u1")]), s)
    comp = codec.encode(src)
    torch.cuda.synchronize()
    csize = int(comp.buffer_size)
    dcfg = codec.decompression_config(comp)  # parses the header once (syncs); timed decodes are sync-free
    dst = torch.zeros_like(payload)
    decode: Callable[[], Any] = lambda: codec.decode(comp, out=dst, decompression_config=dcfg)
    how = "into a preallocated tensor"
    try:
        decode()
        torch.cuda.synchronize()
        ok = torch.equal(dst, payload)
    except Exception as e:  # noqa: BLE001
        ok, how = False, f"out= failed: {type(e).__name__}: {e}"
    if not ok:  # out= refused or left our tensor unequal: let nvCOMP allocate the output and check that
        how = f"nvCOMP-allocated output ({how if 'failed' in how else 'out= left the tensor unequal'})"
        decode = lambda: codec.decode(comp, decompression_config=dcfg)
        got = to_torch(decode())
        ok = got.numel() == n and torch.equal(got, payload)
    if not ok:
        return {"error": f"round trip differs ({how})", "compressed_bytes": csize}
    enc_how = "into a preallocated tensor"
    try:  # time encoding without nvCOMP allocating its output each call, where out= takes our buffer
        buf = torch.empty(int(codec.get_max_comp_buffer_size(src)), dtype=torch.uint8, device="cuda")
        codec.encode(src, out=buf)
        torch.cuda.synchronize()
        encode: Callable[[], Any] = lambda: codec.encode(src, out=buf)
    except Exception as e:  # noqa: BLE001
        enc_how = f"nvCOMP-allocated output (out= failed: {type(e).__name__}: {e})"
        encode = lambda: codec.encode(src)
    t_c = best_seconds(encode, ctx["repeats"])
    t_d = best_seconds(decode, ctx["repeats"])
    m = min(csize, ctx["pinned"].numel())
    t_h2d = best_seconds(lambda: ctx["landing"][:m].copy_(ctx["pinned"][:m], non_blocking=True), ctx["repeats"])
    return {"ratio": n / csize, "compressed_bytes": csize, "compress_gb_s": n / t_c / 1e9,
            "decompress_gb_s": n / t_d / 1e9, "encode": enc_how, "decode": how, **load_rates(n, csize, t_h2d, t_d, ctx)}


def load_rates(n: int, csize: int, t_h2d: float, t_d: float, ctx: dict[str, Any]) -> dict[str, float]:
    """Uncompressed bytes per second brought onto the GPU from pinned host memory and from the disk."""
    disk = ctx["disk_gb_s"] * 1e9
    return {"host_load_gb_s": n / (t_h2d + t_d) / 1e9, "disk_load_gb_s": n / (csize / disk + t_h2d + t_d) / 1e9}


def cpu_zstd_row(payload: torch.Tensor, t_h2d_raw: float, ctx: dict[str, Any]) -> dict[str, Any]:
    """Our chunked CPU zstd on the same bytes; loading = CPU decompress, then the raw host->GPU copy."""
    raw = payload.cpu()
    mv = memoryview(raw.numpy()).cast("B")
    blob = zstd.compress(mv)
    if not torch.equal(zstd.decompress(memoryview(blob), len(mv)), raw):
        return {"error": "round trip differs"}
    n, reps = len(mv), ctx["repeats"]
    t_c = best_seconds(lambda: zstd.compress(mv), min(reps, 2))
    t_d = best_seconds(lambda: zstd.decompress(memoryview(blob), n), reps)
    return {"ratio": n / len(blob), "compressed_bytes": len(blob), "compress_gb_s": n / t_c / 1e9,
            "decompress_gb_s": n / t_d / 1e9, **load_rates(n, len(blob), t_h2d_raw, t_d, ctx)}


def guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)``'s row, or ``{"error": ...}``: a failing method is recorded and the run goes on."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def measure(nv: Any, name: str, host_payload: torch.Tensor, ctx: dict[str, Any]) -> dict[str, Any]:
    payload = host_payload.to("cuda")
    n = payload.numel()
    room = n + n // 8 + (1 << 20)  # a compressed blob can be a little larger than its payload
    ctx["pinned"] = torch.empty(room, dtype=torch.uint8, pin_memory=True)
    ctx["pinned"][:n].copy_(host_payload)
    ctx["landing"] = torch.empty(room, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(payload)
    t_copy = best_seconds(lambda: dst.copy_(payload), ctx["repeats"])
    t_h2d = best_seconds(lambda: dst.copy_(ctx["pinned"][:n], non_blocking=True), ctx["repeats"])
    rows: dict[str, dict[str, Any]] = {
        "none (device copy)": {"ratio": 1.0, "decompress_gb_s": n / t_copy / 1e9},
        "none (raw host->GPU)": {"ratio": 1.0, **load_rates(n, n, t_h2d, 0.0, ctx)}}
    word = "<i2" if name.endswith("bf16") and n % 2 == 0 else "|u1"
    for label, algo, opts in variants(word):
        rows[f"nvCOMP {label}"] = guarded(gpu_row, nv, algo, opts, payload, ctx)
    rows[f"CPU zstd ({zstd.THREADS} threads)"] = guarded(cpu_zstd_row, host_payload, t_h2d, ctx)
    return {"payload": name, "payload_bytes": n, "rows": rows}


def table(results: list[dict[str, Any]], disk_gb_s: float) -> str:
    """The results as one markdown table (GB/s of uncompressed payload bytes)."""
    def f(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.2f}" if key in row else ""
    head = ("| payload | method | ratio | compress GB/s | decompress GB/s | load from pinned host GB/s "
            f"| load from disk @{disk_gb_s:g} GB/s |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        for method, row in res["rows"].items():
            if "error" in row:
                lines.append(f"| {res['payload']} | {method} | error: {str(row['error'])[:80]} | | | | |")
                continue
            keys = ("ratio", "compress_gb_s", "decompress_gb_s", "host_load_gb_s", "disk_load_gb_s")
            cells = [f(row, k) for k in keys]
            lines.append(f"| {res['payload']} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64, help="payload size per codec")
    p.add_argument("--model", help="also real KV of this (SmolLM2) HF model directory")
    p.add_argument("--chunk-kib", type=int, default=0, help="nvCOMP uncomp_chunk_size (default: nvCOMP's 64 KiB)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--disk-gb-s", type=float, default=1.2, help="disk read speed assumed for the disk-load column")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    try:
        from nvidia import nvcomp as nv
    except Exception as e:  # noqa: BLE001 -- ImportError, or OSError loading libnvcomp
        print(f"gpu_compress_speed: cannot import nvidia.nvcomp ({type(e).__name__}: {e}); "
              "pip install nvidia-nvcomp-cu13 and put it on PYTHONPATH", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("gpu_compress_speed: no CUDA device visible to torch; nothing to measure", file=sys.stderr)
        sys.exit(2)
    ctx: dict[str, Any] = {"stream": torch.cuda.Stream(), "chunk": args.chunk_kib << 10, "repeats": args.repeats,
                           "disk_gb_s": args.disk_gb_s}
    payloads = {c: synthetic_payload(c, args.mib) for c in CODECS}
    if args.model:
        payloads.update(real_payloads(args.model, args.mib))
    with torch.cuda.stream(ctx["stream"]):  # nvCOMP and torch's copies share one stream
        results = [measure(nv, name, t, ctx) for name, t in payloads.items()]
    out = {"command": " ".join([sys.executable, *sys.argv]), "torch": torch.__version__, "cuda": torch.version.cuda,
           "nvcomp": getattr(nv, "__version__", "?"), "nvcomp_cuda": getattr(nv, "__cuda_version__", "?"),
           "gpu": torch.cuda.get_device_name(), "cpu_count": os.cpu_count(), "zstd_threads": zstd.THREADS,
           "zstd_level": zstd.LEVEL, "mib": args.mib, "repeats": args.repeats, "chunk_bytes": args.chunk_kib << 10,
           "disk_gb_s": args.disk_gb_s, "results": results}
    print(table(results, args.disk_gb_s))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
