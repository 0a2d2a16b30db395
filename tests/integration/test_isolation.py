"""Isolation between devices and who gets in, against the real sandbox: device A can neither
publish as device B nor read B's shadow or telemetry; expired, revoked and foreign-CA
certificates are refused; the device itself refuses TLS below 1.2 and a server certificate
for another host name; the operator and monitor APIs refuse requests without the admin
token. (Mosquitto 2.0's acl_file grants every SUBSCRIBE and filters at delivery, so
"cannot read" means that nothing arrives.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import ConnectionFailed
from iotref.device.connection.settings import ConnectionSettings
from iotref.protocol.topics import telemetry_topic
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.provisioning.certificate_authority import CertificateAuthorities
from iotref.sandbox.provisioning.things import new_client_id
from tests.conftest import SandboxFactory
from tests.support.cli_process import revoke
from tests.support.device_connection import QUICK_RETRY, device_settings
from tests.support.device_keys import DeviceFiles, make_key, write_device
from tests.support.figures import record
from tests.support.mqtt_probe import device_probe, device_topic, operator_probe, refused
from tests.support.sandbox_process import SandboxProcess
from tests.support.shadow_rest import shadow_document
from tests.support.tls_servers import TlsServer, issue_server_cert, tls11_handshake_possible
from tests.support.tokens import cached_token, provision_device
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


RETRY = {**QUICK_RETRY, "connect_timeout_s": 4.0, "min_backoff_s": 0.2}


def _connect_fails(settings: ConnectionSettings) -> ConnectionFailed:
    async def attempt() -> None:
        conn = Connection(settings)
        await conn.start()
        await conn.stop()

    with pytest.raises(ConnectionFailed) as info:
        asyncio.run(attempt())
    return info.value


# --------------------------------------------------------------------------- devices


def test_device_cannot_publish_as_another_device(sandbox: SandboxProcess, tmp_path: Path) -> None:
    a = provision_device(sandbox, directory=tmp_path / "a")
    b = provision_device(sandbox, directory=tmp_path / "b")
    b_shadow = f"$aws/things/{b.client_id}/shadow"
    version = shadow_document(sandbox, b.client_id)["version"]
    forged = [
        telemetry_topic(TELEMETRY_TOPIC, a.org_id, b.client_id),
        f"{b_shadow}/update",
        f"{b_shadow}/get",
        f"{b_shadow}/delete",
        f"{b_shadow}/name/config/update",
        f"{b_shadow}/update/delta",
        f"{b_shadow}/get/accepted",
    ]
    with operator_probe(sandbox) as operator, device_probe(sandbox, a) as dev:
        operator.subscribe("#", "$aws/#")
        codes = {
            topic: dev.publish(topic, b'{"state": {"desired": {"forged": true}}}')
            for topic in forged
        }
        arrived = [t for t in forged if operator.received_on(t, within=0.3)]
    assert all(code >= 0x80 for code in codes.values()), codes  # PUBACK: not authorized
    assert arrived == []
    assert shadow_document(sandbox, b.client_id)["version"] == version  # B's shadow untouched
    record(
        "security",
        {
            "check": "device A publishes as device B",
            "outcome": "refused: "
            f"PUBACK 0x{max(codes.values()):02X} on {len(forged)} topics, nothing delivered, "
            "B's shadow unchanged",
        },
    )


def test_device_cannot_read_another_devices_telemetry_or_shadow(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    a = provision_device(sandbox, directory=tmp_path / "a")
    b = provision_device(sandbox, directory=tmp_path / "b")
    b_shadow = f"$aws/things/{b.client_id}/shadow"
    with device_probe(sandbox, a) as spy:
        spy.subscribe("#", "$aws/#", device_topic(b), f"{b_shadow}/#", "connectprint/#")
        with device_probe(sandbox, b) as victim:
            assert victim.subscribe(f"{b_shadow}/get/accepted") == [1]
            assert victim.publish(device_topic(b), b'{"secret": 1}') < 0x80
            assert victim.publish(f"{b_shadow}/get", b"{}") < 0x80
            got = victim.wait_for(f"{b_shadow}/get/accepted", timeout=5)  # B reads its own
            assert json.loads(got.payload)["state"]
        with operator_probe(sandbox) as operator:
            for suffix in ("get/accepted", "update/delta", "update/documents", "update/accepted"):
                operator.publish(f"{b_shadow}/{suffix}", b'{"state": {"secret": 1}}')
        leaked = spy.received_on("#", within=0.1)
        time.sleep(0.5)
        while not spy.messages.empty():
            leaked.append(spy.messages.get())
    assert leaked == [], [m.topic for m in leaked]
    record(
        "security",
        {
            "check": "device A reads device B's telemetry and shadow",
            "outcome": "nothing delivered (subscriptions to #, $aws/# and B's topics)",
        },
    )


# --------------------------------------------------------------------------- certificates


def _expired_device(sandbox: SandboxProcess, directory: Path, client_id: str) -> DeviceFiles:
    """A certificate from the sandbox's own device CA, for a real thing, expired yesterday."""
    ca_dir = sandbox.data_dir / "ca"
    cas = CertificateAuthorities(ca_dir)
    ca_cert = x509.load_pem_x509_certificate(cas.device_ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key(cas.device_ca_key_path.read_bytes(), None)
    key = make_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return write_device(directory, client_id, key, pem)


def test_expired_certificate_is_refused(sandbox: SandboxProcess, tmp_path: Path) -> None:
    real = provision_device(sandbox, directory=tmp_path / "real")
    expired = _expired_device(sandbox, tmp_path / "expired", real.client_id)
    reason = refused(sandbox.mqtt_port, sandbox.info["ca_file"], expired.cert_path,
                     expired.key_path)  # fmt: skip
    assert reason is not None
    failure = _connect_fails(device_settings(sandbox.info, expired, RETRY))
    assert failure.kind in ("tls", "refused"), failure.reason
    # the same thing with its valid certificate gets in: the expiry is what is refused
    assert refused(sandbox.mqtt_port, sandbox.info["ca_file"], real.cert_path,
                   real.key_path) is None  # fmt: skip
    record(
        "security",
        {
            "check": "expired device certificate (signed by the device CA)",
            "outcome": f"refused: {failure.reason}",
        },
    )


def test_foreign_ca_certificate_is_refused(sandbox: SandboxProcess, tmp_path: Path) -> None:
    foreign = CertificateAuthorities(tmp_path / "foreign-ca")
    foreign.ensure()
    key = make_key()
    from tests.support.device_keys import make_csr

    client_id = new_client_id()
    cert = foreign.sign_device_csr(x509.load_pem_x509_csr(make_csr(key).encode()), client_id)
    stranger = write_device(
        tmp_path / "stranger",
        client_id,
        key,
        cert.public_bytes(serialization.Encoding.PEM).decode(),
    )
    failure = _connect_fails(device_settings(sandbox.info, stranger, RETRY))
    assert failure.kind in ("tls", "refused"), failure.reason
    record(
        "security",
        {"check": "device certificate from a foreign CA", "outcome": f"refused: {failure.reason}"},
    )


def test_revoked_certificate_is_refused(sandbox_factory: SandboxFactory, tmp_path: Path) -> None:
    sb = sandbox_factory("--auto-approve", "--poll-interval", "0")
    victim = provision_device(sb, directory=tmp_path / "victim")

    async def connected_then_revoked() -> str:
        async with Connection(device_settings(sb.info, victim, RETRY)) as conn:
            result = await asyncio.to_thread(revoke, sb.data_dir, victim.client_id)
            assert result.returncode == 0, result.stderr
            deadline = time.monotonic() + 15
            while conn.connected and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert not conn.connected, "the revoked device is still connected"
            await asyncio.sleep(2)  # its reconnect attempts are refused
            assert not conn.connected
            return conn.stats.last_error or ""

    last_error = asyncio.run(connected_then_revoked())
    failure = _connect_fails(device_settings(sb.info, victim, RETRY))
    assert failure.kind in ("tls", "refused"), failure.reason
    record(
        "security",
        {
            "check": "revoked device certificate (iotref sandbox revoke)",
            "outcome": f"dropped ({last_error}); new connections refused: {failure.reason}",
        },
    )


# --------------------------------------------------------------------------- device-side TLS


def _client_ca(sandbox: SandboxProcess) -> Path:
    return CertificateAuthorities(sandbox.data_dir / "ca").client_ca_bundle_path


def _server_root(sandbox: SandboxProcess) -> tuple[Path, Path]:
    cas = CertificateAuthorities(sandbox.data_dir / "ca")
    return cas.server_root_ca_path, cas.server_root_ca_key_path


@pytest.mark.parametrize("fail_fast", [True, False])
def test_device_refuses_tls_below_1_2(
    sandbox: SandboxProcess, tmp_path: Path, fail_fast: bool
) -> None:
    device = provision_device(sandbox, directory=tmp_path / "device")
    identity = issue_server_cert(*_server_root(sandbox), tmp_path / "srv", "localhost")
    with TlsServer(
        identity, client_ca=_client_ca(sandbox), max_version=ssl.TLSVersion.TLSv1_1
    ) as old:
        # control: the server does speak TLS 1.1 with the platform's own root and name
        assert tls11_handshake_possible(old.port, Path(sandbox.info["ca_file"]))
        # The server thread counts the control's handshake a moment after the client saw it.
        wait_until(lambda: old.handshakes_ok >= 1, 5, "the server to count the control")
        assert old.handshakes_ok == 1, "the control handshake was not counted"
        before = old.handshakes_ok
        failure = _connect_fails(
            device_settings(sandbox.info, device, RETRY, port=old.port, fail_fast=fail_fast)
        )
        time.sleep(0.3)
        assert old.handshakes_ok == before, "the device completed a TLS 1.1 handshake"
        assert old.app_bytes == 0
    assert failure.kind in ("tls", "unreachable"), failure.reason
    record(
        "security",
        {
            "check": f"TLS 1.1-only server (device side, fail_fast={fail_fast})",
            "outcome": f"refused, no handshake completed: {failure.reason}",
        },
    )


@pytest.mark.parametrize("fail_fast", [True, False])
def test_device_refuses_a_certificate_for_another_host(
    sandbox: SandboxProcess, tmp_path: Path, fail_fast: bool
) -> None:
    device = provision_device(sandbox, directory=tmp_path / "device")
    root = _server_root(sandbox)
    wrong = issue_server_cert(*root, tmp_path / "wrong", "elsewhere.example")
    with TlsServer(wrong, client_ca=_client_ca(sandbox)) as server:
        failure = _connect_fails(
            device_settings(sandbox.info, device, RETRY, port=server.port, fail_fast=fail_fast)
        )
        time.sleep(0.3)
        assert server.app_bytes == 0, "the device sent MQTT to a server of another name"
    assert failure.kind in ("tls", "unreachable"), failure.reason
    # control: the same root and a certificate for "localhost" gets the device's CONNECT
    right = issue_server_cert(*root, tmp_path / "right", "localhost")
    with TlsServer(right, client_ca=_client_ca(sandbox)) as server:
        _connect_fails(
            device_settings(sandbox.info, device, RETRY, port=server.port, connect_timeout_s=2)
        )
        time.sleep(0.3)
        assert server.app_bytes > 0
    record(
        "security",
        {
            "check": f"server certificate for another host name (fail_fast={fail_fast})",
            "outcome": f"refused before any MQTT was sent: {failure.reason}",
        },
    )


# --------------------------------------------------------------------------- admin APIs


ADMIN_REQUESTS = [
    ("GET", "/admin/things"),
    ("GET", "/admin/things/{thing}"),
    ("POST", "/admin/things/{thing}/revoke"),
    ("GET", "/things/{thing}/shadow"),
    ("POST", "/things/{thing}/shadow"),
    ("DELETE", "/things/{thing}/shadow"),
    ("GET", "/api/things/shadow/ListNamedShadowsForThing/{thing}"),
    ("POST", "/topics/connectprint%2Ftelemetry%2Fx"),
    ("GET", "/monitor"),
    ("GET", "/monitor/api/summary"),
    ("GET", "/monitor/api/stream"),
    ("GET", "/monitor/api/devices/{thing}"),
    ("GET", "/monitor/api/devices/{thing}/messages"),
    ("GET", "/monitor/api/devices/{thing}/shadow"),
    ("POST", "/monitor/api/devices/{thing}/shadow"),
    ("POST", "/monitor/api/devices/{thing}/send-telemetry"),
]


def test_operator_and_monitor_apis_refuse_without_the_admin_token(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    device = provision_device(sandbox, directory=tmp_path / "device")
    user_token = cached_token(sandbox)  # a real directory token: not the admin's
    credentials: dict[str, dict[str, str]] = {
        "none": {},
        "wrong bearer": {"Authorization": "Bearer not-the-admin-token"},
        "directory access token": {"Authorization": f"Bearer {user_token}"},
        "admin token as basic auth": {"Authorization": f"Basic {sandbox.admin_token}"},
        "monitor link with a wrong token": {},
    }
    outcomes: dict[str, int] = {}
    checked = 0
    with httpx.Client(base_url=sandbox.http_url, timeout=10, follow_redirects=False) as http:
        for method, template in ADMIN_REQUESTS:
            path = template.format(thing=device.client_id)
            admin = http.request(
                method, path, headers=sandbox.admin_headers,
                json={"state": {"desired": {}}} if method == "POST" else None,
            ) if method == "GET" and "stream" not in path else None  # fmt: skip
            if admin is not None and admin.status_code == 404 and "monitor" in path:
                continue  # the monitor is not built into this sandbox
            for label, headers in credentials.items():
                url = path + ("?token=wrong" if label.startswith("monitor link") else "")
                answer = http.request(method, url, headers=headers, json={"enabled": False})
                outcomes[f"{method} {path} [{label}]"] = answer.status_code
                checked += 1
                assert answer.status_code in (401, 403), (method, path, label, answer.text)
    # the device is still there and permitted: nothing above changed anything
    with sandbox.http() as http:
        thing = http.get(
            f"/admin/things/{device.client_id}",
            headers=sandbox.admin_headers,
        )
    assert thing.status_code == 200 and not thing.json().get("revoked"), thing.text
    record(
        "security",
        {
            "check": "operator and monitor APIs without the admin token",
            "outcome": f"{checked} requests ({len(ADMIN_REQUESTS)} routes x "
            f"{len(credentials)} credentials) all refused with 401/403",
        },
    )
