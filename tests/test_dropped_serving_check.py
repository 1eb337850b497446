"""The offline half of ``bench/dropped_serving_check.py``: the kept tokens it reads back from the
disk tier's blobs are the ones the codec kept, placed where the node sits in a prompt."""

from __future__ import annotations

import pytest
import torch

from evicpress_sglang.codecs import get_codec
from evicpress_sglang.tiers.disk import DiskTier
from harness import load_bench_script


@pytest.fixture(scope="module")
def check():
    return load_bench_script("dropped_serving_check")


def test_blobs_give_back_the_kept_positions_and_mask_them_where_the_node_sits(check, tmp_path):
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 100, 2, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    node = list(range(500, 600))
    dropping, plain = get_codec("keydiff:0.5"), get_codec("bf16")
    enc = dropping.encode(k, v)
    kept = dropping.positions(enc).tolist()
    tier = DiskTier(tmp_path, 1 << 30)
    tier.put("a", enc, {"tokens": node, "codec": "keydiff:0.5"})
    tier.put("b", plain.encode(k[:, :10], v[:, :10]), {"tokens": list(range(900, 910)), "codec": "bf16"})
    tier.flush()

    blobs = sorted(check.read_blobs(tmp_path), key=lambda b: b[0][0])
    assert [(b[0], b[2]) for b in blobs] == [(node, "keydiff:0.5"), (list(range(900, 910)), "bf16")]
    assert blobs[0][1] == kept and len(kept) == 50 and blobs[1][1] == list(range(10))

    prompt = [1, 2, 3, 4, 5] + node + [7, 8]  # the node sits at offset 5; the other blob is not here
    mask = check.kept_mask(prompt, blobs)
    assert mask[:5].all() and mask[-2:].all()
    assert torch.nonzero(mask[5:105]).flatten().tolist() == kept
    assert check.kept_mask([1, 2, 3], blobs).all()

    asked_again = [1, 2] + node[:60]  # the node also holds the answer after the prompt's end
    mask = check.kept_mask(asked_again, blobs)
    assert mask[:2].all() and torch.nonzero(mask[2:]).flatten().tolist() == [i for i in kept if i < 60]
