"""The profiler loop: measure codecs on contexts with their held-out queries, report.

A job (made by the scheduler, :mod:`evicpress_sglang.backend.profiling`) names a context,
its tokens, its held-out queries and one cache namespace per variant (0 = exact KV, then
one per lossy codec). For each query the profiler takes the greedy answer on the exact
KV as the reference, then scores every codec's variant against it:

* ``top1`` (default): share of the reference answer's tokens that stay the top-1 choice
  when the answer is teacher-forced on the degraded KV, relative to the same on the exact
  KV. One prefill per query and codec, no generation; it is 1.0 exactly when greedy
  decoding on the degraded KV would reproduce the reference token for token, and falls
  smoothly below that, which is the agreement the bench measures.
* ``likelihood``: the reference answer's geometric-mean token likelihood on the degraded
  KV over that on the exact KV (capped at 1); same cost as ``top1``.
* ``f1``: token F1 of the degraded KV's greedy answer against the reference.
* ``similarity``: the paper's MiniLM cosine similarity of the two answers; a small BERT
  pass in this process per answer. Short answers about the same text score high even
  when they differ, which compresses the scale the quality floor is set on.

Pacing is the scheduler's: it hands out a job only while no user request waits and while
the GPU time the profiler's batches took stays within ``profile_share``
(:mod:`evicpress_sglang.backend.profile_budget`); the loop asks for the next job as soon as
one is done, and every ``poll_s`` seconds while there is none.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from statistics import fmean
from typing import TypeVar

from .client import ServerClient, ServerError
from .scores import teacher_forced, token_f1

log = logging.getLogger(__name__)

SCORES = ("top1", "likelihood", "f1", "similarity")
TEACHER_FORCED = {"top1", "likelihood"}
GENERATED = {"f1", "similarity"}
MAX_TOGETHER = 16  # requests of one variant in flight at once

T = TypeVar("T")
R = TypeVar("R")


class Profiler:
    def __init__(self, client: ServerClient, score: str = "top1", answer_tokens: int = 24, poll_s: float = 5.0) -> None:
        if score not in SCORES:
            raise ValueError(f"profile score {score!r}: valid: {', '.join(SCORES)}")
        self.client = client
        self.score = score
        self.answer_tokens = answer_tokens
        self.poll_s = poll_s
        self._similarity = None
        self._similarity_lock = threading.Lock()
        self.lock = threading.Lock()  # one job at a time (background loop and admin trigger)

    def measure(self, job: dict, queries: list[list[int]] | None = None, scores: tuple[str, ...] | None = None,
                details: list | None = None) -> dict[int, dict[str, float]]:
        """Mean of each score per lossy variant over ``queries`` (default: the job's
        held-out ones). Variants are run one after the other, so at most the reference
        and one degraded copy of the context are in the pool at a time; the queries of
        one variant are asked together (see :func:`ask_together`). ``details``, if given,
        receives one record per query and variant (answers and scores)."""
        scores = tuple(scores or (self.score,))
        unknown = set(scores) - set(SCORES)
        if unknown:
            raise ValueError(f"unknown score(s) {sorted(unknown)}; valid: {', '.join(SCORES)}")
        queries = job["queries"] if queries is None else queries
        prompts = [job["prefix"] + list(q) for q in queries]
        ns = job["namespaces"]
        refs = ask_together(lambda p: self.client.answer(p, ns[0], self.answer_tokens), prompts,
                            first_alone=bool(job.get("recompute")))
        teacher = bool(TEACHER_FORCED & set(scores))
        ref_tf = (ask_together(lambda pr: self._teacher_forced(pr[0], pr[1].ids, ns[0]), list(zip(prompts, refs)))
                  if teacher else None)
        out: dict[int, dict[str, float]] = {}
        for variant in range(1, len(ns)):
            one = ask_together(lambda i: self._score_one(prompts[i], refs[i], ref_tf[i] if teacher else None,
                                                         ns[variant], scores, details is not None),
                               list(range(len(prompts))))
            got: dict[str, list[float]] = defaultdict(list)
            for i, rec in enumerate(one):
                for s in SCORES:
                    if s in rec:
                        got[s].append(rec[s])
                if details is not None:
                    details.append({"variant": variant, "codec": job["codecs"][variant], "query": i, **rec})
            out[variant] = {s: fmean(got[s]) for s in scores if got[s]}
        return out

    def _score_one(self, prompt: list[int], ref, ref_tf: dict | None, namespace: str, scores: tuple[str, ...],
                   with_text: bool) -> dict:
        """One query's scores on one degraded variant (``ref_tf``: the reference's
        teacher-forced figures, when a teacher-forced score is asked for)."""
        one: dict = {}
        if ref_tf is not None:
            tf = self._teacher_forced(prompt, ref.ids, namespace)
            one["top1"] = _relative(tf["top1_agreement"], ref_tf["top1_agreement"])
            one["likelihood"] = _relative(tf["likelihood"], ref_tf["likelihood"])
        if GENERATED & set(scores):
            ans = self.client.answer(prompt, namespace, self.answer_tokens)
            one["f1"] = token_f1(ans.text, ref.text)
            if "similarity" in scores:
                one["similarity"] = self.similarity(ans.text, ref.text)
            if with_text:
                one |= {"answer": ans.text, "reference": ref.text}
        return one

    def _teacher_forced(self, prompt: list[int], reference: list[int], namespace: str) -> dict[str, float]:
        r = self.client.teacher_forced(prompt, reference, namespace)
        return teacher_forced(r.logprobs, r.top1, reference)

    def similarity(self, a: str, b: str) -> float:
        with self._similarity_lock:  # a variant's queries are scored in several threads: one model
            if self._similarity is None:
                from .scores import AnswerSimilarity

                self._similarity = AnswerSimilarity()
        return self._similarity(a, b)

    def write_questions(self, job: dict) -> list[list[int]]:
        """Queries for a context nobody has reused yet: the served model, on the context's
        exact KV, writes ``job["write_questions"]`` questions about it, each asked the way
        the document-QA prompts ask (``Question: ...`` / ``Answer:``)."""
        n = job["write_questions"]
        ask = self.client.tokenize(f"\n\nWrite {n} short questions about the text above, one per line.\n1.")
        text = self.client.answer(job["prefix"] + ask, job["namespaces"][0], 24 * n).text
        lines = [ln.strip().lstrip("0123456789.) ").strip() for ln in ("1." + text).splitlines()]
        questions = [ln for ln in lines if ln][:n]
        return [self.client.tokenize(f"\n\nQuestion: {q}\nAnswer:") for q in questions]

    def profile(self, job: dict) -> dict:
        """Measure the job with the configured score and report it; the server's reply
        (what it accepted) plus the scores. Self-written queries are reported as 0 held-out
        queries, so the first real reuse has the context profiled again."""
        with self.lock:
            queries = job["queries"] or (self.write_questions(job) if job.get("write_questions") else [])
            measured = self.measure(job, queries) if queries else {}
            quality = {v: s[self.score] for v, s in measured.items() if self.score in s}
            reply = self.client.report(job["job"], quality, len(job["queries"]))
        return {"job": job["job"], "node": job["node"],
                "scores": {job["codecs"][v]: s for v, s in measured.items()}, **reply}

    def profile_node(self, node: int) -> dict:
        """Profile one context now (the admin trigger). Raises :class:`ServerError` with
        the scheduler's reason when it cannot be profiled."""
        got = self.client.jobs(node=node)
        if not got.get("jobs"):
            reason = (got.get("refusal") or {}).get("reason", "no job was made")
            raise ServerError(f"context {node}: {reason}")
        return self.profile(got["jobs"][0])

    def step(self) -> bool:
        """Fetch and run at most one job; whether there was one."""
        got = self.client.jobs(want=1)
        if not got.get("jobs"):
            return False
        result = self.profile(got["jobs"][0])
        log.info("evicpress profiler: context %s: %s", result["node"], result.get("measured"))
        return True

    def run(self, stop: threading.Event) -> None:
        """Profile until ``stop`` is set: the next job as soon as one is done, else wait
        ``poll_s``; server errors are logged and waited out."""
        while not stop.is_set():
            try:
                wait = 0.0 if self.step() else self.poll_s
            except ServerError as e:
                log.warning("evicpress profiler: %s", e)
                wait = self.poll_s
            stop.wait(wait)


def ask_together(fn: Callable[[T], R], items: list[T], first_alone: bool = False) -> list[R]:
    """``fn`` over ``items``, all in flight at once, results in order.

    Requests on the same KV run as one batch in SGLang (one prefill of the questions after a
    shared prefix), so a job's GPU time, which the scheduler charges to ``profile_share``,
    shrinks with the number of queries. A staged copy is made by the first
    of them the scheduler matches and found by the rest; a recomputed reference is not, so
    its first request goes alone (``first_alone``), or every request would prefill the
    whole context.
    """
    if len(items) <= 1:
        return [fn(x) for x in items]
    head = [fn(items[0])] if first_alone else []
    rest = items[len(head):]
    with ThreadPoolExecutor(max_workers=min(MAX_TOGETHER, len(rest))) as pool:
        return [*head, *pool.map(fn, rest)]


def _relative(degraded: float, reference: float) -> float:
    """``degraded`` as a share of what the exact KV scores, capped at 1."""
    if reference <= 0:
        return 1.0 if degraded <= 0 else min(1.0, degraded)
    return min(1.0, degraded / reference)


def start_in_server(url: str, settings, api_key: str | None, admin_key: str | None) -> Profiler:
    """The profiler of a server's HTTP process; its background loop (a daemon thread that
    starts once the server answers) runs unless ``profile_share`` is 0. The admin trigger
    uses it either way."""
    profiler = Profiler(ServerClient(url, api_key, admin_key), settings.profile_score,
                        settings.profile_answer_tokens)
    if settings.profile_share <= 0:
        return profiler

    def loop() -> None:
        stop = threading.Event()
        while not profiler.client.healthy():
            stop.wait(2.0)
        profiler.run(stop)

    threading.Thread(target=loop, name="evicpress-profiler", daemon=True).start()
    return profiler
