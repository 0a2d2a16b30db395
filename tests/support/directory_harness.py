"""In-process harness for the directory (its routes on a Starlette TestClient, a fake clock)
and the OpenAPI conformance check; tests/unit/test_directory_harness.py tests the harness.

Other ``test_directory_*`` modules import :class:`Harness`, :func:`make_harness`,
:func:`assert_conforms` and the ``clock``/``harness`` fixtures (as ``clock_fixture`` and
``harness_fixture``) from here.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_schema_validator import OAS30Validator, oas30_format_checker

from iotref.protocol.environment_file import DEFAULT_SCOPE
from iotref.sandbox.app import build_app
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.directory.device_authorization import DEVICE_CODE_GRANT
from iotref.sandbox.directory.seed import (
    DEMO_EMAIL,
    DEMO_PASSWORD,
    DEMO_PERSON_ID,
    FIRST_ORGANIZATION_ID,
    OAUTH_CLIENT_ID,
)
from iotref.sandbox.directory.service import Directory
from tests.support.fake_clock import FakeClock

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

# Zaikio's published OpenAPI description of the directory (copied from shared/platform).
OPENAPI = Path(__file__).resolve().parents[1] / "data" / "zaikio-directory-v1.openapi.yaml"
if not OPENAPI.exists():  # the shared folder beside the repository, wherever it is
    OPENAPI = Path(__file__).resolve().parents[3] / "shared/platform" / OPENAPI.name


@cache
def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    return spec


def assert_conforms(schema: str, body: Any, *, array: bool = False) -> None:
    """Fail unless ``body`` fits ``#/components/schemas/<schema>`` (or an array of it)."""
    ref = {"$ref": f"#/components/schemas/{schema}"}
    root = {
        "components": _spec()["components"],
        **({"type": "array", "items": ref} if array else ref),
    }
    validator = OAS30Validator(root, format_checker=oas30_format_checker)
    errors = [e.message for e in validator.iter_errors(body)]
    assert not errors, f"{schema}: {errors} in {body}"


class Harness:
    """One directory over a data dir, served in-process."""

    def __init__(self, data_dir: Path, clock: FakeClock, **settings: Any) -> None:
        self.clock = clock
        self.ctx = SandboxContext.open(SandboxSettings(data_dir=data_dir, **settings))
        self.directory = Directory(self.ctx, clock=clock)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client = TestClient(build_app([self.directory]), follow_redirects=False)

    def close(self) -> None:
        self.client.close()
        self.ctx.db.close()

    def authorize(self, scope: str = DEFAULT_SCOPE, **extra: str) -> dict[str, Any]:
        answer = self.client.post(
            "/oauth/device_authorizations/authorize",
            data={"client_id": OAUTH_CLIENT_ID, "scope": scope, **extra},
            headers={"Accept": "application/json"},
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def poll(self, device_code: str, client_id: str = OAUTH_CLIENT_ID) -> httpx.Response:
        answer: httpx.Response = self.client.post(
            "/oauth/access_token",
            data={
                "client_id": client_id,
                "grant_type": DEVICE_CODE_GRANT,
                "device_code": device_code,
            },
        )
        return answer

    def approve(
        self,
        user_code: str,
        organization_id: str | None = FIRST_ORGANIZATION_ID,
        approve: bool = True,
    ) -> None:
        pending = self.directory.oauth.find_pending(user_code)
        assert pending is not None
        assert self.directory.oauth.decide(pending.id, approve, DEMO_PERSON_ID, organization_id)

    def token(
        self, scope: str = DEFAULT_SCOPE, organization_id: str | None = FIRST_ORGANIZATION_ID
    ) -> dict[str, Any]:
        """A fresh access token for ``scope``, approved for ``organization_id``."""
        started = self.authorize(scope)
        self.approve(started["user_code"], organization_id)
        answer = self.poll(started["device_code"])
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def refresh(self, refresh_token: str, **extra: str) -> httpx.Response:
        answer: httpx.Response = self.client.post(
            "/oauth/access_token",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token, **extra},
        )
        return answer

    # -- the verification page, as a browser would drive it --------------------------------

    def csrf(self, html: str) -> str:
        found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
        assert found, html
        return found.group(1)

    def sign_in(
        self, user_code: str = "", email: str = DEMO_EMAIL, password: str = DEMO_PASSWORD
    ) -> httpx.Response:
        page = self.client.get("/oauth/device", params={"user_code": user_code})
        answer: httpx.Response = self.client.post(
            "/oauth/device/sign_in",
            data={
                "csrf_token": self.csrf(page.text),
                "email": email,
                "password": password,
                "user_code": user_code,
            },
        )
        return answer

    def decide(
        self, csrf_token: str, user_code: str, decision: str, organization_id: str | None = None
    ) -> httpx.Response:
        """Post the verification page's decision form (``organization_id`` if given)."""
        form = {"csrf_token": csrf_token, "user_code": user_code, "decision": decision}
        if organization_id is not None:
            form["organization_id"] = organization_id
        answer: httpx.Response = self.client.post("/oauth/device", data=form)
        return answer


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    return FakeClock()


def make_harness(tmp_path: Path, clock: FakeClock | None = None, **settings: Any) -> Harness:
    return Harness(tmp_path / "data", clock or FakeClock(), **settings)


@pytest.fixture(name="harness")
def harness_fixture(tmp_path: Path, clock: FakeClock) -> Iterator[Harness]:
    h = make_harness(
        tmp_path,
        clock,
        poll_interval=5,
        device_code_ttl=600,
        access_token_ttl=3600,
        refresh_token_ttl=7 * 24 * 3600,
    )
    yield h
    h.close()


# -- tests -------------------------------------------------------------------------------------
