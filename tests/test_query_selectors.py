"""The query-aware dropping selectors (``expected``, ``kvzip``) on constructed inputs, and
through a real SGLang pool."""

from __future__ import annotations

import math

import pytest
import torch

from evicpress_sglang.codecs import CodecError, KVShape, get_codec, queries
from evicpress_sglang.codecs.drop import TokenSelector
from evicpress_sglang.codecs.queries import QueryModel, rope
from evicpress_sglang.policy import prior_quality
from harness import DIM, HEADS, LAYERS, assert_pool_entry_points_agree


def _model(layers=LAYERS, heads=HEADS, d=DIM, mean=None, bias=None, key_map=None, freq=0.0) -> QueryModel:
    zero = torch.zeros(layers, heads, d)
    return QueryModel(mean=zero if mean is None else mean.expand(layers, heads, d),
                      cov=torch.eye(d).expand(layers, heads, d, d) * 1e-3,
                      key_map=torch.zeros(layers, heads, d, d) if key_map is None else key_map,
                      key_bias=zero if bias is None else bias.expand(layers, heads, d),
                      inv_freq=torch.full((d // 2,), freq))


@pytest.fixture
def qmodel():
    def set_model(model: QueryModel) -> QueryModel:
        queries.use(model)
        return model
    yield set_model
    queries.use(None)


def _kv(tokens=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(LAYERS, tokens, HEADS, DIM, generator=g), torch.randn(LAYERS, tokens, HEADS, DIM, generator=g))


def _kept(name, k, v, positions=None):
    codec = get_codec(name)
    return codec.positions(codec.encode(k.to(torch.bfloat16), v.to(torch.bfloat16), positions=positions)).tolist()


def test_expected_keeps_what_the_mean_query_attends_to_and_drops_the_rest(qmodel, scores_only):
    u = torch.nn.functional.normalize(torch.randn(DIM), dim=0)
    qmodel(_model(mean=8 * u))
    k, v = _kv()
    loud, opposed = [5, 20, 44], [7, 30]
    k[:, loud] += 3 * u
    k[:, opposed] -= 3 * u
    kept = _kept("expected:0.9", k, v)
    assert len(kept) == 6 and set(loud) <= set(kept) and not set(opposed) & set(kept)


def test_expected_keeps_a_token_that_one_head_needs_even_if_the_others_do_not(qmodel, scores_only, monkeypatch):
    """Head 0's mean query points along u, the other heads' along w (orthogonal to it); the
    ``needed`` tokens' keys lie along u in head 0 and against w in the others: head 0 attends to
    them above all, the others less than to the rest. Averaged over heads they would score below
    the median and be dropped; taking each layer's best head keeps them."""
    from evicpress_sglang.codecs import drop

    heads, tokens, needed = 4, 60, [6, 25, 41]
    u, w = torch.eye(DIM)[0], torch.eye(DIM)[1]
    qmodel(_model(heads=heads, mean=torch.stack([8 * u] + [8 * w] * (heads - 1))))
    g = torch.Generator().manual_seed(5)
    k, v = 0.1 * torch.randn(LAYERS, tokens, heads, DIM, generator=g), torch.ones(LAYERS, tokens, heads, DIM)
    k[:, needed, 0] += 2 * u
    k[:, needed, 1:] -= 0.5 * w
    kept = _kept("expected:0.5", k, v)
    assert len(kept) == 30 and set(needed) <= set(kept)

    averaged = drop._standardised
    monkeypatch.setattr(drop, "_standardised", lambda score, head_max=False: averaged(score))
    kv = drop.ContextKV.of(k, v, torch.arange(tokens))
    by_mean = drop.SELECTORS["expected"](0.5).score(kv)
    assert (by_mean[needed] < by_mean.median()).all()


def test_expected_weighs_tokens_by_value_norm(qmodel, scores_only):
    qmodel(_model())  # zero mean: the attention term is nearly flat, values decide
    k, v = _kv()
    v[:, [3, 9]] *= 50
    kept = _kept("expected:0.95", k, v)
    assert len(kept) == 3 and {3, 9} <= set(kept)


def test_expected_rotates_the_query_to_the_positions_after_the_context(qmodel, scores_only):
    """A pre-RoPE query along u, tokens whose pre-RoPE key is u stored after RoPE: the kept set
    must follow the rotated query, and another context length moves the future positions."""
    freq = 0.5  # one full turn every ~12.6 positions: the future window's mean rotation matters
    d = DIM
    u = torch.zeros(d); u[0] = 1.0  # rotates with u[d/2] at 0.5 rad per position
    qmodel(_model(mean=10 * u, freq=freq))
    tokens = 40
    # every token's pre-RoPE key is u rotated by -angle(j): after RoPE at j it is u for all j,
    # except one token whose stored key is the mean future query's direction itself
    k, v = _kv(tokens)
    v = torch.ones_like(v)
    kept_model = queries.active()
    future = tokens + torch.arange(get_codec("expected:0.5").selector.FUTURE)
    eye = torch.eye(d)[:, None, None, :].expand(d, future.numel(), 1, d)
    turn = rope(eye, future, kept_model.inv_freq).mean(1)[:, 0]
    target = torch.nn.functional.normalize(10 * u @ turn, dim=0)
    k[:, 11] = 3 * target
    k[:, 12] = -3 * target
    kept = _kept("expected:0.95", k, v)
    assert 11 in kept and 12 not in kept


def test_kvzip_keeps_the_tokens_its_predicted_queries_find(qmodel, scores_only):
    u = torch.nn.functional.normalize(torch.randn(DIM), dim=0)
    qmodel(_model(bias=8 * u))  # every predicted query is 8u, whatever the key
    k, v = _kv()
    found = [2, 33, 58]
    k[:, found] += 3 * u
    kept = _kept("kvzip:0.95", k, v)
    assert set(kept) == set(found)


def test_kvzip_reads_keys_through_the_key_to_query_map(qmodel):
    """A map that sends each key to itself (no RoPE): every repeating query finds its own
    token, so the tokens sampled as queries are kept over the others."""
    qmodel(_model(key_map=8 * torch.eye(DIM).expand(LAYERS, HEADS, DIM, DIM)))
    tokens = 600  # more than QUERIES: only every ~2.3rd token asks
    k, v = _kv(tokens)
    k = torch.nn.functional.normalize(k, dim=-1)
    codec = get_codec("kvzip:0.5")
    picked = torch.linspace(0, tokens - 1, codec.selector.QUERIES).round().long().tolist()
    kept = _kept("kvzip:0.5", k, v)
    assert len(set(picked) & set(kept)) >= 0.95 * len(picked)


@pytest.mark.parametrize("name", ["expected:0.5", "expected:0.3+int8", "kvzip:0.5", "kvzip:0.7+int4+zstd"])
@pytest.mark.parametrize("tokens", [1, 7, 257])
def test_sizes_positions_and_redropping(qmodel, name, tokens):
    qmodel(_model(mean=torch.randn(DIM), freq=0.01))
    codec = get_codec(name)
    k, v = (t.to(torch.bfloat16) for t in _kv(tokens))
    raw = codec.device_codec.encode(k, v, positions=torch.arange(tokens) * 3 + 5)  # zstd is a host stage
    assert raw.nbytes == codec.device_codec.nbytes(KVShape.of(k))
    if codec.has_host_stage:
        assert codec.unpack_host(codec.encode(k, v)).nbytes == raw.nbytes
    kept = codec.output_shape(KVShape.of(k)).tokens
    ratio = float(name.split("+")[0].split(":")[1])
    assert kept == (tokens if tokens < TokenSelector.MIN_TOKENS else max(1, tokens - math.floor(ratio * tokens)))
    pos = codec.device_codec.positions(raw)
    assert pos.numel() == kept and torch.all(pos[1:] > pos[:-1]) and torch.all((pos - 5) % 3 == 0)


def test_the_selectors_fail_clearly_without_a_fitting_query_model(qmodel):
    k, v = _kv(100)
    with pytest.raises(CodecError, match="query_model"):
        get_codec("expected:0.5").encode(k, v)
    qmodel(_model(layers=LAYERS + 1))
    with pytest.raises(CodecError, match="query model describes"):
        get_codec("kvzip:0.5").encode(k, v)


def test_query_model_file_round_trips(tmp_path):
    model = _model(mean=torch.randn(DIM), freq=0.3)
    model.save(tmp_path / "q.pt")
    back = QueryModel.load(tmp_path / "q.pt")
    assert all(torch.equal(getattr(model, f), getattr(back, f)) for f in ("mean", "cov", "key_map", "key_bias", "inv_freq"))


@pytest.mark.parametrize("name", ["expected:0.5+int8", "kvzip:0.4"])
def test_round_trip_through_a_real_sglang_pool(qmodel, name):
    qmodel(_model(mean=torch.randn(DIM), freq=0.05))
    assert_pool_entry_points_agree(name)


def test_query_aware_priors_follow_the_key_scored_ones():
    assert prior_quality("expected:0.5+int8") == prior_quality("keydiff:0.5+int8") < prior_quality("int8")
    assert prior_quality("kvzip:0.6") < prior_quality("kvzip:0.3")


@pytest.mark.parametrize("name", ["expected:0.5", "kvzip:0.5", "knorm:0.5", "keydiff:0.5"])
def test_selectors_take_softmax_along_the_last_dimension_only(qmodel, monkeypatch, name):
    """SGLang's --enable-deterministic-inference swaps (log_)softmax for batch-invariant
    kernels that refuse any other dimension (seen on the H200: every 'expected' store failed).
    The selectors must choose the same tokens under that restriction."""
    qmodel(_model(mean=torch.randn(DIM)))
    k, v = _kv(100)
    free = _kept(name, k, v)
    assert len(free) < 100  # the selector ran

    def last_dim_only(original):
        def op(x, dim=None, *args, **kwargs):
            if dim not in (-1, x.dim() - 1):
                raise ValueError("This implementation only supports log_softmax along the last dimension")
            return original(x, dim, *args, **kwargs)
        return op

    for op in ("log_softmax", "softmax"):
        monkeypatch.setattr(torch.Tensor, op, last_dim_only(getattr(torch.Tensor, op)))
        monkeypatch.setattr(torch, op, last_dim_only(getattr(torch, op)))
    assert _kept(name, k, v) == free


@pytest.mark.parametrize("name", ["expected", "kvzip", "keydiff"])
def test_selectors_score_the_same_a_layer_at_a_time(qmodel, monkeypatch, name):
    """With room for one layer's intermediates only, the scores are those of all layers at once
    (a 100k-token context must not need gigabytes at eviction time)."""
    from evicpress_sglang.codecs import drop

    qmodel(_model(mean=torch.randn(DIM), key_map=torch.randn(LAYERS, HEADS, DIM, DIM) / DIM, freq=0.1))
    k, v = _kv(200)
    kv = drop.ContextKV.of(k.to(torch.bfloat16), v.to(torch.bfloat16), torch.arange(200), start=17)
    whole = drop.SELECTORS[name](0.5).score(kv)
    assert kv.parts(0) == [slice(0, LAYERS)]
    monkeypatch.setattr(drop, "CHUNK_BYTES", 1)
    assert kv.parts(0) == [slice(i, i + 1) for i in range(LAYERS)]
    torch.testing.assert_close(drop.SELECTORS[name](0.5).score(kv), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["expected:0.5", "kvzip:0.5", "keydiff:0.5", "knorm:0.5", "streaming:0.5"])
def test_no_selector_runs_an_op_that_deterministic_mode_compiles_per_context_length(qmodel, name):
    """SGLang's --enable-deterministic-inference replaces aten's log_softmax with a Triton kernel
    whose row length is a compile-time constant (``batch_invariant_ops._log_softmax_kernel``,
    ``n_cols: tl.constexpr``): a selector calling it compiles once per new context length, on the
    scheduler thread (seconds of queued requests in issue 24's GPU run). The ops it replaces with
    kernels that take sizes at run time (mm, bmm, mean) are fine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    qmodel(_model(mean=torch.randn(DIM)))
    k, v = _kv(100)
    with Ops() as ops:
        kept = _kept(name, k, v)
    assert len(kept) < 100 and ("topk" in ops.seen or name.startswith("streaming"))
    assert "_log_softmax" not in ops.seen and "log_softmax" not in ops.seen


@pytest.mark.parametrize("name", ["expected:0.5", "kvzip:0.5"])
def test_a_context_below_others_is_scored_at_its_place_in_the_sequence(qmodel, name):
    """A radix node that starts at token S of its sequence holds keys rotated to S + positions.
    Told its start, a selector chooses exactly as for the same keys scored as the tail of the
    whole sequence; told 0 (what the store passed before, issue 24), it rotated its queries S
    positions off, which on SmolLM2 docqa contexts cut into 1024-token nodes cost answer F1
    0.74 -> 0.65 (expected) and 0.90 -> 0.72 (kvzip) (bench/results/2026-12-01-query-aware-
    selectors/answer_agreement_study.md)."""
    from evicpress_sglang.codecs.drop import ContextKV, SELECTORS

    g = torch.Generator().manual_seed(15)  # a model under which the start visibly matters (6 tokens for expected)
    qmodel(_model(mean=4 * torch.randn(DIM, generator=g),
                  key_map=2 * torch.randn(LAYERS, HEADS, DIM, DIM, generator=g) / math.sqrt(DIM), freq=0.3))
    k, v = _kv(80)
    sel = SELECTORS[name.split(":")[0]](0.5)
    rel = torch.arange(80)
    start = 1000
    as_tail = sel.select(ContextKV.of(k, v, rel + start))
    as_node = sel.select(ContextKV.of(k, v, rel, start))
    assert torch.equal(as_node, as_tail)
    assert not torch.equal(sel.select(ContextKV.of(k, v, rel)), as_tail)  # the start matters here
    codec = get_codec(name)
    enc = codec.encode(k, v, start=start)
    assert torch.equal(codec.positions(enc), as_tail)  # stored positions stay relative to the node


def test_mean_rotation_is_the_mean_of_rope_over_the_positions():
    """The closed form the expected selector rotates its query model with equals rotating
    every unit vector to every position and averaging (what it did before)."""
    d = DIM
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    positions = torch.arange(3000, 3256)
    eye = torch.eye(d)[:, None, None, :].expand(d, positions.numel(), 1, d)
    slow = rope(eye, positions, inv_freq).mean(1)[:, 0]
    assert torch.allclose(queries.mean_rotation(positions, inv_freq), slow, atol=1e-6)
    x = torch.randn(5, d)
    assert torch.allclose(x @ queries.mean_rotation(positions, inv_freq),
                          rope(x[None].expand(positions.numel(), 5, d), positions, inv_freq).mean(0), atol=1e-5)


def test_the_query_model_is_copied_to_the_device_once_per_model(qmodel):
    qmodel(_model())
    first = queries.active_on(torch.device("cpu"), LAYERS, HEADS, DIM)
    assert queries.active_on(torch.device("cpu"), LAYERS, HEADS, DIM) is first
    qmodel(_model(mean=torch.ones(DIM)))  # another model: copied afresh
    again = queries.active_on(torch.device("cpu"), LAYERS, HEADS, DIM)
    assert again is not first and torch.equal(again.mean, torch.ones(LAYERS, HEADS, DIM))
    with pytest.raises(CodecError, match="query model describes"):
        queries.active_on(torch.device("cpu"), LAYERS + 1, HEADS, DIM)


def _expected_reference(kv, future=256):
    """The Expected Attention score as written in the paper's terms (mu.k/sqrt(d) + k S k / 2d in
    float32, softmax over tokens, plus log |v|): what the selector's one projection must equal."""
    from evicpress_sglang.codecs.drop import _standardised

    layers, _, heads, d = kv.shape.tensor_shape
    qm = queries.active_on(kv.device, layers, heads, d)
    turn = queries.mean_rotation(kv.rope_positions()[-1] + 1 + torch.arange(future), qm.inv_freq)
    mean, cov, k = qm.mean @ turn, turn.T @ qm.cov @ turn, kv.keys(slice(None)).float()
    logit = torch.einsum("lhd,lthd->lth", mean, k) / math.sqrt(d)
    logit += torch.einsum("lthd,lhde,lthe->lth", k, cov, k) / (2 * d)
    expected = logit.transpose(1, 2).log_softmax(dim=-1).transpose(1, 2)
    return _standardised(expected + kv.values(slice(None)).float().norm(dim=-1).clamp_min(1e-6).log(), head_max=True)


def test_expected_scores_with_one_projection_what_the_formula_gives(qmodel):
    """float32 KV: the same scores (to rounding); bf16 KV (the pool's): the projection runs in
    bf16 and keeps almost exactly the tokens the float32 formula keeps."""
    from evicpress_sglang.codecs.drop import ContextKV, SELECTORS

    a = torch.randn(LAYERS, HEADS, DIM, DIM) / DIM ** 0.5
    qmodel(QueryModel(mean=torch.randn(LAYERS, HEADS, DIM), cov=a @ a.transpose(-1, -2),
                      key_map=torch.zeros(LAYERS, HEADS, DIM, DIM), key_bias=torch.zeros(LAYERS, HEADS, DIM),
                      inv_freq=1.0 / 10000 ** (torch.arange(0, DIM, 2).float() / DIM)))
    sel = SELECTORS["expected"](0.5)
    k, v = _kv(1000, seed=3)
    k = k * 10
    kv = ContextKV.of(k, v, torch.arange(1000), 300)
    assert torch.allclose(sel.score(kv), _expected_reference(kv), atol=1e-5)
    kv16 = ContextKV.of(k.to(torch.bfloat16), v.to(torch.bfloat16), torch.arange(1000), 300)
    keep = sel.kept(1000)
    ours = set(torch.topk(sel.score(kv16), keep).indices.tolist())
    formula = set(torch.topk(_expected_reference(kv16), keep).indices.tolist())
    assert len(ours & formula) >= 0.99 * keep


def test_the_covariance_root_squares_back_to_the_covariance(qmodel):
    a = torch.randn(LAYERS, HEADS, DIM, DIM - 8)  # rank-deficient: eigenvalues of 0 (and -eps) clipped
    cov = a @ a.transpose(-1, -2)
    qmodel(QueryModel(mean=torch.zeros(LAYERS, HEADS, DIM), cov=cov, key_map=torch.zeros(LAYERS, HEADS, DIM, DIM),
                      key_bias=torch.zeros(LAYERS, HEADS, DIM), inv_freq=torch.ones(DIM // 2)))
    root = queries.cov_root_on(torch.device("cpu"), LAYERS, HEADS, DIM)
    assert torch.allclose(root @ root.transpose(-1, -2), cov, atol=1e-3 * float(cov.abs().max()))
    assert queries.cov_root_on(torch.device("cpu"), LAYERS, HEADS, DIM) is root  # once per model


def test_the_cache_refuses_a_query_model_of_another_geometry_and_prepares_its_root_at_start(tmp_path, qmodel):
    """The covariance root is made at start, not in the first eviction; a model of another
    geometry than the KV cache is a clear error at start, not a failed store per eviction."""
    from evicpress_sglang.backend.cache import EvicPressRadixCache
    from evicpress_sglang.settings import Settings, SettingsError
    from harness import make_params

    def settings(model: QueryModel) -> Settings:
        model.save(tmp_path / "q.pt")
        return Settings(host_codecs=["bf16", "expected:0.5"], disk_codecs=[], query_model=str(tmp_path / "q.pt"))

    EvicPressRadixCache(make_params(64), settings(_model()))
    assert ("root", "cpu", LAYERS, HEADS, DIM) in queries._on_device
    with pytest.raises(SettingsError, match="query model describes"):
        EvicPressRadixCache(make_params(64), settings(_model(layers=LAYERS + 1)))


def test_each_tp_rank_reads_the_query_model_of_its_own_kv_heads():
    """A query model measured over all KV heads, on a rank holding a shard of them: rank r of
    2 gets heads [2r, 2r + 2) of 4; with 2 KV heads over 4 ranks each rank's one head is
    replicated (ranks 0-1 head 0, ranks 2-3 head 1), as SGLang shards KV heads."""
    model = _model(heads=4, mean=torch.zeros(DIM))
    model = QueryModel(mean=torch.arange(4.0)[None, :, None].expand(LAYERS, 4, DIM).clone(), cov=model.cov,
                       key_map=model.key_map, key_bias=model.key_bias, inv_freq=model.inv_freq)
    for rank in (0, 1):
        part = queries.for_rank(model, 2, rank, 2)
        assert part.mean[0, :, 0].tolist() == [2.0 * rank, 2.0 * rank + 1] and part.cov.shape[1] == 2
    two = QueryModel(**{f: getattr(model, f)[:, :2] if f != "inv_freq" else model.inv_freq
                        for f in ("mean", "cov", "key_map", "key_bias", "inv_freq")})
    assert [queries.for_rank(two, 1, r, 4).mean[0, 0, 0].item() for r in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert queries.for_rank(model, 4, 0, 1) is model and queries.for_rank(model, 3, 0, 2) is model
