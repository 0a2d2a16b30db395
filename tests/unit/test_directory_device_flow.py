"""The directory's OAuth device flow and token endpoint, in-process with a fake clock."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from iotref.device.stdlib_compat import fromisoformat
from iotref.protocol.environment_file import DEFAULT_SCOPE
from iotref.sandbox.directory.device_authorization import (
    DEVICE_CODE_GRANT,
    AccessGrant,
    hash_secret,
    normalize_user_code,
    parse_scopes,
)
from iotref.sandbox.directory.seed import (
    DEMO_PERSON_ID,
    FIRST_ORGANIZATION_ID,
    OAUTH_CLIENT_ID,
    SECOND_ORGANIZATION_ID,
)
from tests.support.directory_harness import (  # noqa: F401
    Harness,
    clock_fixture,
    harness_fixture,
    make_harness,
)
from tests.support.fake_clock import FakeClock

AUTHORIZE = "/oauth/device_authorizations/authorize"


def _error(response: object) -> str:
    import httpx

    assert isinstance(response, httpx.Response)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, str)
    return error


# -- authorization request ---------------------------------------------------------------------


def test_authorize_answers_rfc8628_fields(harness: Harness) -> None:
    body = harness.authorize()
    assert set(body) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    assert re.fullmatch(r"\d{8}", body["user_code"])
    assert body["verification_uri"] == "http://testserver/oauth/device"
    assert body["verification_uri_complete"] == (
        f"http://testserver/oauth/device?user_code={body['user_code']}"
    )
    assert body["expires_in"] == 600
    assert body["interval"] == 5
    assert len(body["device_code"]) >= 32


@pytest.mark.parametrize("how", ["json", "query"])
def test_authorize_accepts_json_and_query(harness: Harness, how: str) -> None:
    params = {"client_id": OAUTH_CLIENT_ID, "scope": DEFAULT_SCOPE}
    if how == "json":
        answer = harness.client.post(AUTHORIZE, json=params)
    else:
        answer = harness.client.post(AUTHORIZE, params=params)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("params", "status", "error"),
    [
        ({"scope": DEFAULT_SCOPE}, 400, "invalid_request"),
        ({"client_id": OAUTH_CLIENT_ID}, 400, "invalid_request"),
        ({"client_id": OAUTH_CLIENT_ID, "scope": " , "}, 400, "invalid_request"),
        (
            {"client_id": "00000000-0000-0000-0000-000000000000", "scope": DEFAULT_SCOPE},
            401,
            "invalid_client",
        ),
        (
            {"client_id": OAUTH_CLIENT_ID, "scope": "Org.directory.machines.rw,Org.nope.rw"},
            400,
            "invalid_scope",
        ),
        (
            {"client_id": OAUTH_CLIENT_ID, "scope": "Org.directory.machines.rw,directory.person.r"},
            400,
            "invalid_scope",
        ),
    ],
)
def test_authorize_errors(
    harness: Harness, params: dict[str, str], status: int, error: str
) -> None:
    answer = harness.client.post(AUTHORIZE, data=params)
    assert answer.status_code == status
    assert _error(answer) == error


def test_authorize_rejects_malformed_bodies_and_wrong_methods(harness: Harness) -> None:
    answer = harness.client.post(
        AUTHORIZE, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    assert _error(answer) == "invalid_request"
    answer = harness.client.post(
        AUTHORIZE, content=b"[1,2]", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    assert harness.client.get(AUTHORIZE).status_code == 405
    assert harness.client.get("/oauth/access_token").status_code == 405
    assert _error(harness.client.get("/oauth/access_token")) == "method_not_allowed"


def test_user_codes_are_unique_among_pending(harness: Harness) -> None:
    codes = {harness.authorize()["user_code"] for _ in range(30)}
    assert len(codes) == 30


# -- polling -----------------------------------------------------------------------------------


def test_pending_then_slow_down_with_growing_interval(harness: Harness, clock: FakeClock) -> None:
    started = harness.authorize()
    code = started["device_code"]
    assert _error(harness.poll(code)) == "authorization_pending"
    clock.advance(1)
    answer = harness.poll(code)
    assert answer.status_code == 400
    assert _error(answer) == "slow_down"  # interval is now 10 s
    clock.advance(5)
    assert _error(harness.poll(code)) == "slow_down"  # 5 s < 10 s; now 15 s
    clock.advance(15)
    assert _error(harness.poll(code)) == "authorization_pending"
    clock.advance(15)
    assert _error(harness.poll(code)) == "authorization_pending"
    row = harness.ctx.db.query_one(
        "SELECT interval FROM directory_device_authorizations WHERE device_code_hash = ?",
        (hash_secret(code),),
    )
    assert row is not None
    assert row["interval"] == 15


def test_polling_at_the_interval_is_never_slow_down(harness: Harness, clock: FakeClock) -> None:
    code = harness.authorize()["device_code"]
    for _ in range(5):
        assert _error(harness.poll(code)) == "authorization_pending"
        clock.advance(4.9)  # within the tolerance for timer jitter


def test_approved_code_gives_tokens_once(harness: Harness, clock: FakeClock) -> None:
    started = harness.authorize()
    assert _error(harness.poll(started["device_code"])) == "authorization_pending"
    harness.approve(started["user_code"], SECOND_ORGANIZATION_ID)
    clock.advance(5)
    answer = harness.poll(started["device_code"])
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert set(body) == {
        "access_token",
        "refresh_token",
        "token_type",
        "scope",
        "audiences",
        "bearer",
        "expires_in",
    }
    assert body["token_type"] == "bearer"
    assert body["scope"] == DEFAULT_SCOPE
    assert body["audiences"] == ["directory", "prinect"]
    assert body["bearer"] == {"id": SECOND_ORGANIZATION_ID, "type": "Organization"}
    expires = fromisoformat(body["expires_in"])
    assert expires.timestamp() == pytest.approx(clock.now + 3600, abs=0.01)
    assert body["expires_in"].endswith("Z")
    clock.advance(5)
    again = harness.poll(started["device_code"])
    assert again.status_code == 400
    assert _error(again) == "invalid_grant"
    grant = harness.directory.authenticate(f"Bearer {body['access_token']}")
    assert grant is not None
    assert grant.organization_id == SECOND_ORGANIZATION_ID
    assert grant.person_id == DEMO_PERSON_ID
    assert grant.bearer_type == "Organization"
    assert grant.scopes == frozenset(DEFAULT_SCOPE.split(","))


def test_denied_code_gives_access_denied(harness: Harness) -> None:
    started = harness.authorize()
    harness.approve(started["user_code"], None, approve=False)
    assert _error(harness.poll(started["device_code"])) == "access_denied"


def test_expired_code(harness: Harness, clock: FakeClock) -> None:
    started = harness.authorize()
    clock.advance(601)
    assert _error(harness.poll(started["device_code"])) == "expired_token"
    assert harness.directory.oauth.find_pending(started["user_code"]) is None
    assert harness.directory.pending_authorizations() == []


def test_expired_approved_code_is_expired(harness: Harness, clock: FakeClock) -> None:
    started = harness.authorize()
    harness.approve(started["user_code"])
    clock.advance(601)
    assert _error(harness.poll(started["device_code"])) == "expired_token"


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (
            {"grant_type": DEVICE_CODE_GRANT, "client_id": OAUTH_CLIENT_ID, "device_code": "nope"},
            400,
            "invalid_grant",
        ),
        ({"grant_type": DEVICE_CODE_GRANT, "client_id": OAUTH_CLIENT_ID}, 400, "invalid_request"),
        ({"grant_type": DEVICE_CODE_GRANT, "device_code": "x"}, 401, "invalid_client"),
        ({"grant_type": "password", "client_id": OAUTH_CLIENT_ID}, 400, "unsupported_grant_type"),
        ({"client_id": OAUTH_CLIENT_ID}, 400, "invalid_request"),
        ({"grant_type": "refresh_token"}, 400, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "nope"}, 400, "invalid_grant"),
    ],
)
def test_token_endpoint_errors(
    harness: Harness, data: dict[str, str], status: int, error: str
) -> None:
    answer = harness.client.post("/oauth/access_token", data=data)
    assert answer.status_code == status
    assert _error(answer) == error


def test_wrong_client_for_a_device_code(harness: Harness) -> None:
    harness.ctx.db.execute(
        "INSERT INTO directory_oauth_apps (client_id, name, scopes, created_at) "
        "VALUES ('other-app', 'Other', 'Org.directory.machines.rw', 0)"
    )
    started = harness.authorize()
    answer = harness.poll(started["device_code"], client_id="other-app")
    assert answer.status_code == 401
    assert _error(answer) == "invalid_client"
    unknown = harness.poll(started["device_code"], client_id="unknown-app")
    assert _error(unknown) == "invalid_client"
    assert _error(harness.poll(started["device_code"])) == "authorization_pending"


def test_auto_approve(tmp_path: Path) -> None:
    h = make_harness(tmp_path, auto_approve=True)
    try:
        started = h.authorize()
        assert h.directory.pending_authorizations() == []
        answer = h.poll(started["device_code"])
        assert answer.status_code == 200
        assert answer.json()["bearer"] == {"id": FIRST_ORGANIZATION_ID, "type": "Organization"}
        person = h.authorize("directory.person.r")
        body = h.poll(person["device_code"]).json()
        assert body["bearer"] == {"id": DEMO_PERSON_ID, "type": "Person"}
    finally:
        h.close()


def test_person_scopes_give_a_person_bearer(harness: Harness) -> None:
    body = harness.token("directory.person.r directory.machines.r", organization_id=None)
    assert body["bearer"] == {"id": DEMO_PERSON_ID, "type": "Person"}
    assert body["scope"] == "directory.person.r,directory.machines.r"
    assert body["audiences"] == ["directory"]


# -- refresh -----------------------------------------------------------------------------------


def test_refresh_rotates_and_rejects_reuse(harness: Harness, clock: FakeClock) -> None:
    first = harness.token()
    clock.advance(60)
    answer = harness.refresh(first["refresh_token"], client_id=OAUTH_CLIENT_ID)
    assert answer.status_code == 200, answer.text
    second = answer.json()
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["bearer"] == first["bearer"]
    assert second["scope"] == first["scope"]
    assert fromisoformat(second["expires_in"]).timestamp() == pytest.approx(
        clock.now + 3600, abs=0.01
    )
    assert harness.directory.authenticate(f"Bearer {second['access_token']}") is not None
    assert harness.directory.authenticate(f"Bearer {first['access_token']}") is None
    reused = harness.refresh(first["refresh_token"])
    assert reused.status_code == 400
    assert _error(reused) == "invalid_grant"
    third = harness.refresh(second["refresh_token"])  # client_id is optional
    assert third.status_code == 200
    assert _error(harness.refresh(second["refresh_token"])) == "invalid_grant"


def test_refresh_with_wrong_client_or_after_expiry(harness: Harness, clock: FakeClock) -> None:
    body = harness.token()
    wrong = harness.refresh(body["refresh_token"], client_id="unknown-app")
    assert wrong.status_code == 401
    assert _error(wrong) == "invalid_client"
    clock.advance(7 * 24 * 3600 + 1)
    assert _error(harness.refresh(body["refresh_token"])) == "invalid_grant"


def test_access_token_expires(harness: Harness, clock: FakeClock) -> None:
    body = harness.token()
    header = f"Bearer {body['access_token']}"
    clock.advance(3599)
    assert harness.directory.authenticate(header) is not None
    clock.advance(2)
    assert harness.directory.authenticate(header) is None
    assert harness.refresh(body["refresh_token"]).status_code == 200


# -- authenticate and scopes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer a b", "Bearer unknown-token", "bearer"],
)
def test_authenticate_refuses(harness: Harness, header: str | None) -> None:
    assert harness.directory.authenticate(header) is None


def test_authenticate_scheme_is_case_insensitive(harness: Harness) -> None:
    token = harness.token()["access_token"]
    assert harness.directory.authenticate(f"bearer {token}") is not None
    assert harness.directory.authenticate(f"BEARER  {token} ") is not None


def test_has_scope_rules() -> None:
    org = AccessGrant(
        "t",
        "o",
        "p",
        frozenset({"Org.directory.machines.rw", "Org.directory.organization.r"}),
        "Organization",
    )
    assert org.has_scope("directory.machines.rw")
    assert org.has_scope("Org.directory.machines.rw")
    assert org.has_scope("directory.machines.r")  # rw implies r
    assert org.has_scope("directory.organization.r")
    assert not org.has_scope("directory.organization.rw")
    assert not org.has_scope("directory.person.r")
    person = AccessGrant("t", None, "p", frozenset({"directory.machines.r"}), "Person")
    assert person.has_scope("directory.machines.r")
    assert not person.has_scope("directory.machines.rw")
    assert not person.has_scope("Org.directory.machines.r")
    plain_in_org = AccessGrant("t", "o", "p", frozenset({"directory.machines.rw"}), "Organization")
    assert not plain_in_org.has_scope("directory.machines.rw")


def test_scope_and_code_parsing() -> None:
    assert parse_scopes("a,b c,,a") == ["a", "b", "c"]
    assert parse_scopes("") == []
    assert normalize_user_code("1234-5678") == "12345678"
    assert normalize_user_code(" 1234 5678 ") == "12345678"
    assert normalize_user_code("1234567") is None
    assert normalize_user_code("\uff11" * 8) is None  # full-width digits
    assert normalize_user_code("abcdefgh") is None


# -- what the monitor lists ----------------------------------------------------------------------


def test_pending_authorizations(harness: Harness, clock: FakeClock) -> None:
    first = harness.authorize()
    clock.advance(10)
    second = harness.authorize()
    decided = harness.authorize()
    harness.approve(decided["user_code"])
    listed = harness.directory.pending_authorizations()
    assert [p["user_code"] for p in listed] == [first["user_code"], second["user_code"]]
    assert set(listed[0]) == {"user_code", "created_at", "expires_at", "verification_uri_complete"}
    assert listed[0]["verification_uri_complete"].endswith(
        f"/oauth/device?user_code={first['user_code']}"
    )
    assert fromisoformat(listed[0]["expires_at"]).timestamp() == pytest.approx(
        fromisoformat(listed[0]["created_at"]).timestamp() + 600
    )


# -- secrets at rest and in logs -----------------------------------------------------------------


def test_no_secret_in_database_or_log(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    started = harness.authorize()
    harness.approve(started["user_code"])
    body = harness.poll(started["device_code"]).json()
    refreshed = harness.refresh(body["refresh_token"]).json()
    secrets = [
        started["device_code"],
        body["access_token"],
        body["refresh_token"],
        refreshed["access_token"],
        refreshed["refresh_token"],
    ]
    db = harness.ctx.db
    dumped: list[str] = []
    for table in db.query_all("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in db.query_all(f"SELECT * FROM {table['name']}"):
            dumped.extend(str(value) for value in tuple(row))
    text = "\n".join(dumped)
    for secret in secrets:
        assert secret not in text
        assert hash_secret(secret) in text
    raw = b"".join(p.read_bytes() for p in harness.ctx.paths.data_dir.glob("sandbox.db*"))
    for secret in secrets:
        assert secret.encode() not in raw
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "device authorization" in logged
    for secret in secrets:
        assert secret not in logged
