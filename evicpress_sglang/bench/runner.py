"""``python bench/run.py``: EVICPRESS vs stock SGLang on one workload, one server per policy.

For each policy in turn the same SGLang server (same model, KV pool, flags) is started,
the same workload is replayed, the server's counters are read, and it is stopped. Then
one ``bench.json`` with every figure, ``table.md`` and PNG plots are written.

Policies:

* ``reference``: stock SGLang with a KV pool large enough to never evict; its answers
  are what every other policy's answers are scored against;
* ``stock``: stock SGLang radix cache (evicts LRU and re-prefills);
* ``hicache``: SGLang HiCache, uncompressed offload to a host pool of the same size;
* ``lru``, ``lru-offload``, ``static:<codec>``, ``evicpress``, ``evicpress@alpha=X``:
  the evicpress backend with that policy (through ``evicpress-sglang serve``).

With ``--rates 1,2,4`` the whole bench runs at each arrival rate (``<out>/rate-R/``) and
``sweep.md`` gives requests/s at equal TTFT: per policy, the highest rate at which its TTFT
stays within a target (default: stock's TTFT at the lowest rate), interpolated between rates.

With ``--workload trace:FILE`` the requests are the user's own, from a JSONL file (format
in :mod:`evicpress_sglang.bench.trace`); the file is checked whole before any server starts.

With ``--one-server`` every policy runs on one evicpress server, switched through
``POST /evicpress/policy`` with ``/flush_cache`` between them: for quality studies of many
codecs, where a server start per policy would cost more than the workload. Only policies
the admin endpoint can set are allowed (``@alpha``/``@quality_floor`` overrides at most),
``reference`` is the ``lru`` policy there (a miss is re-prefilled: full KV, exact under
``--deterministic``), and each policy's counters are the difference across its replay.

Each policy's results are saved as soon as it finishes (``<out>/<policy>.json``), and a
re-run with ``--resume`` skips those: long benches can be split across GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import requests

from . import report, trace
from .replay import replay
from .server import Server, ServerError
from .workload import WORKLOADS, BenchRequest, build

SGLANG_FLAGS_DEFAULT = "--attention-backend triton --sampling-backend pytorch --grammar-backend none"


def kv_bytes_per_token(model_dir: Path) -> int:
    """bf16 K and V of every layer for one token, from the model's config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * 2 * 2


def parse_policy(spec: str) -> tuple[str, dict]:
    """``evicpress@alpha=0.5,quality_floor=0.95`` -> ("evicpress", {"alpha": 0.5, ...})."""
    name, _, opts = spec.partition("@")
    settings: dict = {}
    for kv in filter(None, opts.split(",")):
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"policy {spec!r}: expected key=value after '@', got {kv!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec)


def disk_dir_of(spec: str, args: argparse.Namespace) -> str:
    """The policy's own disk tier directory, so no policy restarts from another's blobs."""
    return os.path.join(args.disk_dir, slug(spec))


def server_for(spec: str, args: argparse.Namespace, model: Path) -> tuple[list[str], dict]:
    """The launch command and environment of one policy (all share model, pool and flags)."""
    from ..cli import serve_command

    base = ["--model-path", str(model), "--port", str(args.port), "--chunked-prefill-size", str(args.chunk),
            *shlex.split(args.sglang_flags), *args.sglang_args]
    if args.dummy:
        base += ["--load-format", "dummy"]
    if args.deterministic:
        base += ["--enable-deterministic-inference"]
    pool = ["--max-total-tokens", str(args.pool_tokens)]
    name, overrides = parse_policy(spec)
    env = dict(os.environ)
    env.pop("EVICPRESS_CONFIG", None)
    stock = [sys.executable, "-m", "sglang.launch_server"]
    if name == "reference":
        return stock + base, env
    if name == "stock":
        return stock + base + pool, env
    if name == "hicache":
        return stock + base + pool + ["--enable-hierarchical-cache", "--hicache-ratio", str(args.host_ratio)], env
    settings = {"policy": name, "host_bytes": int(args.host_ratio * args.pool_tokens * kv_bytes_per_token(model)),
                "status_top": 0}
    if args.disk_bytes:
        settings |= {"disk_dir": disk_dir_of(spec, args), "disk_bytes": args.disk_bytes}
    if args.prefill_s_per_token:
        settings["prefill_s_per_token"] = args.prefill_s_per_token
    if args.dummy:  # random weights answer noise: a quality profiler would measure noise
        settings["profile_share"] = 0
    env["EVICPRESS_CONFIG"] = json.dumps(settings | json.loads(args.settings) | overrides)
    return serve_command(base + pool, env)


def run_policy(spec: str, args: argparse.Namespace, model: Path, runs: list[tuple[list[BenchRequest], Path]],
               log: Path) -> None:
    """``spec`` on one server: each (workload, out dir) of ``runs`` replayed in turn, the cache
    flushed between them (a rate sweep starts one server per policy, not one per rate: with
    CUDA graphs a server start costs more than a run), each saved as it finishes. What the
    server learnt about itself (evicpress's measured prefill speed) carries over from one run
    to the next, as in production; a resumed sweep starts it afresh. A run is not saved, and
    the policy stops, when its server exited during it or the evicpress backend degraded to
    stock behaviour (a flush would re-apply that, and later runs would be stock SGLang under
    this policy's name): under ``--resume`` it runs again."""
    cmd, env = server_for(spec, args, model)
    print(f"[{spec}] starting: {' '.join(cmd)}", file=sys.stderr)
    # An empty disk tier before and after: the cache re-attaches blobs it finds at start-up,
    # and a run cut off earlier must not hand its blobs to this one.
    shutil.rmtree(disk_dir_of(spec, args), ignore_errors=True)
    server = Server(cmd, env, log, args.port, timeout=args.server_timeout)
    with server as url:
        for i, (reqs, out) in enumerate(runs):
            if i:
                try:
                    _flush(url)
                except requests.RequestException as e:
                    raise ServerError(f"the server stopped answering: {e}\n{server.log_tail()}") from None
            before = _status(url)
            results, wall = _replay_warm(url, reqs, args)
            after = _status(url)
            if server.proc.poll() is not None:
                raise ServerError(f"the server exited (code {server.proc.returncode}) during the run saved in "
                                  f"{out}\n{server.log_tail()}")
            degraded = ((after or {}).get("health") or {}).get("degraded")
            if degraded:
                raise ServerError(f"the evicpress backend degraded to stock behaviour during the run for {out}: "
                                  f"{degraded}")
            _save(out, spec, cmd, env, server, results, wall, stats_during(after, before))
    shutil.rmtree(disk_dir_of(spec, args), ignore_errors=True)


def _replay_warm(url: str, reqs: list[BenchRequest], args: argparse.Namespace) -> tuple[list[dict], float]:
    """(results, wall seconds) of the workload, after one warm-up request (first-request
    compilation stays out of the figures)."""
    replay(url, [BenchRequest(-1, 0.0, "warmup", "Say hello.")], 2, progress=False)
    t0 = time.perf_counter()
    results = replay(url, reqs, args.max_new_tokens, progress=not args.quiet)
    return results, time.perf_counter() - t0


def _save(out: Path, spec: str, cmd: list[str], env: dict, server: Server, results: list[dict], wall: float,
          status: dict | None, **extra) -> dict:
    """One policy's record, written to ``<out>/<policy>.json`` as soon as it is done."""
    record = {"policy": spec, **extra, "server_command": " ".join(cmd), "evicpress_config": env.get("EVICPRESS_CONFIG"),
              "wall_s": wall, "status": status, "results": results, "log_tail": server.log_tail(3000)}
    (out / f"{slug(spec)}.json").write_text(json.dumps(record))
    return record


#: What ``POST /evicpress/policy`` may change besides the policy (``--one-server``).
RUNTIME_OVERRIDES = ("alpha", "quality_floor")


def runtime_policy(spec: str, settings: dict | None = None) -> dict:
    """The ``POST /evicpress/policy`` body that turns a running server into ``spec``, weights
    included (a policy switch keeps the last weights set: ``evicpress`` after
    ``evicpress@alpha=0.5`` must say alpha is the default again); ``settings``: the run's
    ``--settings``, whose weights are the defaults. ValueError for what only a server start can
    set (stock, HiCache, other settings)."""
    from ..policy import Weights

    name, overrides = parse_policy(spec)
    if name == "reference":
        name = "lru"  # every miss re-prefilled: the full KV's answers
    elif name in ("stock", "hicache"):
        raise ValueError(f"{spec!r} is another server, not a policy of the evicpress one (--one-server)")
    extra = sorted(set(overrides) - set(RUNTIME_OVERRIDES))
    if extra:
        raise ValueError(f"{spec!r}: {extra} cannot change at runtime (--one-server allows "
                         f"{', '.join(RUNTIME_OVERRIDES)})")
    base = Weights()
    weights = {k: (settings or {}).get(k, getattr(base, k)) for k in RUNTIME_OVERRIDES}
    return {"policy": name, **weights, **overrides}


def counters_delta(after, before):
    """``after - before`` for every number in nested counters (lists element by element);
    what is not a number (strings, None, mismatched shapes) is ``after``'s."""
    if isinstance(after, dict) and isinstance(before, dict):
        return {k: counters_delta(v, before.get(k)) for k, v in after.items()}
    if isinstance(after, list) and isinstance(before, list) and len(after) == len(before):
        return [counters_delta(a, b) for a, b in zip(after, before)]
    number = (int, float)
    if isinstance(after, number) and isinstance(before, number) and not isinstance(after, bool):
        return after - before
    return after


def stats_during(after: dict | None, before: dict | None) -> dict | None:
    """A status whose ``stats`` cover only what happened between two statuses: counters
    subtracted, the compression ratio recomputed from them; the eviction-time percentiles
    and lock waits (windows of recent evictions, not counters) are ``after``'s."""
    if after is None or before is None or "stats" not in after or "stats" not in before:
        return after
    stats = counters_delta(after["stats"], before["stats"])
    for window in ("evict_ms", "evict_wait_ms"):
        if window in after["stats"]:
            stats[window] = after["stats"][window]
    stored = stats.get("stored_bytes")
    stats["compression_ratio"] = stats.get("raw_bytes_stored", 0) / stored if stored else 1.0
    return after | {"stats": stats}


def _status(url: str) -> dict | None:
    try:
        r = requests.get(url + "/evicpress/status", timeout=10)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def _flush(url: str, timeout: float = 60) -> None:
    """``/flush_cache`` once the server is idle (SGLang refuses it while requests run)."""
    stop = time.monotonic() + timeout
    while True:
        r = requests.post(url + "/flush_cache", timeout=30)
        if r.status_code == 200:
            return
        if time.monotonic() > stop:
            raise ServerError(f"/flush_cache refused for {timeout:.0f} s: {r.status_code} {r.text[:200]}")
        time.sleep(1)


def run_one_server(specs: list[str], args: argparse.Namespace, model: Path, reqs: list[BenchRequest],
                   out: Path) -> None:
    """Every spec on one evicpress server (see the module doc), each saved as it finishes."""
    todo = [s for s in specs if not (args.resume and (out / f"{slug(s)}.json").exists())]
    if not todo:
        return
    cmd, env = server_for("lru", args, model)
    log = out / "logs" / "one-server.log"
    print(f"[one server] starting: {' '.join(cmd)}", file=sys.stderr)
    shutil.rmtree(disk_dir_of("lru", args), ignore_errors=True)
    server = Server(cmd, env, log, args.port, timeout=args.server_timeout)
    with server as url:
        for spec in todo:
            body = runtime_policy(spec, json.loads(args.settings))
            try:
                r = requests.post(url + "/evicpress/policy", json=body, timeout=60)
                if r.status_code != 200:
                    raise ServerError(f"[{spec}] POST /evicpress/policy {body}: {r.status_code} {r.text[:300]}")
                _flush(url)
            except requests.RequestException as e:  # the server died: one line and rc 1, not a traceback
                raise ServerError(f"[{spec}] the server stopped answering: {e}\n{server.log_tail()}") from None
            before = _status(url)
            results, wall = _replay_warm(url, reqs, args)
            _save(out, spec, cmd, env, server, results, wall, stats_during(_status(url), before), policy_applied=body)
            print(f"[{spec}] done in {wall:.0f} s", file=sys.stderr)
    shutil.rmtree(disk_dir_of("lru", args), ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="HF model dir, 'smollm2' (bundled, real weights) or 'dummy-8b' (8B-class config, random weights)")
    p.add_argument("--workload", default="docqa", type=_workload,
                   help=f"{', '.join(WORKLOADS)} (seeded) or trace:FILE (your own requests, JSONL; "
                   "see evicpress_sglang/bench/trace.py); default: %(default)s")
    p.add_argument("--policies", default="reference,stock,hicache,static:int4,evicpress",
                   help="comma-separated (see module doc); default: %(default)s")
    p.add_argument("--out", default="bench/results/latest")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--docs", type=int, default=30, help="documents (docqa) or sessions (chat)")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--rates", type=_rates, help="comma-separated rates: the whole bench at each (<out>/rate-R/), "
                   "then requests/s at equal TTFT (<out>/sweep.md)")
    p.add_argument("--ttft-target-ms", type=float, help="the sweep's TTFT target; default: stock's at the lowest rate")
    p.add_argument("--sweep-metric", default="mean", choices=("mean", "p50", "p90", "p99"),
                   help="which TTFT the sweep holds to the target")
    p.add_argument("--min-chars", type=int, default=8000, help="shortest document, characters (~4 per token)")
    p.add_argument("--max-chars", type=int, default=64000, help="longest document, characters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--pool-tokens", type=int, default=48000, help="GPU KV pool (--max-total-tokens)")
    p.add_argument("--host-ratio", type=float, default=2.0, help="host tier = this x the GPU pool (HiCache and evicpress)")
    p.add_argument("--disk-bytes", type=int, default=0, help="evicpress disk tier (0: none)")
    p.add_argument("--disk-dir", default="/tmp/evicpress-bench-disk")
    p.add_argument("--settings", default="{}", help="EVICPRESS settings JSON for every evicpress-backend policy")
    p.add_argument("--prefill-s-per-token", type=float, help="pin evicpress's re-prefill cost (small-model studies)")
    p.add_argument("--quality-floor", type=float, default=0.9, help="per-request agreement counted as a violation below")
    p.add_argument("--deterministic", action="store_true", help="SGLang --enable-deterministic-inference (quality runs)")
    p.add_argument("--chunk", type=int, default=8192, help="--chunked-prefill-size")
    p.add_argument("--port", type=int, default=30200)
    p.add_argument("--sglang-flags", default=SGLANG_FLAGS_DEFAULT, help="flags every server gets; default: %(default)s")
    p.add_argument("--server-timeout", type=float, default=600)
    p.add_argument("--one-server", action="store_true",
                   help="every policy on one evicpress server, switched at runtime (quality studies)")
    p.add_argument("--resume", action="store_true", help="reuse <out>/<policy>.json of policies already run")
    p.add_argument("--report-only", action="store_true", help="only rebuild bench.json, table and plots from <out>")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("sglang_args", nargs="*", help="after --: more flags for every server")
    return p


def _workload(text: str) -> str:
    """The name checked here; a trace's file is read and checked once, in :func:`_main`."""
    if text in WORKLOADS or (trace.is_trace(text) and text[len(trace.PREFIX):]):
        return text
    raise argparse.ArgumentTypeError(f"expected {', '.join(WORKLOADS)} or trace:FILE, got {text!r}")


def _rates(text: str) -> list[float]:
    rates = sorted({float(r) for r in text.split(",") if r.strip()})
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("expected positive numbers, e.g. 1,2,4")
    return rates


def resolve_model(name: str) -> tuple[Path, bool]:
    from ..model import prepare_dummy_8b, prepare_model

    if name == "smollm2":
        return prepare_model(), False
    if name == "dummy-8b":
        return prepare_dummy_8b(), True
    return Path(name), False


def workload_of(args: argparse.Namespace) -> list[BenchRequest]:
    if trace.is_trace(args.workload):  # a trace sizes itself: --requests, --rate, --docs... do not apply
        return build(args.workload)
    if args.workload == "docqa":
        return build("docqa", seed=args.seed, n_requests=args.requests, docs=args.docs, rate=args.rate,
                     min_chars=args.min_chars, max_chars=args.max_chars)
    return build("chat", seed=args.seed, n_requests=args.requests, sessions=args.docs, rate=args.rate,
                 start_chars=args.min_chars)


def write_report(out: Path, specs: list[str], reqs: list[BenchRequest], args: argparse.Namespace, meta: dict) -> dict:
    records = {s: json.loads((out / f"{slug(s)}.json").read_text()) for s in specs if (out / f"{slug(s)}.json").exists()}
    reference = None
    if "reference" in records:
        reference = {r["id"]: r["text"] for r in records["reference"]["results"] if "error" not in r}
    summaries = [report.summarize(s, rec["results"], reqs, rec["wall_s"], rec["status"], reference, args.quality_floor)
                 for s, rec in records.items()]
    for s, rec in zip(summaries, records.values()):
        s["server_command"] = rec["server_command"]
        s["evicpress_config"] = rec["evicpress_config"]
    doc = meta | {"summaries": summaries}
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    md = report.table(summaries)
    (out / "table.md").write_text(md + "\n")
    try:
        report.plots(summaries, out, f"{meta['workload']}, {meta['model_label']}")
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'evicpress-sglang[bench]')", file=sys.stderr)
    print(md)
    return doc


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through Server.__exit__: no server left behind


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    specs = [s.strip() for s in args.policies.split(",") if s.strip()]
    try:  # malformed specs or settings fail before any server starts, with one clear line
        for s in specs:
            runtime_policy(s) if args.one_server else parse_policy(s)
        if not isinstance(json.loads(args.settings), dict):
            raise ValueError("expected a JSON object")
    except (ValueError, json.JSONDecodeError) as e:
        parser.error(f"--policies/--settings: {e}")
    reqs = None
    if trace.is_trace(args.workload):
        if args.rates:
            parser.error("--rates: a trace replays its own arrival times; run it without --rates")
        if not args.report_only:  # a bad line stops the bench here, before any server or output
            try:
                reqs = workload_of(args)
            except trace.TraceError as e:
                parser.error(f"--workload {args.workload}:\n{e}")
    argv = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python bench/run.py", *map(shlex.quote, argv)])
    if not args.rates:
        return _run(args, specs, Path(args.out), command, reqs)
    return _sweep(args, specs, Path(args.out), command)


def _run(args: argparse.Namespace, specs: list[str], out: Path, command: str,
         reqs: list[BenchRequest] | None = None) -> int:
    """Every policy on the workload at ``args.rate``, into ``out``; then the report.
    ``reqs``: the workload if already built (a trace, read and checked once); else built here."""
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        model, args.dummy = resolve_model(args.model)
        reqs = _prepare(args, specs, out, command, model, reqs)
        if rc := _run_policies(args, specs, model, [(reqs, out)], out / "logs"):
            return rc
    _report(args, specs, out)
    return 0


def _prepare(args: argparse.Namespace, specs: list[str], out: Path, command: str, model: Path,
             reqs: list[BenchRequest] | None = None) -> list[BenchRequest]:
    """The workload at ``args.rate`` (``reqs`` if already built), recorded in ``out/workload.json``
    (kept under ``--resume``: the report scores what was run). A new workload removes the
    records ``specs`` left in ``out`` from an earlier one, so that a run that stops part way
    never reports them as its own."""
    out.mkdir(parents=True, exist_ok=True)
    reqs = reqs if reqs is not None else workload_of(args)
    meta = {"command": command, "workload": args.workload, "model": str(model),
            "model_label": "8B-class config, dummy weights" if args.dummy else f"{model.name} (real weights)",
            "kv_bytes_per_token": kv_bytes_per_token(model), "pool_tokens": args.pool_tokens,
            "host_ratio": args.host_ratio, "disk_bytes": args.disk_bytes, "requests": len(reqs),
            "rate": _trace_rate(reqs) if trace.is_trace(args.workload) else args.rate,
            "contexts": len({r.context for r in reqs}),
            "context_tokens_est": sum(r.tokens_est() for r in {r.context: r for r in reqs}.values()),
            "python": platform.python_version(), "sglang": _version("sglang"), "gpu": _gpu()}
    runs = [{"id": r.id, "t": r.t, "context": r.context, "truth": r.truth, "max_new_tokens": r.max_new_tokens}
            for r in reqs]
    saved = out / "workload.json"
    if not (args.resume and saved.exists()):
        saved.write_text(json.dumps(meta | {"requests_run": runs}))
        for spec in specs:  # this run's policies' earlier records would be scored against the new workload
            (out / f"{slug(spec)}.json").unlink(missing_ok=True)
    return reqs


def _run_policies(args: argparse.Namespace, specs: list[str], model: Path,
                  runs: list[tuple[list[BenchRequest], Path]], logs: Path) -> int:
    """Every policy on every (workload, out dir) of ``runs``: one server per policy (or, with
    ``--one-server``, one per run), runs already saved skipped under ``--resume``. 1 on a
    server that failed (one line), else 0."""
    if args.one_server:
        for reqs, out in runs:
            try:
                run_one_server(specs, args, model, reqs, out)
            except ServerError as e:
                print(f"[one server] {e}", file=sys.stderr)
                return 1
        return 0
    for spec in specs:
        todo = [(reqs, out) for reqs, out in runs if not (args.resume and (out / f"{slug(spec)}.json").exists())]
        if not todo:
            print(f"[{spec}] already run, skipped (--resume)", file=sys.stderr)
            continue
        try:
            run_policy(spec, args, model, todo, logs / f"{slug(spec)}.log")
        except ServerError as e:
            print(f"[{spec}] {e}", file=sys.stderr)
            return 1
    return 0


def _report(args: argparse.Namespace, specs: list[str], out: Path) -> None:
    """The report of ``out``, from the workload as it was run (the text differs between Python
    versions, so the requests are read back from ``workload.json``, not rebuilt)."""
    meta = json.loads((out / "workload.json").read_text())
    reqs = [BenchRequest(**r, prompt="") for r in meta.pop("requests_run")]
    write_report(out, specs, reqs, args, meta)


def _sweep(args: argparse.Namespace, specs: list[str], out: Path, command: str) -> int:
    """The workload at every rate of ``--rates`` (``out/rate-R/``, each a full bench, all rates
    of a policy on one server), then requests/s at equal TTFT: the highest rate each policy
    sustains within one TTFT target (default: the baseline's TTFT at the lowest rate)."""
    outs = {rate: out / f"rate-{rate:g}" for rate in args.rates}
    rc = 0
    if not args.report_only:
        model, args.dummy = resolve_model(args.model)
        runs = []
        for rate, rate_out in outs.items():
            args.rate = rate
            runs.append((_prepare(args, specs, rate_out, command, model), rate_out))
        rc = _run_policies(args, specs, model, runs, out / "logs")
    by_rate = {}
    for rate, rate_out in outs.items():  # what did run is reported even when a server failed
        args.rate = rate
        _report(args, specs, rate_out)
        by_rate[rate] = json.loads((rate_out / "bench.json").read_text())["summaries"]
    if rc:
        return rc
    target = args.ttft_target_ms / 1000 if args.ttft_target_ms else None
    if target is None:
        base = [s for s in by_rate[min(args.rates)] if s["policy"] == "stock" and not s["errors"]]
        if not base:
            print("no --ttft-target-ms and no complete stock run at the lowest rate: no sweep table", file=sys.stderr)
            return 1
        target = base[0]["ttft_s"][args.sweep_metric]
    md, curves = report.sweep_table(by_rate, target, args.sweep_metric)
    (out / "sweep.json").write_text(json.dumps({"command": command, "metric": args.sweep_metric, "ttft_target_s": target,
                                                "rates": sorted(by_rate), "policies": curves}, indent=1))
    (out / "sweep.md").write_text(md + "\n")
    print(md)
    return 0


def _trace_rate(reqs: list[BenchRequest]) -> float | None:
    """A trace's mean arrival rate (requests/s over its span), recorded where a seeded
    workload records the --rate it was built for; None for a trace without a span."""
    span = reqs[-1].t - reqs[0].t
    return (len(reqs) - 1) / span if span > 0 else None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
