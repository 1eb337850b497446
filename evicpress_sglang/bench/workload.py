"""Bench workloads: seeded streams of real-text requests, identical for every policy.

Every policy is served the same prompts at the same arrival times, so their TTFT and
answers can be compared request by request. Text is the Python standard library's
documentation (:mod:`evicpress_sglang.sample_text`), sliced into documents.

* ``docqa``: ``docs`` documents of ``min_chars``-``max_chars`` characters (about 4 per
  token), each with one planted fact ("The access code for document 7 is 48213."),
  asked questions over time with Zipf popularity; a share of the questions ask for the
  planted fact, which gives the answer a ground truth.
* ``chat``: sessions that start from a document and grow turn by turn; a turn's prompt is
  the whole history so far plus a new question. The assistant turns in the history are
  canned text (not the served model's answers) so the prompts do not depend on the policy.
* ``trace:FILE``: the user's own requests from a JSONL file (format and checks in
  :mod:`evicpress_sglang.bench.trace`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from ..sample_text import documents

QUESTIONS = (
    "In one sentence, what is the text above about?",
    "Name one function or class the text above describes.",
    "What is one thing the text above warns about?",
    "Summarize the first paragraph of the text above.",
    "Which Python module does the text above document?",
    "What does the text above say about exceptions?",
)
WORKLOADS = ("docqa", "chat")


@dataclass
class BenchRequest:
    id: int
    t: float  # arrival, seconds after the replay starts
    context: str  # the document or chat session/turn the prompt builds on
    prompt: str  # sent as text; "" where input_ids are sent instead
    truth: str | None = None  # what a correct answer contains (planted-fact questions)
    input_ids: list[int] | None = None  # token ids sent instead of text (traces that hold ids)
    max_new_tokens: int | None = None  # this request's output length (traces); None: the bench's

    def to_dict(self) -> dict:
        return asdict(self)

    def tokens_est(self) -> int:
        """Prompt length in tokens: exact for ids, ~4 characters a token for text (sizes the
        run's contexts in its metadata before any server has tokenized them)."""
        return len(self.input_ids) if self.input_ids is not None else len(self.prompt) // 4


def _corpus() -> str:
    return "\n\n".join(text for _, text in documents())


def _slice(rng: np.random.Generator, corpus: str, chars: int) -> str:
    start = int(rng.integers(0, max(1, len(corpus) - chars)))
    return (corpus + corpus)[start:start + chars]


def _plant(rng: np.random.Generator, text: str, fact: str) -> str:
    """Insert ``fact`` at a random paragraph boundary (not the first or last)."""
    cuts = [m.end() for m in re.finditer(r"\n\n", text)]
    at = cuts[int(rng.integers(len(cuts) // 4, max(len(cuts) // 4 + 1, 3 * len(cuts) // 4)))] if cuts else len(text) // 2
    return f"{text[:at]}{fact}\n\n{text[at:]}"


def _arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def doc_texts(rng: np.random.Generator, docs: int, min_chars: int, max_chars: int) -> tuple[list[str], list[int]]:
    """``docs`` documents of real text, each with a planted access code; (texts, codes)."""
    corpus = _corpus()
    texts, codes = [], []
    for d in range(docs):
        code = int(rng.integers(10000, 99999))
        body = _plant(rng, _slice(rng, corpus, int(rng.integers(min_chars, max_chars + 1))),
                      f"The access code for document {d} is {code}.")
        texts.append(f"Document {d} (from the Python library reference)\n\n{body}")
        codes.append(code)
    return texts, codes


def fact_question(d: int) -> str:
    return f"What is the access code for document {d}? Reply with the number only."


def docqa_prompt(text: str, question: str) -> str:
    return f"{text}\n\nQuestion: {question}\nAnswer:"


def docqa(n_requests: int = 120, docs: int = 30, rate: float = 2.0, min_chars: int = 8000, max_chars: int = 64000,
          zipf_s: float = 1.0, fact_share: float = 0.5, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    texts, codes = doc_texts(rng, docs, min_chars, max_chars)
    popularity = 1.0 / np.arange(1, docs + 1) ** zipf_s
    order = rng.permutation(docs)  # which document is most popular is random
    times = _arrivals(rng, n_requests, rate)
    out = []
    for i, t in enumerate(times):
        d = int(order[rng.choice(docs, p=popularity / popularity.sum())])
        if rng.random() < fact_share:
            q, truth = fact_question(d), str(codes[d])
        else:
            q, truth = QUESTIONS[int(rng.integers(len(QUESTIONS)))], None
        out.append(BenchRequest(i, round(float(t), 4), f"doc{d}", docqa_prompt(texts[d], q), truth))
    return out


def chat(n_requests: int = 120, sessions: int = 12, rate: float = 2.0, start_chars: int = 8000,
         turn_chars: int = 1200, think_s: float = 20.0, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    corpus = _corpus()
    starts = _arrivals(rng, sessions, rate / 4)
    history = [f"Conversation {s} about this text:\n\n{_slice(rng, corpus, start_chars)}" for s in range(sessions)]
    turns = np.zeros(sessions, dtype=int)
    clock = starts.copy()  # when each session's next turn arrives
    out: list[BenchRequest] = []
    while len(out) < n_requests:
        s = int(np.argmin(clock))
        q = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        out.append(BenchRequest(len(out), round(float(clock[s]), 4), f"chat{s}/{turns[s]}",
                                f"{history[s]}\n\nUser: {q}\nAssistant:"))
        history[s] += f"\n\nUser: {q}\nAssistant: {_slice(rng, corpus, turn_chars)}"
        turns[s] += 1
        clock[s] += rng.exponential(think_s)
    return out  # in arrival order: each step serves the session whose next turn comes first


def build(name: str, seed: int = 0, **kwargs) -> list[BenchRequest]:
    """The named workload; ``kwargs`` size it (see :func:`docqa` and :func:`chat`). A
    ``trace:FILE`` is read from FILE, which fixes its size: ``seed`` and ``kwargs`` are unused."""
    from . import trace  # it builds BenchRequests: imported here, not at the top

    if trace.is_trace(name):
        return trace.load(name[len(trace.PREFIX):])
    if name == "docqa":
        return docqa(seed=seed, **kwargs)
    if name == "chat":
        return chat(seed=seed, **kwargs)
    raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}, trace:FILE")
