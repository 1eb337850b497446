import json

import pytest

from evicpress_sglang.cli import main
from evicpress_sglang.sim import footprint_tokens, generate, load, save, simulate
from evicpress_sglang.units import parse_bytes

PER_TOKEN = 131072  # the default 8B-class layout


@pytest.mark.parametrize("workload", ["docqa", "chat", "mixed"])
def test_generated_traces_are_seeded_and_consistent(workload, tmp_path):
    a, b = generate(workload, 300, seed=5), generate(workload, 300, seed=5)
    assert a == b and generate(workload, 300, seed=6) != a
    times = [r["t"] for r in a["requests"]]
    assert times == sorted(times) and len(times) == 300
    seen = set()
    for r in a["requests"]:
        assert r.get("parent") is None or r["parent"] in seen  # a turn extends an earlier one
        seen.add(r["context"])
    save(a, tmp_path / "t.json")
    assert load(tmp_path / "t.json") == a


def test_docqa_popularity_is_skewed():
    reqs = generate("docqa", 2000, seed=1, n_docs=100)["requests"]
    counts = sorted((sum(r["context"] == c for r in reqs) for c in {r["context"] for r in reqs}), reverse=True)
    assert sum(counts[:10]) > 0.3 * len(reqs)  # Zipf: the top 10% of documents get a large share


@pytest.mark.parametrize("policy", ["lru", "lru-offload", "static:int4", "evicpress"])
def test_simulation_keeps_capacities_and_prefixes(policy):
    trace = generate("mixed", 400, seed=2, n_docs=40)
    fp = footprint_tokens(trace) * PER_TOKEN
    r = simulate(trace, policy, (fp / 6, fp / 6, fp), check=True)
    assert r.requests == 400
    assert sum(r.token_hit_rate.values()) == pytest.approx(1.0)
    assert r.ttft_p50 <= r.ttft_p90 <= r.ttft_p99
    if policy == "lru":
        assert r.token_hit_rate["host"] == r.token_hit_rate["disk"] == 0 and r.quality_mean == 1.0
    if policy == "lru-offload":
        assert r.token_hit_rate["recomputed"] == 0 and r.quality_mean == 1.0  # the disk holds everything


def test_everything_fits_means_only_gpu_hits():
    trace = generate("docqa", 200, seed=3, n_docs=20)
    fp = footprint_tokens(trace) * PER_TOKEN
    for policy in ("lru", "evicpress"):
        r = simulate(trace, policy, (fp * 1.01, 0, 0), check=True)
        assert r.token_hit_rate["gpu"] == 1.0 and r.evictions == 0


def test_evicpress_trades_little_quality_for_much_lower_ttft():
    """Where host memory cannot hold what the GPU evicts, compressing beats both
    dropping (LRU) and uncompressed offload (whose overflow lands on a slow disk)."""
    trace = generate("docqa", 1500, seed=0, n_docs=150)
    fp = footprint_tokens(trace) * PER_TOKEN
    cap = (fp / 5, fp / 5, 2 * fp)
    res = {p: simulate(trace, p, cap) for p in ("lru", "lru-offload", "evicpress")}
    assert res["evicpress"].ttft_mean < 0.6 * res["lru"].ttft_mean
    assert res["evicpress"].ttft_mean < 0.6 * res["lru-offload"].ttft_mean
    assert res["evicpress"].quality_mean > 0.97


def test_trace_referring_to_unknown_parent_is_rejected():
    trace = {"requests": [{"t": 0, "context": "b", "tokens": 10, "parent": "a"}]}
    with pytest.raises(ValueError, match="no earlier request created"):
        simulate(trace, "lru", (1e9, 0, 0))


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("500MB") == 500 * 10**6 and parse_bytes(1024) == 1024
    for bad in ("8XB", "-1", "GiB", ""):
        with pytest.raises(ValueError, match="byte size|>= 0"):
            parse_bytes(bad, "--host-bytes")


def test_simulate_command(tmp_path, capsys):
    path = tmp_path / "trace.json"
    assert main(["trace", "--workload", "chat", "--requests", "150", "--out", str(path)]) == 0
    capsys.readouterr()
    assert main(["simulate", "--trace", str(path), "--policy", "lru", "evicpress", "--gpu-bytes", "2GiB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["capacity"]["gpu"] == 2 * 2**30
    assert [r["policy"] for r in out["results"]] == ["lru", "evicpress"]
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(path), "--policy", "nope"])
    assert "unknown policy 'nope'" in capsys.readouterr().err
