"""Runtime control: ``GET /evicpress/status`` and ``POST /evicpress/policy``.

The cache lives in the scheduler process; the HTTP server in the main one. Both
endpoints ride on SGLang's own scheduler plumbing, extended through hooks:

* status: ``/get_server_info``'s ``GetInternalStateReq``; the hooked
  ``Scheduler.get_internal_state`` adds the cache's status under ``"evicpress"``;
* policy: ``SetInternalStateReq``, whose values must be numbers, so the request is
  validated here and sent as ``evicpress_policy`` (an index into
  :func:`policy_choices`, which both processes compute from the same settings),
  ``evicpress_alpha`` and ``evicpress_quality_floor``; the hooked
  ``Scheduler.set_internal_state`` applies them and passes everything else on.

A malformed request gets HTTP 400 naming what is wrong, and changes nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
import math

from fastapi import Request
from fastapi.responses import JSONResponse

from .settings import POLICY_NAMES, Settings, SettingsError, load_settings, validate_policy_name

log = logging.getLogger(__name__)

KEY_POLICY, KEY_ALPHA, KEY_FLOOR = "evicpress_policy", "evicpress_alpha", "evicpress_quality_floor"


def policy_choices(settings: Settings) -> list[str]:
    """Every policy name this server accepts, in a fixed order shared by both processes."""
    return list(POLICY_NAMES) + [f"static:{c}" for c in settings.stored_codecs]


def parse_policy_request(body: bytes, settings: Settings) -> dict[str, float]:
    """The ``SetInternalStateReq`` arguments for a ``POST /evicpress/policy`` body.

    Body: JSON object with any of ``policy`` (name), ``alpha`` (>= 0), ``quality_floor``
    (0..1). Raises :class:`SettingsError` with a message for the client.
    """
    try:
        req = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not req:
        raise SettingsError('body must be a JSON object like {"policy": "evicpress", "alpha": 2.0}')
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


def add_routes(app, get_tokenizer_manager) -> None:
    """Install the two endpoints on SGLang's FastAPI app."""
    settings = load_settings()

    async def status(request: Request):
        tm = get_tokenizer_manager()
        if not authorized(request.headers, tm.server_args, settings):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        states = await tm.get_internal_state()
        found = [s["evicpress"] for s in states if isinstance(s, dict) and "evicpress" in s]
        if not found:
            return JSONResponse({"error": "the evicpress cache is not active (launch with --radix-cache-backend "
                                          "evicpress)"}, status_code=404)
        return JSONResponse(found[0] if len(found) == 1 else {"ranks": found})

    async def set_policy(request: Request):
        from sglang.srt.managers.io_struct import SetInternalStateReq

        tm = get_tokenizer_manager()
        if not authorized(request.headers, tm.server_args, settings):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        try:
            args = parse_policy_request(await request.body(), settings)
        except SettingsError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        ok = await tm.set_internal_state(SetInternalStateReq(server_args=args))
        if not all(ok):
            return JSONResponse({"error": "the scheduler refused the change; see the server log"}, status_code=400)
        return await status(request)

    app.add_api_route("/evicpress/status", status, methods=["GET"])
    app.add_api_route("/evicpress/policy", set_policy, methods=["POST"])
