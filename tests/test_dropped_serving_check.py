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
    mask, placed = check.kept_mask(prompt, blobs)
    assert placed == [{"offset": 5, "tokens": 100, "kept": 50, "codec": "keydiff:0.5"}]
    assert mask[:5].all() and mask[-2:].all()
    assert torch.nonzero(mask[5:105]).flatten().tolist() == kept
    assert check.kept_mask([1, 2, 3], blobs)[0].all()

    asked_again = [1, 2] + node[:60]  # the node also holds the answer after the prompt's end
    mask, _ = check.kept_mask(asked_again, blobs)
    assert mask[:2].all() and torch.nonzero(mask[2:]).flatten().tolist() == [i for i in kept if i < 60]
    assert check.kept_mask([1, 2] + node[:check.MIN_OVERLAP - 1], blobs)[0].all()  # too little of it to place


def test_only_rows_whose_kept_tokens_are_what_sglang_reused_are_measured(check):
    def row(kept, tokens, reused, again, hf_dropped):
        return {"kept": kept, "tokens": tokens, "first": {"answer": " a b", "cached_tokens": 2},
                "again": {"answer": again, "cached_tokens": reused}, "hf_full": "a b", "hf_dropped": hf_dropped}

    rows = [row(50, 100, 50, " a c", "a c"),  # measured: dropping changed both answers alike
            row(50, 100, 50, " a b", "x y"),  # measured: they differ
            row(100, 100, 51, " z", "z"),  # SGLang served dropped KV that no blob showed: not measured
            row(99, 100, 51, " z", "z"),  # a stray blob masked one token: not measured
            row(100, 100, 99, " a b", "a b")]  # nothing dropped
    s = check.summarise(rows)
    assert s["docs_measured"] == 2 and [r["measured"] for r in rows] == [True, True, False, False, False]
    assert s["identical"] == {"served_vs_full": 1, "hf_dropped_vs_hf_full": 0, "served_vs_hf_dropped": 1,
                              "full_vs_hf_full": 2}
    assert s["served_vs_hf_dropped"] == pytest.approx(0.5) and s["full_vs_hf_full"] == 1.0


def test_on_a_real_cache_what_the_blobs_keep_is_what_a_second_ask_reuses(check, tmp_path, query_model_file):
    """The check's flow on a real cache (SGLang pools on the CPU, a disk tier, ``expected``): a
    dozen documents under a shared first token pair, each asked with its answer cached after it,
    fillers that share no first token with them, the blobs read, every document asked again. For
    every document HF would keep exactly the tokens the second ask reuses (so every row is
    measured), and those slots hold the true KV of the positions they stand for."""
    import random

    from evicpress_sglang.backend.cache import EvicPressRadixCache
    from evicpress_sglang.settings import Settings
    from harness import DIM, HEADS, LAYERS, expected_kv, make_params, serve

    token_bytes = 2 * LAYERS * HEADS * DIM * 2
    cache = EvicPressRadixCache(make_params(700), Settings(
        policy="static:expected:0.5", host_bytes=8 * token_bytes, disk_dir=str(tmp_path / "disk"),
        disk_bytes=10**9, host_codecs=["bf16"], disk_codecs=["expected:0.5"], query_model=query_model_file))

    def words(seed: int, n: int) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(1000, 30000) for _ in range(n)]

    def number(d: int) -> list[int]:
        return [100 + int(c) for c in str(d)]

    prompts = [[50, 51] + number(d) + list(range(60, 69)) + words(d, 200) + [70, 71] + number(d) + [73]
               for d in range(12)]
    for d, prompt in enumerate(prompts):
        serve(cache, prompt + words(5000 + d, 12), last_recomputed=True)  # the node also holds the answer
    for f in range(4):
        serve(cache, [90, 91] + words(1000 + f, 230), last_recomputed=True)
    cache.tiers[next(t for t in cache.tiers if t.label == "disk")].flush()
    blobs = check.read_blobs(tmp_path / "disk")
    for prompt in prompts:
        mask, placed = check.kept_mask(prompt[:-1], blobs)
        again = serve(cache, prompt, last_recomputed=True)
        assert placed and int(mask.sum()) == again.reused < len(prompt) - 1
        k, v = expected_kv(prompt)
        assert torch.equal(again.k, k[:, again.positions]) and torch.equal(again.v, v[:, again.positions])
