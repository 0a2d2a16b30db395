"""The HTTP layer the device clients share: one ``httpx.AsyncClient`` setup (redirects never
followed), request logging on ``iotref.http`` with every secret replaced by
``[redacted]``, and the mapping of transport failures and answers to errors.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from iotref._version import __version__
from iotref.device.errors import NetworkError, ProtocolError

log = logging.getLogger("iotref.http")

REDACTED = "[redacted]"
#: Form fields, query parameters and JSON keys whose values are never logged.
SECRET_FIELDS = frozenset(
    {
        "access_token",
        "refresh_token",
        "device_code",
        "id_token",
        "client_secret",
        "password",
        "code",
        "token",
        "privateKey",
        "private_key",
    }
)
SECRET_HEADERS = frozenset({"authorization", "cookie", "set-cookie", "proxy-authorization"})

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
USER_AGENT = f"iotref/{__version__}"
_MAX_LOGGED_BODY = 4000


def redact_headers(headers: httpx.Headers | Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if k.lower() in SECRET_HEADERS else v) for k, v in headers.items()}


def redact_json(value: Any) -> Any:
    """A copy of a JSON value with secret keys' values replaced, at any depth."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_FIELDS else redact_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_json(v) for v in value]
    return value


def redact_form(text: str) -> str:
    pairs = parse_qsl(text, keep_blank_values=True)
    return urlencode([(k, REDACTED if k in SECRET_FIELDS else v) for k, v in pairs], safe="[]")


def redact_url(url: httpx.URL | str) -> str:
    parts = urlsplit(str(url))
    if not parts.query:
        return str(url)
    return urlunsplit(parts._replace(query=redact_form(parts.query)))


def redact_body(content: bytes, content_type: str) -> str:
    """A loggable rendering of a body: JSON and forms redacted, anything else summarised."""
    if not content:
        return ""
    kind = content_type.split(";")[0].strip().lower()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(content)} bytes>"
    if kind == "application/json" or kind.endswith("+json"):
        try:
            rendered = json.dumps(redact_json(json.loads(text)))
        except ValueError:
            return f"<{len(content)} bytes of invalid JSON>"
    elif kind == "application/x-www-form-urlencoded":
        rendered = redact_form(text)
    else:
        return f"<{len(content)} bytes of {kind or 'unknown type'}>"
    if len(rendered) > _MAX_LOGGED_BODY:
        rendered = rendered[:_MAX_LOGGED_BODY] + "..."
    return rendered


async def _log_request(request: httpx.Request) -> None:
    request.extensions["iotref_started"] = time.perf_counter()
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "-> %s %s headers=%s body=%s",
            request.method,
            redact_url(request.url),
            redact_headers(request.headers),
            redact_body(request.content, request.headers.get("content-type", "")),
        )


async def _log_response(response: httpx.Response) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    started = response.request.extensions.get("iotref_started")
    elapsed = (time.perf_counter() - started) * 1000 if isinstance(started, float) else 0.0
    await response.aread()
    log.debug(
        "<- %s %s %d (%.1f ms) body=%s",
        response.request.method,
        redact_url(response.request.url),
        response.status_code,
        elapsed,
        redact_body(response.content, response.headers.get("content-type", "")),
    )


def create_http_client(
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
) -> httpx.AsyncClient:
    """The client every device call goes through. Connection attempts are retried twice
    (safe: nothing was sent); requests themselves are not."""
    return httpx.AsyncClient(
        transport=transport or httpx.AsyncHTTPTransport(retries=2),
        timeout=timeout,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        event_hooks={"request": [_log_request], "response": [_log_response]},
    )


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def send(
    http: httpx.AsyncClient, method: str, url: str, *, what: str, **kwargs: Any
) -> httpx.Response:
    """Send one request; transport failures become :class:`NetworkError` naming ``what``
    and the host (never the request's content)."""
    try:
        return await http.request(method, url, **kwargs)
    except httpx.TimeoutException:
        raise NetworkError(
            f"{what}: {origin(url)} did not answer in time",
            "check the network connection and try again",
        ) from None
    except httpx.TransportError as exc:
        raise NetworkError(
            f"{what}: cannot reach {origin(url)} ({_transport_reason(exc)})",
            "check the network connection and the environment's URLs, then try again",
        ) from None


def _transport_reason(exc: httpx.TransportError) -> str:
    text = str(exc).strip()
    # httpx/httpcore messages name the OS error; keep them short and free of payloads.
    if text and len(text) < 200:
        return text
    return type(exc).__name__


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    """The answer's JSON object, or :class:`ProtocolError` (without the body: it may carry
    secrets)."""
    try:
        value = response.json()
    except ValueError:
        raise ProtocolError(
            f"{what}: {origin(str(response.request.url))} answered HTTP "
            f"{response.status_code} without valid JSON"
        ) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def json_value(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ProtocolError(
            f"{what}: {origin(str(response.request.url))} answered HTTP "
            f"{response.status_code} without valid JSON"
        ) from None


def error_code(response: httpx.Response) -> str:
    """The ``error`` field of an OAuth/JSON error answer, or ``""``."""
    try:
        value = response.json()
    except ValueError:
        return ""
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return str(value["error"])
    return ""


def error_detail(response: httpx.Response) -> str:
    """``code: description`` of a JSON error answer, shortened; ``""`` if there is none.
    Only for services whose errors carry no secrets (never the token endpoint)."""
    try:
        value = response.json()
    except ValueError:
        return ""
    if not isinstance(value, dict):
        return ""
    code = value.get("error") if isinstance(value.get("error"), str) else ""
    description = value.get("error_description") or value.get("message") or ""
    text = ": ".join(str(part) for part in (code, description) if part)
    return text[:200]


def require_str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what}: the answer lacks {key!r}")
    return value
