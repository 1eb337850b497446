"""Scores of an answer given with degraded KV against the answer given with full KV.

None needs a reference answer from a person: the full-KV answer *is* the reference.

* :func:`token_f1`: SQuAD-style token overlap of the two answers' words; cheap, blind
  to paraphrase.
* :class:`AnswerSimilarity`: the paper's score, cosine similarity of all-MiniLM-L6-v2
  sentence embeddings (mean pooling, normalised), clamped to [0, 1]; sees paraphrase,
  costs a small BERT pass per answer.
* :func:`teacher_forced`: from one forward pass of the full-KV answer under the degraded
  KV (a logprob request), the geometric-mean likelihood of its tokens and the share of
  them that stay the top-1 choice; needs no generation, so it is the cheapest per query.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(a: str, b: str) -> float:
    """SQuAD-style token F1; two empty answers agree fully."""
    ta, tb = words(a), words(b)
    if not ta and not tb:
        return 1.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def teacher_forced(logprobs: Sequence[float], top1: Sequence[int], reference: Sequence[int]) -> dict[str, float]:
    """Scores in [0, 1] for the reference answer's tokens ``reference`` run under the degraded
    KV: ``logprobs`` of each of them, ``top1`` the token that KV would have chosen instead."""
    if not (len(logprobs) == len(top1) == len(reference)):
        raise ValueError(f"teacher-forced: {len(logprobs)} logprobs, {len(top1)} top-1 ids, {len(reference)} tokens")
    if not reference:
        return {"likelihood": 1.0, "top1_agreement": 1.0}
    return {
        "likelihood": math.exp(sum(logprobs) / len(logprobs)),
        "top1_agreement": sum(int(a == b) for a, b in zip(top1, reference)) / len(reference),
    }


class AnswerSimilarity:
    """all-MiniLM-L6-v2 cosine similarity between two answers (the paper's quality score)."""

    def __init__(self, model_dir: Path | None = None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        from ..model import prepare_minilm

        model_dir = model_dir or prepare_minilm()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length sentence embeddings: mean of the token states over the attention mask."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def __call__(self, answer: str, reference: str) -> float:
        if not answer.strip() and not reference.strip():
            return 1.0
        a, b = self.embed([answer, reference])
        return float(torch.clamp(a @ b, 0.0, 1.0))
