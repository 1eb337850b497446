import numpy as np
import pytest
import torch

from evicpress_sglang.codecs import KVShape
from evicpress_sglang.policy import (
    ContextTable, CostModel, PolicyError, Weights, build_configs, make_policy, solve, solve_exact,
)
from evicpress_sglang.policy.cost import PrefillFit, calibrate
from evicpress_sglang.policy import placement
from evicpress_sglang.policy.placement import Problem, prefix_violations

LAYOUT = KVShape(32, 0, 8, 128, torch.bfloat16)  # 8B-class: 128 KiB per token
CODECS = ["bf16", "int8", "int4", "int2"]
DISK = ["bf16", "int4+zstd"]


def _table(cost=None):
    return ContextTable(build_configs(CODECS, DISK), LAYOUT, cost or CostModel())


def _random_instance(rng, n, with_parents):
    """A small instance built through the real table and utility, with random state."""
    table = _table()
    for i in range(n):
        parent = None
        if with_parents and i and rng.random() < 0.4:
            parent = f"c{rng.integers(0, i)}"
        table.insert(f"c{i}", int(rng.integers(256, 16384)), now=0.0, parent=parent)
        for _ in range(int(rng.integers(0, 5))):
            table.hit(f"c{i}", now=float(rng.uniform(0, 600)))
        for codec in ("int8", "int4", "int2"):
            table.set_quality(f"c{i}", codec, float(rng.uniform(0.6, 1.0)))
    pol = make_policy("evicpress", table, Weights(alpha=float(rng.uniform(0.2, 5)), quality_floor=0.0))
    rows = table.rows()
    total = table.sizes[rows, table.gpu_config].sum()
    cap = total * rng.uniform(0.05, 0.6, size=3)
    return pol._problem(rows, table.config_sizes(rows), pol.utility(rows, now=600.0), cap, None)


@pytest.mark.parametrize("with_parents", [False, True])
def test_heuristic_is_near_optimal_and_always_feasible(with_parents):
    rng = np.random.default_rng(7)
    gaps = []
    for _ in range(150):
        p = _random_instance(rng, 5, with_parents)
        heur, best = solve(p), solve_exact(p)
        assert p.feasible(heur)
        gaps.append((p.total_utility(best) - p.total_utility(heur)) / abs(p.total_utility(best)))
    assert min(gaps) > -1e-9  # never better than the optimum: the exact solver is right too
    assert np.mean(gaps) < 0.02


def test_locked_contexts_stay_and_prefixes_hold():
    rng = np.random.default_rng(3)
    p = _random_instance(rng, 40, with_parents=True)
    start = p.best()
    p.movable = rng.random(p.n) < 0.7
    out = solve(p, start=start)
    assert np.array_equal(out[~p.movable], start[~p.movable])
    assert prefix_violations(p, out).size == 0


def test_quality_floor_is_never_crossed():
    table = _table()
    for i in range(30):
        table.insert(i, 4096, now=0.0)
        table.set_quality(i, "int4", 0.5 if i % 2 else 0.99)
        table.set_quality(i, "int2", 0.5)
    pol = make_policy("evicpress", table, Weights(alpha=1.0, quality_floor=0.95))
    cap = np.array([5, 10, 5]) * 4096 * LAYOUT.with_tokens(1).raw_nbytes
    rows, assign = pol.place(cap, now=1.0)
    q = table.config_quality(rows)[np.arange(rows.size), assign]
    assert (q >= 0.95).all()
    chosen = {table.configs[c].codec for c in assign}
    assert "int2" not in chosen


def test_utility_prefers_compression_when_it_is_cheap_in_quality():
    """One context, host fits it only compressed: int8 (q .99) beats dropping it."""
    table = _table()
    table.insert("a", 8192, now=0.0)
    for codec, q in (("int8", 0.995), ("int4", 0.9), ("int2", 0.7)):
        table.set_quality("a", codec, q)
    raw = table.sizes[0, table.gpu_config]
    pol = make_policy("evicpress", table, Weights(alpha=2.0, quality_floor=0.0))
    _, assign = pol.place(np.array([0, raw * 0.6, 0]), now=0.0)
    assert table.configs[assign[0]].label == "host:int8"


def test_frequency_decays_with_half_life():
    table = ContextTable(build_configs(CODECS, DISK), LAYOUT, CostModel(), half_life_s=100.0)
    table.insert("a", 100, now=0.0)
    assert table.frequency(np.array([0]), now=100.0)[0] == pytest.approx(0.5)
    table.hit("a", now=100.0)
    assert table.frequency(np.array([0]), now=200.0)[0] == pytest.approx(0.75)


def test_lru_family_evicts_least_recent_down_its_chain():
    table = _table()
    for i in range(4):
        table.insert(i, 1000, now=float(i))
    one = table.sizes[0, table.gpu_config]
    labels = lambda pol, cap: [table.configs[c].label for c in pol.place(np.array(cap), now=10.0)[1]]
    assert labels(make_policy("lru", table), [2 * one, 0, 0]) == ["drop", "drop", "gpu", "gpu"]
    assert labels(make_policy("lru-offload", table), [2 * one, one, 10 * one]) == ["disk:bf16", "host:bf16", "gpu", "gpu"]
    assert labels(make_policy("static:int4", table), [3 * one, one, 0]) == ["host:int4", "gpu", "gpu", "gpu"]


def test_unknown_policy_and_bad_weights_are_clear_errors():
    table = _table()
    with pytest.raises(PolicyError, match="valid: evicpress, lru, lru-offload, static:<codec>"):
        make_policy("fifo", table)
    with pytest.raises(PolicyError, match="enabled codecs"):
        make_policy("static:fp8", table)
    with pytest.raises(PolicyError, match="quality_floor"):
        make_policy("evicpress", table, Weights(quality_floor=1.5))
    with pytest.raises(PolicyError, match="alpha"):
        make_policy("evicpress", table, Weights(alpha=float("nan")))


def test_cost_model_learns_prefill_and_calibrates_here(tmp_path):
    fit = PrefillFit()
    for _ in range(50):
        fit.add(1000, 0.05)
    assert fit.per_token() is None  # one batch size: overhead and slope cannot be told apart
    assert fit.bound() == pytest.approx(5e-5)  # ... but neither exceeds 50 ms / 1000 tokens
    rng = np.random.default_rng(0)
    fit = PrefillFit()
    for tokens in rng.integers(1, 4000, 300):  # 20 ms per batch + 10 us/token, 5% noise
        fit.add(int(tokens), (0.02 + 1e-5 * tokens) * rng.uniform(0.95, 1.05))
    assert fit.per_token() == pytest.approx(1e-5, rel=0.1)  # seconds/tokens would say ~2e-5 on average
    cal = calibrate(["int4", "int4+zstd"], KVShape(2, 256, 2, 64, torch.bfloat16), device="cpu", disk_dir=str(tmp_path))
    assert cal.decode_rate["int4"] > 0 and cal.zstd_bps > 0 and cal.disk_bw > 0
    assert cal.zstd_gain["int4"] >= 1.0
    assert CostModel.from_json(cal.to_json()) == cal


def _launch_bound_batches(rng, n: int = 600):
    """Prefill batches of a small model without CUDA graphs (SmolLM2 on an H200): 5 ms
    per batch, 0.6 ms per request, 0.66 us per token; hits prefill only their question,
    misses a ~2k-token document, and the profiler asks 16 questions in one batch. A third
    of the batches are slowed by work that overlaps them (one-sided noise)."""
    for _ in range(n):
        u = rng.random()
        requests, tokens = ((1, int(rng.integers(20, 60))) if u < 0.5 else
                            (1, int(rng.integers(1800, 2200))) if u < 0.75 else (16, 16 * int(rng.integers(40, 70))))
        seconds = 0.005 + 6e-4 * requests + 0.66e-6 * tokens
        if rng.random() < 0.3:
            seconds += rng.exponential(0.003)
        yield tokens, requests, seconds


@pytest.mark.parametrize("seed", range(5))
def test_prefill_fit_separates_per_request_cost_and_ignores_delays(seed):
    """A fit of time against tokens alone charges the profiler's many-request batches'
    overhead to tokens: least squares reads at least 1.3x the truth on these batches."""
    rng = np.random.default_rng(seed)
    fit = PrefillFit()
    batches = list(_launch_bound_batches(rng))
    for tokens, requests, seconds in batches:
        fit.add(tokens, seconds, requests)
    tokens, _, seconds = np.array(batches, dtype=np.float64).T
    assert np.polyfit(tokens, seconds, 1)[0] > 1.3 * 0.66e-6  # the confound is in the data
    assert fit.per_token() == pytest.approx(0.66e-6, rel=0.2)
    assert fit.per_token() <= fit.bound() < 4e-6  # ~7.3 ms / 2k tokens


def test_prefill_fit_keeps_the_per_request_cost_out_of_the_slope_with_only_short_batches():
    """1-7 short questions per batch (no document prefilled): the slope cannot be told from
    the noise, so the estimate is the floor, a tenth of the bound; grouping 4-7 requests in
    one class put the per-request cost on the slope."""
    rng = np.random.default_rng(0)
    fit = PrefillFit()
    for _ in range(600):
        requests = int(rng.integers(1, 8))
        tokens = int(rng.integers(20, 60, requests).sum())
        seconds = 0.005 + 6e-4 * requests + 0.66e-6 * tokens + (rng.exponential(0.003) if rng.random() < 0.3 else 0)
        fit.add(tokens, seconds, requests)
    assert fit.per_token() == pytest.approx(0.1 * fit.bound()) and fit.per_token() < 6 * 0.66e-6


def test_prefill_fit_ignores_impossible_times():
    fit = PrefillFit()
    for _ in range(10):
        fit.add(4000, 1e-300)  # a timer that read nothing
        fit.add(100, float("nan"))
    assert fit.bound() is None and fit.per_token() is None


def test_prefill_fit_never_prices_a_slope_lost_in_noise_at_zero():
    """Times that do not grow with tokens (or shrink): the slope is taken as a tenth of
    the tightest bound, not zero (the policy would then drop every context)."""
    rng = np.random.default_rng(3)
    fit = PrefillFit()
    for _ in range(400):
        tokens = int(rng.choice([50, 500, 4000]))
        fit.add(tokens, 0.010 - 1e-7 * tokens + rng.exponential(0.001))
    bound = fit.bound()
    assert bound == pytest.approx(0.0096 / 4000, rel=0.1)
    assert fit.per_token() == pytest.approx(0.1 * bound)


def test_prefill_fit_follows_the_recent_batches():
    """After the model's cost changes (another server config), the window forgets."""
    fit = PrefillFit(window=256)
    rng = np.random.default_rng(4)
    for cost in (2e-5, 5e-6):
        for tokens in rng.integers(16, 8000, 300):
            fit.add(int(tokens), 0.01 + cost * tokens)
        assert fit.per_token() == pytest.approx(cost, rel=0.05)


def test_load_time_model_orders_tiers_sensibly():
    table = _table()
    table.insert("a", 16384, now=0.0)
    load = dict(zip((c.label for c in table.configs), table.load_seconds(np.array([0]))[0]))
    assert load["gpu"] == 0
    assert load["host:bf16"] == pytest.approx(16384 * 131072 / 53e9 + 1e-4)
    assert load["host:int4"] < load["host:bf16"] < load["drop"] < load["disk:bf16"]
    assert load["drop"] == pytest.approx(16384 * 27e-6)


def _covering_by_sort(cost: np.ndarray, weight: np.ndarray, need: float) -> np.ndarray:
    order = np.argsort(cost, kind="stable")
    return order[: int(np.searchsorted(np.cumsum(weight[order]), need - 1e-9)) + 1]


@pytest.mark.parametrize("n", [100, 5000, 60_000])
@pytest.mark.parametrize("ties", [False, True])
def test_cheapest_covering_takes_the_cheapest_until_enough(n, ties):
    rng = np.random.default_rng(n + ties)
    cost = rng.integers(0, 30, n).astype(np.float64) if ties else rng.random(n)
    weight = rng.uniform(1, 100, n)
    for need in (30.0, 2_000.0, weight.sum() * 0.5, weight.sum() * 0.97, weight.sum() * 2):
        got = placement._cheapest_covering(cost, weight, need)
        assert np.unique(got).size == got.size
        if need > weight.sum():
            assert got.size == n
            continue
        assert weight[got].sum() >= need - 1e-6
        top = cost[got].max()
        rest = np.setdiff1d(np.arange(n), got)
        assert (cost[rest] >= top).all()  # nothing cheaper is left out
        # and nothing more than needed: some item at the cut could not have been spared
        assert weight[got].sum() - weight[got][cost[got] == top].max() < need
        if not ties:  # the same items as a full sort would take (with ties: as many at the cut as needed)
            assert np.array_equal(np.sort(got), np.sort(_covering_by_sort(cost, weight, need)))


def test_cheapest_covering_with_negative_weights_still_covers():
    """The fill-up defers gains whose added bytes may be negative (a move to a smaller
    configuration): whatever is returned must still cover the need."""
    rng = np.random.default_rng(3)
    cost, weight = rng.random(20_000), rng.uniform(-10, 100, 20_000)
    for need in (50.0, weight.sum() * 0.5, weight.sum()):
        assert weight[placement._cheapest_covering(cost, weight, need)].sum() >= need - 1e-6


@pytest.mark.parametrize("evict", [False, True])
def test_placement_through_selection_equals_placement_through_a_sort(monkeypatch, evict):
    """The relief and the fill-up choose their steps by selection around the cut; a full
    sort of every candidate must choose the same ones (a full re-plan frees most bytes,
    an eviction a little out of many candidates)."""
    p = _random_instance(np.random.default_rng(5), 6000, with_parents=True)
    p.capacity = p.usage(p.best()) * np.array([0.5, 0.5, 1.0, 1.0])
    start = solve(p)
    if evict:
        p.capacity = p.capacity * np.array([0.97, 1.0, 1.0, 1.0])
    selections, argpartition = [], np.argpartition
    with monkeypatch.context() as m:  # count the selection rounds: the test must reach them
        m.setattr(np, "argpartition", lambda *a, **k: selections.append(1) or argpartition(*a, **k))
        selected = solve(p, start=start if evict else None)
    assert selections
    monkeypatch.setattr(placement, "_cheapest_covering", _covering_by_sort)
    assert np.array_equal(selected, solve(p, start=start if evict else None))
    assert p.feasible(selected)


def test_configurations_must_be_ordered_by_tier():
    p = _random_instance(np.random.default_rng(0), 3, with_parents=False)
    with pytest.raises(ValueError, match="ordered by tier"):
        Problem(p.tier_of[::-1].copy(), p.sizes, p.utility, p.capacity)


def test_solving_leaves_the_problem_as_it_was():
    """The solver assigns in place: starting from the best placement must not write into it."""
    p = _random_instance(np.random.default_rng(8), 300, with_parents=True)
    p.capacity = p.usage(p.best()) * np.array([0.3, 0.3, 1.0, 1.0])
    best = p.best().copy()
    first = solve(p)
    assert np.array_equal(p.best(), best) and not np.array_equal(first, best)
    assert np.array_equal(solve(p), first)


def test_per_tier_best_is_the_first_maximum_for_any_tier_width():
    """Tiers wider than eight configurations (several bytes of the bitmask), ties and
    forbidden (-inf) configurations: the same answer as numpy's argmax per tier."""
    rng = np.random.default_rng(4)
    tier_of = np.repeat([0, 1, 2, 3], [1, 11, 3, 1])
    U = rng.integers(0, 4, (tier_of.size, 500)).astype(np.float64)  # many ties
    U[rng.random(U.shape) < 0.2] = -np.inf
    U[1:12, :5] = -np.inf  # a tier with nothing allowed
    S = rng.uniform(1, 10, U.shape)
    configs = [np.flatnonzero(tier_of == t) for t in range(4)]
    best_c, best_u, min_s = placement._tier_bests(configs, S, U)
    for t, c in enumerate(configs):
        assert np.array_equal(best_c[t], c[0] + U[c].argmax(axis=0))
        assert np.array_equal(best_u[t], U[c].max(axis=0)) and np.array_equal(min_s[t], S[c].min(axis=0))


@pytest.mark.parametrize("remote_bw, expected", [(5e9, "remote:int8"), (1e6, "drop")])
def test_remote_is_the_tier_after_disk_priced_by_its_measured_bandwidth(remote_bw, expected):
    """Host and disk are full: a context goes to the remote store when loading it from there
    beats recomputing it (a fast store), and is dropped when the store is too slow to win."""
    cost = CostModel(remote_bw=remote_bw, remote_latency=1e-3)
    table = ContextTable(build_configs(CODECS, DISK, ["int8"]), LAYOUT, cost)
    assert [c.label for c in table.configs][-2:] == ["remote:int8", "drop"]
    table.insert("a", 8192, now=0.0)
    table.hit("a", now=1.0)
    table.set_quality("a", "int8", 0.999)
    raw = table.sizes[0, table.gpu_config]
    pol = make_policy("evicpress", table, Weights(alpha=2.0, quality_floor=0.0))
    _, assign = pol.place(np.array([0, 0, 0, 4 * raw]), now=1.0)
    assert table.configs[assign[0]].label == expected


def test_static_policies_offload_through_the_remote_tier_last():
    table = ContextTable(build_configs(CODECS, DISK, ["int8", "bf16"]), LAYOUT, CostModel())
    assert make_policy("static:int8", table).chain == [
        [c.label for c in table.configs].index(lab) for lab in ("gpu", "host:int8", "remote:int8", "drop")]
    assert make_policy("lru-offload", table).chain == [
        [c.label for c in table.configs].index(lab) for lab in ("gpu", "host:bf16", "disk:bf16", "remote:bf16", "drop")]
