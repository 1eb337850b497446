"""What a model's attention queries look like, for selectors that score tokens by attention.

A context is evicted long after its prefill, and no query of the future requests that will
reuse it exists yet; SGLang keeps no queries at all. So the query-aware selectors
(``expected``, ``kvzip`` in :mod:`.drop`) read a :class:`QueryModel` measured once per model,
offline, on sample text (:func:`measure`, ``evicpress-sglang query-model``): per layer and KV
head, the Gaussian (mean, covariance) of the *pre-RoPE* queries of the head's query group,
and the least-squares map from a token's pre-RoPE key to its query.

Why pre-RoPE: SGLang's pool holds keys *after* RoPE at their own positions, and a future
query at position ``p`` is ``R(p) q``. Queries measured after RoPE at the sample's positions
would carry the wrong rotations; pre-RoPE statistics are rotated to the positions where they
are used (:func:`rope`), and stored keys are un-rotated with their kept positions.

Why not from the context's own keys: on SmolLM2 docqa contexts, the attention the actual
question queries pay to the kept half of the context was 0.44 with the last 64 keys used as
query samples (worse than random), against 0.89 for KeyDiff and 0.95 with the real queries'
statistics (bench/results/2026-12-01-query-aware-selectors/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .base import CodecError


@dataclass(frozen=True)
class QueryModel:
    """Per layer and KV head: pre-RoPE query mean [L, H, d], covariance [L, H, d, d], and the
    key->query map ``q ~ k @ key_map + key_bias`` ([L, H, d, d], [L, H, d]); ``inv_freq``
    [d/2]: the RoPE frequencies (rotate-half layout: dims i and i + d/2 turn together)."""

    mean: torch.Tensor
    cov: torch.Tensor
    key_map: torch.Tensor
    key_bias: torch.Tensor
    inv_freq: torch.Tensor

    def save(self, path: str | Path) -> None:
        torch.save({f.name: getattr(self, f.name).cpu() for f in fields(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> "QueryModel":
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    def check(self, layers: int, heads: int, head_dim: int) -> None:
        """A :class:`CodecError` if this model is of another geometry than the KV cache."""
        if tuple(self.mean.shape) != (layers, heads, head_dim):
            raise CodecError(f"the query model describes {tuple(self.mean.shape)} (layers, KV heads, head_dim), "
                             f"the KV cache {(layers, heads, head_dim)}")

    def on(self, device: torch.device, layers: int, heads: int, head_dim: int) -> "QueryModel":
        """This model in float32 on ``device``; a :class:`CodecError` if it is another model's."""
        self.check(layers, heads, head_dim)
        return QueryModel(**{f.name: getattr(self, f.name).to(device, torch.float32) for f in fields(self)})


def for_rank(model: QueryModel, heads: int, rank: int, size: int) -> QueryModel:
    """The part of ``model`` (measured over all the model's KV heads) that tensor-parallel rank
    ``rank`` of ``size`` serves with ``heads`` KV heads: SGLang gives rank r the heads
    [r * heads, (r + 1) * heads) when the KV heads divide among the ranks, and replicates head
    ``r * total // size`` when there are fewer KV heads than ranks. Any other shape is returned
    as it is (and refused by :meth:`QueryModel.on` with its geometry)."""
    total = model.mean.shape[1]
    if total == heads:
        return model
    if total == heads * size:
        idx = torch.arange(rank * heads, (rank + 1) * heads)
    elif heads == 1 and size % total == 0:
        idx = torch.tensor([rank * total // size])
    else:
        return model
    return QueryModel(mean=model.mean[:, idx], cov=model.cov[:, idx], key_map=model.key_map[:, idx],
                      key_bias=model.key_bias[:, idx], inv_freq=model.inv_freq)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` [..., tokens, heads, d] rotated to ``positions`` [tokens] (negative: un-rotated)."""
    angle = positions.to(inv_freq)[:, None] * inv_freq  # [tokens, d/2]
    cos, sin = (torch.cat([f, f], dim=-1)[:, None, :] for f in (angle.cos(), angle.sin()))
    return x * cos + _rotated_half(x) * sin


def _rotated_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def mean_rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[d, d]: the mean over ``positions`` of the RoPE rotation, as a matrix ``T`` with
    ``x @ T`` = the mean of :func:`rope` of ``x`` over them. RoPE is linear in its cos and
    sin, so that is one rotation-shaped matrix of the mean cos and sin per frequency, made in
    O(d^2) instead of rotating every unit vector to every position."""
    angle = positions.to(inv_freq)[:, None] * inv_freq  # [positions, d/2]
    cos, sin = (torch.cat([f, f]) for f in (angle.cos().mean(0), angle.sin().mean(0)))
    eye = torch.eye(cos.numel(), device=cos.device, dtype=cos.dtype)
    return eye * cos + _rotated_half(eye) * sin


_active: QueryModel | None = None
#: the active model on each device it was asked for (a selection must not copy it each time:
#: 16 MiB of covariance alone for an 8B model)
_on_device: dict[tuple, QueryModel | torch.Tensor] = {}


def use(model: QueryModel | str | Path | None) -> None:
    """Make ``model`` (or the file it names) the one the selectors read; None: no model."""
    global _active
    _active = QueryModel.load(model) if isinstance(model, (str, Path)) else model
    _on_device.clear()


def active() -> QueryModel:
    if _active is None:
        raise CodecError("the 'expected' and 'kvzip' selectors need a query model: set 'query_model' to the file "
                         "'evicpress-sglang query-model' writes")
    return _active


def active_on(device: torch.device, layers: int, heads: int, head_dim: int) -> QueryModel:
    """:func:`active`'s model in float32 on ``device`` (:meth:`QueryModel.on`), copied there once."""
    model = active()
    key = (str(device), layers, heads, head_dim)
    if key not in _on_device:
        _on_device[key] = model.on(device, layers, heads, head_dim)
    return _on_device[key]


def cov_root_on(device: torch.device, layers: int, heads: int, head_dim: int) -> torch.Tensor:
    """[L, H, d, d] float32 on ``device``: a square root ``R`` of the active model's query
    covariance per layer and head (``cov = R @ R.T``; its eigenvectors scaled by the square roots
    of its eigenvalues, negative rounding errors clipped), so that a quadratic form ``k.S.k`` is
    the squared norm of one projection ``k @ R``. Computed on the CPU once per model and device."""
    key = ("root", str(device), layers, heads, head_dim)
    if key not in _on_device:
        model = active()
        model.check(layers, heads, head_dim)
        values, vectors = torch.linalg.eigh(model.cov.to(torch.float64))
        root = vectors * values.clamp_min(0).sqrt()[..., None, :]
        _on_device[key] = root.to(device, torch.float32)
    return _on_device[key]


def measure(model_dir: str | Path, texts: list[str], max_tokens: int = 2048, ridge: float = 1e-2) -> QueryModel:
    """The query model of a Hugging Face Llama-style model (``q_proj``/``k_proj`` per layer,
    optional ``q_norm``/``k_norm``), from its pre-RoPE queries and keys on ``texts``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = lm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def grab(layer: int):
        def hook(attn, args, kwargs):
            h = kwargs["hidden_states"][0]
            q = attn.q_proj(h).view(-1, heads, d)
            k = attn.k_proj(h).view(-1, kv_heads, d)
            q, k = getattr(attn, "q_norm", torch.nn.Identity())(q), getattr(attn, "k_norm", torch.nn.Identity())(k)
            # one sample per (token, query head), paired with the key of that head's KV head
            seen.setdefault(layer, []).append((q.view(-1, kv_heads, heads // kv_heads, d), k))
        return hook

    hooks = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True)
             for i, layer in enumerate(lm.model.layers)]
    with torch.no_grad():
        for text in texts:
            lm(torch.tensor([tok(text)["input_ids"][:max_tokens]]))
    for h in hooks:
        h.remove()
    stats = [_layer_stats(seen[i], ridge) for i in range(len(seen))]
    return QueryModel(*(torch.stack(t) for t in zip(*stats)), inv_freq=lm.model.rotary_emb.inv_freq.float().cpu())


def _layer_stats(pairs: list[tuple[torch.Tensor, torch.Tensor]], ridge: float) -> tuple[torch.Tensor, ...]:
    q = torch.cat([p[0] for p in pairs])  # [tokens, kv_heads, group, d]
    k = torch.cat([p[1] for p in pairs])  # [tokens, kv_heads, d]
    samples = q.transpose(0, 1).flatten(1, 2)  # [kv_heads, tokens * group, d]
    mean = samples.mean(1)
    centred = samples - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / samples.shape[1]
    # ridge regression of the group's mean query on the key, per KV head (centred, so a bias)
    kc, qc = (k - k.mean(0)).transpose(0, 1), (q.mean(2) - q.mean(2).mean(0)).transpose(0, 1)
    gram = kc.transpose(1, 2) @ kc + ridge * kc.shape[1] * torch.eye(k.shape[-1])
    key_map = torch.linalg.solve(gram, kc.transpose(1, 2) @ qc)  # [kv_heads, d, d]
    key_bias = q.mean(2).mean(0) - k.mean(0)[:, None, :].matmul(key_map)[:, 0]
    return mean, cov, key_map, key_bias
