"""Moving one context's KV between SGLang's token pool and the codec layout.

SGLang's ``MHATokenToKVPool`` keeps one ``[slots, kv_heads, head_dim]`` buffer per layer
for K and for V; a radix node owns a list of slot indices. Codecs want
``[layers, tokens, kv_heads, head_dim]``. One gather per layer (a single GPU kernel each)
builds that; one ``index_copy_`` per layer writes decoded KV back into fresh slots.

:func:`encode_from_pool` and :func:`decode_into_pool` skip the ``[layers, tokens, ...]``
tensor where they can: ``bf16`` and the fp8, int8, int4 and int2 quantizers (alone or under
token dropping) run as fused Triton kernels between the pool and the payload
(:mod:`..codecs.kernels`), and where the kernels do not run (a CPU pool), ``bf16`` is copied
between the pool and its payload segments per layer. Anything else, or a kernel that fails,
takes the gather / codec / scatter path above, which gives the same bytes.
"""

from __future__ import annotations

import logging

import torch

from ..codecs import CodecError, EncodedKV, KVCodec, KVShape, drops_tokens, get_codec, kernels
from ..codecs.base import SegmentCodec, check_blob
from ..codecs.drop import DropCodec
from ..codecs.identity import IdentityCodec

log = logging.getLogger(__name__)


class UnsupportedPool(ValueError):
    """A KV pool layout this backend cannot read (MLA, fp8 storage, HND layouts...)."""


def pool_layout(pool) -> KVShape:
    """The per-token KV geometry of ``pool``; refuses layouts the codecs cannot handle."""
    k_buffer = getattr(pool, "k_buffer", None)
    if not isinstance(k_buffer, list) or not k_buffer or k_buffer[0].dim() != 3:
        raise UnsupportedPool(
            f"evicpress needs an MHA token pool with per-layer [slots, heads, head_dim] buffers; "
            f"got {type(pool).__name__}"
        )
    if pool.store_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UnsupportedPool(f"evicpress cannot compress a KV cache stored as {pool.store_dtype}")
    if pool.v_buffer[0].shape != k_buffer[0].shape:
        raise UnsupportedPool("evicpress needs K and V of the same head_dim")
    _, heads, head_dim = k_buffer[0].shape
    return KVShape(len(k_buffer), 0, heads, head_dim, pool.store_dtype)


def gather(pool, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``slots`` as [layers, tokens, heads, head_dim] (copies)."""
    idx = slots.to(pool.k_buffer[0].device, torch.int64)
    return _stack(pool.k_buffer, idx), _stack(pool.v_buffer, idx)


def _stack(buffers: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    return torch.stack([buf.index_select(0, idx) for buf in buffers])


def scatter(pool, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write [layers, tokens, heads, head_dim] K and V into ``slots`` of every layer."""
    idx = slots.to(pool.k_buffer[0].device, torch.int64)
    for layer, (kb, vb) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
        kb.index_copy_(0, idx, k[layer])
        vb.index_copy_(0, idx, v[layer])


def decode(codec: KVCodec, enc: EncodedKV, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``enc`` decoded into fresh K and V on ``device``, plus, for a token-dropping codec,
    the positions of the tokens it kept (else None)."""
    shape = codec.output_shape(enc.shape)
    k = torch.empty(shape.tensor_shape, dtype=shape.dtype, device=device)
    v = torch.empty_like(k)
    codec.decode(enc, k, v)
    return k, v, codec.positions(enc) if drops_tokens(codec) else None


def encode_from_pool(pool, slots: torch.Tensor, codec: KVCodec, positions: torch.Tensor | None = None,
                     start: int = 0) -> EncodedKV:
    """The blob ``codec``'s device part makes of the KV at ``slots``: what
    ``codec.device_codec.encode(*gather(pool, slots))`` returns, byte for byte, with fewer
    passes over memory (module docstring). ``positions``: where a token subset's tokens sit in
    their context, for a ``keep+...`` codec (as ``cache._put`` passes them). ``start``: where the
    context (a radix node) starts in its sequence, for the selectors that read RoPE phases
    (:attr:`~evicpress_sglang.codecs.drop.ContextKV.start`)."""
    codec = codec.device_codec
    drop, quantizer = _parts(codec)
    if positions is not None and drop is None:
        raise ValueError(f"{codec.name} does not store positions; a token subset needs a keep+<quantizer> codec")
    idx = slots.to(pool.k_buffer[0].device, torch.int64).contiguous()
    path = _path(quantizer, pool)
    if path is not None:
        shape = pool_layout(pool).with_tokens(idx.numel())
        payload = torch.empty(codec.nbytes(shape), dtype=torch.uint8, device=idx.device)
        inner, kept = payload, idx
        if drop is not None:
            picked, kept_pos = drop.keep(shape, idx.device, lambda part: _stack(pool.k_buffer[part], idx),
                                         lambda part: _stack(pool.v_buffer[part], idx), positions, start)
            head = drop.header(kept_pos)
            payload[: head.numel()] = head
            inner, kept = payload[head.numel():], idx[picked]
        try:
            _encode_into(pool, kept, quantizer, inner, path)
            return EncodedKV(codec.name, shape, payload)
        except Exception as e:  # noqa: BLE001 - any kernel failure: the torch path below is always right
            _give_up(quantizer, path, e)
    k, v = gather(pool, idx)
    return codec.encode(k, v, positions=positions, start=start) if drop else codec.encode(k, v)


def decode_into_pool(pool, slots: torch.Tensor, codec: KVCodec, enc: EncodedKV) -> torch.Tensor | None:
    """Write the KV of ``enc`` (a blob of ``codec``'s device part, on any device) into ``slots``
    of every layer; returns the kept tokens' positions for a token-dropping codec, else None.
    ``slots`` holds one slot per decoded token: ``codec.output_shape(enc.shape).tokens``, fewer
    than the context's tokens for a token-dropped blob. A blob that does not fit is a
    :class:`CodecError` raised before anything is written."""
    codec = codec.device_codec
    check_blob(codec, enc)
    layout, out = pool_layout(pool), codec.output_shape(enc.shape)
    if out != layout.with_tokens(out.tokens):
        raise CodecError(f"blob holds KV of shape {out.tensor_shape}/{out.dtype}, the pool "
                         f"{(layout.layers, '*', layout.heads, layout.head_dim)}/{layout.dtype}")
    idx = slots.to(pool.k_buffer[0].device, torch.int64).contiguous()
    if idx.numel() != out.tokens:
        raise ValueError(f"{idx.numel()} slots for {out.tokens} decoded tokens")
    drop, quantizer = _parts(codec)
    enc = enc.to(idx.device)
    path = _path(quantizer, pool)
    if path is not None:
        try:
            _decode_from(pool, idx, quantizer, drop.inner_payload(enc).payload if drop else enc.payload, path)
            return drop.positions(enc) if drop else None
        except Exception as e:  # noqa: BLE001 - as in encode_from_pool; the slots are all rewritten below
            _give_up(quantizer, path, e)
    k, v, positions = decode(codec, enc, idx.device)
    scatter(pool, idx, k, v)
    return positions


def _parts(codec: KVCodec) -> tuple[DropCodec | None, KVCodec]:
    """(the token-dropping stage or None, the quantizer that moves the payload) of a device codec."""
    return (codec, codec.inner) if isinstance(codec, DropCodec) else (None, codec)


#: Tokens of the warm-up (any count: the kernels are not specialized on it).
WARM_TOKENS = 40


def warm_up(pool, codecs: list[str]) -> list[str]:
    """Compile, now, the kernels that ``codecs`` (stored codec names) will run between the pool
    and their payloads, in both directions: otherwise the first store and the first load-back of
    each run Triton's compiler on the scheduler thread (about a second each on an H200 with an
    empty Triton cache). Reads and writes only slot 0, which SGLang keeps for the dummy writes of
    padded tokens. A kernel that fails is given up (the next path down serves its codec) and the
    rest are still compiled. Returns the quantizers compiled."""
    idx = torch.zeros(WARM_TOKENS, dtype=torch.int64, device=pool.k_buffer[0].device)
    shape = pool_layout(pool).with_tokens(WARM_TOKENS)
    done: list[str] = []
    for name in codecs:
        quantizer = _parts(get_codec(name).device_codec)[1]
        if quantizer.name in done or _path(quantizer, pool) != "kernel":
            continue
        payload = torch.empty(quantizer.nbytes(shape), dtype=torch.uint8, device=idx.device)
        try:
            kernels.encode(pool.k_buffer, pool.v_buffer, idx, quantizer, payload)
            kernels.decode(pool.k_buffer, pool.v_buffer, idx, quantizer, payload)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run here: given up now, the others still warm
            _give_up(quantizer, "kernel", e)
            continue
        done.append(quantizer.name)
    return done


#: Context lengths the selectors are first run with: multiples of 16 and not, below and above
#: kvzip's 256 queries, since Triton specializes integer sizes on divisibility by 16 (under
#: SGLang's --enable-deterministic-inference the selectors' matmuls run as its kernels).
#: Contexts past ~32k tokens switch those kernels to 64-bit offsets: one more compile each, left.
WARM_SELECT_TOKENS = (96, 97, 272, 281)


def warm_up_selectors(pool, codecs: list[str]) -> list[str]:
    """Run, now, the token selector of every dropping codec in ``codecs`` on made-up KV of the
    pool's geometry, dtype and device: a selector's first call on a GPU loads or compiles what
    its ops need (cuBLAS plans, and Triton kernels in deterministic mode), which would otherwise
    happen inside the first eviction, on the scheduler thread. Touches no slot of the pool and no
    global RNG. A selector that fails is logged once and left to its first eviction (whose
    failure the store path handles). Returns the selectors that ran."""
    layout, device = pool_layout(pool), pool.k_buffer[0].device
    gen = torch.Generator(device=device).manual_seed(0)
    tried: set[str] = set()
    done: list[str] = []
    for name in codecs:
        stage = _parts(get_codec(name).device_codec)[0]
        if stage is None or stage.selector.name in tried:
            continue
        tried.add(stage.selector.name)
        lengths = [t for t in WARM_SELECT_TOKENS if stage.selector.kept(t) < t]  # else it would not run
        if not lengths:
            continue
        try:
            for tokens in lengths:
                k = torch.randn(layout.layers, tokens, layout.heads, layout.head_dim, generator=gen,
                                device=device).to(layout.dtype)
                stage.keep(layout.with_tokens(tokens), device, lambda part: k[part], lambda part: k[part])
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a kernel's error surfaces here, not at a later sync
        except Exception as e:  # noqa: BLE001 - a warm-up must not stop the start; the first eviction retries
            log.warning("evicpress: warming the %s selector failed (%s: %s); it warms at its first eviction",
                        stage.selector.name, type(e).__name__, e)
            continue
        done.append(stage.selector.name)
    return done


#: Paths that failed once ("int8": its kernel; "bf16/layers": the per-layer bf16 copy): not
#: tried again, the next path down is taken from then on.
_failed: set[str] = set()


def _path(quantizer: KVCodec, pool) -> str | None:
    """How ``quantizer``'s payload moves between the pool and the payload without the
    intermediate tensor: ``"kernel"`` (:mod:`..codecs.kernels`), ``"layers"`` (``bf16``, one
    copy per layer: where no kernel runs, e.g. a CPU pool, or after the kernel failed), or
    None: the gather / codec / scatter path."""
    if quantizer.name not in _failed and kernels.supports(quantizer, pool.k_buffer):
        return "kernel"
    if isinstance(quantizer, IdentityCodec) and f"{quantizer.name}/layers" not in _failed:
        return "layers"
    return None


def _give_up(quantizer: KVCodec, path: str, e: Exception) -> None:
    _failed.add(quantizer.name if path == "kernel" else f"{quantizer.name}/{path}")
    log.warning("evicpress: the %s path of %s failed (%s: %s); not using it from now on", path, quantizer.name,
                type(e).__name__, e, exc_info=True)


def _encode_into(pool, idx: torch.Tensor, quantizer: SegmentCodec, payload: torch.Tensor, path: str) -> None:
    if path == "kernel":
        kernels.encode(pool.k_buffer, pool.v_buffer, idx, quantizer, payload)
    else:  # "layers"
        shape = pool_layout(pool).with_tokens(idx.numel())
        quantizer.zero_padding(payload, shape)
        views = quantizer.views(payload, shape)
        for layer, (kb, vb) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
            torch.index_select(kb, 0, idx, out=views["k"][layer])
            torch.index_select(vb, 0, idx, out=views["v"][layer])


def _decode_from(pool, idx: torch.Tensor, quantizer: SegmentCodec, payload: torch.Tensor, path: str) -> None:
    if path == "kernel":
        kernels.decode(pool.k_buffer, pool.v_buffer, idx, quantizer, payload)
    else:  # "layers"
        views = quantizer.views(payload, pool_layout(pool).with_tokens(idx.numel()))
        scatter(pool, idx, views["k"], views["v"])
