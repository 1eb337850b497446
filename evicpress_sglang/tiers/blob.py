"""The self-describing, checksummed blob format that the disk and remote tiers store.

Layout (little endian)::

    b"EVICKV01" | u32 header_len | header (JSON: key, codec, shape, dtype, nbytes, meta) | payload | u64 xxh64

The checksum covers header and payload, and the header names the key the blob was
stored under, so a truncated, damaged or foreign blob (another key's, another program's
bytes) is recognised as such and becomes a miss instead of wrong KV. Both tiers use this
one module so that a blob written by one reads the same in the other.
"""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

import numpy as np
import torch
import xxhash

from ..codecs import EncodedKV, KVShape

MAGIC = b"EVICKV01"
_LEN = struct.Struct("<I")
_SUM = struct.Struct("<Q")
PREFIX_SIZE = len(MAGIC) + _LEN.size


class CorruptEntry(ValueError):
    """A blob that must not be used."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptEntry(f"unknown dtype {name!r}")
    return dtype


def encode_header(key: str, enc: EncodedKV, meta: dict | None) -> bytes:
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


def blob_size(header_len: int, nbytes: int) -> int:
    """Bytes of a whole blob with a header of ``header_len`` and a payload of ``nbytes``."""
    return PREFIX_SIZE + header_len + nbytes + _SUM.size


def frame(key: str, enc: EncodedKV, meta: dict | None) -> tuple[bytes, np.ndarray, bytes]:
    """The blob of host-resident ``enc`` in three parts (prefix with header, payload, checksum),
    so that writers can send the payload without first copying it into one buffer."""
    header = encode_header(key, enc, meta)
    payload = enc.payload.numpy()
    digest = xxhash.xxh64(header)
    digest.update(payload)
    return MAGIC + _LEN.pack(len(header)) + header, payload, _SUM.pack(digest.intdigest())


def _header_len(prefix: bytes | memoryview) -> int:
    if bytes(prefix[: len(MAGIC)]) != MAGIC:
        raise CorruptEntry("bad magic")
    if len(prefix) < PREFIX_SIZE:
        raise CorruptEntry("truncated header length")
    return _LEN.unpack(prefix[len(MAGIC) : PREFIX_SIZE])[0]


def _parse_header(raw: bytes | memoryview) -> dict:
    try:
        header = json.loads(bytes(raw))
        _ = (header["key"], header["codec"], header["shape"], header["dtype"], int(header["nbytes"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"unreadable header: {e}") from e
    return header


def read_header(f: BinaryIO) -> tuple[dict, bytes]:
    """The header of the blob that ``f`` is positioned at, and its raw bytes; ``f`` is left
    at the payload. Reads only the header (the disk tier indexes files this way)."""
    hlen = _header_len(f.read(PREFIX_SIZE))
    raw = f.read(hlen)
    if len(raw) != hlen:
        raise CorruptEntry("truncated header")
    return _parse_header(raw), raw


def decode(buf: bytes | bytearray | memoryview, key: str) -> tuple[EncodedKV, dict | None]:
    """The :class:`EncodedKV` and caller meta of the whole blob ``buf``, which must have been
    stored under ``key``. Raises :class:`CorruptEntry` for anything else. The payload shares
    ``buf``'s memory when ``buf`` is writable, else it is copied once."""
    view = memoryview(buf).cast("B")
    hlen = _header_len(view[:PREFIX_SIZE])
    raw = view[PREFIX_SIZE : PREFIX_SIZE + hlen]
    if len(raw) != hlen:
        raise CorruptEntry("truncated header")
    header = _parse_header(raw)
    if header["key"] != key:
        raise CorruptEntry(f"blob holds key {header['key']!r}")
    nbytes = int(header["nbytes"])
    if len(view) != blob_size(hlen, nbytes):
        raise CorruptEntry("truncated or oversized blob")
    start = PREFIX_SIZE + hlen
    payload = view[start : start + nbytes]
    digest = xxhash.xxh64(raw)
    digest.update(payload)
    if digest.intdigest() != _SUM.unpack(view[start + nbytes :])[0]:
        raise CorruptEntry("checksum mismatch")
    try:
        L, n, H, D = (int(x) for x in header["shape"])
    except (TypeError, ValueError) as e:
        raise CorruptEntry(f"bad shape {header['shape']!r}") from e
    shape = KVShape(L, n, H, D, _dtype_from(header["dtype"]))
    if view.readonly:
        payload = bytearray(payload)
    data = torch.frombuffer(payload, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return EncodedKV(header["codec"], shape, data), header.get("meta")
