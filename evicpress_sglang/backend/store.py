"""Eviction: the policy places every resident context, and the demotions it chose are
carried out here, children before parents: encode a node's KV, hand the blob to its tier,
free the node's pool slots and keep it as a placeholder; or drop it as stock SGLang does.

Nothing here waits for the GPU or the disk: encoding is queued on the current stream and
the tiers copy the blob out behind it (:mod:`evicpress_sglang.tiers.transfer`).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Collection

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult
from sglang.srt.mem_cache.radix_cache import TreeNode

from ..codecs import EncodedKV, drops_tokens, get_codec, subset_codec
from ..policy import ContextTable, Tier
from ..policy.planner import Plan, PlanJob, build_plan
from ..tiers import TierError, TierFullError
from . import kv_io
from .nodes import Stored, is_placeholder
from .tree import TreeBookkeeping

log = logging.getLogger(__name__)


class StoreOnEvict(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`: the eviction side."""

    def _evict_with(self, num_tokens: int, protect: Collection[int] = (),
                    called_at: float | None = None, waited: float = 0.0) -> EvictResult:
        """Free ``num_tokens`` GPU slots. ``protect``: ids of nodes no decision may touch
        (the chain a load-back is bringing in). ``called_at``: when the caller started waiting
        for the cache's lock, so that the recorded time is what the scheduler lost (the
        plan's budget counts from now); ``waited``: how long it waited for the lock."""
        if self.disable or num_tokens <= 0:
            return EvictResult()
        start = time.perf_counter()
        now = self._agree_round()
        freed = self.profiling.evict_idle(num_tokens)  # the profiler's copies go first
        if self.policy is not None and len(self.table) and freed < num_tokens:
            if self._plans_in_background():
                freed += self._evict_from_plan(num_tokens - freed, protect, start)
            else:
                plan = build_plan(self.policy, self.table, self._capacity(num_tokens - freed), now,
                                  self._movable(protect))
                freed += self._apply(plan, protect, deadline=math.inf)
        if freed < num_tokens:  # policy off, or it could not free enough: stock LRU drop
            t0 = time.perf_counter()
            freed += super().evict(EvictParams(num_tokens=num_tokens - freed)).num_tokens_evicted
            self.stats.step("stock_lru", time.perf_counter() - t0)
        self.stats.evicted(time.perf_counter() - (start if called_at is None else called_at), waited=waited)
        if self.stats.exporter is not None:
            self.stats.exporter.usage(self._tier_bytes())
        return EvictResult(num_tokens_evicted=freed)

    # -- planning ---------------------------------------------------------------------

    def _plans_in_background(self) -> bool:
        """Whether eviction applies the background planner's plan (see :mod:`..policy.planner`):
        not under TP (each rank's planner would finish at its own time, and the ranks must
        apply identical decisions: they plan synchronously from agreed inputs instead), not
        after the planner failed, and only from ``async_plan_min_contexts`` contexts on
        (below, a synchronous re-plan costs about the budget anyway)."""
        least = self.settings.async_plan_min_contexts
        return (self.planner is not None and not self.planner.failed and least is not None
                and len(self.table) >= least)

    def _movable(self, protect: Collection[int]) -> np.ndarray:
        """[table.rows()]: contexts no request holds and no load-back brings in."""
        t = self.table
        rows = t.rows()
        movable = ~t.in_use[rows]
        kept = [t.row_of[i] for i in protect if i in t]
        if kept:
            movable[np.searchsorted(rows, kept)] = False
        return movable

    def _capacity(self, num_tokens: int) -> np.ndarray:
        """[GPU, host, disk, remote] bytes to plan with: the GPU pool less ``num_tokens`` and
        the profiler's copies."""
        return np.array([
            max(self._gpu_tokens() - self.profiling.held_tokens() - num_tokens, 0) * self.token_bytes,
            self._plannable(Tier.HOST),
            self._plannable(Tier.DISK),
            self._plannable(Tier.REMOTE),
        ], dtype=np.float64)

    def _capture_plan(self, snapshot: ContextTable | None) -> PlanJob | None:
        """The planner thread's view, taken under the cache's lock: a refreshed snapshot of
        the table and capacities as a synchronous eviction of the recent demand would see."""
        with self.lock:
            if self.policy is None or not self._plans_in_background():
                return None
            return PlanJob(self.table.snapshot(snapshot), self.settings.policy, self.settings.weights,
                           self.plan_generation, self._capacity(max(self._demand, default=0)), self._now())

    def _planner_failed(self, e: BaseException) -> None:
        self.health.record("planner", e)

    def _evict_from_plan(self, num_tokens: int, protect: Collection[int], start: float) -> int:
        """Apply the ready plan's steps until the time budget is spent, then, if that freed
        too little (no plan yet, a stale or short one, or no time), drop least recently used
        contexts among those the plan keeps on the GPU; the planner is woken to plan again."""
        self._demand.append(num_tokens)
        self.planner.kick()
        plan = self.planner.take(self.plan_generation)
        if plan is None:
            self.stats.plan["missing"] += 1
            return 0
        freed = self._apply(plan, protect, deadline=start + self.settings.evict_budget_ms / 1e3)
        t = self.table
        while freed < num_tokens and plan.lru_cursor < plan.lru.size:
            r = plan.lru[plan.lru_cursor]
            plan.lru_cursor += 1
            node = self.nodes.get(t.keys[r]) if t.alive[r] and t.assign[r] == t.gpu_config else None
            if node is not None and node.id not in protect:
                got = self._timed_move(node, t.drop_config, "fallback_drop")
                freed += got
                self.stats.plan["fallback_drops"] += got > 0
        return freed

    def _apply(self, plan: Plan, protect: Collection[int], deadline: float) -> int:
        """Carry out the plan's steps from its cursor that still hold, until ``deadline``
        (perf_counter seconds); returns GPU tokens freed."""
        t, freed = self.table, 0
        while plan.cursor < plan.rows.size:
            if time.perf_counter() > deadline:
                self.stats.plan["budget_stops"] += 1
                break
            i = plan.cursor
            plan.cursor += 1
            if not plan.holds(t, i):
                self.stats.plan["stale_steps"] += 1
                continue
            node = self.nodes.get(t.keys[plan.rows[i]])
            if node is not None and node.id not in protect:
                freed += self._timed_move(node, int(plan.configs[i]))
                self.stats.plan["steps"] += 1
        return freed

    def _timed_move(self, node: TreeNode, config: int, kind: str | None = None) -> int:
        """:meth:`_move`, its time counted by kind (``Stats.step``): what an eviction's time is
        made of, which the hot-path bench reads (issue 25). ``kind``: by default from the move."""
        if kind is None:
            tier = self.table.configs[config].tier
            kind = "drop" if tier == Tier.DROP else "restore" if node.evicted else "store"
        t0 = time.perf_counter()
        try:
            return self._move(node, config)
        finally:
            self.stats.step(kind, time.perf_counter() - t0)

    def _plannable(self, tier: Tier) -> float:
        """Bytes the policy may plan with in a stored tier: its capacity less what the
        policy cannot see (the host arena's 256-byte rounding per blob, file headers,
        zstd blobs larger than estimated) and a 1% margin, so a planned placement fits."""
        store = self.tiers.get(tier)
        if store is None:
            return 0.0
        u = store.usage()
        t = self.table
        rows = t.rows()
        here = rows[t.tier_of[t.assign[rows]] == tier]
        reclaimable = self.dormant_bytes if tier == Tier.DISK else 0  # freed on demand (_free_dormant)
        unseen = max(0.0, u.used_bytes - reclaimable - float(t.sizes[here, t.assign[here]].sum()))
        return max(0.0, 0.99 * u.capacity_bytes - unseen - 512.0 * (u.entries + 16))

    def _move(self, node: TreeNode, config: int) -> int:
        """Carry out one demotion; returns GPU tokens freed."""
        target = self.table.configs[config]
        if any(not is_placeholder(c) for c in node.children.values()) and not node.evicted:
            return 0  # a child still on the GPU: not a leaf (the policy's repair should prevent it)
        if target.tier == Tier.DROP:
            return self._drop(node)
        if node.evicted:  # placeholder -> slower tier or harder codec
            return self._restore_and_store(node, target, config)
        return self._store(node, target, config)

    def _drop(self, node: TreeNode) -> int:
        if is_placeholder(node):
            self._drop_placeholder(node)
            self.stats.dropped += 1
            return 0
        if node.lock_ref > 0:
            return 0
        self.stats.dropped += 1
        return self._free_node(node)

    def _start(self, node: TreeNode) -> int:
        """Where ``node``'s tokens start in their sequence: after its ancestors' tokens (dropped
        ones included: kept tokens keep their positions). Its keys carry RoPE from there, which
        the query-aware selectors need to know (``ContextKV.start``; issue 24: given 0, they
        rotated their queries thousands of positions off for every node below another)."""
        return sum(len(n.key) for n in self._path(node)[:-1])

    def _store(self, node: TreeNode, target, config: int) -> int:
        if node.lock_ref > 0:
            return 0
        t0 = time.perf_counter()
        self._verify(node, "between insert and eviction")
        positions = getattr(node, "evp_kept", None)
        stored = Stored(target.tier, self._blob_codec(target.codec, positions), self._new_blob_key(target.tier))
        enc = kv_io.encode_from_pool(self.kvpool, node.value, get_codec(stored.codec), positions, self._start(node))
        if not self._put(stored, node, enc, t0):
            return self._drop(node)
        n = len(node.value)
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        node.value = None
        node.evp = stored
        node.evp_kept = None
        self.evictable_size_ -= n
        self._after_store(node, config)
        return n

    def _restore_and_store(self, node: TreeNode, target, config: int) -> int:
        stored: Stored = node.evp
        t0 = time.perf_counter()
        read = self._read(node)
        if not self.sync.all_ok(read is not None):  # a miss on any rank is a miss on every rank
            self._agreed_miss(node)
            return 0
        # The KV is in memory now: free the old blob first, so recompressing inside a full
        # tier does not need room for both copies at once.
        self._tier_delete(stored)
        new = Stored(target.tier, self._blob_codec(target.codec, read.positions), self._new_blob_key(target.tier))
        node.evp = new
        codec = get_codec(new.codec).device_codec
        if drops_tokens(codec):  # read.positions: a token subset's, re-stored as keep+<quantizer>
            enc = codec.encode(read.k, read.v, positions=read.positions, start=self._start(node))
        else:
            enc = codec.encode(read.k, read.v)
        if not self._put(new, node, enc, t0):
            self._drop_placeholder(node)  # its KV is gone with the old blob: a miss from now on
            return 0
        self._after_store(node, config)
        return 0

    def _new_blob_key(self, tier: Tier) -> str:
        """A fresh key for a blob only this process's tree points at (the remote tier removes
        such blobs from the shared store when they are deleted; see ``private_key``)."""
        key = uuid.uuid4().hex
        return self.tiers[tier].private_key(key) if tier == Tier.REMOTE else key

    @staticmethod
    def _blob_codec(codec: str, positions: torch.Tensor | None) -> str:
        """A token subset is stored with its positions and is not dropped again (keep+<quantizer>)."""
        return codec if positions is None else subset_codec(codec)

    def _put(self, stored: Stored, node: TreeNode, enc: EncodedKV, started: float) -> bool:
        """Hand a blob (encoded on the device, maybe still in flight) to its tier, which copies
        it out (and entropy-codes it) without the scheduler waiting; the seconds counted since
        ``started`` are the scheduler's own. False when the tier refused it (full, I/O error):
        nothing was stored."""
        codec = get_codec(stored.codec)
        meta = self._disk_meta(node, stored.codec) if stored.tier == Tier.DISK else None  # found by content later
        pack = codec.pack_host if codec.has_host_stage else None
        try:
            try:
                self.tiers[stored.tier].put(stored.blob, enc, meta, pack=pack)
            except TierFullError:
                # Dormant blobs (stored by an earlier process, not asked for since) make room first.
                if stored.tier != Tier.DISK or not self._free_dormant(enc.nbytes + enc.nbytes // 64 + 65536):
                    raise
                self.tiers[stored.tier].put(stored.blob, enc, meta, pack=pack)
            ok = True
        except (TierError, OSError) as e:
            self.health.note_tier_failure(f"{stored.tier.label} put", e)
            self.stats.tier_errors += 1
            ok = False
        agreed = False
        try:
            agreed = self.sync.all_ok(ok)  # stored only if every rank stored its shard
        finally:
            if ok and not agreed:  # refused elsewhere, or another rank failed: no node will point at it
                self._tier_delete(stored)
        if not agreed:
            return False
        self._publish(node, stored.codec, enc, pack)
        self.stats.stored(stored.tier.label, stored.codec, len(node.key), enc.shape.raw_nbytes, enc.nbytes,
                          time.perf_counter() - started)
        return True

    def _after_store(self, node: TreeNode, config: int) -> None:
        r = self.table.row_of[node.id]
        # config_quality, not the raw column: a context too short to drop from keeps its quantizer's quality
        self.table.set_present_quality(r, float(self.table.config_quality(np.array([r]))[0, config]))
        self.table.set_assign(r, config)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
