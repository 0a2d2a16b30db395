"""The device flow against scripted answers (httpx.MockTransport) with a fake clock."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from iotref.device.errors import (
    AuthorizationDenied,
    AuthorizationExpired,
    AuthorizationFailed,
    LoginRequired,
    NetworkError,
    ProtocolError,
)
from iotref.device.onboarding.device_flow import (
    DEVICE_CODE_GRANT,
    DeviceAuthorization,
    DeviceFlowClient,
    PollEvent,
    TokenSet,
    parse_expires_in,
)
from iotref.device.onboarding.environment import load_environment
from iotref.device.onboarding.http_client import create_http_client

ENV = load_environment("test")
DEVICE_CODE = "dc-SECRET-device-code-123"
ACCESS = "at-SECRET-access-token-456"
REFRESH = "rt-SECRET-refresh-token-789"


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _token_answer(expires_in: Any = "2030-01-01T00:00:00.000Z") -> dict[str, Any]:
    return {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "token_type": "bearer",
        "scope": ENV.scope,
        "audiences": ["directory", "prinect"],
        "bearer": {"id": "org-1", "type": "Organization"},
        "expires_in": expires_in,
    }


def _authorization(interval: float = 5, expires_in: float = 900) -> DeviceAuthorization:
    return DeviceAuthorization(
        user_code="12345678",
        verification_uri="https://dir/oauth/device",
        verification_uri_complete="https://dir/oauth/device?user_code=12345678",
        expires_at=1_000_000.0 + expires_in,
        interval=interval,
        device_code=DEVICE_CODE,
    )


def _scripted(
    answers: list[tuple[int, dict[str, Any]]], seen: list[httpx.Request]
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body = answers.pop(0)
        return httpx.Response(status, json=body)

    return handler


def _run_poll(
    answers: list[tuple[int, dict[str, Any]]],
    interval: float = 5,
    events: list[PollEvent] | None = None,
) -> tuple[TokenSet, FakeTime, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    fake = FakeTime()

    async def run() -> TokenSet:
        async with create_http_client(
            transport=httpx.MockTransport(_scripted(answers, seen))
        ) as http:
            flow = DeviceFlowClient(ENV, http, clock=fake.clock, sleep=fake.sleep)
            return await flow.poll(
                _authorization(interval), events.append if events is not None else None
            )

    return asyncio.run(run()), fake, seen


def _error(code: str) -> tuple[int, dict[str, Any]]:
    return 400, {"error": code}


# -- expires_in -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3600, 4600.0),
        (3600.5, 4600.5),
        ("3600", 4600.0),
        ("1970-01-01T01:00:00Z", 3600.0),
        ("1970-01-01T01:00:00.000Z", 3600.0),
        ("1970-01-01T02:00:00+01:00", 3600.0),
        ("1970-01-01T01:00:00", 3600.0),  # no zone: UTC
    ],
)
def test_expires_in_as_seconds_or_timestamp(value: Any, expected: float) -> None:
    assert parse_expires_in(value, 1000.0) == pytest.approx(expected)


@pytest.mark.parametrize("value", [None, "", "soon", -1, True, float("nan"), [1]])
def test_expires_in_unusable(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_expires_in(value, 1000.0)


# -- authorize --------------------------------------------------------------------------------


def test_authorize_sends_client_id_and_scope_and_reads_the_answer() -> None:
    seen: list[httpx.Request] = []
    answer = {
        "device_code": DEVICE_CODE,
        "user_code": "12345678",
        "verification_uri": "https://dir/oauth/device",
        "verification_uri_complete": "https://dir/oauth/device?user_code=12345678",
        "expires_in": 900,
        "interval": 5,
    }
    fake = FakeTime()

    async def run() -> DeviceAuthorization:
        async with create_http_client(
            transport=httpx.MockTransport(_scripted([(200, answer)], seen))
        ) as http:
            return await DeviceFlowClient(ENV, http, clock=fake.clock).authorize()

    auth = asyncio.run(run())
    assert auth.user_code == "12345678"
    assert auth.expires_at == fake.now + 900
    assert auth.interval == 5
    assert DEVICE_CODE not in repr(auth)
    request = seen[0]
    assert str(request.url) == f"{ENV.directory_host}/oauth/device_authorizations/authorize"
    form = parse_qs(request.content.decode())
    assert form == {"client_id": [ENV.client_id], "scope": [ENV.scope]}
    assert request.headers["accept"] == "application/json"


def test_authorize_with_unknown_client() -> None:
    async def run() -> None:
        async with create_http_client(
            transport=httpx.MockTransport(_scripted([(401, {"error": "invalid_client"})], []))
        ) as http:
            await DeviceFlowClient(ENV, http).authorize()

    with pytest.raises(AuthorizationFailed, match="client id") as info:
        asyncio.run(run())
    assert info.value.error == "invalid_client"


# -- polling ----------------------------------------------------------------------------------


def test_pending_then_granted_polls_at_the_interval() -> None:
    events: list[PollEvent] = []
    tokens, fake, seen = _run_poll(
        [_error("authorization_pending"), _error("authorization_pending"), (200, _token_answer())],
        interval=5,
        events=events,
    )
    assert fake.sleeps == [5, 5, 5]
    assert [e.outcome for e in events] == ["pending", "pending"]
    assert events[-1].seconds_left == pytest.approx(900 - 10)
    assert tokens.access_token == ACCESS
    assert tokens.refresh_token == REFRESH
    assert tokens.bearer is not None
    assert tokens.bearer.type == "Organization"
    assert tokens.expires_at == parse_expires_in("2030-01-01T00:00:00Z", 0)
    for request in seen:
        form = parse_qs(request.content.decode())
        assert form["grant_type"] == [DEVICE_CODE_GRANT]
        assert form["device_code"] == [DEVICE_CODE]
        assert form["client_id"] == [ENV.client_id]


def test_slow_down_adds_five_seconds_each_time_for_good() -> None:
    events: list[PollEvent] = []
    _, fake, _ = _run_poll(
        [
            _error("authorization_pending"),
            _error("slow_down"),
            _error("authorization_pending"),
            _error("slow_down"),
            _error("authorization_pending"),
            (200, _token_answer(3600)),
        ],
        interval=5,
        events=events,
    )
    assert fake.sleeps == [5, 5, 10, 10, 15, 15]
    assert [(e.outcome, e.interval) for e in events] == [
        ("pending", 5),
        ("slow_down", 10),
        ("pending", 10),
        ("slow_down", 15),
        ("pending", 15),
    ]


def test_zero_interval_polls_without_waiting() -> None:
    _, fake, _ = _run_poll([_error("authorization_pending"), (200, _token_answer())], interval=0)
    assert fake.sleeps == [0, 0]


def test_expires_in_seconds_in_the_token_answer() -> None:
    tokens, fake, _ = _run_poll([(200, _token_answer(3600))], interval=1)
    assert tokens.expires_at == pytest.approx(fake.now + 3600)


def test_access_denied() -> None:
    with pytest.raises(AuthorizationDenied, match="denied") as info:
        _run_poll([_error("authorization_pending"), _error("access_denied")])
    assert info.value.next_step


def test_expired_token() -> None:
    with pytest.raises(AuthorizationExpired, match="expired"):
        _run_poll([_error("expired_token")])


def test_any_other_error_stops_polling() -> None:
    with pytest.raises(AuthorizationFailed, match="refused the grant"):
        _run_poll([_error("invalid_grant"), (200, _token_answer())])


def test_unknown_error_without_json_stops_polling() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    async def run() -> None:
        async with create_http_client(transport=httpx.MockTransport(handler)) as http:
            await DeviceFlowClient(ENV, http, sleep=FakeTime().sleep).poll(_authorization())

    with pytest.raises(AuthorizationFailed, match="HTTP 502"):
        asyncio.run(run())


def test_server_that_never_expires_is_stopped_locally() -> None:
    answers = [_error("authorization_pending")] * 400
    with pytest.raises(AuthorizationExpired):
        _run_poll(answers, interval=5)


def test_network_failure_is_one_clear_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    async def run() -> None:
        async with create_http_client(transport=httpx.MockTransport(handler)) as http:
            await DeviceFlowClient(ENV, http, sleep=FakeTime().sleep).poll(_authorization())

    with pytest.raises(NetworkError) as info:
        asyncio.run(run())
    assert "directory.sandbox.zaikio.com" in str(info.value)
    assert DEVICE_CODE not in str(info.value)


def test_token_answer_without_tokens_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="access_token"):
        _run_poll([(200, {"token_type": "bearer"})])


# -- refresh ----------------------------------------------------------------------------------


def test_refresh_sends_the_refresh_token_and_reads_the_new_pair() -> None:
    seen: list[httpx.Request] = []
    new = {**_token_answer(60), "access_token": "at-2", "refresh_token": "rt-2"}

    async def run() -> TokenSet:
        async with create_http_client(
            transport=httpx.MockTransport(_scripted([(200, new)], seen))
        ) as http:
            return await DeviceFlowClient(ENV, http).refresh(REFRESH)

    tokens = asyncio.run(run())
    assert (tokens.access_token, tokens.refresh_token) == ("at-2", "rt-2")
    form = parse_qs(seen[0].content.decode())
    assert form == {
        "client_id": [ENV.client_id],
        "grant_type": ["refresh_token"],
        "refresh_token": [REFRESH],
    }


def test_refused_refresh_token_asks_for_login() -> None:
    async def run() -> None:
        async with create_http_client(
            transport=httpx.MockTransport(_scripted([_error("invalid_grant")], []))
        ) as http:
            await DeviceFlowClient(ENV, http).refresh(REFRESH)

    with pytest.raises(LoginRequired, match="no longer valid") as info:
        asyncio.run(run())
    assert "iotref login --env test" in (info.value.next_step or "")
    assert REFRESH not in info.value.one_line()


# -- secrets ----------------------------------------------------------------------------------


def test_token_set_repr_and_errors_hide_secrets() -> None:
    tokens = TokenSet.from_token_answer(_token_answer(), 0.0, "login")
    assert ACCESS not in repr(tokens)
    assert REFRESH not in repr(tokens)
    assert TokenSet.from_json(tokens.to_json()) == tokens


def test_debug_logs_redact_tokens_and_device_code(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _run_poll([_error("authorization_pending"), (200, _token_answer())], interval=0)

    async def refresh() -> None:
        async with create_http_client(
            transport=httpx.MockTransport(_scripted([(200, _token_answer()), (200, {})], []))
        ) as http:
            await DeviceFlowClient(ENV, http).refresh(REFRESH)
            await http.get("https://x.example/api", headers={"Authorization": f"Bearer {ACCESS}"})

    asyncio.run(refresh())
    text = caplog.text
    assert "iotref.http" in text
    assert "[redacted]" in text
    for secret in (DEVICE_CODE, ACCESS, REFRESH):
        assert secret not in text
    assert json.dumps(ENV.client_id)[1:-1] in text  # non-secret fields stay readable
