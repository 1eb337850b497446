"""``EvicPressRadixCache``: SGLang's radix cache with compressed tiers below the GPU.

The tree is SGLang's. What changes is eviction and what an evicted node becomes; the
data path reads top to bottom through one module per step:

* :mod:`.store` — **evict** asks the policy for a configuration of every resident
  context (radix node) that fits the GPU pool minus what SGLang needs, then carries out
  the demotions deepest first: encode the node's KV, put the blob in host memory or on
  disk, free its pool slots and keep the node as a *placeholder*; or drop it.
* :mod:`.match` — **match_prefix** walks through placeholders too and reports the tokens
  they hold as ``host_hit_length``;
* :mod:`.load` — SGLang then calls **init_load_back**, which reads and decodes each
  placeholder on the path, top-down, into freshly allocated slots;
* :mod:`.insert` — **insert** (through cache_finished_req / cache_unfinished_req)
  revives a placeholder that a request has just recomputed;
* :mod:`.restore` — after a restart, disk blobs are re-attached as placeholders.

Token-dropped contexts come back as *dropped nodes* (:mod:`.nodes`, :mod:`.dropped`).
A tier failure or a damaged blob is a miss: the placeholder and everything below it are
removed and the request recomputes them.

This module holds what SGLang calls, each entry point with its guard (:mod:`.guard`): no
exception of ours reaches the scheduler; an error is counted, logged once and answered
the safe way (a miss, stock eviction, the request's own slots freed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    EvictResult,
    InitLoadBackParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from .. import heap
from ..codecs import CodecError, drops_tokens, get_codec, queries
from ..codecs.drop import QUERY_AWARE
from ..policy import ContextTable, CostModel, Tier, Weights, build_configs, make_policy
from ..policy.planner import BackgroundPlanner
from ..profiler import HeldOutQueries
from ..settings import Settings, SettingsError, validate_policy_name
from ..tiers import DiskTier, HostTier, StorageTier, make_remote_tier
from . import dropped, kv_io, prefill_timer
from .audit import StateAudit, free_slots
from .content_keys import layout_fingerprint, model_name
from .guard import HOOKS, Health, entry_point
from .insert import InsertRevive
from .load import LoadBack
from .match import PrefixMatch
from .profile_budget import ProfileBudget
from .profiling import ProfileStaging
from .restore import RestoreFromDisk
from .memory import ContextMemory
from .prefetch import Prefetcher
from .shared import SharedContexts
from .stats import Stats
from .tp_sync import RankSync
from .status import CacheStatus
from .verify import KVVerification

log = logging.getLogger(__name__)

#: After this many internal errors the cache stops trusting itself even if its state
#: checks out: something keeps failing, and stock SGLang is the safe answer.
MAX_INTERNAL_ERRORS = 50


# -- the safe answers, one per entry point -------------------------------------------------

def _miss(cache: "EvicPressRadixCache", params: MatchPrefixParams) -> MatchResult:
    """Nothing cached: the request computes everything."""
    if params.req is not None:
        _quietly(cache, "match_prefix fallback", dropped.restore_logical, params.req)
    root = cache.root_node
    return MatchResult(device_indices=cache._no_slots(), last_device_node=root, last_host_node=root,
                       best_match_node=root)


def _no_load(cache: "EvicPressRadixCache", params: InitLoadBackParams) -> tuple[torch.Tensor, TreeNode]:
    """Nothing loaded: the request keeps the GPU prefix it was matched with."""
    anchor = getattr(params.req, "last_node", None)
    if anchor is None:
        anchor = params.best_match_node
        while anchor is not cache.root_node and anchor.value is None:
            anchor = anchor.parent
    if params.req is not None:
        _quietly(cache, "init_load_back fallback", cache._adopt_view, params.req, anchor)
    return cache._no_slots(), anchor


def _nothing_inserted(cache: "EvicPressRadixCache", params) -> InsertResult:
    """The caller keeps (and later frees) all its slots."""
    return InsertResult(prefix_len=0, last_device_node=cache.root_node)


def _release_request(cache: "EvicPressRadixCache", req, is_insert: bool = True, *, kv_len_to_handle: int) -> None:
    """Free the finished request's own slots that the tree did not take (its lock was
    released in a ``finally``)."""
    _quietly(cache, "cache_finished_req fallback", cache._free_stray, req, kv_len_to_handle)


def _keep_running(cache: "EvicPressRadixCache", req, chunked: bool = False) -> None:
    """Point the request at whatever the tree holds of its prefix (see :meth:`_resync_unfinished`)."""
    _quietly(cache, "cache_unfinished_req fallback", cache._resync_unfinished, req)


def _stock_evict(cache: "EvicPressRadixCache", params: EvictParams) -> EvictResult:
    try:
        return RadixCache.evict(cache, params)
    except Exception as e:  # noqa: BLE001
        cache.health.record("evict fallback", e)
        return EvictResult()


def _quietly(cache: "EvicPressRadixCache", where: str, fn, *args) -> None:
    """Run a fallback's repair step; if even that fails, record it and stop trusting the state."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        cache.health.record(where, e)
        cache._degrade(f"{where} failed")


class EvicPressRadixCache(PrefixMatch, LoadBack, InsertRevive, RestoreFromDisk, SharedContexts, KVVerification,
                          CacheStatus, StateAudit, RadixCache):
    def __init__(self, params: CacheInitParams, settings: Settings, cost: CostModel | None = None) -> None:
        self._ready = False
        super().__init__(params)
        self.kvpool = self.token_to_kv_pool_allocator.get_kvcache()
        self.layout = kv_io.pool_layout(self.kvpool)
        self.token_bytes = self.layout.with_tokens(1).raw_nbytes
        self.settings = settings
        heap.keep_freed_heap(settings.keep_freed_heap_bytes)  # the solver's temporaries stay mapped
        self.sync = RankSync(params.tp_cache_group)
        # Under TP rank 0 calibrates and every rank plans with its figures.
        self.cost = self.sync.object_from_rank0(cost or (self._measured_cost(settings) if self.sync.rank == 0
                                                         else CostModel()))
        self._clock = self.sync.from_rank0(time.monotonic())[0]  # see _now
        self._lookups = True  # see _closes; agreed below once the disk is indexed
        if settings.prefill_s_per_token is not None:  # pinned by the operator: not learnt
            self.cost.prefill_s_per_token = settings.prefill_s_per_token
        prefill_timer.activate(self.cost if settings.prefill_s_per_token is None else None)
        self.stats = Stats()
        self.health = Health()
        if params.enable_metrics:
            from .metrics import PrometheusExporter

            self.stats.exporter = self.health.exporter = HOOKS.exporter = PrometheusExporter()
        self.tiers: dict[Tier, StorageTier] = {Tier.HOST: HostTier(settings.host_bytes)}
        if settings.disk_dir:
            self.tiers[Tier.DISK] = DiskTier(settings.disk_dir, settings.disk_bytes)
        if any(drops_tokens(get_codec(c)) for c in settings.stored_codecs) and (self.page_size != 1 or self.is_eagle):
            raise SettingsError("evicpress: token-dropping codecs need --page-size 1 and no EAGLE speculative decoding")
        dropped.SHIFT = settings.shift_positions
        _load_query_model(settings, self.layout, self.device, self.sync.rank, self.sync.size)
        tp = self.sync.rank, self.sync.size  # each rank's blobs hold its shard of the KV heads
        self.shared = make_remote_tier(settings.remote, *tp) if settings.remote else None
        if self.shared is not None:  # the tier after disk, priced by rank 0's probe of it
            if self.shared.options.anchor_tokens % self.page_size:
                raise SettingsError(f"remote.anchor_tokens ({self.shared.options.anchor_tokens}) must be a multiple "
                                    f"of --page-size ({self.page_size})")
            self.tiers[Tier.REMOTE] = self.shared
            self.cost.remote_bw, self.cost.remote_latency = self.sync.from_rank0(self.shared.bandwidth,
                                                                                 self.shared.latency)
        self.prefetch = Prefetcher(self.shared.options.prefetch_bytes if self.shared is not None else 0)
        configs = build_configs(settings.host_codecs, settings.active_disk_codecs, settings.active_remote_codecs)
        self.table = ContextTable(configs, self.layout, self.cost, settings.half_life_s)
        self.nodes: dict[int, TreeNode] = {}
        self.queries = HeldOutQueries(settings.held_out_queries)
        self.memory = ContextMemory()
        self.profile_budget = ProfileBudget(lambda: self.settings.profile_share, lambda: bool(self.profiling.jobs))
        prefill_timer.charge_profiler(self.profile_budget)
        self.profiling = ProfileStaging(self)
        self._counted_rids: dict[str, None] = {}
        self.lock = threading.RLock()  # the admin thread reads status while the scheduler works
        self.policy = None
        self.plan_generation = 0  # moves with every policy setting: older plans are not applied
        self._demand: deque[int] = deque(maxlen=8)  # recent eviction sizes: what the planner plans room for
        # Under TP every rank must apply the same decisions at the same step: no background plans there.
        self.planner = (BackgroundPlanner(self._capture_plan, self._planner_failed)
                        if settings.async_plan_min_contexts is not None and not self.sync.active else None)
        self.set_policy(settings.policy, settings.weights)
        self.fingerprint = layout_fingerprint(model_name(), self.layout, self.page_size, *tp)
        self._published: OrderedDict[str, bool] = OrderedDict()
        self._reads_seen = 0  # remote reads the store's speed was learnt from (SharedContexts._observe_read)
        self._warm_up(settings)
        self._ready = True
        self._restore_from_disk()
        self._lookups = self.shared is not None or not self.sync.agree(mins=[not self.dormant])[1][0]

    def _warm_up(self, settings: Settings) -> None:
        """Compile the stored codecs' pool kernels and run their token selectors once at start
        (:func:`kv_io.warm_up`, :func:`kv_io.warm_up_selectors`); a failure here only leaves
        them to compile at first use (or to fall back, see kv_io)."""
        for what, warm in (("codec kernels", kv_io.warm_up), ("token selectors", kv_io.warm_up_selectors)):
            try:
                warmed = warm(self.kvpool, settings.stored_codecs)
            except Exception as e:  # noqa: BLE001 - start-up must not fail for a warm-up
                log.warning("evicpress: warming the %s at start failed (%s: %s); they compile at first use",
                            what, type(e).__name__, e)
                continue
            if warmed:
                log.info("evicpress: %s warmed for %s", what, ", ".join(warmed))

    def _measured_cost(self, settings: Settings) -> CostModel:
        """Decode rates, zstd speed and gain, host->GPU and disk bandwidth measured here at
        start-up (about a second on a GPU); the reference H100 figures where no GPU is present."""
        if self.device.type != "cuda":
            return CostModel()
        from ..policy import calibrate

        try:
            if settings.disk_dir:
                os.makedirs(settings.disk_dir, exist_ok=True)
            cost = calibrate(settings.stored_codecs, self.layout.with_tokens(512), device=str(self.device),
                             disk_dir=settings.disk_dir)
        except Exception as e:  # a failed measurement must not stop the server: fall back to reference figures
            log.warning("evicpress: calibration failed (%s); using the reference H100 cost model", e)
            return CostModel()
        log.info("evicpress: measured cost model %s", cost.to_json().replace("\n", " "))
        return cost

    # -- policy -------------------------------------------------------------------

    def set_policy(self, name: str, weights: Weights | None = None) -> None:
        """Switch policy (or ``off``: stock SGLang eviction) for the next decisions. A
        degraded cache is trusted again only if its state checks out."""
        weights = weights or self.settings.weights
        weights.validate()
        validate_policy_name(name, self.settings)
        with self.lock:
            problems = self.audit() if self.health.degraded is not None and name != "off" else []
            # Every rank leaves degraded mode, or none: agreed on every call, so that no rank
            # waits in a collective the others skip (each rank gets every admin change).
            if not self.sync.all_ok(not problems):
                raise SettingsError(f"evicpress stays degraded: {'; '.join(problems[:3]) or 'another rank'}")
            if self.health.degraded is not None and name != "off":
                log.warning("evicpress: state checks out again; leaving degraded mode (%s)", self.health.degraded)
                self.health.degraded = None
            self.policy = None if name == "off" else make_policy(name, self.table, weights)
            self.plan_generation += 1
            self.settings.policy = name
            self.settings.alpha, self.settings.quality_floor = weights.alpha, weights.quality_floor

    def _degrade(self, reason: str) -> None:
        """Run as stock SGLang from now on: stock eviction, no load-backs."""
        self.health.degrade(reason)
        self.policy = None
        self.settings.policy = "off"

    def _closes(self, entry: str) -> bool:
        """Whether ``entry`` ends with a closing collective (see :func:`.guard.entry_point`):
        under TP, eviction and load-back (they agree on clocks and tier outcomes), and a
        match while some rank may attach a context found by content or stage a profile copy
        (which may evict). Decided from agreed state only (profile jobs are made and
        reported in the same step on every rank), so every rank closes the same calls."""
        if not (self.sync.on and getattr(self, "_ready", False)):
            return False
        return (entry in ("evict", "init_load_back")
                or (entry == "match_prefix" and (self._lookups or bool(self.profiling.jobs)))
                or (entry == "held_for_prefetch" and self.shared is not None))

    def _close_step(self, entry: str, failed: bool) -> None:
        """The closing collective; a failure on any rank degrades every rank, so they stay alike."""
        try:
            anyone = self.sync.close(failed)
        except Exception as e:  # noqa: BLE001 - the group itself failed: nothing to agree with any more
            self.health.record(f"{entry} close", e)
            anyone = True
        if anyone:
            self._degrade(f"a tensor-parallel rank failed in {entry}")

    def _after_internal_error(self) -> None:
        """Check the state after an error; if it does not add up, repair SGLang's size
        counters (the scheduler's admission reads them) and degrade."""
        try:
            problems = self.audit()
            if problems:
                self._recount_sizes()
                self._degrade("state inconsistent after an internal error: " + "; ".join(problems[:3]))
            elif self.health.internal_errors >= MAX_INTERNAL_ERRORS:
                self._degrade(f"{self.health.internal_errors} internal errors")
        except Exception as e:  # noqa: BLE001
            self.health.record("audit", e)
            self._degrade("the state check itself failed")

    def _recount_sizes(self) -> None:
        self.evictable_size_, self.protected_size_ = self._size_recount()

    def reset(self) -> None:
        super().reset()
        if not getattr(self, "_ready", False):
            return
        for tier in self.tiers.values():  # /flush_cache clears every tier
            tier.clear()
        self.dormant.clear()
        self.dormant_bytes = 0
        self.stats.forget_evictions()
        self.prefetch.clear()
        self.table = ContextTable(self.table.configs, self.layout, self.cost, self.settings.half_life_s)
        self.nodes.clear()
        self.queries = HeldOutQueries(self.settings.held_out_queries)
        self.memory = ContextMemory()
        self.profiling = ProfileStaging(self)
        self.set_policy(self.settings.policy)

    # -- SGLang's entry points ------------------------------------------------------

    @entry_point(_miss)
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        with self.lock:
            return self._match_request(params)

    @entry_point(lambda cache, req: None)
    def prefetch_for(self, req) -> None:
        """A request entered the waiting queue (plugin hook): start its remote reads."""
        with self.lock:
            self._prefetch_for(req)

    @entry_point(lambda cache, rids: set())
    def held_for_prefetch(self, rids) -> set[str]:
        """Requests to keep out of this round's prefill (plugin hook): their reads still run."""
        with self.lock:
            return self._held_for_prefetch(rids)

    @entry_point(_no_load)
    def init_load_back(self, params: InitLoadBackParams) -> tuple[torch.Tensor, TreeNode]:
        with self.lock:
            return self._load_back(params)

    @entry_point(_nothing_inserted)
    def insert(self, params) -> InsertResult:
        with self.lock:
            result = super().insert(params)
            self._after_insert(result.last_device_node)
            return result

    @entry_point(_release_request)
    def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int) -> None:
        if self.disable:
            return super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
        with self.lock:
            try:
                self._cache_finished(req, is_insert, kv_len_to_handle)
            finally:
                if req.last_node is not None:
                    self.dec_lock_ref(req.last_node)

    @entry_point(_keep_running)
    def cache_unfinished_req(self, req, chunked: bool = False) -> None:
        if self.disable:
            return
        with self.lock:
            self._cache_unfinished(req, chunked)

    @entry_point(_stock_evict)
    def evict(self, params: EvictParams) -> EvictResult:
        called_at = time.perf_counter()  # the wait for the lock (a planner's snapshot) stalls the scheduler too
        with self.lock:
            waited = time.perf_counter() - called_at
            self.profiling.expire(self._now())  # a stopped profiler's jobs hold locks: released when room is needed
            return self._evict_with(params.num_tokens, called_at=called_at, waited=waited)

    def inc_lock_ref(self, node: TreeNode):
        """SGLang's walk, with the slots of dropped nodes counted right and the table's
        in-use column mirrored; only our parts are guarded (SGLang's own walk is its own)."""
        fix = self._lock_fix(node, 0)
        result = super().inc_lock_ref(node)
        self._after_lock_change(node, fix, result)
        return result

    def dec_lock_ref(self, node: TreeNode, params=None):
        fix = self._lock_fix(node, 1)
        result = super().dec_lock_ref(node, params)
        self._after_lock_change(node, -fix, result)
        return result

    @entry_point(lambda cache, node, lock_ref: 0)
    def _lock_fix(self, node: TreeNode, lock_ref: int) -> int:
        return super()._lock_fix(node, lock_ref)

    @entry_point(lambda cache, node, fix, result: None)
    def _after_lock_change(self, node: TreeNode, fix: int, result) -> None:
        """``fix`` slots SGLang moved from evictable to protected that do not exist (negative: back)."""
        self._mark_in_use(node)
        self.evictable_size_ += fix
        self.protected_size_ -= fix
        if fix and result.delta is not None:
            result.delta += fix

    # -- fallback repairs -------------------------------------------------------------

    def _free_stray(self, req, kv_len: int) -> None:
        """Free the slots of ``req``'s row past its cached prefix that neither the tree
        holds nor the allocator has back: what an interrupted insert left behind."""
        own = self.req_to_token_pool.req_to_token[req.req_pool_idx, req.cache_protected_len:kv_len].to(torch.int64)
        if own.numel() == 0:
            return
        taken = torch.cat([self.all_values_flatten().to(own.device), free_slots(self.token_to_kv_pool_allocator)
                           .to(own.device)])
        stray = own[~torch.isin(own, taken)]
        if stray.numel():
            self.token_to_kv_pool_allocator.free(stray)

    def _resync_unfinished(self, req) -> None:
        """After an interrupted chunk insert: where the tree holds the request's computed
        tokens, point the request at the tree's slots (freeing its own duplicates) and lock
        that path, as the normal path would have."""
        if dropped.view_of(req) is not None:
            self._degrade("a chunked request over a token-dropped context could not be re-synchronised")
            return
        n = len(req.get_fill_ids())
        kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :n].to(torch.int64)
        m = self._match(MatchPrefixParams(key=RadixKey(dropped.logical_tokens(req, n), req.extra_key,
                                                         is_bigram=self.is_eagle)))
        tree, start = m.device_indices.to(kv.device), req.cache_protected_len
        if len(tree) <= start:
            return
        dup = kv[start:len(tree)][kv[start:len(tree)] != tree[start:]]
        free = free_slots(self.token_to_kv_pool_allocator).to(kv.device)
        dup = dup[~torch.isin(dup, free)]
        if dup.numel():
            self.token_to_kv_pool_allocator.free(dup)
        self.req_to_token_pool.write((req.req_pool_idx, slice(start, len(tree))), tree[start:].to(torch.int32))
        req.cache_protected_len = len(tree)
        self.inc_lock_ref(m.last_device_node)
        self.dec_lock_ref(req.last_node)
        req.prefix_indices = torch.cat([tree, kv[len(tree):]]) if len(tree) < n else tree
        req.last_node = m.last_device_node


def _refuse_unsynced_parallelism(params: CacheInitParams) -> None:
    """Ranks agree over ``tp_cache_group`` only (:mod:`.tp_sync`); pipeline stages and
    attention context-parallel ranks would each decide alone, so they are refused."""
    if getattr(params, "pp_size", 1) > 1:
        raise SettingsError("evicpress: pipeline parallelism (--pp-size > 1) is not supported: stages would evict "
                            "and load independently; use --tp / --dp-size")
    cp = getattr(params, "attn_cp_cache_group", None)
    if cp is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(cp) > 1:
        raise SettingsError("evicpress: attention context parallelism is not supported; use --tp / --dp-size")


def _load_query_model(settings: Settings, layout, device, rank: int, size: int) -> None:
    """Load the query model the query-aware selectors read, the KV heads of this TP rank only
    (:func:`.queries.for_rank`); refuse to start without it, or with one of another geometry than
    this rank's KV cache. Its covariance root is computed here, at start, not in the first
    eviction that needs it (:func:`.queries.cov_root_on`)."""
    needed = [c for c in settings.stored_codecs if c.split("+")[0].partition(":")[0] in QUERY_AWARE]
    if needed and not settings.query_model:
        raise SettingsError(f"evicpress: {', '.join(needed)} need 'query_model' (evicpress-sglang query-model)")
    if settings.query_model:
        try:
            queries.use(settings.query_model)
        except (OSError, RuntimeError, TypeError) as e:
            raise SettingsError(f"query_model: cannot load {settings.query_model!r}: {e}") from None
        queries.use(queries.for_rank(queries.active(), layout.heads, rank, size))
        if needed:
            try:
                queries.cov_root_on(device, layout.layers, layout.heads, layout.head_dim)
            except CodecError as e:
                raise SettingsError(f"query_model {settings.query_model!r}: {e}") from None


def build(ctx, settings: Settings | None = None) -> EvicPressRadixCache:
    """The factory SGLang's ``--radix-cache-backend evicpress`` calls."""
    from ..settings import load_settings

    settings = settings or load_settings()
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.enable_hierarchical_cache:
        raise SettingsError("evicpress: needs a plain full-attention model without --enable-hierarchical-cache")
    _refuse_unsynced_parallelism(ctx.params)
    return EvicPressRadixCache(ctx.params, settings)
