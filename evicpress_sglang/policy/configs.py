"""Configurations: where a context's KV lives and in what form.

A configuration is a (tier, codec) pair: on the GPU uncompressed, in host memory or on
disk under some codec, or dropped (recomputed by prefill on its next hit). Tiers are
ordered fastest first; a context only ever moves *down* that order when evicted, and
back to the GPU when it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from ..codecs import get_codec


class Tier(IntEnum):
    GPU = 0
    HOST = 1
    DISK = 2
    DROP = 3

    @property
    def label(self) -> str:
        return self.name.lower()


#: Tiers that hold bytes and therefore have a capacity.
STORED_TIERS = (Tier.GPU, Tier.HOST, Tier.DISK)


@dataclass(frozen=True)
class Config:
    tier: Tier
    codec: str | None  # None for DROP; "bf16" on the GPU

    @property
    def label(self) -> str:
        return self.tier.label if self.tier in (Tier.GPU, Tier.DROP) else f"{self.tier.label}:{self.codec}"


GPU = Config(Tier.GPU, "bf16")
DROP = Config(Tier.DROP, None)


def build_configs(host_codecs: list[str], disk_codecs: list[str]) -> list[Config]:
    """GPU first, DROP last, host and disk options between (validated codec names)."""
    for name in (*host_codecs, *disk_codecs):
        get_codec(name)  # raises CodecError naming the valid ones
    return (
        [GPU]
        + [Config(Tier.HOST, c) for c in dict.fromkeys(host_codecs)]
        + [Config(Tier.DISK, c) for c in dict.fromkeys(disk_codecs)]
        + [DROP]
    )
