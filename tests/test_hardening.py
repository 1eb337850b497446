"""The cache never takes the server down: the load-back crash of issue 18, JSON-safe
status, and every SGLang entry point answering safely when our code fails inside it."""

import json
import logging

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.backend.nodes import is_placeholder
from evicpress_sglang.policy import Tier
from evicpress_sglang.settings import Settings
from harness import expected_kv, free_slots_accounted, make_params, serve

TOKEN_BYTES = 2 * 4 * 2 * 64 * 2


def _cache(tmp_path, pool=256, **kw):
    s = Settings(**({"host_bytes": 400 * TOKEN_BYTES, "host_codecs": ["bf16", "int8", "int4", "int2"],
                     "disk_codecs": ["bf16"]} | kw))
    return EvicPressRadixCache(make_params(pool), s)


def _chain(cache, base: int, parts: int = 3, length: int = 40) -> list[int]:
    """Serve a prefix growing in ``parts`` steps, so the tree holds a chain of ``parts`` nodes."""
    tokens: list[int] = []
    for i in range(parts):
        tokens = tokens + list(range(base + 100 * i, base + 100 * i + length))
        serve(cache, tokens)
    return tokens


def _placeholder_chain(cache, tokens) -> list:
    node, out, rest = cache.root_node, [], list(tokens)
    while rest:
        child = node.children.get(rest[0])
        if child is None:
            break
        out.append(child)
        rest = rest[len(child.key):]
        node = child
    return out


def test_loading_a_chain_whose_eviction_would_drop_its_own_tail(tmp_path):
    """Issue 18's crash: stored as int2 (below evicpress' quality floor), a three-node chain is
    loaded back with the pool full; making room for its first node re-plans under evicpress,
    which drops what it finds below the floor, the chain's own later nodes included. The
    chain must load whole (or be a miss), never reach a placeholder without a blob."""
    cache = _cache(tmp_path, pool=200, policy="static:int2")
    chain = _chain(cache, 10_000)
    assert len(_placeholder_chain(cache, chain)) == 3
    cache.evict(EvictParams(num_tokens=10_000))  # everything to host as int2
    assert all(is_placeholder(n) for n in _placeholder_chain(cache, chain))
    cache.set_policy("evicpress")
    for i in range(3):  # fill the pool with other contexts the policy may evict
        serve(cache, list(range(50_000 + 1000 * i, 50_000 + 1000 * i + 60)))
    assert cache.token_to_kv_pool_allocator.available_size() < 120
    r = serve(cache, chain + [7])
    assert cache.health.internal_errors == 0, cache.health.last_error
    assert r.loaded in (0, 120)  # all of the chain or (if evicpress dropped it before the match) none
    k, _ = expected_kv(chain + [7])
    assert ((r.k.float() - k.float()).norm() / k.float().norm()).item() < 0.35  # int2's bound
    assert cache.audit() == [] and free_slots_accounted(cache)


def test_status_is_valid_json_with_minus_infinite_utilities(tmp_path):
    """Under evicpress, a context stored below the floor has utility -inf; the status
    (what /evicpress/status and POST /evicpress/policy return) must still be JSON."""
    cache = _cache(tmp_path, policy="static:int2")
    _chain(cache, 10_000, parts=1)
    cache.evict(EvictParams(num_tokens=10_000))
    cache.set_policy("evicpress")
    status = cache.status()
    json.dumps(status, allow_nan=False)  # raises on inf/nan
    assert any(p["utility"] is None for p in status["placements"])


@pytest.mark.parametrize("where", ["_load", "_fetch", "_apply", "_prefetch_for", "_insert_helper", "_register",
                                   "_count_hit", "_after_store"])
def test_an_internal_error_anywhere_is_answered_safely(tmp_path, monkeypatch, caplog, where):
    """Our code raising inside any step: no exception reaches the caller (the scheduler),
    each request still gets exactly its KV, the error is counted, logged once with its
    traceback, and the pool and tree stay consistent (or the cache degrades to stock)."""
    cache = _cache(tmp_path, pool=160, policy="lru-offload")
    docs = [list(range(1000 * i, 1000 * i + 50)) for i in range(6)]
    calls = {"n": 0}
    original = getattr(type(cache), where)

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError(f"injected failure in {where}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(cache), where, failing)
    caplog.set_level(logging.ERROR, logger="evicpress_sglang.backend.guard")
    for round_ in range(3):
        for i, doc in enumerate(docs):
            tokens = doc + [round_, i]
            r = serve(cache, tokens)
            k, v = expected_kv(tokens)
            assert torch.equal(r.k, k) and torch.equal(r.v, v)  # lossless: never wrong KV
            assert free_slots_accounted(cache)
    assert calls["n"] >= 3 and cache.health.internal_errors > 0
    logged = [r for r in caplog.records if "internal error" in r.getMessage()]
    entries = {e for e in cache.health.errors_by_entry}
    assert len(logged) == len(entries)  # once per entry point (one kind of error each), not per occurrence
    assert "Traceback" in logged[0].getMessage() and "injected failure" in logged[0].getMessage()
    problems = cache.audit()
    assert problems == [] or cache.health.degraded is not None
    status = cache.status()
    assert status["health"]["internal_errors"] == cache.health.internal_errors
    json.dumps(status, allow_nan=False)


def test_inconsistent_state_degrades_to_stock_and_an_operator_can_recover(tmp_path):
    cache = _cache(tmp_path, pool=160, policy="lru-offload")
    serve(cache, list(range(100)))
    cache.evictable_size_ += 5  # what a bug would leave behind

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    original = EvicPressRadixCache._evict_with
    EvicPressRadixCache._evict_with = broken
    try:
        result = cache.evict(EvictParams(num_tokens=10))
    finally:
        EvicPressRadixCache._evict_with = original
    assert result.num_tokens_evicted >= 10  # stock eviction answered
    assert cache.health.degraded and "size counters" in cache.health.degraded
    assert cache.settings.policy == "off" and cache.policy is None
    assert cache.audit() == []  # the counters were repaired from the tree
    assert cache.status()["health"]["degraded"]
    cache.set_policy("evicpress")  # the state checks out: trusted again
    assert cache.health.degraded is None and cache.policy is not None


def test_degraded_cache_loads_nothing_back(tmp_path):
    cache = _cache(tmp_path, pool=160, policy="lru-offload")
    doc = list(range(100))
    serve(cache, doc)
    cache.evict(EvictParams(num_tokens=10_000))
    cache._degrade("test")
    r = serve(cache, doc + [1])
    assert r.loaded == 0 and r.reused == 0
    k, v = expected_kv(doc + [1])
    assert torch.equal(r.k, k)


@pytest.mark.parametrize("fail_after_insert", [False, True])
def test_a_chunk_insert_that_fails_leaves_the_request_running_on_exact_kv(tmp_path, monkeypatch, fail_after_insert):
    """cache_unfinished_req raising before or after the tree took the chunk: the request is
    re-pointed at what the tree holds, its locks stay balanced, its KV stays exact, and
    finishing it leaves the pool accounted for."""
    from array import array

    from evicpress_sglang.backend.insert import InsertRevive
    from harness import LAYERS, kv_at
    from stress import StressReq

    cache = _cache(tmp_path, pool=300, policy="lru-offload")
    serve(cache, list(range(40)))  # a cached prefix the request shares
    tokens = list(range(40)) + list(range(500, 560))
    req = StressReq(array("q", tokens), rid="chunked", req_pool_idx=1)
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=req))
    req.last_node, prefix = m.last_device_node, m.device_indices
    cache.inc_lock_ref(req.last_node)
    req.prefix_indices, req.cache_protected_len = prefix, len(prefix)
    rtt = cache.req_to_token_pool.req_to_token
    rtt[1, : len(prefix)] = prefix.to(torch.int32)
    slots = cache.token_to_kv_pool_allocator.alloc(60)  # the first chunk: tokens 40..99
    k, v = kv_at(tokens[40:], range(40, 100))
    for layer in range(LAYERS):
        cache.kvpool.k_buffer[layer][slots] = k[layer]
        cache.kvpool.v_buffer[layer][slots] = v[layer]
    rtt[1, 40:100] = slots.to(torch.int32)
    req.fill_len = 100
    original = InsertRevive._insert_req

    def failing(self, *args, **kwargs):
        if fail_after_insert:
            original(self, *args, **kwargs)
        raise RuntimeError("injected failure in a chunk insert")

    monkeypatch.setattr(InsertRevive, "_insert_req", failing)
    cache.cache_unfinished_req(req, chunked=True)
    monkeypatch.setattr(InsertRevive, "_insert_req", original)
    assert cache.health.internal_errors == 1 and cache.health.degraded is None
    row = rtt[1, :100].to(torch.int64)
    want_k, _ = kv_at(tokens, range(100))
    got_k = torch.stack([cache.kvpool.k_buffer[layer][row] for layer in range(LAYERS)])
    assert torch.equal(got_k, want_k)
    assert req.last_node.lock_ref >= 1 and cache.audit() == []
    # What the tree took is locked for the request (else an eviction could free slots it runs on).
    assert cache._logical_len(req.last_node) == (100 if fail_after_insert else 40)
    cache.cache_finished_req(req, kv_len_to_handle=100)
    assert free_slots_accounted(cache) and cache.audit() == []
    assert cache.root_node.children and all(n.lock_ref == 0 for n in cache.nodes.values())


def test_a_blob_lost_while_its_load_makes_room_is_a_miss(tmp_path, monkeypatch):
    """A load-back reads a node's blob, then evicts to make room for it; that eviction first
    removes the placeholders whose blobs a tier lost in the background (a disk write that
    failed after the read was served from its buffer). When that is the node being loaded,
    the load is a miss: seen in the background-planner stress run as an internal error
    (KeyError on the forgotten node) that left the size counters wrong."""
    cache = _cache(tmp_path, pool=200, policy="lru-offload")
    chain = _chain(cache, 10_000)
    cache.evict(EvictParams(num_tokens=10_000))  # everything to host memory
    first = _placeholder_chain(cache, chain)[0]
    assert is_placeholder(first)
    for i in range(3):  # a full pool: loading the chain has to evict first
        serve(cache, list(range(50_000 + 1000 * i, 50_000 + 1000 * i + 60)))
    assert cache.token_to_kv_pool_allocator.available_size() < 120
    host = cache.tiers[Tier.HOST]
    armed = []
    lost_once = [first.evp.blob]
    real_take_lost = host.take_lost
    monkeypatch.setattr(host, "take_lost", lambda: (lost_once and armed and [lost_once.pop()]) or real_take_lost())
    r = serve(cache, chain + [7], between=lambda: armed.append(True))
    assert not lost_once  # the loss was reported during the load
    assert cache.health.internal_errors == 0, cache.health.last_error
    assert r.loaded == 0 and cache.stats.misses["host"] >= 1  # recomputed: exact KV
    k, v = expected_kv(chain + [7])
    assert torch.equal(r.k, k) and torch.equal(r.v, v)
    assert cache.audit() == [] and free_slots_accounted(cache)
