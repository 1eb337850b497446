"""The selector-quality harness's oracles (``bench/selector_quality.py``) read the attention they
claim to read: issue 24's 'what the approximation loses' rests on them."""

from __future__ import annotations

import pytest
import torch

from harness import load_bench_script


@pytest.fixture(scope="module")
def harness():
    return load_bench_script("selector_quality")


@pytest.fixture(scope="module")
def runner(harness, smollm2_dir):
    return harness.Runner(max_new=4, attn="sdpa")


def test_repeat_oracle_is_the_attention_of_a_one_shot_forward_in_any_chunking(harness, runner):
    """The max over the repeat's queries and each KV head's query heads of the attention paid to
    every prefix token equals what one eager forward of prefix + repeat gives, however the
    repeat is cut into chunks (positions and masks continue across chunks)."""
    ids = runner.tok("Alpha beta gamma delta. The access code is 48213. " * 6)["input_ids"]
    k, v = runner.prefill(ids)
    again = runner.tok(harness.REPEAT_PROMPT, add_special_tokens=False)["input_ids"] + ids
    whole = runner.attention_to_prefix(k, v, again)
    runner.ORACLE_CHUNK = 5
    try:
        chunked = runner.attention_to_prefix(k, v, again)
    finally:
        del runner.ORACLE_CHUNK
    with torch.inference_mode():
        out = runner._eager(torch.tensor([ids + again]), output_attentions=True)
    tokens, kv_heads = len(ids), k.shape[2]
    direct = torch.stack([a[0, :, tokens:, :tokens].reshape(kv_heads, -1, tokens).amax(dim=1)
                          for a in out.attentions]).transpose(1, 2)
    assert whole.shape == (k.shape[0], tokens, kv_heads)
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, direct, atol=1e-5, rtol=0)
    assert 0 < whole.min() and whole.max() <= 1 + 1e-6


def test_question_oracle_selects_for_each_question_and_drop_selectors_once_per_document(harness, runner):
    """A per-question oracle keeps different tokens for different questions; a drop.py
    selector chooses once per document. Keep-all through the pruned path answers as full KV."""
    text = ("The red house stands on the hill. The access code for document 1 is 48213. "
            "Bananas are yellow and grow in bunches. ") * 8
    prefix = runner.tok(text + harness.QUESTION_MARK)["input_ids"]
    doc = harness.Doc("doc1", prefix)
    for q in (" What is the access code?", " What colour are bananas?"):
        doc.questions.append((text + harness.QUESTION_MARK + q, runner.tok(q, add_special_tokens=False)["input_ids"], None))
    doc.k, doc.v = runner.prefill(prefix)
    ref_ids = {(doc.name, qi): runner.answer(doc.k, doc.v, len(prefix), s) for qi, (_, s, _) in enumerate(doc.questions)}
    refs = {key: runner.text(ids) for key, ids in ref_ids.items()}

    for mode in ("recomputed", "stored", "served"):  # each way of rebuilding the request, nothing dropped
        assert harness.evaluate(runner, [doc], None, refs, ref_ids, mode)["identical"] == 1.0, mode
    served = harness.evaluate(runner, [doc], harness.make_selector("keydiff", 0.7), refs, ref_ids, "served")
    assert 0 <= served["question_kept"] <= 1 and served["kept_share"] < 0.5
    kept_sets = []
    selector = harness.make_selector("question", 0.7)
    real_select = selector.select
    selector.select = lambda kv: kept_sets.append(set(real_select(kv).tolist())) or real_select(kv)
    harness.evaluate(runner, [doc], selector, refs, ref_ids)
    assert len(kept_sets) == 2 and kept_sets[0] != kept_sets[1]
    assert all(len(s) == len(prefix) - int(0.7 * len(prefix)) for s in kept_sets)

    per_head = harness.evaluate(runner, [doc], harness.make_selector("v:keydiff,agg=perhead", 0.7), refs, ref_ids)
    shared = harness.evaluate(runner, [doc], harness.make_selector("keydiff", 0.7), refs, ref_ids)
    assert per_head["kept_share"] == pytest.approx(shared["kept_share"]) and per_head["n"] == 2

    calls = []
    once = harness.make_selector("keydiff", 0.7)
    real_once = once.select
    once.select = lambda kv: calls.append(1) or real_once(kv)
    harness.evaluate(runner, [doc], once, refs, ref_ids)
    assert len(calls) == 1


def test_per_head_selection_keeps_each_heads_own_tokens_and_take_gathers_them(harness):
    """``agg=perhead``: every (layer, KV head) keeps its own best tokens, ascending, the same
    number each; ``take`` gives each (layer, head) exactly its kept tokens' K."""
    from evicpress_sglang.codecs.drop import ContextKV

    layers, tokens, heads, d = 2, 80, 3, 8
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(layers, tokens, heads, d, generator=g) + 5, torch.randn(layers, tokens, heads, d, generator=g)
    own = {(l, h): [3 + 7 * l + 2 * h, 41 + 5 * h + l] for l in range(layers) for h in range(heads)}
    for (l, h), picked in own.items():
        k[l, picked, h] = 0.01  # the smallest key norms of that (layer, head) alone: knorm keeps them
    selector = harness.make_selector("v:knorm,agg=perhead,recent=0", 0.9)
    idx = selector.select(ContextKV.of(k, v, torch.arange(tokens)))
    assert idx.shape == (layers, selector.kept(tokens), heads) == (layers, 8, heads)
    assert (idx.diff(dim=1) > 0).all()
    for (l, h), picked in own.items():
        assert set(picked) <= set(idx[l, :, h].tolist())
    taken = harness.take(k, idx)
    for l, j, h in [(0, 0, 0), (1, 7, 2), (0, 3, 1)]:
        assert torch.equal(taken[l, j, h], k[l, idx[l, j, h], h])
    shared = harness.make_selector("knorm", 0.9).select(ContextKV.of(k, v, torch.arange(tokens)))
    assert shared.dim() == 1 and torch.equal(harness.take(k, shared), k[:, shared])
