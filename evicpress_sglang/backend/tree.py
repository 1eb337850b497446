"""The cache's bookkeeping around SGLang's radix tree: a policy-table row per context,
splits and deletions that respect placeholders and dropped nodes, and path helpers.

Invariant: a placeholder's children are placeholders (a context is never on a faster
tier than its prefix), so a match is always a run of GPU nodes followed by a run of
placeholders.
"""

from __future__ import annotations

import time
from array import array

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from ..codecs import subset_codec
from ..policy import Tier
from .content_keys import token_hash
from .memory import Learnt
from .nodes import Stored, is_dropped, is_placeholder, kept_below, missing_slots


class TreeBookkeeping(RadixCache):
    """Mixin of :class:`~.cache.EvicPressRadixCache`: the tree, its table rows and paths."""

    # -- table rows ----------------------------------------------------------------

    def _register(self, node: TreeNode) -> None:
        """Make sure every node on the path to ``node`` has a table row (top-down)."""
        path = []
        while node is not self.root_node and node.id not in self.table:
            path.append(node)
            node = node.parent
        for n in reversed(path):
            parent = None if n.parent is self.root_node else n.parent.id
            r = self.table.insert(n.id, len(n.key), self._now(), parent)
            self.table.set_in_use(r, n.lock_ref > 0)
            self.nodes[n.id] = n
            if len(self.memory):
                self._recall(n)

    def _set_config(self, node: TreeNode, config: int) -> None:
        self.table.set_assign(self.table.row_of[node.id], config)

    def _config_index(self, tier: Tier, codec: str) -> int | None:
        """The configuration a blob of ``codec`` in ``tier`` belongs to (a keep+ blob: the
        configuration whose codec stores a token subset that way); None if not enabled."""
        here = [(i, c.codec) for i, c in enumerate(self.table.configs) if c.tier == tier]
        exact = [i for i, c in here if c == codec]
        subset = [i for i, c in here if subset_codec(c) == codec]
        return (exact + subset + [None])[0]

    def _forget(self, node: TreeNode) -> None:
        if node.id in self.table:
            self.table.remove(node.id)
        self.nodes.pop(node.id, None)
        queries, seen = self.queries.forget(node.id)
        record = self.profiling.forget(node.id)
        if queries or record is not None:  # remembered by content (see .memory)
            self.memory.keep(self._start_hash(node, node.key.extra_key), Learnt(queries, seen, record))

    def _recall(self, node: TreeNode) -> None:
        """A context that was dropped and is back (recomputed): what was learnt about it."""
        learnt = self.memory.recall(self._start_hash(node, node.key.extra_key))
        if learnt is None:
            return
        if not self._holds_queries(node):  # it came back as a few words below a document (a split)
            self._pass_queries_up(node, learnt.queries, learnt.seen)
            return
        self.queries.restore(node.id, learnt.queries, learnt.seen)
        if learnt.record is not None:
            self.profiling.restore(node.id, learnt.record)

    # -- tree changes ----------------------------------------------------------------

    def _split_node(self, key: RadixKey, child: TreeNode, split_len: int) -> TreeNode:
        if is_placeholder(child) or not self._splittable(child, split_len):
            raise RuntimeError(f"evicpress: node {child.id} cannot be split at {split_len}")
        return self._cut(key, child, split_len)

    def _cut(self, key: RadixKey, child: TreeNode, split_len: int) -> TreeNode:
        """:meth:`_split_node` without its check: the head of a dropped node may come out with no
        slot, for a caller that gives it a request's exact KV at once (``insert._insert_helper``)."""
        value, kept = child.value, getattr(child, "evp_kept", None)
        new_node = super()._split_node(key, child, split_len)
        if kept is not None:  # slots follow the kept positions, not the token count
            cut = kept_below(kept, split_len)
            new_node.value, child.value = value[:cut].clone(), value[cut:].clone()
            new_node.evp_kept, child.evp_kept = kept[:cut], kept[cut:] - split_len
        if getattr(self, "_ready", False) and self.settings.verify and getattr(child, "evp_fp", None) is not None:
            for part in (new_node, child):  # both halves get their own reference
                part.evp_fp = None if part.value is None else self._fingerprint(part)
        if child.id in self.table:
            self.table.split(child.id, new_node.id, split_len)
            self.nodes[new_node.id] = new_node
            if len(self.memory):  # the prefix may be a context that was dropped before
                self._recall(new_node)
            self._split_queries(new_node, child)
            if kept is not None:
                self.table.set_stored_tokens(new_node.id, len(new_node.value))
                self.table.set_stored_tokens(child.id, len(child.value))
        return new_node

    def _holds_queries(self, node: TreeNode) -> bool:
        """Whether ``node`` keeps held-out queries: only a context the profiler makes jobs for,
        one with ``profile_min_tokens`` of its own. The rest are mostly a question's first words
        split below a document; what is asked after them is the document's."""
        return len(node.key) >= self.settings.profile_min_tokens

    def _split_queries(self, head: TreeNode, tail: TreeNode) -> None:
        """``tail``'s queries after a split at the start of its key: each was asked after the
        whole of it, so it is also one of ``head``'s (or, if ``head`` is too short to hold
        queries, of the first context above that does); ``tail`` keeps its own only if it still
        holds queries."""
        queries, seen = self.queries.queries(tail.id), self.queries.seen(tail.id)
        if not self._holds_queries(tail):
            self.queries.forget(tail.id)
        self._pass_queries_up(tail, queries, seen)

    def _pass_queries_up(self, node: TreeNode, queries: list, seen: int) -> None:
        """Give ``queries`` (a sample of ``seen`` asked after ``node``) to the nearest context
        above ``node`` that holds queries, behind the tokens in between, those that still fit a
        held-out query (as in :meth:`_count_hit`)."""
        words: list[int] = []
        while node.parent is not None and node.parent is not self.root_node and queries:
            words = [*node.key.token_ids[: len(node.key)], *words]  # a bigram key holds one token more
            node = node.parent
            fits = [q for q in queries if len(words) + len(q) <= self.queries.max_tokens]
            seen = round(seen * len(fits) / len(queries))
            queries = fits
            if queries and self._holds_queries(node):
                self.queries.merge(node.id, [[*words, *q] for q in queries], seen)
                return

    def _splittable(self, node: TreeNode, split_len: int) -> bool:
        """A dropped node splits only where both sides keep at least one slot."""
        return not is_dropped(node) or 0 < kept_below(node.evp_kept, split_len) < len(node.value)

    def _delete_leaf(self, node: TreeNode) -> None:
        self._drop_placeholders_below(node)
        missing = missing_slots(node)
        super()._delete_leaf(node)
        self.evictable_size_ += missing  # SGLang took len(key); the node held fewer slots
        node.evp_kept = None
        self._forget(node)

    def _free_node(self, node: TreeNode) -> int:
        """Free an unlocked GPU leaf's slots and take it out of the tree; returns the slots freed."""
        n = len(node.value)
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        self._delete_leaf(node)
        self._record_remove_event(node)
        return n

    def _drop_placeholders_below(self, node: TreeNode) -> None:
        for child in list(node.children.values()):
            if is_placeholder(child):
                self._drop_placeholder(child)

    def _drop_placeholder(self, node: TreeNode) -> None:
        """Remove a placeholder, its blob and everything below it from the tree."""
        self._drop_placeholders_below(node)
        stored: Stored = node.evp
        self._tier_delete(stored)
        node.parent.children.pop(node.key.child_key(self.page_size), None)
        node.evp = None
        self._forget(node)
        self._update_leaf_status(node.parent)

    def _agreed_miss(self, node: TreeNode) -> None:
        """Another rank missed this placeholder (this one may have already): it goes here too."""
        if is_placeholder(node):
            self.stats.miss(node.evp.tier.label, "missed on another tensor-parallel rank")
            self._drop_placeholder(node)

    def _attach_placeholder(self, parent: TreeNode, key: RadixKey, stored: Stored, config: int) -> TreeNode:
        """A new placeholder child of ``parent`` for a blob found by content."""
        child = TreeNode()
        child.parent, child.key, child.value = parent, key, None
        child.evp = stored
        parent.children[key.child_key(self.page_size)] = child
        self._register(child)
        self._set_config(child, config)
        return child

    def _forget_lost_blobs(self) -> None:
        """Placeholders whose blob a tier lost in the background (a failed disk write) are
        misses from now on: remove them, so every placeholder left holds a blob. Under TP
        this waits for the next eviction round (:meth:`_agree_round`), where every rank
        removes what any rank lost; a load before then is an agreed miss."""
        if not self.sync.on:
            self._drop_lost(self._lost_here())

    def _lost_here(self) -> list[TreeNode]:
        lost = {(tier, key) for tier, store in self.tiers.items() for key in store.take_lost()}
        if not lost:
            return []
        return [n for n in self.nodes.values() if is_placeholder(n) and (n.evp.tier, n.evp.blob) in lost]

    def _drop_lost(self, nodes: list[TreeNode]) -> None:
        for node in nodes:
            if is_placeholder(node):  # not yet removed with a lost ancestor
                self.stats.miss(node.evp.tier.label, "its background write failed")
                self._drop_placeholder(node)

    # -- agreement between tensor-parallel ranks (see tp_sync) ------------------------

    def _now(self) -> float:
        """The time the policy's table stamps hits and inserts with and decays to. Alone:
        this process's clock. Under TP: the clock rank 0 sent at the last eviction round,
        so every rank stamps and decays with the same numbers at no extra collective per
        request; hits between two rounds share one stamp, which undervalues them against
        older hits by at most a factor 2^(-gap / half_life) (gap: time between rounds)."""
        return self._clock if self.sync.on else time.monotonic()

    def _agree_round(self) -> float:
        """Before each eviction decision, which every rank reaches in the same step: take
        rank 0's clock and learnt prefill rate (the drop price), whether any rank still has
        dormant blobs or is degraded, and remove on every rank the placeholders whose blob
        any rank lost. Returns the time to decide with."""
        if not self.sync.on:
            self._forget_lost_blobs()
            return time.monotonic()
        lost = self._lost_here()
        (now, rate), (most_lost, no_dormant, healthy) = self.sync.agree(
            bcast=[time.monotonic(), self.cost.prefill_s_per_token],
            mins=[-len(lost), not self.dormant, self.health.degraded is None])
        self._clock = max(self._clock, now)
        self.cost.prefill_s_per_token = rate
        self._lookups = self.shared is not None or not no_dormant
        if not healthy:
            self._degrade("another tensor-parallel rank is degraded")
        if most_lost < 0:  # blob ids are per rank: agree by the context's path
            paths = set().union(*self.sync.gather(sorted(self._path_id(n) for n in lost)))
            self._drop_lost([n for n in list(self.nodes.values()) if is_placeholder(n) and self._path_id(n) in paths])
        return self._clock

    def _path_id(self, node: TreeNode) -> str:
        """A node's identity on every rank: its namespace and the tokens from the root."""
        return self._start_hash(node, node.key.extra_key)

    def _tier_delete(self, stored: Stored) -> None:
        """Delete a blob; a tier that fails to delete keeps an orphan, which its capacity
        accounting still counts: never worth failing the caller for."""
        tier = self.tiers.get(stored.tier)
        if tier is None:
            return
        try:
            tier.delete(stored.blob)
        except Exception as e:  # noqa: BLE001 - any tier's failure is the same non-event here
            self.stats.tier_errors += 1
            self.health.note_tier_failure(f"{stored.tier.label} delete", e)

    # -- lock counts ----------------------------------------------------------------

    # SGLang moves len(key) tokens between evictable and protected per node; a dropped
    # node holds fewer slots, so the difference is given back after each walk.

    def _mark_in_use(self, node: TreeNode) -> None:
        """Mirror the lock counts of the path into the table, so an eviction reads which
        contexts may move from one column instead of visiting every node."""
        t = self.table
        for n in self._path(node) if node is not None else ():
            r = t.row_of.get(n.id)
            if r is not None:
                t.set_in_use(r, n.lock_ref > 0)

    def _lock_fix(self, node: TreeNode, lock_ref: int) -> int:
        """Missing slots of dropped nodes on the path whose lock count is ``lock_ref``
        (those SGLang is about to move between evictable and protected)."""
        fix = 0
        while node is not None and node is not self.root_node:
            if node.lock_ref == lock_ref:
                fix += missing_slots(node)
            node = node.parent
        return fix

    # -- paths ----------------------------------------------------------------------

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

    def _path_tokens(self, node: TreeNode) -> array:
        out = array("q")
        for n in self._path(node):
            out.extend(n.key.token_ids)
        return out

    def _start_hash(self, node: TreeNode, extra_key: str | None) -> str:
        """Hash of the tokens from the root to ``node``: what a stored context that continues
        at ``node`` is indexed by, on disk and in the shared store."""
        return token_hash(extra_key, self._path_tokens(node))

    def _find_exact(self, key: RadixKey) -> TreeNode | None:
        """The node whose path is exactly ``key`` (root for an empty key)."""
        node = self.root_node
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None or len(child.key) > len(key) or child.key.match(key, self.page_size) != len(child.key):
                return None
            node, key = child, key[len(child.key):]
        return node

    def _gpu_tokens(self) -> int:
        return self.evictable_size_ + self.protected_size_

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
