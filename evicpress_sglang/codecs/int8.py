"""``int8``: symmetric integers with a bf16 scale per (layer, token, head); about 1.9x smaller."""

from __future__ import annotations

import torch

from .absmax import AbsmaxCodec


class Int8Codec(AbsmaxCodec):
    name = "int8"
    code_dtype = torch.int8
    code_max = 127.0

    def to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round_().to(self.code_dtype)
