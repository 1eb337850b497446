"""Moving one context's KV between SGLang's token pool and the codec layout.

SGLang's ``MHATokenToKVPool`` keeps one ``[slots, kv_heads, head_dim]`` buffer per layer
for K and for V; a radix node owns a list of slot indices. Codecs want
``[layers, tokens, kv_heads, head_dim]``. One gather per layer (a single GPU kernel each)
builds that; one ``index_copy_`` per layer writes decoded KV back into fresh slots.
"""

from __future__ import annotations

import torch

from ..codecs import EncodedKV, KVCodec, KVShape, drops_tokens


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
    k = torch.stack([buf.index_select(0, idx) for buf in pool.k_buffer])
    v = torch.stack([buf.index_select(0, idx) for buf in pool.v_buffer])
    return k, v


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
