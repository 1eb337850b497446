import errno
import threading

import pytest
import torch

from evicpress_sglang.codecs import EncodedKV, KVShape, get_codec
from evicpress_sglang.tiers import DiskTier, HostTier, TierError, TierFullError
from evicpress_sglang.tiers.host import ArenaAllocator


def _blob(nbytes: int, seed: int = 0, codec: str = "bf16") -> EncodedKV:
    g = torch.Generator().manual_seed(seed)
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return EncodedKV(codec, KVShape(1, nbytes // 4, 1, 1, torch.bfloat16), payload)


def _same(a: EncodedKV, b: EncodedKV) -> bool:
    return a.codec == b.codec and a.shape == b.shape and torch.equal(a.payload, b.payload)


# -- host tier -----------------------------------------------------------------


def test_arena_merges_freed_neighbours():
    a = ArenaAllocator(4096)
    offs = [a.alloc(1000) for _ in range(4)]  # 4 x 1024 rounded
    assert offs == [0, 1024, 2048, 3072] and a.alloc(1) is None
    a.free(offs[1], 1000)
    a.free(offs[2], 1000)
    assert a.largest_free == 2048  # merged into one range
    a.free(offs[0], 1000)
    a.free(offs[3], 1000)
    assert a.largest_free == 4096 and a.free_bytes == 4096


def test_host_fills_a_fragmented_arena_without_losing_or_overlapping_bytes():
    rng = torch.Generator().manual_seed(0)
    tier = HostTier(64 * 1024 + 100)  # not a multiple of the alignment
    live: dict[str, EncodedKV] = {}
    for step in range(400):
        if live and torch.rand((), generator=rng) < 0.45:
            key = sorted(live)[int(torch.randint(len(live), (), generator=rng))]
            assert tier.delete(key)
            del live[key]
            continue
        blob = _blob(int(torch.randint(1, 12000, (), generator=rng)), seed=step)
        try:
            tier.put(f"b{step}", blob)
        except TierFullError:
            assert tier._alloc.free_bytes < -(-blob.nbytes // 256) * 256  # refused only when truly full
            continue
        live[f"b{step}"] = blob
    assert tier.usage().counters["split_blobs"] > 0  # the scenario did fragment the arena
    for key, blob in live.items():
        assert _same(tier.get(key), blob)
    assert tier.usage().used_bytes == sum(b.nbytes for b in live.values())


def test_host_put_get_delete_and_usage():
    tier = HostTier(8192)
    blobs = {f"k{i}": _blob(1000, seed=i) for i in range(3)}
    for key, b in blobs.items():
        tier.put(key, b)
    assert tier.usage().entries == 3 and tier.usage().used_bytes == 3000
    for key, b in blobs.items():
        assert key in tier and _same(tier.get(key), b)
    assert tier.delete("k1") and not tier.delete("k1")
    assert tier.get("k1") is None and tier.usage().used_bytes == 2000


def test_host_full_is_an_error_and_keeps_what_it_had():
    tier = HostTier(4096)
    tier.put("a", _blob(3000))
    with pytest.raises(TierFullError, match="do not fit"):
        tier.put("b", _blob(3000, seed=1))
    assert _same(tier.get("a"), _blob(3000)) and not tier.contains("b")
    with pytest.raises(TierFullError):  # a replacement that does not fit keeps the old blob
        tier.put("a", _blob(4000, seed=2))
    assert _same(tier.get("a"), _blob(3000))


def test_host_splits_a_blob_over_free_ranges_when_fragmented():
    tier = HostTier(10 * 1024)
    blobs = {f"k{i}": _blob(1000, seed=i) for i in range(10)}
    for key, b in blobs.items():
        tier.put(key, b)
    for i in range(0, 10, 2):  # five 1 KiB holes, none large enough for 3000 bytes
        tier.delete(f"k{i}")
    big = _blob(3000, seed=99)
    assert tier.usage().counters["split_blobs"] == 0
    tier.put("big", big)  # over three of the holes; nothing else moves
    assert tier.usage().counters["split_blobs"] == 1
    assert _same(tier.get("big"), big)
    for i in range(1, 10, 2):
        assert _same(tier.get(f"k{i}"), blobs[f"k{i}"])
    with pytest.raises(TierFullError):  # 2 KiB free in all, in 1 KiB holes
        tier.put("too-big", _blob(2100, seed=7))
    tier.delete("big")
    assert tier.usage().used_bytes == 5000 and tier._alloc.free_bytes == 10 * 1024 - 5 * 1024


def test_host_packs_and_unpacks_a_codec_host_stage():
    codec = get_codec("int8+zstd")
    k = torch.randn(2, 32, 2, 64).bfloat16()
    inner = codec.device_codec.encode(k, k)
    tier = HostTier(1 << 20)
    tier.put("z", inner, pack=codec.pack_host)
    assert tier.usage().used_bytes < inner.nbytes  # stored entropy-coded
    assert tier.get("z").codec == "int8+zstd"
    assert _same(tier.get("z", unpack=codec.unpack_host), inner)


def test_host_get_returns_a_copy_that_outlives_the_entry():
    tier = HostTier(4096)
    tier.put("a", _blob(1000))
    got = tier.get("a")
    tier.delete("a")
    tier.put("b", _blob(1000, seed=5))  # reuses the freed range
    assert _same(got, _blob(1000))


def test_host_is_thread_safe():
    tier = HostTier(64 * 1024)
    errors = []

    def worker(t):
        try:
            for i in range(200):
                key = f"{t}-{i % 5}"
                b = _blob(512, seed=t * 1000 + i % 5)
                tier.put(key, b)
                got = tier.get(key)
                assert got is None or _same(got, b)
                if i % 3 == 0:
                    tier.delete(key)
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    usage = tier.usage()
    assert usage.used_bytes == sum(tier.get(k).nbytes for k in tier.keys())


# -- disk tier -----------------------------------------------------------------


def test_disk_roundtrip_and_restart(tmp_path):
    k = torch.randn(2, 40, 3, 64).bfloat16()
    enc = get_codec("int4+zstd").encode(k, k * 2)
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("ctx/1", enc)
    tier.put("ctx/2", _blob(500))
    tier.flush()
    used = tier.usage().used_bytes
    again = DiskTier(tmp_path, 1 << 20)  # a restart
    assert sorted(again.keys()) == ["ctx/1", "ctx/2"] and again.usage().used_bytes == used
    got = again.get("ctx/1")
    assert _same(got, enc)
    out = (torch.empty_like(k), torch.empty_like(k))
    get_codec("int4+zstd").decode(got, *out)


def _only_file(tmp_path):
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".kv"]
    return path


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "garbage"])
def test_damaged_disk_entry_is_a_miss_and_is_removed(tmp_path, damage):
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("a", _blob(4000))
    tier.flush()
    path = _only_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(data)
    elif damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"not a blob at all")
    assert tier.get("a") is None
    assert not tier.contains("a") and tier.usage().used_bytes == 0
    assert not path.exists()


def test_damaged_files_are_dropped_at_restart(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("good", _blob(1000))
    tier.put("bad", _blob(1000, seed=1))
    tier.flush()
    bad = tier._path_for("bad")
    bad.write_bytes(bad.read_bytes()[:50])
    (tmp_path / ".tmp-leftover").write_bytes(b"half a write")
    again = DiskTier(tmp_path, 1 << 20)
    assert again.keys() == ["good"] and not bad.exists()
    assert not (tmp_path / ".tmp-leftover").exists()


def test_disk_capacity_is_enforced(tmp_path):
    tier = DiskTier(tmp_path, 3000)
    tier.put("a", _blob(2000))
    with pytest.raises(TierFullError):
        tier.put("b", _blob(2000, seed=1))
    assert tier.keys() == ["a"] and _same(tier.get("a"), _blob(2000))


def test_disk_io_failure_loses_only_the_entry_being_written_and_says_why(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("a", _blob(1000))
    tier.flush()
    real_open = open

    def full_disk(path, mode="r", *args, **kw):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr("builtins.open", full_disk)
    tier.put("b", _blob(1000, seed=1))  # written behind the caller: the failure shows up later
    tier.flush()
    monkeypatch.undo()
    assert tier.keys() == ["a"] and _same(tier.get("a"), _blob(1000))
    assert tier.get("b") is None  # a miss, never wrong bytes
    usage = tier.usage()
    assert usage.counters["failed_writes"] == 1 and "No space left on device" in tier.last_error
    assert usage.used_bytes == tmp_path.joinpath(tier._path_for("a").name).stat().st_size  # reservation released
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    tier.put("b", _blob(1000, seed=1))  # and it works again once there is space
    tier.flush()
    assert tier.usage().entries == 2 and _same(tier.get("b"), _blob(1000, seed=1))


def test_disk_entry_is_served_before_its_write_and_delete_cancels_it(tmp_path, stalled_disk_writes):
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("a", _blob(3000))
    tier.put("b", _blob(3000, seed=1))
    # queued, not written: visible, counted against capacity, readable from the put's own bytes
    assert sorted(tier.keys()) == ["a", "b"] and tier.usage().used_bytes >= 6000
    assert tier.usage().counters["queued_writes"] == 2
    assert _same(tier.get("a"), _blob(3000))
    assert tier.delete("b") and not tier.contains("b")
    stalled_disk_writes.set()
    tier.flush()
    assert tier.keys() == ["a"] and [p.name for p in tmp_path.iterdir()] == [tier._path_for("a").name]
    assert tier.usage().used_bytes == tier._path_for("a").stat().st_size


def test_disk_zstd_is_packed_by_the_writer_and_unpacked_on_read(tmp_path):
    codec = get_codec("int4+zstd")
    k = torch.randn(2, 64, 3, 64).bfloat16()
    inner = codec.device_codec.encode(k, k)
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("z", inner, pack=codec.pack_host)
    tier.flush()
    on_disk = tier.get("z")
    assert on_disk.codec == "int4+zstd" and on_disk.nbytes < inner.nbytes  # what the file holds
    assert _same(tier.get("z", unpack=codec.unpack_host), inner)
    out = (torch.empty_like(k), torch.empty_like(k))
    codec.decode(on_disk, *out)
    ref = (torch.empty_like(k), torch.empty_like(k))
    codec.device_codec.decode(inner, *ref)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_disk_unusable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TierError, match="cannot create"):
        DiskTier(blocker / "sub", 1000)
