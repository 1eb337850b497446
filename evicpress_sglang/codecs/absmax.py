"""Symmetric per-vector quantization: one scale per (layer, token, head).

Shared by ``fp8`` and ``int8``, which differ only in the stored number format. The
scale is rounded to bf16 *before* quantizing, so the stored scale is exactly the one
the codes were made with and rounding the scale adds no error.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from .base import KVShape, Segment, SegmentCodec


class AbsmaxCodec(SegmentCodec):
    lossless = False
    #: dtype the codes are stored in, and the largest magnitude it represents.
    code_dtype: torch.dtype
    code_max: float
    scale_dtype = torch.bfloat16

    def segments(self, shape: KVShape) -> list[Segment]:
        scales = shape.tensor_shape[:3] + (1,)
        return [
            Segment("k_codes", self.code_dtype, shape.tensor_shape),
            Segment("v_codes", self.code_dtype, shape.tensor_shape),
            Segment("k_scale", self.scale_dtype, scales),
            Segment("v_scale", self.scale_dtype, scales),
        ]

    @abstractmethod
    def to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """Turn values already divided by their scale (|x| <= code_max) into codes."""

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.float()
        scale = (xf.abs().amax(dim=-1, keepdim=True) / self.code_max).to(self.scale_dtype)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = self.to_codes((xf / safe).clamp_(-self.code_max, self.code_max))
        return codes, scale

    def encode_segments(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        k_codes, k_scale = self._quantize(k)
        v_codes, v_scale = self._quantize(v)
        return {"k_codes": k_codes, "v_codes": v_codes, "k_scale": k_scale, "v_scale": v_scale}

    def decode_segments(self, parts, shape, out_k, out_v) -> None:
        for codes, scale, out in ((parts["k_codes"], parts["k_scale"], out_k), (parts["v_codes"], parts["v_scale"], out_v)):
            out.copy_(codes.float() * scale.float())
