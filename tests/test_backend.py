"""The evicpress radix cache driven like SGLang's scheduler, with real SGLang pools on CPU."""

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.policy import Tier
from evicpress_sglang.settings import Settings, SettingsError
from harness import expected_kv, free_slots_accounted, make_params, serve

TOKEN_BYTES = 2 * 4 * 2 * 64 * 2  # K+V, 4 layers, 2 heads, head_dim 64, bf16


def _cache(tmp_path, pool=256, page_size=1, **kw):
    s = Settings(**({"host_bytes": 120 * TOKEN_BYTES, "disk_dir": str(tmp_path / "disk"), "disk_bytes": 10**8,
                     "host_codecs": ["bf16", "int8", "int4"], "disk_codecs": ["bf16+zstd", "int4+zstd"]} | kw))
    return EvicPressRadixCache(make_params(pool, page_size), s)


def _docs(n, length=100):
    return [list(range(1000 * i, 1000 * i + length)) for i in range(n)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _consistent(cache):
    """Placeholders, lock counts and the policy's table agree; every pool slot is accounted for."""
    t = cache.table
    for nid, node in cache.nodes.items():
        assert t.in_use[t.row_of[nid]] == (node.lock_ref > 0), nid
        cfg = t.configs[t.assign[t.row_of[nid]]]
        assert (getattr(node, "evp", None) is not None) == (cfg.tier != Tier.GPU), (nid, cfg.label)
        if getattr(node, "evp", None) is not None:
            assert all(getattr(c, "evp", None) is not None for c in node.children.values())
    assert free_slots_accounted(cache)


def _serve_exact(cache, docs, suffix) -> int:
    """Serve every doc + suffix; the KV must be exactly what a full prefill gives. Returns
    the tokens loaded back from host/disk."""
    loaded = 0
    for doc in docs:
        r = serve(cache, doc + suffix)
        k, v = expected_kv(doc + suffix)
        assert torch.equal(r.k, k) and torch.equal(r.v, v)  # never wrong KV
        loaded += r.loaded
        _consistent(cache)
    return loaded


def test_lossless_offload_loads_back_bit_exact(tmp_path):
    cache = _cache(tmp_path, policy="lru-offload", disk_codecs=["bf16"])
    docs = _docs(5)
    for i, doc in enumerate(docs):
        serve(cache, doc + [1, 2, i])
        _consistent(cache)
    stores = cache.stats.stores
    assert stores["host:bf16"] > 0 and stores["disk:bf16"] > 0  # overflowed into both tiers
    for i, doc in enumerate(docs):
        r = serve(cache, doc + [9, i])
        assert r.reused >= 100
        k, v = expected_kv(doc + [9, i])
        assert torch.equal(r.k, k) and torch.equal(r.v, v)
        _consistent(cache)
    assert sum(cache.stats.hits.values()) >= 4


def test_static_codec_stores_with_that_codec_within_its_bound(tmp_path):
    cache = _cache(tmp_path, policy="static:int4")
    docs = _docs(4)
    for doc in docs:
        serve(cache, doc + [1])
    assert set(cache.stats.stores) <= {"host:int4"} and cache.stats.stores["host:int4"] >= 2
    assert cache.stats.compression_ratio > 2.5
    for doc in docs:
        r = serve(cache, doc + [2])
        k, v = expected_kv(doc + [2])
        assert _rel(r.k, k) < 0.1 and _rel(r.v, v) < 0.1  # int4's bound
        _consistent(cache)


def test_evicpress_policy_serves_correct_kv_under_pressure(tmp_path):
    cache = _cache(tmp_path, alpha=0.5, quality_floor=0.0)
    docs = _docs(8, length=60)
    rng = np.random.default_rng(0)
    for step in range(40):
        i = int(rng.zipf(1.5)) % len(docs)
        r = serve(cache, docs[i] + [step])
        k, _ = expected_kv(docs[i] + [step])
        assert _rel(r.k, k) < 0.3
        _consistent(cache)
    s = cache.status()
    assert s["stats"]["stores"] and sum(s["stats"]["hits"].values()) > 0
    assert s["tiers"]["host"]["used_bytes"] <= s["tiers"]["host"]["capacity_bytes"]
    assert s["placements"] and {"config", "utility", "frequency"} <= set(s["placements"][0])


def test_nodes_in_use_are_never_evicted(tmp_path):
    cache = _cache(tmp_path)
    serve(cache, _docs(1)[0])
    node = next(iter(cache.root_node.children.values()))
    before = node.value.clone()
    cache.inc_lock_ref(node)  # a running request holds it
    _consistent(cache)  # the table knows: the policy sees it as not movable
    cache.evict(EvictParams(num_tokens=10_000))
    assert torch.equal(node.value, before) and getattr(node, "evp", None) is None
    cache.dec_lock_ref(node)
    _consistent(cache)
    cache.evict(EvictParams(num_tokens=10_000))
    assert node.value is None  # now it may go
    _consistent(cache)


def test_paged_pool(tmp_path):
    cache = _cache(tmp_path, page_size=4, policy="lru-offload", disk_codecs=["bf16"])
    docs = _docs(5, length=96)
    for doc in docs:
        serve(cache, doc + [1, 2, 3, 4])
    for doc in docs:
        r = serve(cache, doc + [5, 6, 7, 8])
        assert r.reused >= 96
        k, _ = expected_kv(doc + [5, 6, 7, 8])
        assert torch.equal(r.k, k)
        _consistent(cache)


def test_flush_clears_every_tier(tmp_path):
    cache = _cache(tmp_path, policy="lru-offload", disk_codecs=["bf16"])
    for doc in _docs(5):
        serve(cache, doc)
    assert cache.tiers[Tier.HOST].usage().entries and cache.tiers[Tier.DISK].usage().entries
    cache.reset()
    assert all(t.usage().entries == 0 for t in cache.tiers.values()) and len(cache.table) == 0
    assert not list((tmp_path / "disk").glob("*.kv"))


def test_damaged_disk_blob_is_a_miss_and_the_request_recomputes(tmp_path):
    cache = _cache(tmp_path, policy="lru-offload", host_bytes=0, disk_codecs=["bf16"])
    docs = _docs(4)
    for doc in docs:
        serve(cache, doc)
    cache.tiers[Tier.DISK].flush()
    files = sorted((tmp_path / "disk").glob("*.kv"))
    assert files
    for f in files:  # flip a byte in every blob
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(data)
    _serve_exact(cache, docs, [3])
    assert sum(cache.stats.misses.values()) >= 1


def test_disk_entries_survive_a_restart(tmp_path):
    cache = _cache(tmp_path, policy="static:bf16+zstd", host_bytes=0, disk_codecs=["bf16+zstd"])
    docs = _docs(4)
    for doc in docs:
        serve(cache, doc)
    cache.tiers[Tier.DISK].flush()
    on_disk = cache.tiers[Tier.DISK].usage().entries
    assert on_disk >= 2
    restarted = _cache(tmp_path, policy="static:bf16+zstd", host_bytes=0, disk_codecs=["bf16+zstd"])
    assert _serve_exact(restarted, docs, [4]) >= 2 * 100


def test_load_back_before_the_disk_write_finished_is_exact_and_cancels_it(tmp_path, stalled_disk_writes):
    cache = _cache(tmp_path, policy="static:bf16+zstd", host_bytes=0, disk_codecs=["bf16+zstd"])
    docs = _docs(4)
    for doc in docs:
        serve(cache, doc)  # evictions return while the writes wait
    disk = cache.tiers[Tier.DISK]
    assert disk.usage().counters["queued_writes"] >= 2
    assert _serve_exact(cache, docs, [6]) >= 200
    stalled_disk_writes.set()
    disk.flush()
    assert disk.usage().counters["failed_writes"] == 0
    assert sorted(p.name for p in (tmp_path / "disk").glob("*.kv")) == sorted(
        disk._path_for(key).name for key in disk.keys())  # loaded blobs were never written


def test_policy_switch_at_runtime_and_off_is_stock(tmp_path):
    cache = _cache(tmp_path, policy="off")
    for doc in _docs(4):
        serve(cache, doc)
    assert not cache.stats.stores and cache.stats.dropped == 0  # stock eviction: dropped silently
    cache.set_policy("lru-offload")
    for doc in _docs(4):
        serve(cache, [7] + doc)
    assert cache.stats.stores["host:bf16"] > 0
    with pytest.raises(SettingsError, match="unknown policy"):
        cache.set_policy("fifo")
    assert cache.settings.policy == "lru-offload"
    _consistent(cache)


def test_host_tier_failure_degrades_to_drop(tmp_path, monkeypatch):
    cache = _cache(tmp_path, policy="lru-offload", disk_dir=None)
    from evicpress_sglang.tiers import TierError

    def broken(*a, **k):
        raise TierError("simulated failure")

    monkeypatch.setattr(cache.tiers[Tier.HOST], "put", broken)
    for doc in _docs(4):
        serve(cache, doc)
    assert cache.stats.tier_errors > 0 and cache.stats.dropped > 0
    _consistent(cache)


def test_recomputed_placeholders_are_revived_without_leaking_slots(tmp_path):
    cache = _cache(tmp_path, policy="lru-offload", disk_codecs=["bf16"])
    docs = _docs(4)
    for doc in docs:
        serve(cache, doc + [1])
    assert cache.stats.stores
    for doc in docs:  # the prefix is in host/disk, but the request computes it again
        r = serve(cache, doc + [1], load_back=False)
        k, _ = expected_kv(doc + [1])
        assert torch.equal(r.k, k)
        _consistent(cache)
    _serve_exact(cache, docs, [3])  # and what the tree holds afterwards is still right


def test_prometheus_metrics_follow_the_cache(tmp_path, monkeypatch):
    from dataclasses import replace

    from prometheus_client import REGISTRY
    from sglang.srt.mem_cache.radix_cache import RadixCache

    # SGLang's own radix-cache collector needs a running server's global args; ours does not.
    monkeypatch.setattr(RadixCache, "init_metrics_collector", lambda self: None)
    cache = EvicPressRadixCache(replace(make_params(256), enable_metrics=True),
                                Settings(host_bytes=120 * TOKEN_BYTES, disk_dir=None, policy="lru-offload"))
    docs = _docs(3)
    for doc in docs:
        serve(cache, doc)
    assert serve(cache, docs[0] + [1]).loaded == 100  # the first document went to host memory
    stores = REGISTRY.get_sample_value("evicpress_stores_total", {"tier": "host", "codec": "bf16"})
    loads = REGISTRY.get_sample_value("evicpress_loads_total", {"tier": "host", "codec": "bf16"})
    assert stores == cache.stats.stores["host:bf16"] and loads == cache.stats.hits["host:bf16"] > 0
    assert REGISTRY.get_sample_value("evicpress_tier_bytes", {"tier": "host"}) is not None
    assert REGISTRY.get_sample_value("evicpress_load_seconds_count") == loads


def test_verify_mode_is_silent_when_kv_is_intact_and_catches_overwrites(tmp_path):
    cache = _cache(tmp_path, policy="lru-offload", disk_codecs=["bf16"], verify=True)
    docs = _docs(5)
    for doc in docs:
        serve(cache, doc + [1])
    for doc in docs:
        serve(cache, doc + [2])
    assert cache.stats.verify_mismatches == 0 and sum(cache.stats.hits.values()) > 0
    # something (a bug elsewhere) overwrites a cached node's KV in the pool
    node = next(n for n in cache.nodes.values() if not n.evicted and n.lock_ref == 0)
    cache.kvpool.k_buffer[0][node.value[0]] += 1
    cache.evict(EvictParams(num_tokens=10_000))
    assert cache.stats.verify_mismatches >= 1


def test_load_back_after_the_path_changed_never_misaligns_kv(tmp_path):
    """Request B is matched while a shared prefix and its own suffix are both in host memory;
    before B's load-back, request A loads the shared prefix. B must not get the suffix's KV
    at the prefix's positions: it loads nothing and recomputes."""
    cache = _cache(tmp_path, policy="lru-offload", disk_codecs=["bf16"])
    shared, own = list(range(500, 560)), list(range(900, 940))
    serve(cache, shared + own)
    serve(cache, shared + [3])  # the shared prefix becomes a node of its own
    for doc in _docs(4):  # push both into host memory
        serve(cache, doc)
    path = [n for n in cache.nodes.values() if n.key.token_ids[0] in (500, 900)]
    assert path and all(n.evicted for n in path)
    r = serve(cache, shared + own + [1], between=lambda: serve(cache, shared + [2]))
    k, v = expected_kv(shared + own + [1])
    assert torch.equal(r.k, k) and torch.equal(r.v, v)
    _consistent(cache)


def test_prefill_timings_teach_the_cost_model():
    import time
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from evicpress_sglang.backend import prefill_timer
    from evicpress_sglang.policy import CostModel

    cost = CostModel(prefill_s_per_token=1e-6)
    timer = prefill_timer.activate(cost)
    prefill_timer.charge_profiler(None)  # a budget left by another test's cache would look at these batches

    def forward(worker, batch):  # 5 ms per batch + 20 us/token
        time.sleep(0.005 + 2e-5 * (batch.extend_num_tokens or 0))
        return "out"

    def extend(tokens):
        return SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_num_tokens=tokens)

    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE, extend_num_tokens=None)
    verify = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, extend_num_tokens=1000)  # a past prefill's count
    scored = extend(1000)
    scored.return_logprob = True  # the profiler's teacher-forced scoring: not a re-prefill's work
    for i in range(40):
        assert prefill_timer.around_forward(forward, None, extend(1 if i % 2 else 1000)) == "out"
    assert prefill_timer.around_forward(forward, None, decode) == "out"  # decode is not timed
    assert prefill_timer.around_forward(forward, None, scored) == "out"
    assert prefill_timer.around_forward(forward, None, verify) == "out"  # speculative verify: not a prefill
    assert timer.observed == 40
    # the one-token extends cost ~5 ms each, but that is overhead, not 5 ms per token
    assert 14e-6 < cost.prefill_s_per_token < 30e-6


def test_prefill_timings_bound_a_prior_before_they_fit_a_slope():
    """Batches of one size cannot separate slope from overhead, but their time per token
    bounds the slope: a prior above it (27 us/token, an 8B model's) comes down at once
    instead of pricing a small model's re-prefills 40x too high for the whole run."""
    import time
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from evicpress_sglang.backend import prefill_timer
    from evicpress_sglang.policy import CostModel

    def forward(worker, b):  # 1 ms for 2000 tokens: at most 0.5 us per token
        time.sleep(0.001)

    cost = CostModel(prefill_s_per_token=27e-6)
    prefill_timer.activate(cost)
    prefill_timer.charge_profiler(None)
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_num_tokens=2000, reqs=[SimpleNamespace(rid="u")])
    for _ in range(5):
        prefill_timer.around_forward(forward, None, batch)
    assert cost.prefill_s_per_token < 2e-6
    low = CostModel(prefill_s_per_token=1e-12)
    prefill_timer.activate(low)
    for _ in range(5):
        prefill_timer.around_forward(forward, None, batch)
    assert low.prefill_s_per_token == 1e-12  # a bound never raises the prior
    prefill_timer.activate(None)


def test_recompressing_a_full_host_tier_never_overflows_it(tmp_path):
    """With quality cheap (low alpha) the policy recompresses host blobs to make room while
    new contexts arrive; executing that plan must fit the tier at every step (no refusals,
    which would silently turn planned placements into drops)."""
    cache = _cache(tmp_path, policy="evicpress", alpha=0.05, quality_floor=0.5, host_bytes=150 * 2048,
                   disk_dir=None, disk_bytes=0, host_codecs=["bf16", "int8", "int4", "int2"])
    docs = _docs(12, 90)
    for rnd in range(3):
        for i, doc in enumerate(docs):
            serve(cache, doc + [5, rnd, i])
            _consistent(cache)
    assert cache.stats.stores["host:int8"] > 0  # recompressed inside the tier
    assert cache.stats.tier_errors == 0


def test_pinned_prefill_cost_is_used_and_not_learnt(tmp_path):
    from evicpress_sglang.backend import prefill_timer

    cache = _cache(tmp_path, prefill_s_per_token=1e-4)
    assert cache.cost.prefill_s_per_token == 1e-4 and prefill_timer._active is None
    assert cache.status()["cost_model"]["prefill_learnt"] is None
    learnt = _cache(tmp_path / "b")
    assert prefill_timer._active is not None and prefill_timer._active.cost is learnt.cost
    assert learnt.status()["cost_model"]["prefill_learnt"] == {"batches": 0, "fitted_s_per_token": None,
                                                               "bound_s_per_token": None}
