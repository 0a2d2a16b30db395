"""The broker component run directly (no HTTP, no directory): Mosquitto starts with the
generated config, enforces the things' policies, the dynamic-security plugin's identities
and the CRL, revokes one thing without touching the others, is restarted when killed (its
policies and revocations kept), and stops."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iotref.sandbox.broker import dynamic_security as dynsec
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.broker.supervisor import Broker, BrokerError
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.provisioning.certificate_authority import CertificateAuthorities
from iotref.sandbox.provisioning.things import ThingRegistry, new_client_id
from iotref.sandbox.runner import _free_port
from tests.support.device_keys import DeviceFiles, make_csr, make_key, write_device
from tests.support.mqtt_probe import MosquittoSub, connect, refused

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto"),
]

T = TypeVar("T")


class Harness:
    """A broker on its own event loop thread, driven from a sync test."""

    def __init__(
        self, data_dir: Path, binary: str = "mosquitto", dynsec_plugin: str | None = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = SandboxSettings(
            data_dir=data_dir, mosquitto_binary=binary, dynsec_plugin=dynsec_plugin
        )
        self.ctx = SandboxContext.open(settings)
        self.ctx.mqtt_port = _free_port()
        self.ctx.platform_mqtt_port = _free_port()
        self.cas = CertificateAuthorities(self.ctx.paths.ca_dir)
        self.cas.ensure()
        self.things = ThingRegistry(self.ctx.db)
        self.broker = Broker(self.ctx, self.cas, self.things)
        self.devices_dir = data_dir / "devices"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.broker.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.ctx.db.close()

    def device(self, key_type: str = "ec-p256", org_id: str = "org-1") -> DeviceFiles:
        """A thing registered (as provisioning does) and its policy applied."""
        client_id = new_client_id()
        key = make_key(key_type)
        csr = x509.load_pem_x509_csr(make_csr(key).encode())
        cert = self.cas.sign_device_csr(csr, client_id)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        self.things.register(
            client_id=client_id,
            org_id=org_id,
            site_id="site-1",
            certificate_pem=pem,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
        )
        self.run(self.broker.apply_policies())
        return write_device(self.devices_dir, client_id, key, pem, org_id=org_id)

    def revoke(self, device: DeviceFiles) -> None:
        """What ``POST /admin/things/{id}/revoke`` does."""
        self.cas.revoke(device.certificate.serial_number)
        self.things.mark_revoked(device.client_id)
        self.run(self.broker.revoke(device.client_id))

    def device_probe(self, device: DeviceFiles, **kwargs: Any) -> Any:
        return connect(
            self.ctx.mqtt_port, self.cas.ca_bundle_path, device.cert_path, device.key_path, **kwargs
        )

    def operator_probe(self) -> Any:
        return connect(
            self.ctx.platform_mqtt_port,
            self.cas.ca_bundle_path,
            self.cas.operator_cert_path,
            self.cas.operator_key_path,
        )


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "sandbox")
    h.run(h.broker.start())
    yield h
    pid = h.broker.pid
    h.close()
    if pid is not None:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _telemetry(device: DeviceFiles) -> str:
    return f"{TELEMETRY_TOPIC}/{device.org_id}/{device.client_id}"


def test_device_publishes_own_telemetry_only(harness: Harness) -> None:
    a, b = harness.device(), harness.device("rsa2048")
    with harness.operator_probe() as operator, harness.device_probe(a) as dev:
        assert operator.subscribe("#", "$aws/#") == [1, 1]
        assert dev.publish(_telemetry(a), b'{"n": 1}') == 0
        assert operator.wait_for(_telemetry(a)).payload == b'{"n": 1}'
        assert dev.publish(_telemetry(b), b'{"n": 2}') == 0x87
        assert dev.publish(f"{TELEMETRY_TOPIC}/{a.org_id}/other", b"x") == 0x87
        assert dev.publish(f"{TELEMETRY_TOPIC}/org-2/{a.client_id}", b"x") == 0x87
        assert operator.received_on(_telemetry(b), within=0.5) == []
        assert operator.received_on(f"{TELEMETRY_TOPIC}/org-2/{a.client_id}", 0.2) == []


def test_device_shadow_topics(harness: Harness) -> None:
    a, b = harness.device(), harness.device()
    own = f"$aws/things/{a.client_id}/shadow"
    other = f"$aws/things/{b.client_id}/shadow"
    with harness.operator_probe() as operator, harness.device_probe(a) as dev:
        operator.subscribe("$aws/#")
        assert dev.subscribe(
            f"{own}/get/accepted", f"{own}/update/delta", f"{own}/name/cfg/update/documents"
        ) == [1, 1, 1]
        # Mosquitto 2.0's acl_file grants every SUBSCRIBE and applies the read rules when
        # it delivers: whatever the SUBACK says, nothing of another thing arrives.
        dev.subscribe(
            f"{other}/get/accepted",
            f"{other}/update/delta",
            "#",
            "$aws/#",
            "$aws/things/+/shadow/update/accepted",
        )
        for topic in (f"{other}/get/accepted", f"{other}/update/delta", f"{other}/update/accepted"):
            operator.publish(topic, b'{"secret": 1}')
            assert dev.received_on(topic, within=0.3) == []
        operator.publish(f"{TELEMETRY_TOPIC}/org-1/{b.client_id}", b"{}")
        assert dev.received_on(f"{TELEMETRY_TOPIC}/org-1/{b.client_id}", within=0.3) == []
        dev.publish(f"{own}/get", b"")
        assert operator.wait_for(f"{own}/get").payload == b""
        dev.publish(f"{own}/name/cfg/update", b"{}")
        operator.wait_for(f"{own}/name/cfg/update")
        for suffix in ("get/accepted", "update/rejected", "update/delta", "update/documents"):
            dev.publish(f"{own}/{suffix}", b'{"forged": true}')
            assert operator.received_on(f"{own}/{suffix}", within=0.3) == []
        dev.publish(f"{other}/update", b"{}")
        assert operator.received_on(f"{other}/update", within=0.3) == []
        # the platform's answers do reach the device
        operator.publish(f"{own}/get/accepted", b'{"state": {}}')
        assert dev.wait_for(f"{own}/get/accepted").payload == b'{"state": {}}'


def test_second_connection_takes_the_session_over(harness: Harness) -> None:
    a = harness.device()
    first = harness.device_probe(a, client_id="anything")
    try:
        second = harness.device_probe(a, client_id="something-else")
        with second:
            assert first.disconnected.wait(5)
    finally:
        first.client.loop_stop()


def test_refused_without_or_with_foreign_certificates(harness: Harness, tmp_path: Path) -> None:
    port, ca = harness.ctx.mqtt_port, harness.cas.ca_bundle_path
    assert refused(port, ca, None, None) is not None
    foreign = CertificateAuthorities(tmp_path / "foreign")
    foreign.ensure()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = make_key()
    cert = foreign.sign_device_csr(x509.load_pem_x509_csr(make_csr(key).encode()), new_client_id())
    dev = write_device(
        tmp_path / "foreign-dev", "x", key, cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    assert refused(port, ca, dev.cert_path, dev.key_path) is not None
    # a device certificate is no good on the platform listener
    good = harness.device()
    assert refused(harness.ctx.platform_mqtt_port, ca, good.cert_path, good.key_path)
    assert refused(port, ca, good.cert_path, good.key_path) is None


def test_revocation_drops_that_device_alone_without_a_restart(harness: Harness) -> None:
    a, b = harness.device(), harness.device()
    pid = harness.broker.pid
    victim, bystander = harness.device_probe(a), harness.device_probe(b)
    try:
        with harness.operator_probe() as operator:
            operator.subscribe(_telemetry(b))
            started = time.monotonic()
            harness.revoke(a)
            assert victim.disconnected.wait(1.0)
            assert time.monotonic() - started < 1.0
            assert not bystander.disconnected.is_set()
            assert bystander.publish(_telemetry(b), b'{"after": 1}') == 0
            assert operator.wait_for(_telemetry(b)).payload == b'{"after": 1}'
    finally:
        victim.client.loop_stop()
        bystander.close()
    assert (harness.broker.pid, harness.broker.restarts) == (pid, 0)
    port, ca = harness.ctx.mqtt_port, harness.cas.ca_bundle_path
    assert refused(port, ca, a.cert_path, a.key_path) is not None
    assert refused(port, ca, b.cert_path, b.key_path) is None
    # the platform CA's identities still pass their CRL check
    with harness.operator_probe():
        pass
    assert refused(port, ca, harness.cas.operator_cert_path, harness.cas.operator_key_path) is None


def test_a_disabled_identity_has_no_rights_while_its_certificate_still_passes(
    harness: Harness,
) -> None:
    """Between the plugin's disable and Mosquitto reading the new CRL, a reconnect passes
    TLS; the plugin refuses it everything, publishing and subscribing."""
    a = harness.device()
    own = f"$aws/things/{a.client_id}/shadow"
    probe = harness.device_probe(a)
    try:
        harness.run(harness.broker._disable(a.client_id))  # the CRL is not touched
        assert probe.disconnected.wait(1.0)
    finally:
        probe.client.loop_stop()
    with harness.operator_probe() as operator, harness.device_probe(a) as again:
        operator.subscribe("#", "$aws/#")
        assert again.publish(_telemetry(a), b"{}") == 0x87
        assert again.publish(f"{own}/update", b"{}") == 0x87
        assert again.subscribe(f"{own}/update/delta", f"{own}/get/accepted") == [0x87, 0x87]
        assert operator.received_on(_telemetry(a), within=0.3) == []


def test_revoking_an_identity_the_plugin_already_knows(harness: Harness) -> None:
    """An operator made a client of that name with mosquitto_ctrl before: revoking still
    gives it the revoked role and disconnects it."""
    a = harness.device()

    async def make_client() -> None:
        async with harness.broker._control().session() as session:
            await session.call([{"command": "createClient", "username": a.client_id}])

    async def roles_of(client_id: str) -> tuple[list[str], bool]:
        async with harness.broker._control().session() as session:
            (found,) = await session.call([{"command": "getClient", "username": client_id}])
        client = found["data"]["client"]
        return [r["rolename"] for r in client["roles"]], bool(client.get("disabled"))

    harness.run(make_client())
    probe = harness.device_probe(a)
    try:
        harness.revoke(a)
        assert probe.disconnected.wait(1.0)
    finally:
        probe.client.loop_stop()
    assert harness.run(roles_of(a.client_id)) == ([dynsec.REVOKED_ROLE], True)
    port, ca = harness.ctx.mqtt_port, harness.cas.ca_bundle_path
    assert refused(port, ca, a.cert_path, a.key_path) is not None


def test_policies_and_revocations_survive_a_broker_restart(harness: Harness) -> None:
    revoked, kept = harness.device(), harness.device()
    harness.revoke(revoked)
    old = harness.broker.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while harness.broker.pid in (None, old) or harness.broker.restarts < 1:
        assert time.monotonic() < deadline, "mosquitto was not restarted"
        time.sleep(0.1)
    port, ca = harness.ctx.mqtt_port, harness.cas.ca_bundle_path
    assert refused(port, ca, revoked.cert_path, revoked.key_path) is not None
    with harness.operator_probe() as operator, harness.device_probe(kept) as dev:
        operator.subscribe("#")
        assert dev.publish(_telemetry(kept), b"{}") == 0
        assert dev.publish(f"{TELEMETRY_TOPIC}/org-2/{kept.client_id}", b"{}") == 0x87
        assert operator.wait_for(_telemetry(kept)).payload == b"{}"
    plugin = json.loads(harness.broker.dynsec_path.read_text())
    clients = {c["username"]: c for c in plugin["clients"]}
    assert clients[revoked.client_id]["disabled"] is True
    assert kept.client_id not in clients


def test_killed_mosquitto_is_restarted(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    a = harness.device()
    old = harness.broker.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pid = harness.broker.pid
        if pid not in (None, old) and harness.broker.restarts == 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail("mosquitto was not restarted")
    with harness.device_probe(a) as dev:
        assert dev.publish(_telemetry(a)) < 0x80
    assert "exited unexpectedly" in caplog.text


def test_persistent_session_survives_restart(harness: Harness) -> None:
    a = harness.device()
    own = f"$aws/things/{a.client_id}/shadow/update/delta"
    with harness.device_probe(a, clean_start=False) as dev:
        assert dev.subscribe(own) == [1]
    harness.run(harness.broker.restart())
    with harness.operator_probe() as operator:
        operator.publish(own, b'{"queued": true}')
    with harness.device_probe(a, clean_start=False) as dev:
        assert dev.wait_for(own).payload == b'{"queued": true}'


def test_operator_with_mosquitto_sub_on_the_device_port(harness: Harness) -> None:
    a = harness.device()
    cas = harness.cas
    with MosquittoSub(
        harness.ctx.mqtt_port,
        cas.ca_bundle_path,
        cas.operator_cert_path,
        cas.operator_key_path,
        ["#", "$aws/#"],
    ) as sub:
        sub.wait_subscribed()
        with harness.device_probe(a) as dev:
            dev.publish(_telemetry(a), b"hello")
        sub.wait_line(lambda line: line == f"{_telemetry(a)} hello")
        # the device listener sets the client id to the identity: the session is the
        # operator's, not an anonymous one
        log = harness.broker.log_path.read_text()
        assert "as iotref-operator" in log


def test_missing_binary_is_one_clear_error(tmp_path: Path) -> None:
    h = Harness(tmp_path / "sb", binary="no-such-mosquitto")
    try:
        with pytest.raises(BrokerError, match="no-such-mosquitto"):
            h.run(h.broker.start())
    finally:
        h.close()


def test_missing_plugin_is_one_clear_error(tmp_path: Path) -> None:
    h = Harness(tmp_path / "sb", dynsec_plugin=str(tmp_path / "no-such-plugin.so"))
    try:
        with pytest.raises(BrokerError, match="dynamic-security plugin.*no-such-plugin.so"):
            h.run(h.broker.start())
    finally:
        h.close()


def test_bad_config_is_reported(tmp_path: Path) -> None:
    h = Harness(tmp_path / "sb")
    h.ctx.platform_mqtt_port = h.ctx.mqtt_port  # the same port twice: mosquitto fails
    try:
        with pytest.raises(BrokerError, match="mosquitto"):
            h.run(h.broker.start())
    finally:
        h.close()
