"""Configurations: where a context's KV lives and in what form.

A configuration is a (tier, codec) pair: on the GPU uncompressed, in host memory, on
disk or in a remote store shared with other servers under some codec, or dropped
(recomputed by prefill on its next hit). Tiers are
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
    REMOTE = 3
    DROP = 4

    @property
    def label(self) -> str:
        return self.name.lower()


#: Tiers that hold bytes and therefore have a capacity.
STORED_TIERS = (Tier.GPU, Tier.HOST, Tier.DISK, Tier.REMOTE)


@dataclass(frozen=True)
class Config:
    tier: Tier
    codec: str | None  # None for DROP; "bf16" on the GPU

    @property
    def label(self) -> str:
        return self.tier.label if self.tier in (Tier.GPU, Tier.DROP) else f"{self.tier.label}:{self.codec}"


GPU = Config(Tier.GPU, "bf16")
DROP = Config(Tier.DROP, None)


def build_configs(host_codecs: list[str], disk_codecs: list[str], remote_codecs: list[str] = ()) -> list[Config]:
    """GPU first, DROP last, host, disk and remote options between, in that order
    (validated codec names); a tier without codecs has no configuration."""
    for name in (*host_codecs, *disk_codecs, *remote_codecs):
        get_codec(name)  # raises CodecError naming the valid ones
    return (
        [GPU]
        + [Config(Tier.HOST, c) for c in dict.fromkeys(host_codecs)]
        + [Config(Tier.DISK, c) for c in dict.fromkeys(disk_codecs)]
        + [Config(Tier.REMOTE, c) for c in dict.fromkeys(remote_codecs)]
        + [DROP]
    )
