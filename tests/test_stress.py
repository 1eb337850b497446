"""Seeded, randomized stress of the cache over real SGLang pools (see ``stress.py``).

CI runs each scenario for a few hundred steps; ``EVICPRESS_STRESS_STEPS`` runs longer and
``EVICPRESS_STRESS_SEED`` replays one seed (a failure prints its seed and operation log)."""

import os

import pytest

from stress import Stress

pytestmark = pytest.mark.usefixtures("short_contexts_drop")

STEPS = int(os.environ.get("EVICPRESS_STRESS_STEPS", "2500"))
SEEDS = [int(os.environ["EVICPRESS_STRESS_SEED"])] if "EVICPRESS_STRESS_SEED" in os.environ else [1, 2]
TOKEN_BYTES = 2 * 4 * 2 * 64 * 2

LOSSLESS = {"host_codecs": ["bf16"], "disk_codecs": ["bf16", "bf16+zstd"]}
LOSSY = {"host_codecs": ["bf16", "fp8", "int8", "int4", "int2", "keydiff:0.3+int8", "streaming:0.5"],
         "disk_codecs": ["bf16", "int4", "int4+zstd", "knorm:0.4+int4"]}
QUERY_AWARE = {"host_codecs": ["bf16", "int8", "expected:0.5+int8", "kvzip:0.4"],
               "disk_codecs": ["bf16", "expected:0.3+int4+zstd"]}


def _settings(tmp_path, codecs: dict, host_tokens: int, policy: str = "evicpress") -> dict:
    return {"policy": policy, "host_bytes": host_tokens * TOKEN_BYTES, "disk_dir": str(tmp_path / "disk"),
            "disk_bytes": 2500 * TOKEN_BYTES, "alpha": 0.5, "quality_floor": 0.0} | codecs


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("page_size", [1, 4])
def test_lossless_stress_serves_exact_kv(tmp_path, monkeypatch, seed, page_size):
    """Every codec exact: whatever the policy, faults and restarts, each request runs with
    the KV a full prefill computes, bit for bit."""
    s = Stress(seed, _settings(tmp_path, LOSSLESS, host_tokens=500), tmp_path, page_size=page_size,
               monkeypatch=monkeypatch)
    counts = s.run(STEPS)
    assert counts["finished"] > STEPS // 20 and counts["loads"] > 0 and counts["switches"] > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_lossy_stress_with_token_dropping_and_a_tiny_host_arena(tmp_path, monkeypatch, seed):
    """Quantizers and token dropping, a host arena of a few contexts: KV within the lossy
    bound, token-dropped prefixes at their original positions."""
    s = Stress(seed, _settings(tmp_path, LOSSY, host_tokens=60), tmp_path, lossless=False, monkeypatch=monkeypatch)
    counts = s.run(STEPS)
    assert counts["finished"] > STEPS // 20 and counts["loads"] > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_lossy_stress_with_query_aware_selectors(tmp_path, monkeypatch, seed, query_model_file):
    """``expected`` and ``kvzip`` (which read the query model at eviction), under the same faults,
    restarts and policy switches: KV within the lossy bound, dropped tokens at their positions."""
    settings = _settings(tmp_path, QUERY_AWARE, host_tokens=60, policy="static:expected:0.5+int8")
    s = Stress(seed, settings | {"query_model": query_model_file}, tmp_path, lossless=False, monkeypatch=monkeypatch)
    counts = s.run(STEPS)
    assert counts["finished"] > STEPS // 20 and counts["loads"] > 0 and counts["switches"] > 0
    stored = {key.split(":", 1)[1] for key, n in s.stores_by_codec.items() if n}
    # the first policy stores with expected; which codecs later policies pick depends on the run (timings included)
    assert "expected:0.5+int8" in stored, stored


@pytest.mark.parametrize("seed", SEEDS)
def test_lossy_paged_stress(tmp_path, monkeypatch, seed):
    codecs = {"host_codecs": ["bf16", "fp8", "int8", "int4", "int2"], "disk_codecs": ["bf16", "int4+zstd"]}
    s = Stress(seed, _settings(tmp_path, codecs, host_tokens=120), tmp_path, page_size=4, lossless=False,
               monkeypatch=monkeypatch)
    counts = s.run(STEPS)
    assert counts["finished"] > STEPS // 20 and counts["loads"] > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget_ms", [1e-6, 1000.0])
def test_background_planner_stress(tmp_path, monkeypatch, seed, budget_ms):
    """Eviction applies the background planner's plans (its thread live, and stepped by the
    loop), from stale snapshots, across policy switches; a budget too small for any step
    leaves every eviction to the LRU fallback. Lossless codecs: KV bit-exact throughout."""
    s = Stress(seed, _settings(tmp_path, LOSSLESS, host_tokens=300) | {"async_plan_min_contexts": 0,
               "evict_budget_ms": budget_ms}, tmp_path, monkeypatch=monkeypatch)
    counts = s.run(STEPS)
    assert counts["finished"] > STEPS // 20 and counts["switches"] > 0
    assert counts["fallback_drops"] > 0 if budget_ms < 1 else counts["plan_steps"] > 0
