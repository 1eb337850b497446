"""KV codecs, chosen by name.

A codec name is a base quantizer optionally followed by ``+zstd``:
``bf16``, ``fp8``, ``int8``, ``int4``, ``int2``, ``bf16+zstd``, ``int4+zstd``, ...
"""

from __future__ import annotations

from functools import cache

from .base import CodecError, EncodedKV, KVCodec, KVShape
from .fp8 import FP8Codec
from .identity import IdentityCodec
from .int8 import Int8Codec
from .kivi import Int2Codec, Int4Codec
from .zstd import ZstdCodec

#: Base quantizers, from least to most lossy.
QUANTIZERS: dict[str, type[KVCodec]] = {
    c.name: c for c in (IdentityCodec, FP8Codec, Int8Codec, Int4Codec, Int2Codec)
}
LOSSLESS_STAGES = ("zstd",)


def codec_names(with_zstd: bool = True) -> list[str]:
    """Every codec name the registry builds (without token dropping)."""
    names = list(QUANTIZERS)
    return names + [f"{n}+zstd" for n in QUANTIZERS] if with_zstd else names


@cache
def get_codec(name: str) -> KVCodec:
    """Build (once) the codec called ``name``; unknown names are a :class:`CodecError`
    that lists the valid ones."""
    parts = name.strip().split("+")
    base, stages = parts[0], parts[1:]
    if base not in QUANTIZERS or any(s not in LOSSLESS_STAGES for s in stages) or len(stages) > 1:
        raise CodecError(
            f"unknown codec {name!r}; valid: {', '.join(QUANTIZERS)}, each optionally followed by '+zstd'"
        )
    codec: KVCodec = QUANTIZERS[base]()
    if stages:
        codec = ZstdCodec(codec)
    return codec


__all__ = ["CodecError", "EncodedKV", "KVCodec", "KVShape", "codec_names", "get_codec"]
