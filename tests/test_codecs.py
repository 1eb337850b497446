import pytest
import torch

from evicpress_sglang.codecs import CodecError, EncodedKV, KVShape, codec_names, get_codec
from evicpress_sglang.codecs.kivi import GROUP


def _roundtrip(name, k, v):
    codec = get_codec(name)
    enc = codec.encode(k, v)
    out_k, out_v = torch.empty_like(k), torch.empty_like(v)
    codec.decode(enc, out_k, out_v)
    return enc, out_k, out_v


def _rel_err(x, y):
    return ((x.float() - y.float()).norm() / x.float().norm()).item()


def _random_kv(tokens=70, layers=3, heads=2, dim=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, tokens, heads, dim, generator=g) * 3
    k[..., 5] += 20  # an outlier channel, as real keys have
    v = torch.randn(layers, tokens, heads, dim, generator=g)
    return k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("tokens", [1, GROUP - 1, GROUP, 3 * GROUP + 7])
def test_roundtrip_shapes_and_exact_sizes(name, tokens):
    k, v = _random_kv(tokens=tokens)
    enc, out_k, out_v = _roundtrip(name, k, v)
    codec = get_codec(name)
    assert enc.payload.dtype == torch.uint8 and enc.payload.dim() == 1
    if codec.fixed_rate:
        assert enc.nbytes == codec.nbytes(KVShape.of(k))
    assert torch.isfinite(out_k.float()).all() and torch.isfinite(out_v.float()).all()
    assert _rel_err(k, out_k) < 0.5 and _rel_err(v, out_v) < 0.7


@pytest.mark.parametrize("name", ["bf16", "bf16+zstd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lossless_codecs_are_bit_exact(name, dtype):
    k, v = _random_kv(dtype=dtype)
    _, out_k, out_v = _roundtrip(name, k, v)
    assert torch.equal(out_k.view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(out_v.view(torch.uint8), v.view(torch.uint8))


def test_zstd_shrinks_quantized_payload_and_keeps_it_exact():
    k, v = _random_kv(tokens=256)
    plain = get_codec("int4").encode(k, v)
    packed = get_codec("int4+zstd").encode(k, v)
    assert packed.nbytes < plain.nbytes
    a = (torch.empty_like(k), torch.empty_like(v))
    b = (torch.empty_like(k), torch.empty_like(v))
    get_codec("int4").decode(plain, *a)
    get_codec("int4+zstd").decode(packed, *b)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kivi_error_per_element_is_within_half_a_step():
    """Every reconstructed element lies within half a quantization step of the original,
    which is what asymmetric min/scale quantization promises."""
    k, v = _random_kv(tokens=2 * GROUP + 5, dtype=torch.float32)
    codec = get_codec("int4")
    _, out_k, out_v = _roundtrip("int4", k, v)
    L, n, H, D = k.shape
    full = (n // GROUP) * GROUP
    kg = k[:, :full].reshape(L, n // GROUP, GROUP, H, D)
    k_step = (kg.amax(2, keepdim=True) - kg.amin(2, keepdim=True)) / 15
    k_err = (out_k[:, :full].reshape_as(kg) - kg).abs()
    assert (k_err <= k_step * 0.5 * 1.01 + 1e-3).all()
    assert torch.equal(out_k[:, full:], k[:, full:])  # the residual is kept exactly
    vg = v.reshape(L, n, H, D // GROUP, GROUP)
    v_step = (vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / 15
    assert ((out_v.reshape_as(vg) - vg).abs() <= v_step * 0.5 * 1.01 + 1e-3).all()
    assert codec.ratio(KVShape(32, 4096, 8, 128, torch.bfloat16)) > 3.0  # 8B-class shape


def test_kivi_keys_are_quantized_per_channel():
    """An outlier channel must not wreck the other channels' precision (KIVI's point)."""
    k, v = _random_kv(tokens=4 * GROUP, dtype=torch.float32)
    k[..., 7] *= 1000
    _, out_k, _ = _roundtrip("int4", k, v)
    normal = [c for c in range(k.shape[-1]) if c != 7]
    assert _rel_err(k[..., normal], out_k[..., normal]) < 0.12


def test_lossy_codecs_on_real_model_kv(smollm2_kv):
    """Bounds on the real SmolLM2 KV; more bits must mean less error."""
    k, v = smollm2_kv
    bounds = {"fp8": 0.05, "int8": 0.02, "int4": 0.12, "int2": 0.6}  # measured: .025/.011/.08/.41
    errors = {}
    for name, bound in bounds.items():
        _, out_k, out_v = _roundtrip(name, k, v)
        errors[name] = (_rel_err(k, out_k), _rel_err(v, out_v))
        assert max(errors[name]) < bound, (name, errors[name])
    assert errors["int8"][0] < errors["int4"][0] < errors["int2"][0]
    assert errors["int8"][1] < errors["int4"][1] < errors["int2"][1]
    shape = KVShape.of(k)
    assert get_codec("int2").ratio(shape) > get_codec("int4").ratio(shape) > get_codec("int8").ratio(shape) > 1.8


def test_unknown_codec_name_lists_valid_ones():
    with pytest.raises(CodecError, match=r"valid: .*<bf16\|fp8\|int8\|int4\|int2>"):
        get_codec("int3")
    with pytest.raises(CodecError):
        get_codec("int4+gzip")


def test_decode_refuses_blobs_that_do_not_match():
    k, v = _random_kv()
    enc = get_codec("int4").encode(k, v)
    out = (torch.empty_like(k), torch.empty_like(v))
    with pytest.raises(CodecError, match="written by codec"):
        get_codec("int8").decode(enc, *out)
    with pytest.raises(CodecError, match="bytes"):
        get_codec("int4").decode(EncodedKV("int4", enc.shape, enc.payload[:-16]), *out)
    with pytest.raises(CodecError, match="out_k"):
        get_codec("int4").decode(enc, torch.empty_like(k[:, :3]), out[1])


def test_corrupt_zstd_payload_is_an_error_not_garbage():
    k, v = _random_kv()
    enc = get_codec("int8+zstd").encode(k, v)
    bad = enc.payload.clone()
    bad[len(bad) // 2 :] = 0
    with pytest.raises(CodecError):
        get_codec("int8+zstd").decode(EncodedKV(enc.codec, enc.shape, bad), torch.empty_like(k), torch.empty_like(v))


def test_zstd_frames_decode_in_parallel_and_old_single_frame_blobs_still_decode(monkeypatch):
    """A payload is cut into independent frames (decoded on several threads); a blob written
    before that (one plain zstd frame) decodes the same; a damaged frame index is an error."""
    import zstandard

    from evicpress_sglang.codecs import zstd

    k, v = _random_kv()
    codec = get_codec("int4+zstd")
    inner = get_codec("int4").encode(k, v)
    monkeypatch.setattr(zstd, "CHUNK", 1000)  # many frames from a small payload
    packed = codec.pack_host(inner)
    count = int.from_bytes(bytes(packed.payload[4:8].tolist()), "little")
    assert bytes(packed.payload[:4].tolist()) == zstd.MAGIC and count == -(-inner.payload.numel() // 1000) > 2
    assert torch.equal(codec.unpack_host(packed).payload, inner.payload)

    one_frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(inner.payload.numpy())
    old = EncodedKV(codec.name, inner.shape, torch.frombuffer(bytearray(one_frame), dtype=torch.uint8))
    assert torch.equal(codec.unpack_host(old).payload, inner.payload)

    bad = packed.payload.clone()
    bad[8:16] = 255  # the first frame's size
    with pytest.raises(CodecError, match="corrupt zstd payload"):
        codec.unpack_host(EncodedKV(codec.name, packed.shape, bad))
