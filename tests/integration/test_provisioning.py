"""The configuration and provisioning service of a real sandbox (contract section 4)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.directory.seed import FIRST_ORGANIZATION_ID, FIRST_SITE_ID, THIRD_SITE_ID
from tests.support.device_keys import corrupt_csr_signature, make_csr, make_key
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import bearer, cached_token, provision_device, provision_request

pytestmark = pytest.mark.integration


def _things(sandbox: SandboxProcess) -> list[dict[str, Any]]:
    with sandbox.http() as http:
        answer = http.get("/admin/things", headers=bearer(sandbox.admin_token))
    assert answer.status_code == 200, answer.text
    things: list[dict[str, Any]] = answer.json()["things"]
    return things


def test_configuration(sandbox: SandboxProcess) -> None:
    with sandbox.http() as http:
        answer = http.get("/v3/configuration", headers=bearer(cached_token(sandbox)))
        assert answer.status_code == 200, answer.text
        unauthenticated = http.get("/v3/configuration")
    body = answer.json()
    assert body["connectivity"]["mqttEndPoint"] == "localhost"
    assert body["connectivity"]["mqttPort"] == sandbox.mqtt_port
    assert body["connectivity"]["machineRegion"] == "local"
    assert body["provisioning"] == {"telemetryTopic": TELEMETRY_TOPIC}
    root = x509.load_pem_x509_certificate(body["connectivity"]["serverRootCA"].encode())
    with open(sandbox.info["ca_file"], "rb") as handle:
        assert x509.load_pem_x509_certificate(handle.read()) == root
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"] == "unauthorized"


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa2048"])
def test_provisioning_succeeds(sandbox: SandboxProcess, key_type: str) -> None:
    device = provision_device(sandbox, key_type)
    cert = device.certificate
    assert device.org_id == FIRST_ORGANIZATION_ID
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        device.client_id
    )
    device_ca = x509.load_pem_x509_certificate(
        (sandbox.data_dir / "ca" / "device-ca.pem").read_bytes()
    )
    cert.verify_directly_issued_by(device_ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(device.key_path.read_bytes(), None)
    assert cert.public_key() == key.public_key()
    registered = {t["clientId"]: t for t in _things(sandbox)}
    assert registered[device.client_id]["siteId"] == FIRST_SITE_ID
    assert registered[device.client_id]["orgId"] == FIRST_ORGANIZATION_ID
    assert registered[device.client_id]["serial"] == format(cert.serial_number, "x")


def test_every_call_creates_a_new_thing(sandbox: SandboxProcess) -> None:
    key = make_key()
    body = {"certificateSigningRequest": make_csr(key), "siteId": FIRST_SITE_ID}
    token = cached_token(sandbox)
    first = provision_request(sandbox, token, body).json()
    second = provision_request(sandbox, token, body).json()
    assert first["clientId"] != second["clientId"]


def test_unauthenticated_and_bad_tokens(sandbox: SandboxProcess) -> None:
    before = len(_things(sandbox))
    body = {"certificateSigningRequest": make_csr(make_key()), "siteId": FIRST_SITE_ID}
    missing = provision_request(sandbox, None, body)
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    wrong = provision_request(sandbox, "not-a-token", body)
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_token"
    admin_token = provision_request(sandbox, sandbox.admin_token, body)
    assert admin_token.status_code == 401
    assert len(_things(sandbox)) == before


@pytest.mark.parametrize(
    "scope", ["Org.directory.organization.r", "prinect.onprem.rw,directory.person.r"]
)
def test_token_without_the_scope_or_organization(sandbox: SandboxProcess, scope: str) -> None:
    before = len(_things(sandbox))
    token = cached_token(sandbox, scope)
    body = {"certificateSigningRequest": make_csr(make_key()), "siteId": FIRST_SITE_ID}
    answer = provision_request(sandbox, token, body)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"] in ("insufficient_scope", "forbidden")
    assert len(_things(sandbox)) == before


def _secp256k1_csr() -> str:
    return make_csr(make_key("ec-secp256k1"))


@pytest.mark.parametrize(
    ("csr", "reason"),
    [
        ("garbage", "PEM"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "parsed",
        ),
        (corrupt_csr_signature(make_csr(make_key("ec-p256"))), "signature"),
        (corrupt_csr_signature(make_csr(make_key("rsa2048"))), "signature"),
        (make_csr(make_key("rsa1024")), "1024 bits is too small"),
        (make_csr(make_key("ec-p521")), "secp521r1"),
        (_secp256k1_csr(), "secp256k1"),
        (make_csr(make_key("ed25519")), "Ed25519"),
    ],
    ids=[
        "garbage",
        "bad-base64",
        "bad-ec-signature",
        "bad-rsa-signature",
        "rsa1024",
        "p521",
        "secp256k1",
        "ed25519",
    ],
)
def test_bad_csrs_are_refused(sandbox: SandboxProcess, csr: str, reason: str) -> None:
    before = len(_things(sandbox))
    answer = provision_request(
        sandbox, cached_token(sandbox), {"certificateSigningRequest": csr, "siteId": FIRST_SITE_ID}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_csr"
    assert reason in answer.json()["error_description"]
    assert len(_things(sandbox)) == before


_CSR = "with a good CSR"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"siteId": FIRST_SITE_ID}, 400),
        ({"certificateSigningRequest": 5, "siteId": FIRST_SITE_ID}, 400),
        ({"certificateSigningRequest": _CSR}, 400),
        ({"certificateSigningRequest": _CSR, "siteId": 7}, 400),
        ([1, 2], 400),
        ({"certificateSigningRequest": _CSR, "siteId": THIRD_SITE_ID}, 403),
        ({"certificateSigningRequest": _CSR, "siteId": "no-such-site"}, 422),
    ],
    ids=[
        "no-csr",
        "csr-not-string",
        "no-site",
        "site-not-string",
        "not-object",
        "site-of-another-organization",
        "unknown-site",
    ],
)
def test_bad_requests(sandbox: SandboxProcess, body: Any, status: int) -> None:
    before = len(_things(sandbox))
    if isinstance(body, dict) and body.get("certificateSigningRequest") == _CSR:
        body = {**body, "certificateSigningRequest": make_csr(make_key())}
    answer = provision_request(sandbox, cached_token(sandbox), body)
    assert answer.status_code == status, answer.text
    assert "error" in answer.json()
    assert len(_things(sandbox)) == before


def test_malformed_bodies_and_methods_answer_json(sandbox: SandboxProcess) -> None:
    headers = bearer(cached_token(sandbox))
    with sandbox.http() as http:
        not_json = http.post("/v4/provisioning", content=b"{nope", headers=headers)
        wrong_method = http.get("/v4/provisioning", headers=headers)
        wrong_method_cfg = http.post("/v3/configuration", headers=headers)
        admin_unauth = http.get("/admin/things")
        revoke_unauth = http.post(
            "/admin/things/iotref-00000000000000000000/revoke", headers=headers
        )
        revoke_malformed = http.post("/admin/things/x/revoke", headers=bearer(sandbox.admin_token))
        revoke_unknown = http.post(
            "/admin/things/iotref-00000000000000000000/revoke",
            headers=bearer(sandbox.admin_token),
        )
    assert not_json.status_code == 400
    assert wrong_method.status_code == 405
    assert wrong_method_cfg.status_code == 405
    assert admin_unauth.status_code == 401
    assert revoke_unauth.status_code == 401
    assert revoke_unknown.status_code == 404
    assert revoke_malformed.status_code == 404  # not the form of a client id: no thing
    for answer in (
        not_json,
        wrong_method,
        wrong_method_cfg,
        admin_unauth,
        revoke_unauth,
        revoke_unknown,
    ):
        assert answer.headers["content-type"].startswith("application/json")
        assert "error" in answer.json()


def test_no_secrets_in_logs(sandbox: SandboxProcess) -> None:
    token = cached_token(sandbox)
    provision_device(sandbox)
    for path in (sandbox.data_dir / "logs").iterdir():
        text = path.read_text(errors="replace")
        assert token not in text, path
        assert sandbox.admin_token not in text, path
        assert "PRIVATE KEY" not in text, path
