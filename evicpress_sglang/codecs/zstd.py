"""``<codec>+zstd``: lossless entropy coding of another codec's payload.

zstd runs on the CPU, so it is this codec's *host stage* (:meth:`pack_host`): the inner
codec runs on the GPU and the tier entropy-codes the bytes once they are in host memory
(the disk tier on its writer thread). It is worth its CPU time on the disk tier (1.2 GB/s
on the reference H100 host), rarely in host memory (53 GB/s).
"""

from __future__ import annotations

import torch
import zstandard

from .base import CodecError, EncodedKV, KVCodec, KVShape, check_decodable

LEVEL = 3  # zstd's default: >300 MB/s per core; higher levels cost far more CPU for little gain on KV


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
        packed = zstandard.ZstdCompressor(level=self.level, write_checksum=True).compress(enc.payload.numpy())
        return EncodedKV(self.name, enc.shape, torch.frombuffer(bytearray(packed), dtype=torch.uint8))

    def unpack_host(self, enc: EncodedKV) -> EncodedKV:
        if enc.codec != self.name:
            raise CodecError(f"blob was written by codec {enc.codec!r}, not {self.name!r}")
        expected = self.inner.nbytes(enc.shape)
        try:
            raw = zstandard.ZstdDecompressor().decompress(enc.payload.numpy(), max_output_size=expected)
        except zstandard.ZstdError as e:
            raise CodecError(f"corrupt zstd payload: {e}") from e
        if len(raw) != expected:
            raise CodecError(f"zstd payload inflated to {len(raw)} bytes, expected {expected}")
        return EncodedKV(self.inner.name, enc.shape, torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    def decode(self, enc: EncodedKV, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        check_decodable(self, enc, out_k, out_v)
        raw = self.unpack_host(enc.to("cpu"))
        self.inner.decode(raw.to(out_k.device), out_k, out_v)
