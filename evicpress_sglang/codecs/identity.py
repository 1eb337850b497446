"""``bf16``: the KV as it is in the pool. The reference every other codec is measured
against, and with ``+zstd`` the lossless choice for the disk tier."""

from __future__ import annotations

import torch

from .base import KVShape, Segment, SegmentCodec


class IdentityCodec(SegmentCodec):
    """Stores K and V unchanged, in the pool's own dtype (bf16 in production)."""

    name = "bf16"
    lossless = True

    def segments(self, shape: KVShape) -> list[Segment]:
        return [Segment("k", shape.dtype, shape.tensor_shape), Segment("v", shape.dtype, shape.tensor_shape)]

    def encode_segments(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"k": k, "v": v}

    def decode_segments(self, parts, shape, out_k, out_v) -> None:
        out_k.copy_(parts["k"])
        out_v.copy_(parts["v"])
