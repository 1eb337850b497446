"""What the profiler learnt about a context outlives its node (issue 21): a context dropped
under pressure and recomputed later gets back its held-out queries and measured qualities."""

from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.backend.memory import ContextMemory, Learnt
from evicpress_sglang.backend.profile_job import Record
from evicpress_sglang.settings import Settings
from harness import make_params, serve

DOC = list(range(100, 160))


def _node_of(cache, tokens):
    node = cache.root_node
    while tokens:
        node = node.children[tokens[0]]
        tokens = tokens[len(node.key):]
    return node


def test_a_dropped_context_gets_its_profile_and_queries_back_when_recomputed():
    cache = EvicPressRadixCache(make_params(512), Settings(policy="lru", host_bytes=0, held_out_queries=2,
                                                           profile_min_tokens=8))
    for tail in ([1, 2, 3], [4, 5, 6], [9, 9, 9]):  # DOC splits off as a context asked twice after
        serve(cache, DOC + tail)
    doc = _node_of(cache, DOC)
    assert len(cache.queries.queries(doc.id)) == 2
    cache.profiling.restore(doc.id, Record(when=1.0, queries=2, quality={"int4": 0.61}))
    row = cache.table.row_of[doc.id]
    int4 = [c.codec for c in cache.table.configs].index("int4")
    assert abs(cache.table.quality[row, int4] - 0.61) < 1e-9

    cache.evict(EvictParams(num_tokens=10**6))  # lru: everything is dropped
    assert doc.id not in cache.table and cache.profiling.measured(doc.id) is None and len(cache.memory) >= 1

    serve(cache, DOC + [7])  # recomputed: the same context comes back as a new node
    serve(cache, DOC + [8])
    back = _node_of(cache, DOC)
    assert back.id != doc.id
    assert cache.profiling.measured(back.id) == {"int4": 0.61}
    assert abs(cache.table.quality[cache.table.row_of[back.id], int4] - 0.61) < 1e-9
    assert len(cache.queries.queries(back.id)) == 2 and cache.memory.recalled == 1
    assert cache.audit() == [] and cache.health.internal_errors == 0


def test_a_context_that_comes_back_as_a_few_words_passes_its_queries_to_the_document():
    """A dropped context is remembered by the hash of its path; it can come back as a node too
    short to hold queries (a split below the document ends where it ended): what it learnt goes
    to the document, behind those words, and its profile record (of other KV) is not restored."""
    words = [71, 72, 73]
    cache = EvicPressRadixCache(make_params(512), Settings(policy="lru", host_bytes=0, held_out_queries=4,
                                                           profile_min_tokens=8))
    for q in ([1], [2], [3]):
        serve(cache, DOC + words + q)
    first = _node_of(cache, DOC + words)
    cache.profiling.restore(first.id, Record(when=1.0, queries=2, quality={"int4": 0.5}))
    assert sorted(q.tolist() for q in cache.queries.queries(first.id)) == [[2], [3]]
    cache.evict(EvictParams(num_tokens=10**6))
    serve(cache, DOC + [9, 9])
    serve(cache, DOC + [8, 8])  # DOC is a context of its own now
    serve(cache, DOC + words + [4])
    serve(cache, DOC + words + [5])  # splits at DOC + words: a 3-token node ending where `first` ended
    short, doc = _node_of(cache, DOC + words), _node_of(cache, DOC)
    assert len(short.key) == 3 and cache.queries.queries(short.id) == [] and cache.profiling.measured(short.id) is None
    assert sorted(q.tolist() for q in cache.queries.queries(doc.id)) == [words + [2], words + [3], words + [4], words + [5]]
    assert cache.audit() == [] and cache.health.internal_errors == 0


def test_memory_is_bounded_and_hands_a_context_back_once():
    memory = ContextMemory(capacity=2)
    for key in "abc":
        memory.keep(key, Learnt([], 1, None))
    assert len(memory) == 2 and memory.recall("a") is None  # the oldest went first
    assert memory.recall("c") is not None and memory.recall("c") is None
