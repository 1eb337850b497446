"""Fused Triton kernels for the codecs: pool slots -> payload and payload -> pool slots, one pass each.

The torch codecs gather a context into a ``[layers, tokens, heads, head_dim]`` tensor and
quantize it op by op; on the way back they decode into a fresh tensor that is then scattered
into the pool. That is several passes over bf16-sized memory, and it made decoding slower than
the PCIe copy it follows (issue 20). Here one kernel per quantizer family (absmax: fp8 and
int8; KIVI: one for keys, one for values), compiled once per direction, reads the KV rows at a
context's slots and writes the payload, or writes the decoded values straight into the pool's
rows: each byte is read once and written once. On an H200 (8B-class geometry, 8k tokens and
more) that is 2.0-2.6 TB/s of bf16 KV decoded and 0.6-1.8 TB/s encoded, against 0.1-0.2 for
the torch codecs (bench/results/2026-12-01-codec-kernels/). ``bf16`` (the pool's KV as it is) has a
copy kernel too: not for bandwidth (a gather per buffer is as fast) but for the scheduler thread,
which otherwise launches one gather per layer for K and for V (60 for SmolLM2, 64 for an 8B model)
on every store and load-back, where one launch does (issue 25: a plan step's cost inside ``evict()``).

**Layout.** The payload is the torch codec's, byte for byte (same segments, offsets and
zero padding, :meth:`SegmentCodec.offsets`), so blobs written by either decode with either,
and token-dropped blobs (:class:`DropCodec`) keep their positions segment in front.

**Exactness.** The kernels do the torch code's float32 operations in the same order: IEEE
division (``div_rn``; Triton's ``/`` is approximate), round half to even, and
round-to-nearest-even conversions; every product they form (a code times a bf16 or fp16
scale) is exact in float32, so fusing it into an FMA changes nothing. The output is therefore
bit-identical to the torch codecs for finite KV, with one exception that changes no value:
when a KIVI group's min or max is a zero and the group holds both +0 and -0, either may pick
either zero (reduction order), so the stored min or scale, and a decoded zero, may differ in
sign only. The tests and the H200 bench found none (their KV has no signed zeros to tie).
KV holding NaN or inf is outside the contract (torch propagates NaN from max; Triton's max
need not).

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
from .identity import IdentityCodec
from .kivi import GROUP, KiviCodec

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. CPU-only wheels on other platforms): the torch codecs do everything
    triton = None

#: True when Triton runs kernels on CPU tensors through its interpreter (tests).
INTERPRET = bool(triton is not None and triton.knobs.runtime.interpret)

#: Tiles, measured on an H200 (bench/codec_speed.py --sweep; 8B-class geometry): rows (token,
#: head) per program of the absmax kernels; per direction, columns (head x channel) per program
#: of the KIVI K kernels (their tokens are one group) and rows (token, channel group) of the V
#: kernels. Encoding wants small V tiles (32 rows: 595 GB/s, 128: 442), decoding larger ones.
ABSMAX_ROWS = 32
ABSMAX_WARPS = 4
COPY_ROWS = 32  # rows (token, head) per program of the bf16 copy kernel, as the absmax kernels
KIVI_TILES = {"encode": (128, 32), "decode": (256, 128)}
KIVI_WARPS = 4


def supports(codec: SegmentCodec | object, k_buffer: list[torch.Tensor]) -> bool:
    """True when the kernels handle ``codec`` (``bf16``, or an fp8, int8, int4 or int2 quantizer)
    on a pool with these K buffers (V buffers are required to match by :func:`buffer_offsets`)."""
    if triton is None or not k_buffer or not (k_buffer[0].is_cuda or INTERPRET):
        return False
    head_dim = k_buffer[0].shape[-1]
    if isinstance(codec, (AbsmaxCodec, IdentityCodec)):
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
    if isinstance(codec, IdentityCodec):
        _copy[(triton.cdiv(n * H, COPY_ROWS), 2 * L)](
            pool, offsets, slots, payload, at["k"], at["v"] - at["k"], n * H, LAYERS=L, HD=H * D, D=D,
            BLOCK=COPY_ROWS, ENCODE=encoding, num_warps=ABSMAX_WARPS)
        return
    if isinstance(codec, AbsmaxCodec):
        _absmax[(triton.cdiv(n * H, ABSMAX_ROWS), 2 * L)](
            pool, offsets, slots, payload, at["k_codes"], at["v_codes"] - at["k_codes"], at["k_scale"],
            at["v_scale"] - at["k_scale"], n * H, LAYERS=L, HD=H * D, D=D, FP8=isinstance(codec, FP8Codec),
            CODE_MAX=codec.code_max, BLOCK=ABSMAX_ROWS, ENCODE=encoding, num_warps=ABSMAX_WARPS)
        return
    assert isinstance(codec, KiviCodec)
    k_cols, v_rows = KIVI_TILES["encode" if encoding else "decode"]
    cols = min(k_cols, H * D & -(H * D))  # a power of two that divides H * D
    _kivi_k[(triton.cdiv(n, GROUP), H * D // cols, L)](
        pool, offsets, slots, payload, at["k_codes"], at["k_min"], at["k_scale"], at["k_resid"], n, n // GROUP * GROUP,
        HD=H * D, BITS=codec.bits, COLS=cols, ENCODE=encoding, num_warps=KIVI_WARPS)
    rows = n * H * D // GROUP
    _kivi_v[(triton.cdiv(rows, v_rows), L)](
        pool, offsets, slots, payload, at["v_codes"], at["v_min"], at["v_scale"], rows, LAYERS=L, HD=H * D,
        BITS=codec.bits, BLOCK=v_rows, ENCODE=encoding, num_warps=KIVI_WARPS)

if triton is not None:
    _GROUP = tl.constexpr(GROUP)

    # Counts (rows, tokens) are not specialized on (Triton compiles a variant for 1 and for
    # multiples of 16 by default), nor is the alignment of ``slots``: SGLang's allocator hands out
    # views of its free list that start 8 bytes apart, so about half are not 16-byte aligned and
    # each kind would have compiled its own variant, the second one at the first store or
    # load-back that got one, on the scheduler thread. One compiled kernel per geometry serves
    # every context length and slot list, so that kv_io.warm_up can compile them all at start-up.
    @triton.jit(do_not_specialize=["rows"], do_not_specialize_on_alignment=["slots"])
    def _copy(pool, offsets, slots, payload, k_at, kv_bytes, rows, LAYERS: tl.constexpr, HD: tl.constexpr,
              D: tl.constexpr, BLOCK: tl.constexpr, ENCODE: tl.constexpr):
        """IdentityCodec, program (row block, K/V layer); a row is (layer, token, head). The K and V
        segments are [layers, tokens, heads, head_dim] in the pool's dtype, ``kv_bytes`` apart."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        buf = tl.program_id(1).to(tl.int64)
        kv, layer = buf // LAYERS, buf % LAYERS
        tile, mask = _row_tile(pool, offsets, slots, buf, r, rows, HD, D)
        seg = (payload + k_at + kv * kv_bytes).to(tl.pointer_type(pool.dtype.element_ty), bitcast=True)
        at = seg + (layer * rows + r)[:, None] * D + tl.arange(0, D)[None, :]
        if ENCODE:
            tl.store(at, tl.load(tile, mask=mask), mask=mask)
        else:
            tl.store(tile, tl.load(at, mask=mask), mask=mask)

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

    @triton.jit(do_not_specialize=["rows"], do_not_specialize_on_alignment=["slots"])
    def _absmax(pool, offsets, slots, payload, codes_at, kv_codes, scales_at, kv_scales, rows, LAYERS: tl.constexpr,
                HD: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr, CODE_MAX: tl.constexpr, BLOCK: tl.constexpr,
                ENCODE: tl.constexpr):
        """AbsmaxCodec, program (row block, K/V layer); a row is (layer, token, head), with one bf16
        scale, rounded before the codes are made. Decoding: code * scale, rounded once to the pool dtype."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        buf = tl.program_id(1).to(tl.int64)
        kv, layer = buf // LAYERS, buf % LAYERS
        tile, mask = _row_tile(pool, offsets, slots, buf, r, rows, HD, D)
        row = layer * rows + r
        at = payload + codes_at + kv * kv_codes + row[:, None] * D + tl.arange(0, D)[None, :]
        if FP8:
            codes = at.to(tl.pointer_type(tl.float8e4nv), bitcast=True)
        else:
            codes = at.to(tl.pointer_type(tl.int8), bitcast=True)
        scales = (payload + scales_at + kv * kv_scales).to(tl.pointer_type(tl.bfloat16), bitcast=True) + row
        if ENCODE:
            x = tl.load(tile, mask=mask, other=0.0).to(tl.float32)
            scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), CODE_MAX).to(tl.bfloat16)
            safe = tl.where(scale == 0, 1.0, scale.to(tl.float32))
            y = tl.minimum(tl.maximum(tl.math.div_rn(x, safe[:, None]), -CODE_MAX), CODE_MAX)
            if FP8:
                tl.store(codes, y.to(tl.float8e4nv), mask=mask)
            else:
                tl.store(codes, _rne(y).to(tl.int8), mask=mask)
            tl.store(scales, scale, mask=r < rows)
        else:
            scale = tl.load(scales, mask=r < rows).to(tl.float32)
            x = tl.load(codes, mask=mask).to(tl.float32) * scale[:, None]
            tl.store(tile, x.to(pool.dtype.element_ty), mask=mask)

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
    def _pack(codes, BITS: tl.constexpr):
        """[R, C] codes -> [R, C * BITS // 8] bytes, ``8 // BITS`` codes a byte, low bits first.
        Neighbouring codes are split off the minor axis (registers only, no shuffles)."""
        q = codes.to(tl.int32)
        if BITS == 4:
            lo, hi = tl.split(tl.reshape(q, [q.shape[0], q.shape[1] // 2, 2]))
            packed = lo | (hi << 4)
        else:  # 2 bits: [j, a, b] is code 4j + 2a + b
            even, odd = tl.split(tl.reshape(q, [q.shape[0], q.shape[1] // 4, 2, 2]))
            c0, c2 = tl.split(even)
            c1, c3 = tl.split(odd)
            packed = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
        return packed.to(tl.uint8)

    @triton.jit
    def _unpack(packed, BITS: tl.constexpr):
        """Inverse of :func:`_pack`: [R, N] bytes -> [R, N * 8 // BITS] codes as float32. The bytes
        are loaded as one contiguous tile and the codes joined back in on the minor axis."""
        p = packed.to(tl.int32)
        mask: tl.constexpr = (1 << BITS) - 1
        if BITS == 4:
            codes = tl.join(p & mask, p >> 4)
        else:  # join(join(c0, c2), join(c1, c3)) lays out c0, c1, c2, c3
            codes = tl.join(tl.join(p & mask, (p >> 4) & mask), tl.join((p >> 2) & mask, p >> 6))
        return tl.reshape(codes, [p.shape[0], p.shape[1] * (8 // BITS)]).to(tl.float32)

    @triton.jit
    def _k_codes(payload, codes_at, layer, full, t, HD: tl.constexpr, BITS: tl.constexpr, COLS: tl.constexpr):
        """The packed K codes of tokens ``t`` and this program's COLS columns: [tokens, bytes]."""
        b = tl.program_id(1).to(tl.int64) * (COLS * BITS // 8) + tl.arange(0, COLS * BITS // 8)
        return payload + codes_at + (layer * full + t)[:, None] * (HD * BITS // 8) + b[None, :]

    @triton.jit
    def _v_codes(payload, codes_at, row, BITS: tl.constexpr):
        """The packed V codes of ``row`` s (a row: one token's run of GROUP channels): [rows, bytes]."""
        return payload + codes_at + row[:, None] * (_GROUP * BITS // 8) + tl.arange(0, _GROUP * BITS // 8)[None, :]

    @triton.jit
    def _fp16(payload, at):
        return (payload + at).to(tl.pointer_type(tl.float16), bitcast=True)

    @triton.jit(do_not_specialize=["tokens", "full"], do_not_specialize_on_alignment=["slots"])
    def _kivi_k(pool, offsets, slots, payload, codes_at, min_at, scale_at, resid_at, tokens, full, HD: tl.constexpr,
                BITS: tl.constexpr, COLS: tl.constexpr, ENCODE: tl.constexpr):
        """KIVI keys, program (token group, column block, layer): per column, one min and scale for
        the group's GROUP tokens. The group past the last full one is the residual, copied as is.
        Decoding: code * scale + min, rounded once to the pool dtype."""
        g = tl.program_id(0).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        t = g * _GROUP + tl.arange(0, _GROUP)
        c = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
        tile, mask = _group_tile(pool, offsets, slots, layer, t, tokens, c, HD)
        if g * _GROUP < full:
            codes = _k_codes(payload, codes_at, layer, full, t, HD, BITS, COLS)
            mins = _fp16(payload, min_at) + (layer * (full // _GROUP) + g) * HD + c
            scales = _fp16(payload, scale_at) + (layer * (full // _GROUP) + g) * HD + c
            if ENCODE:
                q, mn, scale = _quantize(tl.load(tile).to(tl.float32), 0, (1 << BITS) - 1)
                tl.store(codes, _pack(q, BITS))
                tl.store(mins, mn)
                tl.store(scales, scale)
            else:
                q = _unpack(tl.load(codes), BITS)
                x = q * tl.load(scales).to(tl.float32)[None, :] + tl.load(mins).to(tl.float32)[None, :]
                tl.store(tile, x.to(pool.dtype.element_ty))
        else:
            resid = (payload + resid_at).to(pool.dtype, bitcast=True)
            resid += (layer * (tokens - full) + t - full)[:, None] * HD + c[None, :]
            if ENCODE:
                tl.store(resid, tl.load(tile, mask=mask), mask=mask)
            else:
                tl.store(tile, tl.load(resid, mask=mask), mask=mask)

    @triton.jit(do_not_specialize=["rows"], do_not_specialize_on_alignment=["slots"])
    def _kivi_v(pool, offsets, slots, payload, codes_at, min_at, scale_at, rows, LAYERS: tl.constexpr,
                HD: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, ENCODE: tl.constexpr):
        """KIVI values, program (row block, layer): one min and scale per row = (token, run of GROUP
        channels). Decoding as for keys."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        layer = tl.program_id(1).to(tl.int64)
        tile, mask = _row_tile(pool, offsets, slots, LAYERS + layer, r, rows, HD, _GROUP)
        row = layer * rows + r
        codes = _v_codes(payload, codes_at, row, BITS)
        if ENCODE:
            q, mn, scale = _quantize(tl.load(tile, mask=mask, other=0.0).to(tl.float32), 1, (1 << BITS) - 1)
            tl.store(codes, _pack(q, BITS), mask=mask)
            tl.store(_fp16(payload, min_at) + row, mn, mask=r < rows)
            tl.store(_fp16(payload, scale_at) + row, scale, mask=r < rows)
        else:
            q = _unpack(tl.load(codes, mask=mask, other=0), BITS)
            scale = tl.load(_fp16(payload, scale_at) + row[:, None], mask=mask).to(tl.float32)
            mn = tl.load(_fp16(payload, min_at) + row[:, None], mask=mask).to(tl.float32)
            tl.store(tile, (q * scale + mn).to(pool.dtype.element_ty), mask=mask)
