"""JSON errors for every HTTP endpoint of the sandbox.

Every failure, including unknown paths, wrong methods, oversized or malformed bodies and
unexpected exceptions, answers with a JSON body, and nothing but an unexpected bug may
answer 5xx. Handlers raise :class:`ApiError` (or return :func:`error_response`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024


class ApiError(Exception):
    """An error answer: ``status`` and a JSON body (``{"error": code, ...}`` by default)."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str | None = None,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(description or error)
        self.status = status
        self.body: dict[str, Any] = body if body is not None else {"error": error}
        if body is None and description:
            self.body["error_description"] = description
        self.headers = headers


def error_response(
    status: int,
    error: str,
    description: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": error}
    if description:
        body["error_description"] = description
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "too_many_requests",
}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else None
    headers = exc.headers
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        if allowed:
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return error_response(exc.status_code, code, detail, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's own 405 names
    only the first route whose path matches, and one path may have a route per method)."""
    app = request.scope.get("app")
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in getattr(app, "routes", ()):
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods.update(route.methods)
    return sorted(methods, key=lambda m: (_METHOD_ORDER.get(m, len(_METHOD_ORDER)), m))


_METHOD_ORDER = {m: i for i, m in enumerate(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])}


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "unexpected error; see the sandbox log")


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    HTTPException: _http_exception,
    Exception: _unexpected,
}


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before a handler reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(
                        send,
                        400,
                        {"error": "bad_request", "error_description": "bad Content-Length"},
                    )
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, _too_large(self.max_bytes))
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, _too_large(self.max_bytes))


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> dict[str, str]:
    return {"error": "payload_too_large", "error_description": f"request body over {limit} bytes"}


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 :class:`ApiError`."""
    raw = await request.body()
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_request", "body is not valid JSON") from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_request", "body is nested too deeply") from exc
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    return value


async def read_form_or_json(request: Request) -> dict[str, str]:
    """Parameters from a form body, a JSON object body or the query string (form wins)."""
    params: dict[str, str] = dict(request.query_params)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await read_json_object(request)
        params.update({k: v for k, v in body.items() if isinstance(v, str)})
    elif content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.form()
        except Exception as exc:
            raise ApiError(400, "invalid_request", "malformed form body") from exc
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params
