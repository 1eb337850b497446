"""Selector-quality harness for issue 24: answer agreement after token dropping, without a server.

What it measures: for each docqa document, the shared document prefix (the tokens of
``text + "\\n\\nQuestion:"``, what SGLang's radix tree stores once for every question on that
document) is prefilled once with Hugging Face transformers (SmolLM2-135M real weights; CPU and
float32 by default, ``--device cuda --dtype bfloat16`` on the GPU machine). Its post-RoPE keys and
values become a :class:`ContextKV` of shape [layers, tokens, kv_heads, head_dim]; a selector (ours
from ``drop.py``, a variant or an oracle defined here) picks the token indices to keep, one choice
shared by all layers and heads as in SGLang's pool (``agg=perhead`` variants: one per layer and KV
head, each the same number of entries); the cache is cut to those entries in every layer; the
question suffix is prefilled with positions that continue the ORIGINAL prefix length (kept keys
keep their rotations), attending to every kept entry, and 16 tokens are decoded greedily. The answer is scored against the full-KV answer (same procedure, nothing dropped): mean
token F1 (``profiler.scores.token_f1``), share of identical answers, and fact accuracy (the planted
5-digit code is a substring of the answer).

How it differs from the GPU bench (``bench/run.py`` on SGLang): no server, no radix tree, no
eviction timing or memory pressure: every document prefix is dropped, exactly once, with the
full question suffix kept (the bench drops only the nodes evicted under pressure, and ~45% of
prompt tokens were reused there); HF attention instead of SGLang's deterministic kernels;
duplicate prompts are served once. Absolute F1 is therefore lower than the bench's; rankings and
deltas between selectors are what it is for.

Variant selectors (``v:<base>,key=value,...``, see :class:`VariantSelector`) are defined here
so that drop.py stays untouched while selector designs are compared. Their base may also be an
*oracle* that runs the model, which no selector at eviction time can (:data:`ORACLES`):
``repeat`` is KVzip itself (the attention a teacher-forced repeat of the context pays each token:
what ``drop.py``'s ``kvzip`` approximates from the keys alone), ``question`` and ``answer`` score
each question's own attention (a query-aware ceiling for a selection shared by every head).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from evicpress_sglang.bench.workload import docqa
from evicpress_sglang.codecs import drop, queries
from evicpress_sglang.codecs.drop import ContextKV, ScoredSelector, TokenSelector, parse_selector
from evicpress_sglang.model import prepare_model
from evicpress_sglang.profiler.scores import token_f1

QUESTION_MARK = "\n\nQuestion:"


# ----------------------------------------------------------------------------------------------
# variant selectors


#: Bases that run the model (see the module docstring); ``question`` and ``answer`` select per question.
ORACLES = ("repeat", "question", "answer")
PER_QUESTION = ("question", "answer")
REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


@dataclass
class HarnessKV(ContextKV):
    """A :class:`ContextKV` that can also ask the model for an oracle's attention scores."""

    oracle: Callable[[str], torch.Tensor] | None = None  # base -> [layers, tokens, kv_heads]


def raw_scores(base: str, kv: ContextKV) -> torch.Tensor:
    """[layers, tokens, heads] per-(layer, head) scores of selector ``base`` (higher = keep),
    before drop.py's standardised aggregation: the selector's own ``score`` is run with
    ``drop._standardised`` swapped for the identity (so the scoring code is drop.py's own).
    An oracle's score is the log of the most attention any of its queries pays the token."""
    if base in ORACLES:
        return kv.oracle(base).clamp_min(1e-12).log()
    selector = drop.SELECTORS[base](0.5)
    saved = drop._standardised
    drop._standardised = lambda s, head_max=False: s.float()
    try:
        return selector.score(kv)
    finally:
        drop._standardised = saved


def aggregate(score: torch.Tensor, how: str, skip_layers: int) -> torch.Tensor:
    """[layers, tokens, heads] -> [tokens]. ``std``: z-score per (layer, head), mean (drop.py's
    rule); ``maxhead``: z-score, max over heads, mean over layers; ``rank``: rank / tokens per
    (layer, head), mean; ``rankmax``: ranks, max over heads, mean over layers. (``perhead``
    does not aggregate: :meth:`VariantSelector.select` ranks each (layer, head) alone.)"""
    score = score[skip_layers:].float()
    if how in ("std", "maxhead"):
        return drop._standardised(score, head_max=how == "maxhead")
    z = score.argsort(dim=1).argsort(dim=1).float() / max(score.shape[1] - 1, 1)
    if how == "rankmax":
        return z.amax(dim=2).mean(dim=0)
    if how == "rank":
        return z.mean(dim=(0, 2))
    raise ValueError(f"unknown aggregation {how!r}")


def pool1d(score: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """Stride-1 1-D ``max`` or ``avg`` pooling of a [tokens] score (SnapKV-style), same length."""
    x = score[None, None]
    pad = kernel // 2
    if kind == "max":
        return torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=pad)[0, 0, : score.numel()]
    if kind == "avg":
        x = torch.nn.functional.pad(x, (pad, pad), mode="replicate")
        return torch.nn.functional.avg_pool1d(x, kernel, stride=1)[0, 0, : score.numel()]
    raise ValueError(f"unknown pooling {kind!r}")


def chunked(score: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """Each token scored by its chunk's (``size`` tokens) mean or max score, plus a tiny share
    of its own score so that a partly kept chunk keeps its best tokens."""
    tokens = score.numel()
    pad = (-tokens) % size
    x = torch.nn.functional.pad(score, (0, pad), value=float("nan")).view(-1, size)
    chunk = torch.nanmean(x, dim=1) if kind == "mean" else x.nan_to_num(-math.inf).amax(dim=1)
    per_token = chunk.repeat_interleave(size)[:tokens]
    spread = (score.max() - score.min()).clamp_min(1e-6)
    return per_token + 1e-3 * (score - score.min()) / spread


@dataclass
class VariantSpec:
    """One variant. ``pool``: ``max7`` / ``avg5`` (after aggregation) or ``pre-max7`` (per layer
    and head, before it, as SnapKV does); ``sinks``: first tokens always kept; ``agg`` and
    ``skip``: see :func:`aggregate`; ``chunk``: ``mean16`` / ``max8``; ``recent``: the kept last
    tokens (drop.py's RECENT, 32); ``mix``: ``base2:weight`` blends a second selector's
    aggregated score, ``base2:max`` takes the larger of the two (a token either one ranks high is kept)."""

    base: str = "keydiff"
    pool: str = ""
    sinks: int = 0
    agg: str = "std"
    skip: int = 0
    chunk: str = ""
    recent: int = 32
    mix: str = ""

    @classmethod
    def parse(cls, text: str) -> "VariantSpec":
        base, *opts = text.split(",")
        spec = cls(base=base)
        for opt in opts:
            key, _, value = opt.partition("=")
            current = getattr(spec, key)
            setattr(spec, key, type(current)(value))
        return spec


def _z(score: torch.Tensor) -> torch.Tensor:
    """Each (layer, head) series of a [layers, tokens, heads] score standardised over the tokens."""
    std, mean = torch.std_mean(score, dim=1, keepdim=True)
    return (score - mean) / std.clamp_min(1e-6)


def _blend(first: torch.Tensor, second: torch.Tensor, weight: str) -> torch.Tensor:
    """``mix``'s rule: ``first + weight * second``, or their maximum for ``weight`` "max"."""
    return torch.maximum(first, second) if weight == "max" else first + float(weight) * second


def _kind_size(text: str) -> tuple[str, int]:
    kind = text.rstrip("0123456789")
    return kind, int(text[len(kind):])


class VariantSelector(ScoredSelector):
    """A scored selector built from a :class:`VariantSpec` (see there)."""

    def __init__(self, ratio: float, spec: VariantSpec, name: str) -> None:
        self.name = name
        super().__init__(ratio)
        self.spec = spec
        self.RECENT = spec.recent

    def score(self, kv: ContextKV) -> torch.Tensor:
        spec = self.spec
        raw = raw_scores(spec.base, kv)
        pre = spec.pool.startswith("pre-")
        if pre:
            kind, size = _kind_size(spec.pool[4:])
            # pool each (layer, head) series along tokens, after standardising it
            flat = _z(raw).permute(0, 2, 1).reshape(-1, 1, raw.shape[1])
            pad = size // 2
            if kind == "max":
                flat = torch.nn.functional.max_pool1d(flat, size, stride=1, padding=pad)
            else:
                flat = torch.nn.functional.avg_pool1d(
                    torch.nn.functional.pad(flat, (pad, pad), mode="replicate"), size, stride=1)
            raw = flat[..., : raw.shape[1]].reshape(raw.shape[0], raw.shape[2], -1).permute(0, 2, 1)
        score = aggregate(raw, spec.agg, spec.skip)
        if spec.mix:
            other, _, weight = spec.mix.partition(":")
            score = _blend(score, aggregate(raw_scores(other, kv), spec.agg, spec.skip), weight)
        if spec.pool and not pre:
            score = pool1d(score, *_kind_size(spec.pool))
        if spec.chunk:
            score = chunked(score, *_kind_size(spec.chunk))
        return score.contiguous()

    def select(self, kv: ContextKV) -> torch.Tensor:
        """Ascending kept indices: [kept] shared by every layer and head, or with ``agg=perhead``
        [layers, kept, heads], each (layer, KV head) choosing its own tokens (each standardised
        score series ranked alone, the ``mix`` blended in per (layer, head) too)."""
        if self.spec.agg != "perhead":
            return super().select(kv)
        if self.spec.pool or self.spec.chunk or self.spec.skip:
            raise SystemExit(f"{self.name}: agg=perhead takes no pool, chunk or skip")
        tokens, keep = kv.shape.tokens, self.kept(kv.shape.tokens)
        raw = raw_scores(self.spec.base, kv).float()
        if self.spec.mix:
            other, _, weight = self.spec.mix.partition(":")
            raw = _blend(_z(raw), _z(raw_scores(other, kv).float()), weight)
        score = raw.nan_to_num(nan=-torch.inf).transpose(1, 2)  # [layers, heads, tokens]
        if keep < tokens:
            self.pin(score, keep)
        return torch.topk(score, keep, dim=-1).indices.sort(dim=-1).values.transpose(1, 2)

    def pin(self, score: torch.Tensor, keep: int) -> None:
        super().pin(score, keep)
        sinks = min(self.spec.sinks, keep - min(self.RECENT, keep // 2))  # what the recent window left
        if sinks:
            score[..., :sinks] = torch.inf


def make_selector(text: str, ratio: float) -> TokenSelector:
    """``keydiff`` (drop.py's), ``v:keydiff,pool=max7,sinks=4`` (a :class:`VariantSelector`) or
    an oracle's name (``repeat``: a variant of it with the defaults)."""
    if text.startswith("v:") or text in ORACLES:
        return VariantSelector(ratio, VariantSpec.parse(text.removeprefix("v:")), text)
    selector = parse_selector(f"{text}:{ratio}")
    if selector is None:
        raise SystemExit(f"unknown selector {text!r}")
    return selector


# ----------------------------------------------------------------------------------------------
# the model side


@dataclass
class Doc:
    name: str
    prefix: list[int]
    questions: list[tuple[str, list[int], str | None]] = field(default_factory=list)  # (prompt, suffix ids, truth)
    code_tokens: list[int] = field(default_factory=list)  # prefix indices of the planted code's tokens
    fact_tokens: list[int] = field(default_factory=list)  # ... of the whole planted sentence
    k: torch.Tensor | None = None  # [layers, tokens, heads, d]
    v: torch.Tensor | None = None
    repeat: torch.Tensor | None = None  # the ``repeat`` oracle's scores, once computed
    _question_kv: dict = field(default_factory=dict)
    _served_kv: dict = field(default_factory=dict)

    def served_kv(self, runner: "Runner", qi: int, ref_ids: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the document, question ``qi`` and its full-KV answer in one context: the
        radix node SGLang keeps after serving that prompt once (it caches the output too, but for
        its last token when the answer ran to the length limit), which an eviction then drops as a
        whole."""
        if qi not in self._served_kv:
            self._served_kv[qi] = runner.prefill(self.prefix + self.questions[qi][1] + ref_ids[(self.name, qi)])
        return self._served_kv[qi]

    def question_kv(self, runner: "Runner", qi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of question ``qi``'s suffix but its last token, computed over the whole
        prefix (what a radix node below the document holds after the prompt was served once)."""
        if qi not in self._question_kv:
            suffix = self.questions[qi][1]
            k, v = runner.prefill(self.prefix + suffix[:-1])
            self._question_kv[qi] = (k[:, len(self.prefix):], v[:, len(self.prefix):])
        return self._question_kv[qi]


class Runner:
    #: Query tokens per forward when an oracle's attention is read (bounds the attention maps kept).
    ORACLE_CHUNK = 1024

    def __init__(self, max_new: int, attn: str, device: str = "cpu", dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = prepare_model()
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.tok = AutoTokenizer.from_pretrained(self.model_dir)
        self.lm = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype,
                                                       attn_implementation=attn).to(self.device).eval()
        self._eager = None  # the same weights with eager attention, which returns attention maps
        self.max_new = max_new
        self.eos = self.tok.eos_token_id

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.device)

    def _cache(self, k: torch.Tensor, v: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(k.shape[0]):
            cache.update(k[layer].transpose(0, 1)[None], v[layer].transpose(0, 1)[None], layer)
        return cache

    def _mask(self, q: int, seen: int) -> torch.Tensor:
        """[1, 1, q, seen + q] additive mask: every one of ``seen`` cache entries, causal after."""
        mask = torch.zeros(1, 1, q, seen + q, device=self.device, dtype=self.dtype)
        mask[0, 0, :, seen:] = torch.triu(torch.full((q, q), -math.inf, device=self.device,
                                                     dtype=self.dtype), diagonal=1)
        return mask

    @torch.inference_mode()
    def attention_to_prefix(self, k: torch.Tensor, v: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """[layers, tokens, kv_heads]: the most attention any query of ``ids`` (fed after the
        whole prefix ``k``/``v``, teacher-forced) or any query head of a KV head's group pays each
        prefix token. KVzip's score when ``ids`` repeat the context."""
        from transformers import AutoModelForCausalLM

        if self._eager is None:
            self._eager = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=self.dtype, attn_implementation="eager").to(self.device).eval()
        layers, tokens, kv_heads, _ = k.shape
        cache, best = self._cache(k, v), torch.zeros(layers, kv_heads, tokens, device=self.device)
        for at in range(0, len(ids), self.ORACLE_CHUNK):
            chunk = ids[at: at + self.ORACLE_CHUNK]
            out = self._eager(self._ids(chunk), past_key_values=cache, use_cache=True,
                              position_ids=torch.arange(tokens + at, tokens + at + len(chunk),
                                                        device=self.device)[None],
                              attention_mask=self._mask(len(chunk), tokens + at), output_attentions=True,
                              logits_to_keep=1)
            for layer, attn in enumerate(out.attentions):  # [1, heads, q, seen + q]
                a = attn[0, :, :, :tokens].float()
                a = a.view(kv_heads, -1, len(chunk), tokens).amax(dim=(1, 2))
                best[layer] = torch.maximum(best[layer], a)
        return best.transpose(1, 2).contiguous()

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [layers, tokens, kv_heads, d] of ``ids`` (post-RoPE keys, as in the pool)."""
        out = self.lm(self._ids(ids), use_cache=True)
        cache = out.past_key_values
        ks = [layer.keys[0].transpose(0, 1) for layer in cache.layers]
        vs = [layer.values[0].transpose(0, 1) for layer in cache.layers]
        return torch.stack(ks).contiguous(), torch.stack(vs).contiguous()

    @torch.inference_mode()
    def answer(self, k: torch.Tensor, v: torch.Tensor, start: int, suffix: list[int]) -> list[int]:
        """Greedy answer after the suffix, with cache entries ``k``/``v`` [L, kept, H, d] standing
        for a context of ``start`` tokens (the suffix's positions start there)."""
        cache = self._cache(k, v)
        kept, pos = k.shape[1], start

        def step(ids: list[int]) -> torch.Tensor:
            nonlocal kept, pos
            q = len(ids)
            logits = self.lm(self._ids(ids), past_key_values=cache, use_cache=True,
                             position_ids=torch.arange(pos, pos + q, device=self.device)[None],
                             attention_mask=self._mask(q, kept), logits_to_keep=1).logits
            kept, pos = kept + q, pos + q
            return logits[0, -1]

        return self._greedy(suffix, step)

    @torch.inference_mode()
    def one_shot(self, ids: list[int]) -> list[int]:
        """Greedy answer to a whole prompt prefilled in one pass (no prefix split)."""
        past = None

        def step(cur: list[int]) -> torch.Tensor:
            nonlocal past
            res = self.lm(self._ids(cur), past_key_values=past, use_cache=True, logits_to_keep=1)
            past = res.past_key_values
            return res.logits[0, -1]

        return self._greedy(ids, step)

    def _greedy(self, first: list[int], step: Callable[[list[int]], torch.Tensor]) -> list[int]:
        """Up to ``max_new`` greedy tokens: ``step`` feeds tokens (``first``, then each new one)
        and returns the next token's logits."""
        ids, out = first, []
        for _ in range(self.max_new + 1):
            nxt = int(step(ids).argmax())
            if nxt == self.eos or len(out) == self.max_new:
                break
            out.append(nxt)
            ids = [nxt]
        return out

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def build_docs(runner: Runner, args: argparse.Namespace) -> list[Doc]:
    reqs = docqa(n_requests=args.requests, docs=args.docs, rate=1, min_chars=args.min_chars,
                 max_chars=args.max_chars, seed=args.seed)
    by_doc: dict[str, list] = defaultdict(list)
    for r in reqs:
        if r.prompt not in [x.prompt for x in by_doc[r.context]] and len(by_doc[r.context]) < args.per_doc:
            by_doc[r.context].append(r)
    docs = []
    for name, rs in sorted(by_doc.items(), key=lambda kv: int(kv[0][3:])):
        text = rs[0].prompt[: rs[0].prompt.index(QUESTION_MARK)]
        prefix = runner.tok(text + QUESTION_MARK)["input_ids"]
        doc = Doc(name, prefix)
        fact = re.search(r"The access code for document \d+ is (\d+)\.", text)
        if fact:
            spans = runner.tok(text + QUESTION_MARK, return_offsets_mapping=True)["offset_mapping"]
            doc.fact_tokens = [i for i, (a, b) in enumerate(spans) if a < fact.end() and b > fact.start()]
            doc.code_tokens = [i for i, (a, b) in enumerate(spans) if a < fact.end(1) and b > fact.start(1)]
        for r in rs:
            full = runner.tok(r.prompt)["input_ids"]
            if full[: len(prefix)] != prefix:  # SGLang would store a shorter shared node: not mirrored
                n = next(i for i, (a, b) in enumerate(zip(full, prefix)) if a != b)
                raise SystemExit(f"{name}: prefix is not a token prefix of the prompt (differs at {n})")
            doc.questions.append((r.prompt, full[len(prefix):], r.truth))
        docs.append(doc)
    return docs


def oracle_scores(runner: Runner, doc: Doc, base: str, qi: int, ref_ids: dict) -> torch.Tensor:
    """[layers, tokens, kv_heads] attention of oracle ``base`` over ``doc``'s prefix (``repeat``
    cached per document: it does not depend on the question)."""
    if base == "repeat":
        if doc.repeat is None:
            again = runner.tok(REPEAT_PROMPT, add_special_tokens=False)["input_ids"] + doc.prefix
            doc.repeat = runner.attention_to_prefix(doc.k, doc.v, again)
        return doc.repeat
    suffix = doc.questions[qi][1]
    ids = suffix + ref_ids[(doc.name, qi)] if base == "answer" else suffix
    return runner.attention_to_prefix(doc.k, doc.v, ids)


def take(x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The kept tokens of a [layers, tokens, heads, d] tensor: ``pick`` [kept] for every layer and
    head alike, or [layers, kept, heads] per layer and head (each (layer, head) then holds its own
    tokens in the same number of cache entries, which attention over a prefix that every later
    token sees does not tell apart from any other order)."""
    if pick.dim() == 1:
        return x[:, pick]
    return torch.gather(x, 1, pick[..., None].expand(-1, -1, -1, x.shape[-1]))


def evaluate(runner: Runner, docs: list[Doc], selector: TokenSelector | None, refs: dict,
             ref_ids: dict, question_kv: str = "recomputed") -> dict:
    """Scores of one selector (None: keep-all through the pruned path) against ``refs``.
    ``question_kv``: which situation of the question is measured (``--question-kv``)."""
    f1s, same, facts, n_fact, kept_share = [], 0, 0, 0, []
    code_kept: list[float] = []
    sentence_kept: list[float] = []
    question_kept: list[float] = []
    t_sel = 0.0
    t0 = time.perf_counter()
    answers = []
    served = question_kv == "served"
    if served and isinstance(selector, VariantSelector) and selector.spec.agg == "perhead":
        raise SystemExit("agg=perhead: not with --question-kv served (its kept question tokens would differ per head)")
    per_question = served or isinstance(selector, VariantSelector) and selector.spec.base in PER_QUESTION
    if served and isinstance(selector, VariantSelector) and (
            selector.spec.base in ORACLES or selector.spec.mix.partition(":")[0] in ORACLES):
        raise SystemExit("the oracles score the document alone: not with --question-kv served")

    def select(doc: Doc, qi: int) -> torch.Tensor:
        nonlocal t_sel
        k, v = doc.served_kv(runner, qi, ref_ids) if served else (doc.k, doc.v)
        tokens = k.shape[1]
        t1 = time.perf_counter()
        if selector is None:
            idx = torch.arange(tokens, device=k.device)
        else:
            kv = HarnessKV.of(k, v, torch.arange(tokens, device=k.device), 0,
                              oracle=lambda base: oracle_scores(runner, doc, base, qi, ref_ids))
            idx = selector.select(kv)
        t_sel += time.perf_counter() - t1
        kept = torch.zeros(k.shape[:3], dtype=torch.bool, device=idx.device)  # [layers, tokens, heads]
        kept = kept.index_fill(1, idx, True) if idx.dim() == 1 else kept.scatter(1, idx, True)
        kept_share.append(kept.float().mean().item())

        def share(positions) -> float:  # of these tokens, kept (in the mean layer and head)
            return kept[:, positions].float().mean().item()

        ask = list(range(doc.k.shape[1], doc.k.shape[1] + len(doc.questions[qi][1]) - 1))
        if served and ask:  # the question's tokens the request reuses (all of it but the last)
            question_kept.append(share(ask))
        if doc.code_tokens:
            code_kept.append(share(doc.code_tokens))
            sentence_kept.append(share(doc.fact_tokens))
        return idx

    def request(doc: Doc, qi: int, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
        """(cached K, cached V, the position the request's uncached tokens start at, those tokens)."""
        suffix, tokens = doc.questions[qi][1], doc.k.shape[1]
        if served:  # the prompt matches the node up to its last token, which is recomputed
            start = tokens + len(suffix) - 1
            k, v = doc.served_kv(runner, qi, ref_ids)
            pick = pick[pick < start]
            return k[:, pick], v[:, pick], start, suffix[-1:]
        k, v = take(doc.k, pick), take(doc.v, pick)
        if question_kv == "stored":  # the question's own KV, from the full-context prefill, kept whole
            qk, qv = doc.question_kv(runner, qi)
            return torch.cat([k, qk], 1), torch.cat([v, qv], 1), tokens + qk.shape[1], suffix[-1:]
        return k, v, tokens, suffix

    for doc in docs:
        idx = None if per_question else select(doc, 0)
        for qi, (prompt, suffix, truth) in enumerate(doc.questions):
            ans = runner.text(runner.answer(*request(doc, qi, select(doc, qi) if per_question else idx)))
            ref = refs[(doc.name, qi)]
            f1s.append(token_f1(ans, ref))
            same += int(ans == ref)
            if truth is not None:
                n_fact += 1
                facts += int(truth in ans)
            answers.append({"doc": doc.name, "q": qi, "answer": ans})
    n = len(f1s)
    return {"f1": sum(f1s) / n, "identical": same / n, "fact_acc": facts / max(n_fact, 1), "n": n,
            "n_fact": n_fact, "kept_share": sum(kept_share) / len(kept_share), "select_s": t_sel,
            "code_tokens_kept": sum(code_kept) / max(len(code_kept), 1),
            "fact_sentence_kept": sum(sentence_kept) / max(len(sentence_kept), 1),
            "question_kept": sum(question_kept) / len(question_kept) if question_kept else None,
            "wall_s": time.perf_counter() - t0, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=14)
    p.add_argument("--requests", type=int, default=60, help="docqa requests generated (deduplicated, capped per doc)")
    p.add_argument("--per-doc", type=int, default=4, help="at most this many distinct questions per document")
    p.add_argument("--min-chars", type=int, default=3000)
    p.add_argument("--max-chars", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", default="0.5", help="comma-separated drop ratios")
    p.add_argument("--selectors", default="keydiff,knorm,streaming",
                   help="semicolon-separated: drop.py names or v:<base>,key=value,... variants; "
                        "a trailing @RATIO runs that one at RATIO only")
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--device", default="cpu", help="cpu, or cuda on the GPU machine")
    p.add_argument("--question-kv", default="recomputed", choices=("recomputed", "stored", "served"),
                   help="recomputed: a new question, prefilled over the pruned document; stored: a "
                        "repeated prompt whose question KV (computed over the whole document when first "
                        "served, a short radix node of its own kept whole) is restored next to the pruned "
                        "document, only its last token recomputed; served: a repeated prompt whose "
                        "document, question and answer were one radix node, dropped as a whole (the "
                        "selector may drop question tokens), only the prompt's last token recomputed")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the model's and the KV's dtype (SGLang's pool holds bfloat16)")
    p.add_argument("--query-model", default="/tmp/evicpress_cpu_qm.pt",
                   help="query model for expected/kvzip (measured here on CPU if the file is missing)")
    p.add_argument("--sanity", action="store_true", help="also check keep-all and one-shot answers against the reference")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    selectors = [s for s in args.selectors.split(";") if s]
    ratios = [float(r) for r in args.ratios.split(",")]
    if any(s.split(",")[0].removeprefix("v:") in drop.QUERY_AWARE or "mix=expected" in s or "mix=kvzip" in s
           for s in selectors):
        path = Path(args.query_model)
        if not path.exists():
            from evicpress_sglang.sample_text import documents

            t = time.perf_counter()
            queries.measure(prepare_model(), [text for _, text in documents()][:4]).save(path)
            print(f"query model measured in {time.perf_counter() - t:.1f}s -> {path}", flush=True)
        queries.use(path)

    runner = Runner(args.max_new, args.attn, args.device, args.dtype)
    docs = build_docs(runner, args)
    t = time.perf_counter()
    for doc in docs:
        doc.k, doc.v = runner.prefill(doc.prefix)
    prefill_s = time.perf_counter() - t
    n_q = sum(len(d.questions) for d in docs)
    print(f"{len(docs)} docs, {n_q} questions, prefix tokens {min(len(d.prefix) for d in docs)}-"
          f"{max(len(d.prefix) for d in docs)}; prefill {prefill_s:.1f}s", flush=True)

    t = time.perf_counter()
    refs, ref_ids, ref_rows = {}, {}, []
    for doc in docs:
        for qi, (prompt, suffix, truth) in enumerate(doc.questions):
            ref_ids[(doc.name, qi)] = runner.answer(doc.k, doc.v, len(doc.prefix), suffix)
            refs[(doc.name, qi)] = runner.text(ref_ids[(doc.name, qi)])
            ref_rows.append({"doc": doc.name, "q": qi, "prompt_tail": prompt[-120:], "truth": truth,
                             "prefix_tokens": len(doc.prefix), "suffix_tokens": len(suffix),
                             "answer": refs[(doc.name, qi)]})
    ref_s = time.perf_counter() - t
    facts = [r for r in ref_rows if r["truth"] is not None]
    result: dict = {"args": vars(args), "docs": len(docs), "questions": n_q, "prefill_s": prefill_s,
                    "reference_s": ref_s, "reference": ref_rows,
                    "reference_fact_acc": sum(r["truth"] in r["answer"] for r in facts) / max(len(facts), 1),
                    "runs": []}
    print(f"reference answers in {ref_s:.1f}s; full-KV fact accuracy {result['reference_fact_acc']:.2f}", flush=True)

    if args.sanity:
        keep_all = evaluate(runner, docs, None, refs, ref_ids, args.question_kv)
        t = time.perf_counter()
        # one question per document: a whole-prompt prefill costs as much as the document's
        one = [runner.text(runner.one_shot(doc.prefix + doc.questions[0][1])) == refs[(doc.name, 0)]
               for doc in docs]
        result["sanity"] = {"keep_all_identical": keep_all["identical"], "keep_all_f1": keep_all["f1"],
                            "one_shot_identical": sum(one) / len(one), "one_shot_n": len(one), "one_shot_s": time.perf_counter() - t}
        print(f"sanity: {result['sanity']}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # ``name@0.3`` runs a selector at that ratio only, instead of every ``--ratios`` one
    plan = [(s.partition("@")[0], float(s.partition("@")[2])) if "@" in s else (s, r)
            for r in ratios for s in selectors if "@" not in s or r == ratios[0]]
    plan.sort(key=lambda sr: sr[1], reverse=True)
    for s, ratio in plan:
        row = evaluate(runner, docs, make_selector(s, ratio), refs, ref_ids, args.question_kv)
        row.update(selector=s, ratio=ratio)
        result["runs"].append(row)
        print(f"{s:60s} {ratio:.2f}  F1 {row['f1']:.3f}  identical {row['identical']:.2f}  "
              f"fact {row['fact_acc']:.2f}  code kept {row['code_tokens_kept']:.2f}  sentence kept "
              f"{row['fact_sentence_kept']:.2f}  question kept {row['question_kept']}  kept {row['kept_share']:.3f}  {row['wall_s']:.1f}s "
              f"(select {row['select_s']:.2f}s)", flush=True)
        out.write_text(json.dumps(result, indent=1))
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
