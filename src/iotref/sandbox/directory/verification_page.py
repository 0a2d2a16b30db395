"""The device flow's verification page (``/oauth/device``): sign in, check the code, pick the
organization, approve or deny. The sign-in page names the seeded demo account, which
``GET /oauth/device/demo_account`` also answers (for ``iotref login`` on the sandbox).

Server-rendered HTML from the files in ``templates/`` (:mod:`iotref.sandbox.html_templates`),
with the style sheet inlined: the page loads nothing else. Sessions live server-side in
``directory_sessions`` (the cookie holds a random id, the table its SHA-256); every form
carries a CSRF token derived from the session id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from iotref.sandbox.directory.device_authorization import (
    ORG_PREFIX,
    ORGANIZATION,
    VERIFICATION_PATH,
    OAuthServer,
    PendingAuthorization,
    hash_secret,
    normalize_user_code,
)
from iotref.sandbox.directory.records import DirectoryRecords, Organization
from iotref.sandbox.directory.seed import DEMO_EMAIL, DEMO_PASSWORD
from iotref.sandbox.html_templates import Html, Templates
from iotref.sandbox.http_errors import ApiError, read_form_or_json

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

STYLE_SHEET = "verification.css"
TEMPLATES = Templates("iotref.sandbox.directory")
render = TEMPLATES.render


def _csrf_token(session_id: str) -> str:
    return hmac.new(session_id.encode(), b"iotref-directory-csrf", hashlib.sha256).hexdigest()


def _page(title: str, body: Html, status: int = 200) -> HTMLResponse:
    style = Html(TEMPLATES.text(STYLE_SHEET))
    html = render("layout.html", title=title, style=style, body=body) + "\n"
    return HTMLResponse(html, status_code=status, headers=HTML_HEADERS)


def _message(text: str, kind: str = "error") -> Html:
    return render("message.html", kind=kind, text=text) if text else Html("")


class _Session:
    def __init__(self, session_id: str, person_id: str | None) -> None:
        self.id = session_id
        self.person_id = person_id
        self.csrf = _csrf_token(session_id)


class VerificationPage:
    """The ``/oauth/device`` pages: the person signs in to the directory's records and
    decides on the device requests of ``oauth``."""

    def __init__(self, records: DirectoryRecords, oauth: OAuthServer) -> None:
        self.records = records
        self.db = records.db
        self.oauth = oauth
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

    def purge_sessions(self) -> None:
        """Forget the sessions that have expired."""
        self.db.execute(
            "DELETE FROM directory_sessions WHERE expires_at < ?", (self.records.clock(),)
        )

    def _session(self, request: Request) -> _Session | None:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        if not session_id or len(session_id) > 128:
            return None
        row = self.db.query_one(
            "SELECT person_id FROM directory_sessions WHERE id_hash = ? AND expires_at > ?",
            (hash_secret(session_id), self.records.clock()),
        )
        if row is None:
            return None
        return _Session(session_id, row["person_id"])

    def _new_session(self, person_id: str | None) -> _Session:
        session_id = secrets.token_urlsafe(32)
        now = self.records.clock()
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
        body = render(
            "sign_in.html",
            message=_message(message),
            demo_email=DEMO_EMAIL,
            demo_password=DEMO_PASSWORD,
            sign_in_path=SIGN_IN_PATH,
            csrf_token=session.csrf,
            user_code=user_code,
        )
        return _page("Sign in", body, status)

    def _sign_out_form(self, session: _Session) -> Html:
        return render("sign_out.html", sign_out_path=SIGN_OUT_PATH, csrf_token=session.csrf)

    def _code_page(
        self, session: _Session, user_code: str = "", message: str = "", status: int = 200
    ) -> HTMLResponse:
        body = render(
            "code.html",
            message=_message(message),
            verification_path=VERIFICATION_PATH,
            user_code=user_code,
            sign_out=self._sign_out_form(session),
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
        person = self.records.person_row(session.person_id or "")
        who = f"{person['first_name']} {person['name']} ({person['email']})" if person else "?"
        scopes = "".join(
            render("scope.html", text=SCOPE_TEXT.get(s.removeprefix(ORG_PREFIX), s), scope=s)
            for s in request_.scopes
        )
        if request_.bearer_type == ORGANIZATION:
            options = "".join(
                render("organization_option.html", id=org.id, name=org.name)
                for org in organizations
            )
            chooser = render("organization_chooser.html", options=Html(options))
        else:
            chooser = render("person_chooser.html")
        body = render(
            "confirm.html",
            message=_message(message),
            user_code=request_.user_code,
            client_name=request_.client_name,
            scopes=Html(scopes),
            verification_path=VERIFICATION_PATH,
            csrf_token=session.csrf,
            chooser=chooser,
            who=who,
            sign_out=self._sign_out_form(session),
        )
        return _page("Approve device", body, status)

    def _result_page(self, approved: bool) -> HTMLResponse:
        if approved:
            heading, text = "Device connected", "Approved. You can return to your device now."
        else:
            heading, text = "Request denied", "Denied. The device was not given access."
        return _page("Done", render("result.html", heading=heading, message=_message(text, "ok")))

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
        organizations = self.records.organizations_of(session.person_id)
        return self._confirm_page(session, pending, organizations)

    async def _sign_in(self, request: Request) -> Response:
        session = self._session(request)
        form = await self._form(request, session)
        assert session is not None
        user_code = form.get("user_code", "").strip()[:32]
        person_id = self.records.check_login(
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
        organizations = self.records.organizations_of(session.person_id)
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
