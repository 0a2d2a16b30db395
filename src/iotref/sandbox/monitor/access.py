"""Who may use the monitor: the admin token as a bearer token (``iotref monitor``), or the
session cookie that the monitor link (``/monitor?token=ADMIN_TOKEN``) sets. The cookie
holds a value derived from the token, not the token; the POSTs it authenticates must also
carry the page's CSRF token in ``X-CSRF-Token`` and, when the browser sends one, a
matching ``Origin``."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from starlette.requests import Request

from iotref.sandbox.context import SandboxContext
from iotref.sandbox.http_errors import ApiError

COOKIE_NAME = "iotref_monitor"
CSRF_HEADER = "x-csrf-token"


def origin_host(origin: str) -> str | None:
    """The ``host[:port]`` of an ``Origin`` header; ``None`` if it is not a URL."""
    try:
        return urlsplit(origin).netloc
    except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 literal)
        return None


class MonitorAccess:
    """The admin token's checks, and the session and CSRF values derived from it."""

    def __init__(self, ctx: SandboxContext) -> None:
        self.ctx = ctx
        key = ctx.admin_token.encode()
        self.session = hmac.new(key, b"iotref-monitor-session", hashlib.sha256).hexdigest()
        self.csrf = hmac.new(key, b"iotref-monitor-csrf", hashlib.sha256).hexdigest()

    def token_ok(self, token: str) -> bool:
        """Whether ``token`` (from the monitor link) is the admin token."""
        return self.ctx.check_admin(f"Bearer {token}")

    def cookie_ok(self, request: Request) -> bool:
        value = request.cookies.get(COOKIE_NAME)
        return bool(value) and hmac.compare_digest(str(value).encode(), self.session.encode())

    def check(self, request: Request) -> str:
        """``"bearer"`` or ``"cookie"``; raises 401 otherwise."""
        if self.ctx.check_admin(request.headers.get("authorization")):
            return "bearer"
        if self.cookie_ok(request):
            return "cookie"
        raise ApiError(
            401,
            "unauthorized",
            "open the monitor link with the admin token, or send it as a bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="iotref-monitor"'},
        )

    def check_write(self, request: Request) -> None:
        """As :meth:`check`; with the cookie also the CSRF token and the origin (403)."""
        if self.check(request) == "bearer":
            return
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode(), self.csrf.encode()):
            raise ApiError(403, "csrf_failed", "missing or wrong X-CSRF-Token header")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin_host(origin) != host:
            raise ApiError(403, "csrf_failed", "cross-origin request refused")
