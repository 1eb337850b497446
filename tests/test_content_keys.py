"""Stored contexts are found by content (issue 19): after a kill -9 and a restart, a new
process serves what the old one stored on disk, even though every context's parent (the
system prompt) was never stored; a blob of another layout is a miss and is left alone."""

import subprocess
import sys
from pathlib import Path

import torch

from content_key_setup import DOCS, SYSTEM, settings
from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.policy import Tier
from harness import expected_kv, free_slots_accounted, make_params, serve

WORKER = Path(__file__).with_name("disk_worker.py")


def _killed_writer(disk_dir, n: int) -> int:
    """Run the worker, which stores n documents and dies by SIGKILL; the count it stored."""
    r = subprocess.run([sys.executable, str(WORKER), str(disk_dir), str(n)], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parent)
    assert r.returncode == -9, r.stdout + r.stderr[-3000:]
    return int(r.stdout.split("stored")[1].split()[0])


def test_a_new_process_serves_what_a_killed_one_stored(tmp_path):
    n = 10
    stored = _killed_writer(tmp_path / "disk", n)
    assert stored >= n
    cache = EvicPressRadixCache(make_params(1024), settings(tmp_path / "disk"))
    assert cache.status()["tiers"]["disk"]["dormant"] >= n  # indexed, nothing deleted
    serve(cache, SYSTEM)  # the first request of the new process computes the shared prompt
    found = 0
    for doc in DOCS[:n]:
        tokens = SYSTEM + doc + [8]
        r = serve(cache, tokens)
        k, v = expected_kv(tokens)
        assert torch.equal(r.k, k) and torch.equal(r.v, v)  # bit-exact
        found += r.loaded >= len(doc)
        assert free_slots_accounted(cache) and cache.audit() == []
    assert found >= 0.9 * n
    assert cache.stats.found_by_content >= found and cache.stats.hits
    assert cache.health.internal_errors == 0


def test_another_model_is_a_miss_and_its_blobs_stay(tmp_path, monkeypatch):
    _killed_writer(tmp_path / "disk", 4)
    files = sorted(p.name for p in (tmp_path / "disk").glob("*.kv"))
    monkeypatch.setattr("evicpress_sglang.backend.cache.model_name", lambda: "another/model")
    cache = EvicPressRadixCache(make_params(1024), settings(tmp_path / "disk"))
    assert cache.status()["tiers"]["disk"]["dormant"] == 0
    serve(cache, SYSTEM)
    r = serve(cache, SYSTEM + DOCS[0] + [8])
    assert r.loaded == 0
    assert sorted(p.name for p in (tmp_path / "disk").glob("*.kv")) == files


def test_a_damaged_blob_found_by_content_is_a_miss(tmp_path):
    _killed_writer(tmp_path / "disk", 3)
    for p in (tmp_path / "disk").glob("*.kv"):  # flip a byte in every payload
        data = bytearray(p.read_bytes())
        data[-20] ^= 0xFF
        p.write_bytes(bytes(data))
    cache = EvicPressRadixCache(make_params(1024), settings(tmp_path / "disk"))
    serve(cache, SYSTEM)
    for doc in DOCS[:3]:
        tokens = SYSTEM + doc + [8]
        r = serve(cache, tokens)
        assert r.loaded == 0
        k, _ = expected_kv(tokens)
        assert torch.equal(r.k, k)
    assert sum(cache.stats.misses.values()) >= 3 and cache.health.internal_errors == 0


def test_dormant_blobs_make_room_when_the_disk_is_full(tmp_path):
    _killed_writer(tmp_path / "disk", 10)
    used = sum(p.stat().st_size for p in (tmp_path / "disk").glob("*.kv"))
    cache = EvicPressRadixCache(make_params(1024), settings(tmp_path / "disk", disk_bytes=used + 4096))
    before = cache.status()["tiers"]["disk"]["dormant"]
    for i in range(3):  # new contexts, nothing to do with the dormant ones
        serve(cache, list(range(500_000 + 1000 * i, 500_000 + 1000 * i + 80)))
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    cache.evict(EvictParams(num_tokens=10**6))
    assert cache.stats.stores.get("disk:bf16", 0) + cache.stats.stores.get("disk:bf16+zstd", 0) >= 3
    assert cache.status()["tiers"]["disk"]["dormant"] < before
    assert cache.tiers[Tier.DISK].usage().used_bytes <= used + 4096


def test_blobs_with_malformed_meta_are_left_alone(tmp_path):
    """A file written by another version or tool (its meta not ours) neither stops the
    start-up nor is deleted."""
    from evicpress_sglang.codecs import get_codec
    from evicpress_sglang.tiers import DiskTier

    k, v = expected_kv(list(range(40)))
    disk = DiskTier(tmp_path / "disk", 10**8)
    cache_fp = EvicPressRadixCache(make_params(1024), settings(tmp_path / "other")).fingerprint
    metas = [{"fp": cache_fp, "codec": "bf16"}, {"fp": cache_fp, "codec": "bf16", "tokens": "x", "start_hash": 1},
             {"fp": cache_fp, "codec": 5, "tokens": [1], "start_hash": "a"}, None, {"unrelated": True}]
    for i, meta in enumerate(metas):
        disk.put(f"b{i}", get_codec("bf16").encode(k, v), meta)
    disk.flush()
    cache = EvicPressRadixCache(make_params(1024), settings(tmp_path / "disk"))
    assert cache.status()["tiers"]["disk"]["dormant"] == 0
    assert len(list((tmp_path / "disk").glob("*.kv"))) == len(metas)
