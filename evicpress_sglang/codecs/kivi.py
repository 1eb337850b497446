"""``int4`` and ``int2``: asymmetric group quantization in the style of KIVI (Liu et al. 2024).

Keys have outlier *channels*, values do not, so (as KIVI found) keys are quantized
per channel and values per token:

* K: for every (layer, head, channel), groups of ``GROUP`` consecutive tokens share a
  min and a scale.
* V: for every (layer, token, head), groups of ``GROUP`` consecutive channels share a
  min and a scale.

Residual: per-channel key groups need ``GROUP`` tokens. The last ``tokens % GROUP``
tokens of K (KIVI's "residual", the most recent tokens) are kept unquantized in the
pool dtype. V has no residual. Min and scale are stored as fp16 and rounded before
quantizing, so the codes match the stored parameters exactly.

Codes are packed ``8 // bits`` to a byte, low bits first.
"""

from __future__ import annotations

import torch

from .base import KVShape, Segment, SegmentCodec

GROUP = 32
_PARAM_DTYPE = torch.float16


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    c = codes.reshape(-1, per_byte).to(torch.uint8)
    packed = torch.zeros(c.shape[0], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):  # per_byte <= 4: a loop over bit positions, not tokens
        packed |= c[:, i] << (i * bits)
    return packed


def _unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    per_byte, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(shape)


def _quantize_groups(x: torch.Tensor, dim: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/scale quantization along ``dim`` (the group axis) of a float tensor."""
    mn = x.amin(dim=dim, keepdim=True).to(_PARAM_DTYPE)
    scale = ((x.amax(dim=dim, keepdim=True) - mn.float()) / levels).to(_PARAM_DTYPE)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = ((x - mn.float()) / safe).round_().clamp_(0, levels)
    return codes, mn, scale


class KiviCodec(SegmentCodec):
    lossless = False
    bits: int

    def _layout(self, shape: KVShape) -> tuple[int, int, int]:
        """(key groups along tokens, residual key tokens, value groups per head)."""
        if shape.head_dim % GROUP and shape.head_dim > GROUP:
            raise ValueError(f"head_dim {shape.head_dim} is not a multiple of the group size {GROUP}")
        return shape.tokens // GROUP, shape.tokens % GROUP, max(1, shape.head_dim // GROUP)

    def segments(self, shape: KVShape) -> list[Segment]:
        L, n, H, D = shape.tensor_shape
        kg, resid, vg = self._layout(shape)
        per_byte = 8 // self.bits
        return [
            Segment("k_codes", torch.uint8, (L * kg * GROUP * H * D // per_byte,)),
            Segment("k_min", _PARAM_DTYPE, (L, kg, 1, H, D)),
            Segment("k_scale", _PARAM_DTYPE, (L, kg, 1, H, D)),
            Segment("k_resid", shape.dtype, (L, resid, H, D)),
            Segment("v_codes", torch.uint8, (L * n * H * D // per_byte,)),
            Segment("v_min", _PARAM_DTYPE, (L, n, H, vg, 1)),
            Segment("v_scale", _PARAM_DTYPE, (L, n, H, vg, 1)),
        ]

    def encode_segments(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = KVShape.of(k)
        L, n, H, D = shape.tensor_shape
        kg, _, vg = self._layout(shape)
        levels = (1 << self.bits) - 1
        full = kg * GROUP
        k_grouped = k[:, :full].float().reshape(L, kg, GROUP, H, D)
        k_codes, k_min, k_scale = _quantize_groups(k_grouped, 2, levels)
        v_grouped = v.float().reshape(L, n, H, vg, D // vg)
        v_codes, v_min, v_scale = _quantize_groups(v_grouped, 4, levels)
        return {
            "k_codes": _pack(k_codes, self.bits),
            "k_min": k_min,
            "k_scale": k_scale,
            "k_resid": k[:, full:],
            "v_codes": _pack(v_codes, self.bits),
            "v_min": v_min,
            "v_scale": v_scale,
        }

    def decode_segments(self, parts, shape, out_k, out_v) -> None:
        L, n, H, D = shape.tensor_shape
        kg, _, vg = self._layout(shape)
        full = kg * GROUP
        k_codes = _unpack(parts["k_codes"], self.bits, (L, kg, GROUP, H, D))
        k = k_codes.float() * parts["k_scale"].float() + parts["k_min"].float()
        out_k[:, :full].copy_(k.reshape(L, full, H, D))
        out_k[:, full:].copy_(parts["k_resid"])
        v_codes = _unpack(parts["v_codes"], self.bits, (L, n, H, vg, D // vg))
        v = v_codes.float() * parts["v_scale"].float() + parts["v_min"].float()
        out_v.copy_(v.reshape(L, n, H, D))


class Int4Codec(KiviCodec):
    """4-bit KIVI; about 3.2x smaller than bf16 at head_dim 64 or 128."""

    name = "int4"
    bits = 4


class Int2Codec(KiviCodec):
    """2-bit KIVI; about 5.3x smaller than bf16; the most lossy quantizer offered."""

    name = "int2"
    bits = 2
