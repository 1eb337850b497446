"""Held-out queries per context (the first part of the quality profiler, issue 5)."""

import math
from array import array
from collections import Counter

import pytest

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.profiler import AnswerSimilarity, HeldOutQueries, teacher_forced, token_f1
from evicpress_sglang.settings import Settings, SettingsError, from_mapping
from harness import make_params, serve
from sglang.srt.mem_cache.radix_cache import RadixKey


def test_reservoir_keeps_a_uniform_sample_of_k():
    kept = Counter()
    trials = 3000
    for seed in range(trials):
        r = HeldOutQueries(k=3, seed=seed)
        for q in range(10):
            r.offer("doc", [q, 100 + q])
        assert len(r.queries("doc")) == 3 and r.seen("doc") == 10
        kept.update(int(q[0]) for q in r.queries("doc"))
    for q in range(10):  # each query kept with probability 3/10
        assert abs(kept[q] / trials - 0.3) < 0.04, (q, kept[q])


def test_reservoir_limits_length_and_forgets():
    r = HeldOutQueries(k=2, max_tokens=4)
    r.offer("a", list(range(10)))
    r.offer("a", [])
    assert r.queries("a") == [array("q", [0, 1, 2, 3])] and r.seen("a") == 1
    r.forget("a")
    assert r.queries("a") == [] and len(r) == 0
    none = HeldOutQueries(k=0)
    none.offer("a", [1])
    assert none.queries("a") == []
    with pytest.raises(ValueError):
        HeldOutQueries(k=-1)


def test_the_cache_keeps_what_requests_asked_after_a_reused_prefix(tmp_path):
    cache = EvicPressRadixCache(make_params(512), Settings(host_bytes=1 << 20, held_out_queries=2, status_top=5,
                                                           profile_min_tokens=8))
    doc = list(range(500, 600))
    serve(cache, doc + [1, 2, 3])  # nothing reused yet: no query recorded
    assert len(cache.queries) == 0
    serve(cache, doc + [7, 8])
    serve(cache, doc + [9])
    node = next(n for n in cache.root_node.children.values())
    assert len(node.key) == 100 and cache.queries.seen(node.id) == 2
    assert sorted(q.tolist() for q in cache.queries.queries(node.id)) == [[7, 8], [9]]
    top = {p["node"]: p["held_out_queries"] for p in cache.status()["placements"]}
    assert top[node.id] == 2
    cache.reset()
    assert len(cache.queries) == 0


def test_questions_that_split_below_a_document_are_held_out_queries_of_the_document():
    """The few words questions share make a node below the document that the profiler never
    measures (fewer than profile_min_tokens): it holds no queries, the document holds them all."""
    cache = EvicPressRadixCache(make_params(512), Settings(host_bytes=1 << 20, held_out_queries=8,
                                                           profile_min_tokens=8))
    doc, what = list(range(500, 600)), [71, 72]  # "Question: What" shared by two of the questions
    for q in ([1], what + [3], what + [4], [5, 6]):
        serve(cache, doc + q)
    node = next(n for n in cache.root_node.children.values())
    below = node.children[what[0]]
    assert len(node.key) == 100 and len(below.key) == 2  # the shared words made a node below the document
    assert sorted(q.tolist() for q in cache.queries.queries(node.id)) == [[5, 6], what + [3], what + [4]]
    assert cache.queries.queries(below.id) == [] and cache.queries.seen(below.id) == 0
    placements = {p["node"]: p["held_out_queries"] for p in cache.status()["placements"]}
    assert placements[node.id] == 3 and placements.get(below.id, 0) == 0


def test_a_split_gives_the_head_the_queries_asked_after_the_whole_node():
    """A node that holds queries and is split (a later prompt shares only its start) passes them
    to the new head behind the tail's tokens; a tail too short to be profiled keeps none, a long
    one keeps its own. Without this the document starts again from no queries at every split."""
    cache = EvicPressRadixCache(make_params(1024), Settings(host_bytes=1 << 20, held_out_queries=8,
                                                           profile_min_tokens=16))
    doc, head_words = list(range(500, 600)), [71, 72, 73]  # "Question: What is" in the first questions
    serve(cache, doc + head_words + [1])
    serve(cache, doc + head_words + [2])  # splits at doc + head_words: that node holds [2]
    serve(cache, doc + head_words + [3])
    node = cache._find_exact(RadixKey(array("q", doc + head_words)))
    assert sorted(q.tolist() for q in cache.queries.queries(node.id)) == [[2], [3]]
    serve(cache, doc + [9, 9])  # "Question: How": splits off the 3 words, which are too short to hold queries
    top = cache._find_exact(RadixKey(array("q", doc)))
    assert node.parent is top and len(node.key) == 3 and cache.queries.queries(node.id) == []
    assert sorted(q.tolist() for q in cache.queries.queries(top.id)) == [[9, 9], head_words + [2], head_words + [3]]
    assert cache.queries.seen(top.id) == 3

    long_tail = list(range(2000, 2040))  # a tail long enough to be a context of its own keeps its queries
    serve(cache, doc + long_tail + [1])
    serve(cache, doc + long_tail + [4])
    serve(cache, doc + long_tail + [5])
    tail = cache._find_exact(RadixKey(array("q", doc + long_tail)))
    serve(cache, doc + long_tail[:20] + [6])  # splits the tail: its second half (20 tokens) still holds queries
    mid = cache._find_exact(RadixKey(array("q", doc + long_tail[:20])))
    assert tail.parent is mid and len(tail.key) == 20
    assert sorted(q.tolist() for q in cache.queries.queries(tail.id)) == [[4], [5]]
    assert sorted(q.tolist() for q in cache.queries.queries(mid.id)) == [[6], long_tail[20:] + [4], long_tail[20:] + [5]]
    assert cache.audit() == [] and cache.health.internal_errors == 0


def test_a_split_keeps_the_count_of_queries_asked_so_later_ones_are_sampled_fairly():
    cache = EvicPressRadixCache(make_params(2048), Settings(host_bytes=1 << 20, held_out_queries=2,
                                                            profile_min_tokens=16))
    doc, tail = list(range(500, 600)), list(range(2000, 2040))
    for q in range(1, 8):
        serve(cache, doc + tail + [q])  # the first caches, six are asked after the whole node
    serve(cache, doc + tail[:20] + [99])  # splits it: all seven were asked after the head
    head = cache._find_exact(RadixKey(array("q", doc + tail[:20])))
    assert cache.queries.seen(head.id) == 7 and len(cache.queries.queries(head.id)) == 2


def test_a_split_under_bigram_keys_puts_each_token_once_in_front_of_the_queries():
    """EAGLE's bigram keys hold one raw token more than their length; the head's queries get the
    tail's tokens once, as a request that reused the head would have asked them."""
    params = make_params(1024)
    params.is_eagle = True
    cache = EvicPressRadixCache(params, Settings(host_bytes=1 << 20, held_out_queries=8, profile_min_tokens=2))
    doc, words = list(range(500, 600)), [71, 72, 73]
    for q in ([1], [2], [3]):
        serve(cache, doc + words + q)
    serve(cache, doc + [9, 9])  # splits below the document
    top = next(iter(cache.root_node.children.values()))
    # a bigram context's queries start at its last token (so _count_hit offers [599, 9, 9]);
    # the split's are the same shape, without 73 twice
    assert sorted(q.tolist() for q in cache.queries.queries(top.id)) == sorted([
        [doc[-1], *words, 2], [doc[-1], *words, 3], [doc[-1], 9, 9]])


def test_reservoirs_merge_into_a_uniform_sample_of_both():
    from_a = 0
    trials = 3000
    for seed in range(trials):
        r = HeldOutQueries(k=2, seed=seed)
        for q in (0, 1):
            r.offer("doc", [q])
        r.merge("doc", [[100], [101]], seen=8)  # a sample of 2 of the 8 asked below
        kept = [int(q[0]) for q in r.queries("doc")]
        assert len(kept) == 2 and r.seen("doc") == 10
        from_a += sum(q < 100 for q in kept)
    assert abs(from_a / trials - 2 * 2 / 10) < 0.05  # each of the 10 queries kept with probability 2/10


def test_a_context_above_is_offered_the_query_only_when_it_fits_a_held_out_query():
    """A shared system prompt above documents longer than a held-out query would collect
    document heads, not questions (review)."""
    cache = EvicPressRadixCache(make_params(4096), Settings(host_bytes=1 << 20, held_out_queries=8))
    system, d1, d2 = list(range(100, 300)), list(range(5000, 5600)), list(range(7000, 7600))
    for prompt in (system + d1 + [1, 2], system + d2 + [3, 4], system + d1 + [5, 6]):
        serve(cache, prompt)
    top = cache._find_exact(RadixKey(array("q", system)))
    doc = cache._find_exact(RadixKey(array("q", system + d1)))
    assert [q.tolist() for q in cache.queries.queries(doc.id)] == [[5, 6]]
    # the system prompt keeps what it was the deepest reuse of (the second request: its head),
    # not the third request's document, which it only lies above
    assert cache.queries.seen(top.id) == 1 and cache.queries.queries(top.id)[0].tolist() == d2[:512]


def test_the_similarity_model_is_built_once_when_queries_are_scored_together(monkeypatch):
    import threading
    import time

    from evicpress_sglang.profiler import scores
    from evicpress_sglang.profiler.client import Answer
    from evicpress_sglang.profiler.runner import Profiler

    built = []

    class SlowSimilarity:
        def __init__(self):
            built.append(threading.get_ident())
            time.sleep(0.2)

        def __call__(self, a, b):
            return 1.0 if a == b else 0.5

    class Client:
        def answer(self, ids, namespace, n):
            return Answer(f"answer {ids[-1]} {namespace[-1] == '0'}", [1])

    monkeypatch.setattr(scores, "AnswerSimilarity", SlowSimilarity)
    job = {"prefix": [1, 2], "queries": [[q] for q in range(8)], "codecs": ["bf16", "int8"], "namespaces": ["n0", "n1"]}
    out = Profiler(Client()).measure(job, scores=("similarity",))
    assert len(built) == 1 and out == {1: {"similarity": 0.5}}


def test_held_out_queries_setting_is_validated():
    with pytest.raises(SettingsError, match="held_out_queries"):
        from_mapping({"held_out_queries": -1})


def test_token_f1():
    assert token_f1("The code is 12345.", "the code is 12345") == 1.0
    assert token_f1("a b", "c d") == 0.0
    assert token_f1("a b c d", "a b") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0


def test_teacher_forced_scores():
    s = teacher_forced([math.log(0.5), math.log(0.5)], [7, 9], [7, 8])
    assert s["likelihood"] == pytest.approx(0.5) and s["top1_agreement"] == 0.5
    assert teacher_forced([], [], []) == {"likelihood": 1.0, "top1_agreement": 1.0}
    with pytest.raises(ValueError):
        teacher_forced([0.0], [], [1])


@pytest.fixture(scope="module")
def similarity():
    return AnswerSimilarity()  # all-MiniLM-L6-v2 from PyPI, cached after the first run


def test_minilm_similarity_sees_paraphrase_and_difference(similarity):
    ref = "The meeting was moved to Friday afternoon."
    assert similarity(ref, ref) == pytest.approx(1.0, abs=1e-5)
    para = similarity("They rescheduled the meeting for Friday afternoon.", ref)
    other = similarity("Python lists are mutable sequences.", ref)
    assert para > 0.6 and other < 0.3 and para > other + 0.4
    assert similarity("", "") == 1.0


def test_calibration_keeps_only_the_variants_the_server_accepted():
    """Under memory pressure a copy can fail to stage; the server's report says which
    variants a request ran on without their copy, and the calibration drops their rows."""
    from types import SimpleNamespace

    from evicpress_sglang.bench.calibration import _calibrate
    from evicpress_sglang.bench.workload import docqa_prompt

    text = "a document of some length about things"
    tok = lambda s: SimpleNamespace(input_ids=[ord(c) for c in s])  # noqa: E731
    prefix = tok(docqa_prompt(text, "x")).input_ids[: len(text) + 12]
    job = {"job": 7, "node": 3, "prefix": prefix, "queries": [[1], [2]], "codecs": ["bf16", "int8", "int2"]}
    reported = []

    class Client:
        def jobs(self, node):
            return {"jobs": [job]}

        def report(self, job_id, quality, queries):
            reported.append((job_id, quality, queries))
            return {"accepted": True, "measured": {"int8": quality[1]}, "discarded": ["int2"],
                    "reason": "variant 2 (int2) partly matched: 0 of 50 tokens"}

    def measure(job, queries=None, scores=None, details=None):
        details += [{"variant": v, "codec": job["codecs"][v], "query": 0} for v in (1, 2)]
        return {1: {"top1": 0.9, "likelihood": 0.8, "f1": 0.7}, 2: {"top1": 0.4, "likelihood": 0.3, "f1": 0.2}}

    profiler = SimpleNamespace(client=Client(), measure=measure)
    args = SimpleNamespace(held_out=1)
    rows, details = _calibrate(profiler, 3, [text], [tok(docqa_prompt(text, "x")).input_ids],
                               [["q0", "q1", "what else"]], tok, args)
    assert [r["codec"] for r in rows] == ["int8"] and {d["codec"] for d in details} == {"int8"}
    assert rows[0]["predicted"]["top1"] == 0.9 and rows[0]["fresh"] == 1
    assert reported == [(7, {1: 0.9, 2: 0.4}, 2)]


@pytest.mark.parametrize("bad", ["0", "-0.25", "1.5", "nan", "a quarter"])
def test_calibration_pool_share_is_checked(bad, capsys):
    from evicpress_sglang.bench.calibration import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--pool-share", bad])
    assert "expected a share in (0, 1]" in capsys.readouterr().err
    assert build_parser().parse_args(["--pool-share", "0.25"]).pool_share == 0.25


def test_calibration_maths_rank_correlation_and_summary():
    from evicpress_sglang.bench.calibration import spearman, summarise

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)  # ties share ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rows = [{"codec": c, "predicted": {"top1": p}, "actual": {"top1": a, "f1": a}}
            for c, p, a in (("int4", 0.9, 0.8), ("int2", 0.5, 0.4), ("int4", 0.95, 0.9))]
    s = summarise(rows)
    assert s["pairs"] == 3 and s["spearman"] == {"top1->top1": pytest.approx(1.0)}
    assert s["per_codec"]["int4"]["actual_top1"] == pytest.approx(0.85)


class TransformersClient:
    """The profiler's server, played by SmolLM2 through transformers: a namespace's KV is
    the prefix's real KV after encode -> decode with that variant's codec."""

    def __init__(self, model_dir, prefix: list[int], codecs: list[str]):
        import torch

        from evicpress_sglang.codecs import get_codec
        from evicpress_sglang.kv_sample import kv_of_ids, load_causal_lm

        self.model, self.tok = load_causal_lm(str(model_dir))
        self.prefix = prefix
        k, v = kv_of_ids(self.model, torch.tensor(prefix))
        self.kv = {}
        for i, name in enumerate(codecs):
            codec = get_codec(name)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            codec.decode(codec.encode(k, v), dk, dv)
            self.kv[f"ns{i}"] = (dk, dv)

    def _logits(self, ids: list[int], namespace: str):
        import torch
        from transformers import DynamicCache

        k, v = self.kv[namespace]
        past = DynamicCache()
        for layer in range(k.shape[0]):
            past.update(k[layer].transpose(0, 1)[None], v[layer].transpose(0, 1)[None], layer)
        rest = torch.tensor([ids[len(self.prefix):]])
        with torch.no_grad():
            out = self.model(rest, past_key_values=past, use_cache=True)
        return out.logits[0].float(), out.past_key_values

    def answer(self, ids, namespace, max_new_tokens):
        import torch

        from evicpress_sglang.profiler.client import Answer

        logits, past = self._logits(ids, namespace)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            with torch.no_grad():
                step = self.model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            logits, past = step.logits[0].float(), step.past_key_values
        return Answer(self.tok.decode(out), out)

    def teacher_forced(self, ids, reference, namespace):
        from evicpress_sglang.profiler.client import TeacherForced

        logits, _ = self._logits(ids + reference, namespace)
        n = len(reference)
        logp = logits[-n - 1:-1].log_softmax(-1)
        return TeacherForced([float(logp[j, t]) for j, t in enumerate(reference)],
                             [int(x) for x in logp.argmax(-1)])


def test_profiler_scores_on_the_real_model_rank_codecs(smollm2_dir):
    """SmolLM2 through transformers: the exact variant scores 1.0 on every score, and the
    coarse 2-bit KV scores below 8-bit on the teacher-forced scores."""
    from evicpress_sglang.kv_sample import load_causal_lm
    from evicpress_sglang.profiler.runner import Profiler
    from evicpress_sglang.sample_text import sample_text

    _, tok = load_causal_lm(str(smollm2_dir))
    prefix = tok(sample_text(2000)).input_ids[:300]
    queries = [tok("\n\nQuestion: What is the text above about?\nAnswer:").input_ids,
               tok("\n\nQuestion: Name one function the text describes.\nAnswer:").input_ids]
    codecs = ["bf16", "int8", "int2", "bf16"]
    job = {"job": 1, "node": 1, "prefix": prefix, "queries": queries, "codecs": codecs,
           "namespaces": [f"ns{i}" for i in range(len(codecs))]}
    profiler = Profiler(TransformersClient(smollm2_dir, prefix, codecs), answer_tokens=12)
    scores = profiler.measure(job, scores=("top1", "likelihood", "f1"))
    assert scores[3] == {"top1": 1.0, "likelihood": 1.0, "f1": 1.0}
    int8, int2 = scores[1], scores[2]
    assert int2["likelihood"] < int8["likelihood"] and int2["top1"] <= int8["top1"]
    assert int8["likelihood"] > 0.99 and 0.0 <= int2["likelihood"] < int8["likelihood"] - 0.01
