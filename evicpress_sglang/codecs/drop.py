"""Token dropping: keep a subset of a context's tokens, then quantize what is kept.

A dropping codec is ``<selector>:<ratio>`` optionally followed by a quantizer, e.g.
``keydiff:0.6`` or ``keydiff:0.6+int8`` (and ``+zstd`` on top of that). It removes
``floor(ratio * tokens)`` tokens, chosen only from what the KV cache holds at eviction
time (no queries are available then), and hands the kept tokens to the inner codec.

The payload starts with the kept tokens' *positions* (int32, ascending, relative to
the start of the context) because keys carry rotary position embeddings: a request that
continues a dropped context must use positions that follow the original length, and a
context that is dropped again composes its positions (``encode(..., positions=...)``).

Selection is per context, shared by every layer and head, unlike kvpress, which prunes
per head. SGLang's pool gives a token one slot in every layer, and a dropped node splits at
one point; a slot could still hold another token in each (layer, head), since attention over a
prefix ignores the order of its entries, but on the selector harness a choice per layer and
head gave lower answer F1 than a shared one for the question's own attention and for
``expected`` (``bench/results/2026-12-02-selector-serving/``, section 7). Scores are
standardised per (layer, head) before they are combined (averaged, or each layer's best head
taken), so no single layer decides alone.

``expected`` and ``kvzip`` score tokens by the attention the model's *queries* would give
them. No query exists at eviction time, so they use a :class:`.queries.QueryModel`: the
model's pre-RoPE query distribution, measured once per model offline
(``evicpress-sglang query-model``) and loaded with the ``query_model`` setting.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from .base import CodecError, EncodedKV, KVCodec, KVShape, _aligned, check_decodable
from . import queries

POSITION_DTYPE = torch.int32


@dataclass
class ContextKV:
    """What a selector may read about the context it prunes: its K and V a few layers at a
    time (:meth:`parts`), so that scoring a long context never holds all of them at once."""

    #: K of the layers in a slice, [layers, tokens, heads, head_dim], after RoPE at
    #: ``start + positions`` (gathered from the pool when called)
    keys: Callable[[slice], torch.Tensor]
    values: Callable[[slice], torch.Tensor]  # V likewise; gathered only if a selector asks
    shape: KVShape
    positions: torch.Tensor  # int64 [tokens], on the KV's device: each token's position in the context
    #: Where the context starts in its sequence: a radix node below others starts where its
    #: ancestors end, and its keys carry RoPE at ``start + positions``. Only the selectors that
    #: rotate queries or un-rotate keys (``expected``, ``kvzip``) read it.
    start: int = 0

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, start: int = 0, **extra) -> "ContextKV":
        """The context of whole K and V tensors ([layers, tokens, heads, head_dim])."""
        return cls(lambda part: k[part], lambda part: v[part], KVShape.of(k), positions, start, **extra)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def rope_positions(self) -> torch.Tensor:
        """The tokens' positions in the sequence: the ones their keys are rotated to."""
        return self.positions + self.start

    def parts(self, work_bytes_per_layer: int) -> list[slice]:
        """Slices of the layers to score at once: a layer's K or V plus ``work_bytes_per_layer``
        of the selector's own intermediates, within :data:`CHUNK_BYTES` (one layer at least)."""
        s = self.shape
        per_layer = s.tokens * s.heads * s.head_dim * s.dtype.itemsize + work_bytes_per_layer
        step = max(1, CHUNK_BYTES // max(per_layer, 1))
        return [slice(at, min(at + step, s.layers)) for at in range(0, s.layers, step)]

    def per_layer(self, work_bytes_per_layer: int, score: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """float32 [layers, tokens, heads]: ``score(part)`` ([part's layers, tokens, heads]) for
        every slice of :meth:`parts`, put together."""
        s = self.shape
        out = torch.empty(s.layers, s.tokens, s.heads, device=self.device)
        for part in self.parts(work_bytes_per_layer):
            out[part] = score(part)
        return out

    def norms(self, read: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """float32 [layers, tokens, heads] L2 norms of ``read``'s vectors (``keys`` or ``values``)."""
        return self.per_layer(4 * self.shape.tokens * self.shape.heads,
                              lambda part: torch.linalg.vector_norm(read(part), dim=-1, dtype=torch.float32))


#: Bytes a selector reads and builds at once (a few layers of K and its intermediates), so that
#: a long context (100k tokens of an 8B model) does not ask the GPU for gigabytes at eviction
#: time, when memory is scarcest; the scores do not depend on it.
CHUNK_BYTES = 256 << 20


class TokenSelector(ABC):
    """Which tokens of a context to keep, from its KV alone."""

    name: str
    #: Contexts shorter than this keep every token. What dropping them saves is small, and a short
    #: context is typically the tail of a longer one (a question or a chat turn in a radix node of
    #: its own, below a shared document), which a request continuing it reads most closely: in
    #: issue 24's GPU run, requests served from a dropped question-tail node lost most of the
    #: answer agreement that was lost.
    MIN_TOKENS = 64

    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio < 1.0:
            raise CodecError(f"{self.name}: drop ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def kept(self, tokens: int) -> int:
        """How many of ``tokens`` survive: every one below :attr:`MIN_TOKENS`, else at least
        one; fixed by the count alone so that sizes are known before encoding."""
        if tokens < max(self.MIN_TOKENS, 1):
            return tokens
        return max(1, tokens - math.floor(self.ratio * tokens))

    def select(self, kv: ContextKV) -> torch.Tensor:
        """Ascending indices (int64, on the keys' device) of the tokens to keep."""
        tokens, keep = kv.shape.tokens, self.kept(kv.shape.tokens)
        if keep >= tokens:
            return torch.arange(tokens, device=kv.device)
        chosen = self.choose(kv, keep)
        return torch.sort(chosen).values

    @abstractmethod
    def choose(self, kv: ContextKV, keep: int) -> torch.Tensor:
        """``keep`` token indices of the context, any order."""


class ScoredSelector(TokenSelector):
    """Keeps the best-scored tokens, and always the context's first token (see :meth:`pin`) and its
    last :attr:`RECENT` ones (at most half of those kept): the recent window that SnapKV, H2O and
    StreamingLLM keep too, because the end of a context (the question after a document, the last
    turn) is what the next tokens attend to most, and a score from the keys alone cannot tell it
    from the rest."""

    RECENT = 32
    #: The context's first tokens, always kept (see :meth:`pin`).
    FIRST = 1

    def choose(self, kv: ContextKV, keep: int) -> torch.Tensor:
        score = self.score(kv).nan_to_num(nan=-torch.inf)  # a NaN would outrank the kept window in topk
        self.pin(score, keep)
        return torch.topk(score, keep).indices

    def pin(self, score: torch.Tensor, keep: int) -> None:
        """Set the scores of the always-kept tokens to +inf, in place, along the last dimension
        (the tokens): the last ``RECENT`` (at most half of ``keep``) and the ``FIRST``. With both ends
        kept, a dropped radix node splits wherever a prompt leaves it (a split needs a kept slot
        on each side, ``tree._splittable``): a prompt that shares only a context's first tokens (a
        title, a chat's first words) reuses them and the rest stays cached, where before such a
        prompt's own KV replaced the whole dropped context."""
        recent = min(self.RECENT, keep // 2)
        if recent:
            score[..., -recent:] = torch.inf
        first = min(self.FIRST, keep - recent)
        if first:
            score[..., :first] = torch.inf

    @abstractmethod
    def score(self, kv: ContextKV) -> torch.Tensor:
        """float32 [tokens], on the keys' device (a fresh tensor): higher is kept first."""


def _standardised(score: torch.Tensor, head_max: bool = False) -> torch.Tensor:
    """[layers, tokens, heads] scores -> one per token: each (layer, head) standardised over the
    tokens, then averaged over heads (``head_max``: the best head of each layer taken instead),
    then over layers, so that no single layer decides alone.

    Means are sums divided by counts: SGLang's deterministic mode runs ``mean`` along a
    dimension as a Triton kernel, compiled anew for sizes of another class on first use (on the
    scheduler thread); ``std_mean`` and ``sum`` stay aten's."""
    score = score.float()
    layers, tokens, heads = score.shape
    if tokens > 1:
        std, mean = torch.std_mean(score, dim=1, keepdim=True)
        z = (score - mean) / std.clamp_min(1e-6)
    else:
        z = score - score
    per_layer = z.amax(dim=2) if head_max else z.sum(dim=2) / heads
    return per_layer.sum(dim=0) / layers


class KNormSelector(ScoredSelector):
    """Keep the tokens with the *smallest* key L2 norm (Devoto et al. 2024, kvpress
    ``KnormPress``): low-norm keys draw the most attention."""

    name = "knorm"

    def score(self, kv: ContextKV) -> torch.Tensor:
        return -_standardised(kv.norms(kv.keys))


class KeyDiffSelector(ScoredSelector):
    """Keep the tokens whose keys differ most from the context's mean key direction
    (KeyDiff, kvpress ``KeyDiffPress``): distinctive keys carry the information."""

    name = "keydiff"

    def score(self, kv: ContextKV) -> torch.Tensor:
        def similarity(part: slice) -> torch.Tensor:
            unit = torch.nn.functional.normalize(kv.keys(part).float(), dim=-1)
            anchor = torch.nn.functional.normalize(unit.sum(dim=1, keepdim=True), dim=-1)  # the mean's direction
            return (unit * anchor).sum(dim=-1)

        s = kv.shape  # intermediates: K in float32 and its unit vectors
        return -_standardised(kv.per_layer(2 * 4 * s.tokens * s.heads * s.head_dim, similarity))


class StreamingSelector(TokenSelector):
    """Attention sinks plus a recent window (StreamingLLM): the first ``SINKS`` tokens of
    the context and as many of its last tokens as the ratio allows."""

    name = "streaming"
    SINKS = 4

    def choose(self, kv: ContextKV, keep: int) -> torch.Tensor:
        tokens, device = kv.shape.tokens, kv.device
        sinks = min(self.SINKS, keep)
        head = torch.arange(sinks, device=device)
        tail = torch.arange(tokens - (keep - sinks), tokens, device=device)
        return torch.cat([head, tail])


class ExpectedAttentionSelector(ScoredSelector):
    """Expected Attention (Devoto et al. 2025): a future query is Gaussian, N(mu, S); a token's
    expected attention logit is ``mu.k / sqrt(d) + k^T S k / (2d)``, softmaxed over the
    context and weighted by the token's value norm (what it adds to the output). In log space
    the softmax only shifts each (layer, head)'s logits by one constant, which the per-(layer,
    head) standardisation of :func:`_standardised` removes again: it is not computed. (Under
    SGLang's ``--enable-deterministic-inference`` it would be a batch-invariant Triton kernel
    compiled for every new context length (``n_cols`` is a ``tl.constexpr``), on the scheduler
    thread: in issue 24's GPU run of 2026-12-02 the first ``expected`` policy on a fresh server
    queued requests for seconds while the same lengths later ran without delay.)

    ``mu`` and ``S`` come from the model's :class:`~.queries.QueryModel`, rotated by the mean
    RoPE rotation over the ``FUTURE`` positions after the context's last token: that is where
    the queries of requests continuing it sit, and stored keys already carry their own
    rotations. Costs O(tokens * d^2) per layer and head, no pairwise attention.

    Both terms come from one projection of the keys, in their own dtype (bf16 in the pool):
    ``k @ [mu / sqrt(d) | R / sqrt(2d)]`` with ``S = R R^T`` (:func:`.queries.cov_root_on`), the
    logit its first column plus the squared norm of the rest; no float32 copy of K or V is made.
    The KV of a context is read about three times instead of a dozen (issue 24: the selector's
    cost against a prefill).

    The per-head scores are combined with the best KV head of each layer, not the mean: the
    one slot a token gets serves every head, and a token one head attends to strongly is what
    that head reads for every later query, whatever the other heads think of it. For this
    selector the change measured within noise (answer F1 -0.012 / +0.006 / +0.022 at 0.5 / 0.3
    / 0.7 dropped on the SGLang bench, similar on the harness); for scores read from real
    attention (KVzip's repeat, a question's own) it gained 0.01-0.04 at every ratio, each
    gain within its own noise but six of six the same way
    (``bench/results/2026-12-02-selector-oracles/``)."""

    name = "expected"
    FUTURE = 256

    def score(self, kv: ContextKV) -> torch.Tensor:
        layers, tokens, heads, d = kv.shape.tensor_shape
        qm = queries.active_on(kv.device, layers, heads, d)
        future = kv.rope_positions()[-1] + 1 + torch.arange(self.FUTURE, device=kv.device)
        turn = queries.mean_rotation(future, qm.inv_freq)  # row j: mean rotation of unit vector j
        mean = qm.mean @ turn  # [L, H, d]
        root = turn.T @ queries.cov_root_on(kv.device, layers, heads, d)  # turn^T S turn = root root^T
        project = torch.cat([mean[..., None] / math.sqrt(d), root / math.sqrt(2 * d)], dim=-1).to(kv.shape.dtype)
        def logit(part: slice) -> torch.Tensor:
            y = torch.einsum("lthd,lhde->lthe", kv.keys(part), project[part])  # [l, T, H, 1 + d]
            return y[..., 0].float() + torch.linalg.vector_norm(y[..., 1:], dim=-1, dtype=torch.float32).square()

        logits = kv.per_layer(tokens * heads * (d + 1) * (kv.shape.dtype.itemsize + 4), logit)
        return _standardised(logits + kv.norms(kv.values).clamp_min(1e-6).log(), head_max=True)


class ReconstructionSelector(ScoredSelector):
    """In the spirit of KVzip (Kim et al. 2025): keep the tokens the model needs to *repeat*
    the context, each scored by the most attention any repeating query pays it.

    KVzip runs the repeat as one more prefill; here it is approximated from the KV alone at
    eviction: the query that re-reads token ``i`` is predicted from its key (the query model's
    key->query map on the un-rotated key), placed at ``i``'s position in a copy of the context
    that follows it (``position + tokens``), for ``QUERIES`` evenly spaced tokens."""

    name = "kvzip"
    QUERIES = 256

    def score(self, kv: ContextKV) -> torch.Tensor:
        layers, tokens, heads, d = kv.shape.tensor_shape
        qm = queries.active_on(kv.device, layers, heads, d)
        picked = torch.linspace(0, tokens - 1, min(self.QUERIES, tokens), device=kv.device).round().long()
        seq = kv.rope_positions()
        pos = seq[picked]
        def most_attention(part: slice) -> torch.Tensor:
            k = kv.keys(part).float()
            plain = queries.rope(k[:, picked], -pos, qm.inv_freq)  # [l, Q, H, d] pre-RoPE keys
            q = torch.einsum("lqhd,lhde->lqhe", plain, qm.key_map[part]) + qm.key_bias[part, None]
            q = queries.rope(q, pos + seq[-1] + 1, qm.inv_freq)
            attn = torch.einsum("lqhd,lthd->lhqt", q, k).div(math.sqrt(d)).softmax(dim=-1)
            return attn.amax(dim=2).transpose(1, 2)

        # per layer: K in float32, the attention and its softmax ([H, Q, T] float32 each)
        return _standardised(kv.per_layer(4 * tokens * heads * (d + 2 * picked.numel()), most_attention).log())


class KeepAllSelector(TokenSelector):
    """Keeps every token: ``keep+<quantizer>`` stores a context that was token-dropped
    before under a plain quantizer, with the positions its tokens already have."""

    name = "keep"

    def __init__(self) -> None:
        super().__init__(0.0)

    def choose(self, kv: ContextKV, keep: int) -> torch.Tensor:
        return torch.arange(keep, device=kv.device)


SELECTORS: dict[str, type[TokenSelector]] = {
    c.name: c for c in (KNormSelector, KeyDiffSelector, StreamingSelector, ExpectedAttentionSelector,
                        ReconstructionSelector)}
#: Selectors that read the model's query model (:mod:`.queries`).
QUERY_AWARE = (ExpectedAttentionSelector.name, ReconstructionSelector.name)


class DropCodec(KVCodec):
    """Token selection followed by an inner fixed-rate codec on the kept tokens."""

    def __init__(self, selector: TokenSelector, inner: KVCodec, name: str) -> None:
        if not inner.fixed_rate:
            raise CodecError(f"{name}: token dropping goes before '+zstd', not after it")
        self.selector = selector
        self.inner = inner
        self.name = name
        self.lossless = False

    def output_shape(self, shape: KVShape) -> KVShape:
        return shape.with_tokens(self.selector.kept(shape.tokens))

    def nbytes(self, shape: KVShape) -> int:
        kept = self.output_shape(shape)
        return _aligned(kept.tokens * 4) + self.inner.nbytes(kept)

    def encode(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
               start: int = 0) -> EncodedKV:
        """``positions``: where the given tokens sit in the context (default 0..tokens-1);
        a context dropped before passes the positions its kept tokens had. ``start``: where the
        context starts in its sequence (:attr:`ContextKV.start`; not stored)."""
        shape = KVShape.of(k)
        idx, kept_pos = self.keep(shape, k.device, lambda part: k[part], lambda part: v[part], positions, start)
        inner = self.inner.encode(k[:, idx], v[:, idx])
        return EncodedKV(self.name, shape, torch.cat([self.header(kept_pos), inner.payload]))

    def keep(self, shape: KVShape, device: torch.device, keys: Callable[[slice], torch.Tensor],
             values: Callable[[slice], torch.Tensor], positions: torch.Tensor | None = None, start: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ascending indices of the kept tokens, their positions in the context), both int64.
        ``keys`` / ``values`` return the tokens' K / V of a slice of layers (:class:`ContextKV`);
        they are called only when some token is dropped (V only by a selector that reads it), so
        a subset codec (``keep+...``) never needs them gathered. ``start``: where the context
        starts in its sequence (the kept positions stay relative to the context; the selector
        reads it, see :class:`ContextKV`)."""
        tokens = shape.tokens
        if positions is not None and positions.numel() != tokens:
            raise CodecError(f"{positions.numel()} positions for {tokens} tokens")
        pos = torch.arange(tokens, device=device) if positions is None else positions.to(device, torch.int64)
        if self.selector.kept(tokens) >= tokens:
            idx = torch.arange(tokens, device=device)
        else:
            idx = self.selector.select(ContextKV(keys, values, shape, pos, int(start)))
        return idx, pos[idx]

    def header(self, kept_pos: torch.Tensor) -> torch.Tensor:
        """The payload's first segment: the kept positions as int32, zero-padded to alignment."""
        head = torch.zeros(_aligned(kept_pos.numel() * 4), dtype=torch.uint8, device=kept_pos.device)
        head[: kept_pos.numel() * 4] = kept_pos.to(POSITION_DTYPE).view(torch.uint8)
        return head

    def inner_payload(self, enc: EncodedKV) -> EncodedKV:
        """The inner codec's blob inside ``enc`` (a view: the payload after the positions)."""
        kept = self.output_shape(enc.shape)
        return EncodedKV(self.inner.name, kept, enc.payload[_aligned(kept.tokens * 4):])

    def positions(self, enc: EncodedKV) -> torch.Tensor:
        """The kept tokens' positions in the context (int64, the payload's device)."""
        kept = self.output_shape(enc.shape).tokens
        return enc.payload[: kept * 4].view(POSITION_DTYPE).to(torch.int64)

    def decode(self, enc: EncodedKV, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Writes the kept tokens (``output_shape`` of the blob's shape) into the outputs."""
        check_decodable(self, enc, out_k, out_v)
        self.inner.decode(self.inner_payload(enc.to(out_k.device)), out_k, out_v)


def parse_selector(stage: str) -> TokenSelector | None:
    """``keydiff:0.6`` (or ``keep``) -> its selector; None when ``stage`` is not a dropping stage."""
    if stage == KeepAllSelector.name:
        return KeepAllSelector()
    name, sep, ratio = stage.partition(":")
    if not sep or name not in SELECTORS:
        return None
    try:
        value = float(ratio)
    except ValueError:
        raise CodecError(f"{stage!r}: drop ratio must be a number") from None
    return SELECTORS[name](value)
