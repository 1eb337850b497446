"""The fused codec kernels against the torch codecs, run on CPU by Triton's interpreter.

Run as a script (``tests/test_codec_kernels.py`` does, in a subprocess): ``TRITON_INTERPRET=1``
must be set before Triton is first imported, and SGLang imports it, so this cannot share a
process with the other tests. Each case builds a real SGLang ``MHATokenToKVPool`` on CPU,
fills it, and checks through :func:`kv_io.encode_from_pool` / :func:`kv_io.decode_into_pool`
(which take the kernel path under the interpreter) that

* the payload is byte-identical to ``codec.device_codec.encode`` of the gathered KV, and
* decoding the torch codec's payload into the pool leaves every buffer exactly as
  ``decode`` + ``scatter`` does, other slots untouched, with the same positions.

Triton's interpreter emulates float conversions (float32 -> bf16 / fp8) with its own bit
twiddling, which truncates or rounds half up where the GPU rounds to nearest even; that is
not what the compiled kernels do, so the conversions are delegated to torch's (round to
nearest even, as the hardware's ``cvt.rn``) before any kernel runs. Everything else (loads,
stores, index math, reductions, division, rounding of codes, packing) is the interpreter's.

Usage: TRITON_INTERPRET=1 python tests/kernel_checks.py RESULTS.json
"""

from __future__ import annotations

import json
import sys
import traceback

GEOMETRIES = {"L3H2D64": (3, 2, 64), "L2H3D128": (2, 3, 128)}
TOKENS = (1, 31, 64, 70)
CODECS = ("fp8", "int8", "int4", "int2", "bf16", "keep+int8", "keep+int2", "keydiff:0.4+int4", "streaming:0.5+fp8",
          "knorm:0.3")
#: Other pool dtypes SGLang allows (codec, geometry, tokens, dtype).
DTYPE_CASES = (("int4", "L3H2D64", 45, "float32"), ("int8", "L3H2D64", 45, "float16"), ("fp8", "L2H3D128", 9, "float16"),
               ("bf16", "L3H2D64", 45, "float32"), ("bf16", "L2H3D128", 9, "float16"))


def cases() -> list[str]:
    """Every case id: codec/geometry/tokens[/dtype], and the start-up warm-up per geometry."""
    out = [f"{c}/{g}/{t}" for c in CODECS for g in GEOMETRIES for t in TOKENS]
    return out + [f"{c}/{g}/{t}/{d}" for c, g, t, d in DTYPE_CASES] + [f"warm_up/{g}" for g in GEOMETRIES]


def check_warm_up(geometry: str) -> None:
    """kv_io.warm_up runs every kernel family in both directions and touches no slot but 0."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from evicpress_sglang.backend import kv_io

    layers, heads, dim = GEOMETRIES[geometry]
    pool = MHATokenToKVPool(size=64, page_size=1, dtype=torch.bfloat16, head_num=heads, head_dim=dim,
                            layer_num=layers, device="cpu", enable_memory_saver=False)
    g = torch.Generator().manual_seed(7)
    for buf in (*pool.k_buffer, *pool.v_buffer):
        buf.copy_(torch.randn(buf.shape, generator=g))
    before = [b.clone() for b in (*pool.k_buffer, *pool.v_buffer)]
    warmed = kv_io.warm_up(pool, ["bf16", "keydiff:0.5+int8", "int8", "fp8", "int4", "int2+zstd", "keep+int4"])
    assert warmed == ["bf16", "int8", "fp8", "int4", "int2"], warmed
    for buf, old in zip((*pool.k_buffer, *pool.v_buffer), before):
        assert torch.equal(buf[1:], old[1:]), "a slot other than the padding slot 0 changed"


def _faithful_conversions() -> None:
    """Make the interpreter convert floats as the GPU does (see the module docstring)."""
    import numpy as np
    import torch
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    as_torch = {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16, tl.float32: torch.float32,
                tl.float8e4nv: torch.float8_e4m3fn}
    signed = {8: torch.int8, 16: torch.int16, 32: torch.int32}

    def convert(data, src, dst, rounding_mode):
        assert rounding_mode in (None, interpreter._ir.ROUNDING_MODE.RTNE), rounding_mode
        raw = np.frombuffer(data.tobytes(), dtype=f"int{src.primitive_bitwidth}").copy()
        out = torch.from_numpy(raw).view(as_torch[src]).to(as_torch[dst]).view(signed[dst.primitive_bitwidth])
        return out.numpy().view(f"uint{dst.primitive_bitwidth}").reshape(data.shape)

    interpreter._convert_float = convert


def check(case: str) -> None:
    if case.startswith("warm_up/"):
        return check_warm_up(case.split("/")[1])
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from evicpress_sglang.backend import kv_io
    from evicpress_sglang.codecs import drops_tokens, get_codec, kernels

    name, geometry, tokens, *dtype = case.split("/")
    layers, heads, dim = GEOMETRIES[geometry]
    tokens, dtype = int(tokens), getattr(torch, dtype[0]) if dtype else torch.bfloat16
    codec = get_codec(name)
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    pool = MHATokenToKVPool(size=2 * tokens + 40, page_size=1, dtype=dtype, head_num=heads, head_dim=dim,
                            layer_num=layers, device="cpu", enable_memory_saver=False)
    for buf in (*pool.k_buffer, *pool.v_buffer):
        buf.copy_(torch.randn(buf.shape, generator=g) * 3)
    for buf in pool.k_buffer:
        buf[..., 5] += 20  # an outlier channel, as real keys have
    slots = torch.randperm(pool.k_buffer[0].shape[0], generator=g)[:tokens]  # scattered, unordered
    positions = None
    if name.startswith("keep+"):  # a token subset: its tokens' positions in their context
        positions = torch.sort(torch.randperm(3 * tokens, generator=g)[:tokens]).values
    inner = codec.device_codec.inner if drops_tokens(codec) else codec
    assert kernels.supports(inner, pool.k_buffer), case

    k, v = kv_io.gather(pool, slots)
    want = codec.encode(k, v, positions=positions) if drops_tokens(codec) else codec.encode(k, v)
    got = kv_io.encode_from_pool(pool, slots, codec, positions)
    assert (got.codec, got.shape) == (want.codec, want.shape), (got.codec, got.shape, want.shape)
    diff = (got.payload != want.payload).nonzero().flatten()
    assert diff.numel() == 0, f"{diff.numel()} payload bytes differ, first at {diff[:8].tolist()}"

    n = codec.output_shape(want.shape).tokens
    into = torch.randperm(pool.k_buffer[0].shape[0], generator=g)[:n]
    before = [b.clone() for b in (*pool.k_buffer, *pool.v_buffer)]
    ok, ov, want_pos = kv_io.decode(codec, want, "cpu")
    kv_io.scatter(pool, into, ok, ov)
    expected = [b.clone() for b in (*pool.k_buffer, *pool.v_buffer)]
    for buf, old in zip((*pool.k_buffer, *pool.v_buffer), before):
        buf.copy_(old)
    got_pos = kv_io.decode_into_pool(pool, into, codec, want)
    for i, (buf, exp) in enumerate(zip((*pool.k_buffer, *pool.v_buffer), expected)):
        bad = (buf.view(torch.uint8) != exp.view(torch.uint8)).nonzero()
        assert bad.numel() == 0, f"buffer {i}: {bad.shape[0]} bytes differ from decode + scatter, first {bad[:4].tolist()}"
    assert (got_pos is None) == (want_pos is None) and (got_pos is None or torch.equal(got_pos, want_pos))


def main(out_path: str) -> None:
    _faithful_conversions()
    from evicpress_sglang.backend import kv_io
    from evicpress_sglang.codecs import kernels

    assert kernels.INTERPRET, "run with TRITON_INTERPRET=1"

    def no_fallback(quantizer, path: str, e: Exception) -> None:  # a kernel failure must fail the case, not hide
        raise e

    kv_io._give_up = no_fallback
    results = {}
    for case in cases():
        try:
            check(case)
            results[case] = None
        except Exception:  # noqa: BLE001 - reported per case by the pytest side
            results[case] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
