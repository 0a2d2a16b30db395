"""Schemathesis against the real sandbox's HTTP APIs, from the OpenAPI description it serves.

Every operation of the description gets positive and negative inputs (Schemathesis's
examples, coverage and fuzzing phases); each request is sent once with valid credentials,
where the operation has security, once more with the monitor's session cookie and CSRF
token where it takes them, and once as generated (missing, random or wrong credentials).
The checks are all of Schemathesis's (``--checks all``): no 5xx, the status code, content
type, body and headers as documented, schema-valid input accepted and schema-violating
input refused, undocumented methods answered 405 with a matching ``Allow``, and
authentication enforced. A schema-valid request may still be refused for what only the
sandbox can judge and JSON Schema cannot state (see :func:`server_judged`: a CSR that is
not a CSR, a code or token it never issued, byte lengths of UTF-8); those refusals, and
only those, pass the positive-data check. A second test walks the success answers that
random inputs cannot reach (a real CSR, a real device code, a real machine) through the
same checks.

The figures (requests sent, answers by status class, failures by check) are written to
``$IOTREF_FUZZ_REPORT`` and recorded for ``make reliability`` (:mod:`tests.support.fuzz_report`).

Bounded for ``make test``: ``IOTREF_FUZZ_EXAMPLES`` examples per operation in the fuzzing
phase (default 50), deterministic generation, seed ``IOTREF_FUZZ_SEED``. A longer run:
``IOTREF_FUZZ_EXAMPLES=1000 .venv/bin/pytest tests/integration/test_api_fuzz.py``.

The schema is built in-process, as the sandbox builds it (the fuzzed operations must be known
when pytest collects, and Schemathesis's lazy ``from_fixture`` loader does not work with
pytest 9), and :func:`test_served_description_is_the_fuzzed_one` checks that the running
sandbox serves exactly it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis import Case
from schemathesis.checks import CHECKS as CHECK_REGISTRY
from schemathesis.checks import load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi.checks import RejectedPositiveData

from iotref.sandbox.app import build_app
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.directory.seed import FIRST_ORGANIZATION_ID, FIRST_SITE_ID, OAUTH_CLIENT_ID
from iotref.sandbox.monitor.access import COOKIE_NAME
from iotref.sandbox.monitor.openapi import MONITOR_SESSION
from iotref.sandbox.openapi import describe_app, described_operations
from iotref.sandbox.openapi_fragment import ADMIN_BEARER, DIRECTORY_BEARER
from iotref.sandbox.runner import Sandbox
from iotref.sandbox.shadow.openapi import AWS_SIGV4
from tests.support.device_keys import make_csr, make_key
from tests.support.fuzz_report import FuzzTally
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import DEVICE_CODE_GRANT, get_token

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("IOTREF_FUZZ_EXAMPLES", "50"))
SEED = int(os.environ.get("IOTREF_FUZZ_SEED", "8"))


def _judged(response: Any) -> tuple[int, str | None]:
    """The status and the error's code (the sandbox's ``error`` or AWS's ``message``)."""
    try:
        body = response.json()
    except ValueError:
        return response.status_code, None
    if not isinstance(body, dict):
        return response.status_code, None
    error = body.get("error", body.get("message"))
    return response.status_code, error if isinstance(error, str) else None


OAUTH_STATE = {
    "invalid_grant",
    "expired_token",
    "authorization_pending",
    "slow_down",
    "access_denied",
    "invalid_client",
    "invalid_scope",
}
"""Token endpoint errors about the server's state: codes and tokens it issued, its
registered clients and scopes (RFC 6749 §5.2, RFC 8628 §3.5)."""


DIRECTORY_STATE = {"has already been taken", "is not a site of this organization"}
"""The directory's validation errors about what it holds (Zaikio's ``{"errors": ...}``)."""


def _validation_errors(response: Any) -> set[str]:
    try:
        body = response.json()
    except ValueError:
        return set()
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, dict):
        return set()
    return {str(m) for messages in errors.values() if isinstance(messages, list) for m in messages}


def server_judged(case: Case, response: Any) -> str | None:
    """Why a schema-valid request may rightly be refused: a rule about content that JSON
    Schema cannot state; ``None`` when the refusal is not one of those."""
    status, error = _judged(response)
    operation = case.operation.definition.raw.get("operationId", "")
    body = case.body if isinstance(case.body, dict) else {}
    oauth = operation in ("accessToken", "accessTokenJson", "authorizeDevice")
    if oauth and status in (400, 401) and error in OAUTH_STATE:
        return "the token endpoint's state"
    errors = _validation_errors(response)
    if status == 422 and errors and errors <= DIRECTORY_STATE:
        return "the directory's machines and sites"
    if operation in ("provision", "bulkProvisionThings") and (status, error) in {
        (400, "invalid_csr"),
        (422, "unknown_site"),
    }:
        return "a CSR's content or the directory's sites"
    token = body.get("clientToken")
    long_token = isinstance(token, str) and len(token.encode()) > 64
    if (status, error) == (400, "Invalid clientToken") and long_token:
        return "a client token over 64 bytes of UTF-8"
    monitor = operation in ("monitorUpdateDesired", "monitorValidateDesired")
    if status == 413 and (monitor or error == "The payload exceeds the maximum size allowed"):
        return "a shadow state over 8 KB (compact JSON, after the merge)"
    if operation == "Publish" and (status, error) == (400, "Invalid topic name"):
        topic = str((case.path_parameters or {}).get("topic", ""))
        if len(topic.encode("utf-8", "surrogatepass")) > 256:
            return "a topic over 256 bytes of UTF-8"
        if any(ord(c) > 0xFFFF and ord(c) & 0xFFFE == 0xFFFE for c in topic):
            return "a non-character beyond the first plane in the topic"
    return None


def positive_data_acceptance(ctx: Any, response: Any, case: Case) -> bool | None:
    """Schemathesis's check of the same name, except for :func:`server_judged` refusals."""
    try:
        return _POSITIVE(ctx, response, case)
    except RejectedPositiveData:
        if server_judged(case, response) is not None:
            return None
        raise


load_all_checks()
_POSITIVE = CHECK_REGISTRY.get_one("positive_data_acceptance")
CHECKS = [
    positive_data_acceptance if check is _POSITIVE else check for check in CHECK_REGISTRY.get_all()
]
"""Every check Schemathesis has (``--checks all``)."""
CREDENTIALED_CHECKS = [check for check in CHECKS if check.__name__ != "ignored_auth"]
"""For requests that carry the test's own valid credentials: whether a schema's auth is
enforced is checked on the requests as generated."""
TALLY = FuzzTally([check.__name__ for check in CHECKS])
ORGANIZATION_SCOPE = "Org.prinect.onprem.rw,Org.directory.machines.rw,Org.directory.organization.r"
PERSON_SCOPE = "directory.person.r,directory.machines.rw"


def _sandbox_description() -> dict[str, Any]:
    """The description the whole sandbox serves (components made, not started)."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = SandboxSettings(data_dir=Path(tmp), http_port=0)
        ctx = SandboxContext.open(settings)
        try:
            components = Sandbox(settings)._make_components(ctx)
            return describe_app(build_app(components).routes, components)
        finally:
            ctx.db.close()


DESCRIPTION = _sandbox_description()
schema = schemathesis.openapi.from_dict(
    DESCRIPTION,
    config=SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            "request-timeout": 20,
        }
    ),
).exclude(path_regex=r"/stream$")  # Server-sent event streams never end: not fuzzed.


@dataclass(frozen=True)
class Credentials:
    organization: str
    person: str
    admin: str
    monitor_cookie: str
    monitor_csrf: str


@pytest.fixture(scope="module")
def fuzz_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    """A sandbox of its own: fuzzing fills its database with junk machines and shadows."""
    args = ["--auto-approve", "--poll-interval", "1"]
    with SandboxProcess(tmp_path_factory.mktemp("fuzz-sandbox"), args).start() as proc:
        yield proc


@pytest.fixture(scope="module")
def credentials(fuzz_sandbox: SandboxProcess) -> Credentials:
    cookie, csrf = _monitor_login(fuzz_sandbox)
    return Credentials(
        organization=get_token(fuzz_sandbox, ORGANIZATION_SCOPE),
        person=get_token(fuzz_sandbox, PERSON_SCOPE),
        admin=fuzz_sandbox.admin_token,
        monitor_cookie=cookie,
        monitor_csrf=csrf,
    )


def _monitor_login(sandbox: SandboxProcess) -> tuple[str, str]:
    """The monitor's session cookie (from the token link) and the page's CSRF token."""
    with sandbox.http() as http:
        answer = http.get("/monitor", params={"token": sandbox.admin_token})
        assert answer.status_code == 303, answer.text
        cookie = answer.cookies[COOKIE_NAME]
        page = http.get("/monitor")  # the client keeps the cookie
        assert page.status_code == 200, page.text
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert found is not None
    return cookie, found.group(1)


@pytest.fixture(scope="module")
def http_session() -> Iterator[requests.Session]:
    with _tallied(requests.Session()) as session:
        yield session


def _valid_authorization(case: Case, credentials: Credentials) -> str | None:
    """The ``Authorization`` value that satisfies the operation's security, if it has any."""
    schemes = _schemes(case)
    if DIRECTORY_BEARER in schemes:
        person = case.operation.path.startswith("/api/v1/person")
        return f"Bearer {credentials.person if person else credentials.organization}"
    if ADMIN_BEARER in schemes or AWS_SIGV4 in schemes:
        return f"Bearer {credentials.admin}"
    return None


@pytest.fixture(scope="module", autouse=True)
def fuzz_figures() -> Iterator[None]:
    """Write the module's figures once its tests ran (see :mod:`tests.support.fuzz_report`)."""
    yield
    TALLY.write(
        operations=len(described_operations(DESCRIPTION)),
        examples_per_operation=EXAMPLES,
        seed=SEED,
    )


def _tallied(session: requests.Session) -> requests.Session:
    session.hooks["response"].append(TALLY.hook)
    return session


@schema.parametrize()
def test_api(
    case: Case,
    fuzz_sandbox: SandboxProcess,
    credentials: Credentials,
    http_session: requests.Session,
) -> None:
    try:
        _call_all_ways(case, fuzz_sandbox.http_url, credentials, http_session)
    except FailureGroup as group:
        TALLY.failed(group, case.operation.label)
        raise


def _credentialed_checks(case: Case, *locations: ParameterLocation) -> list[Any]:
    """The checks for a call with the test's own credentials: when the case's invalid part
    is where those credentials go, they replaced it, and the request is no longer invalid."""
    meta = case.meta
    if meta is not None and any(meta.is_negative_at(location) for location in locations):
        return [c for c in CREDENTIALED_CHECKS if c.__name__ != "negative_data_rejection"]
    return CREDENTIALED_CHECKS


def _call_all_ways(
    case: Case, base_url: str, credentials: Credentials, http_session: requests.Session
) -> None:
    authorization = _valid_authorization(case, credentials)
    if authorization is not None:
        # (Schemathesis leaves the header out of cases that test missing credentials.)
        case.call_and_validate(
            base_url=base_url,
            session=http_session,
            headers={"Authorization": authorization},
            checks=_credentialed_checks(case, ParameterLocation.HEADER),
        )
    if MONITOR_SESSION in _schemes(case):
        # The monitor's cookie (with the CSRF token, which GETs ignore), in a session of its
        # own so that the cookie does not stick to the other calls; without the generated
        # Authorization, so that the cookie alone is what lets the request in.
        cookie_case = case.derive(
            headers={k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        )
        with _tallied(requests.Session()) as cookie_session:
            cookie_case.call_and_validate(
                base_url=base_url,
                session=cookie_session,
                headers={
                    "X-CSRF-Token": credentials.monitor_csrf,
                    "Cookie": f"{COOKIE_NAME}={credentials.monitor_cookie}",
                },
                checks=_credentialed_checks(
                    case, ParameterLocation.HEADER, ParameterLocation.COOKIE
                ),
            )
    case.call_and_validate(base_url=base_url, session=http_session, checks=CHECKS)


def _schemes(case: Case) -> set[str]:
    requirements = case.operation.definition.raw.get("security", [])
    return {name for requirement in requirements for name in requirement}


# -- success answers random inputs do not reach --------------------------------------------


class Caller:
    """Build a case of one operation, send it, run the checks, return the JSON body."""

    def __init__(self, sandbox: SandboxProcess, session: requests.Session) -> None:
        self.sandbox = sandbox
        self.base_url = sandbox.http_url
        self.session = session

    def __call__(
        self,
        method: str,
        path: str,
        status: int,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        **parts: Any,
    ) -> Any:
        headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        case = schema[path][method].Case(headers=headers or None, **parts)
        response = case.call_and_validate(
            base_url=self.base_url, session=self.session, checks=CREDENTIALED_CHECKS
        )
        assert response.status_code == status, (method, path, response.text)
        content_type = response.headers.get("content-type", [""])[0]
        if content_type.startswith("application/json"):
            return response.json()
        return None


def test_success_answers_conform(
    fuzz_sandbox: SandboxProcess, credentials: Credentials, http_session: requests.Session
) -> None:
    call = Caller(fuzz_sandbox, http_session)
    org, admin = credentials.organization, credentials.admin
    form = "application/x-www-form-urlencoded"

    # The device flow, then a refresh.
    started = call(
        "POST",
        "/oauth/device_authorizations/authorize",
        200,
        body={"client_id": OAUTH_CLIENT_ID, "scope": ORGANIZATION_SCOPE},
        media_type=form,
    )
    poll = {
        "grant_type": DEVICE_CODE_GRANT,
        "client_id": OAUTH_CLIENT_ID,
        "device_code": started["device_code"],
    }
    granted = call("POST", "/oauth/access_token", 200, body=poll, media_type=form)
    call(
        "POST",
        "/oauth/access_token.json",
        200,
        body={"grant_type": "refresh_token", "refresh_token": granted["refresh_token"]},
        media_type="application/json",
    )
    call("POST", "/oauth/access_token", 400, body=poll, media_type=form)  # used once only

    # The directory: a machine, its ownership, and reads.
    serial = uuid.uuid4().hex
    machine = call(
        "POST",
        "/api/v1/machines",
        201,
        org,
        query={
            "machine[name]": "Fuzz press",
            "machine[manufacturer]": "iotref",
            "machine[serial_number]": serial,
            "machine[kind]": "folder",
            "machine[site_id]": FIRST_SITE_ID,
        },
    )
    taken = {
        "machine[name]": "x",
        "machine[manufacturer]": "iotref",
        "machine[serial_number]": serial,
    }
    call("POST", "/api/v1/machines", 422, org, query=taken)
    ids = {"machineId": machine["id"]}
    call("GET", "/api/v1/machines/{machineId}", 200, org, path_parameters=ids)
    call("GET", "/api/v1/machines/{machineId}/machine_ownership", 404, org, path_parameters=ids)
    call("POST", "/api/v1/machines/{machineId}/machine_ownership", 201, org, path_parameters=ids)
    call("POST", "/api/v1/machines/{machineId}/machine_ownership", 422, org, path_parameters=ids)
    call("GET", "/api/v1/machines/{machineId}/machine_ownership", 200, org, path_parameters=ids)
    person_machine = call(
        "POST",
        "/api/v1/machines",
        201,
        credentials.person,
        query={
            "machine[name]": "P",
            "machine[manufacturer]": "iotref",
            "machine[serial_number]": serial + "p",
        },
    )
    call(
        "POST",
        "/api/v1/machines/{machineId}/machine_ownership",
        201,
        credentials.person,
        path_parameters={"machineId": person_machine["id"]},
        query={"organization_id": FIRST_ORGANIZATION_ID, "site_id": FIRST_SITE_ID},
    )
    call("GET", "/api/v1/person", 403, org)
    call("GET", "/api/v1/organization", 403, credentials.person)

    # Provisioning, the thing admin API and the thing's shadow.
    call("GET", "/v3/configuration", 200, org)
    body = {"certificateSigningRequest": make_csr(make_key()), "siteId": FIRST_SITE_ID}
    thing = call("POST", "/v4/provisioning", 200, org, body=body, media_type="application/json")
    client = {"clientId": thing["clientId"]}
    call("GET", "/admin/things", 200, admin, query={"orgId": thing["orgId"]})
    call("GET", "/admin/things/{clientId}", 200, admin, path_parameters=client)
    shadow = {"thingName": thing["clientId"]}
    _wait_for_shadow(call, admin, shadow)
    named = {"name": "fuzz"}
    update = {"state": {"reported": {"speed": 1}}, "clientToken": "t1"}
    for query in (None, named):
        call(
            "POST",
            "/things/{thingName}/shadow",
            200,
            admin,
            path_parameters=shadow,
            query=query,
            body=update,
            media_type="application/json",
        )
        call(
            "POST",
            "/things/{thingName}/shadow",
            409,
            admin,
            path_parameters=shadow,
            query=query,
            body={**update, "version": 1000},
            media_type="application/json",
        )
        call("GET", "/things/{thingName}/shadow", 200, admin, path_parameters=shadow, query=query)
    listed = call(
        "GET",
        "/api/things/shadow/ListNamedShadowsForThing/{thingName}",
        200,
        admin,
        path_parameters=shadow,
        query={"pageSize": 1},
    )
    assert listed["results"] == ["fuzz"]
    call("DELETE", "/things/{thingName}/shadow", 200, admin, path_parameters=shadow, query=named)
    call("DELETE", "/things/{thingName}/shadow", 404, admin, path_parameters=shadow, query=named)
    call(
        "POST",
        "/topics/{topic}",
        200,
        admin,
        path_parameters={"topic": "fuzz/ok"},
        query={"qos": 1},
        body=b"\xff\x00",
        media_type="application/octet-stream",
    )
    _monitor_success_answers(call, credentials, thing["clientId"])
    revoked = call("POST", "/admin/things/{clientId}/revoke", 200, admin, path_parameters=client)
    assert revoked["alreadyRevoked"] is False
    again = call("POST", "/admin/things/{clientId}/revoke", 200, admin, path_parameters=client)
    assert again["alreadyRevoked"] is True
    call("GET", "/oauth/device", 200, query={"user_code": "12345678"})


def _monitor_success_answers(call: Caller, credentials: Credentials, client_id: str) -> None:
    """The monitor's page and cookie, and its answers about a provisioned thing."""
    admin = credentials.admin
    device = {"client_id": client_id}
    desired = {"desired": {"fuzz": {"level": 1}}}
    shadow = "/monitor/api/devices/{client_id}/shadow"
    as_json: dict[str, Any] = {"media_type": "application/json", "path_parameters": device}
    with requests.Session() as browser:
        page = Caller(call.sandbox, browser)
        page("GET", "/monitor", 303, query={"token": admin})
        page("GET", "/monitor", 200)  # with the cookie the 303 set
        page("GET", "/monitor", 401, query={"token": "wrong"})
        for name in ("monitor.css", "monitor.js"):
            page("GET", "/monitor/assets/{name}", 200, path_parameters={"name": name})
        page("GET", "/monitor/api/summary", 200)
        csrf = {"X-CSRF-Token": credentials.monitor_csrf}
        page("POST", shadow, 403, body=desired, **as_json)  # the cookie without the CSRF token
        updated = page("POST", shadow, 200, headers=csrf, body=desired, **as_json)
        stale = {**desired, "version": updated["shadow"]["version"] + 5}
        page("POST", shadow, 409, headers=csrf, body=stale, **as_json)
        page("POST", shadow, 400, headers=csrf, body={"desired": {"a": [None]}}, **as_json)
    call("GET", "/monitor/api/summary", 200, admin)
    call("GET", "/monitor/api/devices/{client_id}", 200, admin, path_parameters=device)
    call("GET", "/monitor/api/devices/{client_id}/messages", 200, admin, path_parameters=device)
    call("GET", shadow, 200, admin, path_parameters=device)
    call("POST", shadow + "/validate", 200, admin, body={**desired, "version": 3}, **as_json)
    for enabled in (False, True):
        send = "/monitor/api/devices/{client_id}/send-telemetry"
        call("POST", send, 200, admin, body={"enabled": enabled}, **as_json)
    call("GET", "/monitor/api/messages/{message_id}", 404, admin, path_parameters={"message_id": 1})


def _wait_for_shadow(call: Caller, admin: str, shadow: dict[str, str]) -> None:
    """Provisioning sets the shadow through the shadow service's queue: wait for it."""
    deadline = time.monotonic() + 10
    while True:
        try:
            call("GET", "/things/{thingName}/shadow", 200, admin, path_parameters=shadow)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_served_description_is_the_fuzzed_one(fuzz_sandbox: SandboxProcess) -> None:
    """The running sandbox serves the fuzzed description."""
    with fuzz_sandbox.http() as http:
        answer = http.get("/openapi.json")
        head = http.head("/openapi.json")
    assert answer.status_code == 200
    assert head.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    served = answer.json()
    assert served.pop("servers") == [{"url": fuzz_sandbox.http_url}]
    assert described_operations(served) == described_operations(DESCRIPTION)
    assert served == DESCRIPTION


@pytest.mark.parametrize("topic", ["a%01b", "%7F", "%C2%94", "%EF%BF%BF"])
def test_publish_refuses_topics_the_broker_refuses(
    fuzz_sandbox: SandboxProcess, topic: str
) -> None:
    headers = fuzz_sandbox.admin_headers
    with fuzz_sandbox.http() as http:
        started = time.monotonic()
        answer = http.post(f"/topics/{topic}", params={"qos": "0"}, content=b"x", headers=headers)
        elapsed = time.monotonic() - started
        assert answer.status_code == 400, answer.text
        assert answer.headers["x-amzn-ErrorType"] == "InvalidRequestException:"
        assert elapsed < 2


# -- hostile bodies beyond what Schemathesis generates -------------------------------------

FORM = "application/x-www-form-urlencoded"
HOSTILE_BODIES: dict[str, tuple[str, bytes]] = {
    "form not UTF-8": (FORM, b"client_id=\xff\xfe&scope=\x80&grant_type=\xff&email=\xc3"),
    "form field of 900 kB": (FORM, b"client_id=" + b"a" * 900_000 + b"&scope=x"),
    "form over 1 MiB": (FORM, b"a=" + b"b" * (1024 * 1024 + 10)),
    "repeated parameters": (
        FORM,
        b"client_id=a&client_id=b&scope=x&scope=y&grant_type=refresh_token&grant_type=x",
    ),
    "bad percent escapes": (FORM, b"client_id=%zz%&scope=%&csrf_token=%C3"),
    "NUL bytes": (FORM, b"client_id=a%00b&scope=Org.prinect.onprem.rw%00&siteId=%00"),
    "form in UTF-16": (FORM + "; charset=utf-16", "client_id=a&scope=b".encode("utf-16")),
    "JSON array": ("application/json", b'[{"client_id": "x"}]'),
    "JSON null": ("application/json", b"null"),
    "JSON string": ("application/json", b'"client_id=x"'),
    "JSON malformed": ("application/json", b'{"client_id": '),
    "JSON not UTF-8": ("application/json", b'{"client_id": "\xff\xfe"}'),
    "JSON with a BOM": ("application/json", b'\xef\xbb\xbf{"client_id": "x"}'),
    "JSON of wrong types": (
        "application/json",
        b'{"client_id": ["x"], "scope": {"a": 1}, "grant_type": 5, '
        b'"certificateSigningRequest": 5, "siteId": [], "csrf_token": null}',
    ),
    "JSON huge number": ("application/json", b'{"siteId": 1' + b"0" * 5000 + b"}"),
    "JSON NaN": ("application/json", b'{"siteId": NaN, "client_id": Infinity}'),
    "text/plain": ("text/plain", b'{"client_id": "x", "scope": "y"}'),
    "XML": ("application/xml", b'<?xml version="1.0"?><client_id>x</client_id>'),
    "multipart without boundary": ("multipart/form-data", b"garbage"),
    "multipart cut short": ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Dis"),
    "multipart with a file": (
        "multipart/form-data; boundary=xyz",
        b'--xyz\r\nContent-Disposition: form-data; name="client_id"; filename="a.txt"\r\n'
        b"\r\nv\r\n--xyz--\r\n",
    ),
}
DEEP_BODIES: dict[str, bytes] = {
    "JSON array nested 100000 deep": b"[" * 100_000,
    "JSON object nested 50000 deep": b'{"a":' * 50_000,
}
HOSTILE_TARGETS = [
    "/oauth/device_authorizations/authorize",
    "/oauth/access_token",
    "/oauth/access_token.json",
    "/oauth/device",
    "/oauth/device/sign_in",
    "/oauth/device/sign_out",
    "/v4/provisioning",
    "/api/v1/machines",
]


def _post_hostile(
    sandbox: SandboxProcess, credentials: Credentials, path: str, content_type: str, body: bytes
) -> tuple[int, str, Any]:
    headers = {"Content-Type": content_type}
    if path in ("/v4/provisioning", "/api/v1/machines"):
        headers["Authorization"] = f"Bearer {credentials.organization}"
    with sandbox.http() as http:
        answer = http.post(path, content=body, headers=headers)
        try:
            parsed = answer.json()
        except ValueError:
            parsed = None
        return answer.status_code, answer.headers.get("content-type", ""), parsed


def _assert_json_4xx(sandbox: SandboxProcess, status: int, content_type: str, body: Any) -> None:
    assert 400 <= status < 500, (status, body)
    assert content_type.startswith("application/json"), content_type
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) or isinstance(body.get("errors"), dict), body
    with sandbox.http() as http:
        assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", HOSTILE_TARGETS)
def test_hostile_bodies_get_json_4xx(
    fuzz_sandbox: SandboxProcess, credentials: Credentials, path: str
) -> None:
    """Each hostile body gets a 4xx JSON error and the sandbox keeps answering."""
    for name, (content_type, body) in HOSTILE_BODIES.items():
        status, answer_type, answer = _post_hostile(
            fuzz_sandbox, credentials, path, content_type, body
        )
        try:
            _assert_json_4xx(fuzz_sandbox, status, answer_type, answer)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


@pytest.mark.parametrize("name", sorted(DEEP_BODIES))
@pytest.mark.parametrize("path", HOSTILE_TARGETS)
def test_deeply_nested_json_gets_json_4xx(
    fuzz_sandbox: SandboxProcess, credentials: Credentials, path: str, name: str
) -> None:
    status, answer_type, answer = _post_hostile(
        fuzz_sandbox, credentials, path, "application/json", DEEP_BODIES[name]
    )
    _assert_json_4xx(fuzz_sandbox, status, answer_type, answer)
