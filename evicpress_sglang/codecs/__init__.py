"""KV codecs, chosen by name.

A codec name is ``[<selector>:<ratio>+]<quantizer>[+zstd]``: an optional token-dropping
stage (``knorm``, ``keydiff``, ``streaming``, ``expected``, ``kvzip``; see :mod:`.drop`), a quantizer (``bf16``,
``fp8``, ``int8``, ``int4``, ``int2``; bf16 when only a dropping stage is named) and
optional lossless entropy coding. Examples: ``int4``, ``int4+zstd``, ``keydiff:0.6``,
``keydiff:0.6+int8+zstd``.
"""

from __future__ import annotations

from functools import cache

from .base import CodecError, EncodedKV, KVCodec, KVShape
from .drop import SELECTORS, DropCodec, parse_selector
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
    """Every quantizer name the registry builds, with and without zstd (dropping stages
    take any ratio, so they are not enumerated)."""
    names = list(QUANTIZERS)
    return names + [f"{n}+zstd" for n in QUANTIZERS] if with_zstd else names


@cache
def get_codec(name: str) -> KVCodec:
    """Build (once) the codec called ``name``; unknown names are a :class:`CodecError`
    that lists the valid ones."""
    name = name.strip()
    stages = name.split("+")
    selector = parse_selector(stages[0])
    if selector is not None:
        stages = stages[1:]
        if not stages or stages[0] not in QUANTIZERS:
            stages = ["bf16", *stages]
    base, rest = stages[0], stages[1:]
    if base not in QUANTIZERS or rest not in ([], ["zstd"]):
        raise CodecError(
            f"unknown codec {name!r}; valid: [<{'|'.join(SELECTORS)}>:<ratio>+]<{'|'.join(QUANTIZERS)}>[+zstd], "
            "e.g. int4, int4+zstd, keydiff:0.6+int8"
        )
    codec: KVCodec = QUANTIZERS[base]()
    if selector is not None:
        codec = DropCodec(selector, codec, name.removesuffix("+zstd"))
    if rest:
        codec = ZstdCodec(codec)
    return codec


def subset_codec(name: str) -> str:
    """The codec that stores a context *already* token-dropped when ``name`` is chosen for
    it: its quantizer (and zstd) over the kept tokens, keeping their positions. A context
    is dropped at most once; later moves change only how it is quantized."""
    stages = [s for s in name.split("+") if parse_selector(s) is None]
    return "+".join(["keep", *(stages if stages and stages[0] in QUANTIZERS else ["bf16", *stages])])


def drops_tokens(codec: KVCodec) -> bool:
    """True when decoding yields fewer tokens than were encoded (a dropping stage)."""
    return isinstance(codec.device_codec, DropCodec)


__all__ = ["CodecError", "DropCodec", "EncodedKV", "KVCodec", "KVShape", "codec_names", "drops_tokens", "get_codec",
           "subset_codec"]
