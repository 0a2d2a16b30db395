"""The device flow's verification page (``/oauth/device``): sign in, check the code, pick the
organization, approve or deny. The sign-in page names the seeded demo account, which
``GET /oauth/device/demo_account`` also answers (for ``iotref login`` on the sandbox).

Plain server-rendered HTML without external assets; every dynamic value is HTML-escaped.
Sessions live server-side in ``directory_sessions`` (the cookie holds a random id, the
table its SHA-256); every form carries a CSRF token derived from the session id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from iotref.sandbox.device_authorization import (
    ORG_PREFIX,
    ORGANIZATION,
    VERIFICATION_PATH,
    PendingAuthorization,
    hash_secret,
    normalize_user_code,
)
from iotref.sandbox.http_errors import ApiError, read_form_or_json
from iotref.sandbox.seed import DEMO_EMAIL, DEMO_PASSWORD

if TYPE_CHECKING:
    from iotref.sandbox.directory import Directory, Organization

SESSION_COOKIE = "iotref_directory_session"
SESSION_TTL = 12 * 3600
SIGN_IN_PATH = VERIFICATION_PATH + "/sign_in"
SIGN_OUT_PATH = VERIFICATION_PATH + "/sign_out"
DEMO_ACCOUNT_PATH = VERIFICATION_PATH + "/demo_account"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS directory_sessions (
        id_hash TEXT PRIMARY KEY,
        person_id TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    )""",
]

SCOPE_TEXT = {
    "prinect.onprem.r": "read Prinect on-premises data",
    "prinect.onprem.rw": "send and manage Prinect on-premises data (IoT telemetry)",
    "directory.machines.r": "see the organization's sites and machines",
    "directory.machines.rw": "see and register sites and machines",
    "directory.organization.r": "see basic information about the organization",
    "directory.organization_members.r": "see the organization's members",
    "directory.person.r": "see your name and email address",
}

HTML_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;
color:#1b1f24;background:#f6f7f9}
main{background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:1.5rem 2rem}
h1{font-size:1.4rem;margin-top:0}label{display:block;margin:.8rem 0 .3rem;font-weight:600}
input,select{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}
.code{font-family:monospace;font-size:1.6rem;letter-spacing:.2rem}
.actions{display:flex;gap:1rem;margin-top:1.2rem}
button{padding:.6rem 1.2rem;font-size:1rem;border-radius:6px;border:1px solid #888;cursor:pointer}
button.primary{background:#0b5cad;color:#fff;border-color:#0b5cad}
.message{padding:.7rem 1rem;border-radius:6px;margin-bottom:1rem}
.error{background:#fde8e8;border:1px solid #e0a0a0}.ok{background:#e6f6ea;border:1px solid #9fd3ac}
.muted{color:#5b6570;font-size:.9rem}form.inline{display:inline}
"""


def purge_sessions(directory: Directory) -> None:
    directory.db.ensure_schema(SCHEMA)
    directory.db.execute(
        "DELETE FROM directory_sessions WHERE expires_at < ?", (directory.clock(),)
    )


def _csrf_token(session_id: str) -> str:
    return hmac.new(session_id.encode(), b"iotref-directory-csrf", hashlib.sha256).hexdigest()


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · iotref sandbox directory</title>"
        f"<style>{_STYLE}</style></head><body><main>{body}</main>"
        '<p class="muted">iotref sandbox: a local copy of the Zaikio directory.</p>'
        "</body></html>\n"
    )
    return HTMLResponse(html, status_code=status, headers=HTML_HEADERS)


def _message(text: str, kind: str = "error") -> str:
    return f'<div class="message {kind}" role="alert">{escape(text)}</div>' if text else ""


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'


class _Session:
    def __init__(self, session_id: str, person_id: str | None) -> None:
        self.id = session_id
        self.person_id = person_id
        self.csrf = _csrf_token(session_id)


class VerificationPage:
    """The ``/oauth/device`` pages of one :class:`~iotref.sandbox.directory.Directory`."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.db = directory.db
        self.oauth = directory.oauth
        self.db.ensure_schema(SCHEMA)

    def routes(self) -> list[BaseRoute]:
        return [
            Route(VERIFICATION_PATH, self._show, methods=["GET"]),
            Route(VERIFICATION_PATH, self._decide, methods=["POST"]),
            Route(SIGN_IN_PATH, self._sign_in, methods=["POST"]),
            Route(SIGN_OUT_PATH, self._sign_out, methods=["POST"]),
            Route(DEMO_ACCOUNT_PATH, self._demo_account, methods=["GET"]),
        ]

    # -- sessions ---------------------------------------------------------------------------

    def _session(self, request: Request) -> _Session | None:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        if not session_id or len(session_id) > 128:
            return None
        row = self.db.query_one(
            "SELECT person_id FROM directory_sessions WHERE id_hash = ? AND expires_at > ?",
            (hash_secret(session_id), self.directory.clock()),
        )
        if row is None:
            return None
        return _Session(session_id, row["person_id"])

    def _new_session(self, person_id: str | None) -> _Session:
        session_id = secrets.token_urlsafe(32)
        now = self.directory.clock()
        self.db.execute(
            "INSERT INTO directory_sessions (id_hash, person_id, created_at, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (hash_secret(session_id), person_id, now, now + SESSION_TTL),
        )
        return _Session(session_id, person_id)

    def _drop_session(self, session: _Session) -> None:
        self.db.execute(
            "DELETE FROM directory_sessions WHERE id_hash = ?", (hash_secret(session.id),)
        )

    @staticmethod
    def _set_cookie(response: Response, session: _Session) -> Response:
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            max_age=SESSION_TTL,
            path="/oauth",
            httponly=True,
            samesite="lax",
        )
        return response

    async def _form(self, request: Request, session: _Session | None) -> dict[str, str]:
        """The posted form, after the CSRF check."""
        form = await read_form_or_json(request)
        sent = form.get("csrf_token", "")
        if session is None or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise ApiError(
                403, "invalid_csrf_token", "The form has expired. Reload the page and try again."
            )
        return form

    # -- pages ------------------------------------------------------------------------------

    def _sign_in_page(
        self, session: _Session, user_code: str, message: str = "", status: int = 200
    ) -> HTMLResponse:
        body = (
            "<h1>Connect a device</h1>"
            f"{_message(message)}"
            "<p>Sign in to the directory to approve the device.</p>"
            '<p class="muted" id="demo-account">This sandbox\'s demo account: email '
            f"<code>{escape(DEMO_EMAIL)}</code>, password <code>{escape(DEMO_PASSWORD)}</code>"
            ".</p>"
            f'<form method="post" action="{SIGN_IN_PATH}">'
            f"{_hidden('csrf_token', session.csrf)}{_hidden('user_code', user_code)}"
            '<label for="email">Email</label>'
            '<input id="email" name="email" type="email" autocomplete="username" required>'
            '<label for="password">Password</label>'
            '<input id="password" name="password" type="password" '
            'autocomplete="current-password" required>'
            '<div class="actions"><button class="primary" type="submit">Sign in</button></div>'
            "</form>"
        )
        return _page("Sign in", body, status)

    def _sign_out_form(self, session: _Session) -> str:
        return (
            f'<form class="inline" method="post" action="{SIGN_OUT_PATH}">'
            f"{_hidden('csrf_token', session.csrf)}"
            '<button type="submit">Sign out</button></form>'
        )

    def _code_page(
        self, session: _Session, user_code: str = "", message: str = "", status: int = 200
    ) -> HTMLResponse:
        body = (
            "<h1>Connect a device</h1>"
            f"{_message(message)}"
            "<p>Enter the 8-digit code that your device shows.</p>"
            f'<form method="get" action="{VERIFICATION_PATH}">'
            '<label for="user_code">Code</label>'
            f'<input id="user_code" name="user_code" class="code" inputmode="numeric" '
            f'autocomplete="off" maxlength="12" value="{escape(user_code)}" required>'
            '<div class="actions"><button class="primary" type="submit">Continue</button></div>'
            f"</form><p>{self._sign_out_form(session)}</p>"
        )
        return _page("Enter code", body, status)

    def _confirm_page(
        self,
        session: _Session,
        request_: PendingAuthorization,
        organizations: list[Organization],
        message: str = "",
        status: int = 200,
    ) -> HTMLResponse:
        person = self.directory.person_row(session.person_id or "")
        who = f"{person['first_name']} {person['name']} ({person['email']})" if person else "?"
        scopes = "".join(
            f"<li>{escape(SCOPE_TEXT.get(s.removeprefix(ORG_PREFIX), s))} "
            f'<span class="muted">({escape(s)})</span></li>'
            for s in request_.scopes
        )
        if request_.bearer_type == ORGANIZATION:
            options = "".join(
                f'<option value="{escape(org.id)}">{escape(org.name)}</option>'
                for org in organizations
            )
            chooser = (
                '<label for="organization_id">Organization the device belongs to</label>'
                f'<select id="organization_id" name="organization_id" required>{options}'
                "</select>"
            )
        else:
            chooser = "<p>The device will act on your behalf.</p>"
        body = (
            "<h1>Connect a device</h1>"
            f"{_message(message)}"
            f"<p>Check that your device shows this code:</p>"
            f'<p class="code">{escape(request_.user_code)}</p>'
            f"<p><strong>{escape(request_.client_name)}</strong> asks to:</p><ul>{scopes}</ul>"
            f'<form method="post" action="{VERIFICATION_PATH}">'
            f"{_hidden('csrf_token', session.csrf)}{_hidden('user_code', request_.user_code)}"
            f"{chooser}"
            '<div class="actions">'
            '<button class="primary" type="submit" name="decision" value="approve">Approve'
            "</button>"
            '<button type="submit" name="decision" value="deny">Deny</button></div></form>'
            f'<p class="muted">Signed in as {escape(who)}. {self._sign_out_form(session)}</p>'
        )
        return _page("Approve device", body, status)

    def _result_page(self, approved: bool) -> HTMLResponse:
        if approved:
            body = (
                "<h1>Device connected</h1>"
                f"{_message('Approved. You can return to your device now.', 'ok')}"
            )
        else:
            body = (
                "<h1>Request denied</h1>"
                f"{_message('Denied. The device was not given access.', 'ok')}"
            )
        return _page("Done", body)

    @staticmethod
    def _unknown_code(user_code: str) -> str:
        return (
            f"The code “{user_code}” is not valid: it is wrong, has expired or was already "
            "used. Check the code on your device, or start again there."
        )

    # -- handlers ---------------------------------------------------------------------------

    async def _show(self, request: Request) -> Response:
        user_code = request.query_params.get("user_code", "").strip()[:32]
        session = self._session(request)
        if session is None:
            session = self._new_session(None)
            return self._set_cookie(self._sign_in_page(session, user_code), session)
        if session.person_id is None:
            return self._sign_in_page(session, user_code)
        if not user_code:
            return self._code_page(session)
        pending = self.oauth.find_pending(user_code)
        if pending is None:
            return self._code_page(session, user_code, self._unknown_code(user_code), 400)
        organizations = self.directory.organizations_of(session.person_id)
        return self._confirm_page(session, pending, organizations)

    async def _sign_in(self, request: Request) -> Response:
        session = self._session(request)
        form = await self._form(request, session)
        assert session is not None
        user_code = form.get("user_code", "").strip()[:32]
        person_id = self.directory.check_login(
            form.get("email", "")[:320], form.get("password", "")[:1024]
        )
        if person_id is None:
            return self._sign_in_page(session, user_code, "Wrong email or password.", 401)
        # A fresh session id on sign-in, so that a planted cookie cannot ride along.
        self._drop_session(session)
        session = self._new_session(person_id)
        target = VERIFICATION_PATH
        code = normalize_user_code(user_code)
        if code is not None:
            target += "?" + urlencode({"user_code": code})
        return self._set_cookie(RedirectResponse(target, status_code=303), session)

    async def _demo_account(self, request: Request) -> Response:
        """The seeded demo account, for a command line to show beside the code (the
        sandbox serves loopback only; its sign-in page shows the same)."""
        return JSONResponse({"email": DEMO_EMAIL, "password": DEMO_PASSWORD})

    async def _sign_out(self, request: Request) -> Response:
        session = self._session(request)
        await self._form(request, session)
        assert session is not None
        self._drop_session(session)
        response = RedirectResponse(VERIFICATION_PATH, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/oauth")
        return response

    async def _decide(self, request: Request) -> Response:
        session = self._session(request)
        form = await self._form(request, session)
        assert session is not None
        user_code = form.get("user_code", "").strip()[:32]
        if session.person_id is None:
            return self._sign_in_page(session, user_code, "Please sign in first.", 401)
        decision = form.get("decision", "")
        if decision not in ("approve", "deny"):
            raise ApiError(400, "invalid_request", "decision must be approve or deny")
        pending = self.oauth.find_pending(user_code)
        if pending is None:
            return self._code_page(session, user_code, self._unknown_code(user_code), 400)
        organizations = self.directory.organizations_of(session.person_id)
        organization_id: str | None = None
        if decision == "approve" and pending.bearer_type == ORGANIZATION:
            organization_id = form.get("organization_id", "").strip()
            if organization_id not in {org.id for org in organizations}:
                return self._confirm_page(
                    session,
                    pending,
                    organizations,
                    "Choose one of your organizations for the device.",
                    400,
                )
        approve = decision == "approve"
        if not self.oauth.decide(pending.id, approve, session.person_id, organization_id):
            return self._code_page(session, user_code, self._unknown_code(user_code), 400)
        return self._result_page(approve)
