"""Admin endpoints and settings: the HTTP side against a scheduler stand-in that runs the
real hooks (SGLang's plugin wrappers) around a real evicpress cache."""

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evicpress_sglang.admin import add_routes, parse_policy_request, policy_choices
from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.cli import serve_command
from evicpress_sglang.settings import ENV, Settings, SettingsError, load_settings
from harness import FakeTokenizerManager, FakeScheduler, make_params, serve


@pytest.fixture
def client(tmp_path, monkeypatch):
    settings = {"host_bytes": "1MiB", "disk_dir": str(tmp_path), "disk_bytes": "10MiB"}
    monkeypatch.setenv(ENV, json.dumps(settings))
    cache = EvicPressRadixCache(make_params(256), load_settings())
    for i in range(3):
        serve(cache, list(range(100 * i, 100 * i + 90)))
    tm = FakeTokenizerManager(FakeScheduler(cache))
    app = FastAPI()
    add_routes(app, lambda: tm, lambda: None)
    return TestClient(app), cache, tm


def test_status_reports_policy_tiers_and_contexts(client):
    c, cache, _ = client
    r = c.get("/evicpress/status")
    assert r.status_code == 200
    s = r.json()
    assert s["policy"] == "evicpress" and s["contexts"] == len(cache.table)
    assert set(s["tiers"]) == {"gpu", "host", "disk"} and s["tiers"]["host"]["capacity_bytes"] == 2**20
    assert s["placements"] and "utility" in s["placements"][0]


def test_policy_switch_takes_effect_and_shows_in_status(client):
    c, cache, tm = client
    r = c.post("/evicpress/policy", json={"policy": "static:int4", "alpha": 0.5, "quality_floor": 0.8})
    assert r.status_code == 200, r.text
    assert r.json()["policy"] == "static:int4" and r.json()["weights"] == {"alpha": 0.5, "quality_floor": 0.8}
    assert cache.policy.name == "static:int4"
    assert c.post("/evicpress/policy", json={"policy": "off"}).json()["policy"] == "off" and cache.policy is None
    assert tm.scheduler.other_updates == []  # nothing leaked to SGLang's own knobs


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (json.dumps({"policy": "fifo"}).encode(), "unknown policy"),
    (json.dumps({"policy": "static:int3"}).encode(), "not among the enabled"),
    (json.dumps({"alpha": -1}).encode(), "alpha must be"),
    (json.dumps({"quality_floor": 1.5}).encode(), "quality_floor must be"),
    (json.dumps({"alpha": "fast"}).encode(), "alpha must be"),
    (json.dumps({"polcy": "lru"}).encode(), "unknown field"),
])
def test_malformed_requests_are_400_and_change_nothing(client, body, message):
    c, cache, _ = client
    before = (cache.settings.policy, cache.settings.alpha, cache.settings.quality_floor)
    r = c.post("/evicpress/policy", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]
    assert (cache.settings.policy, cache.settings.alpha, cache.settings.quality_floor) == before


def test_admin_key_is_required_when_configured(client):
    c, cache, tm = client
    tm.server_args.admin_api_key = "s3cret"
    assert c.get("/evicpress/status").status_code == 401
    assert c.post("/evicpress/policy", json={"policy": "lru"}).status_code == 401
    assert cache.settings.policy == "evicpress"
    ok = c.post("/evicpress/policy", json={"policy": "lru"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and cache.settings.policy == "lru"


def test_policy_indices_agree_between_processes():
    s = Settings(disk_dir="/x", disk_bytes=1)
    args = parse_policy_request(b'{"policy": "static:int4+zstd"}', s)
    assert policy_choices(Settings(disk_dir="/y", disk_bytes=5))[int(args["evicpress_policy"])] == "static:int4+zstd"


def test_settings_validation_names_the_setting(tmp_path):
    for raw, msg in [({"host_bytes": "lots"}, "host_bytes"), ({"alpha": "x"}, "alpha"),
                     ({"quality_floor": 2}, "quality_floor"), ({"host_codecs": ["int3"]}, "host_codecs"),
                     ({"disk_dir": str(tmp_path)}, "disk_bytes"), ({"polcy": "lru"}, "unknown setting"),
                     ({"policy": "static:fp8", "host_codecs": ["bf16"]}, "policy"),
                     ({"prefill_s_per_token": "fast"}, "prefill_s_per_token"),
                     ({"prefill_s_per_token": -1e-5}, "prefill_s_per_token"),
                     ({"prefill_s_per_token": True}, "prefill_s_per_token"),
                     ({"profile_share": 1.5}, "profile_share"), ({"profile_share": "lots"}, "profile_share"),
                     ({"profile_score": "bleu"}, "profile_score"), ({"profile_answer_tokens": 0}, "profile_answer_tokens"),
                     ({"profile_max_age_s": 0}, "profile_max_age_s"), ({"profile_min_tokens": True}, "profile_min_tokens"),
                     ({"profile_self_questions": -1}, "profile_self_questions"),
                     ({"status_top": True}, "status_top"), ({"held_out_queries": 1.5}, "held_out_queries"),
                     ({"remote": "mooncake"}, "remote"), ({"remote": {"backend": "redis"}}, "remote"),
                     ({"remote_codecs": ["int3"]}, "remote_codecs"), ({"remote_codecs": 7}, "remote_codecs"),
                     ({"evict_budget_ms": 0}, "evict_budget_ms"), ({"evict_budget_ms": "fast"}, "evict_budget_ms"),
                     ({"async_plan_min_contexts": -1}, "async_plan_min_contexts"),
                     ({"async_plan_min_contexts": 2.5}, "async_plan_min_contexts")]:
        with pytest.raises(SettingsError, match=msg):
            load_settings({ENV: json.dumps(raw)})
    with pytest.raises(SettingsError, match="invalid JSON"):
        load_settings({ENV: "{oops"})
    cfg = tmp_path / "evicpress.json"
    cfg.write_text(json.dumps({"host_bytes": "8GiB", "policy": "lru-offload"}))
    s = load_settings({ENV: str(cfg)})
    assert s.host_bytes == 8 * 2**30 and s.policy == "lru-offload"
    assert load_settings({ENV: '{"prefill_s_per_token": 3.8e-5}'}).prefill_s_per_token == 3.8e-5
    assert load_settings({ENV: '{"prefill_s_per_token": null}'}).prefill_s_per_token is None  # learnt


def test_serve_command_builds_the_sglang_launch():
    cmd, env = serve_command(["--evicpress-host-bytes", "2GiB", "--evicpress-alpha", "1.5", "--model-path", "/m",
                              "--port", "3000"], {})
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[3:] == ["--model-path", "/m", "--port", "3000", "--radix-cache-backend", "evicpress"]
    assert json.loads(env[ENV]) == {"host_bytes": "2GiB", "alpha": 1.5}
    with pytest.raises(SettingsError, match="host_bytes"):
        serve_command(["--evicpress-host-bytes", "2XB", "--model-path", "/m"], {})
    _, env = serve_command(["--evicpress-profile-share", "0", "--evicpress-profile-score", "f1", "--model-path", "/m"],
                           {})
    assert json.loads(env[ENV]) == {"profile_share": 0.0, "profile_score": "f1"}
    with pytest.raises(SettingsError, match="profile_score"):
        serve_command(["--evicpress-profile-score", "bleu", "--model-path", "/m"], {})


def test_plugin_registers_backend_and_hooks():
    from sglang.srt.mem_cache.registry import registered_radix_cache_backends
    from sglang.srt.plugins import load_plugins

    load_plugins()
    assert "evicpress" in registered_radix_cache_backends()
    from sglang.srt.managers.scheduler import Scheduler

    assert getattr(Scheduler.get_internal_state, "__wrapped__", None) is not None
    from sglang.srt.managers.tp_worker import TpModelWorker

    assert getattr(TpModelWorker.forward_batch_generation, "__wrapped__", None) is not None  # prefill timing


def test_admin_routes_reach_sglangs_http_app_when_it_launches():
    """SGLang may load plugins before it imports its HTTP server module; the hook on
    launch_server must still put the endpoints on the app that will serve."""
    import subprocess
    import sys

    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins()\n"
        "import sglang.srt.entrypoints.http_server as h\n"
        "assert getattr(h.launch_server, '__wrapped__', None) is not None, 'launch_server not hooked'\n"
        "from types import SimpleNamespace as N\n"
        "from evicpress_sglang import plugin\n"
        "plugin._before_launch(N(radix_cache_backend='evicpress', host='0.0.0.0', port=31234, api_key=None,"
        " admin_api_key=None))\n"
        "paths = {getattr(r, 'path', '') for r in h.app.routes}\n"
        "assert {'/evicpress/status', '/evicpress/policy', '/evicpress/profile'} <= paths, paths\n"
        "assert plugin._profiler.client.url == 'http://127.0.0.1:31234', plugin._profiler.client.url\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
