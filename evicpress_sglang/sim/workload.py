"""Synthetic request traces for the simulator: who asks for which prefix, when.

A trace is JSON: ``{"model": {...}, "requests": [...]}``. Each request names the
context it reuses (``context``), that context's own token count (``tokens``), its
parent context if it extends one (``parent``: a chat turn extends the previous turn),
the arrival time ``t`` (seconds), the new tokens of the query (``query_tokens``) and,
the first time a context appears, optionally its measured quality per codec
(``quality``), as the profiler would provide.

Workloads:

* ``docqa``: long documents (2k-16k tokens) asked questions over time, with Zipf
  popularity and occasional bursts of questions about one document;
* ``chat``: multi-turn sessions whose histories grow turn by turn;
* ``mixed``: both, interleaved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: Quality loss per codec for a context of average sensitivity; contexts vary around it
#: (lognormal), which is the spread a joint policy exploits.
BASE_LOSS = {"bf16": 0.0, "fp8": 0.01, "int8": 0.005, "int4": 0.03, "int2": 0.12}


@dataclass
class ModelSpec:
    """The KV geometry of the served model (default: an 8B-class Llama, 128 KiB/token)."""

    layers: int = 32
    heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"


def _quality_table(rng: np.random.Generator) -> dict[str, float]:
    sensitivity = rng.lognormal(mean=0.0, sigma=0.8)
    return {c: round(float(np.clip(1.0 - loss * sensitivity, 0.0, 1.0)), 4) for c, loss in BASE_LOSS.items()}


def _docqa(rng, n_requests: int, n_docs: int, rate: float, zipf_s: float, t0: float = 0.0) -> list[dict]:
    lengths = rng.integers(2048, 16384, n_docs)
    weights = 1.0 / np.arange(1, n_docs + 1) ** zipf_s
    weights /= weights.sum()
    popularity = rng.permutation(n_docs)  # which document is most popular is random
    seen: set[int] = set()
    reqs, t, i = [], t0, 0
    while i < n_requests:
        t += rng.exponential(1.0 / rate)
        if rng.random() < 0.02:  # a burst: one document asked about many times, quickly
            doc = int(popularity[rng.integers(n_docs)])
            burst = int(rng.integers(5, 20))
        else:
            doc, burst = int(popularity[rng.choice(n_docs, p=weights)]), 1
        for _ in range(min(burst, n_requests - i)):
            r = {"t": round(t, 4), "context": f"doc{doc}", "tokens": int(lengths[doc]),
                 "query_tokens": int(rng.integers(16, 96))}
            if doc not in seen:
                r["quality"] = _quality_table(rng)
                seen.add(doc)
            reqs.append(r)
            i += 1
            t += rng.exponential(0.05)
    return reqs


def _chat(rng, n_requests: int, rate: float, t0: float = 0.0) -> list[dict]:
    reqs: list[dict] = []
    t = t0
    session = 0
    pending: list[tuple[float, int, int]] = []  # (next time, session, turn)
    while len(reqs) < n_requests:
        t += rng.exponential(1.0 / rate)
        pending.append((t, session, 0))
        session += 1
        pending.sort()
        while pending and pending[0][0] <= t and len(reqs) < n_requests:
            when, s, turn = pending.pop(0)
            r = {"t": round(when, 4), "context": f"chat{s}/{turn}", "tokens": int(rng.integers(200, 1500)),
                 "query_tokens": int(rng.integers(16, 128)), "quality": _quality_table(rng)}
            if turn:
                r["parent"] = f"chat{s}/{turn - 1}"
            reqs.append(r)
            if rng.random() < 0.85:  # the user comes back after a think time
                pending.append((when + rng.exponential(30.0), s, turn + 1))
                pending.sort()
    # A turn's context must exist before it is extended: serve in time order.
    return sorted(reqs, key=lambda r: r["t"])


def generate(workload: str, n_requests: int, seed: int = 0, n_docs: int = 200, rate: float = 4.0,
             zipf_s: float = 1.0, model: ModelSpec | None = None) -> dict:
    rng = np.random.default_rng(seed)
    if workload == "docqa":
        reqs = _docqa(rng, n_requests, n_docs, rate, zipf_s)
    elif workload == "chat":
        reqs = _chat(rng, n_requests, rate)
    elif workload == "mixed":
        reqs = sorted(_docqa(rng, n_requests // 2, n_docs, rate / 2, zipf_s) + _chat(rng, n_requests - n_requests // 2, rate / 2),
                      key=lambda r: r["t"])
    else:
        raise ValueError(f"unknown workload {workload!r}; valid: docqa, chat, mixed")
    return {"workload": workload, "seed": seed, "model": asdict(model or ModelSpec()), "requests": reqs}


def footprint_tokens(trace: dict) -> int:
    """Tokens of all distinct contexts: the KV the trace would keep if nothing were evicted."""
    return sum({r["context"]: r["tokens"] for r in trace["requests"]}.values())


def save(trace: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(trace))


def load(path: str | Path) -> dict:
    trace = json.loads(Path(path).read_text())
    if not isinstance(trace, dict) or "requests" not in trace:
        raise ValueError(f"{path}: not a trace (expected a JSON object with 'requests')")
    return trace
