"""bench/profiler_pressure.py's CPU-testable parts: its arguments and sizing, the status
samples and summary maths, and the whole script against the stand-in server."""

import json
import sys

import pytest

from evicpress_sglang.bench import profiler_pressure as pp
from evicpress_sglang.bench import runner
from evicpress_sglang.bench.workload import build
from test_bench import FAKE, _tiny_model, free_port


def test_arguments_become_the_benchs_with_a_pool_of_a_quarter_of_the_documents(tmp_path):
    args = pp.build_parser().parse_args(["--out", str(tmp_path), "--rate", "2", "--seconds", "60", "--",
                                         "--attention-backend", "triton"])
    assert args.pool_share == 0.25 and args.docs == 24 and args.sample_s == 30.0
    reqs = build("docqa", seed=0, n_requests=200, docs=6, rate=2.0, min_chars=4000, max_chars=4000)
    pool = pp.pool_tokens(reqs, 0.25)
    docs = {r.context: r.tokens_est() for r in reqs}  # each document once, however often it is asked
    assert len(docs) == 6 and pool == int(0.25 * sum(docs.values())) and 1000 * 6 // 4 < pool < 1100 * 6 // 4
    b = pp.bench_args(args, pool)
    assert (b.workload, b.requests, b.rate, b.docs, b.pool_tokens) == ("docqa", 120, 2.0, 24, pool)
    assert b.min_chars == b.max_chars == 7000 and b.host_ratio == 1.0 and b.port == 30200
    assert json.loads(b.settings) == {"profile_reserve": 0.5, "status_top": 100_000}
    assert b.sglang_args[-2:] == ["--attention-backend", "triton"] and b.sglang_flags == runner.SGLANG_FLAGS_DEFAULT
    name, overrides = runner.parse_policy(pp.RUNS[1])
    assert (name, overrides) == ("evicpress", {"profile_share": 0})


def test_samples_keep_the_counters_and_the_reasons():
    status = {"staged": 4, "variants_measured": 3, "variants_tainted": 1, "refusal": {"node": 2, "reason": "too big"},
              "running": [{"job": 5, "reason": "variant 2 (int2) partly matched: 8 of 10 tokens"}, {"reason": None}],
              "outcomes": {"4": {"reason": None}, "3": {"reason": "not reported within 600 s; last: None"}}}
    s = pp.profiler_sample(status)
    assert (s["staged"], s["variants_measured"], s["variants_tainted"], s["jobs"]) == (4, 3, 1, None)
    assert s["refusal"] == "too big" and s["running"] == ["variant 2 (int2) partly matched: 8 of 10 tokens"]
    assert s["finished"] == {"3": "not reported within 600 s; last: None"}
    assert pp.profiler_sample({})["refusal"] is None


def test_run_summary_and_the_ttft_comparison():
    results = [{"id": i, "ttft_s": t, "e2e_s": 2 * t, "text": "", "prompt_tokens": 10, "cached_tokens": 5,
                "completion_tokens": 1} for i, t in enumerate([0.1, 0.2, 0.3])] + [{"id": 3, "error": "x"}]
    status = {"profiler": {"staged": 8, "variants_measured": 6, "variants_tainted": 2},
              "placements": [{"held_out_queries": q, "profiled_quality": m, "tokens": n}
                             for q, m, n in ((4, {"int8": 0.9}, 900), (2, {}, 900), (2, None, 3), (1, {"int8": 1.0}, 9))]}
    r = pp.run_summary({"policy": "evicpress", "results": results, "wall_s": 1.0, "status": status}, [])
    assert r["contexts_with_2_queries"] == 3 and r["measured_contexts"] == 1 and r["measured_share"] == pytest.approx(1 / 3)
    assert r["contexts_with_2_queries_and_min_tokens"] == 2 and r["measured_share_min_tokens"] == 0.5
    assert r["tainted_per_staged"] == 0.25 and r["ttft_p50_s"] == pytest.approx(0.2) and r["errors"] == 1
    empty = pp.run_summary({"policy": "x", "results": [], "wall_s": 1.0, "status": None}, [])
    assert empty["measured_share"] is None and empty["tainted_per_staged"] is None and empty["ttft_p50_s"] is None
    on, off = pp.RUNS
    assert pp.compare({on: {"ttft_p50_s": 0.104}, off: {"ttft_p50_s": 0.1}}) == {
        "ttft_p50_ratio": pytest.approx(1.04), "ttft_within_5pct": True}
    assert pp.compare({on: {"ttft_p50_s": 0.11}, off: {"ttft_p50_s": 0.1}})["ttft_within_5pct"] is False
    assert pp.compare({on: {"ttft_p50_s": 0.11}}) == {"ttft_p50_ratio": None, "ttft_within_5pct": None}


def test_the_hit_split_says_whether_hits_or_every_request_got_slower():
    def req(ttft, cached):
        return {"ttft_s": ttft, "prompt_tokens": 100, "cached_tokens": cached}
    split = pp.hit_split([req(0.01, 95), req(0.03, 100), req(0.2, None), req(0.4, 5), req(0.5, 50), {"error": "x"}])
    assert split["cached_share_mean"] == pytest.approx((0.95 + 1.0 + 0.0 + 0.05 + 0.5) / 5)
    assert (split["over_90pct_cached"], split["under_10pct_cached"]) == (2, 2)
    assert split["ttft_p50_s_over_90pct_cached"] == pytest.approx(0.02)
    assert split["ttft_p50_s_under_10pct_cached"] == pytest.approx(0.3)
    assert pp.hit_split([])["cached_share_mean"] is None


def test_the_script_end_to_end_against_a_stand_in_server(tmp_path, monkeypatch):
    port = free_port()
    started = []

    def fake_server_for(spec, args, model):
        started.append((spec, args.pool_tokens, json.loads(args.settings)))
        return [sys.executable, FAKE, str(port), "--evicpress"], {}

    monkeypatch.setattr(runner, "server_for", fake_server_for)
    monkeypatch.setattr(runner, "resolve_model", lambda name: (_tiny_model(tmp_path), False))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--docs", "3", "--doc-chars", "600", "--rate", "20", "--seconds", "1.5",
            "--sample-s", "0.3", "--port", str(port)]
    assert pp.main(argv) == 0
    assert [s[0] for s in started] == list(pp.RUNS) and started[0][1] == started[1][1] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 30 and set(summary["runs"]) == set(pp.RUNS)
    for run in summary["runs"].values():
        assert run["requests"] == 30 and run["errors"] == 0 and run["ttft_p50_s"] > 0
        assert run["measured_share"] == 0.5 and run["tainted_per_staged"] == 0.25  # the stand-in's status
        assert run["samples"] and run["samples"][0]["finished"] == {"2": "variant 1 (int8) partly matched: 3 of 9 tokens"}
    assert summary["ttft_p50_ratio"] > 0 and isinstance(summary["ttft_within_5pct"], bool)
    before = (out / "evicpress.json").stat().st_mtime_ns
    assert pp.main(argv + ["--resume"]) == 0 and len(started) == 2  # nothing re-run
    assert (out / "evicpress.json").stat().st_mtime_ns == before

    # a proof cut short after its first run: --summarise reports what was saved, starts nothing,
    # and keeps the command the runs were made with
    ran = json.loads((out / "summary.json").read_text())["command"]
    (out / "evicpress_profile_share_0.json").unlink()
    assert pp.main(argv + ["--summarise"]) == 0 and len(started) == 2
    cut = json.loads((out / "summary.json").read_text())
    assert list(cut["runs"]) == ["evicpress"] and cut["runs"]["evicpress"]["requests"] == 30
    assert cut["ttft_p50_ratio"] is None and cut["ttft_within_5pct"] is None
    assert cut["command"] == ran and "--summarise" not in ran and "--summarise" in cut["summarised_by"]
    (out / "summary.json").unlink()  # no summary to say how the runs were made
    assert pp.main(argv + ["--summarise"]) == 0 and json.loads((out / "summary.json").read_text())["command"] is None
    # the arguments of another workload are refused, not summarised against the wrong requests
    other = [a if a != "1.5" else "2" for a in argv]
    assert pp.main(other + ["--summarise"]) == 2


def test_ttft_by_minute_shows_when_a_tail_happened():
    fast = [{"ttft_s": 0.05, "sent_s": t} for t in range(0, 120, 2)]
    stall = [{"ttft_s": 0.9, "sent_s": 61.0}, {"ttft_s": 0.4, "sent_s": 62.0}, {"error": "x", "sent_s": 63.0}]
    windows = pp.ttft_windows(fast + stall)
    assert [w["from_s"] for w in windows] == [0.0, 60.0]
    first, second = windows
    assert first == {"from_s": 0.0, "requests": 30, "p50_s": 0.05, "p99_s": 0.05, "max_s": 0.05, "over_200ms": 0}
    assert second["requests"] == 32 and second["over_200ms"] == 2 and second["max_s"] == 0.9
    assert second["p99_s"] == 0.9 and second["p50_s"] == 0.05
