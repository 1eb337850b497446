"""``--workload trace:FILE``: the committed example parses, bad lines stop the bench before
anything runs (each named by line and field), and a trace replayed against the stand-in
server sends its own prompts, token ids and output lengths, in arrival order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evicpress_sglang.bench import report, runner, trace
from evicpress_sglang.bench.workload import build
from test_bench import FAKE, _tiny_model, free_port

EXAMPLE = Path(__file__).parents[1] / "bench" / "examples" / "trace-example.jsonl"


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_committed_example_parses():
    reqs = build(f"trace:{EXAMPLE}")
    assert [r.id for r in reqs] == [1, 2, 3, 4, 5]  # ids are line numbers
    assert [r.t for r in reqs] == [0.0, 0.3, 0.5, 0.8, 1.1]
    assert [r.context for r in reqs] == ["release-notes", "release-notes", "ids-session", "line4", "ids-session"]
    assert [r.max_new_tokens for r in reqs] == [8, 16, 4, None, 6]
    assert reqs[0].truth == "48213" and "access code for document 7 is 48213" in reqs[0].prompt
    assert all(r.truth is None for r in reqs[1:])
    assert reqs[2].input_ids == [1, 504, 3458, 314, 260, 3767, 30, 216] and reqs[2].prompt == ""
    assert reqs[3].prompt == "Say hello in French." and reqs[3].input_ids is None
    assert reqs[4].tokens_est() == 10  # ids are counted exactly


def test_arrival_times_are_shifted_to_zero_and_sorted(tmp_path):
    path = write(tmp_path,
                 '{"t": 1718000002.5, "prompt": "c"}',
                 "",  # blank lines are skipped but still counted
                 '{"t": 1718000000.25, "prompt": "a"}',
                 '{"t": 1718000002.5, "prompt": "d"}',
                 '{"t": 1718000001, "input_ids": [7]}')
    reqs = trace.load(path)
    assert [(r.id, r.t) for r in reqs] == [(3, 0.0), (5, 0.75), (1, 2.25), (4, 2.25)]  # ties keep file order


@pytest.mark.parametrize("line, message", [
    ('{"t": 0, "prompt": "x"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"t": 0, "prompt": "x", "max_tokens": 4}', "unknown field 'max_tokens'"),
    ('{"t": 0}', 'exactly one of "prompt" and "input_ids" is needed, got neither'),
    ('{"t": 0, "prompt": "x", "input_ids": [1]}', 'exactly one of "prompt" and "input_ids" is needed, got both'),
    ('{"prompt": "x"}', '"t" (arrival time, seconds) is missing'),
    ('{"t": "0.5", "prompt": "x"}', '"t" must be a finite number of seconds >= 0, got "0.5"'),
    ('{"t": -1, "prompt": "x"}', '"t" must be'),
    ('{"t": NaN, "prompt": "x"}', '"t" must be'),
    ('{"t": true, "prompt": "x"}', '"t" must be'),
    ('{"t": 0, "prompt": "x", "max_new_tokens": 0}', '"max_new_tokens" must be an integer >= 1, got 0'),
    ('{"t": 0, "prompt": "x", "max_new_tokens": 2.5}', '"max_new_tokens" must be'),
    ('{"t": 0, "input_ids": []}', '"input_ids" must be a non-empty list'),
    ('{"t": 0, "input_ids": "1 2 3"}', '"input_ids" must be a non-empty list'),
    ('{"t": 0, "input_ids": [1, -2]}', '"input_ids"[1] must be a token id (integer >= 0), got -2'),
    ('{"t": 0, "input_ids": [1, true]}', '"input_ids"[1] must be a token id'),
    ('{"t": 0, "prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"t": 0, "prompt": "x", "truth": 42}', '"truth" must be a non-empty string, got 42'),
    ('{"t": 0, "prompt": "x", "context": null}', '"context" must be a non-empty string'),
])
def test_a_bad_line_is_named_by_number_and_field(tmp_path, line, message):
    path = write(tmp_path, '{"t": 0, "prompt": "fine"}', "", line)
    with pytest.raises(trace.TraceError) as e:
        trace.load(path)
    assert str(e.value).startswith(f"{path} line 3: {message}")  # only line 3: line 1 is fine


def test_every_bad_line_is_reported_at_once(tmp_path):
    lines = ['{"t": 0, "prompt": "ok"}'] + ['{"t": 0}'] * (trace.MAX_SHOWN + 3)
    with pytest.raises(trace.TraceError) as e:
        trace.load(write(tmp_path, *lines))
    shown = str(e.value).splitlines()
    assert shown[0].endswith("line 2: " + 'exactly one of "prompt" and "input_ids" is needed, got neither')
    assert len(shown) == trace.MAX_SHOWN + 1 and shown[-1] == "... and 3 more bad lines"
    with pytest.raises(trace.TraceError, match="has no requests"):
        trace.load(write(tmp_path, "", "  "))
    with pytest.raises(trace.TraceError, match="cannot read trace"):
        trace.load(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("extra, message", [
    ([], "line 2: \"max_new_tokens\""),
    (["--rates", "1,2"], "--rates: a trace replays its own arrival times"),
])
def test_a_bad_trace_stops_the_bench_before_anything_runs(tmp_path, monkeypatch, capsys, extra, message):
    def no_server(*a):
        raise AssertionError("a server was started")

    monkeypatch.setattr(runner, "server_for", no_server)
    monkeypatch.setattr(runner, "resolve_model", no_server)
    path = write(tmp_path, '{"t": 0, "prompt": "fine"}', '{"t": 1, "prompt": "x", "max_new_tokens": "8"}')
    with pytest.raises(SystemExit) as e:
        runner.main(["--out", str(tmp_path / "o"), "--workload", f"trace:{path}", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no partial bench: nothing written


@pytest.mark.parametrize("workload", ["rag", "trace:"])
def test_an_unknown_workload_is_refused(workload, capsys):
    with pytest.raises(SystemExit) as e:
        runner.build_parser().parse_args(["--workload", workload])
    assert e.value.code == 2 and "trace:FILE" in capsys.readouterr().err


def test_a_trace_is_replayed_as_written(tmp_path, monkeypatch):
    """Each policy's server receives the trace's prompts and token ids with their own
    max_new_tokens (the bench's default where a line has none), in arrival order, no
    earlier than their arrival times; truths are scored and contexts counted."""
    port = free_port()
    sent = tmp_path / "sent.jsonl"
    monkeypatch.setattr(runner, "server_for",
                        lambda spec, args, model: ([sys.executable, FAKE, str(port), "--record", str(sent)], {}))
    monkeypatch.setattr(runner, "resolve_model", lambda name: (_tiny_model(tmp_path), False))
    monkeypatch.setattr(report, "plots", lambda *a: [])
    out = tmp_path / "out"
    argv = ["--out", str(out), "--workload", f"trace:{EXAMPLE}", "--policies", "reference,stock",
            "--max-new-tokens", "3", "--port", str(port), "--quiet"]
    assert runner.main(argv) == 0

    reqs = trace.load(EXAMPLE)
    expected = [({"text": r.prompt} if r.input_ids is None else {"input_ids": r.input_ids},
                 r.max_new_tokens or 3) for r in reqs]
    bodies = [json.loads(line) for line in sent.read_text().splitlines()]
    assert len(bodies) == 2 * (1 + len(reqs))  # per policy: the warm-up, then the trace
    for policy in (bodies[:1 + len(reqs)], bodies[1 + len(reqs):]):
        got = [({k: b[k] for k in ("text", "input_ids") if k in b}, b["sampling_params"]["max_new_tokens"])
               for b in policy[1:]]
        assert got == expected

    doc = json.loads((out / "bench.json").read_text())
    assert doc["workload"] == f"trace:{EXAMPLE}" and doc["requests"] == 5 and doc["contexts"] == 3
    assert doc["rate"] == pytest.approx(4 / 1.1)
    stock = {s["policy"]: s for s in doc["summaries"]}["stock"]
    assert stock["errors"] == 0 and stock["fact_accuracy"] == 1.0 and stock["quality"] == 1.0
    record = json.loads((out / "stock.json").read_text())["results"]
    assert [r["id"] for r in record] == [1, 2, 3, 4, 5]
    assert [r["completion_tokens"] for r in record] == [n for _, n in expected]
    assert all(r["sent_s"] >= q.t - 0.01 for r, q in zip(record, reqs))
    saved = json.loads((out / "workload.json").read_text())["requests_run"]
    assert [r["max_new_tokens"] for r in saved] == [8, 16, 4, None, 6]
    assert runner.main(argv + ["--report-only"]) == 0  # the report alone, from what was saved
