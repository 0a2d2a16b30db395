"""Mosquitto in a real sandbox: TLS with client certificates, the things' policies,
revocation through ``iotref sandbox revoke`` (one device dropped, every other connection
kept), supervision (policies and revocations kept over a restart), and restarts on the same
data dir."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from iotref.protocol.topics import telemetry_topic
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.provisioning.certificate_authority import CertificateAuthorities
from iotref.sandbox.provisioning.things import new_client_id
from tests.conftest import SandboxFactory
from tests.support.cli_process import revoke
from tests.support.device_keys import make_csr, make_key, write_device
from tests.support.mqtt_probe import (
    MosquittoSub,
    Probe,
    device_probe,
    device_topic,
    operator_probe,
    refused,
)
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

AUTO = ("--auto-approve", "--poll-interval", "1")


def _ca(sandbox: SandboxProcess) -> str:
    return str(sandbox.info["ca_file"])


def test_operator_sees_device_telemetry_with_mosquitto_sub(sandbox: SandboxProcess) -> None:
    device = provision_device(sandbox)
    with MosquittoSub(
        sandbox.mqtt_port,
        _ca(sandbox),
        sandbox.info["operator_cert"],
        sandbox.info["operator_key"],
        ["#", "$aws/#"],
    ) as sub:
        sub.wait_subscribed()
        with device_probe(sandbox, device) as dev:
            assert dev.publish(device_topic(device), b'{"speed": 1}') < 0x80
            dev.publish(f"$aws/things/{device.client_id}/shadow/get", b"")
        sub.wait_line(lambda line: line == f'{device_topic(device)} {{"speed": 1}}')
        sub.wait_line(lambda line: line.startswith(f"$aws/things/{device.client_id}/shadow/get"))


def test_device_cannot_publish_as_another_device(sandbox: SandboxProcess) -> None:
    a, b = provision_device(sandbox), provision_device(sandbox)
    with operator_probe(sandbox) as operator, device_probe(sandbox, a) as dev:
        assert operator.subscribe("#", "$aws/#") == [1, 1]
        # PUBACK 0x87: not authorized, as AWS IoT Core answers an MQTT 5 client
        as_b = telemetry_topic(TELEMETRY_TOPIC, a.org_id, b.client_id)
        assert dev.publish(as_b, b"forged") == 0x87
        assert dev.publish(f"{TELEMETRY_TOPIC}/{a.org_id}", b"forged") == 0x87
        assert dev.publish(f"{TELEMETRY_TOPIC}/other-org/{a.client_id}", b"forged") == 0x87
        assert dev.publish("anything/else", b"forged") == 0x87
        assert dev.publish(f"$aws/things/{b.client_id}/shadow/update", b"{}") == 0x87
        assert dev.publish(f"$aws/things/{b.client_id}/shadow/name/x/get", b"{}") == 0x87
        assert dev.publish(device_topic(a), b"mine") == 0
        assert operator.wait_for(device_topic(a)).payload == b"mine"
        assert operator.received_on(as_b, within=0.5) == []
        assert operator.received_on(f"{TELEMETRY_TOPIC}/other-org/{a.client_id}", 0.2) == []
        assert operator.received_on(f"$aws/things/{b.client_id}/shadow/update", 0.2) == []
        assert operator.received_on("anything/else", within=0.2) == []


def test_device_cannot_read_another_devices_shadow(sandbox: SandboxProcess) -> None:
    a, b = provision_device(sandbox), provision_device(sandbox)
    other = f"$aws/things/{b.client_id}/shadow"
    own = f"$aws/things/{a.client_id}/shadow"
    with operator_probe(sandbox) as operator, device_probe(sandbox, a) as dev:
        assert dev.subscribe(f"{own}/get/accepted", f"{own}/update/delta") == [1, 1]
        # Mosquitto 2.0 grants SUBSCRIBE and filters when delivering (see the report in
        # broker.config.render_acl): what matters is that nothing of b's arrives at a.
        dev.subscribe(f"{other}/get/accepted", f"{other}/update/delta", f"{other}/#", "$aws/#", "#")
        for suffix in ("get/accepted", "update/delta", "update/documents"):
            operator.publish(f"{other}/{suffix}", b'{"state": {"secret": 1}}')
        operator.publish(f"{own}/update/delta", b'{"state": {"mine": 1}}')
        assert dev.wait_for(f"{own}/update/delta").payload == b'{"state": {"mine": 1}}'
        for suffix in ("get/accepted", "update/delta", "update/documents"):
            assert dev.received_on(f"{other}/{suffix}", within=0.3) == []


@pytest.mark.parametrize(
    "suffix",
    [
        "get/accepted",
        "get/rejected",
        "update/accepted",
        "update/rejected",
        "update/delta",
        "update/documents",
        "delete/accepted",
        "delete/rejected",
        "name/config/update/accepted",
        "name/config/update/delta",
    ],
)
def test_device_cannot_forge_shadow_responses(sandbox: SandboxProcess, suffix: str) -> None:
    device = provision_device(sandbox)
    topic = f"$aws/things/{device.client_id}/shadow/{suffix}"
    with operator_probe(sandbox) as operator, device_probe(sandbox, device) as dev:
        operator.subscribe("$aws/#")
        dev.publish(topic, b'{"forged": true}')
        assert operator.received_on(topic, within=0.4) == []


def test_device_may_use_its_own_shadow_request_topics(sandbox: SandboxProcess) -> None:
    device = provision_device(sandbox, "rsa2048")
    prefix = f"$aws/things/{device.client_id}/shadow"
    topics = [f"{prefix}/{op}" for op in ("get", "update", "delete")]
    topics += [f"{prefix}/name/config/{op}" for op in ("get", "update", "delete")]
    with operator_probe(sandbox) as operator, device_probe(sandbox, device) as dev:
        operator.subscribe("$aws/#")
        for topic in topics:
            dev.publish(topic, b"{}")
            operator.wait_for(topic)


def test_connections_without_a_good_certificate_are_refused(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    port, ca = sandbox.mqtt_port, _ca(sandbox)
    assert refused(port, ca, None, None) is not None
    foreign = CertificateAuthorities(tmp_path / "foreign-ca")
    foreign.ensure()
    key = make_key()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = foreign.sign_device_csr(x509.load_pem_x509_csr(make_csr(key).encode()), new_client_id())
    stranger = write_device(
        tmp_path / "stranger",
        "stranger",
        key,
        cert.public_bytes(serialization.Encoding.PEM).decode(),
    )
    assert refused(port, ca, stranger.cert_path, stranger.key_path) is not None
    # the foreign CA's "operator" is nobody here either
    assert refused(port, ca, foreign.operator_cert_path, foreign.operator_key_path) is not None
    good = provision_device(sandbox)
    assert refused(port, ca, good.cert_path, good.key_path) is None


class SteadySender(threading.Thread):
    """Publishes numbered QoS 1 messages every few milliseconds and records which were
    acknowledged with success."""

    def __init__(self, probe: Probe, topic: str) -> None:
        super().__init__(daemon=True)
        self.probe, self.topic = probe, topic
        self.acked: list[tuple[float, int]] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.halt.is_set():
            try:
                code = self.probe.publish(self.topic, str(index).encode(), timeout=5)
            except TimeoutError as exc:
                self.failures.append(str(exc))
                return
            if code == 0:
                self.acked.append((time.monotonic(), index))
            else:
                self.failures.append(f"message {index}: PUBACK {code:#x}")
            index += 1
            time.sleep(0.01)


def test_revoke_drops_that_device_alone_within_a_second(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory(*AUTO)
    victim, bystander = provision_device(sb), provision_device(sb)
    [broker_before] = sb.mosquitto_processes()
    with operator_probe(sb) as watcher:
        assert watcher.subscribe(device_topic(bystander)) == [1]
        victim_probe = device_probe(sb, victim)
        steady = device_probe(sb, bystander)
        sender = SteadySender(steady, device_topic(bystander))
        try:
            sender.start()
            time.sleep(0.5)
            with sb.admin_http() as http:
                sent = time.monotonic()
                answer = http.post(f"/admin/things/{victim.client_id}/revoke")
                answered = time.monotonic()
            assert answer.status_code == 200, answer.text
            assert victim_probe.disconnected.wait(1.0)
            dropped_after = time.monotonic() - sent
            time.sleep(0.5)
            sender.halt.set()
            sender.join(10)
            assert not steady.disconnected.is_set()
            assert sender.failures == []
        finally:
            victim_probe.client.loop_stop()
            steady.close()
        # Counted by the independent subscriber: every acknowledged message arrived,
        # including those sent while the revocation ran.
        acked = [index for _t, index in sender.acked]
        during = [index for t, index in sender.acked if sent <= t <= answered + 0.5]
        arrived: set[int] = set()
        deadline = time.monotonic() + 10
        while not set(acked) <= arrived and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                arrived.add(int(watcher.messages.get(timeout=0.2).payload))
    assert dropped_after < 1.0
    assert during, "the bystander sent nothing while the revocation ran"
    assert set(acked) <= arrived, sorted(set(acked) - arrived)[:10]
    assert sb.mosquitto_processes()[0].pid == broker_before.pid  # no broker restart
    # refused from now on, however often it tries
    for _attempt in range(3):
        assert refused(sb.mqtt_port, _ca(sb), victim.cert_path, victim.key_path) is not None
    with device_probe(sb, bystander) as dev:
        assert dev.publish(device_topic(bystander)) == 0


def test_revoke_command(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory(*AUTO)
    victim, bystander = provision_device(sb), provision_device(sb)
    probe = device_probe(sb, victim)
    other = device_probe(sb, bystander)
    try:
        result = revoke(sb.data_dir, victim.client_id)
        assert result.returncode == 0, result.stderr
        assert victim.client_id in result.stdout
        assert probe.disconnected.wait(5)
        assert not other.disconnected.is_set()
        assert other.publish(device_topic(bystander)) == 0
    finally:
        probe.client.loop_stop()
        other.close()
    assert refused(sb.mqtt_port, _ca(sb), victim.cert_path, victim.key_path) is not None
    # what operations.md shows: the operator reads the plugin with mosquitto_ctrl
    ctrl = subprocess.run(
        [
            "mosquitto_ctrl",
            *("-h", "localhost", "-p", str(sb.info["platform_mqtt_port"])),
            *("--cafile", _ca(sb), "--cert", sb.info["operator_cert"]),
            *("--key", sb.info["operator_key"], "dynsec", "getClient", victim.client_id),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ctrl.returncode == 0, ctrl.stderr
    assert "Disabled: true" in ctrl.stdout
    again = revoke(sb.data_dir, victim.client_id)
    assert again.returncode == 0
    assert "already" in again.stdout
    unknown = revoke(sb.data_dir, "iotref-00000000000000000000")
    assert unknown.returncode != 0


def test_revoke_without_a_running_sandbox(tmp_path: Path) -> None:
    result = revoke(tmp_path / "nothing-here", "iotref-00000000000000000000")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "no sandbox is running" in result.stderr


def test_killed_mosquitto_is_restarted_with_its_policies(
    sandbox_factory: SandboxFactory,
) -> None:
    sb = sandbox_factory(*AUTO)
    device, revoked = provision_device(sb), provision_device(sb)
    assert revoke(sb.data_dir, revoked.client_id).returncode == 0
    [old] = sb.mosquitto_processes()
    old.send_signal(signal.SIGKILL)
    old.wait(5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        current = sb.mosquitto_processes()
        if (
            current
            and current[0].pid != old.pid
            and refused(sb.mqtt_port, _ca(sb), device.cert_path, device.key_path) is None
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"mosquitto was not restarted:\n{sb.output()}")
    assert "exited unexpectedly" in sb.output()
    with device_probe(sb, device) as dev:
        assert dev.publish(device_topic(device)) == 0
        assert dev.publish(f"{TELEMETRY_TOPIC}/other-org/{device.client_id}") == 0x87
        assert dev.publish(f"$aws/things/{revoked.client_id}/shadow/get") == 0x87
    assert refused(sb.mqtt_port, _ca(sb), revoked.cert_path, revoked.key_path) is not None


def test_restarted_sandbox_keeps_devices(sandbox_factory: SandboxFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "kept"
    first = sandbox_factory(*AUTO, data_dir=data_dir)
    device = provision_device(first, directory=tmp_path / "devices")
    ca_before = Path(first.info["ca_file"]).read_bytes()
    first.stop()
    assert not any(p.name() == "mosquitto" for p in first._descendants if _alive(p))
    second = sandbox_factory(*AUTO, data_dir=data_dir)
    assert Path(second.info["ca_file"]).read_bytes() == ca_before
    with device_probe(second, device) as dev:
        assert dev.publish(device_topic(device)) < 0x80
    fresh = provision_device(second, directory=tmp_path / "devices")
    assert refused(second.mqtt_port, _ca(second), fresh.cert_path, fresh.key_path) is None


def test_no_mosquitto_left_after_stop(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory(*AUTO)
    [proc] = sb.mosquitto_processes()
    assert sb.stop() == 0
    assert not _alive(proc)


def test_mosquitto_dies_with_a_killed_sandbox(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory(*AUTO)
    [proc] = sb.mosquitto_processes()
    assert sb.proc is not None
    os.kill(sb.proc.pid, signal.SIGKILL)
    sb.proc.wait(10)
    proc.wait(10)
    assert not _alive(proc)


def _alive(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
