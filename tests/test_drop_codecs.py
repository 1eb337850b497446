import numpy as np
import pytest
import torch

from evicpress_sglang.codecs import CodecError, KVShape, drops_tokens, get_codec
from evicpress_sglang.codecs.drop import SELECTORS, ContextKV, KeyDiffSelector, StreamingSelector, TokenSelector
from evicpress_sglang.policy import CostModel, prior_quality


def _kv(tokens=100, layers=3, heads=2, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, tokens, heads, dim, generator=g)
    v = torch.randn(layers, tokens, heads, dim, generator=g)
    return k.to(torch.bfloat16), v.to(torch.bfloat16)


def _decode(codec, enc):
    shape = codec.output_shape(enc.shape)
    out_k = torch.empty(shape.tensor_shape, dtype=shape.dtype)
    out_v = torch.empty_like(out_k)
    codec.decode(enc, out_k, out_v)
    return out_k, out_v


@pytest.mark.parametrize("name", ["knorm:0.3", "keydiff:0.6", "streaming:0.9", "keydiff:0.6+int8", "knorm:0.3+int4",
                                  "keydiff:0.3+fp8", "keydiff:0.6+int4+zstd"])
@pytest.mark.parametrize("tokens", [1, 7, 100, 257])
def test_sizes_are_exact_and_kept_count_follows_the_ratio(name, tokens):
    codec = get_codec(name)
    k, v = _kv(tokens)
    enc = codec.encode(k, v)
    ratio = float(name.split("+")[0].split(":")[1])
    kept = codec.output_shape(KVShape.of(k)).tokens
    assert kept == (tokens if tokens < TokenSelector.MIN_TOKENS else max(1, tokens - int(ratio * tokens)))
    if codec.fixed_rate:
        assert enc.nbytes == codec.nbytes(KVShape.of(k))
    else:  # zstd on top: inflates to exactly the inner codec's size
        assert codec.unpack_host(enc).nbytes == codec.nbytes(KVShape.of(k))
    out_k, out_v = _decode(codec, enc)
    assert out_k.shape[1] == kept and torch.isfinite(out_k.float()).all()
    pos = codec.device_codec.positions(codec.unpack_host(enc) if codec.has_host_stage else enc)
    assert pos.numel() == kept and torch.all(pos[1:] > pos[:-1]) and 0 <= int(pos[0]) and int(pos[-1]) < tokens
    assert drops_tokens(codec)


def test_bf16_inner_returns_exactly_the_kept_tokens():
    codec = get_codec("keydiff:0.6")
    k, v = _kv(90)
    enc = codec.encode(k, v)
    pos = codec.positions(enc)
    out_k, out_v = _decode(codec, enc)
    assert torch.equal(out_k, k[:, pos]) and torch.equal(out_v, v[:, pos])


def test_quantized_inner_stays_within_its_error_on_the_kept_tokens():
    k, v = _kv(128)
    codec = get_codec("knorm:0.3+int8")
    enc = codec.encode(k, v)
    pos = codec.positions(enc)
    out_k, _ = _decode(codec, enc)
    err = (out_k.float() - k[:, pos].float()).abs().max().item()
    assert err < 0.05 * k.float().abs().max().item()


def test_knorm_keeps_the_smallest_keys(scores_only):
    k, v = _kv(50)
    k[:, :10] *= 10  # ten loud tokens in every layer and head
    pos = get_codec("knorm:0.2").positions(get_codec("knorm:0.2").encode(k, v))
    assert set(range(10)).isdisjoint(pos.tolist())


def test_keydiff_keeps_the_distinctive_keys(scores_only):
    k, v = _kv(60)
    common = torch.randn(k.shape[-1])
    k = (common.expand_as(k.float()) + 0.05 * k.float()).to(torch.bfloat16)  # nearly identical keys...
    odd = [3, 17, 41]
    k[:, odd] = -k[:, odd]  # ...except three pointing the other way
    codec = get_codec("keydiff:0.9")
    pos = codec.positions(codec.encode(k, v)).tolist()
    assert set(odd) <= set(pos) and len(pos) == 6


def test_streaming_keeps_sinks_and_the_recent_window():
    k, v = _kv(100)
    pos = get_codec("streaming:0.5").positions(get_codec("streaming:0.5").encode(k, v)).tolist()
    sinks = StreamingSelector.SINKS
    assert pos == list(range(sinks)) + list(range(100 - (50 - sinks), 100))


@pytest.mark.parametrize("name", ["knorm", "keydiff", "streaming"])
def test_contexts_shorter_than_min_tokens_keep_every_token(name):
    """A short context (a question tail, a chat turn) is stored whole under a dropping codec:
    its size is the kept-all size, known before encoding; from MIN_TOKENS on the ratio applies."""
    short = TokenSelector.MIN_TOKENS - 1
    codec = get_codec(f"{name}:0.5+int8")
    k, v = _kv(short)
    enc = codec.encode(k, v)
    assert codec.positions(enc).tolist() == list(range(short))
    assert enc.nbytes == codec.nbytes(KVShape.of(k)) == get_codec("keep+int8").nbytes(KVShape.of(k))
    k, v = _kv(TokenSelector.MIN_TOKENS)
    assert codec.positions(codec.encode(k, v)).numel() == TokenSelector.MIN_TOKENS // 2


@pytest.mark.parametrize("ratio", [0.5, 0.95])
def test_scored_selectors_always_keep_the_recent_window_and_the_first_token(ratio):
    """The last RECENT tokens and the first are kept even when their scores are the worst (here:
    keys equal to the context's mean direction, which keydiff ranks last), the window at most
    half of those kept; the first keeps a dropped node splittable anywhere (test_dropped_serving)."""
    tokens = 200
    k, v = _kv(tokens)
    common = torch.randn(k.shape[-1])
    k = k.float()
    k[:, -KeyDiffSelector.RECENT - 1:] = common  # the least distinctive keys of the context
    k[:, :2] = common
    sel = SELECTORS["keydiff"](ratio)
    kept = sel.select(ContextKV.of(k, v, torch.arange(tokens))).tolist()
    keep = sel.kept(tokens)
    recent = min(KeyDiffSelector.RECENT, keep // 2)
    assert len(kept) == keep and kept[-recent:] == list(range(tokens - recent, tokens))
    assert kept[0] == 0 and 1 not in kept  # the first token is kept, the second (as bad) is not
    assert tokens - recent - 1 not in kept  # as bad a score, just before the window: dropped


def test_redropping_composes_positions():
    k, v = _kv(200)
    first = get_codec("keydiff:0.5")
    enc = first.encode(k, v)
    pos1 = first.positions(enc)
    k1, v1 = _decode(first, enc)
    second = get_codec("streaming:0.5+int8")
    enc2 = second.encode(k1, v1, positions=pos1)
    pos2 = second.positions(enc2)
    assert pos2.numel() == 50 and set(pos2.tolist()) <= set(pos1.tolist())
    assert torch.equal(pos2[: StreamingSelector.SINKS], pos1[: StreamingSelector.SINKS])
    with pytest.raises(CodecError, match="positions"):
        second.encode(k1, v1, positions=pos1[:-1])


def test_damaged_or_foreign_blobs_are_refused():
    k, v = _kv(64)
    codec = get_codec("keydiff:0.3+int4")
    enc = codec.encode(k, v)
    enc.payload = enc.payload[:-16]
    with pytest.raises(CodecError, match="bytes"):
        _decode(codec, enc)
    with pytest.raises(CodecError, match="written by"):
        _decode(codec, get_codec("keydiff:0.6+int4").encode(k, v))
    full = (torch.empty_like(k), torch.empty_like(v))  # the caller must size outputs for the kept tokens
    with pytest.raises(CodecError, match="decodes to"):
        codec.decode(codec.encode(k, v), *full)


@pytest.mark.parametrize("bad", ["keydiff:1.0", "keydiff:-0.1", "keydiff:abc", "snap:0.3", "int4+keydiff:0.3",
                                 "keydiff:0.3+zstd+int4"])
def test_bad_names_are_clear_errors(bad):
    with pytest.raises(CodecError):
        get_codec(bad)


def test_policy_sees_dropping_codecs_as_smaller_faster_and_lossier():
    layout = KVShape(30, 4096, 3, 64, torch.bfloat16)
    cost = CostModel()
    plain, dropped = cost.stored_nbytes("int8", layout), cost.stored_nbytes("keydiff:0.6+int8", layout)
    assert dropped < 0.45 * plain
    assert cost.decode_s_per_raw_byte("keydiff:0.6+int8", layout) < cost.decode_s_per_raw_byte("int8", layout)
    assert prior_quality("keydiff:0.6+int8") < prior_quality("keydiff:0.3+int8") < prior_quality("int8")


def test_evicpress_places_a_context_with_a_dropping_codec_when_its_quality_allows():
    """Token dropping is just another codec to the policy: chosen where its measured
    quality and size make it the best use of the tier, never below the floor."""
    from evicpress_sglang.policy import ContextTable, Weights, build_configs, make_policy

    layout = KVShape(32, 0, 8, 128, torch.bfloat16)
    table = ContextTable(build_configs(["bf16", "int8", "keydiff:0.6+int8"], []), layout, CostModel())
    for i in range(4):
        table.insert(f"c{i}", 8192, now=0.0)
    table.set_quality("c0", "keydiff:0.6+int8", 0.97)  # tolerant context
    table.set_quality("c1", "keydiff:0.6+int8", 0.5)  # intolerant one
    pol = make_policy("evicpress", table, Weights(alpha=2.0, quality_floor=0.9))
    per_ctx = table.sizes[0, table.gpu_config]
    host = next(j for j, c in enumerate(table.configs) if c.label == "host:keydiff:0.6+int8")
    rows, assign = pol.place(np.array([0.0, 1.5 * table.sizes[0, host] + 2 * 0.52 * per_ctx, 0.0]), now=1.0)
    label = {table.keys[r]: table.configs[a].label for r, a in zip(rows, assign)}
    assert label["c0"] == "host:keydiff:0.6+int8"
    assert label["c1"] != "host:keydiff:0.6+int8"


def test_a_context_too_short_to_drop_from_has_its_quantizers_quality_under_a_dropping_codec():
    """Stored whole, a short context's dropping configurations are as good as their quantizer:
    its measured column where configured (int8 here), else the quantizer's prior (int4)."""
    from evicpress_sglang.policy import ContextTable, build_configs
    from evicpress_sglang.policy.contexts import prior_quality

    table = ContextTable(build_configs(["bf16", "int8", "keydiff:0.5+int8", "expected:0.3+int4"], ["knorm:0.4"]),
                         KVShape(2, 0, 2, 64, torch.bfloat16), CostModel())
    short = table.insert("short", TokenSelector.MIN_TOKENS - 1, 0.0)
    long = table.insert("long", TokenSelector.MIN_TOKENS, 0.0)
    table.set_quality("short", "int8", 0.9)
    q = dict(zip(table.quality_codec, table.config_quality(np.array([short, long])).T))
    assert q["keydiff:0.5+int8"].tolist() == [0.9, prior_quality("keydiff:0.5+int8")]
    assert q["expected:0.3+int4"].tolist() == [prior_quality("int4"), prior_quality("expected:0.3+int4")]
    assert q["knorm:0.4"].tolist() == [1.0, prior_quality("knorm:0.4")]
