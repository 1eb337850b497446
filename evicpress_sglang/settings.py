"""EVICPRESS settings for a server, from one place: the ``EVICPRESS_CONFIG`` variable.

``EVICPRESS_CONFIG`` holds JSON, or the path of a JSON file, e.g.::

    EVICPRESS_CONFIG='{"host_bytes": "8GiB", "disk_dir": "/nvme/evicpress", "disk_bytes": "200GiB"}'

An environment variable reaches every SGLang process (the scheduler runs in a child
process and receives only SGLang's own arguments), so it is the one way settings travel.
``evicpress-sglang serve --evicpress-host-bytes 8GiB ...`` writes it for you. Every value
is checked when the cache is built: a bad one stops the server at start-up with a message
naming the setting.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .codecs import CodecError, get_codec
from .policy import PolicyError, Weights
from .units import parse_bytes

ENV = "EVICPRESS_CONFIG"
POLICY_NAMES = ("evicpress", "lru", "lru-offload", "off")
#: Codecs offered by default: every quantizer in host memory and on disk, plus one
#: entropy-coded variant. zstd decodes on one CPU core at ~0.35 GB/s (measured on the
#: reference H100 host), slower than the disk's 1.2 GB/s, so it only pays when disk space,
#: not bandwidth, is short; the cost model weighs that per context.
DEFAULT_HOST_CODECS = ("bf16", "fp8", "int8", "int4", "int2")
DEFAULT_DISK_CODECS = ("bf16", "int8", "int4", "int2", "int4+zstd")
#: A remote store over TCP moves about as fast as a disk, so it gets the disk's choices.
DEFAULT_REMOTE_CODECS = DEFAULT_DISK_CODECS


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclass
class Settings:
    policy: str = "evicpress"  # evicpress | lru | lru-offload | static:<codec> | off
    alpha: float = 2.0  # seconds of TTFT one unit of quality is worth
    quality_floor: float = 0.9
    half_life_s: float = 600.0  # of the decayed hit counter
    host_bytes: int = 4 * 2**30
    disk_dir: str | None = None  # no disk tier when unset
    disk_bytes: int = 0
    #: Freed memory the scheduler process's heap may keep (glibc), so the placement solver's
    #: large temporaries are not page-faulted in again on every re-plan; 0 = glibc's defaults.
    keep_freed_heap_bytes: int = 256 * 2**20
    host_codecs: list[str] = field(default_factory=lambda: list(DEFAULT_HOST_CODECS))
    disk_codecs: list[str] = field(default_factory=lambda: list(DEFAULT_DISK_CODECS))
    remote_codecs: list[str] = field(default_factory=lambda: list(DEFAULT_REMOTE_CODECS))
    admin_key: str | None = None  # required by POST /evicpress/policy when set (else SGLang's --api-key)
    status_top: int = 20  # contexts listed in /evicpress/status
    held_out_queries: int = 4  # per context, a sample of the queries that reused it (for the quality profiler)
    #: Quality profiler: the share of GPU time its batches may take (0 = no background
    #: profiling; POST /evicpress/profile still works), the score the policy uses, the length
    #: of the reference answers, when a profile is old, and the fewest tokens of its own (not
    #: counting its ancestors') a context needs to be worth a job.
    profile_share: float = 0.05
    profile_score: str = "top1"  # top1 | likelihood | f1 | similarity (see profiler.runner)
    profile_answer_tokens: int = 24
    profile_max_age_s: float = 1800.0
    profile_min_tokens: int = 128
    #: Share of the GPU KV pool the profiler's degraded copies may hold at once; to stage one
    #: the cache frees room as for a user request (idle copies, then the policy's demotions),
    #: so this bounds what profiling takes from user traffic. Larger contexts are not profiled;
    #: one whose KV is not exact on the GPU is recomputed beside its copy and needs twice its size.
    profile_reserve: float = 0.05
    #: Questions the served model writes about a context nobody has reused yet, so it can be
    #: profiled before its first reuse (as the paper did with a large model); 0 = off.
    profile_self_questions: int = 0
    #: seconds per token to re-prefill a dropped context; unset = learnt from the server's prefills.
    #: Pinning it lets a small model stand in for a large one in policy studies.
    prefill_s_per_token: float | None = None
    verify: bool = False  # debug: fingerprint node KV at insert, check it at eviction and after load-back
    #: False only to measure what wrong positions cost: requests continuing a token-dropped
    #: context then take positions that follow the kept tokens instead of the original length.
    shift_positions: bool = True
    #: The file ``evicpress-sglang query-model`` writes for the served model; needed by the
    #: query-aware dropping selectors (``expected:<r>``, ``kvzip:<r>``).
    query_model: str | None = None
    #: A store shared with other servers (``{"backend": "mooncake", ...}``, see
    #: :func:`evicpress_sglang.tiers.make_remote_tier`): the tier after disk (the policy may
    #: place contexts there under ``remote_codecs``), every context this server stores is
    #: published there too, and a request that continues a context another server published
    #: loads it from there instead of prefilling it. None: no remote tier, nothing shared.
    remote: dict | None = None
    #: Hot path (see the README): from this many contexts on, placement is planned in a
    #: background thread and an eviction applies the ready plan for at most
    #: ``evict_budget_ms`` before falling back to dropping least recently used contexts;
    #: null = always plan synchronously inside the eviction (as under TP, always).
    async_plan_min_contexts: int | None = 4096
    evict_budget_ms: float = 1.0

    @property
    def active_disk_codecs(self) -> list[str]:
        """The disk codecs in use: none without a disk tier."""
        return self.disk_codecs if self.disk_dir else []

    @property
    def active_remote_codecs(self) -> list[str]:
        """The remote codecs in use: none without a remote store."""
        return self.remote_codecs if self.remote else []

    @property
    def stored_codecs(self) -> list[str]:
        """Every codec a context may be stored with on this server, host first, no repeats."""
        return list(dict.fromkeys(self.host_codecs + self.active_disk_codecs + self.active_remote_codecs))

    @property
    def weights(self) -> Weights:
        return Weights(self.alpha, self.quality_floor)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["admin_key"] = "***" if self.admin_key else None
        return d


def whole_number(name: str, value, lo: int) -> int:
    """``value`` if it is an integer >= ``lo`` (JSON ``true`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise SettingsError(f"{name}: expected a whole number >= {lo}, got {value!r}")
    return value


def _real(name: str, value, ok, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise SettingsError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def _coerce(name: str, value):
    if name in ("host_bytes", "disk_bytes", "keep_freed_heap_bytes"):
        try:
            return parse_bytes(value, name)
        except ValueError as e:
            raise SettingsError(str(e)) from None
    if name in ("alpha", "quality_floor", "half_life_s"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}: expected a number, got {value!r}") from None
    if name == "prefill_s_per_token" and value is not None:
        return _real(name, value, lambda v: 0 < v < 1, "seconds per token in (0, 1) or null")
    if name == "async_plan_min_contexts" and value is not None:
        return whole_number(name, value, 0)
    if name == "evict_budget_ms":
        return _real(name, value, lambda v: 0 < v <= 1000, "milliseconds in (0, 1000] that an eviction may spend "
                     "applying the background plan")
    if name in ("verify", "shift_positions"):
        if not isinstance(value, bool):
            raise SettingsError(f"{name}: expected true or false, got {value!r}")
        return value
    if name == "profile_share":
        return _real(name, value, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    if name == "profile_reserve":
        return _real(name, value, lambda v: 0 <= v < 1, "a share of the pool in [0, 1)")
    if name == "profile_max_age_s":
        return _real(name, value, lambda v: v > 0, "a number in (0, inf)")
    if name == "profile_score":
        from .profiler.runner import SCORES

        if value not in SCORES:
            raise SettingsError(f"{name}: expected one of {', '.join(SCORES)}, got {value!r}")
        return value
    if name in ("profile_answer_tokens", "profile_min_tokens"):
        return whole_number(name, value, 1)
    if name in ("status_top", "held_out_queries", "profile_self_questions"):
        return whole_number(name, value, 0)
    if name in ("host_codecs", "disk_codecs", "remote_codecs"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"{name}: expected a list of codec names, got {value!r}")
        return value
    if name == "remote":
        if value is not None and (not isinstance(value, dict) or value.get("backend") != "mooncake"):
            raise SettingsError(f'{name}: expected null or an object with "backend": "mooncake", got {value!r}')
        return value
    if value is not None and not isinstance(value, str):
        raise SettingsError(f"{name}: expected a string, got {value!r}")
    return value


def validate_policy_name(name: str, settings: "Settings") -> None:
    if name in POLICY_NAMES:
        return
    if name.startswith("static:"):
        codec = name.removeprefix("static:")
        if codec in settings.stored_codecs:
            return
        raise SettingsError(f"policy {name!r}: codec {codec!r} is not among the enabled host/disk/remote codecs")
    raise SettingsError(f"policy: unknown policy {name!r}; valid: evicpress, lru, lru-offload, static:<codec>, off")


def from_mapping(raw: dict) -> Settings:
    if not isinstance(raw, dict):
        raise SettingsError(f"{ENV} must hold a JSON object, got {type(raw).__name__}")
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; valid: {sorted(known)}")
    s = Settings()
    for name, value in raw.items():
        setattr(s, name, _coerce(name, value))
    try:
        s.weights.validate()
    except PolicyError as e:
        raise SettingsError(str(e)) from None
    if s.half_life_s <= 0:
        raise SettingsError(f"half_life_s: must be > 0, got {s.half_life_s}")
    for name in ("host_codecs", "disk_codecs", "remote_codecs"):
        for codec in getattr(s, name):
            try:
                get_codec(codec)
            except CodecError as e:
                raise SettingsError(f"{name}: {e}") from None
    if "bf16" not in s.host_codecs:
        raise SettingsError("host_codecs: must include 'bf16' (the uncompressed offload that lru-offload uses)")
    if s.disk_dir and s.disk_bytes <= 0:
        raise SettingsError("disk_bytes: must be > 0 when disk_dir is set")
    validate_policy_name(s.policy, s)
    return s


def load_settings(environ: dict | None = None) -> Settings:
    """Settings from ``EVICPRESS_CONFIG`` (JSON text or a file path); defaults if unset."""
    text = (environ if environ is not None else os.environ).get(ENV, "").strip()
    if not text:
        return Settings()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise SettingsError(f"{ENV}: {text!r} is neither JSON nor a readable file")
        text = path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(f"{ENV}: invalid JSON ({e})") from None
    return from_mapping(raw)
