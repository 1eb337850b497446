"""Fused Triton kernels for the quantizers: pool slots -> payload and payload -> pool slots, one pass each.

The torch codecs gather a context into a ``[layers, tokens, heads, head_dim]`` tensor and
quantize it op by op; on the way back they decode into a fresh tensor that is then scattered
into the pool. That is several passes over bf16-sized memory, and it made decoding slower than
the PCIe copy it follows (issue 20). Here one kernel per quantizer family reads the KV rows
at a context's slots and writes the payload, and one writes the decoded values straight
into the pool's rows: each byte is read once and written once.

**Layout.** The payload is the torch codec's, byte for byte (same segments, offsets and
zero padding, :meth:`SegmentCodec.offsets`), so blobs written by either decode with either,
and token-dropped blobs (:class:`DropCodec`) keep their positions segment in front.

**Exactness.** The kernels do the torch code's float32 operations in the same order: IEEE
division (``div_rn``; Triton's ``/`` is approximate), round half to even, and
round-to-nearest-even conversions; every product they form (a code times a bf16 or fp16
scale) is exact in float32, so fusing it into an FMA changes nothing. The output is therefore
bit-identical to the torch codecs for finite KV, with one exception that cannot change the KV:
when a KIVI group's minimum is zero and the group holds both +0 and -0, the two
implementations may store zeros of different sign as that group's min (the decoded values
are the same, since ``code * scale + (-0) == code * scale + 0``). KV holding NaN or inf is
outside the contract (torch propagates NaN from max; Triton's max need not).

**Pool access.** SGLang keeps one buffer per layer for K and one for V. A launch covers
every layer: the kernels get the first K buffer and the element offset of every buffer from
it (int64, cached per pool), which needs no pointer casts and also runs in Triton's CPU
interpreter (``TRITON_INTERPRET=1``), where the tests check the kernels against the torch
codecs.
"""

from __future__ import annotations

import torch

from .absmax import AbsmaxCodec
from .base import KVShape, SegmentCodec
from .fp8 import FP8Codec
from .kivi import GROUP, KiviCodec

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. CPU-only wheels on other platforms): the torch codecs do everything
    triton = None

#: True when Triton runs kernels on CPU tensors through its interpreter (tests).
INTERPRET = bool(triton is not None and triton.knobs.runtime.interpret)

#: Rows (token, head) per program of the absmax kernels and (token, channel group) of the KIVI
#: V kernels; K channels per program of the KIVI K kernels (its tokens are one group).
ABSMAX_ROWS = 32
KIVI_V_ROWS = 128
KIVI_K_COLS = 256
NUM_WARPS = 4


def supports(codec: SegmentCodec | object, k_buffer: list[torch.Tensor]) -> bool:
    """True when the kernels handle ``codec`` (an fp8, int8, int4 or int2 quantizer) on a pool
    with these K buffers (V buffers are required to match by :func:`buffer_offsets`)."""
    if triton is None or not k_buffer or not (k_buffer[0].is_cuda or INTERPRET):
        return False
    head_dim = k_buffer[0].shape[-1]
    if isinstance(codec, AbsmaxCodec):
        return _pow2(head_dim)
    if isinstance(codec, KiviCodec):
        return head_dim % GROUP == 0
    return False


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def buffer_offsets(k_buffer: list[torch.Tensor], v_buffer: list[torch.Tensor]) -> torch.Tensor:
    """Element offsets of every K buffer, then every V buffer, from ``k_buffer[0]`` (int64, on
    its device). Cached by address, so a pool costs one small host-to-device copy, once."""
    buffers = (*k_buffer, *v_buffer)
    base = buffers[0]
    key = (base.device, base.dtype, tuple(base.shape), tuple(b.data_ptr() for b in buffers))
    offsets = _OFFSETS.get(key)
    if offsets is None:
        if any(b.shape != base.shape or b.dtype != base.dtype or b.device != base.device or not b.is_contiguous()
               for b in buffers):
            raise ValueError("every K and V buffer must be a contiguous tensor of one shape, dtype and device")
        if len(_OFFSETS) >= 8:  # pools are few and long-lived; this only bounds a test's many small ones
            _OFFSETS.clear()
        ptrs = key[-1]
        offsets = _OFFSETS[key] = torch.tensor([(p - ptrs[0]) // base.element_size() for p in ptrs],
                                               dtype=torch.int64, device=base.device)
    return offsets


_OFFSETS: dict[tuple, torch.Tensor] = {}


def encode(k_buffer: list[torch.Tensor], v_buffer: list[torch.Tensor], slots: torch.Tensor, codec: SegmentCodec,
           payload: torch.Tensor) -> None:
    """Quantize the KV at ``slots`` into ``payload`` (uint8, exactly ``codec.nbytes`` of the
    context): the bytes ``codec.encode`` of the gathered KV would make."""
    _run(True, k_buffer, v_buffer, slots, codec, payload)


def decode(k_buffer: list[torch.Tensor], v_buffer: list[torch.Tensor], slots: torch.Tensor, codec: SegmentCodec,
           payload: torch.Tensor) -> None:
    """Write the KV that ``payload`` (a ``codec`` blob of ``len(slots)`` tokens of this pool's
    geometry) holds into the rows ``slots`` of every layer's K and V buffer."""
    _run(False, k_buffer, v_buffer, slots, codec, payload)


def _run(encoding: bool, k_buffer: list[torch.Tensor], v_buffer: list[torch.Tensor], slots: torch.Tensor,
         codec: SegmentCodec, payload: torch.Tensor) -> None:
    """Checks what the kernels cannot (they trust every size and index they get), then launches."""
    pool = k_buffer[0]
    shape = KVShape(len(k_buffer), slots.numel(), pool.shape[1], pool.shape[2], pool.dtype)
    if slots.dtype != torch.int64 or slots.device != pool.device or not slots.is_contiguous():
        raise ValueError("slots must be a contiguous int64 tensor on the pool's device")
    if payload.dtype != torch.uint8 or payload.device != pool.device or payload.numel() != codec.nbytes(shape):
        raise ValueError(f"payload must be {codec.nbytes(shape)} bytes (uint8) on the pool's device")
    if shape.tokens == 0:
        return
    offsets = buffer_offsets(k_buffer, v_buffer)
    if encoding:
        codec.zero_padding(payload, shape)
    at = {name: off for name, (off, _) in codec.offsets(shape).items()}
    _launch(encoding, codec, shape, pool, offsets, slots, payload, at)


def _launch(encoding: bool, codec: SegmentCodec, shape: KVShape, pool: torch.Tensor, offsets: torch.Tensor,
            slots: torch.Tensor, payload: torch.Tensor, at: dict[str, int]) -> None:
    L, n, H, D = shape.tensor_shape
    if isinstance(codec, AbsmaxCodec):
        fp8 = isinstance(codec, FP8Codec)
        grid = (triton.cdiv(n * H, ABSMAX_ROWS), 2 * L)
        kernel = _absmax_encode if encoding else _absmax_decode
        kernel[grid](pool, offsets, slots, payload, at["k_codes"], at["v_codes"] - at["k_codes"], at["k_scale"],
                     at["v_scale"] - at["k_scale"], n * H, LAYERS=L, HD=H * D, D=D, FP8=fp8, CODE_MAX=codec.code_max,
                     BLOCK=ABSMAX_ROWS, num_warps=NUM_WARPS)
        return
    assert isinstance(codec, KiviCodec)
    full = n // GROUP * GROUP
    cols = min(KIVI_K_COLS, H * D & -(H * D))  # a power of two that divides H * D
    kernel = _kivi_k_encode if encoding else _kivi_k_decode
    kernel[(triton.cdiv(n, GROUP), H * D // cols, L)](
        pool, offsets, slots, payload, at["k_codes"], at["k_min"], at["k_scale"], at["k_resid"], n, full,
        HD=H * D, BITS=codec.bits, COLS=cols, num_warps=NUM_WARPS)
    rows = n * H * D // GROUP
    kernel = _kivi_v_encode if encoding else _kivi_v_decode
    kernel[(triton.cdiv(rows, KIVI_V_ROWS), L)](
        pool, offsets, slots, payload, at["v_codes"], at["v_min"], at["v_scale"], rows, LAYERS=L, HD=H * D,
        BITS=codec.bits, BLOCK=KIVI_V_ROWS, num_warps=NUM_WARPS)


if triton is not None:
    _GROUP = tl.constexpr(GROUP)

    @triton.jit
    def _rne(x):
        """Round half to even (torch.round) for |x| < 2**22: adding 1.5 * 2**23 leaves no
        fraction bits, so the float32 add rounds, and subtracting it back is exact."""
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _row_tile(pool, offsets, slots, buf, r, rows, HD: tl.constexpr, W: tl.constexpr):
        """Pointers to a [rows, W] tile of buffer ``buf``: row r is the (r % (HD // W))-th run of
        W elements of the (r // (HD // W))-th slot of ``slots``; and the mask of rows < ``rows``."""
        mask = r < rows
        slot = tl.load(slots + r // (HD // W), mask=mask, other=0)
        start = tl.load(offsets + buf) + slot * HD + (r % (HD // W)) * W
        return pool + start[:, None] + tl.arange(0, W)[None, :], mask[:, None]

    @triton.jit
    def _group_tile(pool, offsets, slots, buf, t, tokens, c, HD: tl.constexpr):
        """Pointers to a [tokens t, columns c] tile of buffer ``buf`` (columns index heads x
        channels), and the mask of tokens < ``tokens``."""
        mask = t < tokens
        slot = tl.load(slots + t, mask=mask, other=0)
        return pool + tl.load(offsets + buf) + slot[:, None] * HD + c[None, :], mask[:, None]

    @triton.jit
    def _absmax_encode(pool, offsets, slots, payload, codes_at, kv_codes, scales_at, kv_scales, rows,
                       LAYERS: tl.constexpr, HD: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr,
                       CODE_MAX: tl.constexpr, BLOCK: tl.constexpr):
        """AbsmaxCodec: one scale per (layer, token, head) = row; program (row block, K/V layer)."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        buf = tl.program_id(1).to(tl.int64)
        kv, layer = buf // LAYERS, buf % LAYERS
        src, mask = _row_tile(pool, offsets, slots, buf, r, rows, HD, D)
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), CODE_MAX).to(tl.bfloat16)
        safe = tl.where(scale == 0, 1.0, scale.to(tl.float32))
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, safe[:, None]), -CODE_MAX), CODE_MAX)
        row = layer * rows + r
        at = payload + codes_at + kv * kv_codes + row[:, None] * D + tl.arange(0, D)[None, :]
        if FP8:
            tl.store(at.to(tl.pointer_type(tl.float8e4nv), bitcast=True), y.to(tl.float8e4nv), mask=mask)
        else:
            tl.store(at.to(tl.pointer_type(tl.int8), bitcast=True), _rne(y).to(tl.int8), mask=mask)
        scales = (payload + scales_at + kv * kv_scales).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        tl.store(scales + row, scale, mask=r < rows)

    @triton.jit
    def _absmax_decode(pool, offsets, slots, payload, codes_at, kv_codes, scales_at, kv_scales, rows,
                       LAYERS: tl.constexpr, HD: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr,
                       CODE_MAX: tl.constexpr, BLOCK: tl.constexpr):
        """Inverse of :func:`_absmax_encode`: code * scale, rounded once to the pool dtype."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        buf = tl.program_id(1).to(tl.int64)
        kv, layer = buf // LAYERS, buf % LAYERS
        dst, mask = _row_tile(pool, offsets, slots, buf, r, rows, HD, D)
        row = layer * rows + r
        at = payload + codes_at + kv * kv_codes + row[:, None] * D + tl.arange(0, D)[None, :]
        if FP8:
            codes = tl.load(at.to(tl.pointer_type(tl.float8e4nv), bitcast=True), mask=mask)
        else:
            codes = tl.load(at.to(tl.pointer_type(tl.int8), bitcast=True), mask=mask)
        scales = (payload + scales_at + kv * kv_scales).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        scale = tl.load(scales + row, mask=r < rows).to(tl.float32)
        tl.store(dst, (codes.to(tl.float32) * scale[:, None]).to(pool.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize(x, AXIS: tl.constexpr, LEVELS: tl.constexpr):
        """KIVI's asymmetric quantization of float32 ``x`` along ``AXIS`` (the group): codes
        (float32), min and scale (fp16, rounded before the codes are made from them)."""
        mn = tl.min(x, axis=AXIS).to(tl.float16)
        scale = tl.math.div_rn(tl.max(x, axis=AXIS) - mn.to(tl.float32), LEVELS * 1.0).to(tl.float16)
        safe = tl.expand_dims(tl.where(scale == 0, 1.0, scale.to(tl.float32)), AXIS)
        shifted = x - tl.expand_dims(mn.to(tl.float32), AXIS)
        codes = tl.minimum(tl.maximum(_rne(tl.math.div_rn(shifted, safe)), 0.0), LEVELS * 1.0)
        return codes, mn, scale

    @triton.jit
    def _pack(codes, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
        """[ROWS, COLS] codes -> [ROWS, COLS * BITS // 8] bytes, ``8 // BITS`` codes a byte, low bits first."""
        shifts = (tl.arange(0, COLS) % (8 // BITS)) * BITS
        shifted = codes.to(tl.int32) << shifts[None, :]
        return tl.sum(tl.reshape(shifted, [ROWS, COLS * BITS // 8, 8 // BITS]), axis=2).to(tl.uint8)

    @triton.jit
    def _unpack(at, c, mask, BITS: tl.constexpr):
        """Codes of the columns ``c`` of a packed tile whose byte 0 of each row is ``at``."""
        packed = tl.load(at + c // (8 // BITS), mask=mask, other=0).to(tl.int32)
        return ((packed >> ((c % (8 // BITS)) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _fp16(payload, at):
        return (payload + at).to(tl.pointer_type(tl.float16), bitcast=True)

    @triton.jit
    def _kivi_k_encode(pool, offsets, slots, payload, codes_at, min_at, scale_at, resid_at, tokens, full,
                       HD: tl.constexpr, BITS: tl.constexpr, COLS: tl.constexpr):
        """KIVI keys: program (token group, column block, layer); per column, one min and scale for
        the group's GROUP tokens. The group past the last full one is the residual, copied as is."""
        g = tl.program_id(0).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        t = g * _GROUP + tl.arange(0, _GROUP)
        c = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
        src, mask = _group_tile(pool, offsets, slots, layer, t, tokens, c, HD)
        x = tl.load(src, mask=mask, other=0.0)
        if g * _GROUP < full:
            codes, mn, scale = _quantize(x.to(tl.float32), 0, (1 << BITS) - 1)
            b = tl.program_id(1).to(tl.int64) * (COLS * BITS // 8) + tl.arange(0, COLS * BITS // 8)
            at = payload + codes_at + (layer * full + t)[:, None] * (HD * BITS // 8) + b[None, :]
            tl.store(at, _pack(codes, _GROUP, COLS, BITS))
            group = (layer * (full // _GROUP) + g) * HD + c
            tl.store(_fp16(payload, min_at) + group, mn)
            tl.store(_fp16(payload, scale_at) + group, scale)
        else:
            resid = (payload + resid_at).to(pool.dtype, bitcast=True)
            tl.store(resid + (layer * (tokens - full) + t - full)[:, None] * HD + c[None, :], x, mask=mask)

    @triton.jit
    def _kivi_k_decode(pool, offsets, slots, payload, codes_at, min_at, scale_at, resid_at, tokens, full,
                       HD: tl.constexpr, BITS: tl.constexpr, COLS: tl.constexpr):
        """Inverse of :func:`_kivi_k_encode`: code * scale + min, rounded once to the pool dtype."""
        g = tl.program_id(0).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        t = g * _GROUP + tl.arange(0, _GROUP)
        c = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
        dst, mask = _group_tile(pool, offsets, slots, layer, t, tokens, c, HD)
        if g * _GROUP < full:
            at = payload + codes_at + (layer * full + t)[:, None] * (HD * BITS // 8)
            codes = _unpack(at, c[None, :], mask, BITS)
            group = (layer * (full // _GROUP) + g) * HD + c
            scale = tl.load(_fp16(payload, scale_at) + group).to(tl.float32)
            mn = tl.load(_fp16(payload, min_at) + group).to(tl.float32)
            tl.store(dst, (codes * scale[None, :] + mn[None, :]).to(pool.dtype.element_ty))
        else:
            resid = (payload + resid_at).to(pool.dtype, bitcast=True)
            x = tl.load(resid + (layer * (tokens - full) + t - full)[:, None] * HD + c[None, :], mask=mask)
            tl.store(dst, x, mask=mask)

    @triton.jit
    def _kivi_v_encode(pool, offsets, slots, payload, codes_at, min_at, scale_at, rows,
                       LAYERS: tl.constexpr, HD: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
        """KIVI values: one min and scale per row = (token, run of GROUP channels); program (row block, layer)."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        layer = tl.program_id(1).to(tl.int64)
        src, mask = _row_tile(pool, offsets, slots, LAYERS + layer, r, rows, HD, _GROUP)
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        codes, mn, scale = _quantize(x, 1, (1 << BITS) - 1)
        row = layer * rows + r
        at = payload + codes_at + row[:, None] * (_GROUP * BITS // 8) + tl.arange(0, _GROUP * BITS // 8)[None, :]
        tl.store(at, _pack(codes, BLOCK, _GROUP, BITS), mask=mask)
        tl.store(_fp16(payload, min_at) + row, mn, mask=r < rows)
        tl.store(_fp16(payload, scale_at) + row, scale, mask=r < rows)

    @triton.jit
    def _kivi_v_decode(pool, offsets, slots, payload, codes_at, min_at, scale_at, rows,
                       LAYERS: tl.constexpr, HD: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
        """Inverse of :func:`_kivi_v_encode`."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        layer = tl.program_id(1).to(tl.int64)
        dst, mask = _row_tile(pool, offsets, slots, LAYERS + layer, r, rows, HD, _GROUP)
        row = layer * rows + r
        codes = _unpack(payload + codes_at + row[:, None] * (_GROUP * BITS // 8), tl.arange(0, _GROUP)[None, :], mask, BITS)
        scale = tl.load(_fp16(payload, scale_at) + row[:, None], mask=mask).to(tl.float32)
        mn = tl.load(_fp16(payload, min_at) + row[:, None], mask=mask).to(tl.float32)
        tl.store(dst, (codes * scale + mn).to(pool.dtype.element_ty), mask=mask)
