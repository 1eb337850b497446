"""Shared fixtures: the real SmolLM2 model (converted once, cached) and real KV from it;
a disk whose writes wait until a test lets them through; a real Mooncake Store."""

from __future__ import annotations

import builtins
import threading

import pytest
import torch

from evicpress_sglang.kv_sample import real_kv
from evicpress_sglang.model import prepare_model
from mooncake_fixture import mooncake_store  # noqa: F401  (a real Mooncake Store for tests/test_remote_tier.py)


@pytest.fixture(scope="session")
def smollm2_dir():
    return prepare_model()


@pytest.fixture(scope="session")
def smollm2_kv(smollm2_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ([layers, tokens, kv_heads, head_dim], bf16) of 300 tokens of real text."""
    return real_kv(smollm2_dir, tokens=300)


@pytest.fixture
def scores_only(monkeypatch) -> None:
    """Token selectors that choose by their scores alone: no whole short contexts, no recent
    window, no kept first token (tests of what a selector's score keeps; the rules have tests of
    their own)."""
    from evicpress_sglang.codecs.drop import ScoredSelector, TokenSelector

    monkeypatch.setattr(TokenSelector, "MIN_TOKENS", 0)
    monkeypatch.setattr(ScoredSelector, "RECENT", 0)
    monkeypatch.setattr(ScoredSelector, "FIRST", 0)


@pytest.fixture
def query_model_file(tmp_path):
    """A random query model of the test pools' geometry (``harness``), saved to a file for the
    ``query_model`` setting (a restarted cache loads it again); the process-wide active model is
    cleared afterwards."""
    from evicpress_sglang.codecs import queries
    from harness import DIM, HEADS, LAYERS, load_bench_script

    path = tmp_path / "q.pt"
    load_bench_script("selector_cost").random_query_model(LAYERS, HEADS, DIM).save(path)
    yield str(path)
    queries.use(None)


@pytest.fixture
def short_contexts_drop(monkeypatch) -> None:
    """Dropping codecs that drop from contexts of 8 tokens on, with a 4-token recent window: the
    seeded stress scheduler's contexts are 3-90 tokens (radix nodes of a few tokens each), which
    the production minimum (64) would store whole, leaving the dropped-KV paths unexercised."""
    from evicpress_sglang.codecs.drop import ScoredSelector, TokenSelector

    monkeypatch.setattr(TokenSelector, "MIN_TOKENS", 8)
    monkeypatch.setattr(ScoredSelector, "RECENT", 4)


@pytest.fixture
def stalled_disk_writes(monkeypatch) -> threading.Event:
    """Every file opened for writing waits until the returned event is set (the test sets it)."""
    gate = threading.Event()
    real_open = builtins.open

    def stalled(path, mode="r", *args, **kw):
        if "w" in mode:
            gate.wait(10)
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(builtins, "open", stalled)
    yield gate
    gate.set()
