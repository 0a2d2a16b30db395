"""Bearer tokens and provisioned devices for tests, with raw HTTP against a sandbox that
runs with ``--auto-approve``: the device flow (RFC 8628) and ``/v4/provisioning``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from iotref.protocol.environment_file import DEFAULT_SCOPE
from iotref.sandbox.directory.seed import FIRST_SITE_ID, OAUTH_CLIENT_ID
from tests.support.device_keys import DeviceFiles, make_csr, make_key, write_device
from tests.support.sandbox_process import SandboxProcess

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def get_token(sandbox: SandboxProcess, scope: str = DEFAULT_SCOPE, timeout: float = 30) -> str:
    """An access token from the device flow (the sandbox must auto-approve)."""
    with sandbox.http() as http:
        start = http.post(
            "/oauth/device_authorizations/authorize",
            data={"client_id": OAUTH_CLIENT_ID, "scope": scope},
            headers={"Accept": "application/json"},
        )
        assert start.status_code == 200, start.text
        grant = start.json()
        interval = float(grant.get("interval", 1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = http.post(
                "/oauth/access_token",
                data={
                    "client_id": OAUTH_CLIENT_ID,
                    "grant_type": DEVICE_CODE_GRANT,
                    "device_code": grant["device_code"],
                },
                headers={"Accept": "application/json"},
            )
            if answer.status_code == 200:
                return str(answer.json()["access_token"])
            error = answer.json().get("error")
            if error == "slow_down":
                interval += 5
            elif error != "authorization_pending":
                raise AssertionError(f"device flow failed: {answer.status_code} {answer.text}")
            time.sleep(interval)
    raise AssertionError("device flow timed out")


_token_cache: dict[tuple[str, str], str] = {}


def cached_token(sandbox: SandboxProcess, scope: str = DEFAULT_SCOPE) -> str:
    """One token per sandbox and scope (the device flow costs a polling interval)."""
    key = (sandbox.http_url, scope)
    if key not in _token_cache:
        _token_cache[key] = get_token(sandbox, scope)
    return _token_cache[key]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def provision_request(sandbox: SandboxProcess, token: str | None, body: Any) -> httpx.Response:
    headers = bearer(token) if token else {}
    with sandbox.http() as http:
        return http.post("/v4/provisioning", json=body, headers=headers)


def provision_device(
    sandbox: SandboxProcess,
    key_type: str = "ec-p256",
    *,
    directory: Path | None = None,
    site_id: str = FIRST_SITE_ID,
    token: str | None = None,
) -> DeviceFiles:
    """Make a key and CSR, call ``/v4/provisioning`` and write the cert and key to files."""
    key = make_key(key_type)
    answer = provision_request(
        sandbox,
        token or cached_token(sandbox),
        {"certificateSigningRequest": make_csr(key), "siteId": site_id},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return write_device(
        directory or sandbox.data_dir / "test-devices",
        body["clientId"],
        key,
        body["deviceCert"],
        org_id=body["orgId"],
    )
