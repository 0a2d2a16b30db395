"""The OAuth 2.0 device authorization grant (RFC 8628) in Zaikio's flavour (contract
section 2): ask for a user code, poll the token endpoint at the interval (+5 s after each
``slow_down``), refresh tokens. :class:`TokenSet` keeps tokens out of ``repr``; the clock
and the sleep are injectable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import httpx

from iotref.device import stdlib_compat
from iotref.device.errors import (
    AuthorizationDenied,
    AuthorizationExpired,
    AuthorizationFailed,
    LoginRequired,
    ProtocolError,
)
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.http_client import error_code, json_object, require_str, send
from iotref.device.onboarding.next_steps import NextStep, Selection, run

log = logging.getLogger(__name__)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_TOKEN_GRANT = "refresh_token"
SLOW_DOWN_STEP = 5.0
#: RFC 8628 §3.2: 5 seconds when the server names no interval.
DEFAULT_INTERVAL = 5.0
#: Stop on our own this long after the code's expiry if the server never says so.
LOCAL_EXPIRY_GRACE = 30.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def parse_expires_in(value: Any, now: float) -> float:
    """The absolute expiry (epoch seconds) from ``expires_in``: seconds (number or numeric
    string) or, as Zaikio sends it, an ISO-8601 timestamp."""
    if isinstance(value, bool):
        raise ValueError("expires_in is a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = stdlib_compat.fromisoformat(text)
            except ValueError:
                raise ValueError("expires_in is neither seconds nor an ISO-8601 time") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    else:
        raise ValueError("expires_in is missing")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expires_in is not a usable number of seconds")
    return now + seconds


def iso_utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DeviceAuthorization:
    """The directory's answer to the authorization request: what the person needs."""

    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_at: float
    interval: float
    device_code: str = field(repr=False)

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.expires_at - now)


@dataclass(frozen=True)
class Bearer:
    """Who a token speaks for: an ``Organization`` (``Org.`` scopes) or a ``Person``."""

    id: str
    type: str


@dataclass(frozen=True)
class TokenSet:
    """An access token with its refresh token. Secrets are left out of ``repr``."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_type: str
    scope: str
    audiences: tuple[str, ...]
    bearer: Bearer | None
    expires_at: float
    obtained_at: float

    def is_expired(self, now: float, leeway: float = 60.0) -> bool:
        """Expired, or expiring within ``leeway`` seconds."""
        return now >= self.expires_at - leeway

    def to_json(self) -> dict[str, Any]:
        return {
            "token_type": self.token_type,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "scope": self.scope,
            "audiences": list(self.audiences),
            "bearer": None
            if self.bearer is None
            else {"id": self.bearer.id, "type": self.bearer.type},
            "expires_at": iso_utc(self.expires_at),
            "obtained_at": iso_utc(self.obtained_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenSet:
        """Read what :meth:`to_json` wrote; ``ValueError`` if it is not that."""
        access, refresh = data.get("access_token"), data.get("refresh_token")
        if not isinstance(access, str) or not isinstance(refresh, str) or not access:
            raise ValueError("tokens missing")
        return cls(
            access_token=access,
            refresh_token=refresh,
            token_type=str(data.get("token_type", "bearer")),
            scope=str(data.get("scope", "")),
            audiences=tuple(str(a) for a in data.get("audiences") or ()),
            bearer=_bearer(data.get("bearer")),
            expires_at=parse_expires_in(data.get("expires_at"), 0.0),
            obtained_at=parse_expires_in(data.get("obtained_at"), 0.0),
        )

    @classmethod
    def from_token_answer(cls, data: dict[str, Any], now: float, what: str) -> TokenSet:
        """Read the token endpoint's 200 answer (contract section 2, step 4)."""
        access = require_str(data, "access_token", what)
        refresh = require_str(data, "refresh_token", what)
        token_type = str(data.get("token_type", "bearer"))
        if token_type.lower() != "bearer":
            raise ProtocolError(f"{what}: unsupported token_type {token_type!r}")
        try:
            expires_at = parse_expires_in(data.get("expires_in"), now)
        except ValueError as exc:
            raise ProtocolError(f"{what}: {exc}") from None
        audiences = data.get("audiences")
        return cls(
            access_token=access,
            refresh_token=refresh,
            token_type="bearer",
            scope=str(data.get("scope", "")),
            audiences=tuple(str(a) for a in audiences) if isinstance(audiences, list) else (),
            bearer=_bearer(data.get("bearer")),
            expires_at=expires_at,
            obtained_at=now,
        )


def _bearer(value: Any) -> Bearer | None:
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return Bearer(id=str(value["id"]), type=str(value.get("type", "")))
    return None


@dataclass(frozen=True)
class PollEvent:
    """One unsuccessful poll: ``pending`` or ``slow_down``, the interval now in force and
    the seconds left before the code expires."""

    outcome: Literal["pending", "slow_down"]
    interval: float
    seconds_left: float
    attempt: int


class DeviceFlowClient:
    """The device's side of RFC 8628 against one environment's directory."""

    def __init__(
        self,
        env: Environment,
        http: httpx.AsyncClient,
        *,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.env = env
        self.http = http
        self.clock = clock
        self.sleep = sleep
        self.authorize_url = f"{env.directory_host}/oauth/device_authorizations/authorize"
        self.token_url = f"{env.directory_host}/oauth/access_token"

    async def authorize(self) -> DeviceAuthorization:
        """Step 1: ask for a device code and a user code."""
        what = "device authorization"
        response = await send(
            self.http,
            "POST",
            self.authorize_url,
            what=what,
            data={"client_id": self.env.client_id, "scope": ",".join(self.env.scopes)},
        )
        now = self.clock()
        if response.status_code != 200:
            raise _oauth_failure(response, what)
        data = json_object(response, what)
        try:
            expires_at = parse_expires_in(data.get("expires_in"), now)
        except ValueError as exc:
            raise ProtocolError(f"{what}: {exc}") from None
        interval = data.get("interval", DEFAULT_INTERVAL)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval < 0:
            raise ProtocolError(f"{what}: interval is not a number of seconds")
        verification_uri = require_str(data, "verification_uri", what)
        return DeviceAuthorization(
            user_code=require_str(data, "user_code", what),
            verification_uri=verification_uri,
            verification_uri_complete=str(
                data.get("verification_uri_complete") or verification_uri
            ),
            expires_at=expires_at,
            interval=float(interval),
            device_code=require_str(data, "device_code", what),
        )

    async def poll(
        self,
        authorization: DeviceAuthorization,
        on_pending: Callable[[PollEvent], None] | None = None,
    ) -> TokenSet:
        """Step 3: poll until the person decides. Waits ``interval`` before every poll and
        adds 5 s to it after each ``slow_down``, for the rest of the flow."""
        what = "login"
        interval = authorization.interval
        attempt = 0
        while True:
            await self.sleep(interval)
            attempt += 1
            response = await send(
                self.http,
                "POST",
                self.token_url,
                what=what,
                data={
                    "client_id": self.env.client_id,
                    "grant_type": DEVICE_CODE_GRANT,
                    "device_code": authorization.device_code,
                },
            )
            now = self.clock()
            if response.status_code == 200:
                return TokenSet.from_token_answer(json_object(response, what), now, what)
            error = error_code(response)
            if error == "authorization_pending":
                outcome: Literal["pending", "slow_down"] = "pending"
            elif error == "slow_down":
                interval += SLOW_DOWN_STEP
                outcome = "slow_down"
                log.info("directory asked to slow down; polling every %.0f s now", interval)
            elif error == "access_denied":
                raise AuthorizationDenied(
                    "login denied: the request was denied on the verification page",
                    run("login", then="again and approve the request").within(
                        Selection.of(self.env)
                    ),
                )
            elif error == "expired_token":
                raise _expired(self.env)
            else:
                raise _oauth_failure(response, what)
            if now > authorization.expires_at + LOCAL_EXPIRY_GRACE:
                raise _expired(self.env)
            if on_pending is not None:
                on_pending(PollEvent(outcome, interval, authorization.seconds_left(now), attempt))

    async def refresh(self, refresh_token: str) -> TokenSet:
        """Step 5: trade the refresh token (once) for a new token set."""
        what = "token refresh"
        response = await send(
            self.http,
            "POST",
            self.token_url,
            what=what,
            data={
                "client_id": self.env.client_id,
                "grant_type": REFRESH_TOKEN_GRANT,
                "refresh_token": refresh_token,
            },
        )
        now = self.clock()
        if response.status_code == 200:
            return TokenSet.from_token_answer(json_object(response, what), now, what)
        error = error_code(response)
        if error == "invalid_grant":
            raise LoginRequired(
                f"the saved login for {self.env.name} is no longer valid "
                "(refresh token expired, revoked or already used)",
                _login_step(self.env),
            )
        raise _oauth_failure(response, what)


def _login_step(env: Environment) -> NextStep:
    return run("login").within(Selection.of(env))


def _expired(env: Environment) -> AuthorizationExpired:
    return AuthorizationExpired(
        "login expired: the code was not approved in time",
        run("login", then="again and approve the new code before it expires").within(
            Selection.of(env)
        ),
    )


def _oauth_failure(response: httpx.Response, what: str) -> AuthorizationFailed:
    error = error_code(response)
    known = {
        "invalid_client": "the directory does not know this environment's client id",
        "invalid_scope": "the directory refused the requested scopes",
        "invalid_grant": "the directory refused the grant",
        "unauthorized_client": "this client may not use the device flow",
        "unsupported_grant_type": "the directory does not support this grant",
        "invalid_request": "the directory refused the request as malformed",
    }
    detail = known.get(error) or (f"error {error!r}" if error else "no error code")
    return AuthorizationFailed(
        f"{what} failed: HTTP {response.status_code}, {detail}",
        "check the environment (DIRECTORY_HOST, DIRECTORY_OAUTH_CLIENT_ID, SCOPE)",
        error=error,
    )
