"""The storage-tier interface: a keyed, byte-bounded store of encoded KV blobs.

Modelled on LMCache's storage backends: a tier knows nothing about codecs or policy,
only blobs, their sizes and its own capacity. The policy decides *what* goes where;
a tier only refuses what does not fit, and reports a damaged entry as a miss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codecs import EncodedKV

#: A codec's CPU stage (entropy coding) that a tier applies to host bytes before storing
#: them, and its inverse applied after reading: :meth:`KVCodec.pack_host` / ``unpack_host``.
Pack = Callable[[EncodedKV], EncodedKV]
Unpack = Callable[[EncodedKV], EncodedKV]


class TierError(RuntimeError):
    """A tier could not do what was asked (I/O failure, full device); nothing was lost."""


class TierFullError(TierError):
    """The blob does not fit in the tier's remaining capacity."""


@dataclass
class TierUsage:
    used_bytes: int
    capacity_bytes: int
    entries: int
    counters: dict[str, int] = field(default_factory=dict)  # tier-specific events worth watching

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


class StorageTier(ABC):
    """A store of :class:`EncodedKV` by string key."""

    #: Short name used in settings, metrics and status (``host``, ``disk``).
    name: str

    @abstractmethod
    def put(self, key: str, enc: EncodedKV, meta: dict | None = None, pack: Pack | None = None) -> None:
        """Store ``enc`` under ``key`` (replacing any entry of that key); a persistent
        tier keeps ``meta`` with it; ``pack`` is applied to the bytes on the host first.

        Returns without waiting for the bytes to leave the GPU. Raises
        :class:`TierFullError` when it does not fit and :class:`TierError` on an I/O
        failure; in both cases the tier is unchanged. A tier that writes in the
        background may instead lose the entry later (it then reads as a miss).
        """

    @abstractmethod
    def get(self, key: str, device: torch.device | str = "cpu", unpack: Unpack | None = None) -> EncodedKV | None:
        """A copy of the entry on ``device`` (through ``unpack`` when given, so in the form
        ``put`` was handed), or None if absent or damaged (damaged entries are removed).
        On a GPU the copy may still be in flight, ordered before later work on the current
        stream."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the entry; False if there was none."""

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def usage(self) -> TierUsage: ...

    def take_lost(self) -> list[str]:
        """Keys whose background write failed since the last call: their entries are gone,
        so whoever holds those keys should forget them. None for a tier that writes in ``put``."""
        return []

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)

    def __contains__(self, key: str) -> bool:
        return self.contains(key)
