"""The remote store as a placement tier, the one after disk (issue 19): contexts that do not
fit in host memory go there, come back exact (bf16) or within their codec's bound, leave
the store when loaded, and are read on a worker thread, never on the scheduler's."""

import threading
from array import array

import torch
from content_key_setup import DOCS, SYSTEM
from harness import FakeReq, arrive, expected_kv, free_slots_accounted, serve, until
from shared_worker import server
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from evicpress_sglang.backend.nodes import is_placeholder
from evicpress_sglang.policy import Tier


def _remote_nodes(cache):
    return [n for n in cache.nodes.values() if is_placeholder(n) and n.evp.tier == Tier.REMOTE]


def _stored_in_remote(cache, docs):
    """Serve ``docs`` under the (locked) system prompt, evicting everything after each: with no
    room in host memory, they go to the remote tier."""
    serve(cache, SYSTEM)
    cache.inc_lock_ref(next(iter(cache.root_node.children.values())))
    for doc in docs:
        serve(cache, SYSTEM + doc + [7])
        cache.evict(EvictParams(num_tokens=10**6))
    cache.shared.flush()


def test_contexts_beyond_host_memory_go_to_the_remote_tier_and_come_back_exact(mooncake_store):
    cache = server(mooncake_store.remote_config("placement-test"), policy="lru-offload", host_bytes=0,
                   remote_codecs=["bf16"])
    _stored_in_remote(cache, DOCS[:3])
    placed = _remote_nodes(cache)
    assert len(placed) == 3 and cache.stats.stores.get("remote:bf16") == 3
    names = [cache.shared.stored_key(n.evp.blob) for n in placed]
    assert all(cache.shared._store.is_exist(name) == 1 for name in names)
    assert cache.status()["tiers"]["remote"]["entries"] >= 3
    for doc in DOCS[:3]:
        tokens = SYSTEM + doc + [8]
        r = serve(cache, tokens)
        assert r.loaded >= len(doc)  # from the remote tier, not prefilled
        k, v = expected_kv(tokens)
        assert torch.equal(r.k, k) and torch.equal(r.v, v)  # bf16: bit-exact through the store
        assert free_slots_accounted(cache) and cache.audit() == []
    assert cache.stats.hits.get("remote:bf16") == 3 and cache.health.internal_errors == 0
    prefetch = cache.status()["tiers"]["remote"]["prefetch"]
    assert prefetch["started"] >= 3 and prefetch["found"] >= 3 and prefetch["running"] == 0
    cache.shared.flush()
    # Loaded: removed from the store once Mooncake's read lease (10 s) lets it (asking about
    # an object renews its lease, so the test asks only at the end).
    until(lambda: cache.shared.usage().counters["removed"] == 3, timeout=60)
    assert all(cache.shared._store.is_exist(name) == 0 for name in names)


def test_a_remote_read_never_runs_on_the_scheduler_thread(mooncake_store, monkeypatch):
    """While the store has not answered, the match goes on without the remote context (and the
    request is held instead); once the read arrives the next match loads it."""
    cache = server(mooncake_store.remote_config("nonblocking-test"), policy="static:int8", host_bytes=0)
    _stored_in_remote(cache, DOCS[3:4])
    (node,) = _remote_nodes(cache)
    go, started = threading.Event(), threading.Event()
    real_get = cache.shared.get

    def slow_get(*args, **kwargs):
        started.set()
        go.wait(30)
        return real_get(*args, **kwargs)

    monkeypatch.setattr(cache.shared, "get", slow_get)
    tokens = SYSTEM + DOCS[3] + [8]
    req = FakeReq(array("q", tokens))
    cache.prefetch_for(req)
    assert started.wait(10)
    assert cache.held_for_prefetch([req.rid]) == {req.rid}  # kept out of prefill meanwhile
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), None), req=req))
    assert m.host_hit_length == 0 and not go.is_set()  # answered without waiting for the store
    assert is_placeholder(node) and node.evp.tier == Tier.REMOTE  # not a miss: still stored
    go.set()
    arrive(cache, req)
    r = serve(cache, tokens)
    assert r.loaded >= len(DOCS[3]) and cache.stats.hits.get("remote:int8") == 1
    k, _ = expected_kv(tokens)
    assert ((r.k.float() - k.float()).norm() / k.float().norm()).item() < 0.02
    assert free_slots_accounted(cache) and cache.audit() == [] and cache.health.internal_errors == 0


def test_a_remote_blob_that_vanished_is_a_miss(mooncake_store):
    cache = server(mooncake_store.remote_config("vanished-test"), policy="lru-offload", host_bytes=0,
                   remote_codecs=["bf16"])
    _stored_in_remote(cache, DOCS[4:5])
    (node,) = _remote_nodes(cache)
    assert cache.shared._store.remove(cache.shared.stored_key(node.evp.blob)) == 0
    tokens = SYSTEM + DOCS[4] + [8]
    r = serve(cache, tokens)
    assert r.loaded == 0 and cache.stats.misses.get("remote") == 1
    k, v = expected_kv(tokens)
    assert torch.equal(r.k, k) and torch.equal(r.v, v)  # recomputed
    assert free_slots_accounted(cache) and cache.audit() == [] and cache.health.internal_errors == 0



def test_the_stores_speed_is_learnt_from_real_reads(mooncake_store):
    """The policy and the readers price the store by what reads really took, not by the
    start-up probe: a slow read pulls the speed down at once, later ones are averaged in;
    reads too small to say anything about speed are not counted."""
    cache = server(mooncake_store.remote_config("speed-test"))
    probed = cache.cost.remote_bw
    cache._observe_read(1000, 1.0)  # latency-bound: ignored
    assert cache.cost.remote_bw == probed
    latency = cache.cost.remote_latency
    cache._observe_read(100 << 20, 1.0 + latency)  # 100 MiB in a second
    assert abs(cache.cost.remote_bw - (100 << 20)) < 1e-3 * (100 << 20)
    cache._observe_read(100 << 20, 0.5 + latency)
    assert abs(cache.cost.remote_bw - (0.7 * (100 << 20) + 0.3 * (200 << 20))) < 1e-3 * (100 << 20)


def test_a_failing_publish_never_fails_the_store(mooncake_store, monkeypatch):
    """Publishing is an extra: its re-encode (from the anchor, with the ancestors' tokens)
    running out of GPU memory leaves the context stored in its own tier, the eviction done,
    and nothing counted as an internal error."""
    from evicpress_sglang.backend import kv_io

    cache = server(mooncake_store.remote_config("publish-fail-test"))
    serve(cache, SYSTEM)
    cache.inc_lock_ref(next(iter(cache.root_node.children.values())))
    serve(cache, SYSTEM + DOCS[5] + [7])
    real, calls = kv_io.encode_from_pool, []

    def second_call_fails(*args, **kwargs):  # the store's own encode, then the publish's
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_io, "encode_from_pool", second_call_fails)
    cache.evict(EvictParams(num_tokens=10**6))
    assert len(calls) == 2 and cache.stats.stores.get("host:int8", 0) == 1 and cache.stats.published == 0
    assert cache.health.internal_errors == 0 and cache.audit() == []


def test_an_anchor_spacing_pages_cannot_follow_is_refused_at_start_up(mooncake_store):
    """Shared blobs are cut at anchors and loaded from a page-aligned match end: an anchor that
    is not a whole number of pages stops the server with the setting named."""
    import pytest

    from evicpress_sglang.backend.cache import EvicPressRadixCache
    from evicpress_sglang.settings import Settings, SettingsError
    from harness import make_params

    remote = mooncake_store.remote_config("anchor-test", anchor_tokens=30)
    with pytest.raises(SettingsError, match=r"remote.anchor_tokens \(30\) must be a multiple of --page-size \(4\)"):
        EvicPressRadixCache(make_params(1024, page_size=4), Settings(remote=remote))
