"""Disk tier: one file per blob in a directory, bounded by a byte capacity.

File layout (little endian)::

    b"EVICKV01" | u32 header_len | header (JSON: key, codec, shape, dtype, nbytes) | payload | u64 xxh64

The checksum covers header and payload. A file that is truncated, fails its checksum
or cannot be parsed is a *miss*: it is deleted and never returned. Writes go to a
temporary file that is renamed into place, so a crash leaves either the old state or
the new one, never half a blob. The index is rebuilt from the files' headers on
start-up, so entries written before a restart are found after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from ..codecs import EncodedKV, KVShape
from .base import StorageTier, TierError, TierFullError, TierUsage

log = logging.getLogger(__name__)

MAGIC = b"EVICKV01"
_LEN = struct.Struct("<I")
_SUM = struct.Struct("<Q")
SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"


class CorruptEntry(ValueError):
    """A blob file that must not be used."""


@dataclass
class _Entry:
    path: Path
    size: int  # file size, what counts against capacity
    meta: dict | None = None  # the caller's own description of the blob, kept in the header


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptEntry(f"unknown dtype {name!r}")
    return dtype


def _encode_header(key: str, enc: EncodedKV, meta: dict | None) -> bytes:
    s = enc.shape
    return json.dumps(
        {
            "key": key,
            "codec": enc.codec,
            "shape": [s.layers, s.tokens, s.heads, s.head_dim],
            "dtype": _dtype_name(s.dtype),
            "nbytes": enc.nbytes,
            "meta": meta,
        }
    ).encode()


def _read_header(f) -> tuple[dict, bytes]:
    if f.read(len(MAGIC)) != MAGIC:
        raise CorruptEntry("bad magic")
    raw_len = f.read(_LEN.size)
    if len(raw_len) != _LEN.size:
        raise CorruptEntry("truncated header length")
    (hlen,) = _LEN.unpack(raw_len)
    raw = f.read(hlen)
    if len(raw) != hlen:
        raise CorruptEntry("truncated header")
    try:
        header = json.loads(raw)
        _ = (header["key"], header["codec"], header["shape"], header["dtype"], int(header["nbytes"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"unreadable header: {e}") from e
    return header, raw


def _expected_size(header_len: int, nbytes: int) -> int:
    return len(MAGIC) + _LEN.size + header_len + nbytes + _SUM.size


class DiskTier(StorageTier):
    """Blobs as checksummed files under ``root``, at most ``capacity_bytes`` in all."""

    name = "disk"

    def __init__(self, root: str | os.PathLike, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"disk tier capacity must be >= 0, got {capacity_bytes}")
        self.root = Path(root)
        self.capacity = capacity_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TierError(f"disk tier: cannot create {self.root}: {e.strerror}") from e
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._used = 0
        self._reserved = 0
        self._rebuild_index()

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
                    header, raw = _read_header(f)
                if size != _expected_size(len(raw), int(header["nbytes"])) or p != self._path_for(header["key"]):
                    raise CorruptEntry("size or name does not match header")
            except (OSError, CorruptEntry) as e:
                log.warning("disk tier: dropping unreadable entry %s (%s)", p.name, e)
                p.unlink(missing_ok=True)
                continue
            self._entries[header["key"]] = _Entry(p, size, header.get("meta"))
            self._used += size

    # -- StorageTier -----------------------------------------------------------

    def put(self, key: str, enc: EncodedKV, meta: dict | None = None) -> None:
        """Store ``enc``; ``meta`` (JSON-able) is kept with it and survives restarts."""
        header = _encode_header(key, enc, meta)
        size = _expected_size(len(header), enc.nbytes)
        with self._lock:
            old = self._entries.get(key)
            freed = old.size if old else 0
            if self._used + self._reserved - freed + size > self.capacity:
                raise TierFullError(
                    f"disk tier: {size} bytes do not fit ({self._used}/{self.capacity} used at {self.root})"
                )
            self._reserved += size
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            payload = enc.payload.cpu().numpy().tobytes()
            digest = xxhash.xxh64(header)
            digest.update(payload)
            with open(tmp, "wb") as f:
                f.write(MAGIC + _LEN.pack(len(header)) + header)
                f.write(payload)
                f.write(_SUM.pack(digest.intdigest()))
            path = self._path_for(key)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._reserved -= size
            raise TierError(f"disk tier: writing {key!r} under {self.root} failed: {e.strerror or e}") from e
        with self._lock:
            self._reserved -= size
            old = self._entries.get(key)
            if old is not None:
                self._used -= old.size
            self._entries[key] = _Entry(path, size, meta)
            self._used += size

    def meta(self, key: str) -> dict | None:
        """What the caller stored with ``key`` (from the index: no file read)."""
        with self._lock:
            e = self._entries.get(key)
            return e.meta if e else None

    def get(self, key: str, device: torch.device | str = "cpu") -> EncodedKV | None:
        with self._lock:
            e = self._entries.get(key)
        if e is None:
            return None
        try:
            enc = self._read(e.path, key)
        except FileNotFoundError:
            self._forget(key, e, unlink=False)
            return None
        except (OSError, CorruptEntry) as err:
            log.warning("disk tier: entry %r is damaged (%s); treating it as a miss", key, err)
            self._forget(key, e, unlink=True)
            return None
        return enc.to(device)

    def _read(self, path: Path, key: str) -> EncodedKV:
        with open(path, "rb") as f:
            header, raw = _read_header(f)
            nbytes = int(header["nbytes"])
            payload = f.read(nbytes)
            tail = f.read(_SUM.size + 1)
        if header["key"] != key:
            raise CorruptEntry(f"file holds key {header['key']!r}")
        if len(payload) != nbytes or len(tail) != _SUM.size:
            raise CorruptEntry("truncated or oversized file")
        digest = xxhash.xxh64(raw)
        digest.update(payload)
        if digest.intdigest() != _SUM.unpack(tail)[0]:
            raise CorruptEntry("checksum mismatch")
        L, n, H, D = (int(x) for x in header["shape"])
        shape = KVShape(L, n, H, D, _dtype_from(header["dtype"]))
        return EncodedKV(header["codec"], shape, torch.frombuffer(bytearray(payload), dtype=torch.uint8))

    def _forget(self, key: str, entry: _Entry, unlink: bool) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
                self._used -= entry.size
        if unlink:
            entry.path.unlink(missing_ok=True)

    def delete(self, key: str) -> bool:
        with self._lock:
            e = self._entries.pop(key, None)
            if e is None:
                return False
            self._used -= e.size
        e.path.unlink(missing_ok=True)
        return True

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.capacity, len(self._entries))
