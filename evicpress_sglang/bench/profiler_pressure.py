"""``python bench/profiler_pressure.py``: does the quality profiler measure when the cache is
full, and what does it cost the users?

The bench's document-QA workload (Zipf popularity, seeded) is replayed twice against the
evicpress backend with a GPU pool that holds at most ``--pool-share`` of the documents: once
with the default ``profile_share`` and once with ``profile_share`` 0 (no background
profiler). Servers, workload and replay are :mod:`.runner`'s (so ``--resume`` skips a run
already saved, and a long proof can span several device calls). While each run replays, the
profiler's status is sampled every ``--sample-s`` seconds (staged, measured, tainted and
the reasons of the last refusals and taints); at the end ``summary.json`` holds per run the
share of contexts with at least two held-out queries that got a measured profile, the
tainted/staged ratio and the user TTFT p50, and the TTFT p50 ratio of the two runs
(target: within 5%).

Sizing for the GPU: each run is one server start (~50 s without CUDA graphs) plus
``--seconds`` of replay; the defaults fit both runs in about 8 minutes.

Usage: python bench/profiler_pressure.py --model DIR --out DIR [--seconds 140] [--resume | --summarise] [-- sglang args]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

from ..settings import Settings
from . import report, runner
from .server import ServerError

RUNS = ("evicpress", "evicpress@profile_share=0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/profiler_pressure.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="as bench/run.py's --model")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--doc-chars", type=int, default=7000, help="per document (about 1.8k SmolLM2 tokens)")
    p.add_argument("--pool-share", type=float, default=0.25, help="GPU pool = this share of all documents' tokens")
    p.add_argument("--profile-reserve", type=float, default=0.5,
                   help="profile_reserve: the pool holds ~1/pool-share documents; a recomputed reference and a "
                        "copy of the largest must fit (0.4 refused those of ~2.2k tokens on a 10.75k pool)")
    p.add_argument("--host-ratio", type=float, default=1.0, help="host tier = this x the GPU pool")
    p.add_argument("--rate", type=float, default=3.0, help="user requests per second (Poisson)")
    p.add_argument("--seconds", type=float, default=140.0, help="replay length of each run")
    p.add_argument("--sample-s", type=float, default=30.0, help="profiler status every this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=30200)
    p.add_argument("--resume", action="store_true", help="skip runs whose results are in --out")
    p.add_argument("--summarise", action="store_true",
                   help="start no server: summarise the runs saved in --out (e.g. after a run was cut short)")
    p.add_argument("sglang_args", nargs="*", help="after --: more flags for both servers")
    return p


def bench_args(args: argparse.Namespace, pool_tokens: int = 0) -> argparse.Namespace:
    """bench/run.py's arguments for this proof (its defaults for everything else)."""
    settings = {"profile_reserve": args.profile_reserve, "status_top": 100_000}  # every context in status
    return runner.build_parser().parse_args([
        "--workload", "docqa", "--out", str(args.out), "--docs", str(args.docs), "--seed", str(args.seed),
        "--requests", str(max(1, round(args.rate * args.seconds))), "--rate", str(args.rate),
        "--min-chars", str(args.doc_chars), "--max-chars", str(args.doc_chars), "--pool-tokens", str(pool_tokens),
        "--host-ratio", str(args.host_ratio), "--settings", json.dumps(settings), "--port", str(args.port),
        "--quiet", "--", *args.sglang_args])


def pool_tokens(reqs: list, share: float) -> int:
    """A pool of ``share`` of the workload's documents (their estimated tokens)."""
    docs = {r.context: r for r in reqs}.values()
    return int(share * sum(r.tokens_est() for r in docs))


def profiler_sample(profiler: dict) -> dict:
    """What one status sample keeps of the profiler: counters and the reasons of the last
    refusal, of each running job and of each recently finished job that discarded variants."""
    keys = ("jobs", "recomputed", "reported", "staged", "variants_measured", "variants_tainted", "expired",
            "active_jobs", "held_tokens", "reserve_tokens", "profiled_contexts", "budget")
    return {k: profiler.get(k) for k in keys} | {
        "refusal": (profiler.get("refusal") or {}).get("reason"),
        "running": [j.get("reason") for j in profiler.get("running", []) if j.get("reason")],
        "finished": {job: o["reason"] for job, o in (profiler.get("outcomes") or {}).items() if o.get("reason")}}


def policy_sample(status: dict) -> dict:
    """What the policy acted on and did, beside the profiler: the prefill cost it prices a
    drop with (learnt from the server's batches) and the stores and hits so far."""
    stats = status.get("stats") or {}
    return {"prefill_s_per_token": (status.get("cost_model") or {}).get("prefill_s_per_token"),
            "stores": sum((stats.get("stores") or {}).values()), "hits": sum((stats.get("hits") or {}).values())}


class StatusSampler:
    """``with StatusSampler(url, every) as samples:`` the profiler's status every ``every``
    seconds (``samples`` fills in the background; a server not up yet is skipped)."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every = url, every
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                status = requests.get(self.url + "/evicpress/status", timeout=10).json()
            except (requests.RequestException, ValueError):
                continue
            self.samples.append({"t": round(time.monotonic() - self._t0, 1), **profiler_sample(status["profiler"]),
                                 **policy_sample(status)})

    def __enter__(self) -> list[dict]:
        self._thread.start()
        return self.samples

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_summary(record: dict, reqs: list, min_tokens: int = Settings.profile_min_tokens) -> dict:
    """One run's figures from what :func:`.runner.run_policy` saved."""
    status = record["status"] or {}
    prof = status.get("profiler", {})
    reused = [p for p in status.get("placements", []) if p["held_out_queries"] >= 2]
    measured = [p for p in reused if p["profiled_quality"]]
    # the same among contexts with profile_min_tokens of their own (the ones jobs are made for;
    # the rest are a question's first words split below a document)
    own = [p for p in reused if p.get("tokens", 0) >= min_tokens]
    own_measured = [p for p in own if p["profiled_quality"]]
    staged = prof.get("staged", 0)
    ttft = report.summarize(record["policy"], record["results"], reqs, record["wall_s"])
    return {"contexts_with_2_queries": len(reused), "measured_contexts": len(measured),
            "measured_share": len(measured) / len(reused) if reused else None,
            "contexts_with_2_queries_and_min_tokens": len(own),
            "measured_share_min_tokens": len(own_measured) / len(own) if own else None,
            "staged": staged, "variants_measured": prof.get("variants_measured", 0),
            "variants_tainted": prof.get("variants_tainted", 0),
            "tainted_per_staged": prof.get("variants_tainted", 0) / staged if staged else None,
            "ttft_p50_s": ttft["ttft_s"]["p50"], "ttft_mean_s": ttft["ttft_s"]["mean"], "ttft_p99_s": ttft["ttft_s"]["p99"],
            "errors": ttft["errors"], "requests": ttft["requests"], **hit_split(record["results"]),
            **policy_sample(status), "ttft_by_minute": ttft_windows(record["results"]),
            "final": profiler_sample(prof)}


def hit_split(results: list[dict]) -> dict:
    """Where a TTFT difference comes from: the share of prompt tokens found in cache, and the
    TTFT p50 of requests that found most of their prompt (> 90%) and of those that found little
    (< 10%). A profiler that costs hits shows in the first; one that slows every batch in both."""
    done = [r for r in results if "ttft_s" in r and r.get("prompt_tokens")]
    share = [(r.get("cached_tokens") or 0) / r["prompt_tokens"] for r in done]
    hits = [r["ttft_s"] for r, c in zip(done, share) if c > 0.9]
    misses = [r["ttft_s"] for r, c in zip(done, share) if c < 0.1]
    return {"cached_share_mean": statistics.fmean(share) if share else None,
            "over_90pct_cached": len(hits), "under_10pct_cached": len(misses),
            "ttft_p50_s_over_90pct_cached": statistics.median(hits) if hits else None,
            "ttft_p50_s_under_10pct_cached": statistics.median(misses) if misses else None}


def ttft_windows(results: list[dict], window_s: float = 60.0) -> list[dict]:
    """User TTFT per ``window_s`` of the replay (by send time): when a tail happened, e.g.
    a burst of profile jobs or one stall, which a run's p99 alone does not say."""
    by: dict[int, list[float]] = {}
    for r in results:
        if "ttft_s" in r and r.get("sent_s") is not None:
            by.setdefault(int(r["sent_s"] // window_s), []).append(r["ttft_s"])
    out = []
    for w in sorted(by):
        v = sorted(by[w])
        out.append({"from_s": w * window_s, "requests": len(v), "p50_s": statistics.median(v),
                    "p99_s": v[max(0, math.ceil(0.99 * len(v)) - 1)], "max_s": v[-1],
                    "over_200ms": sum(x > 0.2 for x in v)})
    return out


def compare(runs: dict[str, dict]) -> dict:
    """The TTFT p50 with the profiler over the one without (target: within 5%)."""
    on, off = (runs.get(spec, {}).get("ttft_p50_s") for spec in RUNS)
    ratio = on / off if on and off else None
    return {"ttft_p50_ratio": ratio, "ttft_within_5pct": None if ratio is None else abs(ratio - 1.0) <= 0.05}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    reqs = runner.workload_of(bench_args(args))
    bench = bench_args(args, pool_tokens(reqs, args.pool_share))
    model = None
    if not args.summarise:
        model, bench.dummy = runner.resolve_model(args.model)
    runs = {}
    for spec in RUNS:
        saved = args.out / f"{runner.slug(spec)}.json"
        samples_file = args.out / f"{runner.slug(spec)}.samples.json"
        if args.summarise and not saved.exists():
            continue
        if not (args.resume or args.summarise) or not saved.exists():
            try:
                with StatusSampler(f"http://127.0.0.1:{args.port}", args.sample_s) as samples:
                    runner.run_policy(spec, bench, model, [(reqs, args.out)],
                                      args.out / "logs" / f"{runner.slug(spec)}.log")
            except ServerError as e:
                print(f"[{spec}] {e}", file=sys.stderr)
                return 1
            samples_file.write_text(json.dumps(samples, indent=1))
        record = json.loads(saved.read_text())
        if len(record["results"]) != len(reqs):  # the saved run replayed another workload
            print(f"{saved} holds {len(record['results'])} requests, these arguments make {len(reqs)}: "
                  f"give the arguments of the run", file=sys.stderr)
            return 2
        runs[spec] = run_summary(record, reqs) | {
            "samples": json.loads(samples_file.read_text()) if samples_file.exists() else []}
    command = shlex.join([sys.executable, "bench/profiler_pressure.py", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "pool_tokens": bench.pool_tokens, "documents": args.docs, "requests": len(reqs),
               "runs": runs, **compare(runs)}
    if args.summarise:  # the runs' own command is the one that ran them, if a summary said it
        before = args.out / "summary.json"
        ran = json.loads(before.read_text()).get("command") if before.exists() else None
        summary |= {"command": ran, "summarised_by": command}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({spec: {k: v for k, v in r.items() if k not in ("samples", "final", "ttft_by_minute")}
                      for spec, r in runs.items()}
                     | compare(runs), indent=1))
    return 0
