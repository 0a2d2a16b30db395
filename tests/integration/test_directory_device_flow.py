"""The directory's device flow on the real sandbox process, driven over HTTP with httpx:
every polling outcome, the verification page, refresh rotation and persistence."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotref.protocol.environment_file import DEFAULT_SCOPE, parse_env_file
from iotref.sandbox.directory.device_authorization import DEVICE_CODE_GRANT
from iotref.sandbox.directory.seed import (
    DEMO_EMAIL,
    DEMO_PASSWORD,
    FIRST_ORGANIZATION_ID,
    FIRST_SITE_ID,
    OAUTH_CLIENT_ID,
    SECOND_ORGANIZATION_ID,
)
from tests.conftest import SandboxFactory
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration


def _authorize(http: httpx.Client, scope: str = DEFAULT_SCOPE) -> dict[str, Any]:
    answer = http.post(
        "/oauth/device_authorizations/authorize",
        data={"client_id": OAUTH_CLIENT_ID, "scope": scope},
        headers={"Accept": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _poll(http: httpx.Client, device_code: str) -> httpx.Response:
    return http.post(
        "/oauth/access_token",
        data={
            "client_id": OAUTH_CLIENT_ID,
            "grant_type": DEVICE_CODE_GRANT,
            "device_code": device_code,
        },
    )


def _error(answer: httpx.Response) -> str:
    assert answer.status_code in (400, 401), answer.text
    error: str = answer.json()["error"]
    return error


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert found, html
    return found.group(1)


def _decide(
    sb: SandboxProcess,
    verification_uri_complete: str,
    decision: str,
    organization_id: str = FIRST_ORGANIZATION_ID,
) -> httpx.Response:
    """What a person does in the browser: open the link, sign in, approve or deny."""
    with httpx.Client(timeout=10) as browser:
        page = browser.get(verification_uri_complete)
        assert page.status_code == 200
        user_code = verification_uri_complete.rsplit("=", 1)[1]
        signed_in = browser.post(
            f"{sb.http_url}/oauth/device/sign_in",
            data={
                "csrf_token": _csrf(page.text),
                "email": DEMO_EMAIL,
                "password": DEMO_PASSWORD,
                "user_code": user_code,
            },
        )
        assert signed_in.status_code == 303
        page = browser.get(f"{sb.http_url}{signed_in.headers['location']}")
        assert page.status_code == 200
        assert user_code in page.text
        return browser.post(
            f"{sb.http_url}/oauth/device",
            data={
                "csrf_token": _csrf(page.text),
                "user_code": user_code,
                "organization_id": organization_id,
                "decision": decision,
            },
        )


def test_env_file_names_the_seeded_client(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory()
    env = parse_env_file(Path(sb.info["env_file"]).read_text())
    assert env["DIRECTORY_OAUTH_CLIENT_ID"] == OAUTH_CLIENT_ID
    assert env["DIRECTORY_HOST"] == sb.http_url


def test_every_polling_outcome(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory("--poll-interval", "1", "--device-code-ttl", "4")
    with sb.http() as http:
        started = _authorize(http)
        assert started["interval"] == 1
        assert started["expires_in"] == 4
        assert started["verification_uri"] == f"{sb.http_url}/oauth/device"
        code = started["device_code"]
        assert _error(_poll(http, code)) == "authorization_pending"
        assert _error(_poll(http, code)) == "slow_down"  # interval now 6 s
        time.sleep(1.2)
        assert _error(_poll(http, code)) == "slow_down"  # 1.2 s < 6 s; now 11 s
        time.sleep(3.5)
        assert _error(_poll(http, code)) == "expired_token"

        denied = _authorize(http)
        answer = _decide(sb, denied["verification_uri_complete"], "deny")
        assert answer.status_code == 200
        assert "Denied" in answer.text
        assert _error(_poll(http, denied["device_code"])) == "access_denied"

        approved = _authorize(http)
        assert _error(_poll(http, approved["device_code"])) == "authorization_pending"
        assert (
            _decide(
                sb, approved["verification_uri_complete"], "approve", SECOND_ORGANIZATION_ID
            ).status_code
            == 200
        )
        time.sleep(1)
        token = _poll(http, approved["device_code"])
        assert token.status_code == 200, token.text
        assert token.json()["bearer"] == {"id": SECOND_ORGANIZATION_ID, "type": "Organization"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", token.json()["expires_in"])
        time.sleep(1)
        assert _error(_poll(http, approved["device_code"])) == "invalid_grant"

        assert _error(_poll(http, "no-such-code")) == "invalid_grant"
        unknown = http.post(
            "/oauth/device_authorizations/authorize",
            data={"client_id": "nobody", "scope": DEFAULT_SCOPE},
        )
        assert unknown.status_code == 401
        assert unknown.json() == {
            "error": "invalid_client",
            "error_description": "unknown client_id",
        }
        wrong_page = http.get("/oauth/device", params={"user_code": "00000000"})
        assert wrong_page.status_code == 200  # not signed in: the sign-in form comes first


def test_refresh_rotation(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory("--auto-approve", "--poll-interval", "1")
    with sb.http() as http:
        first = _poll(http, _authorize(http)["device_code"]).json()
        answer = http.post(
            "/oauth/access_token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
                "client_id": OAUTH_CLIENT_ID,
            },
        )
        assert answer.status_code == 200, answer.text
        second = answer.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert (
            http.get(
                "/api/v1/sites", headers={"Authorization": f"Bearer {second['access_token']}"}
            ).status_code
            == 200
        )
        reused = http.post(
            "/oauth/access_token",
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
        )
        assert reused.status_code == 400
        assert reused.json()["error"] == "invalid_grant"


def test_tokens_and_machines_survive_a_restart(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "persistent"
    sb = sandbox_factory("--auto-approve", "--poll-interval", "1", data_dir=data_dir)
    with sb.http() as http:
        token = _poll(http, _authorize(http)["device_code"]).json()
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        machine = http.post(
            "/api/v1/machines",
            headers=auth,
            params={
                "machine[name]": "Speedmaster",
                "machine[manufacturer]": "HD",
                "machine[serial_number]": "PERSIST-1",
                "machine[kind]": "offset_press",
                "machine[site_id]": FIRST_SITE_ID,
            },
        )
        assert machine.status_code == 201, machine.text
    assert sb.stop() == 0

    again = sandbox_factory("--poll-interval", "1", data_dir=data_dir)
    with again.http() as http:
        got = http.get(f"/api/v1/machines/{machine.json()['id']}", headers=auth)
        assert got.status_code == 200
        assert got.json() == machine.json()
        refreshed = http.post(
            "/oauth/access_token",
            data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
        )
        assert refreshed.status_code == 200
        # the seed was not written twice
        assert [
            s["id"]
            for s in http.get(
                "/api/v1/sites",
                headers={"Authorization": f"Bearer {refreshed.json()['access_token']}"},
            ).json()
        ][:1] == [FIRST_SITE_ID]
    raw = b"".join(p.read_bytes() for p in data_dir.glob("sandbox.db*"))
    for secret in (token["access_token"], token["refresh_token"]):
        assert secret.encode() not in raw
    log_text = "".join(p.read_text(errors="replace") for p in data_dir.rglob("*.log"))
    assert token["access_token"] not in log_text
    assert token["refresh_token"] not in log_text
