"""How long loading a context takes in each configuration, from measured rates.

TTFT contribution of a hit on a context of ``n`` tokens, per configuration::

    GPU:        gpu_s_per_token * n
    host/disk/remote:  latency_tier + stored_bytes / bandwidth_tier + raw_bytes / decode_rate[codec]
    dropped:    prefill_s_per_token * n

which is the paper's ``A_tier * tokens * size_fraction + B_tier``. Every rate is a
measurement: :func:`calibrate` times tier copies and codec decodes on this machine,
and the SGLang backend refines ``prefill_s_per_token`` from the server's own prefills
(:class:`PrefillFit`). The defaults are the reference H100 figures.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..codecs import KVShape, get_codec
from ..timing import best_seconds
from .configs import Config, Tier

GB = 1e9


def _base(codec: str) -> str:
    """The codec without its lossless host stage: what runs on the GPU."""
    return codec.removesuffix("+zstd")


#: Decode throughput, bytes of *uncompressed* KV per second, until measured: what
#: ``evicpress-sglang codecs --device cuda`` measured on the reference H100
#: (bench/results/2026-11-22-gpu-smoke/codecs_cuda.json, SmolLM2 KV, 4096 tokens).
DEFAULT_DECODE_RATE = {"fp8": 175 * GB, "int8": 185 * GB, "int4": 100 * GB, "int2": 94 * GB}


@dataclass
class CostModel:
    host_bw: float = 53 * GB  # pinned host -> GPU, bytes/s
    disk_bw: float = 1.2 * GB  # disk -> host, bytes/s
    host_latency: float = 1e-4  # s per load
    disk_latency: float = 1e-3
    #: a remote store shared by servers (Mooncake over TCP); replaced by the store's own
    #: probe (:meth:`~evicpress_sglang.tiers.remote.MooncakeTier.probe`) when one is configured
    remote_bw: float = 1.0 * GB
    remote_latency: float = 2e-3
    prefill_s_per_token: float = 27e-6  # 8B-class model on an H100 (786 TFLOP/s estimate)
    gpu_s_per_token: float = 0.0  # a GPU hit costs no load
    #: decode throughput per base codec, bytes of uncompressed KV per second
    decode_rate: dict[str, float] = field(default_factory=dict)
    #: zstd decompression, bytes of output per second (one CPU core of the reference H100
    #: host decompressed bf16/int4 payloads at 0.3-0.4 GB/s)
    zstd_bps: float = 0.35 * GB
    #: how much smaller zstd makes each base codec's payload (>= 1)
    zstd_gain: dict[str, float] = field(default_factory=dict)
    default_zstd_gain: float = 1.05  # conservative until measured

    def stored_nbytes(self, codec: str, shape: KVShape) -> int:
        """Bytes a context occupies under ``codec``: exact, or estimated for zstd."""
        c = get_codec(codec)
        if c.fixed_rate:
            return c.nbytes(shape)
        return int(c.nbytes(shape) / self.zstd_gain.get(_base(codec), self.default_zstd_gain))

    def decode_s_per_raw_byte(self, codec: str, layout: KVShape) -> float:
        """Seconds of decoding per byte of uncompressed KV (GPU dequant + CPU zstd)."""
        base = _base(codec)
        if base in self.decode_rate:
            s = 1.0 / self.decode_rate[base]
        else:  # unmeasured: the quantizer's reference rate over the tokens it keeps
            ref = layout.with_tokens(1024)
            device_codec = get_codec(base)
            kept = device_codec.output_shape(ref).tokens / ref.tokens
            quantizer = getattr(device_codec, "inner", device_codec).name  # a dropping codec's quantizer
            s = 0.0 if quantizer == "bf16" else kept / DEFAULT_DECODE_RATE.get(quantizer, 100 * GB)
        if codec.endswith("+zstd"):
            ref = layout.with_tokens(1024)
            s += get_codec(base).nbytes(ref) / ref.raw_nbytes / self.zstd_bps
        return s

    def load_terms(self, config: Config, layout: KVShape) -> tuple[float, float, float]:
        """``(seconds, seconds per stored byte, seconds per token)`` of loading from ``config``:
        the load time of ``n`` tokens stored in ``b`` bytes is ``seconds + b * per_byte + n * per_token``.
        Splitting it this way lets the policy price every context in three array operations."""
        if config.tier in (Tier.GPU, Tier.DROP):
            return 0.0, 0.0, self.gpu_s_per_token if config.tier == Tier.GPU else self.prefill_s_per_token
        bw, lat = {Tier.HOST: (self.host_bw, self.host_latency), Tier.DISK: (self.disk_bw, self.disk_latency),
                   Tier.REMOTE: (self.remote_bw, self.remote_latency)}[config.tier]
        return lat, 1.0 / bw, self.decode_s_per_raw_byte(config.codec, layout) * layout.with_tokens(1).raw_nbytes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        return cls(**json.loads(text))


#: no forward pass is shorter: a time below it is a measurement error, and one would pull the bound to 0
MIN_BATCH_S = 1e-5
#: request counts up to this are classes of their own (see :class:`PrefillFit`)
EXACT_REQUESTS = 8


class PrefillFit:
    """The marginal prefill cost per token, learnt from the server's recent prefill batches.

    A dropped context costs its re-prefill *on top of* a request that is prefilled anyway,
    so the policy needs the slope of ``seconds = overhead + per_token * tokens``, not a
    batch's time over its tokens (which charges the per-batch overhead, ~20 ms on an H100
    without CUDA graphs, to every token). Batch times are hard to fit naively:

    * their noise is one-sided: work overlapping a batch (stores, copies, the host's other
      threads) slows it, nothing speeds it up;
    * on a small, launch-bound model the slope is a few percent of a batch's time, and a
      batch's time grows with its *requests* as much as with its tokens: the profiler's
      16 short questions in one batch take longer than one 2k-token document.

    A least-squares fit through that found no positive slope for whole runs on SmolLM2,
    and the policy kept its 27 us/token prior, 40x the real cost, storing every context it
    should have dropped (``bench/results/2026-12-02-profiler-pressure-after-split``).
    So the recent ``window`` batches are grouped by size class (log2 of tokens) *within*
    request-count classes (the exact count up to ``EXACT_REQUESTS``, log2 above: with 4-7
    requests in one class, batches of more requests also have more tokens, and their
    per-request cost would become slope), each group
    is represented by a low quantile of its times and of its sizes (a batch of that size
    when nothing slowed it), and the slope is the median
    of the slopes between groups of equal request counts (Theil-Sen). Two guards keep it
    sane: it never exceeds :meth:`bound` (overhead is not negative, so seconds / tokens of
    any group is at least the slope), and never falls below ``floor_share`` of that bound
    (a slope lost in noise is priced at a tenth of the tightest bound, not at zero).
    """

    def __init__(self, window: int = 512, quantile: float = 0.25, min_per_group: int = 3,
                 floor_share: float = 0.1, refit_every: int = 8) -> None:
        self.obs: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.quantile = quantile
        self.min_per_group = min_per_group
        self.floor_share = floor_share
        self.refit_every = refit_every
        self._since_fit = 0
        self._fit: tuple[float | None, float | None] = (None, None)

    def add(self, tokens: int, seconds: float, requests: int = 1) -> None:
        if tokens <= 0 or not MIN_BATCH_S <= seconds < math.inf:  # no forward pass takes less
            return
        self.obs.append((int(tokens), max(1, int(requests)), float(seconds)))
        self._since_fit += 1

    def _groups(self) -> list[tuple[int, float, float]]:
        """``(request class, tokens, seconds)`` per group with enough batches: the same low
        quantile of both, so that without noise the pair lies on the line (times grow with
        tokens inside a group)."""
        if not self.obs:
            return []
        a = np.array(self.obs, dtype=np.float64)
        tokens, requests, seconds = a[:, 0], a[:, 1], a[:, 2]
        size_class = np.floor(np.log2(tokens)).astype(np.int64)
        request_class = np.where(requests <= EXACT_REQUESTS, requests,
                                 EXACT_REQUESTS + np.floor(np.log2(np.maximum(requests, 1)))).astype(np.int64)
        keys = request_class * 64 + size_class  # size classes < 64: tokens < 2**64
        out = []
        for key in np.unique(keys):
            members = keys == key
            if members.sum() >= self.min_per_group:
                out.append((int(key // 64), float(np.quantile(tokens[members], self.quantile)),
                            float(np.quantile(seconds[members], self.quantile))))
        return out

    def _refit(self) -> tuple[float | None, float | None]:
        if self._since_fit >= self.refit_every or self._fit == (None, None):
            groups = self._groups()
            bound = min((s / n for _, n, s in groups), default=None)
            slopes = [(s2 - s1) / (n2 - n1) for i, (r1, n1, s1) in enumerate(groups)
                      for r2, n2, s2 in groups[i + 1:] if r1 == r2 and n2 != n1]
            fit = None
            if slopes and bound is not None:
                fit = min(bound, max(float(np.median(slopes)), self.floor_share * bound))
            self._fit = (fit, bound)
            self._since_fit = 0
        return self._fit

    def per_token(self) -> float | None:
        """The fitted seconds per token, or None until batches of two sizes (with the same
        number of requests) have been seen often enough to tell slope from overhead."""
        return self._refit()[0]

    def bound(self) -> float | None:
        """An upper bound of the seconds per token (the least time per token of any size
        group), known from the first group on; None before."""
        return self._refit()[1]


def _rate(nbytes: int, fn, repeats: int = 3) -> float:
    return nbytes / best_seconds(fn, repeats)


def calibrate(
    codecs: list[str], shape: KVShape, device: str | None = None, disk_dir: str | None = None, base: CostModel | None = None
) -> CostModel:
    """Measure decode rates and zstd gains on KV-like data, and host/disk bandwidth here.

    ``shape`` should be a realistic context (e.g. 8 layers x 4096 tokens of the served
    model); the KV is synthetic but shaped like the model's, which is what rates depend on.
    """
    import os
    import tempfile

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = base or CostModel()
    g = torch.Generator(device="cpu").manual_seed(0)
    k = (torch.randn(shape.tensor_shape, generator=g) * 2).to(device=device, dtype=shape.dtype)
    v = torch.randn(shape.tensor_shape, generator=g).to(device=device, dtype=shape.dtype)
    for name in codecs:
        codec = get_codec(name)
        enc = codec.encode(k, v)
        out_k = torch.empty(codec.output_shape(shape).tensor_shape, dtype=shape.dtype, device=device)
        out_v = torch.empty_like(out_k)
        if codec.fixed_rate:
            if name != "bf16":
                model.decode_rate[name] = _rate(shape.raw_nbytes, lambda: codec.decode(enc, out_k, out_v))
            continue
        # zstd: its own speed on this host's CPUs (bytes out per second) and how much it saves
        inner = codec.inner.encode(k, v).payload.cpu()
        model.zstd_bps = _rate(inner.numel(), lambda: codec.unpack_host(enc))
        model.zstd_gain[_base(name)] = max(1.0, inner.numel() / enc.payload.numel())
    if device == "cuda":
        host = torch.empty(shape.raw_nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty_like(host, device=device)
        model.host_bw = _rate(host.numel(), lambda: dev.copy_(host, non_blocking=True))
    if disk_dir:
        blob = os.urandom(min(shape.raw_nbytes, 256 << 20))
        with tempfile.NamedTemporaryFile(dir=disk_dir) as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

            def read() -> None:
                # Drop the page cache for this file where the OS lets us, so we time the disk.
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                with open(f.name, "rb") as r:
                    r.read()

            model.disk_bw = _rate(len(blob), read)
    return model
