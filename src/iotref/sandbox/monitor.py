"""The sandbox's debug monitor: a web page, its JSON API and a live stream (SSE).

Access needs the admin token. The page is opened through ``/monitor?token=ADMIN_TOKEN``
(the link ``sandbox up`` prints), which sets an HttpOnly, SameSite=Strict cookie and
redirects to the clean URL; the cookie holds a value derived from the token, not the
token. API calls may instead send ``Authorization: Bearer ADMIN_TOKEN`` (``iotref
monitor`` does). Without either: 401 (JSON for ``/monitor/api/...``, a small HTML page
for the page). POSTs authenticated by the cookie must also carry the page's CSRF token in
``X-CSRF-Token`` and, when the browser sends one, a matching ``Origin``.

Routes (all under ``/monitor``):

* ``GET /monitor`` the page; ``GET /monitor/assets/{name}`` its static files.
* ``GET /monitor/api/summary`` devices with counters, online state and permission
  (``sendTelemetryData`` desired/reported), totals, the overall message rate and pending
  device-flow approvals.
* ``GET /monitor/api/devices/{clientId}`` one device: counters, thing, shadow, rate and
  speed/counter series (each reading with its ``assetid``), latest messages;
  ``.../messages?limit=&before=&invalid=1``.
* ``GET /monitor/api/messages/{id}`` one stored message with its JSON body.
* ``POST /monitor/api/devices/{clientId}/send-telemetry`` ``{"enabled": bool}``;
  ``POST .../shadow`` ``{"desired": {...}, "version": n?}`` (merged into desired, through
  the shadow service's update path); ``POST .../shadow/validate`` (the same checks, no
  update).
* ``GET /monitor/api/stream?device=&invalid_only=1&stats=0`` server-sent events:
  ``message`` per message, ``stats`` once a second, ``dropped`` when a slow reader missed
  messages.

:meth:`Monitor.openapi` describes these routes for ``GET /openapi.json``.

A device counts as *online* when it sent telemetry within the last ``online_window``
seconds (30 by default): the broker's ``$SYS`` tree has no per-client connection state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import html
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route

from iotref.protocol import shadow_document as sd
from iotref.sandbox.context import SandboxContext
from iotref.sandbox.http_errors import ApiError, read_json_object
from iotref.sandbox.openapi import (
    ADMIN_BEARER,
    html_response,
    json_content,
    json_response,
    response_ref,
    schema_ref,
)
from iotref.sandbox.quota_meter import QuotaMeter

if TYPE_CHECKING:
    from iotref.sandbox.telemetry.feed import Subscription
    from iotref.sandbox.telemetry.ingestion import Ingestion

COOKIE_NAME = "iotref_monitor"
CSRF_HEADER = "x-csrf-token"
ONLINE_WINDOW_SECONDS = 30.0
RATE_SECONDS = 120
DEVICE_RATE_SECONDS = 300
SERIES_POINTS = 900
"""Speed/counter readings a device's page starts with (all its assets together; the page
keeps as many as new ones arrive)."""
STATS_INTERVAL = 1.0
SSE_BATCH = 200
MAX_LIMIT = 500
_CLIENT_ID = re.compile(r"^[A-Za-z0-9:_.\-?]{1,128}$")
_ASSET_NAME = re.compile(r"^[a-z0-9_\-]+\.(html|css|js|svg)$")
_CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
_SQLITE_MAX_INT = 2**63 - 1
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

_REFUSED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>iotref monitor: token required</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/monitor/assets/monitor.css"></head>
<body class="refused"><main class="card narrow">
<h1>Token required</h1>
<p>{reason}</p>
<p>Open the link that <code>iotref sandbox up</code> printed:
<code>http://&hellip;/monitor?token=&hellip;</code>. The admin token is also in
<code>sandbox.json</code> in the sandbox's data directory.</p>
</main></body></html>
"""


def _asset_text(name: str) -> str:
    return (resources.files("iotref.sandbox") / "monitor_assets" / name).read_text("utf-8")


def _api_error(status: int, error: str, description: str) -> ApiError:
    return ApiError(status, error, description)


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    # ASCII digits only ("²".isdigit() is true, int("²") fails), and few enough for int().
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20) or not low <= int(raw) <= high:
        raise _api_error(400, "invalid_request", f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise _api_error(400, "invalid_request", f"{name} must be 1 or 0")


def _origin_host(origin: str) -> str | None:
    """The ``host[:port]`` of an ``Origin`` header; ``None`` if it is not a URL."""
    try:
        return urlsplit(origin).netloc
    except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 literal)
        return None


def sse_event(event: str, data: Any, event_id: str | None = None) -> str:
    """One server-sent event; ``json.dumps`` never emits a raw newline."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Monitor:
    """Sandbox component: the monitor's page, API and live stream."""

    def __init__(
        self,
        ctx: SandboxContext,
        ingestion: Ingestion,
        shadows: Any,
        directory: Any,
        things: Any,
        *,
        online_window: float = ONLINE_WINDOW_SECONDS,
        meter: QuotaMeter | None = None,
    ) -> None:
        self.ctx = ctx
        self.ingestion = ingestion
        self.shadows = shadows
        self.directory = directory
        self.things = things
        self.online_window = online_window
        limits = ctx.settings.limits
        self.meter = meter or QuotaMeter(limits.publish_rate, limits.throughput)
        self._stopping = asyncio.Event()
        key = ctx.admin_token.encode()
        self._session = hmac.new(key, b"iotref-monitor-session", hashlib.sha256).hexdigest()
        self._csrf = hmac.new(key, b"iotref-monitor-csrf", hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ component

    def routes(self) -> Sequence[BaseRoute]:
        api = "/monitor/api"
        return [
            Route("/monitor", self.page, methods=["GET"]),
            Route("/monitor/assets/{name}", self.asset, methods=["GET"]),
            Route(f"{api}/summary", self.summary, methods=["GET"]),
            Route(f"{api}/stream", self.stream, methods=["GET"]),
            Route(f"{api}/messages/{{message_id:int}}", self.message, methods=["GET"]),
            Route(f"{api}/devices/{{client_id}}", self.device, methods=["GET"]),
            Route(f"{api}/devices/{{client_id}}/messages", self.device_messages, methods=["GET"]),
            Route(f"{api}/devices/{{client_id}}/shadow", self.shadow, methods=["GET", "POST"]),
            Route(
                f"{api}/devices/{{client_id}}/shadow/validate",
                self.validate_shadow,
                methods=["POST"],
            ),
            Route(
                f"{api}/devices/{{client_id}}/send-telemetry", self.send_telemetry, methods=["POST"]
            ),
        ]

    async def start(self) -> None:
        self._stopping.clear()

    async def stop(self) -> None:
        self._stopping.set()

    def describe(self) -> dict[str, Any]:
        return {"monitor_url": f"{self.ctx.http_url}/monitor"}

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI fragment of the routes above (merged into ``/openapi.json``)."""
        return monitor_fragment()

    # ------------------------------------------------------------------ auth

    def _cookie_ok(self, request: Request) -> bool:
        value = request.cookies.get(COOKIE_NAME)
        return bool(value) and hmac.compare_digest(str(value).encode(), self._session.encode())

    def _auth(self, request: Request) -> str:
        """``"bearer"`` or ``"cookie"``; raises 401 otherwise."""
        if self.ctx.check_admin(request.headers.get("authorization")):
            return "bearer"
        if self._cookie_ok(request):
            return "cookie"
        raise ApiError(
            401,
            "unauthorized",
            "open the monitor link with the admin token, or send it as a bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="iotref-monitor"'},
        )

    def _auth_write(self, request: Request) -> None:
        if self._auth(request) == "bearer":
            return
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode(), self._csrf.encode()):
            raise ApiError(403, "csrf_failed", "missing or wrong X-CSRF-Token header")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and _origin_host(origin) != host:
            raise ApiError(403, "csrf_failed", "cross-origin request refused")

    # ------------------------------------------------------------------ page

    async def page(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None:
            if not self.ctx.check_admin(f"Bearer {token}"):
                return self._refused("The token in the link is not this sandbox's admin token.")
            response = RedirectResponse("/monitor", status_code=303, headers=_SECURITY_HEADERS)
            response.set_cookie(
                COOKIE_NAME,
                self._session,
                httponly=True,
                samesite="strict",
                path="/monitor",
            )
            return response
        if not self._cookie_ok(request):
            return self._refused("This page needs the sandbox's admin token.")
        page = _asset_text("index.html").replace("{{CSRF_TOKEN}}", html.escape(self._csrf))
        return HTMLResponse(page, headers=_SECURITY_HEADERS)

    def _refused(self, reason: str) -> Response:
        return HTMLResponse(
            _REFUSED_PAGE.format(reason=html.escape(reason)),
            status_code=401,
            headers=_SECURITY_HEADERS,
        )

    async def asset(self, request: Request) -> Response:
        name = str(request.path_params["name"])
        match = _ASSET_NAME.fullmatch(name)
        if match is None or name == "index.html":
            raise ApiError(404, "not_found", "no such asset")
        try:
            body = _asset_text(name)
        except (FileNotFoundError, OSError):
            raise ApiError(404, "not_found", "no such asset") from None
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        return Response(body, media_type=_CONTENT_TYPES[match.group(1)], headers=headers)

    # ------------------------------------------------------------------ data

    def _client_id(self, request: Request) -> str:
        client_id = str(request.path_params["client_id"])
        if not _CLIENT_ID.fullmatch(client_id):
            raise ApiError(400, "invalid_request", "malformed client id")
        return client_id

    def _permission(self, client_id: str) -> dict[str, Any]:
        document = self.shadows.store.get(client_id, None)
        if document is None:
            return {"shadow": False, "desired": None, "reported": None}
        desired = document.state.get("desired") or {}
        reported = document.state.get("reported") or {}
        return {
            "shadow": True,
            "desired": desired.get("sendTelemetryData"),
            "reported": reported.get("sendTelemetryData"),
            "version": document.version,
        }

    def _device_json(
        self, counters: dict[str, Any] | None, thing: Any, now: float
    ) -> dict[str, Any]:
        client_id = counters["client_id"] if counters else thing.client_id
        out: dict[str, Any] = {
            "client_id": client_id,
            "received": 0,
            "valid": 0,
            "invalid": 0,
            "duplicates": 0,
            "last_seen": None,
            **(counters or {}),
        }
        out["known"] = thing is not None
        if thing is not None:
            out["org_id"] = thing.org_id
            out["site_id"] = thing.site_id
            out["machine_id"] = thing.machine_id
            out["revoked"] = thing.revoked
            out["provisioned_at"] = thing.to_json()["createdAt"]
        last_seen = out.get("last_seen")
        out["online"] = last_seen is not None and now - float(last_seen) <= self.online_window
        out["send_telemetry"] = self._permission(client_id) if thing is not None else None
        out["quota"] = self.meter.snapshot(client_id, now)
        return out

    @property
    def _shadow_limits(self) -> sd.ShadowLimits:
        return self.ctx.settings.limits.shadow_document

    def _store(self) -> Any:
        store = self.ingestion.store
        if store is None:
            raise ApiError(409, "not_ready", "ingestion has not started")
        return store

    async def summary(self, request: Request) -> Response:
        self._auth(request)
        store = self._store()
        now = time.time()
        counters = {c["client_id"]: c for c in store.device_list()}
        things = {t.client_id: t for t in self.things.list()}
        devices = [
            self._device_json(counters.get(cid), thing, now) for cid, thing in things.items()
        ]
        devices += [
            self._device_json(c, None, now) for cid, c in counters.items() if cid not in things
        ]
        devices.sort(key=lambda d: (-(d.get("last_seen") or 0), d["client_id"]))
        return JSONResponse(
            {
                "now": now,
                "online_window": self.online_window,
                "limits": dataclasses.asdict(self.ctx.settings.limits),
                "ingestion": self.ingestion.status(),
                "totals": store.totals(),
                "retention": store.retention_status(),
                "rate": store.rates(None, RATE_SECONDS, now),
                "devices": devices,
                "pending_authorizations": self.directory.pending_authorizations(),
            }
        )

    def _shadow_json(self, client_id: str) -> dict[str, Any] | None:
        document = self.shadows.store.get(client_id, None)
        if document is None:
            return None
        response = sd.get_response(document, int(time.time()))
        state = response.get("state", {})
        return {
            "desired": state.get("desired"),
            "reported": state.get("reported"),
            "delta": state.get("delta"),
            "version": response.get("version"),
            "metadata": response.get("metadata"),
            "timestamp": response.get("timestamp"),
        }

    async def device(self, request: Request) -> Response:
        self._auth(request)
        client_id = self._client_id(request)
        store = self._store()
        thing = self.things.get(client_id)
        counters = store.device(client_id)
        if thing is None and counters is None:
            raise ApiError(404, "not_found", f"no device {client_id}")
        now = time.time()
        body = self._device_json(counters, thing, now)
        body["shadow"] = self._shadow_json(client_id) if thing is not None else None
        body["rate"] = store.rates(client_id, DEVICE_RATE_SECONDS, now)
        body["series"] = store.series(client_id, limit=SERIES_POINTS)
        body["messages"] = store.messages(client_id, limit=50)
        return JSONResponse(body)

    async def device_messages(self, request: Request) -> Response:
        self._auth(request)
        client_id = self._client_id(request)
        limit = _int_param(request, "limit", 50, 1, MAX_LIMIT) or 50
        before = _int_param(request, "before", None, 1, _SQLITE_MAX_INT)
        invalid = _flag(request, "invalid")
        rows = self._store().messages(client_id, limit=limit, before=before, invalid_only=invalid)
        return JSONResponse({"messages": rows})

    async def message(self, request: Request) -> Response:
        self._auth(request)
        message_id = int(request.path_params["message_id"])
        found = None
        if 0 < message_id <= _SQLITE_MAX_INT:
            found = self._store().message(message_id)
        if found is None:
            raise ApiError(404, "not_found", "no such message")
        return JSONResponse(found)

    # ------------------------------------------------------------------ shadow actions

    def _known_thing(self, client_id: str) -> None:
        if self.things.get(client_id) is None:
            raise ApiError(404, "not_found", f"no provisioned device {client_id}")

    async def shadow(self, request: Request) -> Response:
        if request.method == "GET":
            self._auth(request)
            client_id = self._client_id(request)
            self._known_thing(client_id)
            shadow = self._shadow_json(client_id)
            if shadow is None:
                raise ApiError(404, "not_found", f"{client_id} has no shadow")
            return JSONResponse(shadow)
        self._auth_write(request)
        client_id = self._client_id(request)
        self._known_thing(client_id)
        payload = _desired_update(await _json_body(request), self._shadow_limits)
        return await self._update(client_id, payload)

    async def validate_shadow(self, request: Request) -> Response:
        self._auth_write(request)
        self._client_id(request)
        payload = _desired_update(await _json_body(request), self._shadow_limits)
        return JSONResponse({"ok": True, "update": json.loads(payload)})

    async def send_telemetry(self, request: Request) -> Response:
        self._auth_write(request)
        client_id = self._client_id(request)
        self._known_thing(client_id)
        body = await _json_body(request)
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise ApiError(400, "invalid_request", "enabled must be true or false")
        payload = sd.to_json({"state": {"desired": {"sendTelemetryData": enabled}}})
        return await self._update(client_id, payload)

    async def _update(self, client_id: str, payload: bytes) -> Response:
        try:
            accepted = await self.shadows.update(client_id, None, payload)
        except sd.ShadowError as exc:
            status = exc.code if 400 <= exc.code < 500 else 503
            raise ApiError(
                status,
                "shadow_update_rejected",
                exc.message,
                body={"error": "shadow_update_rejected", "code": exc.code, "message": exc.message},
            ) from None
        return JSONResponse({"accepted": accepted, "shadow": self._shadow_json(client_id)})

    # ------------------------------------------------------------------ live stream

    async def stream(self, request: Request) -> Response:
        self._auth(request)
        device = request.query_params.get("device") or None
        if device is not None and not _CLIENT_ID.fullmatch(device):
            raise ApiError(400, "invalid_request", "malformed device")
        invalid_only = _flag(request, "invalid_only")
        stats = request.query_params.get("stats", "1") != "0"
        self._store()
        sub = self.ingestion.feed.subscribe(device, invalid_only)
        return StreamingResponse(
            self._events(sub, device, stats),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    def _stats(self, device: str | None) -> dict[str, Any]:
        store = self._store()
        now = time.time()
        quotas = self.meter.snapshots(now)
        devices: dict[str, dict[str, Any]] = {
            c["client_id"]: {
                "received": c["received"],
                "valid": c["valid"],
                "invalid": c["invalid"],
                "duplicates": c["duplicates"],
                "last_seen": c["last_seen"],
                "online": c["last_seen"] is not None and now - c["last_seen"] <= self.online_window,
            }
            for c in store.device_list()
        }
        for client_id, quota in quotas.items():
            devices.setdefault(client_id, {})["quota"] = quota
        data: dict[str, Any] = {
            "now": now,
            "totals": store.totals(),
            "rate": store.rates(None, 1, now - 1)[0][1],
            "devices": devices,
        }
        if device is not None:
            data["device_rate"] = store.rates(device, 1, now - 1)[0][1]
        return data

    async def _events(
        self, sub: Subscription, device: str | None, stats: bool
    ) -> AsyncIterator[str]:
        feed = self.ingestion.feed
        loop = asyncio.get_running_loop()
        reported_drops = 0
        next_stats = loop.time()
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            yield "retry: 2000\n\n"
            while not self._stopping.is_set():
                timeout = max(0.0, next_stats - loop.time()) if stats else 15.0
                getter = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if stopping in done:
                        break
                    if not stats:
                        yield ": keepalive\n\n"
                else:
                    first = getter.result()
                    if first is None:
                        break
                    events = [first]
                    while len(events) < SSE_BATCH and not sub.queue.empty():
                        item = sub.queue.get_nowait()
                        if item is None:
                            break
                        events.append(item)
                    yield "".join(
                        sse_event("message", e, str(e["id"]) if e["id"] is not None else None)
                        for e in events
                    )
                if sub.dropped != reported_drops:
                    reported_drops = sub.dropped
                    yield sse_event("dropped", {"dropped": reported_drops})
                if stats and loop.time() >= next_stats:
                    next_stats = loop.time() + STATS_INTERVAL
                    yield sse_event("stats", self._stats(device))
        finally:
            stopping.cancel()
            feed.unsubscribe(sub)


async def _json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 400 for anything else, including absurd nesting."""
    try:
        return await read_json_object(request)
    except RecursionError:
        raise ApiError(400, "invalid_request", "body is nested too deeply") from None


def _desired_update(body: dict[str, Any], limits: sd.ShadowLimits = sd.DEFAULT_LIMITS) -> bytes:
    """``{"desired": {...}, "version": n?}`` as a shadow update, checked by the shadow
    service's own rules; 400/413 JSON if it would be rejected."""
    if "desired" not in body:
        raise ApiError(400, "invalid_request", "desired (a JSON object) is required")
    desired = body["desired"]
    if not isinstance(desired, dict):
        raise ApiError(400, "invalid_request", "desired must be a JSON object")
    update: dict[str, Any] = {"state": {"desired": desired}}
    if "version" in body:
        update["version"] = body["version"]
    try:
        payload = sd.to_json(update)
    except RecursionError:
        # json.loads took it, but with the two levels added here it is too deep to dump.
        raise ApiError(400, "invalid_request", "desired is nested too deeply") from None
    try:
        sd.parse_update(payload, limits)
    except sd.ShadowError as exc:
        raise ApiError(
            exc.code if 400 <= exc.code < 500 else 400,
            "invalid_shadow_update",
            exc.message,
            body={"error": "invalid_shadow_update", "code": exc.code, "message": exc.message},
        ) from None
    return payload


# --------------------------------------------------------------------------- OpenAPI

TAG_MONITOR = "Monitor"
MONITOR_SESSION = "monitorSession"
MONITOR_CSRF = "monitorCsrf"
MONITOR_LINK = "monitorLink"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (``nullable`` next to a ``$ref`` would be ignored in 3.0)."""
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


def _object(properties: dict[str, Any], *, closed: bool = True) -> dict[str, Any]:
    """An object whose every property is required."""
    schema: dict[str, Any] = {
        "type": "object",
        "required": list(properties),
        "properties": properties,
    }
    if closed:
        schema["additionalProperties"] = False
    return schema


def _message_properties() -> dict[str, Any]:
    text = _nullable({"type": "string"})
    number = _nullable({"type": "number"})
    return {
        "id": {"type": "integer", "minimum": 1},
        "received_at": {"type": "number", "description": "Epoch seconds."},
        "topic": {"type": "string"},
        "client_id": {"type": "string"},
        "org_id": text,
        "topic_problem": text,
        "sendereventuuid": text,
        "valid": {"type": "boolean"},
        "errors": {"type": "array", "items": schema_ref("MonitorIssue")},
        "eventtype": text,
        "eventsubtype": text,
        "payloadversion": _nullable({"type": "integer"}),
        "assetid": text,
        "assettimestamp": text,
        "status": text,
        "speed": number,
        "productioncounter": number,
        "totalproductioncounter": number,
    }


def _monitor_schemas() -> dict[str, Any]:
    text = _nullable({"type": "string"})
    number = _nullable({"type": "number"})
    count = {"type": "integer", "minimum": 0}
    counters = {"received": count, "valid": count, "invalid": count, "duplicates": count}
    any_value = {"description": "Any JSON value; null when not set."}
    thing_fields = ["org_id", "site_id", "machine_id", "revoked", "provisioned_at"]
    stored = _object(
        {
            **_message_properties(),
            "body": {"type": "string", "description": "The payload, when it is UTF-8."},
            "body_base64": {"type": "string", "format": "byte", "description": "Otherwise."},
        }
    )
    stored["required"] = [k for k in stored["required"] if not k.startswith("body")]
    stored["oneOf"] = [{"required": ["body"]}, {"required": ["body_base64"]}]
    return {
        "MonitorIssue": {
            "type": "object",
            "description": "Why a message is invalid: where (a JSON path) and why.",
            "required": ["path", "reason"],
            "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
        },
        "MonitorMessage": {
            **_object(_message_properties()),
            "description": "A stored telemetry message, without its body.",
        },
        "MonitorStoredMessage": {
            **stored,
            "description": "A stored telemetry message with its body (``body`` if the "
            "payload is UTF-8, ``body_base64`` if not).",
        },
        "MonitorTotals": _object({"stored": count, **counters}),
        "MonitorRate": {
            "type": "array",
            "description": "Messages per second, oldest second first: ``[epoch second, "
            "count]`` pairs.",
            "items": {
                "type": "array",
                "items": {"type": "integer"},
                "minItems": 2,
                "maxItems": 2,
            },
        },
        "MonitorPermission": {
            "type": "object",
            "description": "``sendTelemetryData`` in the device's shadow (``version`` when "
            "the device has a shadow).",
            "required": ["shadow", "desired", "reported"],
            "properties": {
                "shadow": {"type": "boolean"},
                "desired": any_value,
                "reported": any_value,
                "version": {"type": "integer", "minimum": 1},
            },
            "additionalProperties": False,
        },
        "MonitorQuota": {
            **_object(
                {
                    "publish_limit": {
                        **count,
                        "description": "Publish requests a second per connection (0: not "
                        "measured).",
                    },
                    "throughput_limit": {
                        **count,
                        "description": "Bytes a second per connection (0: not measured).",
                    },
                    "messages": {
                        **count,
                        "description": "Publishes counted (telemetry and shadow requests).",
                    },
                    "bytes": {**count, "description": "Their topics and payloads, bytes."},
                    "rate": {**count, "description": "Publishes in the last complete second."},
                    "bytes_rate": {**count, "description": "Bytes in the last complete second."},
                    "peak_rate": {**count, "description": "The busiest second's publishes."},
                    "peak_bytes_rate": {**count, "description": "The busiest second's bytes."},
                    "seconds_over": {
                        **count,
                        "description": "Seconds with more publishes or bytes than the quota.",
                    },
                    "throttled": {
                        **count,
                        "description": "Publishes AWS IoT Core would have throttled (token "
                        "bucket of one second's quota, refilled at the quota's rate).",
                    },
                    "throttled_bytes": {**count, "description": "Their bytes."},
                }
            ),
            "description": "The connection's publishes against AWS IoT Core's per-connection "
            "quotas, as the platform received them (measured, not enforced).",
        },
        "MonitorDevice": {
            "type": "object",
            "description": "A device: provisioned (``known``) or only seen in telemetry, "
            "with its counters; the thing's fields when it is known.",
            "required": [
                "client_id",
                *counters,
                "last_seen",
                "known",
                "online",
                "send_telemetry",
                "quota",
            ],
            "properties": {
                "client_id": {"type": "string"},
                **counters,
                "org_id": text,
                "topic_problem": text,
                "first_seen": number,
                "last_seen": number,
                "last_status": text,
                "last_speed": number,
                "last_productioncounter": number,
                "last_totalproductioncounter": number,
                "last_assettimestamp": text,
                "known": {"type": "boolean"},
                "site_id": {"type": "string"},
                "machine_id": text,
                "revoked": {"type": "boolean"},
                "provisioned_at": {"type": "string", "format": "date-time"},
                "online": {"type": "boolean"},
                "send_telemetry": _nullable(schema_ref("MonitorPermission")),
                "quota": schema_ref("MonitorQuota"),
            },
            "oneOf": [
                {
                    "properties": {"known": {"type": "boolean", "enum": [True]}},
                    "required": thing_fields,
                },
                {
                    "properties": {
                        "known": {"type": "boolean", "enum": [False]},
                        "send_telemetry": {"type": "object", "nullable": True, "enum": [None]},
                    },
                    "not": {"anyOf": [{"required": [name]} for name in thing_fields[1:]]},
                },
            ],
        },
        "MonitorShadow": _object(
            {
                "desired": _nullable({"type": "object"}),
                "reported": _nullable({"type": "object"}),
                "delta": _nullable({"type": "object"}),
                "version": {"type": "integer", "minimum": 1},
                "metadata": {
                    "type": "object",
                    "properties": {
                        "desired": {"type": "object"},
                        "reported": {"type": "object"},
                    },
                    "additionalProperties": False,
                },
                "timestamp": {"type": "integer", "description": "Epoch seconds."},
            }
        ),
        "MonitorShadowUpdated": _object(
            {
                "accepted": schema_ref("ShadowUpdateAccepted"),
                "shadow": _nullable(schema_ref("MonitorShadow")),
            }
        ),
        "MonitorShadowError": {
            **_object(
                {
                    "error": {
                        "type": "string",
                        "enum": ["invalid_shadow_update", "shadow_update_rejected"],
                    },
                    "code": {"type": "integer"},
                    "message": {"type": "string"},
                }
            ),
            "description": "The shadow service refused the update: its error code and message.",
        },
        "MonitorSummary": _object(
            {
                "now": {"type": "number", "description": "Epoch seconds."},
                "online_window": {"type": "number"},
                "limits": {
                    **_object(
                        {
                            "publish_rate": count,
                            "throughput": count,
                            "shadow_rate": count,
                            "shadow_in_flight": count,
                            "shadow_state_bytes": {"type": "integer", "minimum": 1},
                            "shadow_depth": {"type": "integer", "minimum": 1},
                        }
                    ),
                    "description": "The AWS IoT Core limits this sandbox applies (``sandbox "
                    "up`` options; 0: off).",
                },
                "ingestion": {
                    "type": "object",
                    "description": "The ingestion's state and its totals.",
                    "required": ["subscribed", "connections", "topic_filter"],
                    "properties": {
                        "subscribed": {"type": "boolean"},
                        "connections": {"type": "integer", "minimum": 1},
                        "topic_filter": {"type": "string"},
                        "batches": {
                            **count,
                            "description": "Transactions the ingestion has stored.",
                        },
                        "queued_chunks": {
                            **count,
                            "description": "No longer reported (nothing queues up in the "
                            "sandbox process any more); kept for older clients.",
                        },
                        "stored": count,
                        **counters,
                    },
                },
                "totals": schema_ref("MonitorTotals"),
                "retention": _object(
                    {
                        "max_messages": _nullable({"type": "integer", "minimum": 1}),
                        "max_age_seconds": _nullable({"type": "number", "minimum": 1}),
                        "pruned": {
                            **count,
                            "description": "Stored messages removed by the retention "
                            "policy (the totals still count them).",
                        },
                        "prune_passes": count,
                    }
                ),
                "rate": schema_ref("MonitorRate"),
                "devices": {"type": "array", "items": schema_ref("MonitorDevice")},
                "pending_authorizations": {
                    "type": "array",
                    "items": _object(
                        {
                            "user_code": {"type": "string"},
                            "created_at": {"type": "string", "format": "date-time"},
                            "expires_at": {"type": "string", "format": "date-time"},
                            "verification_uri_complete": {"type": "string"},
                        }
                    ),
                },
            }
        ),
        "MonitorDeviceDetail": {
            "allOf": [
                schema_ref("MonitorDevice"),
                {
                    "type": "object",
                    "required": ["shadow", "rate", "series", "messages"],
                    "properties": {
                        "shadow": _nullable(schema_ref("MonitorShadow")),
                        "rate": schema_ref("MonitorRate"),
                        "series": {
                            "type": "array",
                            "items": _object(
                                {
                                    "id": {"type": "integer", "minimum": 1},
                                    "t": {"type": "number"},
                                    "assetid": text,
                                    "speed": number,
                                    "productioncounter": number,
                                    "totalproductioncounter": number,
                                }
                            ),
                        },
                        "messages": {"type": "array", "items": schema_ref("MonitorMessage")},
                    },
                },
            ]
        },
    }


def _security_schemes() -> dict[str, Any]:
    return {
        MONITOR_SESSION: {
            "type": "apiKey",
            "in": "cookie",
            "name": COOKIE_NAME,
            "description": "The monitor's session cookie, set by ``GET /monitor?token=`` "
            "(HttpOnly, SameSite=Strict, path ``/monitor``).",
        },
        MONITOR_CSRF: {
            "type": "apiKey",
            "in": "header",
            "name": "X-CSRF-Token",
            "description": 'The page\'s CSRF token (``<meta name="csrf-token">``), needed '
            "with the session cookie on POSTs; a browser's ``Origin`` must also match.",
        },
        MONITOR_LINK: {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "The admin token in the monitor link: answered with a redirect "
            "that sets the session cookie.",
        },
    }


def _client_id_parameter() -> dict[str, Any]:
    return {
        "in": "path",
        "name": "client_id",
        "required": True,
        "schema": {"type": "string", "pattern": _CLIENT_ID.pattern},
        "example": "iotref-0123456789abcdef0123",
    }


def monitor_fragment() -> dict[str, Any]:
    """The OpenAPI fragment of the monitor's routes (see :meth:`Monitor.openapi`)."""
    read: list[dict[str, list[str]]] = [{ADMIN_BEARER: []}, {MONITOR_SESSION: []}]
    write: list[dict[str, list[str]]] = [
        {ADMIN_BEARER: []},
        {MONITOR_SESSION: [], MONITOR_CSRF: []},
    ]
    client_id = _client_id_parameter()
    not_ready = json_response("Ingestion has not started.", schema_ref("Error"))
    shadow_error = {"anyOf": [schema_ref("Error"), schema_ref("MonitorShadowError")]}
    csrf_refused = json_response(
        "Cookie authentication without the CSRF token, or from another origin.",
        schema_ref("Error"),
    )
    desired_body = {
        "required": True,
        "content": json_content(
            {
                "type": "object",
                "required": ["desired"],
                "properties": {
                    "desired": schema_ref("ShadowState1"),
                    "version": {
                        "type": "integer",
                        "description": "Only if the shadow has this version (as AWS's "
                        "``version``: 0 for a shadow that does not exist yet; no other "
                        "value below 1 can match, and gets 409).",
                    },
                },
            }
        ),
    }
    throttled = json_response(
        "Over the thing's shadow requests a second.", schema_ref("MonitorShadowError")
    )
    security_headers = {
        name: {"required": True, "schema": {"type": "string"}}
        for name in ("Content-Security-Policy", "X-Frame-Options", "Cache-Control")
    }
    page_refused = {**html_response("No or a wrong token."), "headers": security_headers}
    paths: dict[str, Any] = {
        "/monitor": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorPage",
                "summary": "The monitor's page (HTML)",
                "description": "Opened through ``/monitor?token=ADMIN_TOKEN``: a 303 to "
                "``/monitor`` that sets the session cookie. Bearer tokens are not accepted "
                "here.",
                "security": [{MONITOR_SESSION: []}, {MONITOR_LINK: []}],
                "responses": {
                    "200": {**html_response("The page."), "headers": security_headers},
                    "303": {
                        "description": "The token is right: to ``/monitor``, with the cookie.",
                        "headers": {
                            "Location": {
                                "required": True,
                                "schema": {"type": "string", "enum": ["/monitor"]},
                            },
                            "Set-Cookie": {
                                "required": True,
                                "schema": {"type": "string", "pattern": f"^{COOKIE_NAME}="},
                            },
                        },
                    },
                    "401": page_refused,
                },
            }
        },
        "/monitor/assets/{name}": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorAsset",
                "summary": "A static file of the page",
                "security": [],
                "parameters": [
                    {
                        "in": "path",
                        "name": "name",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[a-z0-9_-]+\\.(css|js|svg)$"},
                        "example": "monitor.css",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {
                            media: {"schema": {"type": "string"}}
                            for media in ("text/css", "text/javascript", "image/svg+xml")
                        },
                    },
                    "404": response_ref("NotFound"),
                },
            }
        },
        "/monitor/api/summary": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorSummary",
                "summary": "Devices, totals, the message rate and pending approvals",
                "security": read,
                "responses": {
                    "200": json_response("The summary.", schema_ref("MonitorSummary")),
                    "401": response_ref("Unauthorized"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/stream": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorStream",
                "summary": "Live messages and statistics (server-sent events)",
                "description": "Events: ``message`` (one per message, as in the list), "
                "``stats`` (once a second unless ``stats=0``), ``dropped`` (a slow reader "
                "missed messages). The stream does not end.",
                "security": read,
                "parameters": [
                    {
                        "in": "query",
                        "name": "device",
                        "description": "Only this device's messages.",
                        "schema": {"type": "string", "pattern": client_id["schema"]["pattern"]},
                    },
                    {"in": "query", "name": "invalid_only", "schema": {"type": "boolean"}},
                    {
                        "in": "query",
                        "name": "stats",
                        "description": "``0``: no ``stats`` events.",
                        "schema": {"type": "string", "enum": ["0", "1"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/messages/{message_id}": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorMessage",
                "summary": "One stored message with its body",
                "security": read,
                "parameters": [
                    {
                        "in": "path",
                        "name": "message_id",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                ],
                "responses": {
                    "200": json_response("The message.", schema_ref("MonitorStoredMessage")),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/devices/{client_id}": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorDevice",
                "summary": "One device: counters, thing, shadow, rate, series, latest messages",
                "security": read,
                "parameters": [client_id],
                "responses": {
                    "200": json_response("The device.", schema_ref("MonitorDeviceDetail")),
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/devices/{client_id}/messages": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorDeviceMessages",
                "summary": "The device's stored messages, newest first",
                "security": read,
                "parameters": [
                    client_id,
                    {
                        "in": "query",
                        "name": "limit",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    },
                    {
                        "in": "query",
                        "name": "before",
                        "description": "Only messages with a smaller id (paging).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": _SQLITE_MAX_INT},
                    },
                    {"in": "query", "name": "invalid", "schema": {"type": "boolean"}},
                ],
                "responses": {
                    "200": json_response(
                        "The messages.",
                        _object(
                            {"messages": {"type": "array", "items": schema_ref("MonitorMessage")}}
                        ),
                    ),
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/devices/{client_id}/shadow": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorShadow",
                "summary": "The provisioned device's shadow",
                "security": read,
                "parameters": [client_id],
                "responses": {
                    "200": json_response("The shadow.", schema_ref("MonitorShadow")),
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                },
            },
            "post": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorUpdateDesired",
                "summary": "Merge into the shadow's desired state",
                "description": "Through the shadow service's update path; ``version`` makes "
                "the update conditional.",
                "security": write,
                "parameters": [client_id],
                "requestBody": desired_body,
                "responses": {
                    "200": json_response("Updated.", schema_ref("MonitorShadowUpdated")),
                    "400": json_response("A malformed or refused update.", shadow_error),
                    "401": response_ref("Unauthorized"),
                    "403": csrf_refused,
                    "404": response_ref("NotFound"),
                    "409": json_response("A version conflict.", schema_ref("MonitorShadowError")),
                    "413": json_response("The body or the state is too large.", shadow_error),
                    "429": throttled,
                },
            },
        },
        "/monitor/api/devices/{client_id}/shadow/validate": {
            "post": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorValidateDesired",
                "summary": "Check a desired update by the shadow service's rules, no update",
                "security": write,
                "parameters": [client_id],
                "requestBody": desired_body,
                "responses": {
                    "200": json_response(
                        "The update would be accepted.",
                        _object(
                            {
                                "ok": {"type": "boolean", "enum": [True]},
                                "update": {
                                    "type": "object",
                                    "required": ["state"],
                                    "properties": {
                                        "state": _object({"desired": {"type": "object"}}),
                                        "version": {"type": "integer"},
                                    },
                                    "additionalProperties": False,
                                },
                            }
                        ),
                    ),
                    "400": json_response("A malformed or refused update.", shadow_error),
                    "401": response_ref("Unauthorized"),
                    "403": csrf_refused,
                    "404": response_ref("NotFound"),
                    "413": json_response("The body or the state is too large.", shadow_error),
                },
            }
        },
        "/monitor/api/devices/{client_id}/send-telemetry": {
            "post": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorSendTelemetry",
                "summary": "Set desired.sendTelemetryData",
                "security": write,
                "parameters": [client_id],
                "requestBody": {
                    "required": True,
                    "content": json_content(
                        {
                            "type": "object",
                            "required": ["enabled"],
                            "properties": {"enabled": {"type": "boolean"}},
                        }
                    ),
                },
                "responses": {
                    "200": json_response("Updated.", schema_ref("MonitorShadowUpdated")),
                    "400": json_response("A malformed body.", shadow_error),
                    "401": response_ref("Unauthorized"),
                    "403": csrf_refused,
                    "404": response_ref("NotFound"),
                    "409": json_response("A version conflict.", schema_ref("MonitorShadowError")),
                    "413": json_response("The body is too large.", shadow_error),
                    "429": throttled,
                },
            }
        },
    }
    return {
        "paths": paths,
        "components": {"schemas": _monitor_schemas(), "securitySchemes": _security_schemes()},
    }
