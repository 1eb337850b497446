"""Shared fixtures: the real SmolLM2 model (converted once, cached) and real KV from it."""

from __future__ import annotations

import pytest
import torch

from evicpress_sglang.kv_sample import real_kv
from evicpress_sglang.model import prepare_model


@pytest.fixture(scope="session")
def smollm2_dir():
    return prepare_model()


@pytest.fixture(scope="session")
def smollm2_kv(smollm2_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ([layers, tokens, kv_heads, head_dim], bf16) of 300 tokens of real text."""
    return real_kv(smollm2_dir, tokens=300)
