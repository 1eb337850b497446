"""Disk tier: one file per blob in a directory, bounded by a byte capacity.

Each file is one blob in the format of :mod:`.blob` (a JSON header naming its key, the
payload, an xxh64 checksum over both). A file that is truncated, fails its checksum
or cannot be parsed is a *miss*: it is deleted and never returned. Writes go to a
temporary file that is renamed into place, so a crash leaves either the old state or
the new one, never half a blob. The index is rebuilt from the files' headers on
start-up, so entries written before a restart are found after it.

Writes are behind the scheduler: ``put`` reserves room and queues the blob; one writer
thread copies it off the GPU (on its own stream), entropy-codes it if asked and writes
it, so the scheduler never waits for the GPU or the disk to store a context.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codecs import CodecError, EncodedKV
from . import transfer
from .base import Pack, StorageTier, TierError, TierFullError, TierUsage, Unpack
from .blob import CorruptEntry, blob_size, decode, encode_header, frame, read_header
from .writer import BackgroundWriter, Write

log = logging.getLogger(__name__)

SUFFIX = ".kv"
HEADER_SLACK = 64  # a packed blob's header may state a longer byte count than the estimate
TMP_PREFIX = ".tmp-"


@dataclass
class _Entry:
    path: Path
    size: int  # file size, what counts against capacity
    meta: dict | None = None  # the caller's own description of the blob, kept in the header


class DiskTier(StorageTier):
    """Blobs as checksummed files under ``root``, at most ``capacity_bytes`` in all."""

    name = "disk"

    def __init__(self, root: str | os.PathLike, capacity_bytes: int, max_pending_bytes: int = 1 << 30) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"disk tier capacity must be >= 0, got {capacity_bytes}")
        self.root = Path(root)
        self.capacity = capacity_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TierError(f"disk tier: cannot create {self.root}: {e.strerror}") from e
        self._changed = threading.Condition()  # guards everything below; notified as writes finish
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, Write] = {}
        self._used = 0
        self._reserved = 0
        self.failed_writes = 0
        self.last_error: str | None = None
        self._lost: list[str] = []  # keys whose write failed, until take_lost() hands them over
        self._logged_failures: set[tuple[str, str]] = set()
        self._rebuild_index()
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._writes = BackgroundWriter(self._changed, self._write, max_pending_bytes,
                                        f"evicpress-disk-writer:{self.root}")

    # -- index ---------------------------------------------------------------

    def _path_for(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode()).hexdigest()[:32] + SUFFIX)

    def _rebuild_index(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith(TMP_PREFIX):  # a write that a crash interrupted
                p.unlink(missing_ok=True)
                continue
            if p.suffix != SUFFIX:
                continue
            try:
                size = p.stat().st_size
                with open(p, "rb") as f:
                    header, raw = read_header(f)
                if size != blob_size(len(raw), int(header["nbytes"])) or p != self._path_for(header["key"]):
                    raise CorruptEntry("size or name does not match header")
            except OSError as e:  # maybe transient: not indexed now, not deleted either
                log.warning("disk tier: cannot read %s (%s); left in place, not used", p.name, e)
                continue
            except CorruptEntry as e:
                log.warning("disk tier: dropping damaged entry %s (%s)", p.name, e)
                p.unlink(missing_ok=True)
                continue
            self._entries[header["key"]] = _Entry(p, size, header.get("meta"))
            self._used += size

    # -- StorageTier -----------------------------------------------------------

    def put(self, key: str, enc: EncodedKV, meta: dict | None = None, pack: Pack | None = None) -> None:
        """Queue ``enc`` for writing; ``meta`` (JSON-able) is kept with it and survives restarts.

        Room is reserved here (a full tier raises :class:`TierFullError` at once); the copy
        off the GPU, ``pack`` and the write run on the writer thread. Until written, the entry
        is served from ``enc`` itself. A write that fails later (disk full, I/O error) loses
        only this entry, which then reads as a miss, and is counted in ``failed_writes``.
        Blocks only while more than ``max_pending_bytes`` are waiting to be written.
        """
        bound = enc.nbytes if pack is None else enc.nbytes + enc.nbytes // 128 + 4096  # zstd's worst case
        reserve = blob_size(len(encode_header(key, enc, meta)) + HEADER_SLACK, bound)
        ready = transfer.ready_event(enc.payload)
        with self._changed:
            old = self._entries.get(key)
            freed = old.size if old else 0
            if self._used + self._reserved - freed + reserve > self.capacity:
                raise TierFullError(
                    f"disk tier: {reserve} bytes do not fit ({self._used + self._reserved}/{self.capacity} "
                    f"used at {self.root})"
                )
            self._writes.wait_for_room(enc.nbytes)
            job = Write(key, enc, meta, pack, ready, reserve)
            self._pending[key] = job
            self._reserved += reserve
            self._writes.submit(job, enc.nbytes)

    def flush(self) -> None:
        """Wait until every queued write has finished (or failed)."""
        self._writes.flush()

    def _write(self, job: Write) -> None:
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            if not self._is_pending(job):
                return  # deleted before its turn
            host = transfer.to_host_after(job.enc.payload, job.ready, self._stream)
            enc = EncodedKV(job.enc.codec, job.enc.shape, host)
            if job.pack is not None:
                enc = job.pack(enc)
            prefix, payload, checksum = frame(job.key, enc, job.meta)
            size = len(prefix) + enc.nbytes + len(checksum)
            if size > job.reserved:
                raise TierFullError(f"packed to {size} bytes, more than the {job.reserved} reserved")
            with open(tmp, "wb") as f:
                f.write(prefix)
                f.write(payload)
                f.write(checksum)
            with self._changed:
                if self._pending.get(job.key) is not job:
                    return  # deleted while being written
                path = self._path_for(job.key)
                os.replace(tmp, path)
                old = self._entries.get(job.key)
                if old is not None:
                    self._used -= old.size
                self._entries[job.key] = _Entry(path, size, job.meta)
                self._used += size
                self._settle(job)
        except Exception as e:  # the writer must survive anything one entry does
            why = self._note_failure("writing", job.key, e)
            with self._changed:
                self.failed_writes += 1
                self.last_error = f"writing {job.key!r}: {why}"
                if self._pending.get(job.key) is job:
                    self._settle(job)
                    self._lost.append(job.key)
        finally:
            tmp.unlink(missing_ok=True)

    def _is_pending(self, job: Write) -> bool:
        with self._changed:
            return self._pending.get(job.key) is job

    def _settle(self, job: Write) -> None:
        """Forget a queued write and its reservation (lock held)."""
        del self._pending[job.key]
        self._reserved -= job.reserved

    def _note_failure(self, doing: str, key: str, e: Exception) -> str:
        """Log the first failure of each kind (an outage, a full disk, would otherwise log
        every entry); returns its description."""
        why = getattr(e, "strerror", None) or str(e)
        if (doing, why) not in self._logged_failures:
            self._logged_failures.add((doing, why))
            log.warning("disk tier: %s %r under %s failed (%s); a miss; further failures of this kind are only "
                        "counted", doing, key, self.root, why)
        return why

    def entry_bytes(self, key: str) -> int:
        """Bytes the entry takes against capacity (0 if there is none)."""
        with self._changed:
            e = self._entries.get(key) or self._pending.get(key)
            return getattr(e, "size", 0) or getattr(e, "reserved", 0) if e else 0

    def take_lost(self) -> list[str]:
        with self._changed:
            lost, self._lost = self._lost, []
        return lost

    def meta(self, key: str) -> dict | None:
        """What the caller stored with ``key`` (from the index: no file read)."""
        with self._changed:
            e = self._pending.get(key) or self._entries.get(key)
            return e.meta if e else None

    def get(self, key: str, device: torch.device | str = "cpu", unpack: Unpack | None = None) -> EncodedKV | None:
        with self._changed:
            job = self._pending.get(key)
            e = self._entries.get(key)
        if job is not None:  # not written yet: serve the bytes put was handed (already unpacked)
            return EncodedKV(job.enc.codec, job.enc.shape, transfer.to_device(job.enc.payload, device))
        if e is None:
            return None
        try:
            enc = self._read(e.path, key)
            if unpack is not None:
                enc = unpack(enc)
        except FileNotFoundError:
            self._forget(key, e, unlink=False)
            return None
        except OSError as err:  # maybe transient (EIO): a miss now, but the file stays for a restart to retry
            self._note_failure("reading", key, err)
            self._forget(key, e, unlink=False)
            return None
        except (CorruptEntry, CodecError) as err:
            log.warning("disk tier: entry %r is damaged (%s); treating it as a miss", key, err)
            self._forget(key, e, unlink=True)
            return None
        return EncodedKV(enc.codec, enc.shape, transfer.to_device(enc.payload, device))

    def _read(self, path: Path, key: str) -> EncodedKV:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(buf) != len(buf):
                raise CorruptEntry("file shrank while being read")
        return decode(buf, key)[0]

    def _forget(self, key: str, entry: _Entry, unlink: bool) -> None:
        with self._changed:
            if self._entries.get(key) is entry:
                del self._entries[key]
                self._used -= entry.size
        if unlink:
            entry.path.unlink(missing_ok=True)

    def delete(self, key: str) -> bool:
        with self._changed:
            job = self._pending.get(key)
            if job is not None:
                self._settle(job)  # the writer skips or discards it
            e = self._entries.pop(key, None)
            if e is not None:
                self._used -= e.size
        if e is not None:
            e.path.unlink(missing_ok=True)
        return job is not None or e is not None

    def contains(self, key: str) -> bool:
        with self._changed:
            return key in self._pending or key in self._entries

    def keys(self) -> list[str]:
        with self._changed:
            return list(dict.fromkeys([*self._entries, *self._pending]))

    def usage(self) -> TierUsage:
        """Bytes written plus bytes reserved for queued writes (so planners never overfill)."""
        with self._changed:
            return TierUsage(self._used + self._reserved, self.capacity, len(set(self._entries) | set(self._pending)),
                             {"failed_writes": self.failed_writes, "queued_writes": len(self._pending)})
