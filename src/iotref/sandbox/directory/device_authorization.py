"""The directory's OAuth 2.0 side: the device authorization grant (RFC 8628, Zaikio flavour),
the token endpoint (device code and refresh token grants) and bearer-token lookup.

Owns the tables ``directory_device_authorizations`` and ``directory_tokens``. Device codes,
access tokens and refresh tokens are stored as SHA-256 hashes only and never logged; the
short user code is stored as is because the verification page and the monitor show it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotref.sandbox.context import SandboxContext
from iotref.sandbox.directory.seed import DEMO_PERSON_ID, FIRST_ORGANIZATION_ID
from iotref.sandbox.http_errors import ApiError, read_form_or_json

log = logging.getLogger(__name__)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_TOKEN_GRANT = "refresh_token"
ORG_PREFIX = "Org."
ORGANIZATION = "Organization"
PERSON = "Person"
VERIFICATION_PATH = "/oauth/device"
SLOW_DOWN_STEP = 5
# Polls this much earlier than the interval still count as on time (timer jitter).
POLL_TOLERANCE = 0.25
_USER_CODE_DIGITS = 8

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS directory_device_authorizations (
        id TEXT PRIMARY KEY,
        device_code_hash TEXT NOT NULL UNIQUE,
        user_code TEXT NOT NULL,
        client_id TEXT NOT NULL,
        scopes TEXT NOT NULL,
        status TEXT NOT NULL,
        interval INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        last_polled_at REAL,
        person_id TEXT,
        organization_id TEXT,
        decided_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS directory_device_authorizations_user_code "
    "ON directory_device_authorizations (user_code)",
    """CREATE TABLE IF NOT EXISTS directory_tokens (
        id TEXT PRIMARY KEY,
        access_token_hash TEXT NOT NULL UNIQUE,
        refresh_token_hash TEXT NOT NULL UNIQUE,
        client_id TEXT NOT NULL,
        person_id TEXT NOT NULL,
        organization_id TEXT,
        bearer_type TEXT NOT NULL,
        scopes TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        refresh_expires_at REAL NOT NULL,
        refresh_used_at REAL,
        revoked_at REAL,
        previous_id TEXT
    )""",
]

# pending: waiting for the person; approved/denied: decided; consumed: exchanged for tokens.
PENDING, APPROVED, DENIED, CONSUMED = "pending", "approved", "denied", "consumed"


def hash_secret(value: str) -> str:
    """SHA-256 hex of a token, device code or refresh token: what the database keeps."""
    return hashlib.sha256(value.encode()).hexdigest()


def iso_time(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds, the way the platform writes times."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_scopes(raw: str) -> list[str]:
    """Comma (Zaikio) or space (RFC 6749) separated scopes, de-duplicated, in order."""
    seen: dict[str, None] = {}
    for part in re.split(r"[,\s]+", raw):
        if part:
            seen[part] = None
    return list(seen)


def bearer_type_of(scopes: list[str] | frozenset[str]) -> str:
    return ORGANIZATION if any(s.startswith(ORG_PREFIX) for s in scopes) else PERSON


def audiences_of(scopes: list[str] | frozenset[str]) -> list[str]:
    """The services a token is meant for: the first part of each scope (``directory``...)."""
    return sorted({s.removeprefix(ORG_PREFIX).split(".")[0] for s in scopes})


@dataclass(frozen=True)
class AccessGrant:
    """What a valid access token stands for."""

    token_id: str
    organization_id: str | None
    person_id: str
    scopes: frozenset[str]
    bearer_type: str  # "Organization" or "Person"

    def has_scope(self, scope: str) -> bool:
        """Whether the token grants ``scope`` (given with or without ``Org.``).

        An Organization bearer holds ``Org.``-prefixed scopes, a Person bearer plain ones;
        ``.rw`` implies ``.r``.
        """
        organization = self.bearer_type == ORGANIZATION
        if scope.startswith(ORG_PREFIX) and not organization:
            return False
        base = scope.removeprefix(ORG_PREFIX)
        prefix = ORG_PREFIX if organization else ""
        wanted = {prefix + base}
        if base.endswith(".r"):
            wanted.add(prefix + base + "w")
        return not wanted.isdisjoint(self.scopes)


@dataclass(frozen=True)
class PendingAuthorization:
    """A device authorization request as the verification page sees it."""

    id: str
    user_code: str
    client_id: str
    client_name: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float

    @property
    def bearer_type(self) -> str:
        return bearer_type_of(list(self.scopes))


def _uuid() -> str:
    return str(uuid.uuid4())


class OAuthServer:
    """Device authorization requests, their decisions, token issue, refresh and lookup."""

    def __init__(self, ctx: SandboxContext, clock: Callable[[], float]) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.clock = clock
        self.db.ensure_schema(SCHEMA)

    # -- HTTP -------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/oauth/device_authorizations/authorize", self._authorize, methods=["POST"]),
            Route("/oauth/access_token", self._access_token, methods=["POST"]),
            Route("/oauth/access_token.json", self._access_token, methods=["POST"]),
        ]

    async def _authorize(self, request: Request) -> Response:
        params = await read_form_or_json(request)
        client_id = params.get("client_id", "").strip()
        raw_scope = params.get("scope", "")
        if not client_id:
            raise ApiError(400, "invalid_request", "client_id is missing")
        app = self._client(client_id)
        if app is None:
            raise ApiError(401, "invalid_client", "unknown client_id")
        scopes = parse_scopes(raw_scope)
        if not scopes:
            raise ApiError(400, "invalid_request", "scope is missing")
        allowed = set(str(app["scopes"]).split(","))
        unknown = [s for s in scopes if s not in allowed]
        if unknown:
            raise ApiError(400, "invalid_scope", f"unknown scope: {', '.join(unknown)}")
        if len({s.startswith(ORG_PREFIX) for s in scopes}) > 1:
            raise ApiError(400, "invalid_scope", "Org. scopes and person scopes cannot be mixed")
        base = self.ctx.http_url or str(request.base_url).rstrip("/")
        answer = self.create_authorization(client_id, scopes, base)
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    async def _access_token(self, request: Request) -> Response:
        params = await read_form_or_json(request)
        grant_type = params.get("grant_type", "")
        if not grant_type:
            raise ApiError(400, "invalid_request", "grant_type is missing")
        if grant_type == DEVICE_CODE_GRANT:
            body = self.exchange_device_code(
                params.get("device_code", ""), params.get("client_id", "")
            )
        elif grant_type == REFRESH_TOKEN_GRANT:
            body = self.refresh(params.get("refresh_token", ""), params.get("client_id") or None)
        else:
            raise ApiError(400, "unsupported_grant_type", "grant_type is not supported")
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    # -- device authorizations ----------------------------------------------------------------

    def _client(self, client_id: str) -> sqlite3.Row | None:
        return self.db.query_one(
            "SELECT client_id, name, scopes FROM directory_oauth_apps WHERE client_id = ?",
            (client_id,),
        )

    def create_authorization(
        self, client_id: str, scopes: list[str], base_url: str
    ) -> dict[str, Any]:
        """Start a device authorization request; the RFC 8628 §3.2 answer."""
        settings = self.ctx.settings
        now = self.clock()
        device_code = secrets.token_urlsafe(32)
        auth_id = _uuid()
        with self.db.transaction() as conn:
            user_code = self._new_user_code(conn, now)
            conn.execute(
                "INSERT INTO directory_device_authorizations (id, device_code_hash, user_code, "
                "client_id, scopes, status, interval, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    auth_id,
                    hash_secret(device_code),
                    user_code,
                    client_id,
                    ",".join(scopes),
                    PENDING,
                    settings.poll_interval,
                    now,
                    now + settings.device_code_ttl,
                ),
            )
            if settings.auto_approve:
                organization_id = (
                    FIRST_ORGANIZATION_ID if bearer_type_of(scopes) == ORGANIZATION else None
                )
                conn.execute(
                    "UPDATE directory_device_authorizations SET status = ?, person_id = ?, "
                    "organization_id = ?, decided_at = ? WHERE id = ?",
                    (APPROVED, DEMO_PERSON_ID, organization_id, now, auth_id),
                )
        log.info(
            "device authorization %s requested%s",
            auth_id,
            " (auto-approved)" if settings.auto_approve else "",
        )
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": base_url + VERIFICATION_PATH,
            "verification_uri_complete": verification_uri_complete(base_url, user_code),
            "expires_in": settings.device_code_ttl,
            "interval": settings.poll_interval,
        }

    @staticmethod
    def _new_user_code(conn: sqlite3.Connection, now: float) -> str:
        while True:
            code = f"{secrets.randbelow(10**_USER_CODE_DIGITS):0{_USER_CODE_DIGITS}d}"
            clash = conn.execute(
                "SELECT 1 FROM directory_device_authorizations "
                "WHERE user_code = ? AND status = ? AND expires_at > ?",
                (code, PENDING, now),
            ).fetchone()
            if clash is None:
                return code

    def find_pending(self, user_code: str) -> PendingAuthorization | None:
        """The live, undecided request with this user code (spaces and dashes ignored)."""
        code = normalize_user_code(user_code)
        if code is None:
            return None
        row = self.db.query_one(
            "SELECT a.id, a.user_code, a.client_id, a.scopes, a.created_at, a.expires_at, "
            "o.name AS client_name FROM directory_device_authorizations a "
            "JOIN directory_oauth_apps o ON o.client_id = a.client_id "
            "WHERE a.user_code = ? AND a.status = ? AND a.expires_at > ?",
            (code, PENDING, self.clock()),
        )
        if row is None:
            return None
        return PendingAuthorization(
            id=str(row["id"]),
            user_code=str(row["user_code"]),
            client_id=str(row["client_id"]),
            client_name=str(row["client_name"]),
            scopes=tuple(str(row["scopes"]).split(",")),
            created_at=float(row["created_at"]),
            expires_at=float(row["expires_at"]),
        )

    def decide(
        self, authorization_id: str, approve: bool, person_id: str, organization_id: str | None
    ) -> bool:
        """Approve or deny a pending request; False if it is no longer pending."""
        cursor = self.db.execute(
            "UPDATE directory_device_authorizations SET status = ?, person_id = ?, "
            "organization_id = ?, decided_at = ? "
            "WHERE id = ? AND status = ? AND expires_at > ?",
            (
                APPROVED if approve else DENIED,
                person_id,
                organization_id if approve else None,
                self.clock(),
                authorization_id,
                PENDING,
                self.clock(),
            ),
        )
        decided = cursor.rowcount == 1
        if decided:
            log.info(
                "device authorization %s %s", authorization_id, "approved" if approve else "denied"
            )
        return decided

    def pending(self) -> list[dict[str, Any]]:
        rows = self.db.query_all(
            "SELECT user_code, created_at, expires_at FROM directory_device_authorizations "
            "WHERE status = ? AND expires_at > ? ORDER BY created_at",
            (PENDING, self.clock()),
        )
        return [
            {
                "user_code": str(row["user_code"]),
                "created_at": iso_time(float(row["created_at"])),
                "expires_at": iso_time(float(row["expires_at"])),
                "verification_uri_complete": verification_uri_complete(
                    self.ctx.http_url, str(row["user_code"])
                ),
            }
            for row in rows
        ]

    def exchange_device_code(self, device_code: str, client_id: str) -> dict[str, Any]:
        """One poll of the token endpoint with a device code (RFC 8628 §3.4/3.5)."""
        if not device_code:
            raise ApiError(400, "invalid_request", "device_code is missing")
        if not client_id or self._client(client_id) is None:
            raise ApiError(401, "invalid_client", "unknown client_id")
        with self.db.transaction() as conn:
            outcome = self._poll(conn, device_code, client_id)
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome

    def _poll(
        self, conn: sqlite3.Connection, device_code: str, client_id: str
    ) -> dict[str, Any] | ApiError:
        """The poll's answer; errors are returned so that the poll's bookkeeping commits."""
        now = self.clock()
        row = conn.execute(
            "SELECT * FROM directory_device_authorizations WHERE device_code_hash = ?",
            (hash_secret(device_code),),
        ).fetchone()
        if row is None:
            return ApiError(400, "invalid_grant", "unknown device_code")
        if row["client_id"] != client_id:
            return ApiError(401, "invalid_client", "device_code belongs to another client")
        status = row["status"]
        if status == CONSUMED:
            return ApiError(400, "invalid_grant", "device_code was already used")
        if row["expires_at"] <= now:
            return ApiError(400, "expired_token", "device_code has expired")
        if status == DENIED:
            return ApiError(400, "access_denied", "the request was denied")
        if status == PENDING:
            interval = int(row["interval"])
            last = row["last_polled_at"]
            too_fast = last is not None and now - float(last) < interval - POLL_TOLERANCE
            if too_fast:
                interval += SLOW_DOWN_STEP
            conn.execute(
                "UPDATE directory_device_authorizations SET interval = ?, last_polled_at = ? "
                "WHERE id = ?",
                (interval, now, row["id"]),
            )
            if too_fast:
                return ApiError(
                    400, "slow_down", f"polling too fast; wait {interval} s between polls"
                )
            return ApiError(400, "authorization_pending", "waiting for the person")
        conn.execute(
            "UPDATE directory_device_authorizations SET status = ?, last_polled_at = ? "
            "WHERE id = ?",
            (CONSUMED, now, row["id"]),
        )
        scopes = str(row["scopes"]).split(",")
        body = self._issue(
            conn, client_id, str(row["person_id"]), row["organization_id"], scopes, None
        )
        log.info("device authorization %s exchanged for token %s", row["id"], body.pop("_id"))
        return body

    # -- tokens -------------------------------------------------------------------------------

    def _issue(
        self,
        conn: sqlite3.Connection,
        client_id: str,
        person_id: str,
        organization_id: str | None,
        scopes: list[str],
        previous_id: str | None,
    ) -> dict[str, Any]:
        settings = self.ctx.settings
        now = self.clock()
        access_token = secrets.token_urlsafe(32)
        refresh_token = secrets.token_urlsafe(32)
        token_id = _uuid()
        bearer_type = bearer_type_of(scopes)
        if bearer_type == ORGANIZATION and organization_id is None:
            raise ApiError(400, "invalid_grant", "no organization was chosen")
        expires_at = now + settings.access_token_ttl
        conn.execute(
            "INSERT INTO directory_tokens (id, access_token_hash, refresh_token_hash, client_id, "
            "person_id, organization_id, bearer_type, scopes, created_at, expires_at, "
            "refresh_expires_at, previous_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                token_id,
                hash_secret(access_token),
                hash_secret(refresh_token),
                client_id,
                person_id,
                organization_id,
                bearer_type,
                ",".join(scopes),
                now,
                expires_at,
                now + settings.refresh_token_ttl,
                previous_id,
            ),
        )
        bearer_id = organization_id if bearer_type == ORGANIZATION else person_id
        return {
            "_id": token_id,
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": "bearer",
            "scope": ",".join(scopes),
            "audiences": audiences_of(scopes),
            "bearer": {"id": bearer_id, "type": bearer_type},
            # Zaikio's quirk: the expiry as an ISO-8601 timestamp, not seconds.
            "expires_in": iso_time(expires_at),
        }

    def refresh(self, refresh_token: str, client_id: str | None) -> dict[str, Any]:
        """Trade a refresh token (once) for a new access token and a new refresh token."""
        if not refresh_token:
            raise ApiError(400, "invalid_request", "refresh_token is missing")
        if client_id is not None and self._client(client_id) is None:
            raise ApiError(401, "invalid_client", "unknown client_id")
        now = self.clock()
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM directory_tokens WHERE refresh_token_hash = ?",
                (hash_secret(refresh_token),),
            ).fetchone()
            if row is None:
                raise ApiError(400, "invalid_grant", "unknown refresh_token")
            if client_id is not None and row["client_id"] != client_id:
                raise ApiError(401, "invalid_client", "refresh_token belongs to another client")
            if row["refresh_used_at"] is not None or row["revoked_at"] is not None:
                raise ApiError(400, "invalid_grant", "refresh_token was already used or revoked")
            if row["refresh_expires_at"] <= now:
                raise ApiError(400, "invalid_grant", "refresh_token has expired")
            # The old pair ends here: its refresh token is spent, its access token revoked.
            conn.execute(
                "UPDATE directory_tokens SET refresh_used_at = ?, revoked_at = ? WHERE id = ?",
                (now, now, row["id"]),
            )
            body = self._issue(
                conn,
                str(row["client_id"]),
                str(row["person_id"]),
                row["organization_id"],
                str(row["scopes"]).split(","),
                str(row["id"]),
            )
        log.info("token %s refreshed as %s", row["id"], body.pop("_id"))
        return body

    def authenticate(self, authorization: str | None) -> AccessGrant | None:
        """The grant behind an ``Authorization: Bearer <token>`` header, if it is valid."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return None
        row = self.db.query_one(
            "SELECT id, person_id, organization_id, bearer_type, scopes FROM directory_tokens "
            "WHERE access_token_hash = ? AND revoked_at IS NULL AND expires_at > ?",
            (hash_secret(token), self.clock()),
        )
        if row is None:
            return None
        return AccessGrant(
            token_id=str(row["id"]),
            organization_id=row["organization_id"],
            person_id=str(row["person_id"]),
            scopes=frozenset(str(row["scopes"]).split(",")),
            bearer_type=str(row["bearer_type"]),
        )

    def purge(self, older_than: float) -> None:
        """Forget device requests and tokens that ended before ``older_than``."""
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM directory_device_authorizations WHERE expires_at < ?", (older_than,)
            )
            conn.execute(
                "DELETE FROM directory_tokens WHERE refresh_expires_at < ? AND expires_at < ?",
                (older_than, older_than),
            )


def normalize_user_code(raw: str) -> str | None:
    code = re.sub(r"[\s-]", "", raw)
    if len(code) != _USER_CODE_DIGITS or not code.isascii() or not code.isdigit():
        return None
    return code


def verification_uri_complete(base_url: str, user_code: str) -> str:
    return f"{base_url}{VERIFICATION_PATH}?user_code={user_code}"
