"""The bench without a GPU: workloads, report maths, replay and the whole runner against a
stand-in server (tests/fake_sglang_server.py) that speaks SGLang's HTTP API."""

import json
import socket
import sys
from pathlib import Path

import pytest

from evicpress_sglang.bench import report, runner
from evicpress_sglang.bench.replay import replay
from evicpress_sglang.bench.server import Server, ServerError
from evicpress_sglang.bench.workload import BenchRequest, build

FAKE = str(Path(__file__).with_name("fake_sglang_server.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_docqa_is_seeded_real_text_with_planted_facts():
    a = build("docqa", seed=3, n_requests=80, docs=10, min_chars=2000, max_chars=4000)
    assert [r.prompt for r in a] == [r.prompt for r in build("docqa", seed=3, n_requests=80, docs=10,
                                                             min_chars=2000, max_chars=4000)]
    assert [r.prompt for r in a] != [r.prompt for r in build("docqa", seed=4, n_requests=80, docs=10,
                                                             min_chars=2000, max_chars=4000)]
    assert all(x.t < y.t for x, y in zip(a, a[1:]))
    by_doc: dict[str, set] = {}
    for r in a:
        by_doc.setdefault(r.context, set()).add(r.prompt.split("\n\nQuestion:")[0])
        assert 2000 <= len(r.prompt.split("\n\nQuestion:")[0]) <= 4000 + 200
        if r.truth:  # the fact asked for is in the document, exactly once
            assert r.prompt.count(f"is {r.truth}.") == 1 and "access code" in r.prompt
    assert all(len(docs) == 1 for docs in by_doc.values())  # one text per document, reused across questions
    counts = sorted((sum(r.context == c for r in a) for c in by_doc), reverse=True)
    assert counts[0] >= 3 * counts[-1]  # Zipf: a popular head and a tail
    assert any(r.truth for r in a) and any(r.truth is None for r in a)


def test_chat_turns_extend_their_history():
    reqs = build("chat", seed=1, n_requests=40, sessions=5, start_chars=1500, turn_chars=300)
    assert all(x.t <= y.t for x, y in zip(reqs, reqs[1:]))
    last: dict[str, str] = {}
    for r in reqs:
        session = r.context.split("/")[0]
        if session in last:  # the previous turn's prompt (without its question) is a prefix of this one
            history = last[session].rsplit("\n\nUser: ", 1)[0]
            assert r.prompt.startswith(history) and len(r.prompt) > len(last[session])
        last[session] = r.prompt
    with pytest.raises(ValueError, match="valid: docqa, chat"):
        build("rag")


def test_summary_figures():
    reqs = [BenchRequest(i, float(i), f"doc{i % 2}", "p", "42" if i % 2 else None) for i in range(4)]
    results = [{"id": i, "ttft_s": 0.1 * (i + 1), "e2e_s": 1.0, "text": t, "prompt_tokens": 100,
                "cached_tokens": 50 * (i % 2), "completion_tokens": 8}
               for i, t in enumerate(["x y", "it is 42", "x z", "no idea"])] + [{"id": 9, "error": "boom"}]
    ref = {0: "x y", 1: "it is 42", 2: "x y", 3: "it is 42"}
    status = {"stats": {"hit_tokens": {"host": 30, "disk": 10}, "hits": {}, "stores": {}, "bytes_loaded": {"host": 5},
                        "stored_bytes": 9, "compression_ratio": 2.0}}
    s = report.summarize("evicpress", results, reqs, wall_s=2.0, status=status, reference=ref, quality_floor=0.9)
    assert s["errors"] == 1 and s["requests"] == 5
    assert s["ttft_s"]["p50"] == pytest.approx(0.25) and s["ttft_s"]["mean"] == pytest.approx(0.25)
    assert s["throughput_rps"] == 2.0 and s["output_tokens_per_s"] == 16.0
    assert s["reuse_rate"] == pytest.approx(100 / 400)
    assert s["tiers"] == {"gpu": 60, "host": 30, "disk": 10}
    assert s["fact_accuracy"] == 0.5  # request 1 names 42, request 3 does not
    assert s["identical_answers"] == 0.5 and s["floor_violations"] == 2
    assert s["quality"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert s["quality_facts"] == pytest.approx((1 + 0) / 2) and s["quality_other"] == pytest.approx((1 + 0.5) / 2)
    base = dict(s, policy="stock", ttft_s={k: 2 * v for k, v in s["ttft_s"].items()})
    md = report.table([base, s])
    assert "| evicpress |" in md and "2.00x / 2.00x" in md and "| 0.500 / 0.750 |" in md
    assert md.splitlines()[-1].endswith("| 1/5 |")  # a failed request is never hidden


def test_failed_server_start_shows_the_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('CUDA error: out of memory'); sys.exit(3)"]
    with pytest.raises(ServerError, match="(?s)exited with code 3.*out of memory"):
        with Server(cmd, {}, tmp_path / "log", free_port(), timeout=30):
            pass


def test_replay_times_every_request_open_loop(tmp_path):
    port = free_port()
    reqs = [BenchRequest(i, 0.05 * i, "d", f"prompt {i % 3} " * 20) for i in range(9)]
    with Server([sys.executable, FAKE, str(port)], {}, tmp_path / "log", port, timeout=30) as url:
        out = replay(url, reqs + [BenchRequest(99, 0.5, "d", "TOO LONG")], max_new_tokens=4, progress=False)
        with pytest.raises(ServerError, match="already in use"):  # never mistake another server for ours
            with Server([sys.executable, FAKE, str(port)], {}, tmp_path / "log2", port, timeout=30):
                pass
    assert "longer than the context" in out[-1]["error"]
    assert [r["id"] for r in out] == list(range(9)) + [99]
    for r, q in zip(out, reqs):
        assert 0 < r["ttft_s"] < r["e2e_s"] and r["completion_tokens"] == 4
        assert r["sent_s"] >= q.t - 0.01  # never before its arrival time
    assert [r["cached_tokens"] > 0 for r in out[:6]] == [False] * 3 + [True] * 3  # repeats hit


def test_bench_end_to_end_against_a_stand_in_server(tmp_path, monkeypatch):
    """runner.main: one server per policy, results saved per policy, report, plots, resume."""
    pytest.importorskip("matplotlib")
    port = free_port()

    def fake_server_for(spec, args, model):
        salt = "" if spec in ("reference", "stock") else spec  # every non-stock policy answers differently
        extra = ["--evicpress"] if spec.startswith(("evicpress", "static")) else []
        return [sys.executable, FAKE, str(port), "--answer-salt", salt, *extra], {}

    monkeypatch.setattr(runner, "server_for", fake_server_for)
    monkeypatch.setattr(runner, "resolve_model", lambda name: (_tiny_model(tmp_path), False))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--policies", "reference,stock,evicpress@alpha=0.5", "--requests", "12",
            "--docs", "3", "--rate", "50", "--min-chars", "500", "--max-chars", "800", "--port", str(port), "--quiet"]
    assert runner.main(argv) == 0
    doc = json.loads((out / "bench.json").read_text())
    by = {s["policy"]: s for s in doc["summaries"]}
    assert set(by) == {"reference", "stock", "evicpress@alpha=0.5"}
    assert by["stock"]["quality"] == 1.0 and by["stock"]["identical_answers"] == 1.0
    assert by["evicpress@alpha=0.5"]["identical_answers"] < 1.0  # its answers differ: scored as such
    assert by["evicpress@alpha=0.5"]["tiers"]["host"] == 7 * 13  # the stand-in counts 7 a request, warm-up included
    assert all(s["fact_accuracy"] == 1.0 for s in by.values() if s["fact_accuracy"] is not None)
    assert doc["contexts"] <= 3 and doc["requests"] == 12
    assert {p.name for p in out.glob("*.png")} == {"ttft.png", "ttft_vs_quality.png", "hit_rate_per_tier.png"}
    assert "| stock |" in (out / "table.md").read_text()
    (out / "bench.json").unlink()
    assert runner.main(argv + ["--report-only"]) == 0  # the report alone, from what was saved
    assert json.loads((out / "bench.json").read_text())["summaries"] == doc["summaries"]
    before = (out / "stock.json").stat().st_mtime_ns
    assert runner.main(argv + ["--resume"]) == 0  # nothing re-run
    assert (out / "stock.json").stat().st_mtime_ns == before


def test_one_server_switches_policies_at_runtime_and_scores_against_lru(tmp_path, monkeypatch):
    """--one-server: one server start, each policy set through the admin endpoint with a flush
    before it, ``reference`` run as ``lru``, each policy's counters its own, resume skips."""
    port = free_port()
    record = tmp_path / "requests.jsonl"
    starts = []

    def fake_server_for(spec, args, model):
        starts.append(spec)
        return [sys.executable, FAKE, str(port), "--evicpress", "--record", str(record)], {}

    monkeypatch.setattr(runner, "server_for", fake_server_for)
    monkeypatch.setattr(runner, "resolve_model", lambda name: (_tiny_model(tmp_path), False))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--one-server", "--policies", "reference,static:int4,evicpress@alpha=0.5",
            "--requests", "10", "--docs", "3", "--rate", "50", "--min-chars", "500", "--max-chars", "800",
            "--port", str(port), "--quiet"]
    assert runner.main(argv) == 0
    assert starts == ["lru"]  # one server for all three
    doc = json.loads((out / "bench.json").read_text())
    by = {s["policy"]: s for s in doc["summaries"]}
    assert by["reference"]["quality"] == 1.0
    assert by["static:int4"]["identical_answers"] < 1.0 and by["evicpress@alpha=0.5"]["identical_answers"] < 1.0
    # each policy's counters cover its own replay only (10 requests + the warm-up), not the run so far
    assert all(s["stores"] == {"host:int4": 11} for s in by.values())
    assert all(s["bytes_stored"] == 1100 and s["compression_ratio"] == 4.0 for s in by.values())
    applied = {s: json.loads((out / f"{runner.slug(s)}.json").read_text())["policy_applied"] for s in by}
    # weights always sent: a switch must not keep the previous policy's alpha / floor
    assert applied == {"reference": {"policy": "lru", "alpha": 2.0, "quality_floor": 0.9},
                       "static:int4": {"policy": "static:int4", "alpha": 2.0, "quality_floor": 0.9},
                       "evicpress@alpha=0.5": {"policy": "evicpress", "alpha": 0.5, "quality_floor": 0.9}}
    assert runner.runtime_policy("evicpress", {"alpha": 4.0}) == {"policy": "evicpress", "alpha": 4.0,
                                                                 "quality_floor": 0.9}
    assert runner.main(argv + ["--resume"]) == 0 and starts == ["lru"]  # all done: no server started


@pytest.mark.parametrize("spec", ["stock", "hicache", "evicpress@host_bytes=5"])
def test_one_server_refuses_what_needs_its_own_server(spec, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        runner.main(["--out", str(tmp_path / "o"), "--one-server", "--policies", f"reference,{spec}"])
    assert e.value.code == 2 and "--one-server" in capsys.readouterr().err


def test_histogram_percentiles_are_bucket_bounds():
    from evicpress_sglang.bench.report import hist_percentile

    bounds = ["0.5", "1.0", "2.0", "inf"]
    assert hist_percentile(bounds, [50, 40, 9, 1], 50) == 0.5
    assert hist_percentile(bounds, [50, 40, 9, 1], 99) == 2.0
    assert hist_percentile(bounds, [50, 40, 9, 1], 100) == float("inf")
    assert hist_percentile(bounds, [0, 0, 0, 0], 99) is None


def test_stats_during_a_replay_subtract_counters_and_keep_the_rest():
    before = {"stats": {"stores": {"a": 3}, "evict_ms": {"p99": 1.0}, "last_miss": "y", "hist": [1, 1],
                        "raw_bytes_stored": 100, "stored_bytes": 50, "compression_ratio": 2.0}, "policy": "x"}
    after = {"stats": {"stores": {"a": 5, "b": 2}, "evict_ms": {"p99": 3.0}, "last_miss": "z", "hist": [4, 5],
                       "raw_bytes_stored": 500, "stored_bytes": 150, "compression_ratio": 3.3}, "policy": "lru"}
    assert runner.stats_during(after, before) == {"policy": "lru", "stats": {
        "stores": {"a": 2, "b": 2}, "evict_ms": {"p99": 3.0}, "last_miss": "z", "hist": [3, 4],
        "raw_bytes_stored": 400, "stored_bytes": 100, "compression_ratio": 4.0}}
    assert runner.stats_during(after, None) is after  # no status before: nothing to subtract


def _tiny_model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "hidden_size": 64}))
    return d


def test_policy_specs_and_server_commands(tmp_path):
    assert runner.parse_policy("evicpress@alpha=0.5,quality_floor=0.97") == (
        "evicpress", {"alpha": 0.5, "quality_floor": 0.97})
    assert runner.parse_policy("static:int4") == ("static:int4", {})
    with pytest.raises(ValueError, match="key=value"):
        runner.parse_policy("evicpress@alpha")
    args = runner.build_parser().parse_args(["--pool-tokens", "1000", "--host-ratio", "3", "--disk-bytes", "5000",
                                             "--settings", '{"quality_floor": 0.95}'])
    args.dummy = True
    model = _tiny_model(tmp_path)
    assert runner.kv_bytes_per_token(model) == 2 * 2 * 16 * 2 * 2
    stock, env = runner.server_for("stock", args, model)
    assert "--radix-cache-backend" not in stock and "EVICPRESS_CONFIG" not in env
    assert stock[stock.index("--max-total-tokens") + 1] == "1000" and "dummy" in stock
    ref, _ = runner.server_for("reference", args, model)
    assert "--max-total-tokens" not in ref
    hi, _ = runner.server_for("hicache", args, model)
    assert "--enable-hierarchical-cache" in hi and hi[hi.index("--hicache-ratio") + 1] == "3.0"
    ev, env = runner.server_for("evicpress@alpha=0.5", args, model)
    assert ev[ev.index("--radix-cache-backend") + 1] == "evicpress"
    cfg = json.loads(env["EVICPRESS_CONFIG"])
    assert cfg["policy"] == "evicpress" and cfg["alpha"] == 0.5 and cfg["quality_floor"] == 0.95
    assert cfg["host_bytes"] == 3 * 1000 * runner.kv_bytes_per_token(model) and cfg["disk_bytes"] == 5000
    assert cfg["profile_share"] == 0  # dummy weights: no profiler measuring noise
    args.dummy = False
    assert "profile_share" not in json.loads(runner.server_for("evicpress", args, model)[1]["EVICPRESS_CONFIG"])
    with pytest.raises(ValueError, match="alpha"):  # bad settings stop before a server starts
        runner.server_for("evicpress@alpha=-1", args, model)


@pytest.mark.parametrize("bad", [["--policies", "evicpress@alpha"], ["--settings", "{nope"], ["--settings", "[1]"]])
def test_malformed_bench_arguments_stop_with_one_line(bad, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        runner.main(["--out", str(tmp_path / "o")] + bad)
    assert e.value.code == 2 and "--policies/--settings" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


def test_sustained_rate_interpolates_between_the_last_rate_within_target_and_the_first_beyond():
    pts = [(4.0, 0.9), (1.0, 0.2), (2.0, 0.4)]  # any order
    assert report.sustained_rate(pts, 0.4) == (2.0, "=")
    assert report.sustained_rate(pts, 0.65) == pytest.approx((3.0, "="))  # halfway from 0.4 to 0.9
    assert report.sustained_rate(pts, 1.0) == (4.0, ">=")  # never missed: only a lower bound
    assert report.sustained_rate(pts, 0.1) == (None, "<")
    assert report.sustained_rate([(1.0, 0.2), (2.0, float("inf"))], 0.5) == (1.0, "=")  # failed run: no interpolation


def test_sweep_table_compares_rates_within_the_baselines_target():
    def s(policy, mean, errors=0):
        return {"policy": policy, "errors": errors, "ttft_s": {"mean": mean}}

    by_rate = {1.0: [s("stock", 0.45), s("evicpress", 0.28)], 2.0: [s("stock", 0.95), s("evicpress", 0.35)],
               4.0: [s("stock", 3.0, errors=2), s("evicpress", 0.55)]}
    md, curves = report.sweep_table(by_rate, 0.45)
    assert curves["stock"]["sustained_rps"] == 1.0 and curves["stock"]["bound"] == "="
    assert curves["evicpress"]["sustained_rps"] == pytest.approx(2 + 2 * 0.1 / 0.2)
    assert "| evicpress | 280 | 350 | 550 | 3.00 | 3.00x |" in md
    assert "| stock | 450 | 950 | failed | 1.00 | 1.00x |" in md
    _, curves = report.sweep_table(by_rate, 0.3)  # stock misses even at 1 req/s: no ratio to it
    assert curves["stock"]["bound"] == "<" and "x |" not in _.splitlines()[-1]


def _stand_in_sweep(tmp_path: Path, monkeypatch, policies: str, *server_args: str) -> tuple[Path, list[str], list]:
    """A sweep at 40 and 20 req/s (6 requests on 2 documents each) against stand-in servers
    started with ``server_args``: (out dir, bench argv, the policies started, in order)."""
    port, starts = free_port(), []

    def server_for(spec, args, model):
        starts.append(spec)
        return [sys.executable, FAKE, str(port), *server_args], {}

    monkeypatch.setattr(runner, "server_for", server_for)
    monkeypatch.setattr(runner, "resolve_model", lambda name: (_tiny_model(tmp_path), False))
    monkeypatch.setattr(report, "plots", lambda *a: [])
    out = tmp_path / "sweep"
    return out, ["--out", str(out), "--policies", policies, "--requests", "6", "--docs", "2", "--rates", "40,20",
                 "--min-chars", "500", "--max-chars", "800", "--port", str(port), "--quiet"], starts


def test_rate_sweep_runs_the_bench_at_every_rate(tmp_path, monkeypatch):
    out, argv, starts = _stand_in_sweep(tmp_path, monkeypatch, "stock,lru")
    assert runner.main(argv) == 0
    assert starts == ["stock", "lru"]  # one server per policy for all rates
    for rate in ("20", "40"):
        doc = json.loads((out / f"rate-{rate}" / "bench.json").read_text())
        assert doc["rate"] == float(rate) and {s["policy"] for s in doc["summaries"]} == {"stock", "lru"}
        run = json.loads((out / f"rate-{rate}" / "workload.json").read_text())["requests_run"]
        context = {r["id"]: r["context"] for r in run}
        for policy in ("stock", "lru"):  # the cache was flushed between rates: each starts cold
            results = json.loads((out / f"rate-{rate}" / f"{policy}.json").read_text())["results"]
            first = {context[r["id"]]: r for r in reversed(results)}
            assert all(r["cached_tokens"] == 0 for r in first.values())
            assert any(r["cached_tokens"] > 0 for r in results)  # and within a rate, reuse hits
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["rates"] == [20.0, 40.0] and set(sweep["policies"]) == {"stock", "lru"}
    stock_20 = json.loads((out / "rate-20" / "bench.json").read_text())["summaries"][0]["ttft_s"]["mean"]
    assert sweep["ttft_target_s"] == stock_20  # default target: stock at the lowest rate
    assert "req/s within" in (out / "sweep.md").read_text()
    starts.clear()  # resumed: nothing left to run, no server started, the same report
    assert runner.main(argv + ["--resume"]) == 0 and starts == []
    assert json.loads((out / "sweep.json").read_text())["ttft_target_s"] == stock_20
    with pytest.raises(SystemExit):
        runner.main(["--out", str(out), "--rates", "0,1"])


@pytest.mark.parametrize("fault", ["--exit-after", "--degrade-after"])
def test_a_sweep_stops_a_policy_whose_server_fails_and_keeps_what_ran(tmp_path, monkeypatch, fault):
    """A server that exits, or an evicpress backend that degrades to stock behaviour (a flush
    would re-apply it), during the second rate: that rate is not saved (a resume runs it
    again; an earlier sweep's record of it is gone, not reported as this one's), the sweep
    fails with one line, and the first rate is still reported."""
    # 6 requests a rate + 1 warm-up each: the fault comes during the second rate
    out, argv, _ = _stand_in_sweep(tmp_path, monkeypatch, "lru", "--evicpress", fault, "9")
    (out / "rate-40").mkdir(parents=True)  # an earlier sweep's record and a file of the user's
    (out / "rate-40" / "lru.json").write_text(json.dumps({"policy": "lru", "results": []}))
    (out / "rate-40" / "notes.json").write_text("{}")
    assert runner.main(argv) == 1
    assert (out / "rate-20" / "lru.json").exists() and not (out / "rate-40" / "lru.json").exists()
    assert (out / "rate-40" / "notes.json").exists()
    assert json.loads((out / "rate-20" / "bench.json").read_text())["summaries"][0]["errors"] == 0
    assert not (out / "sweep.json").exists()
    log = (out / "logs" / "lru.log").read_text()
    assert runner.main(argv + ["--resume"]) == 1  # the failed rate runs again (and fails again here)
    assert (out / "logs" / "lru.log").read_text().startswith(log)  # the first session's log is kept
