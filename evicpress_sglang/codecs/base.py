"""The codec interface: KV of a run of tokens <-> one compact byte blob.

A codec sees the KV of one cached context as two tensors ``k`` and ``v`` of shape
``[layers, tokens, kv_heads, head_dim]`` (SGLang's per-layer pool layout
``[tokens, kv_heads, head_dim]`` stacked over layers). It returns an :class:`EncodedKV`
whose payload is a single 1-D ``uint8`` tensor on the same device, so that moving
it between GPU, pinned host memory and disk is one copy, never one per layer or page.

Fixed-rate codecs (everything except entropy coding) describe their payload as a
list of :class:`Segment` s; the payload size then follows from the shape alone, which is
what the placement policy needs to plan before encoding anything.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

import torch

#: Every segment of a payload starts at a multiple of this many bytes, so views of
#: any dtype can be taken on it without copying.
SEGMENT_ALIGN = 16


class CodecError(ValueError):
    """A codec name or an encoded blob that cannot be used."""


@dataclass(frozen=True)
class KVShape:
    """The shape and dtype of the uncompressed KV of one context."""

    layers: int
    tokens: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def tensor_shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.tokens, self.heads, self.head_dim)

    @property
    def raw_nbytes(self) -> int:
        """Bytes of K and V together, uncompressed."""
        return 2 * math.prod(self.tensor_shape) * dtype_size(self.dtype)

    def with_tokens(self, tokens: int) -> "KVShape":
        return KVShape(self.layers, tokens, self.heads, self.head_dim, self.dtype)

    @classmethod
    def of(cls, k: torch.Tensor) -> "KVShape":
        if k.dim() != 4:
            raise CodecError(f"KV must be [layers, tokens, heads, head_dim], got shape {tuple(k.shape)}")
        return cls(*k.shape, dtype=k.dtype)


@dataclass
class EncodedKV:
    """A codec's output: the payload plus what is needed to decode it."""

    codec: str
    shape: KVShape
    payload: torch.Tensor  # 1-D uint8

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EncodedKV":
        return EncodedKV(self.codec, self.shape, self.payload.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class Segment:
    """One tensor inside a fixed-rate payload."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def dtype_size(dtype: torch.dtype) -> int:
    return dtype.itemsize  # no tensor allocated: sizes are computed per configuration on every insert


def _aligned(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


class KVCodec(ABC):
    """One compression method. Subclasses are stateless and cheap to construct."""

    #: Registry name, e.g. ``int4`` or ``int4+zstd``.
    name: str
    #: True when decode(encode(x)) == x bit for bit.
    lossless: bool
    #: True when :meth:`nbytes` is the exact payload size (no entropy coding).
    fixed_rate: bool = True

    @abstractmethod
    def nbytes(self, shape: KVShape) -> int:
        """Payload bytes for a context of this shape.

        Exact for fixed-rate codecs. For entropy-coded ones it is the size before entropy
        coding; the stored size is ``EncodedKV.nbytes``.
        """

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV:
        """Compress ``k`` and ``v`` ([layers, tokens, heads, head_dim]) on their device."""

    @abstractmethod
    def decode(self, enc: EncodedKV, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Reconstruct into caller-given tensors (shape ``enc.shape``), on their device."""

    def output_shape(self, shape: KVShape) -> KVShape:
        """Shape of the decoded KV: ``shape`` itself unless the codec drops tokens."""
        return shape

    @property
    def device_codec(self) -> "KVCodec":
        """The part of this codec that runs where the KV is (itself, unless it has a host stage)."""
        return self

    @property
    def has_host_stage(self) -> bool:
        return self.device_codec is not self

    def pack_host(self, enc: EncodedKV) -> EncodedKV:
        """The host stage of encoding, applied to :attr:`device_codec`'s output once it is in
        host memory (a tier does it off the scheduler thread); none by default."""
        return enc

    def unpack_host(self, enc: EncodedKV) -> EncodedKV:
        """Undo :meth:`pack_host` on host bytes; the result goes to :attr:`device_codec`."""
        return enc

    def ratio(self, shape: KVShape) -> float:
        """Compression ratio against the uncompressed KV (>1 means smaller)."""
        return shape.raw_nbytes / self.nbytes(shape)

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


class SegmentCodec(KVCodec):
    """A fixed-rate codec whose payload is a sequence of aligned tensors.

    Subclasses say which segments a shape needs, fill them in :meth:`encode_segments`
    and read them back in :meth:`decode_segments`; packing and size accounting live here
    once.
    """

    @abstractmethod
    def segments(self, shape: KVShape) -> list[Segment]:
        """The tensors the payload holds, in order."""

    @abstractmethod
    def encode_segments(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute every segment named by :meth:`segments`."""

    @abstractmethod
    def decode_segments(
        self, parts: dict[str, torch.Tensor], shape: KVShape, out_k: torch.Tensor, out_v: torch.Tensor
    ) -> None:
        """Reconstruct K and V from the segments into the output tensors."""

    def nbytes(self, shape: KVShape) -> int:
        """Memoised apart from :meth:`layout`: the policy sizes every enabled configuration at
        each insert and split, each at a new token count, and that should neither build layouts
        nor push out of their cache the ones stores and load-backs use."""
        return _nbytes(self, shape)

    def layout(self, shape: KVShape) -> Layout:
        """Where the segments of this shape's payload sit. Memoised per (codec, shape): a store
        or load-back on SGLang's scheduler thread asks for it several times (sizes, checks,
        kernel arguments), and building it each time was most of their Python cost."""
        return _layout(self, shape)

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV:
        shape = KVShape.of(k)
        if v.shape != k.shape or v.dtype != k.dtype:
            raise CodecError(f"K {tuple(k.shape)}/{k.dtype} and V {tuple(v.shape)}/{v.dtype} differ")
        parts = self.encode_segments(k, v)
        chunks = []
        for seg in self.segments(shape):
            t = parts[seg.name]
            assert t.dtype == seg.dtype and tuple(t.shape) == seg.shape, (seg, t.dtype, t.shape)
            flat = t.contiguous().view(torch.uint8).reshape(-1)
            chunks.append(flat)
            pad = _aligned(seg.nbytes) - seg.nbytes
            if pad:
                chunks.append(torch.zeros(pad, dtype=torch.uint8, device=k.device))
        payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=k.device)
        return EncodedKV(self.name, shape, payload)

    def offsets(self, shape: KVShape) -> Mapping[str, tuple[int, Segment]]:
        """Byte offset of every segment in the payload, by name, in payload order."""
        return self.layout(shape).offsets

    def views(self, payload: torch.Tensor, shape: KVShape) -> dict[str, torch.Tensor]:
        """Every segment of ``payload`` as a typed view of its shape (no copy)."""
        return {name: payload[at : at + seg.nbytes].view(seg.dtype).view(seg.shape)
                for name, (at, seg) in self.offsets(shape).items()}

    def zero_padding(self, payload: torch.Tensor, shape: KVShape) -> None:
        """Zero the gaps after the segments, as :meth:`encode` does, for writers that fill the
        segments of a fresh payload in place (the fused kernels)."""
        for start, end in self.layout(shape).padding:
            payload[start:end].zero_()

    def decode(self, enc: EncodedKV, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        check_decodable(self, enc, out_k, out_v)
        self.decode_segments(self.views(enc.payload.to(out_k.device), enc.shape), enc.shape, out_k, out_v)


@dataclass(frozen=True)
class Layout:
    """The segments of one codec's payload for one shape, in payload order."""

    #: Each segment's byte offset, by name.
    offsets: Mapping[str, tuple[int, Segment]]
    #: The bytes each one takes with its padding: ``payload.split_with_sizes(sizes)`` cuts a
    #: payload into its segments in one call (the fused kernels get each one as a pointer).
    sizes: tuple[int, ...]
    #: (start, end) of every run of padding bytes.
    padding: tuple[tuple[int, int], ...]


@lru_cache(maxsize=1024)  # ints: codecs x recent context lengths; the codecs held are the registry's
def _nbytes(codec: SegmentCodec, shape: KVShape) -> int:
    return sum(_padded_sizes(codec.segments(shape)))


def _padded_sizes(segments: list[Segment]) -> tuple[int, ...]:
    """The bytes each segment takes in a payload, its padding to SEGMENT_ALIGN included."""
    return tuple(_aligned(seg.nbytes) for seg in segments)


@lru_cache(maxsize=256)  # a few codecs x recent context lengths; the codecs held are the registry's
def _layout(codec: SegmentCodec, shape: KVShape) -> Layout:
    segments = codec.segments(shape)
    sizes = _padded_sizes(segments)
    starts = tuple(itertools.accumulate(sizes, initial=0))
    return Layout(offsets=MappingProxyType({seg.name: (at, seg) for seg, at in zip(segments, starts)}), sizes=sizes,
                  padding=tuple((at + seg.nbytes, at + size) for seg, at, size in zip(segments, starts, sizes)
                                if size > seg.nbytes))


def check_blob(codec: KVCodec, enc: EncodedKV) -> None:
    """Refuse blobs of another codec or the wrong size: a bad entry must be a miss, never
    silently wrong KV."""
    if enc.codec != codec.name:
        raise CodecError(f"blob was written by codec {enc.codec!r}, not {codec.name!r}")
    if enc.payload.dtype != torch.uint8 or enc.payload.dim() != 1:
        raise CodecError("payload must be a 1-D uint8 tensor")
    if codec.fixed_rate and enc.nbytes != codec.nbytes(enc.shape):
        raise CodecError(f"payload has {enc.nbytes} bytes, codec {codec.name} expects {codec.nbytes(enc.shape)}")


def check_decodable(codec: KVCodec, enc: EncodedKV, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
    """:func:`check_blob`, and outputs of the shape and dtype the blob decodes to."""
    check_blob(codec, enc)
    want = codec.output_shape(enc.shape)
    for name, out in (("out_k", out_k), ("out_v", out_v)):
        if tuple(out.shape) != want.tensor_shape or out.dtype != want.dtype:
            raise CodecError(f"{name} is {tuple(out.shape)}/{out.dtype}, blob decodes to {want.tensor_shape}/{want.dtype}")
