"""Two servers share contexts through a real Mooncake store (issue 19): what server A stored
(compressed), server B loads on its first request for it instead of prefilling; a store
that goes away turns B's lookups into misses without hanging."""

import json
import subprocess
import sys
from pathlib import Path


from content_key_setup import DOCS, SYSTEM
from harness import expected_kv, free_slots_accounted, serve
from shared_worker import ANCHOR, HEADER, server

WORKER = Path(__file__).with_name("shared_worker.py")


def test_server_b_loads_what_server_a_stored(mooncake_store):
    """A's tree splits the documents after their common header, B's ends its match before it:
    the contexts are keyed at anchors, not where either tree happens to split."""
    remote = mooncake_store.remote_config("shared-test")
    a = _worker("publish", remote, 4)
    try:
        line = a.stdout.readline()
        assert line, a.stderr.read()[-3000:]
        report = json.loads(line)
        assert report["published"] >= 4 and report["stores"].get("host:int8", 0) >= 4
        b = server(remote)
        serve(b, SYSTEM)  # B's own first request computes the shared prompt
        for doc in DOCS[:4]:
            tokens = SYSTEM + HEADER + doc + [8]
            r = serve(b, tokens)
            assert r.loaded >= len(doc)  # from the store, through host memory, not prefilled
            k, v = expected_kv(tokens)
            for got, want in ((r.k, k), (r.v, v)):
                assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 0.02  # int8's bound
            assert free_slots_accounted(b) and b.audit() == []
        assert b.stats.shared_hits >= 4 and b.stats.hits.get("host:int8", 0) >= 4
        assert b.health.internal_errors == 0
        assert b.status()["tiers"]["remote"]["entries"] == 0  # B published nothing yet
    finally:
        a.stdin.close()  # A leaves the store cleanly (its segment with it), so later tests never
        try:             # have the store place objects in the segment of a dead client
            a.wait(timeout=60)
        except subprocess.TimeoutExpired:
            a.kill()
            a.wait()


def test_a_store_that_goes_away_is_a_miss_and_nothing_hangs(tmp_path):
    from mooncake_fixture import mooncake_server

    with mooncake_server(tmp_path / "mc") as store:
        b = _worker("outage", store.remote_config("outage-test", get_timeout_s=0.3, contains_timeout_s=0.2), 3)
        try:
            assert json.loads(b.stdout.readline() or "{}").get("ready"), b.stderr.read()[-3000:]
            store.kill_master()
            b.stdin.write("go\n")
            b.stdin.flush()
            report = json.loads(b.stdout.readline() or "{}")
            assert report, b.stderr.read()[-3000:]
        finally:
            b.kill()
            b.wait()
    assert report["seconds"] < 10 and report["internal_errors"] == 0
    assert all(r["loaded"] == 0 and r["exact"] for r in report["results"])


def _worker(mode: str, remote: dict, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), mode, json.dumps(remote), str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent)


def test_an_unusable_shared_blob_is_a_miss(mooncake_store):
    """Under the key a request computes: a blob of a codec this server cannot hold, or one whose
    tokens the request does not continue (another namespace), is a miss, never attached."""
    from evicpress_sglang.codecs import get_codec

    remote = mooncake_store.remote_config("unusable-test")
    b = server(remote)
    serve(b, SYSTEM)
    node = next(iter(b.root_node.children.values()))
    def publish(doc, codec, extra_key):
        tokens = SYSTEM + doc
        k, v = expected_kv(tokens)
        # B's match ends at 40 tokens (SYSTEM), in the window [ANCHOR, 2 * ANCHOR)
        b.shared.put(b._shared_key(None, tokens[:2 * ANCHOR]), get_codec(codec).encode(k[:, ANCHOR:], v[:, ANCHOR:]),
                     {"codec": codec, "start": ANCHOR, "tokens": tokens[ANCHOR:], "extra_key": extra_key})
        b.shared.flush()  # sent: read back from the store

    publish(DOCS[5], "int4", None)
    r = serve(b, SYSTEM + DOCS[5] + [8])  # int4 is not among this server's host codecs
    assert r.loaded == 0 and b.stats.shared_hits == 0 and b.stats.misses.get("remote") == 1
    publish(DOCS[6], "int8", "other")
    r = serve(b, SYSTEM + DOCS[6] + [8])
    assert r.loaded == 0 and b.stats.shared_hits == 0 and b.stats.misses.get("remote") == 2
    publish(DOCS[7], "int8", None)  # usable, but it could not arrive before recomputing it would finish:
    b.cost.prefill_s_per_token = 1e-9  # not even read (the request is not held for it)
    r = serve(b, SYSTEM + DOCS[7] + [8])
    assert r.loaded == 0 and b.shared.usage().counters["too_large"] == 1
    assert node.lock_ref == 0 and b.audit() == [] and b.health.internal_errors == 0

