"""Matching a request's prefix: SGLang's walk over GPU nodes, continued through
placeholders (their tokens are reported as ``host_hit_length`` for SGLang to load back),
the request's physical view over token-dropped nodes, and hit counting."""

from __future__ import annotations

import time

from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..policy import Tier
from . import dropped
from .nodes import is_dropped, is_placeholder
from .content_keys import token_hash
from .profile_job import parse_namespace
from .tree import TreeBookkeeping

#: A reuse offers its query to the deepest context it reused whole and this many in all up
#: its path (a bound for deep chat histories, where every turn is a node).
HELD_OUT_LEVELS = 4


class PrefixMatch(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`: the match side."""

    def _match_request(self, params: MatchPrefixParams) -> MatchResult:
        self._forget_lost_blobs()
        req = params.req
        old = dropped.restore_logical(req) if req is not None else None
        if old is not None:  # match what the request really says, not its last physical view
            key = params.key
            limit = len(key) + old.offset
            params = MatchPrefixParams(key=RadixKey((req.origin_input_ids + req.output_ids)[:limit], key.extra_key,
                                                    is_bigram=key.is_bigram), cow_mamba=params.cow_mamba, req=req)
        profiling = req is not None and parse_namespace(params.key.extra_key) is not None
        refusal = self.profiling.ensure(params.key) if profiling else None
        result = self._match(params, by_content=True)
        if req is not None:
            self._adopt_view(req, result.last_device_node)
        if profiling:
            self.profiling.matched(params.key, req.rid,
                                   self._logical_len(result.last_device_node) + result.host_hit_length, refusal)
        return result

    def _match(self, params: MatchPrefixParams, by_content: bool = False) -> MatchResult:
        """SGLang's match over GPU nodes, continued through placeholders (host_hit_length);
        ``by_content``: where nothing in the tree continues, look for a stored context
        (only a request's match does; internal re-matches never attach anything)."""
        result = super().match_prefix(params)
        key = params.key
        if self.disable or len(key) == 0:
            return result
        node = result.last_device_node
        key = key.page_aligned(self.page_size)[self._logical_len(node):]
        host_hit, best = 0, node
        while len(key) > 0 and self.health.loads_allowed:
            child = node.children.get(key.child_key(self.page_size))
            if child is None and by_content:  # a context stored earlier, here or by another server, may continue
                child = self._attach_by_content(node, key)
            if child is None or not is_placeholder(child):
                break
            if child.evp.tier == Tier.REMOTE and not self._remote_ready(child):
                break  # its read has not arrived yet: the request recomputes from here
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

    def _attach_by_content(self, node: TreeNode, key: RadixKey) -> TreeNode | None:
        """A dormant disk blob or a shared context continuing the path at ``node``. Under TP
        every rank looks (each for its own shard) and attaches only the context every rank
        found, so no rank's tree gains a node another's lacks; a shared one also only if
        every rank could stage it."""
        if not self.sync.on:
            return self._attach_dormant(node, key) or self._attach_shared(node, key)
        if not self._lookups:  # agreed: no rank has dormant blobs and no store is configured
            return None
        dormant = self._find_dormant(node, key)
        shared = None if dormant is not None else self._find_shared(node, key)
        same_dormant, same_shared = self.sync.same([
            _content_id(dormant[1].tokens, dormant[1].extra_key) if dormant is not None else -1.0,
            _content_id(shared.key.token_ids, shared.key.extra_key) if shared is not None else -1.0])
        if same_dormant and dormant is not None:
            return self._attach_dormant_entry(node, *dormant)
        if not (same_shared and shared is not None):
            return None
        stored = self._stage_shared(shared)
        if not self.sync.all_ok(stored is not None):
            if stored is not None:
                self._tier_delete(stored)
            return None
        return self._attach_placeholder(node, shared.key, stored, shared.config)

    def _adopt_view(self, req, last: TreeNode) -> None:
        """Give ``req``, from its logical tokens, the physical view the path to ``last`` needs, if any."""
        dropped.restore_logical(req)
        path = self._path(last)
        deepest = max((i for i, n in enumerate(path) if is_dropped(n)), default=None)
        if deepest is None:
            return
        upto = path[: deepest + 1]
        dropped.to_physical(req, sum(len(n.key) for n in upto), sum(len(n.value) for n in upto), upto[-1])

    def _match_prefix_helper(self, node: TreeNode, key: RadixKey):
        """SGLang's walk over GPU nodes, stopping at the first placeholder (whose KV is not
        in the pool); :meth:`_match` continues from there."""
        access_time = time.monotonic()
        node.last_access_time = access_time
        value = []
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None or is_placeholder(child):
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
        match a waiting request many times); what it asks after a context it reuses whole
        is a held-out query of that context, for the deepest one and the ones above it
        (questions that share their first words split the tree below a document, and the
        document is still what they were asked about), as long as the whole of it fits a
        held-out query: above that it would be the head of another document, not a question.
        Only contexts the profiler could measure hold queries (:meth:`_holds_queries`): the
        few words such a split leaves below a document pass theirs up."""
        if req is None or req.rid in self._counted_rids or parse_namespace(req.extra_key) is not None:
            return
        self._counted_rids[req.rid] = None
        if len(self._counted_rids) > 100_000:
            self._counted_rids.pop(next(iter(self._counted_rids)))
        node, start, level = reused, self._logical_len(reused), 0
        asked = len(req.origin_input_ids)
        while node is not self.root_node and level < HELD_OUT_LEVELS:
            fits = node is reused or asked - start <= self.queries.max_tokens  # above: only if the question fits
            if fits and self._holds_queries(node):
                self.queries.offer(node.id, req.origin_input_ids[start:])
            start -= len(node.key)
            node, level = node.parent, level + 1
        now = self._now()
        node = deepest
        while node is not self.root_node:
            if node.id in self.table:
                self.table.hit(node.id, now)
            node = node.parent


def _content_id(tokens, extra_key: str | None) -> float:
    """A found context's identity as an exact float64 (48 bits of its hash)."""
    return float(int(token_hash(extra_key, tokens)[:12], 16))
