"""Remote tier: blobs in a Mooncake Store that several servers share.

The tier after disk in the cascade: slower than local memory, but a context stored by
one server can be loaded by every other server on the same store. It stores the same
self-describing blobs as the disk tier (:mod:`.blob`), so a damaged, truncated or foreign
object under one of our keys is a miss, never wrong KV.

**Keys.** The caller's keys are content keys (what a blob holds: token hash chain, codec,
model and layout fingerprint, TP rank). The tier stores them under
``<namespace>/tp<rank>/<key>``, so deployments and tensor-parallel shards sharing one store
never read each other's objects even if a caller forgot the rank.

**Immutable blobs.** Two servers storing the same context write the same bytes under the
same key, so a second put of an existing key is a success, not a replacement. For the
same reason :meth:`MooncakeTier.delete` of a shared key only forgets this process's
bookkeeping: another server may be about to load that object, and the store evicts by
itself when its memory fills (Mooncake also refuses to remove an object read in the last
lease period). A *private* key (:meth:`MooncakeTier.private_key`: a context this server
placed in the remote tier, which only its own tree points at) is removed from the store
when deleted, in the background.
Capacity is the store's; ``usage()`` reports what this process wrote.

**Never stalls the scheduler.** ``put`` queues the blob for a writer thread, like the
disk tier (copy off the GPU, entropy coding and the network all happen there). ``get``
and ``contains`` run on worker threads and are waited for at most a timeout
(``contains_timeout_s``; a get also gets ``get_timeout_s`` plus its size at
``min_bandwidth``). A timeout or a connection error is a miss; the first one logs one
line, marks the store down and every call is a miss without touching the network for
``backoff_s``; the first call after that probes it again (one line when it is back).

**Configuration** follows SGLang's Mooncake HiCache backend and Mooncake's own config, so
one store is configured the same way for both: the JSON file named by
``SGLANG_HICACHE_MOONCAKE_CONFIG_PATH`` or ``MOONCAKE_CONFIG_PATH``, else the environment
(``MOONCAKE_MASTER``, ``MOONCAKE_TE_META_DATA_SERVER``, ``MOONCAKE_PROTOCOL``,
``MOONCAKE_DEVICE``, ``MOONCAKE_LOCAL_HOSTNAME`` or ``LOCAL_HOSTNAME``,
``MOONCAKE_GLOBAL_SEGMENT_SIZE``, ``MOONCAKE_LOCAL_BUFFER_SIZE``), then the ``remote``
setting's entries of the same names on top (see :func:`make_remote_tier`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..codecs import CodecError, EncodedKV
from ..settings import whole_number
from ..units import parse_bytes
from . import transfer
from .base import Pack, StorageTier, TierError, TierFullError, TierUsage, Unpack
from .blob import CorruptEntry, blob_size, decode, encode_header, frame
from .writer import BackgroundWriter, Write

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the remote tier needs Mooncake: `pip install mooncake-transfer-engine-non-cuda` (CPU machines) or "
    "`mooncake-transfer-engine` (CUDA), and its system libraries: `apt-get install libibverbs1 librdmacm1 libnuma1`"
)
P2PHANDSHAKE = "P2PHANDSHAKE"
#: Mooncake error codes that say the store, not the key, is in trouble (RPC_FAIL, RPC_TIMEOUT,
#: CLIENT_NOT_FOUND: the master forgot this client, e.g. after a restart).
OUTAGE_CODES = frozenset({-900, -901, -103})
OBJECT_ALREADY_EXISTS = -705
OBJECT_NOT_FOUND = -704
REMOVE_ATTEMPTS = 30  # a second apart: outlasts Mooncake's default 10 s read lease
#: bytes: latency from the small one, bandwidth from the large one (KV blobs are tens of MB)
PROBE_SIZES = (4 << 10, 32 << 20)
#: MooncakeConfig fields given as byte sizes (``"64MiB"`` in settings).
SIZE_FIELDS = ("global_segment_size", "local_buffer_size")
PRIVATE = "own-"  # prefix of keys only this process points at (see MooncakeTier.private_key)


class _Miss(Exception):
    """Internal: the store did not answer usefully; the call is a miss."""


@dataclass(frozen=True)
class RemoteOptions:
    """The remote tier's own behaviour (the Mooncake connection is a ``MooncakeConfig``)."""

    namespace: str = "evicpress"  # prefix of every key, so deployments sharing a store stay apart
    contains_timeout_s: float = 0.3
    get_timeout_s: float = 0.5  # a get may take this plus its size at min_bandwidth
    min_bandwidth: float = 100e6  # bytes/s below which a get is given up (timeout scaling)
    backoff_s: float = 5.0  # how long a store that failed is skipped before it is probed again
    max_pending_bytes: int = 1 << 30  # queued puts beyond this make put wait (as the disk tier's)
    capacity_bytes: int | None = None  # what the policy may plan to keep here; None: our segment size
    prefetch_bytes: int = 512 << 20  # host memory for blobs read ahead of their load (backend.prefetch)
    #: spacing of the positions shared contexts are keyed at (backend.shared); servers sharing
    #: a store must use the same
    anchor_tokens: int = 256


def _mooncake_config_module():
    try:
        from mooncake import mooncake_config
    except ImportError as e:  # missing package, or missing system libraries behind it
        raise TierError(f"{INSTALL_HINT} ({e})") from e
    return mooncake_config


def mooncake_config(overrides: dict[str, Any], tp_size: int = 1):
    """The ``MooncakeConfig`` from SGLang's / Mooncake's config file or environment, with
    ``overrides`` (MooncakeConfig field names) on top. As SGLang does, each of ``tp_size``
    ranks contributes ``global_segment_size / tp_size`` of memory to the store."""
    module = _mooncake_config_module()
    cls = module.MooncakeConfig
    path = os.getenv("SGLANG_HICACHE_MOONCAKE_CONFIG_PATH") or os.getenv("MOONCAKE_CONFIG_PATH")
    if path:
        fields = dataclasses.asdict(cls.from_file(path))
    elif os.getenv("MOONCAKE_MASTER"):
        fields = dataclasses.asdict(cls.load_from_env())
        if not os.getenv("MOONCAKE_LOCAL_HOSTNAME") and os.getenv("LOCAL_HOSTNAME"):
            fields["local_hostname"] = os.environ["LOCAL_HOSTNAME"]  # SGLang's legacy name
    else:
        fields = {"local_hostname": os.getenv("MOONCAKE_LOCAL_HOSTNAME") or os.getenv("LOCAL_HOSTNAME", "localhost"),
                  "metadata_server": os.getenv("MOONCAKE_TE_META_DATA_SERVER", P2PHANDSHAKE),
                  "global_segment_size": module.DEFAULT_GLOBAL_SEGMENT_SIZE,
                  "local_buffer_size": module.DEFAULT_LOCAL_BUFFER_SIZE,
                  "protocol": os.getenv("MOONCAKE_PROTOCOL", "tcp"), "device_name": os.getenv("MOONCAKE_DEVICE", ""),
                  "master_server_address": ""}
    for name, value in overrides.items():
        fields[name] = parse_bytes(value, f"remote.{name}") if name in SIZE_FIELDS else value
    if not fields.get("master_server_address"):
        raise ValueError("remote: no Mooncake master: set MOONCAKE_MASTER (host:port), a config file "
                         "(SGLANG_HICACHE_MOONCAKE_CONFIG_PATH) or remote.master_server_address")
    fields["global_segment_size"] //= max(1, tp_size)
    return cls(**fields)


def make_remote_tier(config: dict[str, Any], tp_rank: int = 0, tp_size: int = 1) -> StorageTier:
    """The remote tier the ``remote`` setting describes: ``{"backend": "mooncake", ...}`` where the
    other entries are :class:`RemoteOptions` fields or Mooncake settings (``MooncakeConfig``
    fields such as ``master_server_address``, ``metadata_server``, ``local_hostname``,
    ``protocol``, ``global_segment_size``) overriding the file / environment. Unknown names
    are a ValueError naming them; an unreachable store a :class:`TierError`."""
    config = dict(config)
    backend = config.pop("backend", "mooncake")
    if backend != "mooncake":
        raise ValueError(f"remote.backend: {backend!r} is not supported (only 'mooncake')")
    own = {f.name for f in dataclasses.fields(RemoteOptions)}
    mooncake = {f.name for f in dataclasses.fields(_mooncake_config_module().MooncakeConfig)}
    unknown = sorted(set(config) - own - mooncake)
    if unknown:
        raise ValueError(f"remote: unknown setting(s) {', '.join(unknown)}; valid: backend, "
                         f"{', '.join(sorted(own | mooncake))}")
    options = {k: v for k, v in config.items() if k in own}
    for name in ("max_pending_bytes", "prefetch_bytes"):
        if name in options:
            options[name] = parse_bytes(options[name], f"remote.{name}")
    if "anchor_tokens" in options:  # every key and lookup divides by it
        options["anchor_tokens"] = whole_number("remote.anchor_tokens", options["anchor_tokens"], 1)
    if options.get("capacity_bytes") is not None:
        options["capacity_bytes"] = parse_bytes(options["capacity_bytes"], "remote.capacity_bytes")
    mc = mooncake_config({k: v for k, v in config.items() if k in mooncake}, tp_size)
    return MooncakeTier(mc, tp_rank=tp_rank, options=RemoteOptions(**options))


class MooncakeTier(StorageTier):
    """Blobs in a Mooncake Store, keyed ``<namespace>/tp<rank>/<key>``."""

    name = "remote"

    def __init__(self, config: Any, tp_rank: int = 0, options: RemoteOptions = RemoteOptions()) -> None:
        """Connect to the store ``config`` (a ``MooncakeConfig``) describes and measure it.

        Raises :class:`TierError` when it cannot connect (Mooncake itself retries for a while).
        """
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise TierError(f"{INSTALL_HINT} ({e})") from e
        self.config = config
        self.options = options
        self.capacity = options.capacity_bytes if options.capacity_bytes is not None else config.global_segment_size
        self._prefix = f"{options.namespace}/tp{tp_rank}/"
        if config.metadata_server != P2PHANDSHAKE:
            # With a metadata server the transfer engine advertises MC_TCP_BIND_ADDRESS, or else the
            # first LAN address it finds, not local_hostname; make it advertise what it was told.
            os.environ.setdefault("MC_TCP_BIND_ADDRESS", config.local_hostname)
        self._store = MooncakeDistributedStore()
        rc = self._store.setup(config.local_hostname, config.metadata_server, config.global_segment_size,
                               config.local_buffer_size, config.protocol, config.device_name or "",
                               config.master_server_address)
        if rc != 0:
            raise TierError(f"remote tier: cannot connect to the Mooncake master at {config.master_server_address} "
                            f"(setup returned {rc})")
        self._lock = threading.Condition()  # guards everything below; notified as writes finish
        self._entries: dict[str, int] = {}  # key -> blob size, for what this process wrote
        self._pending: dict[str, Write] = {}
        self._down_until = 0.0  # monotonic time before which the store is not asked
        self._down = False  # inside an outage (logged once)
        self.counters = {"errors": 0, "timeouts": 0, "skipped": 0, "outages": 0, "failed_writes": 0, "damaged": 0,
                         "removed": 0, "too_large": 0}
        self.last_error: str | None = None
        self._workers = ThreadPoolExecutor(4, thread_name_prefix="evicpress-remote")
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="evicpress-remote-remove")
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._writes = BackgroundWriter(self._lock, self._write, options.max_pending_bytes, "evicpress-remote-writer")
        self.bandwidth, self.latency = self.probe()

    def stored_key(self, key: str) -> str:
        """The store's name for ``key``."""
        return self._prefix + key

    # -- health ------------------------------------------------------------------

    def _count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def _fail(self, why: str) -> None:
        """The store failed: skip it for the backoff period; log once per outage."""
        with self._lock:
            self._down_until = time.monotonic() + self.options.backoff_s
            self.last_error = why
            if self._down:
                return
            self._down = True
            self.counters["outages"] += 1
        log.warning("remote tier: Mooncake store at %s unavailable (%s); reads are misses and writes are dropped, "
                    "probing again every %.0f s", self.config.master_server_address, why, self.options.backoff_s)

    def _ok(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            log.warning("remote tier: Mooncake store at %s is reachable again", self.config.master_server_address)

    def _skipping(self) -> bool:
        with self._lock:
            return time.monotonic() < self._down_until

    def _call(self, what: str, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker, waited for at most ``timeout`` seconds; raises :class:`_Miss`
        when the store is being skipped, does not answer in time, or fails as a whole."""
        if self._skipping():
            self._count("skipped")
            raise _Miss
        future = self._workers.submit(fn, *args)
        try:
            result = future.result(timeout)
        except FutureTimeout:
            future.cancel()
            self._count("timeouts")
            self._fail(f"{what} took longer than {timeout * 1e3:.0f} ms")
            raise _Miss from None
        except Exception as e:
            self._count("errors")
            self._fail(f"{what} failed: {e}")
            raise _Miss from e
        if isinstance(result, int) and result in OUTAGE_CODES:
            self._count("errors")
            self._fail(f"{what} returned error {result}")
            raise _Miss
        self._ok()
        return result

    # -- StorageTier -------------------------------------------------------------

    def put(self, key: str, enc: EncodedKV, meta: dict | None = None, pack: Pack | None = None) -> None:
        """Queue ``enc`` for the writer thread, which sends it to the store; returns at once.

        Raises :class:`TierFullError` for a blob larger than Mooncake's local buffer (it could
        never be sent) and :class:`TierError` while the store is down. A write that fails later
        reads as a miss and counts in ``failed_writes``. Waits only while more than
        ``max_pending_bytes`` are queued.
        """
        size = blob_size(len(encode_header(self.stored_key(key), enc, meta)), enc.nbytes)
        if size > self.config.local_buffer_size:
            raise TierFullError(f"remote tier: a {size}-byte blob exceeds Mooncake's local buffer "
                                f"({self.config.local_buffer_size} bytes, local_buffer_size)")
        if self._skipping():
            raise TierError(f"remote tier: store unavailable ({self.last_error})")
        job = Write(key, enc, meta, pack, transfer.ready_event(enc.payload))
        with self._lock:
            self._writes.wait_for_room(enc.nbytes)
            self._pending[key] = job
            self._writes.submit(job, enc.nbytes)

    def flush(self) -> None:
        """Wait until every queued write has finished (or failed)."""
        self._writes.flush()

    def _write(self, job: Write) -> None:
        try:
            self._send(job)
        finally:
            with self._lock:
                if self._pending.get(job.key) is job:
                    del self._pending[job.key]

    def _send(self, job: Write) -> None:
        with self._lock:
            if self._pending.get(job.key) is not job:
                return  # deleted before its turn
        try:
            if self._skipping():
                raise TierError(f"store unavailable ({self.last_error})")
            host = transfer.to_host_after(job.enc.payload, job.ready, self._stream)
            enc = EncodedKV(job.enc.codec, job.enc.shape, host)
            if job.pack is not None:
                enc = job.pack(enc)
            parts = frame(self.stored_key(job.key), enc, job.meta)
            rc = self._store.put_parts(self.stored_key(job.key), *parts)
            if rc in OUTAGE_CODES:
                self._fail(f"put returned error {rc}")
            if rc not in (0, OBJECT_ALREADY_EXISTS):  # an existing key holds the same content
                raise TierError(f"put returned error {rc}")
            with self._lock:
                if self._pending.get(job.key) is job:
                    self._entries[job.key] = sum(len(p) for p in parts)
        except Exception as e:  # the writer must survive anything one entry does
            with self._lock:
                self.counters["failed_writes"] += 1
                self.last_error = f"writing {job.key!r}: {e}"
            log.debug("remote tier: writing %r failed (%s); the entry is lost (a miss)", job.key, e)

    def get(self, key: str, device: torch.device | str = "cpu", unpack: Unpack | None = None) -> EncodedKV | None:
        """The blob, or None on a miss: absent, damaged, foreign, or the store did not answer
        within ``contains_timeout_s`` (size query) + ``get_timeout_s`` + size / ``min_bandwidth``."""
        found = self.get_with_meta(key, device, unpack)
        return None if found is None else found[0]

    def get_with_meta(self, key: str, device: torch.device | str = "cpu", unpack: Unpack | None = None,
                      max_bytes: float = float("inf")) -> tuple[EncodedKV, dict | None] | None:
        """:meth:`get`, with the meta the writer stored beside the blob (None for a blob
        still queued here, whose meta the caller has). A blob over ``max_bytes`` is not read
        (a miss, counted in ``too_large``): the caller knows it could not arrive in time."""
        with self._lock:
            job = self._pending.get(key)
        if job is not None:  # not sent yet: serve the bytes put was handed (already unpacked)
            return EncodedKV(job.enc.codec, job.enc.shape, transfer.to_device(job.enc.payload, device)), job.meta
        name = self.stored_key(key)
        opts = self.options
        try:
            size = self._call("get_size", opts.contains_timeout_s, self._store.get_size, name)
            if size <= 0:
                return None
            if size > max_bytes:
                self._count("too_large")
                return None
            data = self._call("get", opts.get_timeout_s + size / opts.min_bandwidth, self._store.get, name)
        except _Miss:
            return None
        if not data:  # evicted between the two calls
            return None
        try:
            enc, meta = decode(data, name)
            if unpack is not None:
                enc = unpack(enc)
        except (CorruptEntry, CodecError) as e:
            self._count("damaged")
            log.warning("remote tier: object %r is damaged or foreign (%s); treating it as a miss", name, e)
            return None
        return EncodedKV(enc.codec, enc.shape, transfer.to_device(enc.payload, device)), meta

    @staticmethod
    def private_key(key: str) -> str:
        """``key`` marked as this process's own: :meth:`delete` removes it from the store."""
        return PRIVATE + key

    def delete(self, key: str) -> bool:
        """Forget ``key`` here (and drop its write if still queued). A shared key's object
        stays in the store, where other servers may use it; a private key's object is
        removed on a worker thread (never waited for; a failure leaves it to the store's
        own eviction)."""
        with self._lock:
            job = self._pending.pop(key, None)
            size = self._entries.pop(key, None)
        if size is not None and key.startswith(PRIVATE) and not self._skipping():
            self._remover.submit(self._remove_quietly, self.stored_key(key))
        return job is not None or size is not None

    def _remove_quietly(self, name: str) -> None:
        """Remove ``name`` from the store on the remover thread. Mooncake refuses to remove an
        object read within its lease (a few seconds), and one is usually removed just after
        its load: try again a second later, for a while."""
        for _ in range(REMOVE_ATTEMPTS):
            try:
                rc = self._store.remove(name)
            except Exception as e:  # noqa: BLE001 - the thread must survive anything the store does
                rc = e
            if rc in (0, OBJECT_NOT_FOUND):
                self._count("removed")
                return
            if self._skipping():
                return
            time.sleep(1.0)
        log.debug("remote tier: removing %r failed (%s); the store evicts it in time", name, rc)

    def contains(self, key: str) -> bool:
        """Whether the store holds ``key`` (written by any server); False when it does not
        answer within ``contains_timeout_s``."""
        with self._lock:
            if key in self._pending:
                return True
        try:
            return self._call("is_exist", self.options.contains_timeout_s, self._store.is_exist,
                              self.stored_key(key)) == 1
        except _Miss:
            return False

    def keys(self) -> list[str]:
        """The keys this process wrote (the store's other objects are not listed)."""
        with self._lock:
            return list(dict.fromkeys([*self._entries, *self._pending]))

    def usage(self) -> TierUsage:
        """Bytes this process wrote (and queued); capacity is ``capacity_bytes``, by default the
        memory this process contributes to the store."""
        with self._lock:
            used = sum(self._entries.values()) + sum(j.enc.nbytes for j in self._pending.values())
            return TierUsage(used, self.capacity, len(set(self._entries) | set(self._pending)),
                             {**self.counters, "queued_writes": len(self._pending)})

    def probe(self) -> tuple[float, float]:
        """Measured (bandwidth in bytes/s, latency in s) of a put+get round trip of a small and a
        larger object, for the cost model: latency is the small get's time, bandwidth what the
        larger one adds. Raises :class:`TierError` if the store does not answer."""
        sizes = [min(n, self.config.local_buffer_size) for n in PROBE_SIZES]
        seconds = []
        for n in sizes:
            name = f"{self.options.namespace}/probe/{os.getpid()}-{threading.get_ident()}-{n}"
            try:
                if self._call("probe put", self.options.get_timeout_s + n / self.options.min_bandwidth,
                              self._store.put, name, bytes(n)) != 0:
                    raise TierError(f"remote tier: probe put of {n} bytes failed")
                start = time.perf_counter()
                data = self._call("probe get", self.options.get_timeout_s + n / self.options.min_bandwidth,
                                  self._store.get, name)
                seconds.append(time.perf_counter() - start)
            except _Miss:
                raise TierError(f"remote tier: probe failed ({self.last_error})") from None
            if len(data) != n:
                raise TierError(f"remote tier: probe got {len(data)} bytes back instead of {n}")
            self._store.remove(name)
        latency = seconds[0]
        extra = max(seconds[1] - seconds[0], 1e-9)
        return (sizes[1] - sizes[0]) / extra, latency

    def close(self) -> None:
        """Send what is queued, then leave the store (this process's segment goes with it)."""
        self.flush()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._store.close()
