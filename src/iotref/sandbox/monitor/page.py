"""The monitor's page: ``GET /monitor`` (the link with the admin token sets the session
cookie and redirects to the clean URL), a small refusal page without it, and the page's
static files (``GET /monitor/assets/{name}``, from ``static/``)."""

from __future__ import annotations

import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from iotref.sandbox.html_templates import Templates
from iotref.sandbox.http_errors import ApiError
from iotref.sandbox.monitor.access import COOKIE_NAME, MonitorAccess

PACKAGE = "iotref.sandbox.monitor"
TEMPLATES = Templates(PACKAGE)
STATIC = "static"
ASSET_NAME = re.compile(r"^[a-z0-9_\-]+\.(css|js|svg)$")
CONTENT_TYPES = {
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def static_text(name: str) -> str:
    return (resources.files(PACKAGE) / STATIC / name).read_text("utf-8")


class MonitorPage:
    """The page and its files; the page itself takes the cookie only, never a bearer."""

    def __init__(self, access: MonitorAccess) -> None:
        self.access = access

    async def page(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None:
            if not self.access.token_ok(token):
                return self._refused("The token in the link is not this sandbox's admin token.")
            response = RedirectResponse("/monitor", status_code=303, headers=SECURITY_HEADERS)
            response.set_cookie(
                COOKIE_NAME,
                self.access.session,
                httponly=True,
                samesite="strict",
                path="/monitor",
            )
            return response
        if not self.access.cookie_ok(request):
            return self._refused("This page needs the sandbox's admin token.")
        page = TEMPLATES.render("index.html", csrf_token=self.access.csrf)
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    def _refused(self, reason: str) -> Response:
        return HTMLResponse(
            TEMPLATES.render("refused.html", reason=reason),
            status_code=401,
            headers=SECURITY_HEADERS,
        )

    async def asset(self, request: Request) -> Response:
        name = str(request.path_params["name"])
        match = ASSET_NAME.fullmatch(name)
        if match is None:
            raise ApiError(404, "not_found", "no such asset")
        try:
            body = static_text(name)
        except (FileNotFoundError, OSError):
            raise ApiError(404, "not_found", "no such asset") from None
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        return Response(body, media_type=CONTENT_TYPES[match.group(1)], headers=headers)
