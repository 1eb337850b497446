"""Host-memory tier: blobs in one pinned arena.

Pinning is what makes host->GPU copies run at full PCIe speed (53 GB/s measured on
the reference H100 host, against 8 GB/s pageable), but ``cudaHostAlloc`` costs
milliseconds per call, far too slow to do per entry. So the tier pins one arena of
its whole capacity up front and hands out byte ranges of it with a first-fit free
list that merges neighbours on release. When no single range is large enough, a blob
is split over several (largest first) rather than moving other blobs to close the gaps:
compacting a full 12 GB arena took seconds per put on the reference H100 host.

Copies in and out are asynchronous (:mod:`.transfer`): a put returns before its bytes
have left the GPU, and each entry keeps the event that says when they have. A GPU get
is queued behind that event; only host-side reads of the arena (a CPU get) wait for it.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import torch

from ..codecs import EncodedKV, KVShape
from . import transfer
from .base import Pack, StorageTier, TierFullError, TierUsage, Unpack

ALIGN = 256  # keeps every blob start aligned for any dtype view and for DMA


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class ArenaAllocator:
    """First-fit allocation of byte ranges in ``[0, capacity)``; not thread-safe."""

    def __init__(self, capacity: int) -> None:
        usable = capacity - capacity % ALIGN  # so that every free range is a multiple of ALIGN
        self._free: list[tuple[int, int]] = [(0, usable)] if usable > 0 else []  # sorted (offset, size)

    def alloc(self, nbytes: int) -> int | None:
        size = _round_up(max(nbytes, 1))
        for off, free in self._free:
            if free >= size:
                self.alloc_at(off, nbytes)
                return off
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = _round_up(max(nbytes, 1))
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # merge with the right neighbour, then the left one
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def alloc_extents(self, nbytes: int) -> list[tuple[int, int]] | None:
        """``(offset, length)`` ranges whose lengths add up to ``nbytes``: one range when a
        free one is large enough, else the largest free ranges; None when the bytes are not free."""
        offset = self.alloc(nbytes)
        if offset is not None:
            return [(offset, nbytes)]
        if self.free_bytes < _round_up(max(nbytes, 1)):
            return None
        # Free ranges are multiples of ALIGN, so whole ranges plus the rounded-up rest fit,
        # and every split point stays aligned.
        extents, left = [], nbytes
        for off, free in sorted(self._free, key=lambda r: -r[1]):
            if left <= 0:
                break
            take = min(free, left)
            self.alloc_at(off, take)
            extents.append((off, take))
            left -= take
        return extents

    def alloc_at(self, offset: int, nbytes: int) -> None:
        """Take ``nbytes`` (rounded up) from the start of the free range at ``offset``."""
        size = _round_up(max(nbytes, 1))
        i = bisect.bisect_left(self._free, (offset, 0))
        off, free = self._free[i]
        if off != offset or free < size:
            raise ValueError(f"no free range of {size} bytes at {offset}")
        if free == size:
            del self._free[i]
        else:
            self._free[i] = (off + size, free - size)

    @property
    def free_bytes(self) -> int:
        return sum(s for _, s in self._free)

    @property
    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)


@dataclass
class _Entry:
    codec: str
    shape: KVShape
    extents: list[tuple[int, int]]  # (offset, length) in the arena, in payload order
    nbytes: int
    ready: torch.cuda.Event | None  # fires once the bytes are in the arena (None: they are)

    def wait(self) -> None:
        """Block until the arena holds this entry's bytes (host-side reads only)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


class HostTier(StorageTier):
    """A byte-bounded store of blobs in (pinned, where CUDA exists) host memory."""

    name = "host"

    def __init__(self, capacity_bytes: int, pin: bool | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"host tier capacity must be >= 0, got {capacity_bytes}")
        pin = torch.cuda.is_available() if pin is None else pin
        self.capacity = capacity_bytes
        self._arena = torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=pin)
        self._alloc = ArenaAllocator(capacity_bytes)
        self._entries: dict[str, _Entry] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.split_blobs = 0  # puts that found no free range large enough (fragmentation)

    @property
    def pinned(self) -> bool:
        return self._arena.is_pinned()

    def put(self, key: str, enc: EncodedKV, meta: dict | None = None, pack: Pack | None = None) -> None:
        if pack is not None:  # an entropy coder needs the bytes on the CPU first: this one waits
            enc = pack(enc.to("cpu"))
        with self._lock:
            # Allocate before releasing any entry of the same key, so a failed
            # replacement leaves the old blob in place.
            extents = self._alloc.alloc_extents(enc.nbytes)
            if extents is None:
                raise TierFullError(
                    f"host tier: {enc.nbytes} bytes do not fit ({self._used}/{self.capacity} used, "
                    f"{self._alloc.free_bytes} free)"
                )
            old = self._entries.get(key)
            if old is not None:
                self._release(key, old)
            if len(extents) > 1:
                self.split_blobs += 1
            # From a GPU one DMA per extent into pinned memory, not waited for.
            ready = transfer.copy_out(enc.payload.reshape(-1), self._views(extents))
            self._entries[key] = _Entry(enc.codec, enc.shape, extents, enc.nbytes, ready)
            self._used += enc.nbytes

    def _views(self, extents: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [self._arena[off : off + n] for off, n in extents]

    def _release(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        for off, n in entry.extents:
            self._alloc.free(off, n)
        self._used -= entry.nbytes

    def get(self, key: str, device: torch.device | str = "cpu", unpack: Unpack | None = None) -> EncodedKV | None:
        device = torch.device(device)
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return None
            views = self._views(e.extents)
            # A copy, so the caller keeps valid bytes even if the entry is deleted next; a
            # freed range is rewritten only by a later put, whose copy is queued after this one.
            if unpack is None and (device.type != "cuda" or self.pinned):
                return EncodedKV(e.codec, e.shape, transfer.copy_in(views, device, after=e.ready))
            e.wait()
            host = EncodedKV(e.codec, e.shape, torch.cat(views))
            if unpack is not None:
                host = unpack(host)
            return EncodedKV(host.codec, host.shape, transfer.to_device(host.payload, device))

    def delete(self, key: str) -> bool:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            self._release(key, e)
            return True

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.capacity, len(self._entries), {"split_blobs": self.split_blobs})
