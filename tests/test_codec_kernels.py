"""The fused codec kernels (``evicpress_sglang/codecs/kernels.py``) and the kv_io entry points
that use them.

The kernel cases run on CPU under Triton's interpreter in one subprocess (``kernel_checks.py``
says why and what each case checks); each case is reported here as its own test. The rest
runs in this process: the torch paths of the entry points, what happens when a kernel fails
or a blob does not fit, and the launches' arguments and the Python that builds them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from evicpress_sglang.backend import kv_io
from evicpress_sglang.codecs import CodecError, KVShape, drops_tokens, get_codec, kernels
from evicpress_sglang.codecs.kivi import Int4Codec

import kernel_checks
from harness import assert_pool_entry_points_agree, pool_with_kv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, str | None]:
    """Every kernel case's outcome: None when it passed, else its traceback."""
    out = tmp_path_factory.mktemp("kernels") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kernel_checks.py"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", kernel_checks.cases())
def test_kernel_matches_torch_codec(interpreted, case):
    assert case in interpreted, "case did not run"
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.parametrize("name", ["int4", "bf16", "keydiff:0.5+int8", "int8+zstd"])
def test_entry_points_match_gather_encode_decode_scatter(name):
    assert_pool_entry_points_agree(name)


def test_a_failing_kernel_falls_back_to_torch_once_and_logged(monkeypatch, caplog):
    pool, slots = pool_with_kv()
    codec = get_codec("int8")
    monkeypatch.setattr(kv_io, "_failed", set())
    monkeypatch.setattr(kv_io.kernels, "supports", lambda quantizer, k_buffer: True)
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no such GPU feature")

    monkeypatch.setattr(kv_io.kernels, "encode", broken)
    monkeypatch.setattr(kv_io.kernels, "decode", broken)
    want = codec.encode(*kv_io.gather(pool, slots))
    with caplog.at_level(logging.WARNING, logger=kv_io.__name__):
        for _ in range(2):
            assert torch.equal(kv_io.encode_from_pool(pool, slots, codec).payload, want.payload)
            kv_io.decode_into_pool(pool, slots, codec, want)
    assert len(calls) == 1, "a kernel that failed once is not tried again"
    assert sum("kernel path of int8 failed" in r.message for r in caplog.records) == 1
    k, v = kv_io.gather(pool, slots)
    out_k, out_v = torch.empty_like(k), torch.empty_like(v)
    codec.decode(want, out_k, out_v)
    assert torch.equal(k, out_k) and torch.equal(v, out_v)


def test_bf16_falls_back_from_its_kernel_to_the_layer_copy_then_to_torch_each_once(monkeypatch, caplog):
    """Each path that fails is given up once, logged once, and the next one down serves."""
    pool, slots = pool_with_kv()
    codec = get_codec("bf16")
    monkeypatch.setattr(kv_io, "_failed", set())
    monkeypatch.setattr(kv_io.kernels, "supports", lambda quantizer, k_buffer: True)
    monkeypatch.setattr(kv_io.kernels, "encode", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel")))
    real_select = torch.index_select
    layer_calls = []

    def broken_select(*args, **kwargs):  # the per-layer copy writes with out=...
        if "out" in kwargs:
            layer_calls.append(1)
            raise RuntimeError("no per-layer copy either")
        return real_select(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", broken_select)
    want = codec.encode(*kv_io.gather(pool, slots))
    with caplog.at_level(logging.WARNING, logger=kv_io.__name__):
        for _ in range(3):
            assert torch.equal(kv_io.encode_from_pool(pool, slots, codec).payload, want.payload)
    assert kv_io._failed == {"bf16", "bf16/layers"} and len(layer_calls) == 1
    assert [r.message.split(" failed")[0] for r in caplog.records] == [
        "evicpress: the kernel path of bf16", "evicpress: the layers path of bf16"]


def test_a_blob_that_does_not_fit_is_refused_before_writing():
    pool, slots = pool_with_kv()
    before = [b.clone() for b in pool.k_buffer]
    enc = kv_io.encode_from_pool(pool, slots, get_codec("int4"))
    with pytest.raises(CodecError):
        kv_io.decode_into_pool(pool, slots, get_codec("int8"), enc)  # another codec's blob
    small = get_codec("int4").encode(*(x[:, :, :, :32].contiguous() for x in kv_io.gather(pool, slots)))
    with pytest.raises(CodecError):
        kv_io.decode_into_pool(pool, slots, get_codec("int4"), small)  # another geometry's
    with pytest.raises(ValueError):
        kv_io.decode_into_pool(pool, slots[:-1], get_codec("int4"), enc)  # a slot short
    assert all(torch.equal(a, b) for a, b in zip(pool.k_buffer, before))


def test_positions_only_with_a_subset_codec():
    pool, slots = pool_with_kv()
    with pytest.raises(ValueError):
        kv_io.encode_from_pool(pool, slots, get_codec("int8"), positions=torch.arange(len(slots)))


def test_the_cache_compiles_its_stored_codecs_kernels_at_start_and_starts_if_that_fails(monkeypatch, caplog):
    from evicpress_sglang.backend.cache import EvicPressRadixCache
    from evicpress_sglang.settings import Settings
    from harness import make_params

    asked, selected = [], []
    monkeypatch.setattr(kv_io, "warm_up", lambda pool, codecs: asked.append(list(codecs)) or ["int8"])
    monkeypatch.setattr(kv_io, "warm_up_selectors", lambda pool, codecs: selected.append(list(codecs)) or [])
    settings = Settings(host_codecs=["bf16", "int8", "keydiff:0.5+int8"], disk_codecs=[])
    EvicPressRadixCache(make_params(64), settings)
    assert asked == selected == [settings.stored_codecs]

    def broken(pool, codecs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kv_io, "warm_up", broken)
    with caplog.at_level(logging.WARNING):
        cache = EvicPressRadixCache(make_params(64), settings)
    assert not cache.disable and any("compile at first use" in r.message for r in caplog.records)
    assert len(selected) == 2  # the selectors are still warmed when the kernels' warm-up fails


def test_warm_up_gives_up_a_failing_kernel_and_still_compiles_the_others(monkeypatch, caplog):
    pool, _ = pool_with_kv()
    monkeypatch.setattr(kv_io, "_failed", set())
    monkeypatch.setattr(kv_io.kernels, "supports", lambda quantizer, k_buffer: True)
    ran = []

    def encode(k, v, idx, quantizer, payload):
        if quantizer.name == "int8":
            raise RuntimeError("no int8 kernel on this GPU")
        ran.append(quantizer.name)

    monkeypatch.setattr(kv_io.kernels, "encode", encode)
    monkeypatch.setattr(kv_io.kernels, "decode", lambda *a: None)
    with caplog.at_level(logging.WARNING, logger=kv_io.__name__):
        assert kv_io.warm_up(pool, ["bf16", "int8", "keydiff:0.5+int4"]) == ["bf16", "int4"]
    assert ran == ["bf16", "int4"] and kv_io._failed == {"int8"}
    assert sum("kernel path of int8 failed" in r.message for r in caplog.records) == 1


def test_warm_up_runs_each_selector_once_at_both_lengths_without_touching_the_pool_or_the_rng(monkeypatch, caplog):
    """Every dropping codec's selector runs on made-up KV of the pool's geometry, once per
    selector and warm-up length (a multiple of 16 and not); a failing one is logged and the
    others still run. The pool and the global RNG (SGLang's sampling) are left as they were."""
    from evicpress_sglang.codecs import drop

    pool, _ = pool_with_kv()
    before = [b.clone() for b in pool.k_buffer + pool.v_buffer]
    calls = []
    for name in ("keydiff", "knorm"):
        cls = drop.SELECTORS[name]
        real = cls.select

        def select(self, kv, real=real):
            calls.append((self.name, torch.Size(kv.shape.tensor_shape), kv.shape.dtype))
            if self.name == "knorm":
                raise RuntimeError("no kernel for knorm here")
            return real(self, kv)

        monkeypatch.setattr(cls, "select", select)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger=kv_io.__name__):
        done = kv_io.warm_up_selectors(pool, ["bf16", "streaming:0.001", "keydiff:0.5+int8", "keydiff:0.3",
                                              "knorm:0.5", "knorm:0.3+int4", "keep+int8", "int4"])
    layout = kv_io.pool_layout(pool)
    assert done == ["keydiff"]  # streaming:0.001 drops nothing at these lengths: not run, not reported
    assert [c for c in calls if c[0] == "keydiff"] == [
        ("keydiff", torch.Size([layout.layers, n, layout.heads, layout.head_dim]), layout.dtype)
        for n in kv_io.WARM_SELECT_TOKENS]
    assert sum("warming the knorm selector failed" in r.message for r in caplog.records) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, pool.k_buffer + pool.v_buffer))
    assert torch.equal(rng, torch.get_rng_state())
    sizes = kv_io.WARM_SELECT_TOKENS
    assert {t % 16 == 0 for t in sizes if t < 256} == {t % 16 == 0 for t in sizes if t > 256} == {True, False}


def test_kernels_are_compiled_once_for_every_count_and_slot_list():
    """What varies between calls must not pick another compiled variant, or the first call that
    differs from kv_io.warm_up's compiles on the scheduler thread. SGLang's allocator hands out
    slot lists that are views of its free list, 8 bytes apart, so half are not 16-byte aligned
    (Triton specializes pointers on that by default): every kernel ignores the alignment of
    ``slots`` and the value of its counts."""
    from harness import make_params
    from evicpress_sglang.codecs import kernels

    alloc = make_params(256).token_to_kv_pool_allocator
    alloc.alloc(1)
    assert alloc.alloc(4).data_ptr() % 16 != 0  # the case the kernels must not specialize on
    for kernel, counts in ((kernels._copy, {"rows"}), (kernels._absmax, {"rows"}),
                           (kernels._kivi_k, {"tokens", "full"}), (kernels._kivi_v, {"rows"})):
        assert "slots" in kernel.do_not_specialize_on_alignment, kernel.fn.__name__
        assert counts <= set(kernel.do_not_specialize), kernel.fn.__name__


#: An 8B-class geometry (32 layers x 8 KV heads x 128, bf16) at 2**24 tokens. Its payloads pass
#: 2**31 bytes from about 32k tokens (bf16) or 55k (int4).
LONG = KVShape(32, 2**24, 8, 128, torch.bfloat16)


@pytest.mark.parametrize("name", ["bf16", "fp8", "int8", "int4", "int2", "keep+int4"])
def test_no_launch_argument_changes_type_with_the_context_length(name):
    """Triton compiles a plain int argument as i32 or as i64 by its value, and a pointer as 16-byte
    aligned or not, each a kernel of its own: a long context must not compile, on the scheduler
    thread, a kernel that kv_io.warm_up's short one did not. So up to 2**24 tokens of an 8B model,
    every int argument of every launch is a count that fits i32 (and is not specialized on), and
    the payload is reached through views of it, each 16-byte aligned in an aligned payload (a
    keep+ codec's too, after its positions), so that their alignment specialization (kept: it
    makes the payload's accesses 16 bytes wide) is always the same. The grid fits CUDA's limits.
    Meta tensors: nothing is allocated."""
    codec = get_codec(name)
    quantizer = codec.device_codec.inner if drops_tokens(codec) else codec
    kept = codec.output_shape(LONG)
    payload = torch.empty(codec.nbytes(LONG), dtype=torch.uint8, device="meta")
    inner = payload[codec.nbytes(LONG) - quantizer.nbytes(kept):]
    pool = torch.empty(1, LONG.heads, LONG.head_dim, dtype=LONG.dtype, device="meta")
    slots = torch.empty(kept.tokens, dtype=torch.int64, device="meta")
    offsets = torch.empty(2 * LONG.layers, dtype=torch.int64, device="meta")
    for encoding in (True, False):
        for launch in kernels.launches(encoding, quantizer, kept, pool, offsets, slots, inner):
            kernel = launch.kernel
            params = [p.name for p in kernel.params if not p.is_constexpr]
            assert len(launch.args) == len(params), kernel.fn.__name__
            views = 0
            for param, arg in zip(params, launch.args):
                where = f"{kernel.fn.__name__}({param})"
                if isinstance(arg, torch.Tensor):
                    if arg._base is payload:
                        views += 1
                        assert arg.storage_offset() % 16 == 0, (where, arg.storage_offset())
                        assert param not in kernel.do_not_specialize_on_alignment, where
                else:
                    assert type(arg) is int and -2**31 <= arg < 2**31, (where, arg)
                    assert param in kernel.do_not_specialize, where
            assert views >= 2, kernel.fn.__name__  # the payload is reached through its segments
            assert launch.grid[0] < 2**31 and max(launch.grid[1:]) < 2**16, (kernel.fn.__name__, launch.grid)


def test_a_store_and_its_load_back_lay_out_the_payload_once(monkeypatch):
    """The Python that runs before the launches, on the scheduler thread at every store and
    load-back, builds a payload's segments once for its size and once for its layout per shape,
    not once per size check and argument."""
    pool, slots = pool_with_kv()
    codec = Int4Codec()  # not the registry's: nothing of it is memoised yet
    segments = codec.segments
    built = []
    monkeypatch.setattr(codec, "segments", lambda shape: built.append(shape) or segments(shape))
    monkeypatch.setattr(kv_io, "_failed", set())
    monkeypatch.setattr(kv_io.kernels, "supports", lambda quantizer, k_buffer: True)
    launched = []
    monkeypatch.setattr(kv_io.kernels, "_launch", launched.append)
    enc = kv_io.encode_from_pool(pool, slots, codec)
    kv_io.decode_into_pool(pool, slots, codec, enc)
    assert [launch.kernel for launch in launched] == [kernels._kivi_k, kernels._kivi_v] * 2
    assert len(built) == 2  # once for its size, once for its layout (seven times before)


def test_buffer_offsets_are_those_of_the_buffers_passed_when_a_list_changes():
    """buffer_offsets is cached per pool, and a hit reads only the first buffer's address; it
    still never answers with the offsets of buffers that a list no longer holds."""
    k = [torch.zeros(4, 2, 8) for _ in range(2)]
    v = [torch.zeros(4, 2, 8) for _ in range(2)]

    def expected() -> list[int]:
        return [(b.data_ptr() - k[0].data_ptr()) // 4 for b in (*k, *v)]

    first = kernels.buffer_offsets(k, v)
    assert first.tolist() == expected() and kernels.buffer_offsets(k, v) is first
    k[1] = torch.zeros(4, 2, 8)  # the same list now holds another tensor
    assert kernels.buffer_offsets(k, v).tolist() == expected()
    k[0] = torch.zeros(4, 2, 8)  # and another first one, the base of every offset
    assert kernels.buffer_offsets(k, v).tolist() == expected()
    assert kernels.buffer_offsets(list(k), list(v)).tolist() == expected()  # other lists, same tensors


def test_buffer_offsets_keep_no_pool_alive():
    """The cache refers to a pool's buffers weakly: a pool that is dropped frees its memory."""
    k = [torch.zeros(4, 2, 8) for _ in range(2)]
    v = [torch.zeros(4, 2, 8) for _ in range(2)]
    kernels.buffer_offsets(k, v)
    gone = weakref.ref(k[1])
    del k, v
    assert gone() is None


@pytest.mark.parametrize("name", ["keydiff:0.5", "knorm:0.5", "expected:0.5", "kvzip:0.5"])
def test_a_dropping_store_reads_the_pool_a_few_layers_at_a_time(monkeypatch, name):
    """With room for one layer, the store path that moves the payload without a gathered copy
    (a GPU kernel; bf16's per-layer copy on this CPU pool) never gathers more than one layer of
    K or V from the pool to select tokens (a 100k-token context of an 8B model is ~6.5 GB of K),
    and writes the blob that scoring everything at once writes."""
    from evicpress_sglang.codecs import drop, queries
    from test_query_selectors import _model

    pool, slots = pool_with_kv()
    layout = kv_io.pool_layout(pool)
    queries.use(_model(layout.layers, layout.heads, layout.head_dim, mean=torch.randn(layout.head_dim)))
    try:
        codec = get_codec(name)
        whole = kv_io.encode_from_pool(pool, slots, codec)
        gathered = []
        real_stack = kv_io._stack
        monkeypatch.setattr(kv_io, "_stack", lambda buffers, idx: gathered.append(len(buffers)) or real_stack(buffers, idx))
        monkeypatch.setattr(drop, "CHUNK_BYTES", 1)
        chunked = kv_io.encode_from_pool(pool, slots, codec)
    finally:
        queries.use(None)
    assert gathered and max(gathered) == 1
    assert torch.equal(chunked.payload, whole.payload)
