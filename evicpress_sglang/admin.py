"""Runtime control: ``GET /evicpress/status``, ``POST /evicpress/policy`` and the profiler's
routes (``POST /evicpress/profile`` to profile one context now; ``/evicpress/profile/jobs``
and ``/evicpress/profile/report``, which the profiler itself uses).

The cache lives in the scheduler process; the HTTP server in the main one. Both
endpoints ride on SGLang's own scheduler plumbing, extended through hooks:

* status: ``/get_server_info``'s ``GetInternalStateReq``; the hooked
  ``Scheduler.get_internal_state`` adds the cache's status under ``"evicpress"``;
* policy: ``SetInternalStateReq``, whose values must be numbers, so the request is
  validated here and sent as ``evicpress_policy`` (an index into
  :func:`policy_choices`, which both processes compute from the same settings),
  ``evicpress_alpha`` and ``evicpress_quality_floor``; the hooked
  ``Scheduler.set_internal_state`` applies them and passes everything else on.

* profiler: ``SetInternalStateReq`` again, numbers only: ``evicpress_profile_want`` (make
  jobs), ``evicpress_profile_node`` (a job for that context), or a report
  (``evicpress_profile_report`` = job, ``evicpress_profile_queries``, and
  ``evicpress_profile_q:<variant>`` = quality); the jobs come back in the hooked
  ``get_internal_state`` under ``"evicpress_profile"``.

A malformed request gets HTTP 400 naming what is wrong, and changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math

from fastapi import Request
from fastapi.responses import JSONResponse

from .settings import POLICY_NAMES, Settings, SettingsError, load_settings, validate_policy_name, whole_number

log = logging.getLogger(__name__)

KEY_POLICY, KEY_ALPHA, KEY_FLOOR = "evicpress_policy", "evicpress_alpha", "evicpress_quality_floor"
KEY_WANT, KEY_NODE = "evicpress_profile_want", "evicpress_profile_node"
KEY_REPORT, KEY_QUERIES, KEY_QUALITY = "evicpress_profile_report", "evicpress_profile_queries", "evicpress_profile_q:"


def policy_choices(settings: Settings) -> list[str]:
    """Every policy name this server accepts, in a fixed order shared by both processes."""
    return list(POLICY_NAMES) + [f"static:{c}" for c in settings.stored_codecs]


def _json_object(body: bytes, example: str) -> dict:
    try:
        req = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not req:
        raise SettingsError(f"body must be a JSON object like {example}")
    return req


def parse_policy_request(body: bytes, settings: Settings) -> dict[str, float]:
    """The ``SetInternalStateReq`` arguments for a ``POST /evicpress/policy`` body.

    Body: JSON object with any of ``policy`` (name), ``alpha`` (>= 0), ``quality_floor``
    (0..1). Raises :class:`SettingsError` with a message for the client.
    """
    req = _json_object(body, '{"policy": "evicpress", "alpha": 2.0}')
    unknown = sorted(set(req) - {"policy", "alpha", "quality_floor"})
    if unknown:
        raise SettingsError(f"unknown field(s) {unknown}; valid: policy, alpha, quality_floor")
    out: dict[str, float] = {}
    if "policy" in req:
        name = req["policy"]
        if not isinstance(name, str):
            raise SettingsError(f"policy must be a string, got {name!r}")
        validate_policy_name(name, settings)
        choices = policy_choices(settings)
        if name not in choices:
            raise SettingsError(f"policy {name!r} is not enabled here; valid: {', '.join(choices)}")
        out[KEY_POLICY] = choices.index(name)
    for field, key, lo, hi in (("alpha", KEY_ALPHA, 0.0, math.inf), ("quality_floor", KEY_FLOOR, 0.0, 1.0)):
        if field in req:
            v = req[field]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise SettingsError(f"{field} must be a number in [{lo}, {hi}], got {v!r}")
            out[key] = float(v)
    return out


def parse_jobs_request(body: bytes) -> dict[str, int]:
    """``{"want": n}`` (up to n jobs for the contexts that need profiling most) or
    ``{"node": id}`` (the job for one context)."""
    req = _json_object(body, '{"want": 1} or {"node": 42}')
    if set(req) == {"want"}:
        return {KEY_WANT: whole_number("want", req["want"], 1)}
    if set(req) == {"node"}:
        return {KEY_NODE: whole_number("node", req["node"], 0)}
    raise SettingsError(f'body must be {{"want": n}} or {{"node": id}}, got fields {sorted(req)}')


def parse_node_request(body: bytes) -> int:
    """``{"node": id}`` for ``POST /evicpress/profile``."""
    req = _json_object(body, '{"node": 42}')
    if set(req) != {"node"}:
        raise SettingsError(f'body must be {{"node": id}} (a context listed in /evicpress/status), got {sorted(req)}')
    return whole_number("node", req["node"], 0)


def parse_report_request(body: bytes) -> dict[str, float]:
    """``{"job": id, "queries": n, "quality": {"<variant>": q, ...}}`` from the profiler."""
    req = _json_object(body, '{"job": 3, "queries": 4, "quality": {"1": 0.97}}')
    if set(req) != {"job", "queries", "quality"}:
        raise SettingsError(f"a report needs exactly job, queries and quality; got {sorted(req)}")
    out: dict[str, float] = {KEY_REPORT: whole_number("job", req["job"], 1), KEY_QUERIES: whole_number("queries", req["queries"], 0)}
    quality = req["quality"]
    if not isinstance(quality, dict):
        raise SettingsError(f"quality must be an object of variant -> number, got {quality!r}")
    for variant, q in quality.items():
        if not variant.isdigit() or int(variant) < 1:
            raise SettingsError(f"quality: variant {variant!r} is not a lossy variant number (>= 1)")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise SettingsError(f"quality[{variant}] must be a number in [0, 1], got {q!r}")
        out[KEY_QUALITY + variant] = float(q)
    return out


def apply_profile_request(cache, args: dict, idle: bool) -> bool:
    """Scheduler side of the profiler's requests; False when a report was refused.
    New jobs are made only while the scheduler is ``idle`` (nothing waits in its queue).
    Under the cache's lock: jobs lock and free tree nodes, and status reads them."""
    with cache.lock:
        if KEY_WANT in args:
            cache.profiling.prepare(int(args[KEY_WANT]), idle=idle)
            return True
        if KEY_NODE in args:
            cache.profiling.prepare_for(int(args[KEY_NODE]))
            return True
        quality = {int(k.removeprefix(KEY_QUALITY)): float(v) for k, v in args.items() if k.startswith(KEY_QUALITY)}
        return cache.profiling.report(int(args[KEY_REPORT]), quality, int(args.get(KEY_QUERIES, 0)))["accepted"]


def apply_policy_request(cache, args: dict) -> None:
    """Scheduler side: apply what :func:`parse_policy_request` produced, all or nothing."""
    from .policy import Weights

    s = cache.settings
    name = policy_choices(s)[int(args[KEY_POLICY])] if KEY_POLICY in args else s.policy
    weights = Weights(float(args.get(KEY_ALPHA, s.alpha)), float(args.get(KEY_FLOOR, s.quality_floor)))
    cache.set_policy(name, weights)
    log.info("evicpress: policy %s, alpha %s, quality floor %s", name, weights.alpha, weights.quality_floor)


def authorized(headers, server_args, settings: Settings) -> bool:
    """An admin key (ours or SGLang's --admin-api-key) if one is set, else --api-key, else open."""
    admin = [k for k in (settings.admin_key, getattr(server_args, "admin_api_key", None)) if k]
    keys = admin or [k for k in (getattr(server_args, "api_key", None),) if k]
    if not keys:
        return True
    given = headers.get("authorization", "").removeprefix("Bearer ").strip()
    return any(hmac.compare_digest(given, k) for k in keys)


def add_routes(app, get_tokenizer_manager, get_profiler) -> None:
    """Install the endpoints on SGLang's FastAPI app. ``get_profiler()``: this server's
    :class:`~evicpress_sglang.profiler.runner.Profiler`."""
    from sglang.srt.managers.io_struct import SetInternalStateReq

    settings = load_settings()

    def guarded(handler):
        async def route(request: Request):
            tm = get_tokenizer_manager()
            if not authorized(request.headers, tm.server_args, settings):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            try:
                return await handler(request, tm)
            except SettingsError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
        return route

    async def scheduler_state(tm, key: str):
        states = await tm.get_internal_state()
        found = [s[key] for s in states if isinstance(s, dict) and key in s]
        if not found:
            return None
        return found[0] if len(found) == 1 else {"ranks": found}

    not_active = JSONResponse({"error": "the evicpress cache is not active (launch with --radix-cache-backend "
                                        "evicpress)"}, status_code=404)

    async def status(request: Request, tm):
        found = await scheduler_state(tm, "evicpress")
        return not_active if found is None else JSONResponse(found)

    async def tell_scheduler(tm, args: dict) -> bool:
        return all(await tm.set_internal_state(SetInternalStateReq(server_args=args)))

    async def set_policy(request: Request, tm):
        if not await tell_scheduler(tm, parse_policy_request(await request.body(), settings)):
            return JSONResponse({"error": "the scheduler refused the change; see the server log"}, status_code=400)
        return await status(request, tm)

    async def profile_jobs(request: Request, tm):
        args = parse_jobs_request(await request.body())
        await tell_scheduler(tm, args)
        found = await scheduler_state(tm, "evicpress_profile")
        if found is None:
            return not_active
        if KEY_NODE in args:  # only a job made for this request, never one the background loop runs
            jobs = [j for j in found["jobs"] if j["node"] == args[KEY_NODE] and j["asked_for"]]
        else:  # and the background loop never takes a job someone asked for by node
            jobs = [j for j in found["jobs"] if not j["asked_for"]]
        return JSONResponse({"jobs": jobs, "refusal": found["refusal"]})

    async def profile_report(request: Request, tm):
        args = parse_report_request(await request.body())
        if not await tell_scheduler(tm, args):
            return JSONResponse({"error": "report refused: the job is unknown or expired"}, status_code=409)
        found = await scheduler_state(tm, "evicpress_profile")
        return JSONResponse(found["outcomes"].get(str(int(args[KEY_REPORT])), {"accepted": True}))

    async def profile_now(request: Request, tm):
        from .profiler.client import ServerError

        node = parse_node_request(await request.body())
        try:
            result = await asyncio.to_thread(get_profiler().profile_node, node)
        except ServerError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse(result)

    app.add_api_route("/evicpress/status", guarded(status), methods=["GET"])
    app.add_api_route("/evicpress/policy", guarded(set_policy), methods=["POST"])
    app.add_api_route("/evicpress/profile", guarded(profile_now), methods=["POST"])
    app.add_api_route("/evicpress/profile/jobs", guarded(profile_jobs), methods=["POST"])
    app.add_api_route("/evicpress/profile/report", guarded(profile_report), methods=["POST"])
