"""Serving from token-dropped contexts: kept slots, shifted positions, whole-node use,
with real SGLang pools on CPU (the GPU run is in bench/results/)."""

from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from evicpress_sglang.backend import dropped
from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.settings import Settings, SettingsError
from harness import FakeReq, expected_kv, free_slots_accounted, make_params, serve

TOKEN_BYTES = 2 * 4 * 2 * 64 * 2


def _cache(tmp_path, policy="static:keydiff:0.5", pool=256, page_size=1, **kw):
    s = Settings(**({"policy": policy, "host_bytes": 400 * TOKEN_BYTES, "disk_dir": str(tmp_path / "disk"),
                     "disk_bytes": 10**8, "host_codecs": ["bf16", "keydiff:0.5"],
                     "disk_codecs": ["keydiff:0.5+zstd"]} | kw))
    return EvicPressRadixCache(make_params(pool, page_size), s)


def _docs(n, length=100):
    return [list(range(1000 * i, 1000 * i + length)) for i in range(n)]


def _ran_with(r, tokens):
    """The request's KV is the true KV of the positions its slots stand for."""
    k, v = expected_kv(tokens)
    return torch.equal(r.k, k[:, r.positions]) and torch.equal(r.v, v[:, r.positions])


def _dropped_nodes(cache):
    out, stack = [], [cache.root_node]
    while stack:
        for c in stack.pop().children.values():
            stack.append(c)
            if getattr(c, "evp_kept", None) is not None:
                out.append(c)
    return out


def _evict_doc0(cache, docs):
    for doc in docs:
        serve(cache, doc + [1])
    assert cache.stats.stores.get("host:keydiff:0.5", 0) >= 1


def _keydiff_scores_by_position(monkeypatch, latest_first: bool) -> None:
    """keydiff ranks a context's tokens by position alone (the later the better, or the earlier),
    so which slots a dropped node keeps is known (its always-kept ends still apply)."""
    from evicpress_sglang.codecs.drop import KeyDiffSelector

    sign = 1.0 if latest_first else -1.0
    monkeypatch.setattr(KeyDiffSelector, "score",
                        lambda self, kv: sign * torch.arange(kv.shape.tokens, device=kv.device, dtype=torch.float32))


def _doc0_dropped_on_gpu(tmp_path, **settings):
    """A cache whose first document came back from host memory as a dropped node."""
    cache = _cache(tmp_path, **settings)
    docs = _docs(3)
    _evict_doc0(cache, docs)
    serve(cache, docs[0] + [1, 7])
    (node,) = _dropped_nodes(cache)
    return cache, docs, node


def test_loaded_dropped_context_serves_kept_slots_at_original_positions(tmp_path):
    cache = _cache(tmp_path)
    docs = _docs(3)
    _evict_doc0(cache, docs)
    r = serve(cache, docs[0] + [1, 7])
    assert r.loaded == 51 and r.reused == 51 and r.offset == 50  # 101 tokens, half dropped
    assert r.positions[-1] == 101 and _ran_with(r, docs[0] + [1, 7])
    assert free_slots_accounted(cache)
    (node,) = _dropped_nodes(cache)
    assert len(node.key) == 101 and len(node.value) == 51

    again = serve(cache, docs[0] + [1, 8])  # now a GPU hit on the dropped node
    assert again.loaded == 0 and again.reused == 51 and again.offset == 50 and _ran_with(again, docs[0] + [1, 8])
    longer = serve(cache, docs[0] + [1, 7, 9])  # reuses the continuation cached under it
    assert longer.reused == 52 and longer.offset == 50 and _ran_with(longer, docs[0] + [1, 7, 9])
    assert free_slots_accounted(cache)


def test_a_dropped_node_splits_at_its_kept_positions(tmp_path):
    cache, docs, node = _doc0_dropped_on_gpu(tmp_path)
    below = int((node.evp_kept < 60).sum())
    r = serve(cache, docs[0][:60] + [5555])  # diverges inside the dropped context: reuses its first 60 tokens
    assert r.reused == below and r.offset == 60 - below and _ran_with(r, docs[0][:60] + [5555])
    head = next(n for n in _dropped_nodes(cache) if n.parent is cache.root_node)
    assert len(head.key) == 60 and len(head.value) == below
    again = serve(cache, docs[0] + [1, 7, 8])  # the whole context, now two dropped nodes, still lines up
    assert again.reused == 52 and again.offset == 50 and _ran_with(again, docs[0] + [1, 7, 8])
    assert free_slots_accounted(cache)


def test_a_placeholder_loaded_in_part_is_split_after_loading(tmp_path):
    cache = _cache(tmp_path)
    docs = _docs(3)
    _evict_doc0(cache, docs)
    r = serve(cache, docs[0][:70] + [4242])
    assert 0 < r.loaded < 51 and r.offset == 70 - r.loaded and _ran_with(r, docs[0][:70] + [4242])
    assert free_slots_accounted(cache)


def test_an_unsplittable_dropped_node_blocks_the_insert_in_use_and_unused_keeps_its_rest(tmp_path, monkeypatch):
    cache, docs, node = _doc0_dropped_on_gpu(tmp_path)
    monkeypatch.setattr(EvicPressRadixCache, "_splittable", lambda self, n, s: getattr(n, "evp_kept", None) is None)
    rest_slots = int((node.evp_kept >= 60).sum())
    cache.inc_lock_ref(node)  # another request runs on it: the insert stops in front of it
    r = serve(cache, docs[0][:60] + [5555])
    assert r.reused == 0 and _ran_with(r, docs[0][:60] + [5555]) and _dropped_nodes(cache) == [node]
    cache.dec_lock_ref(node)
    assert free_slots_accounted(cache)
    r = serve(cache, docs[0][:60] + [5555])  # unused now: its head takes the exact KV, its rest stays dropped
    assert r.reused == 0 and _dropped_nodes(cache) == [node] and free_slots_accounted(cache)
    head = node.parent
    assert head.parent is cache.root_node and len(head.key) == len(head.value) == 60
    assert len(node.key) == 41 and len(node.value) == rest_slots
    assert serve(cache, docs[0][:60] + [5556]).reused == 60
    whole = serve(cache, docs[0] + [1, 9])
    assert whole.reused == 60 + rest_slots and whole.offset == 41 - rest_slots and _ran_with(whole, docs[0] + [1, 9])
    assert free_slots_accounted(cache)


def test_an_unused_dropped_node_whose_rest_keeps_no_slot_gives_way(tmp_path, monkeypatch):
    """Kept only before where a prompt leaves it, a dropped node has nothing worth keeping after
    that point: the prompt's exact KV replaces it."""
    from evicpress_sglang.codecs.drop import ScoredSelector

    _keydiff_scores_by_position(monkeypatch, latest_first=False)
    monkeypatch.setattr(ScoredSelector, "RECENT", 0)
    cache, docs, node = _doc0_dropped_on_gpu(tmp_path)
    assert int(node.evp_kept.max()) < 60
    r = serve(cache, docs[0][:60] + [5555])
    assert _ran_with(r, docs[0][:60] + [5555]) and _dropped_nodes(cache) == [] and free_slots_accounted(cache)
    assert serve(cache, docs[0][:60] + [5556]).reused == 60


def test_a_split_off_part_of_a_dropped_node_keeps_its_rest_when_a_later_prompt_leaves_it_early(tmp_path, monkeypatch):
    """The part of a dropped node after a split need not keep its own first token, so a prompt that
    leaves it a few tokens in cannot split it when matched; at insert that prompt's exact KV becomes
    the head and the rest of the context stays cached. Before, the rest of the document was lost."""
    _keydiff_scores_by_position(monkeypatch, latest_first=True)
    cache, docs, node = _doc0_dropped_on_gpu(tmp_path, verify=True)  # keeps token 0 and the last 50 of 101
    assert node.evp_kept.tolist() == [0, *range(51, 101)]
    serve(cache, docs[0][:3] + [4242])  # splits it after 3 tokens: the rest keeps none of its first 48
    r = serve(cache, docs[0][:10] + [4343])  # leaves the rest 7 tokens in, where it cannot be split
    assert r.reused == 1 and _ran_with(r, docs[0][:10] + [4343])
    again = serve(cache, docs[0] + [1, 8])
    assert again.reused == 1 + 7 + 50 and again.offset == 101 - 58 and _ran_with(again, docs[0] + [1, 8])
    assert free_slots_accounted(cache)
    cache.evict(EvictParams(num_tokens=10_000))  # the head's reference is its exact KV, not the dropped slots'
    assert cache.stats.verify_mismatches == 0


@pytest.mark.parametrize("policy", ["static:keydiff:0.5", "static:bf16"])
def test_evicting_a_dropped_node_again_keeps_its_tokens_and_positions(tmp_path, policy):
    cache, docs, node = _doc0_dropped_on_gpu(tmp_path)
    first = set((node.evp_kept).tolist())
    cache.set_policy(policy)
    for i, doc in enumerate(docs[1:] + _docs(5)[3:]):
        serve(cache, doc + [2, i])
    assert node.evicted and node.evp.codec == "keep+bf16"  # stored again from its kept slots, not dropped twice
    r = serve(cache, docs[0] + [1, 7, 3])
    assert r.loaded == 52 and r.offset == 50 and _ran_with(r, docs[0] + [1, 7, 3])
    assert set(node.evp_kept.tolist()) == first and free_slots_accounted(cache)


def test_dropped_blobs_on_disk_survive_a_restart(tmp_path):
    kw = dict(host_codecs=["keydiff:0.5"], disk_codecs=["keydiff:0.5"], host_bytes=60 * TOKEN_BYTES)
    cache = _cache(tmp_path, **kw)
    docs = _docs(4)
    for doc in docs:
        serve(cache, doc + [1])
    assert cache.stats.stores.get("disk:keep+bf16", 0) >= 1  # moved down as the subset it already is
    cache.tiers[next(t for t in cache.tiers if t.label == "disk")].flush()
    fresh = _cache(tmp_path, **kw)
    r = serve(fresh, docs[0] + [1, 7])
    assert r.loaded == 51 and r.offset == 50 and _ran_with(r, docs[0] + [1, 7])


def test_chunked_prefill_over_a_dropped_context(tmp_path):
    cache, docs, _ = _doc0_dropped_on_gpu(tmp_path)
    tokens = docs[0] + [1] + list(range(50, 70))
    req = FakeReq(array("q", tokens))
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=req))
    assert req.evp_pos_offset == 50 and len(req.origin_input_ids) == len(tokens) - 50
    cache.inc_lock_ref(m.last_device_node)
    req.last_node, req.cache_protected_len = m.last_device_node, len(m.device_indices)
    chunk = len(m.device_indices) + 8  # the first chunk computes 8 of the 20 new tokens
    slots = _alloc(cache, 8)
    row = cache.req_to_token_pool.req_to_token[req.req_pool_idx]
    row[:chunk] = torch.cat([m.device_indices, slots]).to(torch.int32)
    req.get_fill_ids = lambda: req.full_untruncated_fill_ids[:chunk]
    cache.cache_unfinished_req(req, chunked=True)
    assert len(req.prefix_indices) == chunk and req.cache_protected_len == chunk
    assert torch.equal(req.prefix_indices[-8:], slots)  # the tree took the chunk's slots as they are
    assert req.last_node.parent is m.last_device_node and len(req.last_node.key) == 8
    probe = FakeReq(array("q", tokens[:109] + [4242]))
    hit = cache.match_prefix(MatchPrefixParams(key=RadixKey(probe.origin_input_ids), req=probe))
    assert len(hit.device_indices) == 51 + 8 and probe.evp_pos_offset == 50
    rest = _alloc(cache, len(req.origin_input_ids) - chunk)
    row[chunk:len(req.origin_input_ids)] = rest.to(torch.int32)
    cache.cache_finished_req(req, kv_len_to_handle=len(req.origin_input_ids))
    assert free_slots_accounted(cache)


def test_a_request_reviving_a_dropped_context_frees_its_copies_of_the_gpu_nodes_below_it(tmp_path):
    """Matched before another request loaded the dropped context back and cached a continuation
    below it, a request recomputed both: the dropped node takes its exact KV, the continuation
    keeps its own slots, and the request's copies of those go back to the pool (they leaked)."""
    cache = _cache(tmp_path)
    docs = _docs(3)
    _evict_doc0(cache, docs)
    r = serve(cache, docs[0] + [1, 7, 9], load_back=False, between=lambda: serve(cache, docs[0] + [1, 7]))
    assert r.reused == 0 and _ran_with(r, docs[0] + [1, 7, 9])
    assert _dropped_nodes(cache) == [] and free_slots_accounted(cache)
    again = serve(cache, docs[0] + [1, 7, 9, 4])
    assert again.reused == 103 and again.offset == 0 and _ran_with(again, docs[0] + [1, 7, 9, 4])


def test_chunked_prefill_that_recomputes_a_dropped_context_keeps_its_rest_and_every_slot(tmp_path, monkeypatch):
    """A long prompt prefilled in chunks, from scratch, over a dropped context with a continuation
    cached below it: each chunk that ends inside the dropped node makes its head exact and leaves
    the rest dropped; the last takes the rest over and leaves the continuation's slots to it."""
    _keydiff_scores_by_position(monkeypatch, latest_first=True)
    cache, docs, node = _doc0_dropped_on_gpu(tmp_path, verify=True)  # docs[0] + [1] dropped, [7] cached below
    tokens = docs[0] + [1, 7, 33]
    req = FakeReq(array("q", tokens))
    req.last_node = cache.root_node
    cache.inc_lock_ref(cache.root_node)
    slots = _alloc(cache, len(tokens))
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    k, v = expected_kv(tokens)
    for layer in range(k.shape[0]):
        pool.k_buffer[layer][slots] = k[layer]
        pool.v_buffer[layer][slots] = v[layer]
    cache.req_to_token_pool.req_to_token[req.req_pool_idx, : len(tokens)] = slots.to(torch.int32)
    for end, rest in ((20, 81), (70, 31)):
        req.get_fill_ids = lambda end=end: tokens[:end]
        cache.cache_unfinished_req(req, chunked=True)
        assert req.cache_protected_len == end and [len(n.key) for n in _dropped_nodes(cache)] == [rest]
    cache.cache_finished_req(req, kv_len_to_handle=len(tokens))
    assert _dropped_nodes(cache) == [] and free_slots_accounted(cache)
    again = serve(cache, docs[0] + [1, 7, 33, 5])
    assert again.reused == 103 and _ran_with(again, docs[0] + [1, 7, 33, 5])
    cache.evict(EvictParams(num_tokens=10_000))
    assert cache.stats.verify_mismatches == 0


def test_a_request_gets_its_logical_tokens_back_when_the_dropped_node_is_gone(tmp_path):
    cache, docs, _ = _doc0_dropped_on_gpu(tmp_path)
    tokens = array("q", docs[0] + [1, 5])
    req = FakeReq(array("q", tokens))
    cache.match_prefix(MatchPrefixParams(key=RadixKey(req.origin_input_ids), req=req))
    assert req.evp_pos_offset == 50
    cache.reset()  # the dropped node goes away before the request is scheduled
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(req.origin_input_ids), req=req))
    assert req.origin_input_ids == tokens and req.evp_pos_offset == 0 and len(m.device_indices) == 0


def _alloc(cache, n):
    alloc = cache.token_to_kv_pool_allocator
    if alloc.available_size() < n:
        cache.evict(EvictParams(num_tokens=n - alloc.available_size()))
    return alloc.alloc(n)


def _fb(mode, positions, extend_seq_lens=None):
    return SimpleNamespace(forward_mode=mode, positions=torch.tensor(positions),
                           extend_seq_lens=None if extend_seq_lens is None else torch.tensor(extend_seq_lens))


def test_positions_are_shifted_per_request_in_extend_and_decode(monkeypatch):
    batch = SimpleNamespace(reqs=[SimpleNamespace(evp_pos_offset=0), SimpleNamespace(evp_pos_offset=10),
                                  SimpleNamespace()])
    fb = _fb(ForwardMode.EXTEND, [0, 1, 2, 5, 6, 3], [3, 2, 1])
    dropped.shift_positions(fb, batch)
    assert fb.positions.tolist() == [0, 1, 2, 15, 16, 3]
    fb = _fb(ForwardMode.DECODE, [7, 9, 4])
    dropped.shift_positions(fb, batch)
    assert fb.positions.tolist() == [7, 19, 4]
    monkeypatch.setattr(dropped, "SHIFT", False)  # the deliberately broken variant
    fb = _fb(ForwardMode.DECODE, [7, 9, 4])
    dropped.shift_positions(fb, batch)
    assert fb.positions.tolist() == [7, 9, 4]


def test_dropping_codecs_need_page_size_one(tmp_path):
    with pytest.raises(SettingsError, match="page-size 1"):
        _cache(tmp_path, page_size=4)


@pytest.mark.parametrize("in_use", [False, True])
def test_a_request_that_computed_a_dropped_context_itself_never_misaligns(tmp_path, in_use):
    """Matched before another request loaded the dropped context, it recomputed all of
    it: its insert must not count the tree's fewer slots as duplicates of its own."""
    cache = _cache(tmp_path)
    docs = _docs(3)
    _evict_doc0(cache, docs)

    def load_it():
        serve(cache, docs[0] + [1, 7])
        if in_use:
            cache.inc_lock_ref(_dropped_nodes(cache)[0])

    r = serve(cache, docs[0] + [1, 9], load_back=False, between=load_it)
    assert r.reused == 0 and _ran_with(r, docs[0] + [1, 9]) and free_slots_accounted(cache)
    if in_use:  # left as it was, the request's own KV went back to the pool
        (node,) = _dropped_nodes(cache)
        cache.dec_lock_ref(node)
    else:  # the unused subset took the exact KV
        assert _dropped_nodes(cache) == []
    again = serve(cache, docs[0] + [1, 9, 4])
    assert _ran_with(again, docs[0] + [1, 9, 4]) and free_slots_accounted(cache)
    assert again.reused == (51 if in_use else 102)


def test_shift_positions_setting_must_be_a_boolean():
    from evicpress_sglang.settings import from_mapping

    with pytest.raises(SettingsError, match="shift_positions"):
        from_mapping({"shift_positions": "no"})
    assert from_mapping({"shift_positions": False}).shift_positions is False


def test_a_node_below_another_is_dropped_knowing_where_it_starts(tmp_path, monkeypatch):
    """The selector of a node that starts after a shared prefix is told that prefix's length
    (``ContextKV.start``): its keys carry RoPE from there (the query-aware selectors, issue 24)."""
    from evicpress_sglang.codecs.drop import DropCodec

    seen = []
    real_keep = DropCodec.keep

    def keep(self, shape, device, keys, values, positions=None, start=0):
        seen.append((shape.tokens, start))
        return real_keep(self, shape, device, keys, values, positions, start)

    monkeypatch.setattr(DropCodec, "keep", keep)
    cache = _cache(tmp_path)
    shared = list(range(5000, 5030))
    docs = [shared + list(range(1000 * i, 1000 * i + 70)) for i in range(2)] + _docs(3)[1:]
    for doc in docs:
        serve(cache, doc + [1])
    assert cache.stats.stores.get("host:keydiff:0.5", 0) >= 1
    # the per-document tails (70 + 1 tokens after the 30 shared ones) start at 30; a node at the root at 0
    assert (71, 30) in seen
    assert all(start == 0 for tokens, start in seen if tokens != 71)


def test_a_short_context_stored_under_a_dropping_codec_keeps_its_quantizers_quality(tmp_path):
    """Under MIN_TOKENS a dropping codec stores every token: the stored context's present quality
    is its quantizer's (bf16 here: exact), not the dropping codec's prior, and it serves exactly."""
    from evicpress_sglang.codecs.drop import TokenSelector
    from evicpress_sglang.policy.contexts import prior_quality

    cache = _cache(tmp_path, pool=128)
    short = TokenSelector.MIN_TOKENS - 4
    docs = _docs(6, length=short)
    for doc in docs:
        serve(cache, doc)
    stored = [n for n in cache.nodes.values() if getattr(n, "evp", None) is not None and n.evicted]
    assert stored and cache.stats.stores.get("host:keydiff:0.5", 0) >= 1
    t = cache.table
    for node in stored:
        r = t.row_of[node.id]
        assert t.present_quality[r] == 1.0 > prior_quality("keydiff:0.5")
    r = serve(cache, docs[0] + [3])
    k, v = expected_kv(docs[0] + [3])
    assert r.reused == short and torch.equal(r.k, k) and torch.equal(r.v, v)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_a_prompt_sharing_only_the_first_tokens_of_a_dropped_context_splits_it_and_keeps_the_rest(
        tmp_path, monkeypatch, on_gpu):
    """Every scored selection keeps its context's first token (and its last ones), so a dropped
    node splits wherever another prompt leaves it: one sharing only its first tokens (a title, a
    chat's first words) reuses those and leaves the rest cached. Before, a selector that scored the
    first token low left the node unsplittable there, and that prompt's own KV replaced the whole
    dropped context (bench/results/2026-12-02-selector-serving: documents lost to fillers that
    shared their first tokens)."""
    _keydiff_scores_by_position(monkeypatch, latest_first=True)
    cache = _cache(tmp_path)
    docs = _docs(3)
    _evict_doc0(cache, docs)
    if on_gpu:
        serve(cache, docs[0] + [1, 7])  # back on the GPU as a dropped node
    r = serve(cache, docs[0][:3] + [4242, 4243])
    assert r.reused >= 1 and _ran_with(r, docs[0][:3] + [4242, 4243])
    again = serve(cache, docs[0] + [1, 8])
    assert again.reused == 51 and again.offset == 50 and _ran_with(again, docs[0] + [1, 8])
    assert free_slots_accounted(cache)
