"""Real KV from a model, computed with transformers on any device.

The codec report and the tests need KV that has the statistics of a real model
(outlier key channels, RoPE structure), not random numbers. The layout returned
matches SGLang's pool: ``[layers, tokens, kv_heads, head_dim]``, keys after RoPE.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from .sample_text import sample_text


@cache
def load_causal_lm(model_dir: str, device: str = "cpu"):
    """(model, tokenizer) in bf16, loaded once per process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    return model, tok


def kv_of_ids(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``input_ids`` ([tokens]) as [layers, tokens, kv_heads, head_dim]."""
    with torch.no_grad():
        out = model(input_ids[None].to(model.device), use_cache=True)
    cache_ = out.past_key_values
    layers = cache_.layers
    k = torch.stack([layer.keys[0].transpose(0, 1) for layer in layers])
    v = torch.stack([layer.values[0].transpose(0, 1) for layer in layers])
    return k.contiguous(), v.contiguous()


def real_kv(model_dir: str | Path, tokens: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``tokens`` tokens of the bundled documentation text."""
    model, tok = load_causal_lm(str(model_dir), device)
    ids = tok(sample_text(tokens * 8), return_tensors="pt").input_ids[0, :tokens]
    if len(ids) < tokens:
        raise ValueError(f"sample text has only {len(ids)} tokens")
    return kv_of_ids(model, ids)
