"""Contexts shared between servers through a remote store (Mooncake), and the remote tier's reads.

Every context this server stores in a lower tier is *published* too, under a key any
server computes from a request alone. Where a context starts in a tree depends on that
server's history (two documents with a common header split after the header in one tree
and not in another), so keys are not taken at context starts but at fixed *anchors*, every
``anchor_tokens`` (A) tokens, as SGLang HiCache keys pages: a context spanning positions
``[s, e)`` is published as the KV of ``[a, e)``, ``a`` the anchor at or before ``s`` (the
tokens before ``s`` come from its ancestors on the GPU), under the layout fingerprint and
the hash of the tokens up to ``a + A``. A server whose match ends at ``m`` asks for the key
of its own anchor window, made of its request's tokens; a blob found there starts at or
before ``m``, and the tokens before ``m`` are loaded and let go. Blob and request meet when
``s`` and ``m`` fall in one window; a context shorter than its window's end is not shared.

A found blob whose tokens the request continues is staged in host memory and attached as a
placeholder, so the ordinary load-back brings it to the GPU (split there if the request
uses only part of it). Blobs are immutable: two servers publishing the same context write
the same key, and the first one stays; the tokens stored beside a blob are checked before
it is used, so a key that another context took first is a miss. An unreachable store is a
miss; the remote tier logs it once and stops asking for a while.

No read from the store runs on the scheduler's thread (:mod:`.prefetch`): when a request
arrives, :meth:`SharedContexts._prefetch_for` starts the reads its match will want (the
shared context where its match ends, the blobs of remote-tier placeholders on its path),
:meth:`SharedContexts._held_for_prefetch` keeps it out of prefill while they run (at most
about as long as recomputing it would take), and the match uses what has arrived.
"""

from __future__ import annotations

import functools
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..codecs import CodecError, EncodedKV, drops_tokens, get_codec
from ..policy import Tier
from ..tiers import TierError
from ..tiers.base import Pack
from . import kv_io
from .content_keys import token_hash
from .nodes import Stored, is_dropped, is_placeholder
from .tree import TreeBookkeeping

#: The longest a request is held for its reads, however long recomputing it would take.
MAX_WAIT_S = 2.0
_REMEMBERED = 100_000  # keys remembered as published
READ_SAMPLE_BYTES = 1 << 20  # reads smaller than this say more about latency than about speed


class SharedContexts(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`; ``self.shared`` is the remote tier or None."""

    def _shared_key(self, extra_key: str | None, tokens) -> str:
        """The store's key for the anchor window that ends where ``tokens`` (from the root) end."""
        return f"{self.fingerprint}-{token_hash(extra_key, tokens)}"

    def _window(self, start: int) -> tuple[int, int]:
        """(the anchor at or before ``start``, the end of its window)."""
        a = start - start % self.shared.options.anchor_tokens
        return a, a + self.shared.options.anchor_tokens

    def _publish(self, node: TreeNode, codec: str, enc: EncodedKV, pack: Pack | None) -> None:
        """Offer a context just stored here to the other servers (queued; never waits): the KV
        from its anchor on (re-encoded with its ancestors' tokens when it starts after the
        anchor: only while those and the context are on the GPU)."""
        if self.shared is None or drops_tokens(get_codec(codec)):
            return
        tokens = self._path_tokens(node)
        start = len(tokens) - len(node.key)
        a, b = self._window(start)
        if len(tokens) <= b:
            return  # ends inside its window: no request can name it (and it is cheap to recompute)
        extra_key = node.key.extra_key
        key = self._shared_key(extra_key, tokens[:b])
        if key in self._published:
            return
        meta = {"codec": codec, "start": a, "tokens": list(tokens[a:]), "extra_key": extra_key}
        try:
            if a < start:
                slots = self._slots_back_to(node, start - a)
                if slots is None:
                    return
                enc = kv_io.encode_from_pool(self.kvpool, slots, get_codec(codec))
            self.shared.put(key, enc, meta, pack=pack)
        except (TierError, OSError, CodecError, RuntimeError) as e:
            # Publishing is an extra: the context is stored here whatever happens to it (a full
            # store, the re-encode out of GPU memory), so a failure is logged once, not raised.
            self.health.note_tier_failure("publishing a shared context", e)
            return
        _remember(self._published, key, True)
        self.stats.published += 1

    def _slots_back_to(self, node: TreeNode, before: int) -> torch.Tensor | None:
        """The pool slots of ``node`` and of the ``before`` tokens preceding it on its path;
        None unless all of them are on the GPU, one slot per token."""
        parts, node_ = [], node
        need = before + len(node.key)
        while need > 0 and node_ is not self.root_node:
            if node_.value is None or is_dropped(node_):
                return None
            take = min(need, len(node_.value))
            parts.append(node_.value[len(node_.value) - take:])
            need -= take
            node_ = node_.parent
        return None if need > 0 else torch.cat(parts[::-1])

    def _attach_shared(self, node: TreeNode, key: RadixKey) -> TreeNode | None:
        """A context another server published that continues the path at ``node`` with the
        first tokens of ``key``: staged in host memory and attached as a placeholder."""
        found = self._find_shared(node, key)
        stored = None if found is None else self._stage_shared(found)
        return None if stored is None else self._attach_placeholder(node, found.key, stored, found.config)

    def _find_shared(self, node: TreeNode, key: RadixKey) -> "SharedHit | None":
        """The published context :meth:`_attach_shared` would attach, read but not staged
        (ranks agree on it first): only if its read has finished (one is started if none
        was); never waits for the store."""
        if self.shared is None or Tier.HOST not in self.tiers or key.child_key(self.page_size) in node.children:
            return None
        here = self._path_tokens(node)
        m = len(here)
        a, b = self._window(m)
        if m + len(key) <= b:
            return None
        name = self._shared_key(key.extra_key, here + key.token_ids[: b - m])
        done, _ = self.prefetch.result(name)
        if not done:
            self.prefetch.start(name, functools.partial(self._read_shared, name, self._wait_s(len(key))))
            return None
        found = self.prefetch.take(name)
        if found is None:
            return None
        enc, meta = found
        try:
            codec = get_codec(str(meta["codec"]))
            tokens, extra_key, start = array("q", meta["tokens"]), meta.get("extra_key"), int(meta["start"])
        except (CodecError, KeyError, TypeError, ValueError) as e:
            self.stats.miss("remote", f"unusable shared blob: {e}")
            return None
        child_key = RadixKey(tokens[m - a:], extra_key)
        name_here = codec.device_codec.name
        config = self._config_index(Tier.HOST, name_here)
        if (start != a or extra_key != key.extra_key or tokens[: m - a] != here[a:] or len(child_key) == 0
                or child_key.match(key, page_size=self.page_size) == 0 or config is None
                or enc.shape.tokens != len(tokens)):
            self.stats.miss("remote", "shared blob does not continue the request here")
            return None
        return SharedHit(child_key, enc, name_here, config, offset=m - a)

    def _wait_s(self, tokens: int) -> float:
        """How long a request may wait for a shared context of up to ``tokens`` tokens: about
        as long as recomputing them, since waiting longer cannot win."""
        return min(MAX_WAIT_S, self.cost.prefill_s_per_token * tokens)

    def _read_shared(self, name: str, wait_s: float) -> tuple[tuple[EncodedKV, dict] | None, int]:
        """On a prefetch worker: the published blob ``name`` with its meta, its lossless host
        stage undone, in host memory; None when absent, damaged or unusable, or when at the
        store's measured speed it could not arrive within ``wait_s`` (the request prefills at
        once instead of waiting for nothing)."""
        budget = (wait_s - self.cost.remote_latency) * self.cost.remote_bw
        started = time.perf_counter()
        found = self.shared.get_with_meta(name, device="cpu", max_bytes=budget)
        if found is None or found[1] is None:
            return None, 0
        enc, meta = found
        self._observe_read(enc.nbytes, time.perf_counter() - started)
        try:
            codec = get_codec(str(meta["codec"]))
        except (CodecError, KeyError, TypeError):
            return found, enc.nbytes  # the match reports it as unusable
        if codec.has_host_stage and enc.codec != codec.device_codec.name:
            enc = codec.unpack_host(enc)
        return (enc, meta), enc.nbytes

    # -- reads ahead of the match (see the module docstring) ---------------------------

    def _prefetch_for(self, req) -> None:
        """A request arrived: start the remote reads its match will want. Walks the tree
        without changing it: through the nodes the request continues, starting the read of
        every remote-tier placeholder on the way, and where the walk ends, the read of the
        shared context that may continue there."""
        if self.shared is None or self.disable or not self.health.loads_allowed:
            return
        tokens = array("q", req.origin_input_ids)
        key = RadixKey(tokens, req.extra_key).page_aligned(self.page_size)
        deadline = time.monotonic() + self._wait_s(len(key))
        node, matched = self.root_node, 0
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None:
                break
            n = child.key.match(key, page_size=self.page_size)
            if is_placeholder(child):
                if child.evp.tier == Tier.REMOTE:
                    self._prefetch_blob(child.evp, req.rid, deadline)
                if n < len(child.key):
                    return  # the match stops inside a stored context: nothing is looked up there
            matched += n
            if n < len(child.key):
                break
            node, key = child, key[n:]
        _, b = self._window(matched)
        if len(tokens) > b:
            name = self._shared_key(req.extra_key, tokens[:b])
            wait_s = self._wait_s(len(tokens) - matched)  # what recomputing the rest would take
            self.prefetch.start(name, functools.partial(self._read_shared, name, wait_s), req.rid,
                                time.monotonic() + wait_s)

    def _held_for_prefetch(self, rids: Iterable[str]) -> set[str]:
        """The waiting requests to keep out of prefill this round: those a read started for
        is still running for, on any rank (every rank holds the same ones)."""
        if self.shared is None:
            return set()
        rids = list(rids)
        held = self.prefetch.held(rids)
        if self.sync.on and not self.sync.all_ok(not held):
            held = set().union(*self.sync.gather(sorted(held)))
        return held

    def _prefetch_blob(self, stored: Stored, rid: str | None = None, deadline: float = 0.0) -> None:
        tier = self.tiers[Tier.REMOTE]
        codec = get_codec(stored.codec)
        unpack = codec.unpack_host if codec.has_host_stage else None

        def read() -> tuple[EncodedKV | None, int]:
            started = time.perf_counter()
            enc = tier.get(stored.blob, device="cpu", unpack=unpack)
            if enc is None:
                return None, 0
            self._observe_read(enc.nbytes, time.perf_counter() - started)
            return enc, enc.nbytes

        self.prefetch.start(remote_read_name(stored), read, rid, deadline)

    def _observe_read(self, nbytes: int, seconds: float) -> None:
        """Learn the store's speed from real reads (on a prefetch worker): what a read costs
        end to end (the store, our copies, the checksum, a host stage) is what a request
        waits, and a small start-up probe overstated it several times on the H200 (1.1-1.4
        GB/s probed against roughly 0.3 GB/s inferred for 70 MB blobs). Alone the policy and the readers use
        it at once; under TP every rank keeps rank 0's start-up figure, so all decide alike."""
        if self.sync.on or nbytes < READ_SAMPLE_BYTES or seconds <= 0:
            return
        rate = nbytes / max(seconds - self.cost.remote_latency, 1e-6)
        self.cost.remote_bw = 0.7 * self.cost.remote_bw + 0.3 * rate if self._reads_seen else rate
        self._reads_seen += 1

    def _remote_ready(self, node: TreeNode) -> bool:
        """Whether the read of a remote-tier placeholder's blob has finished (found or not),
        on every rank; starts it if it was not running."""
        stored: Stored = node.evp
        done, _ = self.prefetch.result(remote_read_name(stored))
        if not done and not self.prefetch.known(remote_read_name(stored)):
            self._prefetch_blob(stored)
        return self.sync.all_ok(done)

    def _take_remote(self, stored: Stored) -> EncodedKV | None:
        """The prefetched blob of a remote-tier placeholder (None if its read found nothing)."""
        return self.prefetch.take(remote_read_name(stored))

    def _stage_shared(self, found: "SharedHit") -> Stored | None:
        """Put a fetched shared blob in host memory; None when there is no room (a miss)."""
        stored = Stored(Tier.HOST, found.codec, self._new_blob_key(Tier.HOST), offset=found.offset)
        try:
            self.tiers[Tier.HOST].put(stored.blob, found.enc)
        except (TierError, OSError) as e:  # no room to stage it: the request prefills
            self.health.note_tier_failure("staging a shared blob in host memory", e)
            return None
        self.stats.shared_hits += 1
        return stored


@dataclass(frozen=True)
class SharedHit:
    key: RadixKey
    enc: EncodedKV
    codec: str  # as staged in host memory
    config: int
    offset: int  # tokens of the blob before the request's match ends (loaded and let go)


def remote_read_name(stored: Stored) -> str:
    """The prefetcher's name for the read of a remote-tier placeholder's blob."""
    return "blob:" + stored.blob


def _remember(table: OrderedDict, key: str, value) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > _REMEMBERED:
        table.popitem(last=False)
