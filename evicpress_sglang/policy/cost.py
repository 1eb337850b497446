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
from dataclasses import asdict, dataclass, field

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


class PrefillFit:
    """``seconds = overhead + per_token * tokens`` fitted to measured prefill batches.

    A dropped context costs its re-prefill *on top of* a request that is prefilled anyway,
    so the policy needs the marginal cost per token, the slope. Dividing a batch's time
    by its tokens would charge the fixed per-batch overhead (kernel launches, sampling:
    ~20 ms on an H100 without CUDA graphs) to every token, and a one-token extend would
    then claim 20 ms per token. Least squares with exponential forgetting (``half_life``
    observations) follows drifts; until the observed sizes spread by ``min_spread``
    tokens the slope is not identifiable and :meth:`per_token` says so with ``None``.
    """

    def __init__(self, half_life: float = 200.0, min_spread: float = 64.0) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self.min_spread = min_spread
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not seconds > 0:
            return
        d = self.decay
        self.w = self.w * d + 1.0
        self.x = self.x * d + tokens
        self.y = self.y * d + seconds
        self.xx = self.xx * d + tokens * tokens
        self.xy = self.xy * d + tokens * seconds

    def per_token(self) -> float | None:
        """The fitted seconds per token, or None while it cannot be told from overhead."""
        if self.w < 2:
            return None
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var < self.min_spread ** 2:
            return None
        slope = (self.xy / self.w - mx * my) / var
        return slope if slope > 0 else None


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
