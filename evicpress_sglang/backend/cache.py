"""``EvicPressRadixCache``: SGLang's radix cache with compressed tiers below the GPU.

The tree is SGLang's. What changes is eviction and what an evicted node becomes:

* **evict** asks the policy for a configuration of every resident context (radix node)
  that fits the GPU pool minus what SGLang needs, then carries out the demotions
  deepest first: encode the node's KV with the chosen codec, put the blob in host
  memory or on disk, free its pool slots, and keep the node as a *placeholder*
  (``value is None`` plus a :class:`Stored` record); or drop it as stock SGLang does.
* **match_prefix** walks through placeholders too and reports the tokens they hold
  as ``host_hit_length``; SGLang then calls **init_load_back**, which reads and
  decodes each placeholder on the path, top-down, into freshly allocated slots.
* **insert** revives a placeholder that a request has just recomputed (its blob is
  dropped, the fresh exact KV kept).

A context stored with a token-dropping codec comes back as a *dropped node*: its key
is all ``n`` tokens, its value only the ``m`` kept slots (``evp_kept`` holds their
positions, ascending). Splitting it at token ``s`` gives the prefix the kept slots below
``s``, which is exactly that prefix dropped; a split that would leave a side without
slots is refused and the node is then used whole or not at all. SGLang's size
accounting is corrected to count slots, and a request whose path runs through a dropped
node is served through a physical view with shifted positions (:mod:`.dropped`).

Invariant: a placeholder's children are placeholders (a context is never on a faster
tier than its prefix), so a match is always a run of GPU nodes followed by a run of
placeholders. A tier failure or a damaged blob is a miss: the placeholder and
everything below it are removed and the request recomputes them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from array import array
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    EvictResult,
    InitLoadBackParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from .. import heap
from ..codecs import CodecError, drops_tokens, get_codec, subset_codec
from ..policy import ContextTable, CostModel, Tier, Weights, build_configs, make_policy
from ..settings import Settings, SettingsError, validate_policy_name
from ..profiler import HeldOutQueries
from ..tiers import DiskTier, HostTier, StorageTier, TierError
from . import dropped, kv_io, prefill_timer
from .profiling import ProfileStaging, parse_namespace
from .stats import Stats

log = logging.getLogger(__name__)


@dataclass
class Stored:
    """Where a placeholder's KV is: a blob in a tier, encoded with a codec."""

    tier: Tier
    codec: str  # the blob's codec: the configuration's, or keep+<it> for a dropped node's kept tokens
    blob: str  # key in the tier

    @property
    def token_subset(self) -> bool:
        """The blob holds a subset of the tokens, with their positions."""
        return drops_tokens(get_codec(self.codec))


class Decoded(NamedTuple):
    k: torch.Tensor  # [layers, slots, heads, head_dim]
    v: torch.Tensor
    nbytes: int  # of the blob
    positions: Optional[torch.Tensor]  # of the slots within the node, for a token subset


def _placeholder(node: TreeNode) -> bool:
    return getattr(node, "evp", None) is not None


def _dropped(node: TreeNode) -> bool:
    """On the GPU with only its kept tokens' slots."""
    return getattr(node, "evp_kept", None) is not None


def _kept_below(kept: torch.Tensor, split_len: int) -> int:
    """Kept slots of a dropped node before token ``split_len`` (reads the positions back
    from the GPU: only done when such a node is split)."""
    return int((kept < split_len).sum())


def _missing_slots(node: TreeNode) -> int:
    """Tokens of the key that have no slot (SGLang counts len(key) per node)."""
    return len(node.key) - len(node.value) if _dropped(node) else 0


class EvicPressRadixCache(RadixCache):
    def __init__(self, params: CacheInitParams, settings: Settings, cost: CostModel | None = None) -> None:
        self._ready = False
        super().__init__(params)
        self.kvpool = self.token_to_kv_pool_allocator.get_kvcache()
        self.layout = kv_io.pool_layout(self.kvpool)
        self.token_bytes = self.layout.with_tokens(1).raw_nbytes
        self.settings = settings
        heap.keep_freed_heap(settings.keep_freed_heap_bytes)  # the solver's temporaries stay mapped
        self.cost = cost or self._measured_cost(settings)
        if settings.prefill_s_per_token is not None:  # pinned by the operator: not learnt
            self.cost.prefill_s_per_token = settings.prefill_s_per_token
        prefill_timer.activate(self.cost if settings.prefill_s_per_token is None else None)
        self.stats = Stats()
        if params.enable_metrics:
            from .metrics import PrometheusExporter

            self.stats.exporter = PrometheusExporter()
        self.tiers: dict[Tier, StorageTier] = {Tier.HOST: HostTier(settings.host_bytes)}
        if settings.disk_dir:
            self.tiers[Tier.DISK] = DiskTier(settings.disk_dir, settings.disk_bytes)
        if any(drops_tokens(get_codec(c)) for c in settings.stored_codecs) and (self.page_size != 1 or self.is_eagle):
            raise SettingsError("evicpress: token-dropping codecs need --page-size 1 and no EAGLE speculative decoding")
        dropped.SHIFT = settings.shift_positions
        configs = build_configs(settings.host_codecs, settings.active_disk_codecs)
        self.table = ContextTable(configs, self.layout, self.cost, settings.half_life_s)
        self.nodes: dict[int, TreeNode] = {}
        self.queries = HeldOutQueries(settings.held_out_queries)
        self.profiling = ProfileStaging(self)
        self._counted_rids: dict[str, None] = {}
        self.lock = threading.RLock()  # the admin thread reads status while the scheduler works
        self.policy = None
        self.set_policy(settings.policy, settings.weights)
        self._ready = True
        self._restore_from_disk()

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
        """Switch policy (or ``off``: stock SGLang eviction) for the next decisions."""
        weights = weights or self.settings.weights
        weights.validate()
        validate_policy_name(name, self.settings)
        with self.lock:
            self.policy = None if name == "off" else make_policy(name, self.table, weights)
            self.settings.policy = name
            self.settings.alpha, self.settings.quality_floor = weights.alpha, weights.quality_floor

    # -- bookkeeping ---------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        if not getattr(self, "_ready", False):
            return
        for tier in self.tiers.values():  # /flush_cache clears every tier
            tier.clear()
        self.table = ContextTable(self.table.configs, self.layout, self.cost, self.settings.half_life_s)
        self.nodes.clear()
        self.queries = HeldOutQueries(self.settings.held_out_queries)
        self.profiling = ProfileStaging(self)
        self.set_policy(self.settings.policy)

    def _register(self, node: TreeNode) -> None:
        """Make sure every node on the path to ``node`` has a table row (top-down)."""
        path = []
        while node is not self.root_node and node.id not in self.table:
            path.append(node)
            node = node.parent
        for n in reversed(path):
            parent = None if n.parent is self.root_node else n.parent.id
            r = self.table.insert(n.id, len(n.key), time.monotonic(), parent)
            self.table.in_use[r] = n.lock_ref > 0
            self.nodes[n.id] = n

    def _set_config(self, node: TreeNode, config: int) -> None:
        self.table.assign[self.table.row_of[node.id]] = config

    def _config_index(self, tier: Tier, codec: str) -> int | None:
        """The configuration a blob of ``codec`` in ``tier`` belongs to (a keep+ blob: the
        configuration whose codec stores a token subset that way); None if not enabled."""
        here = [(i, c.codec) for i, c in enumerate(self.table.configs) if c.tier == tier]
        exact = [i for i, c in here if c == codec]
        subset = [i for i, c in here if subset_codec(c) == codec]
        return (exact + subset + [None])[0]

    def _split_node(self, key: RadixKey, child: TreeNode, split_len: int) -> TreeNode:
        if _placeholder(child) or not self._splittable(child, split_len):
            raise RuntimeError(f"evicpress: node {child.id} cannot be split at {split_len}")
        value, kept = child.value, getattr(child, "evp_kept", None)
        new_node = super()._split_node(key, child, split_len)
        if kept is not None:  # slots follow the kept positions, not the token count
            cut = _kept_below(kept, split_len)
            new_node.value, child.value = value[:cut].clone(), value[cut:].clone()
            new_node.evp_kept, child.evp_kept = kept[:cut], kept[cut:] - split_len
        if getattr(self, "_ready", False) and self.settings.verify and getattr(child, "evp_fp", None) is not None:
            for part in (new_node, child):  # both halves get their own reference
                part.evp_fp = None if part.value is None else self._fingerprint(part)
        if child.id in self.table:
            self.table.split(child.id, new_node.id, split_len)
            self.nodes[new_node.id] = new_node
            if kept is not None:
                self.table.set_stored_tokens(new_node.id, len(new_node.value))
                self.table.set_stored_tokens(child.id, len(child.value))
        return new_node

    def _splittable(self, node: TreeNode, split_len: int) -> bool:
        """A dropped node splits only where both sides keep at least one slot."""
        return not _dropped(node) or 0 < _kept_below(node.evp_kept, split_len) < len(node.value)

    def _delete_leaf(self, node: TreeNode) -> None:
        self._drop_placeholders_below(node)
        missing = _missing_slots(node)
        super()._delete_leaf(node)
        self.evictable_size_ += missing  # SGLang took len(key); the node held fewer slots
        node.evp_kept = None
        self._forget(node)

    # SGLang moves len(key) tokens between evictable and protected per node; a dropped
    # node holds fewer slots, so the difference is given back after each walk.

    def inc_lock_ref(self, node: TreeNode):
        fix = self._lock_fix(node, 0)
        result = super().inc_lock_ref(node)
        self._mark_in_use(node)
        self.evictable_size_ += fix
        self.protected_size_ -= fix
        if fix and result.delta is not None:
            result.delta += fix
        return result

    def dec_lock_ref(self, node: TreeNode, params=None):
        fix = self._lock_fix(node, 1)
        result = super().dec_lock_ref(node, params)
        self._mark_in_use(node)
        self.evictable_size_ -= fix
        self.protected_size_ += fix
        if fix and result.delta is not None:
            result.delta -= fix
        return result

    def _mark_in_use(self, node: TreeNode) -> None:
        """Mirror the lock counts of the path into the table, so an eviction reads which
        contexts may move from one column instead of visiting every node."""
        t = self.table
        for n in self._path(node) if node is not None else ():
            r = t.row_of.get(n.id)
            if r is not None:
                t.in_use[r] = n.lock_ref > 0

    def _lock_fix(self, node: TreeNode, lock_ref: int) -> int:
        """Missing slots of dropped nodes on the path whose lock count is ``lock_ref``
        (those SGLang is about to move between evictable and protected)."""
        fix = 0
        while node is not None and node is not self.root_node:
            if node.lock_ref == lock_ref:
                fix += _missing_slots(node)
            node = node.parent
        return fix

    def _forget(self, node: TreeNode) -> None:
        if node.id in self.table:
            self.table.remove(node.id)
        self.nodes.pop(node.id, None)
        self.queries.forget(node.id)
        self.profiling.forget(node.id)

    def _drop_placeholders_below(self, node: TreeNode) -> None:
        for child in list(node.children.values()):
            if _placeholder(child):
                self._drop_placeholder(child)

    def _drop_placeholder(self, node: TreeNode) -> None:
        """Remove a placeholder, its blob and everything below it from the tree."""
        self._drop_placeholders_below(node)
        stored: Stored = node.evp
        self.tiers[stored.tier].delete(stored.blob)
        node.parent.children.pop(node.key.child_key(self.page_size), None)
        node.evp = None
        self._forget(node)
        self._update_leaf_status(node.parent)

    # -- match ---------------------------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        with self.lock:
            req = params.req
            old = dropped.restore_logical(req) if req is not None else None
            if old is not None:  # match what the request really says, not its last physical view
                key = params.key
                limit = len(key) + old.offset
                params = MatchPrefixParams(key=RadixKey((req.origin_input_ids + req.output_ids)[:limit], key.extra_key,
                                                        is_bigram=key.is_bigram), cow_mamba=params.cow_mamba, req=req)
            profiling = req is not None and parse_namespace(params.key.extra_key) is not None
            if profiling:
                self.profiling.ensure(params.key)
            result = self._match(params)
            if req is not None:
                self._adopt_view(req, result.last_device_node)
            if profiling:
                self.profiling.matched(params.key, self._logical_len(result.last_device_node) + result.host_hit_length)
            return result

    def _match(self, params: MatchPrefixParams) -> MatchResult:
        """SGLang's match over GPU nodes, continued through placeholders (host_hit_length)."""
        result = super().match_prefix(params)
        key = params.key
        if self.disable or len(key) == 0:
            return result
        node = result.last_device_node
        key = key.page_aligned(self.page_size)[self._logical_len(node):]
        host_hit, best = 0, node
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None or not _placeholder(child):
                break
            n = child.key.match(key, page_size=self.page_size)
            host_hit += n
            best = child
            if n < len(child.key):
                break
            node, key = child, key[n:]
        self._count_hit(params.req, node, best)
        if host_hit == 0:
            return result
        return result._replace(best_match_node=best, host_hit_length=host_hit)

    def _path(self, node: TreeNode) -> list[TreeNode]:
        """The nodes from the root's child down to ``node``."""
        path = []
        while node is not self.root_node:
            path.append(node)
            node = node.parent
        path.reverse()
        return path

    def _logical_len(self, node: TreeNode) -> int:
        """Tokens on the path from the root to ``node`` (slots may be fewer)."""
        return sum(len(n.key) for n in self._path(node))

    def _adopt_view(self, req, last: TreeNode) -> None:
        """Give ``req``, from its logical tokens, the physical view the path to ``last`` needs, if any."""
        dropped.restore_logical(req)
        path = self._path(last)
        deepest = max((i for i, n in enumerate(path) if _dropped(n)), default=None)
        if deepest is None:
            return
        upto = path[: deepest + 1]
        dropped.to_physical(req, sum(len(n.key) for n in upto), sum(len(n.value) for n in upto), upto[-1])

    def _match_prefix_helper(self, node: TreeNode, key: RadixKey):
        """SGLang's walk over GPU nodes, stopping at the first placeholder (whose KV is not
        in the pool); :meth:`match_prefix` continues from there."""
        access_time = time.monotonic()
        node.last_access_time = access_time
        value = []
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None or _placeholder(child):
                break
            prefix_len = child.key.match(key, page_size=self.page_size)
            if prefix_len < len(child.key) and not self._splittable(child, prefix_len):
                break
            child.last_access_time = access_time
            if prefix_len < len(child.key):
                node = self._split_node(child.key, child, prefix_len)
                value.append(node.value)
                break
            value.append(child.value)
            node, key = child, key[prefix_len:]
        return value, node

    def _count_hit(self, req, reused: TreeNode, deepest: TreeNode) -> None:
        """One hit per request for every context on its matched path (the scheduler may
        match a waiting request many times); what it asks after the deepest context it
        reuses whole is a held-out query of that context."""
        if req is None or req.rid in self._counted_rids or parse_namespace(req.extra_key) is not None:
            return
        self._counted_rids[req.rid] = None
        if len(self._counted_rids) > 100_000:
            self._counted_rids.pop(next(iter(self._counted_rids)))
        if reused is not self.root_node:
            self.queries.offer(reused.id, req.origin_input_ids[self._logical_len(reused):])
        now = time.monotonic()
        node = deepest
        while node is not self.root_node:
            if node.id in self.table:
                self.table.hit(node.id, now)
            node = node.parent

    # -- load back -----------------------------------------------------------------

    def init_load_back(self, params: InitLoadBackParams):
        with self.lock:
            chain = []
            node = params.best_match_node
            while node is not self.root_node and _placeholder(node):
                chain.append(node)
                node = node.parent
            chain.reverse()
            anchor = getattr(params.req, "last_node", None)
            if anchor is not None and node is not anchor:
                # The tree changed since this request was matched (another request loaded,
                # revived or dropped part of the path): indices from here would not line up
                # with the request's positions. Load nothing; it recomputes the rest.
                self.stats.stale_load_backs += 1
                return torch.empty((0,), dtype=torch.int64, device=self.device), anchor
            loaded: list[torch.Tensor] = []
            held: list[TreeNode] = []
            last = node  # the deepest GPU node
            wanted = params.host_hit_length  # tokens; a dropped node yields fewer slots
            try:
                for p in chain:
                    slots = self._load(p)
                    if slots is None:
                        break
                    self.inc_lock_ref(p)  # keep it while later loads may evict
                    held.append(p)
                    loaded.append(slots)
                    last = p
                got = sum(len(p.key) for p in held)
                if got > wanted:  # the last node was matched only in part: split it
                    keep = len(last.key) - (got - wanted)
                    if self._splittable(last, keep):
                        last = self._split_node(last.key, last, keep)
                        loaded[-1] = last.value
                    else:  # a token subset with nothing (or everything) below the split: unused
                        loaded.pop()
                        last = last.parent
            finally:
                for p in held:
                    self.dec_lock_ref(p)
            if params.req is not None and loaded:
                self._adopt_view(params.req, last)
            if not loaded:
                return torch.empty((0,), dtype=torch.int64, device=self.device), last
            return torch.cat(loaded), last

    def _read(self, node: TreeNode) -> Optional[Decoded]:
        """A placeholder's KV decoded on the cache's device; on a missing, damaged or
        undecodable blob, None, and the placeholder is gone (a miss). Nothing here waits
        for the GPU: the copy and decode are queued on the current stream."""
        stored: Stored = node.evp
        codec = get_codec(stored.codec)
        try:
            unpack = codec.unpack_host if codec.has_host_stage else None
            enc = self.tiers[stored.tier].get(stored.blob, device=self.device, unpack=unpack)
            if enc is None:
                raise CodecError("missing or damaged blob")
            if enc.shape.tokens > len(node.key) or (enc.shape.tokens < len(node.key) and not stored.token_subset):
                raise CodecError(f"blob holds {enc.shape.tokens} tokens, node has {len(node.key)}")
            k, v, positions = kv_io.decode(codec.device_codec, enc, self.device)
        except CodecError as e:
            self.stats.miss(stored.tier.label, str(e))
            self._drop_placeholder(node)
            return None
        return Decoded(k, v, enc.nbytes, positions)

    def _load(self, node: TreeNode) -> Optional[torch.Tensor]:
        """Decode one placeholder into new pool slots; None on a miss or when no room is left."""
        stored: Stored = node.evp
        t0 = time.perf_counter()
        read = self._read(node)
        if read is None:
            return None
        k, v, nbytes, positions = read
        n = k.shape[1]  # slots: fewer than len(node.key) for a token-dropped blob
        if self.token_to_kv_pool_allocator.available_size() < n:
            self._evict_with(n, protect=node)
        slots = self.token_to_kv_pool_allocator.alloc(n)
        if slots is None:
            return None  # no room even after eviction: the request recomputes the rest
        kv_io.scatter(self.kvpool, slots, k, v)
        self.tiers[stored.tier].delete(stored.blob)
        node.value = slots.to(torch.int64)
        node.evp = None
        node.evp_kept = positions
        if positions is not None:
            self.table.set_stored_tokens(node.id, n)
        if get_codec(stored.codec).lossless:
            self._verify(node, "by store + load-back")
        elif self.settings.verify:
            node.evp_fp = self._fingerprint(node)  # lossy: the reference is what came back
        self.evictable_size_ += n
        self._set_config(node, self.table.gpu_config)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        self.stats.loaded(stored.tier.label, stored.codec, len(node.key), nbytes, time.perf_counter() - t0)
        return node.value

    # -- insert --------------------------------------------------------------------

    def insert(self, params):
        with self.lock:
            result = super().insert(params)
            self._after_insert(result.last_device_node)
            return result

    def _after_insert(self, last: TreeNode | None) -> None:
        if last is not None and last is not self.root_node:
            if parse_namespace(last.key.extra_key) is None:  # profile copies are not contexts
                self._register(last)
            if self.settings.verify:
                self._fingerprint_path(last)

    def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int):
        """SGLang's, with the request's KV inserted under its logical tokens (see
        :meth:`_insert_req`) and only what the tree did not take freed."""
        if self.disable:
            return super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
        with self.lock:
            kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :kv_len_to_handle]
            dup_end = held_end = kv_len_to_handle
            if is_insert and not self.disable_finished_insert:
                dup_end, held_end, _ = self._insert_req(req, kv_len_to_handle, chunked=False)
            start = req.cache_protected_len
            self.token_to_kv_pool_allocator.free_segments([(kv[start:dup_end], start), (kv[held_end:], held_end)])
            if req.last_node is not None:
                self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req, chunked: bool = False):
        """SGLang's, for a request between prefill chunks: insert what is computed, then
        point the request at the tree's slots for it (the tree may hold fewer)."""
        if self.disable:
            return
        with self.lock:
            n = len(req.get_fill_ids())
            kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :n]
            dup_end, held_end, _ = self._insert_req(req, n, chunked)
            start = req.cache_protected_len
            self.token_to_kv_pool_allocator.free_segment(kv[start:dup_end], start_pos=start)
            new_indices, new_last = self._held_path(req, held_end)
            self.req_to_token_pool.write((req.req_pool_idx, slice(start, len(new_indices))), new_indices[start:])
            req.cache_protected_len = len(new_indices)
            self.inc_lock_ref(new_last)
            self.dec_lock_ref(req.last_node)
            req.prefix_indices = torch.cat([new_indices, kv[len(new_indices):]]) if len(new_indices) < n else new_indices
            req.last_node = new_last

    def _insert_req(self, req, slots: int, chunked: bool) -> tuple[int, int, TreeNode]:
        """Insert the KV in the first ``slots`` slots of ``req``'s row. Returns, in slots:
        where the duplicates of the tree's own slots end (free them), where what the tree
        now holds ends (free from there on), and the deepest node."""
        view = dropped.view_of(req)
        kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :slots]
        tokens = dropped.logical_tokens(req, slots)
        if view is None:
            start, base = self.root_node, 0
        else:  # below the deepest dropped node, slots and tokens line up again
            start, base = view.anchor, view.physical_prefix
            tokens = tokens[view.logical_prefix:]
        key = RadixKey(tokens, req.extra_key, is_bigram=self.is_eagle).page_aligned(self.page_size)
        values = kv[base : base + len(key)].to(dtype=torch.int64, copy=True)
        prefix, last = self._insert_helper(start, key, values, getattr(req, "priority", 0) or 0, chunked)
        held = len(key) if self._insert_stop is None else self._insert_stop
        self._after_insert(last)
        return base + prefix, base + held, last

    def _held_path(self, req, slots: int) -> tuple[torch.Tensor, TreeNode]:
        """The tree's slots (and deepest node) for the first ``slots`` slots of ``req``."""
        fill = dropped.logical_tokens(req, slots)
        m = self._match(MatchPrefixParams(key=RadixKey(fill, req.extra_key, is_bigram=self.is_eagle)))
        assert len(m.device_indices) == slots, (len(m.device_indices), slots)
        return m.device_indices, m.last_device_node

    # -- verification (debug) -------------------------------------------------------

    def _fingerprint(self, node: TreeNode) -> tuple[float, float]:
        k, v = kv_io.gather(self.kvpool, node.value)
        return float(k.double().sum()), float(v.double().sum())

    def _fingerprint_path(self, node: TreeNode) -> None:
        while node is not self.root_node and not node.evicted:
            if getattr(node, "evp_fp", None) is None:
                node.evp_fp = self._fingerprint(node)
            node = node.parent

    def _verify(self, node: TreeNode, when: str) -> None:
        """With ``verify`` on: the node's KV in the pool must still be what was inserted."""
        want = getattr(node, "evp_fp", None)
        if not self.settings.verify or want is None or node.value is None:
            return
        got = self._fingerprint(node)
        if got != want:
            self.stats.verify_mismatches += 1
            log.error("evicpress verify: KV of node %d (%d tokens) changed %s: %s != %s", node.id, len(node.key),
                      when, got, want)

    def _insert_helper(self, node: TreeNode, key: RadixKey, value, priority: int = 0, chunked: bool = False):
        """Before SGLang's insert walks the tree, revive the placeholders on the key's path
        with the KV the request has just computed (exact, so better than the blob).

        The request computed the tokens of any dropped node on the path itself, with all
        slots, so the tree's slots there would not line up with its own: an unused dropped
        node takes the request's exact KV (or, matched in part, is removed with its
        subtree); one in use stops the insert in front of it, and ``_insert_stop`` says
        how many tokens the tree now holds."""
        self._insert_stop = None
        walk, rest, offset = node, key, 0
        revived_from = None
        while len(rest) > 0:
            child = walk.children.get(rest.child_key(self.page_size))
            if child is None:
                break
            n = child.key.match(rest, page_size=self.page_size)
            if _dropped(child):
                if child.lock_ref > 0:
                    self._insert_stop = offset
                    return super()._insert_helper(node, key[:offset], value[:offset], priority, chunked)
                if n < len(child.key):
                    self._remove_subtree(child)
                    break
                self._undrop(child, value[offset : offset + n])
                revived_from = offset if revived_from is None else revived_from
            if _placeholder(child):
                if n < len(child.key):  # only part of it was recomputed: it is a miss
                    self._drop_placeholder(child)
                    break
                self._revive(child, value[offset : offset + n])
                revived_from = offset if revived_from is None else revived_from
            walk, rest, offset = child, rest[n:], offset + n
            if n < len(child.key):
                break
        prefix_len, last = super()._insert_helper(node, key, value, priority, chunked)
        # SGLang frees the caller's slots up to prefix_len as duplicates of the tree's; the
        # revived nodes now own theirs, so only what was on the GPU before counts.
        if revived_from is not None:
            prefix_len = min(prefix_len, revived_from)
        return prefix_len, last

    def _remove_subtree(self, node: TreeNode) -> None:
        """Drop an unlocked node and everything below it (children first)."""
        if _placeholder(node):
            self._drop_placeholder(node)
            return
        for child in list(node.children.values()):
            self._remove_subtree(child)
        self._drop(node)

    def _undrop(self, node: TreeNode, value: torch.Tensor) -> None:
        """An unused dropped node takes a request's exact KV for all its tokens."""
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        self.evictable_size_ += len(value) - len(node.value)
        node.value, node.evp_kept = value.clone(), None
        if node.id in self.table:
            self.table.set_stored_tokens(node.id, len(node.key))
            self.table.set_present_quality(self.table.row_of[node.id], 1.0)

    def _revive(self, node: TreeNode, value: torch.Tensor) -> None:
        stored: Stored = node.evp
        self.tiers[stored.tier].delete(stored.blob)
        node.evp = None
        node.value = value.clone()
        if node.id in self.table:
            self.table.set_stored_tokens(node.id, len(node.key))
        if self.settings.verify:
            node.evp_fp = self._fingerprint(node)
        self.evictable_size_ += len(node.key)
        if node.id in self.table:
            self._set_config(node, self.table.gpu_config)
            self.table.set_present_quality(self.table.row_of[node.id], 1.0)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)

    # -- evict ---------------------------------------------------------------------

    def evict(self, params: EvictParams) -> EvictResult:
        with self.lock:
            return self._evict_with(params.num_tokens)

    def _evict_with(self, num_tokens: int, protect: TreeNode | None = None) -> EvictResult:
        if self.disable or num_tokens <= 0:
            return EvictResult()
        start = time.perf_counter()
        freed = self.profiling.evict_idle(num_tokens)  # the profiler's copies go first
        if self.policy is not None and len(self.table) and freed < num_tokens:
            freed += self._evict_by_policy(num_tokens - freed, protect)
        if freed < num_tokens:  # policy off, or it could not free enough: stock LRU drop
            freed += super().evict(EvictParams(num_tokens=num_tokens - freed)).num_tokens_evicted
        self.stats.evict_seconds += time.perf_counter() - start
        if self.stats.exporter is not None:
            self.stats.exporter.usage(self._tier_bytes())
        return EvictResult(num_tokens_evicted=freed)

    def _evict_by_policy(self, num_tokens: int, protect: TreeNode | None) -> int:
        t = self.table
        rows = t.rows()
        movable = ~t.in_use[rows]
        if protect is not None and protect.id in t:
            movable[np.searchsorted(rows, t.row_of[protect.id])] = False
        cap = np.array([
            max(self._gpu_tokens() - self.profiling.held_tokens() - num_tokens, 0) * self.token_bytes,
            self._plannable(Tier.HOST),
            self._plannable(Tier.DISK),
        ], dtype=np.float64)
        placed, new = self.policy.place(cap, time.monotonic(), movable)
        old = t.assign[placed]
        moves = [(int(r), int(c)) for r, c, o in zip(placed, new, old) if c != o and self._is_demotion(r, o, c)]
        depth = {r: len(self._path(self.nodes[t.keys[r]])) for r, _ in moves}
        # Slowest destination first, so a tier is emptied before it is filled; within one
        # destination, recompressions of what the tier already holds (they free room) before
        # new arrivals, and children before parents (a node leaves the GPU only as a leaf).
        order = sorted(moves, key=lambda m: (-int(t.tier_of[m[1]]), t.tier_of[t.assign[m[0]]] != t.tier_of[m[1]],
                                             -depth[m[0]]))
        freed = 0
        for r, c in order:
            node = self.nodes.get(t.keys[r]) if t.keys[r] is not None else None
            if node is not None:
                freed += self._move(node, c)
        return freed

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
        unseen = max(0.0, u.used_bytes - float(t.sizes[here, t.assign[here]].sum()))
        return max(0.0, 0.99 * u.capacity_bytes - unseen - 512.0 * (u.entries + 16))

    def _is_demotion(self, row: int, old: int, new: int) -> bool:
        """Only moves down are carried out at eviction time (a move up would need a load):
        to a slower tier, or to a smaller codec in the same stored tier."""
        t_old, t_new = self.table.tier_of[old], self.table.tier_of[new]
        if t_new != t_old:
            return t_new > t_old
        return t_new != Tier.GPU and self.table.sizes[row, new] < self.table.sizes[row, old]

    def _move(self, node: TreeNode, config: int) -> int:
        """Carry out one demotion; returns GPU tokens freed."""
        target = self.table.configs[config]
        if any(not _placeholder(c) for c in node.children.values()) and not node.evicted:
            return 0  # a child still on the GPU: not a leaf (the policy's repair should prevent it)
        if target.tier == Tier.DROP:
            return self._drop(node)
        if node.evicted:  # placeholder -> slower tier or harder codec
            return self._restore_and_store(node, target, config)
        return self._store(node, target, config)

    def _drop(self, node: TreeNode) -> int:
        if _placeholder(node):
            self._drop_placeholder(node)
            self.stats.dropped += 1
            return 0
        if node.lock_ref > 0:
            return 0
        self.stats.dropped += 1
        return self._free_node(node)

    def _free_node(self, node: TreeNode) -> int:
        """Free an unlocked GPU leaf's slots and take it out of the tree; returns the slots freed."""
        n = len(node.value)
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        self._delete_leaf(node)
        self._record_remove_event(node)
        return n

    def _store(self, node: TreeNode, target, config: int) -> int:
        if node.lock_ref > 0:
            return 0
        self._verify(node, "between insert and eviction")
        k, v = kv_io.gather(self.kvpool, node.value)
        positions = getattr(node, "evp_kept", None)
        stored = Stored(target.tier, self._blob_codec(target.codec, positions), uuid.uuid4().hex)
        if not self._put(stored, node, k, v, positions):
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
        read = self._read(node)
        if read is None:
            return 0
        # The KV is in memory now: free the old blob first, so recompressing inside a full
        # tier does not need room for both copies at once.
        self.tiers[stored.tier].delete(stored.blob)
        new = Stored(target.tier, self._blob_codec(target.codec, read.positions), uuid.uuid4().hex)
        if not self._put(new, node, read.k, read.v, read.positions):
            self._drop_placeholder(node)  # its KV is gone with the old blob: a miss from now on
            return 0
        node.evp = new
        self._after_store(node, config)
        return 0

    @staticmethod
    def _blob_codec(codec: str, positions: torch.Tensor | None) -> str:
        """A token subset is stored with its positions and is not dropped again (keep+<quantizer>)."""
        return codec if positions is None else subset_codec(codec)

    def _put(self, stored: Stored, node: TreeNode, k: torch.Tensor, v: torch.Tensor,
             positions: torch.Tensor | None = None) -> bool:
        """Encode on the device and hand the blob to its tier, which copies it out (and
        entropy-codes it) without the scheduler waiting; the seconds counted are the
        scheduler's own. ``positions``: those of a token subset's tokens in the node."""
        t0 = time.perf_counter()
        codec = get_codec(stored.codec)
        if stored.token_subset:
            enc = codec.device_codec.encode(k, v, positions=positions)
        else:
            enc = codec.device_codec.encode(k, v)
        meta = None
        if stored.tier == Tier.DISK:  # enough to re-attach the blob to a new tree after a restart
            meta = {"tokens": list(self._path_tokens(node)), "own": len(node.key), "extra_key": node.key.extra_key,
                    "codec": stored.codec}
        try:
            self.tiers[stored.tier].put(stored.blob, enc, meta,
                                        pack=codec.pack_host if codec.has_host_stage else None)
        except TierError as e:
            log.warning("evicpress: %s tier refused %d tokens (%s); dropping them instead", stored.tier.label,
                        len(node.key), e)
            self.stats.tier_errors += 1
            return False
        self.stats.stored(stored.tier.label, stored.codec, len(node.key), k.numel() * 2 * k.element_size(),
                          enc.nbytes, time.perf_counter() - t0)
        return True

    def _after_store(self, node: TreeNode, config: int) -> None:
        r = self.table.row_of[node.id]
        self.table.set_present_quality(r, min(self.table.present_quality[r], self.table.quality[r, config]))
        self.table.assign[r] = config
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)

    def _path_tokens(self, node: TreeNode) -> array:
        out = array("q")
        for n in self._path(node):
            out.extend(n.key.token_ids)
        return out

    # -- restart -------------------------------------------------------------------

    def _restore_from_disk(self) -> None:
        """Re-attach disk blobs written before a restart as placeholders (prefix order);
        a blob whose prefix is not on disk too cannot be used and is deleted."""
        disk = self.tiers.get(Tier.DISK)
        if disk is None:
            return
        entries = []
        for blob in disk.keys():
            meta = disk.meta(blob)
            if not meta or self._config_index(Tier.DISK, str(meta.get("codec"))) is None:
                disk.delete(blob)
                continue
            entries.append((len(meta["tokens"]), blob, meta))
        restored = 0
        for _, blob, meta in sorted(entries, key=lambda e: e[0]):
            tokens = array("q", meta["tokens"])
            own = int(meta["own"])
            key = RadixKey(tokens, meta.get("extra_key"))
            parent = self._find_exact(key[: len(tokens) - own])
            child_key = key[len(tokens) - own :]
            if parent is None or own <= 0 or child_key.child_key(self.page_size) in parent.children:
                disk.delete(blob)
                continue
            node = TreeNode()
            node.parent, node.key, node.value = parent, child_key, None
            node.evp = Stored(Tier.DISK, meta["codec"], blob)
            parent.children[child_key.child_key(self.page_size)] = node
            self._register(node)
            self._set_config(node, self._config_index(Tier.DISK, meta["codec"]))
            restored += 1
        if restored:
            log.info("evicpress: re-attached %d disk entries from %s", restored, disk.root)

    def _find_exact(self, key: RadixKey) -> TreeNode | None:
        """The node whose path is exactly ``key`` (root for an empty key)."""
        node = self.root_node
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None or len(child.key) > len(key) or child.key.match(key, self.page_size) != len(child.key):
                return None
            node, key = child, key[len(child.key):]
        return node

    # -- SGLang helpers that walk values -----------------------------------------------

    def all_values_flatten(self) -> torch.Tensor:
        values = []
        stack = [self.root_node]
        while stack:
            for child in stack.pop().children.values():
                if not child.evicted:
                    values.append(child.value)
                    stack.append(child)
        return torch.cat(values) if values else torch.empty(0, dtype=torch.int64, device=self.device)

    # -- status --------------------------------------------------------------------

    def _gpu_tokens(self) -> int:
        return self.evictable_size_ + self.protected_size_

    def _tier_bytes(self) -> dict[str, int]:
        used = {"gpu": self._gpu_tokens() * self.token_bytes}
        return used | {tier.label: store.usage().used_bytes for tier, store in self.tiers.items()}

    def status(self) -> dict:
        with self.lock:
            tiers = {"gpu": {"used_bytes": self._gpu_tokens() * self.token_bytes, "tokens": self._gpu_tokens()}}
            for tier, store in self.tiers.items():
                u = store.usage()
                tiers[tier.label] = {"used_bytes": u.used_bytes, "capacity_bytes": u.capacity_bytes,
                                     "entries": u.entries, **u.counters}
            return {
                "policy": self.settings.policy,
                "weights": {"alpha": self.settings.alpha, "quality_floor": self.settings.quality_floor},
                "tiers": tiers,
                "contexts": len(self.table),
                "stats": self.stats.to_dict(),
                "placements": self._top_placements(self.settings.status_top),
                "profiler": self.profiling.status(),
                "cost_model": {"prefill_s_per_token": self.cost.prefill_s_per_token, "host_bw": self.cost.host_bw,
                               "disk_bw": self.cost.disk_bw},
            }

    def _top_placements(self, n: int) -> list[dict]:
        t = self.table
        rows = t.rows()
        if rows.size == 0 or n == 0:
            return []
        now = time.monotonic()
        freq = t.frequency(rows, now)
        top = np.argsort(-freq)[:n]
        order = rows[top]
        util = None
        if self.policy is not None and hasattr(self.policy, "utility"):
            util = self.policy.utility(order, now)
        out = []
        for i, r in enumerate(order):
            cfg = t.configs[t.assign[r]]
            out.append({"node": int(t.keys[r]), "tokens": int(t.tokens[r]), "config": cfg.label,
                        "frequency": float(freq[top[i]]),
                        "quality": float(t.present_quality[r]),
                        "held_out_queries": len(self.queries.queries(t.keys[r])),
                        "profiled_quality": self.profiling.measured(t.keys[r]),
                        "utility": None if util is None else float(util[i, t.assign[r]])})
        return out


def build(ctx, settings: Settings | None = None) -> EvicPressRadixCache:
    """The factory SGLang's ``--radix-cache-backend evicpress`` calls."""
    from ..settings import load_settings

    settings = settings or load_settings()
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.enable_hierarchical_cache:
        raise SettingsError("evicpress: needs a plain full-attention model without --enable-hierarchical-cache")
    return EvicPressRadixCache(ctx.params, settings)
