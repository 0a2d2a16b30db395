"""Small blocking MQTT-over-TLS probes (paho-mqtt, MQTT 5) for tests of the broker:
connect with a certificate (as a device or as the operator), subscribe and look at SUBACK
reason codes, publish and wait for PUBACK, collect messages, and ``mosquitto_sub`` as the
operator would run it."""

from __future__ import annotations

import queue
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from iotref.protocol.topics import telemetry_topic
from iotref.sandbox.broker.config import TELEMETRY_TOPIC

if TYPE_CHECKING:
    from tests.support.device_keys import DeviceFiles
    from tests.support.sandbox_process import SandboxProcess


class ConnectRefused(Exception):
    """TLS or MQTT refused the connection (the reason is the message)."""


@dataclass
class Received:
    topic: str
    payload: bytes


class Probe:
    """One connected MQTT client; use as a context manager."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.messages: queue.Queue[Received] = queue.Queue()
        self._suback: dict[int, list[ReasonCode]] = {}
        self._puback: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self.disconnected = threading.Event()
        self.disconnect_reason: Any = None
        self.connack_properties: Any = None
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload)))

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        with self._cond:
            self._suback[mid] = list(codes)
            self._cond.notify_all()

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, code: ReasonCode, props: Any
    ) -> None:
        with self._cond:
            self._puback[mid] = code
            self._cond.notify_all()

    def subscribe(self, *topics: str, qos: int = 1, timeout: float = 5) -> list[int]:
        """Subscribe and return the SUBACK reason codes as ints (0-2 granted, >= 0x80 not)."""
        result, mid = self.client.subscribe([(t, qos) for t in topics])
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        assert mid is not None
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._suback, timeout):
                raise TimeoutError(f"no SUBACK for {topics}")
            return [code.value for code in self._suback.pop(mid)]

    def publish(
        self, topic: str, payload: bytes | str = b"{}", qos: int = 1, timeout: float = 5
    ) -> int:
        """Publish and wait for PUBACK (QoS 1); return its reason code as an int."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0:
            return 0
        mid = info.mid
        assert mid is not None
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._puback, timeout):
                raise TimeoutError(f"no PUBACK for {topic}")
            return int(self._puback.pop(mid).value)

    def wait_for(self, topic: str | Collection[str], timeout: float = 5) -> Received:
        """The next message on ``topic`` (or on any of several; others are dropped)."""
        wanted = {topic} if isinstance(topic, str) else set(topic)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message on {sorted(wanted)}")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if msg.topic in wanted:
                return msg

    def drain(self) -> list[Received]:
        """The messages that arrived and were not taken yet."""
        found = []
        while True:
            try:
                found.append(self.messages.get_nowait())
            except queue.Empty:
                return found

    def received_on(self, topic: str, within: float = 1.0) -> list[Received]:
        """Messages on ``topic`` that arrive within ``within`` seconds."""
        deadline = time.monotonic() + within
        found: list[Received] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if msg.topic == topic:
                found.append(msg)
        return found


def connect(
    port: int,
    ca_file: str | Path,
    cert: str | Path | None,
    key: str | Path | None,
    *,
    host: str = "127.0.0.1",
    client_id: str | None = None,
    clean_start: bool = True,
    keepalive: int = 30,
    timeout: float = 5,
) -> Probe:
    """Connect over TLS with a client certificate; raise :class:`ConnectRefused` if the
    TLS handshake, the client-certificate check or the CONNACK fails."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"probe-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5,
    )
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    client.tls_set_context(context)
    probe = Probe(client)
    connected = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(c: Any, userdata: Any, flags: Any, code: ReasonCode, props: Any) -> None:
        outcome["code"] = code
        probe.connack_properties = props
        connected.set()

    def on_disconnect(c: Any, userdata: Any, flags: Any, code: Any, props: Any) -> None:
        outcome.setdefault("disconnect", code)
        probe.disconnect_reason = code
        probe.disconnected.set()
        connected.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean_start else 3600
    try:
        client.connect(host, port, keepalive=keepalive, clean_start=clean_start, properties=props)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectRefused(f"connect failed: {exc}") from exc
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise ConnectRefused("no CONNACK")
    code = outcome.get("code")
    if code is None or code.is_failure:
        client.loop_stop()
        raise ConnectRefused(f"refused: {code or outcome.get('disconnect')}")
    # With TLS 1.3 the server checks the client certificate after the client's handshake
    # is done; a refused certificate shows up as an immediate disconnect.
    if probe.disconnected.wait(0.2):
        client.loop_stop()
        raise ConnectRefused(f"dropped after CONNACK: {probe.disconnect_reason}")
    return probe


def refused(
    port: int, ca_file: str | Path, cert: str | Path | None, key: str | Path | None, **kwargs: Any
) -> str | None:
    """The reason a connection is refused, or ``None`` if it was accepted (and closed)."""
    try:
        probe = connect(port, ca_file, cert, key, **kwargs)
    except ConnectRefused as exc:
        return str(exc)
    probe.close()
    return None


class MosquittoSub:
    """``mosquitto_sub`` as a subprocess, printing ``topic payload`` lines."""

    def __init__(
        self,
        port: int,
        ca_file: str | Path,
        cert: str | Path,
        key: str | Path,
        topics: list[str],
        host: str = "localhost",
    ) -> None:
        cmd = [
            "stdbuf",
            "-oL",
            "mosquitto_sub",
            "-h",
            host,
            "-p",
            str(port),
            "--cafile",
            str(ca_file),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "-v",
            "-q",
            "1",
            "-d",
        ]
        for topic in topics:
            cmd += ["-t", topic]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, predicate: Any, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line)
            if predicate(line):
                return line
        raise TimeoutError(f"mosquitto_sub printed no matching line; got {seen[-20:]}")

    def wait_subscribed(self, timeout: float = 10) -> None:
        self.wait_line(lambda line: "received suback" in line.lower(), timeout)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> MosquittoSub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def device_probe(sandbox: SandboxProcess, device: DeviceFiles, **kwargs: Any) -> Probe:
    """A probe connected as ``device`` (its certificate and client id) to the sandbox's
    device listener; ``kwargs`` go to :func:`connect`."""
    kwargs.setdefault("client_id", device.client_id)
    return connect(
        sandbox.mqtt_port, sandbox.info["ca_file"], device.cert_path, device.key_path, **kwargs
    )


def operator_probe(sandbox: SandboxProcess) -> Probe:
    """A probe with the operator identity on the sandbox's platform listener (the device
    listener allows one connection per identity, which ``mosquitto_sub`` tests use)."""
    return connect(
        int(sandbox.info["platform_mqtt_port"]),
        sandbox.info["ca_file"],
        sandbox.info["operator_cert"],
        sandbox.info["operator_key"],
    )


def device_topic(device: DeviceFiles) -> str:
    """The telemetry topic ``device`` publishes on."""
    return telemetry_topic(TELEMETRY_TOPIC, device.org_id, device.client_id)
