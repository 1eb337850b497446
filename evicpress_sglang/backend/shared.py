"""Contexts shared between servers through a remote store (Mooncake).

Every context this server stores in a lower tier is *published* too: the same blob, under
a content key that any server computes from a request alone — the layout fingerprint, the
hash of the prefix the context continues and the hash of its first
:data:`HEAD_TOKENS` tokens — with the context's own tokens beside it. A server whose match
ends where no local context continues asks the store for that key; a blob whose tokens the
request continues is staged in host memory and attached as a placeholder, so the ordinary
load-back brings it to the GPU (split there if the request uses only part of it).

Blobs are immutable: two servers publishing the same context write the same key, and the
first one stays. A key the store did not have is not asked for again for
:data:`ABSENT_TTL_S` (the scheduler matches a waiting request many times). An unreachable
store is a miss; the remote tier logs it once and stops asking for a while.
"""

from __future__ import annotations

import time
import uuid
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..codecs import CodecError, EncodedKV, get_codec
from ..policy import Tier
from ..tiers import TierError
from ..tiers.base import Pack
from .content_keys import token_hash
from .nodes import Stored
from .tree import TreeBookkeeping

#: Contexts shorter than this are not shared (and a request needs this many tokens to look one up).
HEAD_TOKENS = 32
ABSENT_TTL_S = 5.0
_REMEMBERED = 100_000  # keys remembered as published / absent


class SharedContexts(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`; ``self.shared`` is the remote tier or None."""

    def _shared_key(self, start: TreeNode, extra_key: str | None, head) -> str:
        """The store's key for a context continuing the path at ``start`` whose first tokens are ``head``."""
        return f"{self.fingerprint}-{self._start_hash(start, extra_key)}-{token_hash(extra_key, head)}"

    def _publish(self, node: TreeNode, codec: str, enc: EncodedKV, pack: Pack | None) -> None:
        """Offer a context just stored here to the other servers (queued; never waits)."""
        if self.shared is None or len(node.key) < HEAD_TOKENS:
            return
        key = self._shared_key(node.parent, node.key.extra_key, node.key.token_ids[:HEAD_TOKENS])
        if key in self._published:
            return
        meta = {"codec": codec, "tokens": list(node.key.token_ids), "extra_key": node.key.extra_key}
        try:
            self.shared.put(key, enc, meta, pack=pack)
        except (TierError, OSError) as e:
            self.health.note_tier_failure("remote put", e)
            return
        _remember(self._published, key, True)
        self.stats.published += 1

    def _attach_shared(self, node: TreeNode, key: RadixKey) -> TreeNode | None:
        """A context another server published that continues the path at ``node`` with the
        first tokens of ``key``: staged in host memory and attached as a placeholder."""
        found = self._find_shared(node, key)
        stored = None if found is None else self._stage_shared(found)
        return None if stored is None else self._attach_placeholder(node, found.key, stored, found.config)

    def _find_shared(self, node: TreeNode, key: RadixKey) -> "SharedHit | None":
        """The published context :meth:`_attach_shared` would attach, fetched but not staged
        (ranks agree on it first)."""
        if self.shared is None or len(key) < HEAD_TOKENS or Tier.HOST not in self.tiers:
            return None
        name = self._shared_key(node, key.extra_key, key.token_ids[:HEAD_TOKENS])
        if self._absent.get(name, 0.0) > time.monotonic() or key.child_key(self.page_size) in node.children:
            return None
        found = self.shared.get_with_meta(name, device="cpu")
        if found is None:
            _remember(self._absent, name, time.monotonic() + ABSENT_TTL_S)
            return None
        enc, meta = found
        try:
            codec = get_codec(str(meta["codec"]))
            enc = codec.unpack_host(enc) if codec.has_host_stage and enc.codec != codec.device_codec.name else enc
            tokens, extra_key = array("q", meta["tokens"]), meta.get("extra_key")
        except (CodecError, KeyError, TypeError) as e:
            self.stats.miss("remote", f"unusable shared blob: {e}")
            return None
        child_key = RadixKey(tokens, extra_key)
        name_here = codec.device_codec.name
        config = self._config_index(Tier.HOST, name_here)
        if extra_key != key.extra_key or child_key.match(key, page_size=self.page_size) == 0 or config is None:
            self.stats.miss("remote", "shared blob does not continue the request here")
            return None
        return SharedHit(child_key, enc, name_here, config)

    def _stage_shared(self, found: "SharedHit") -> Stored | None:
        """Put a fetched shared blob in host memory; None when there is no room (a miss)."""
        stored = Stored(Tier.HOST, found.codec, uuid.uuid4().hex)
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


def _remember(table: OrderedDict, key: str, value) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > _REMEMBERED:
        table.popitem(last=False)
