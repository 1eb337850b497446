"""``<codec>+zstd``: lossless entropy coding of another codec's payload.

zstd runs on the CPU, so it is this codec's *host stage* (:meth:`pack_host`): the inner
codec runs on the GPU and the tier entropy-codes the bytes once they are in host memory
(the disk tier on its writer thread). It is worth its CPU time on the disk tier (1.2 GB/s
on the reference H100 host), rarely in host memory (53 GB/s).

One zstd frame decodes on one core at 0.3-0.8 GB/s, slower than the disk, so a payload is
cut into :data:`CHUNK` -byte pieces, each its own frame, and the frames are coded and
decoded on :data:`THREADS` threads at once (zstd releases the GIL): the host's cores, not
one, set the speed. The payload starts with :data:`MAGIC`, the frame count and each
frame's size; a payload without it is one frame (blobs written before chunking).
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import torch
import zstandard

from .base import CodecError, EncodedKV, KVCodec, KVShape, check_decodable

LEVEL = 3  # zstd's default: >300 MB/s per core; higher levels cost far more CPU for little gain on KV
MAGIC = b"EVZC"  # not a zstd frame's magic (28 B5 2F FD)
CHUNK = 4 << 20  # bytes of payload per frame: enough to keep zstd's ratio, small enough to spread
THREADS = max(1, min(16, os.cpu_count() or 1))
_POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="evicpress-zstd")


def compress(data: memoryview, level: int = LEVEL) -> bytes:
    """``data`` as independent zstd frames, coded in parallel, behind their sizes."""
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [data]
    frames = list(_POOL.map(lambda c: zstandard.ZstdCompressor(level=level, write_checksum=True).compress(c),
                            chunks))
    return b"".join([MAGIC, struct.pack(f"<I{len(frames)}Q", len(frames), *map(len, frames)), *frames])


def decompress(data: memoryview, expected: int) -> torch.Tensor:
    """The ``expected`` bytes :func:`compress` (or one plain zstd frame) holds, as a uint8
    tensor; frames in parallel, each written straight into its place (no second copy)."""
    if bytes(data[:4]) != MAGIC:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    try:
        (count,) = struct.unpack_from("<I", data, 4)
        sizes = struct.unpack_from(f"<{count}Q", data, 8)
    except struct.error as e:
        raise zstandard.ZstdError(f"truncated frame index: {e}") from e
    starts = [8 + 8 * count]
    for n in sizes:
        starts.append(starts[-1] + n)
    if starts[-1] != len(data) or count != max(1, -(-expected // CHUNK)):
        raise zstandard.ZstdError(f"frame index ({count} frames, {starts[-1]} bytes) does not fit a payload of "
                                  f"{len(data)} bytes inflating to {expected}")
    out = torch.empty(expected, dtype=torch.uint8)
    view = memoryview(out.numpy()).cast("B")

    def one(i: int) -> None:
        part = view[i * CHUNK : min((i + 1) * CHUNK, expected)]
        got = 0
        with zstandard.ZstdDecompressor().stream_reader(data[starts[i] : starts[i + 1]]) as frame:
            while got < len(part):
                n = frame.readinto(part[got:])
                if n == 0:
                    break
                got += n
            if got != len(part) or frame.read(1):
                raise zstandard.ZstdError(f"frame {i} does not inflate to its {len(part)} bytes")

    for _ in _POOL.map(one, range(count)):
        pass
    return out


class ZstdCodec(KVCodec):
    fixed_rate = False

    def __init__(self, inner: KVCodec, level: int = LEVEL) -> None:
        self.inner = inner
        self.level = level
        self.name = f"{inner.name}+zstd"
        self.lossless = inner.lossless

    def nbytes(self, shape: KVShape) -> int:
        return self.inner.nbytes(shape)

    def output_shape(self, shape: KVShape) -> KVShape:
        return self.inner.output_shape(shape)

    @property
    def device_codec(self) -> KVCodec:
        return self.inner

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV:
        return self.pack_host(self.inner.encode(k, v).to("cpu"))

    def pack_host(self, enc: EncodedKV) -> EncodedKV:
        if enc.codec != self.inner.name:
            raise CodecError(f"{self.name} packs {self.inner.name} blobs, not {enc.codec}")
        packed = compress(memoryview(enc.payload.numpy()).cast("B"), self.level)
        return EncodedKV(self.name, enc.shape, torch.frombuffer(bytearray(packed), dtype=torch.uint8))

    def unpack_host(self, enc: EncodedKV) -> EncodedKV:
        if enc.codec != self.name:
            raise CodecError(f"blob was written by codec {enc.codec!r}, not {self.name!r}")
        expected = self.inner.nbytes(enc.shape)
        try:
            raw = decompress(memoryview(enc.payload.numpy()).cast("B"), expected)
        except zstandard.ZstdError as e:
            raise CodecError(f"corrupt zstd payload: {e}") from e
        if raw.numel() != expected:
            raise CodecError(f"zstd payload inflated to {raw.numel()} bytes, expected {expected}")
        return EncodedKV(self.inner.name, enc.shape, raw)

    def decode(self, enc: EncodedKV, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        check_decodable(self, enc, out_k, out_v)
        raw = self.unpack_host(enc.to("cpu"))
        self.inner.decode(raw.to(out_k.device), out_k, out_v)
