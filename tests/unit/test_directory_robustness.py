"""Garbage on every directory endpoint: always a 4xx (or a 2xx/3xx page), never a 5xx, and
JSON unless it is the verification page's HTML."""

from __future__ import annotations

import uuid

import pytest

from tests.support.directory_harness import (
    Harness,
    clock_fixture,  # noqa: F401
    harness_fixture,  # noqa: F401
)

MACHINE = str(uuid.uuid4())
PATHS = [
    "/oauth/device_authorizations/authorize",
    "/oauth/access_token",
    "/oauth/access_token.json",
    "/oauth/device",
    "/oauth/device/sign_in",
    "/oauth/device/sign_out",
    "/api/v1/person",
    "/api/v1/person/organization_memberships",
    "/api/v1/organization",
    "/api/v1/sites",
    "/api/v1/machines",
    f"/api/v1/machines/{MACHINE}",
    f"/api/v1/machines/{MACHINE}/machine_ownership",
    "/api/v1/machines/..%2f..%2fetc/machine_ownership",
]
BODIES: list[tuple[str, bytes]] = [
    ("application/json", b"{"),
    ("application/json", b"null"),
    ("application/json", b'{"machine": [1, 2], "client_id": 5, "scope": null}'),
    ("application/json", b"\xff\xfe"),
    ("application/x-www-form-urlencoded", b"%%%&&&==\x00"),
    ("multipart/form-data; boundary=x", b"--x\r\nbroken"),
    ("text/plain", b"hello"),
    ("", b""),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_no_5xx(harness: Harness, path: str, method: str) -> None:
    token = harness.token()["access_token"]
    auths: list[bytes | None] = [
        None,
        b"Bearer x",
        f"Bearer {token}".encode(),
        b"Bearer \xe9\xff\x01",
    ]
    for auth in auths:
        for content_type, body in BODIES:
            headers: dict[str, str | bytes] = {"content-type": content_type} if content_type else {}
            if auth:
                headers["authorization"] = auth
            answer = harness.client.request(
                method,
                path,
                content=body,
                headers=headers,
                params={"user_code": "<b>", "site_id": "\x00", "machine[name]": "x" * 300},
            )
            assert answer.status_code < 500, (method, path, content_type, answer.text)
            kind = answer.headers.get("content-type", "")
            if answer.status_code >= 400:
                assert kind.startswith(("application/json", "text/html")), kind
                if not path.startswith("/oauth/device"):
                    assert kind.startswith("application/json")
