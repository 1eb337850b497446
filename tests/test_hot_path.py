"""Issue 25: eviction off the scheduler's critical path. The table's O(1)/O(children)
bookkeeping, its snapshot, the background planner's plans (staleness, policy switches,
the time budget's fallback, a crash) and the simulator's async-vs-sync utility. No timing
assertions: speed is measured by bench/hot_path.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.policy import ContextTable, CostModel, Weights, build_configs, make_policy
from evicpress_sglang.policy.planner import build_plan
from evicpress_sglang.settings import Settings
from evicpress_sglang.sim import footprint_tokens, generate, simulate
from harness import LAYERS, DIM, HEADS, expected_kv, free_slots_accounted, load_bench_script, make_params, serve
from evicpress_sglang.codecs import KVShape

TOKEN_BYTES = 2 * LAYERS * HEADS * DIM * 2


def _table() -> ContextTable:
    return ContextTable(build_configs(["bf16", "int4"], []), KVShape(LAYERS, 0, HEADS, DIM, torch.bfloat16), CostModel())


def test_remove_detaches_only_its_children_and_split_moves_them():
    t = _table()
    t.insert("a", 10, 0.0)
    t.insert("b", 10, 0.0, parent="a")
    t.insert("c", 10, 0.0, parent="a")
    t.insert("d", 10, 0.0, parent="b")
    t.split("b", "b0", 4)  # b0 is b's new parent, a's child
    assert t.parent[t.row_of["b"]] == t.row_of["b0"] and t.parent[t.row_of["b0"]] == t.row_of["a"]
    assert t.children(t.row_of["a"]) == {t.row_of["c"], t.row_of["b0"]}
    t.remove("b0")
    assert t.parent[t.row_of["b"]] == -1 and t.parent[t.row_of["d"]] == t.row_of["b"]
    assert t.children(t.row_of["a"]) == {t.row_of["c"]}
    reused = t.row_of["c"]
    t.remove("c")
    t.insert("e", 5, 0.0)  # takes c's row: it must not inherit a's child link
    assert t.row_of["e"] == reused and t.children(t.row_of["a"]) == set()
    alive = t.rows()
    assert np.all((t.parent[alive] == -1) | t.alive[np.maximum(t.parent[alive], 0)])


def test_snapshot_copies_moved_rows_and_detaches_from_the_table():
    t = _table()
    for i in range(40):  # grows past the initial 16 rows
        t.insert(i, 10 + i, 0.0)
    s = t.snapshot()
    t.set_quality(3, "int4", 0.5)
    t.set_assign(4, t.drop_config)
    s2 = t.snapshot(s)
    assert s2 is s and s.quality[3, t.configs.index(next(c for c in t.configs if c.codec == "int4"))] == 0.5
    assert s.assign[4] == t.drop_config
    t.set_assign(5, t.drop_config)  # the table moves on: the snapshot does not
    assert s.assign[5] == t.gpu_config and s.cost is not t.cost
    for i in range(40, 80):  # grown again: a new snapshot, not a stale refresh
        t.insert(i, 1, 0.0)
    s3 = t.snapshot(s)
    assert s3 is not s and np.array_equal(s3.sizes[t.rows()], t.sizes[t.rows()])
    other = _table()
    other.insert(0, 7, 0.0)
    assert other.snapshot(s3) is not s3  # another table's snapshot is never refreshed in place


def test_plan_steps_do_not_hold_once_their_row_changed():
    t = _table()
    for i in range(6):
        t.insert(i, 100, float(i))
    pol = make_policy("lru", t, Weights())
    plan = build_plan(pol, t, np.array([3 * 100 * TOKEN_BYTES, 0, 0], dtype=float), 10.0, lru=True)
    assert plan.rows.size == 3 and all(plan.holds(t, i) for i in range(3))
    assert list(plan.rows) == [t.row_of[0], t.row_of[1], t.row_of[2]]  # least recently used first
    t.set_assign(plan.rows[0], t.drop_config)  # moved meanwhile
    t.remove(1)
    t.insert("new", 100, 11.0)  # reuses row 1: another context
    assert [plan.holds(t, i) for i in range(3)] == [False, False, True]


def _cache(tmp_path, **kw) -> EvicPressRadixCache:
    s = Settings(**({"host_bytes": 200 * TOKEN_BYTES, "host_codecs": ["bf16", "int8"], "disk_codecs": [],
                     "async_plan_min_contexts": 0, "evict_budget_ms": 1000.0} | kw))
    return EvicPressRadixCache(make_params(256, 1), s)


def _docs(n, length=40):
    return [list(range(1000 * i, 1000 * i + length)) for i in range(n)]


def test_lock_column_follows_nested_locks_and_splits(tmp_path):
    cache = _cache(tmp_path, async_plan_min_contexts=None)
    serve(cache, _docs(1, 60)[0])
    node = next(iter(cache.root_node.children.values()))
    t = cache.table
    cache.inc_lock_ref(node)
    cache.inc_lock_ref(node)  # two requests hold it
    cache.dec_lock_ref(node)
    assert t.in_use[t.row_of[node.id]]
    serve(cache, _docs(1, 30)[0] + [7, 7])  # splits the locked node at 30
    parent = node.parent
    assert parent.id in t and t.in_use[t.row_of[parent.id]] and t.in_use[t.row_of[node.id]]
    cache.dec_lock_ref(node)
    assert not t.in_use[t.row_of[node.id]] and not t.in_use[t.row_of[parent.id]]


def test_background_plan_is_applied_and_a_policy_switch_discards_it(tmp_path):
    cache = _cache(tmp_path)
    docs = _docs(5)
    for d in docs:
        serve(cache, d)
    assert cache.planner.plan_once()  # steps the planner here instead of in its thread
    plan = cache.planner.plan
    cache._demand.append(120)
    cache.set_policy("lru-offload")  # meanwhile: the plan is of another setting
    assert cache.planner.take(cache.plan_generation) is None
    cache.evict(EvictParams(num_tokens=40))
    assert cache.stats.plan["missing"] == 1 and plan.cursor == 0  # never applied
    assert cache.planner.plan_once() and cache.planner.plan.generation == cache.plan_generation
    before = cache.stats.plan["steps"]
    cache.evict(EvictParams(num_tokens=40))
    assert cache.stats.plan["steps"] > before
    assert cache.stats.stores  # lru-offload's plan stored contexts in host memory
    steps = cache.status()["stats"]["evict_hist"]["steps"]  # each applied step's time, by kind
    assert sum(sum(steps[k]) for k in ("store", "restore", "drop")) == cache.stats.plan["steps"]
    assert sum(steps["store"]) == sum(cache.stats.stores.values()) and not sum(steps["fallback_drop"])
    for d in docs:  # every context still served exactly
        r = serve(cache, d + [1])
        k, v = expected_kv(d + [1])
        assert torch.equal(r.k, k) and torch.equal(r.v, v)
    assert free_slots_accounted(cache) and not cache.audit()


def test_budget_spent_falls_back_to_lru_drops_among_the_plans_candidates(tmp_path):
    cache = _cache(tmp_path, policy="lru-offload", evict_budget_ms=1e-9)
    for d in _docs(5):
        serve(cache, d)
    cache._demand.append(40)
    assert cache.planner.plan_once()
    plan = cache.planner.plan
    oldest = cache.nodes[cache.table.keys[plan.lru[0]]]
    assert plan.rows.size > 0 and plan.lru.size > 0
    cache.evict(EvictParams(num_tokens=40))
    assert cache.stats.plan["budget_stops"] == 1 and cache.stats.plan["steps"] == 0
    assert cache.stats.plan["fallback_drops"] >= 1 and not cache.stats.stores
    steps = cache.status()["stats"]["evict_hist"]["steps"]
    assert sum(steps["fallback_drop"]) >= cache.stats.plan["fallback_drops"] and not sum(steps["store"])
    assert oldest.id not in cache.table and oldest.id not in cache.nodes  # dropped, least recently used first
    assert free_slots_accounted(cache) and not cache.audit()


def test_stale_steps_are_skipped(tmp_path):
    cache = _cache(tmp_path, policy="lru-offload")
    docs = _docs(5)
    for d in docs:
        serve(cache, d)
    cache._demand.append(80)
    assert cache.planner.plan_once()
    for d in docs:  # every context is split by a request that diverges inside it: the plan predates that
        serve(cache, d[:20] + [5, 5])
    cache.evict(EvictParams(num_tokens=200))  # its steps' rows were split: their versions moved
    assert cache.stats.plan["stale_steps"] > 0
    assert free_slots_accounted(cache) and not cache.audit()


def test_a_crashing_planner_is_recorded_once_and_eviction_plans_synchronously(tmp_path, monkeypatch):
    cache = _cache(tmp_path)
    for d in _docs(5):
        serve(cache, d)
    monkeypatch.setattr(ContextTable, "snapshot", lambda self, into=None: 1 / 0)
    cache.planner.kick()
    cache.planner._thread.join(timeout=30)
    assert cache.planner.failed and cache.health.errors_by_entry["planner"] == 1
    assert not cache._plans_in_background()
    cache.evict(EvictParams(num_tokens=100))  # synchronous, as without the planner
    assert cache.evictable_size_ <= 256 - 100 and not cache.audit()


def test_async_plan_utility_is_within_2_percent_of_sync_in_the_simulator():
    trace = generate("docqa", 800, seed=0, n_docs=200)
    fp = footprint_tokens(trace) * 128 * 1024
    cap = (fp / 5, fp / 5, 2 * fp)
    sync = simulate(trace, "evicpress", cap, cost=CostModel(), plan="sync")
    run = simulate(trace, "evicpress", cap, cost=CostModel(), plan="async", check=True)
    assert run.evictions > 0
    assert (sync.utility_total - run.utility_total) / abs(sync.utility_total) < 0.02


HOT_PATH = Path(__file__).parent.parent / "bench" / "hot_path.py"
FAKE = Path(__file__).with_name("fake_sglang_server.py")


def test_gpu_bench_runs_end_to_end_against_a_stand_in_server(tmp_path):
    """bench/hot_path.py gpu's whole flow (batched fills, streamed decodes and arrivals, the
    status read, the report's keys), so that the GPU run spends its minutes measuring."""
    out = tmp_path / "hp"
    r = subprocess.run([sys.executable, str(HOT_PATH), "gpu", "--model", "stand-in", "--out", str(out),
                        "--contexts", "30,60", "--pool-tokens", "600", "--seconds", "1", "--decoders", "2",
                        "--arrivals", "1", "--decode-tokens", "5", "--fill-batch", "7", "--fill-workers", "2",
                        "--port", "31821", "--launcher", f"{sys.executable} {FAKE} --record {tmp_path / 'rec'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "hot_path.json").read_text())
    rows = {(row["contexts"], row["policy"]): row for row in report["rows"]}
    assert set(rows) == {(30, "stock"), (60, "stock"), (30, "evicpress"), (60, "evicpress")}
    for row in rows.values():
        assert {"contexts", "policy", "evict_p99_ms", "itl_p99_ms", "ttft_p99_ms"} <= set(row)
        assert row["errors"] == 0 and row["itl_n"] > 0 and row["ttft_n"] > 0
        assert row["context_tokens"] == int(0.9 * 600) // row["contexts"]
    # evictions of the measured window only (the stand-in's histogram grows with its requests)
    ev = rows[(60, "evicpress")]
    assert ev["evict_p50_ms"] == 0.5 and ev["evict_p99_ms"] == 1.0 and ev["evict_lock_wait_p99_ms"] == 0.5
    assert ev["evictions"] > 0 and rows[(60, "stock")]["evict_p99_ms"] is None
    # the window's steps by kind (the stand-in counts a store of <= 0.5 ms and a drop of <= 1 ms a request)
    store = ev["evict_steps"]["store"]
    assert 0 < store.pop("n") < ev["evictions"] and store == {"p50_ms": 0.5, "p99_ms": 0.5, "p100_ms": 0.5}
    assert ev["evict_steps"]["fallback_drop"]["p100_ms"] == 1.0 and "drop" not in ev["evict_steps"]
    assert set(report["itl_p99_evicpress_over_stock"]) == {"30", "60"}
    sent = [json.loads(line) for line in (tmp_path / "rec").read_text().splitlines()]
    fills = [b for b in sent if not b.get("stream")]
    # every context filled once per server, in batches, each its own token ids
    filled = [tuple(ids) for b in fills for ids in b["input_ids"]]
    assert len(filled) == 2 * (30 + 60) and len(set(filled)) == 30 + 60
    assert all(len(b["input_ids"]) <= 7 for b in fills)


def test_context_ids_are_distinct_branches_and_sse_chunks_are_counted():
    hp = load_bench_script("hot_path")
    ids = [hp.context_ids(i, 9) for i in (0, 1, 40_000, 80_000, 10_000_000)]
    assert all(len(x) == 9 for x in ids) and len({tuple(x[:2]) for x in ids}) == len(ids)
    assert all(hp.VOCAB_BASE <= t < hp.VOCAB_BASE + hp.VOCAB_SPAN for x in ids for t in x)
    chunks = list(hp.stream_chunks([b'data: {"text": "a"}', b"", b'data: {"text": "ab"}', b"data: [DONE]"]))
    assert chunks == [{"text": "a"}, {"text": "ab"}]
    with pytest.raises(RuntimeError, match="too long"):
        list(hp.stream_chunks([b'data: {"error": {"message": "too long"}}']))
    assert len(list(hp.stream_chunks([b'data: {"text": "error"}']))) == 1  # an answer that says "error" is a token
    assert hp._percentiles("itl", []) == {"itl_p50_ms": None, "itl_p99_ms": None, "itl_n": 0}


def test_a_refreshed_snapshot_equals_a_fresh_one_after_any_changes():
    """The planner's snapshot is refreshed by copying only the rows whose ``touched`` count
    moved: every way of changing a row must count, or the planner plans from stale rows.
    Seeded random changes of every kind, refreshed every few steps, compared column by
    column with a full copy."""
    rng = np.random.default_rng(7)
    t = _table()
    snap, keys, n = None, [], 0
    int4 = next(j for j, c in enumerate(t.configs) if c.codec == "int4")
    for step in range(600):
        op = rng.integers(0, 9) if keys else 0
        if op == 0 or len(keys) < 3:
            parent = keys[rng.integers(len(keys))] if keys and rng.random() < 0.5 else None
            t.insert(n, int(rng.integers(2, 50)), float(step), parent)
            keys.append(n)
            n += 1
        else:
            key = keys[rng.integers(len(keys))]
            r = t.row_of[key]
            if op == 1:
                t.remove(key)
                keys.remove(key)
            elif op == 2 and t.tokens[r] > 2:
                t.split(key, n, int(rng.integers(1, t.tokens[r])))
                keys.append(n)
                n += 1
            elif op == 3:
                t.hit(key, float(step))
            elif op == 4:
                t.set_quality(key, "int4", float(rng.random()))
            elif op == 5:
                t.set_present_quality(r, float(rng.random()))
            elif op == 6:
                t.set_stored_tokens(key, max(1, int(t.tokens[r]) // 2))
            elif op == 7:
                t.set_assign(r, int(rng.choice([t.gpu_config, t.drop_config, int4])))
            else:
                t.set_in_use(r, not t.in_use[r])
        if step % 7 == 0:
            snap = t.snapshot(snap)
            fresh = t.snapshot()
            for name in ("alive", "version", "parent", "freq", "last_time", "assign", "in_use", "profiled", "tokens",
                         "present_quality", "sizes", "quality"):
                assert np.array_equal(getattr(snap, name), getattr(fresh, name)), (step, name)


def test_placement_and_lock_columns_change_only_through_the_table():
    t = _table()
    r = t.insert("a", 10, 0.0)
    with pytest.raises(ValueError):
        t.assign[r] = t.drop_config
    with pytest.raises(ValueError):
        t.in_use[r] = True


def test_eviction_time_counts_the_wait_for_the_lock_and_status_reports_it(tmp_path):
    """What the scheduler loses to an eviction includes waiting for the cache's lock (the
    planner's snapshot takes it): both are in status, the wait separately."""
    import threading
    import time

    cache = _cache(tmp_path)
    for d in _docs(5):
        serve(cache, d)
    held = threading.Event()

    def hold_lock() -> None:
        with cache.lock:
            held.set()
            time.sleep(0.05)

    th = threading.Thread(target=hold_lock)
    th.start()
    held.wait()
    cache.evict(EvictParams(num_tokens=40))
    th.join()
    stats = cache.status()["stats"]
    assert stats["evict_wait_ms"]["n"] == stats["evict_ms"]["n"] == 1
    assert 30 <= stats["evict_wait_ms"]["max"] <= stats["evict_ms"]["max"]
    hist = stats["evict_hist"]  # cumulative: one eviction, in a bucket of at least 30 ms, both ways
    assert sum(hist["counts"]) == sum(hist["wait_counts"]) == 1
    assert float(hist["buckets_ms"][hist["wait_counts"].index(1)]) >= 30
    cache.reset()  # /flush_cache: the recent windows start afresh, the histograms keep counting
    stats = cache.status()["stats"]
    assert stats["evict_ms"] == {"n": 0} and sum(stats["evict_hist"]["counts"]) == 1
