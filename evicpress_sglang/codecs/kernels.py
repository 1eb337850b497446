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

**Payload access.** Each segment of the payload is a pointer argument of its own (a uint8 view
of the payload where the segment starts, bitcast in the kernel), not a byte offset from the
payload's start: Triton types a Python int argument by its value, i32 or i64, each its own
compiled kernel, and offsets pass 2**31 in long contexts. What the kernels get as ints are row
and token counts, which stay in i32 (:func:`launches`); every address is computed in int64.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import NamedTuple

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
    its device). Cached per pair of buffer lists: a pool costs one small host-to-device copy,
    once. This runs at every store and load-back, on SGLang's scheduler thread, so a hit reads
    only the first and the last buffer's addresses (SGLang never moves a pool's buffers; a
    tensor given other storage in place would change its own, which only these two catch) and
    checks that the lists still hold the very tensors the offsets were computed from. The cache refers to them
    weakly, so it keeps no pool's memory alive; a live reference cannot be mistaken for a new
    tensor at a freed one's address."""
    hit = _OFFSETS.get((id(k_buffer), id(v_buffer)))
    if (hit is not None and hit.base == k_buffer[0].data_ptr() and hit.last == v_buffer[-1].data_ptr()
            and _same(hit.buffers, k_buffer, v_buffer)):
        return hit.offsets
    buffers = (*k_buffer, *v_buffer)
    base = buffers[0]
    if any(b.shape != base.shape or b.dtype != base.dtype or b.device != base.device or not b.is_contiguous()
           for b in buffers):
        raise ValueError("every K and V buffer must be a contiguous tensor of one shape, dtype and device")
    if len(_OFFSETS) >= 8:  # pools are few and long-lived; this only bounds a test's many small ones
        _OFFSETS.clear()
    offsets = torch.tensor([(b.data_ptr() - base.data_ptr()) // base.element_size() for b in buffers],
                           dtype=torch.int64, device=base.device)
    _OFFSETS[id(k_buffer), id(v_buffer)] = _Offsets(tuple(map(weakref.ref, buffers)), base.data_ptr(),
                                                    buffers[-1].data_ptr(), offsets)
    return offsets


class _Offsets(NamedTuple):
    """A :func:`buffer_offsets` entry: the buffers it was computed for, the first and last ones' addresses."""

    buffers: tuple[weakref.ref, ...]
    base: int
    last: int
    offsets: torch.Tensor


def _same(buffers: tuple[weakref.ref, ...], k_buffer: list[torch.Tensor], v_buffer: list[torch.Tensor]) -> bool:
    """True when ``buffers`` refer to the tensors of the lists, in order (a dead reference to None)."""
    return (len(buffers) == len(k_buffer) + len(v_buffer)
            and all(map(operator.is_, [ref() for ref in buffers], itertools.chain(k_buffer, v_buffer))))


_OFFSETS: dict[tuple[int, int], _Offsets] = {}


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
    nbytes = codec.nbytes(shape)
    if payload.dtype != torch.uint8 or payload.device != pool.device or payload.numel() != nbytes:
        raise ValueError(f"payload must be {nbytes} bytes (uint8) on the pool's device")
    if shape.tokens == 0:
        return
    offsets = buffer_offsets(k_buffer, v_buffer)
    if encoding:
        codec.zero_padding(payload, shape)
    for launch in launches(encoding, codec, shape, pool, offsets, slots, payload):
        _launch(launch)


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constants)``."""

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple  # the runtime arguments, in the kernel's order
    constants: dict  # its constexprs, by name, and launch options (num_warps)


def launches(encoding: bool, codec: SegmentCodec, shape: KVShape, pool: torch.Tensor, offsets: torch.Tensor,
             slots: torch.Tensor, payload: torch.Tensor) -> list[Launch]:
    """The launches that move ``payload`` (``codec``'s, of ``shape``) to or from ``pool``'s rows at
    ``slots``. Builds them, runs nothing: the arguments of any shape can be checked without
    tensors of its size (meta tensors), as the tests do.

    Every payload segment is a pointer argument (a view of ``payload`` where it starts), never a
    byte offset: a Python int argument is compiled as i32 or as i64 by its value, so an offset past
    2 GiB (a long context: from about 32k tokens of bf16 in an 8B geometry) would compile another
    kernel, on the scheduler thread, that :func:`kv_io.warm_up`'s short context never compiled.
    What stays an int is a count of rows or tokens, under 2**31 up to 2**24 tokens of that
    geometry (int4's V rows, tokens x KV channels / 32, are the largest). The segments are as
    aligned as the payload: each starts at a multiple of SEGMENT_ALIGN (16) bytes, and so does a
    token-dropped blob's inner payload, after its padded positions. Payloads are allocated whole
    (encode_from_pool's, and the tiers' copies to the GPU), so the kernels are compiled for 16-byte
    aligned segments, once; a payload at an odd address would still work, in a variant of its own."""
    L, n, H, D = shape.tensor_shape
    layout = codec.layout(shape)
    # An empty segment (KIVI's residual when the tokens fill whole groups, its K segments under
    # one group) is a 0-byte view, possibly a null pointer: the kernels never read it.
    seg = dict(zip(layout.offsets, payload.split_with_sizes(layout.sizes)))
    pool_args = pool, offsets, slots
    if isinstance(codec, IdentityCodec):
        return [Launch(_copy, (_cdiv(n * H, COPY_ROWS), 2 * L), (*pool_args, seg["k"], seg["v"], n * H),
                       dict(LAYERS=L, HD=H * D, D=D, BLOCK=COPY_ROWS, ENCODE=encoding, num_warps=ABSMAX_WARPS))]
    if isinstance(codec, AbsmaxCodec):
        return [Launch(_absmax, (_cdiv(n * H, ABSMAX_ROWS), 2 * L),
                       (*pool_args, seg["k_codes"], seg["v_codes"], seg["k_scale"], seg["v_scale"], n * H),
                       dict(LAYERS=L, HD=H * D, D=D, FP8=isinstance(codec, FP8Codec), CODE_MAX=codec.code_max,
                            BLOCK=ABSMAX_ROWS, ENCODE=encoding, num_warps=ABSMAX_WARPS))]
    assert isinstance(codec, KiviCodec)
    k_cols, v_block = KIVI_TILES["encode" if encoding else "decode"]
    cols = min(k_cols, H * D & -(H * D))  # a power of two that divides H * D
    v_rows = n * H * D // GROUP
    return [Launch(_kivi_k, (_cdiv(n, GROUP), H * D // cols, L),
                   (*pool_args, seg["k_codes"], seg["k_min"], seg["k_scale"], seg["k_resid"], n, n // GROUP * GROUP),
                   dict(HD=H * D, BITS=codec.bits, COLS=cols, ENCODE=encoding, num_warps=KIVI_WARPS)),
            Launch(_kivi_v, (_cdiv(v_rows, v_block), L),
                   (*pool_args, seg["v_codes"], seg["v_min"], seg["v_scale"], v_rows),
                   dict(LAYERS=L, HD=H * D, BITS=codec.bits, BLOCK=v_block, ENCODE=encoding, num_warps=KIVI_WARPS))]


def _cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` without its cost: it is a constexpr function, several microseconds a call
    from Python, and this runs at every store and load-back."""
    return -(-a // b)


def _launch(launch: Launch) -> None:
    launch.kernel[launch.grid](*launch.args, **launch.constants)


if triton is not None:
    _GROUP = tl.constexpr(GROUP)

    # Counts (rows, tokens) are not specialized on (Triton compiles a variant for 1 and for
    # multiples of 16 by default), nor is the alignment of ``slots``: SGLang's allocator hands out
    # views of its free list that start 8 bytes apart, so about half are not 16-byte aligned and
    # each kind would have compiled its own variant, the second one at the first store or
    # load-back that got one, on the scheduler thread. The payload's segments are specialized on
    # alignment, as Triton does by default: they are 16-byte aligned (see :func:`launches`), so
    # this compiles no second variant, and knowing it lets the compiler make 16-byte accesses to
    # the payload (without it, int8 encoding ran 4.5x slower on an H200, decoding and the bf16
    # copy about 1.4x). One compiled kernel per geometry serves every context length, slot list
    # and payload, so that kv_io.warm_up can compile them all at start-up.
    @triton.jit(do_not_specialize=["rows"], do_not_specialize_on_alignment=["slots"])
    def _copy(pool, offsets, slots, k, v, rows, LAYERS: tl.constexpr, HD: tl.constexpr, D: tl.constexpr,
              BLOCK: tl.constexpr, ENCODE: tl.constexpr):
        """IdentityCodec, program (row block, K/V layer); a row is (layer, token, head). The K and V
        segments ``k`` and ``v`` are [layers, tokens, heads, head_dim] in the pool's dtype."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        buf = tl.program_id(1).to(tl.int64)
        layer = buf % LAYERS
        tile, mask = _row_tile(pool, offsets, slots, buf, r, rows, HD, D)
        seg = _k_or_v(k, v, buf, LAYERS).to(tl.pointer_type(pool.dtype.element_ty), bitcast=True)
        at = seg + (layer * rows + r)[:, None] * D + tl.arange(0, D)[None, :]
        if ENCODE:
            tl.store(at, tl.load(tile, mask=mask), mask=mask)
        else:
            tl.store(tile, tl.load(at, mask=mask), mask=mask)

    @triton.jit
    def _k_or_v(k, v, buf, LAYERS: tl.constexpr):
        """The K segment for buffers (programs) 0 to LAYERS - 1, else the V segment."""
        return tl.where(buf < LAYERS, k, v)

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
    def _absmax(pool, offsets, slots, k_codes, v_codes, k_scales, v_scales, rows, LAYERS: tl.constexpr,
                HD: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr, CODE_MAX: tl.constexpr, BLOCK: tl.constexpr,
                ENCODE: tl.constexpr):
        """AbsmaxCodec, program (row block, K/V layer); a row is (layer, token, head), with one bf16
        scale, rounded before the codes are made. Decoding: code * scale, rounded once to the pool dtype."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        buf = tl.program_id(1).to(tl.int64)
        layer = buf % LAYERS
        tile, mask = _row_tile(pool, offsets, slots, buf, r, rows, HD, D)
        row = layer * rows + r
        at = _k_or_v(k_codes, v_codes, buf, LAYERS) + row[:, None] * D + tl.arange(0, D)[None, :]
        if FP8:
            codes = at.to(tl.pointer_type(tl.float8e4nv), bitcast=True)
        else:
            codes = at.to(tl.pointer_type(tl.int8), bitcast=True)
        scales = _k_or_v(k_scales, v_scales, buf, LAYERS).to(tl.pointer_type(tl.bfloat16), bitcast=True) + row
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
    def _k_codes(codes, layer, full, t, HD: tl.constexpr, BITS: tl.constexpr, COLS: tl.constexpr):
        """The packed K codes of tokens ``t`` and this program's COLS columns: [tokens, bytes]."""
        b = tl.program_id(1).to(tl.int64) * (COLS * BITS // 8) + tl.arange(0, COLS * BITS // 8)
        return codes + (layer * full + t)[:, None] * (HD * BITS // 8) + b[None, :]

    @triton.jit
    def _v_codes(codes, row, BITS: tl.constexpr):
        """The packed V codes of ``row`` s (a row: one token's run of GROUP channels): [rows, bytes]."""
        return codes + row[:, None] * (_GROUP * BITS // 8) + tl.arange(0, _GROUP * BITS // 8)[None, :]

    @triton.jit
    def _fp16(segment):
        return segment.to(tl.pointer_type(tl.float16), bitcast=True)

    @triton.jit(do_not_specialize=["tokens", "full"], do_not_specialize_on_alignment=["slots"])
    def _kivi_k(pool, offsets, slots, codes, mins, scales, resid, tokens, full, HD: tl.constexpr, BITS: tl.constexpr,
                COLS: tl.constexpr, ENCODE: tl.constexpr):
        """KIVI keys, program (token group, column block, layer): per column, one min and scale for
        the group's GROUP tokens. The group past the last full one is the residual, copied as is.
        Decoding: code * scale + min, rounded once to the pool dtype."""
        g = tl.program_id(0).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        t = g * _GROUP + tl.arange(0, _GROUP)
        c = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
        tile, mask = _group_tile(pool, offsets, slots, layer, t, tokens, c, HD)
        if g * _GROUP < full:
            codes_at = _k_codes(codes, layer, full, t, HD, BITS, COLS)
            group = (layer * (full // _GROUP) + g) * HD + c
            mins_at, scales_at = _fp16(mins) + group, _fp16(scales) + group
            if ENCODE:
                q, mn, scale = _quantize(tl.load(tile).to(tl.float32), 0, (1 << BITS) - 1)
                tl.store(codes_at, _pack(q, BITS))
                tl.store(mins_at, mn)
                tl.store(scales_at, scale)
            else:
                q = _unpack(tl.load(codes_at), BITS)
                x = q * tl.load(scales_at).to(tl.float32)[None, :] + tl.load(mins_at).to(tl.float32)[None, :]
                tl.store(tile, x.to(pool.dtype.element_ty))
        else:
            row = layer * (tokens - full) + t - full
            resid_at = resid.to(pool.dtype, bitcast=True) + row[:, None] * HD + c[None, :]
            if ENCODE:
                tl.store(resid_at, tl.load(tile, mask=mask), mask=mask)
            else:
                tl.store(tile, tl.load(resid_at, mask=mask), mask=mask)

    @triton.jit(do_not_specialize=["rows"], do_not_specialize_on_alignment=["slots"])
    def _kivi_v(pool, offsets, slots, codes, mins, scales, rows, LAYERS: tl.constexpr, HD: tl.constexpr,
                BITS: tl.constexpr, BLOCK: tl.constexpr, ENCODE: tl.constexpr):
        """KIVI values, program (row block, layer): one min and scale per row = (token, run of GROUP
        channels). Decoding as for keys."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        layer = tl.program_id(1).to(tl.int64)
        tile, mask = _row_tile(pool, offsets, slots, LAYERS + layer, r, rows, HD, _GROUP)
        row = layer * rows + r
        codes_at = _v_codes(codes, row, BITS)
        if ENCODE:
            q, mn, scale = _quantize(tl.load(tile, mask=mask, other=0.0).to(tl.float32), 1, (1 << BITS) - 1)
            tl.store(codes_at, _pack(q, BITS), mask=mask)
            tl.store(_fp16(mins) + row, mn, mask=r < rows)
            tl.store(_fp16(scales) + row, scale, mask=r < rows)
        else:
            q = _unpack(tl.load(codes_at, mask=mask, other=0), BITS)
            scale = tl.load(_fp16(scales) + row[:, None], mask=mask).to(tl.float32)
            mn = tl.load(_fp16(mins) + row[:, None], mask=mask).to(tl.float32)
            tl.store(tile, (q * scale + mn).to(pool.dtype.element_ty), mask=mask)
