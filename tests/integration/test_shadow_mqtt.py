"""The shadow service over MQTT with a provisioned device (real sandbox, real Mosquitto):
tables of requests and the exact responses, classic and named shadows alike; limits and
malformed payloads answered on ``/rejected`` while the service keeps running; ordering;
provisioning's ``sendTelemetryData``; REST updates seen over MQTT; broker restarts."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import mqtt_probe
from tests.support.pacing import Pacer
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

TS = "<timestamp>"
OPS = ("get", "update", "delete")
RESPONSES = (
    "get/accepted",
    "get/rejected",
    "update/accepted",
    "update/rejected",
    "update/delta",
    "update/documents",
    "delete/accepted",
    "delete/rejected",
)


def prefix(thing: str, shadow: str | None) -> str:
    base = f"$aws/things/{thing}/shadow"
    return base if shadow is None else f"{base}/name/{shadow}"


def normalize(value: Any) -> Any:
    """Replace every ``timestamp`` with ``TS`` after checking it is a recent epoch second."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "timestamp" and isinstance(item, int) and not isinstance(item, bool):
                assert abs(item - time.time()) < 60, item
                out[key] = TS
            else:
                out[key] = normalize(item)
        return out
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


class ShadowDevice:
    """A connected device that sends shadow requests and collects the responses; its
    requests stay within the per-thing quota (:meth:`send`)."""

    def __init__(self, sandbox: SandboxProcess) -> None:
        self.sandbox = sandbox
        self.files = provision_device(sandbox)
        self.thing = self.files.client_id
        self.probe = self._connect()
        self.subscribed: set[str | None] = set()
        self.pacer = Pacer()

    def send(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        """Publish a shadow request, paced within the thing's requests a second."""
        self.pacer.wait()
        return self.probe.publish(topic, payload, qos=qos)

    def _connect(self) -> mqtt_probe.Probe:
        return mqtt_probe.device_probe(self.sandbox, self.files)

    def reconnect(self, timeout: float = 30) -> None:
        self.probe.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.probe = self._connect()
                break
            except mqtt_probe.ConnectRefused:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        shadows, self.subscribed = self.subscribed, set()
        for shadow in shadows:
            self.subscribe(shadow)

    def subscribe(self, shadow: str | None) -> None:
        if shadow in self.subscribed:
            return
        base = prefix(self.thing, shadow)
        codes = self.probe.subscribe(*(f"{base}/{r}" for r in RESPONSES))
        assert all(code <= 2 for code in codes), codes
        self.subscribed.add(shadow)

    def drain(self) -> list[mqtt_probe.Received]:
        return self.probe.drain()

    def wait(self, topics: set[str], timeout: float = 10) -> mqtt_probe.Received:
        return self.probe.wait_for(topics, timeout)

    def request(
        self, op: str, payload: Any = b"", shadow: str | None = None, timeout: float = 10
    ) -> dict[str, Any]:
        """Send one request; return ``{suffix: normalized body}`` of every response to it
        (``accepted`` or ``rejected``, plus ``delta`` and ``documents`` for updates)."""
        self.subscribe(shadow)
        self.drain()
        base = prefix(self.thing, shadow)
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send(f"{base}/{op}", raw)
        first = self.wait({f"{base}/{op}/accepted", f"{base}/{op}/rejected"}, timeout)
        answers = {first.topic[len(base) + 1 :]: normalize(json.loads(first.payload))}
        if first.topic.endswith("update/accepted"):
            while True:
                msg = self.wait({f"{base}/update/delta", f"{base}/update/documents"}, timeout)
                answers[msg.topic[len(base) + 1 :]] = normalize(json.loads(msg.payload))
                if msg.topic.endswith("/documents"):
                    break
        return answers

    def close(self) -> None:
        self.probe.close()


@pytest.fixture(scope="module")
def device(sandbox: SandboxProcess) -> Iterator[ShadowDevice]:
    dev = ShadowDevice(sandbox)
    yield dev
    dev.close()


def table(name: str, base: int) -> list[tuple[str, Any, dict[str, Any]]]:
    """(operation, request, exact responses) for a shadow called ``name`` whose first
    version will be ``base + 1``."""
    v = base
    lights_meta = {"on": {"timestamp": TS}, "level": {"timestamp": TS}}
    return [
        (
            "get",
            {"clientToken": "t0"},
            {
                "get/rejected": {
                    "code": 404,
                    "message": f"No shadow exists with name: '{name}'",
                    "timestamp": TS,
                    "clientToken": "t0",
                }
            },
        ),
        (
            "update",
            {
                "state": {"desired": {"color": "red", "lights": {"on": True, "level": 3}}},
                "clientToken": "t1",
            },
            {
                "update/accepted": {
                    "state": {"desired": {"color": "red", "lights": {"on": True, "level": 3}}},
                    "metadata": {"desired": {"color": {"timestamp": TS}, "lights": lights_meta}},
                    "version": v + 1,
                    "timestamp": TS,
                    "clientToken": "t1",
                },
                "update/delta": {
                    "version": v + 1,
                    "timestamp": TS,
                    "state": {"color": "red", "lights": {"on": True, "level": 3}},
                    "metadata": {"color": {"timestamp": TS}, "lights": lights_meta},
                    "clientToken": "t1",
                },
                "update/documents": {
                    "previous": None,
                    "current": {
                        "state": {"desired": {"color": "red", "lights": {"on": True, "level": 3}}},
                        "metadata": {
                            "desired": {"color": {"timestamp": TS}, "lights": lights_meta}
                        },
                        "version": v + 1,
                    },
                    "timestamp": TS,
                    "clientToken": "t1",
                },
            },
        ),
        (
            "update",
            {"state": {"reported": {"color": "red", "lights": {"on": True, "level": 1}}}},
            {
                "update/accepted": {
                    "state": {"reported": {"color": "red", "lights": {"on": True, "level": 1}}},
                    "metadata": {"reported": {"color": {"timestamp": TS}, "lights": lights_meta}},
                    "version": v + 2,
                    "timestamp": TS,
                },
                "update/delta": {
                    "version": v + 2,
                    "timestamp": TS,
                    "state": {"lights": {"level": 3}},
                    "metadata": {"lights": {"level": {"timestamp": TS}}},
                },
                "update/documents": {
                    "previous": {
                        "state": {"desired": {"color": "red", "lights": {"on": True, "level": 3}}},
                        "metadata": {
                            "desired": {"color": {"timestamp": TS}, "lights": lights_meta}
                        },
                        "version": v + 1,
                    },
                    "current": {
                        "state": {
                            "desired": {"color": "red", "lights": {"on": True, "level": 3}},
                            "reported": {"color": "red", "lights": {"on": True, "level": 1}},
                        },
                        "metadata": {
                            "desired": {"color": {"timestamp": TS}, "lights": lights_meta},
                            "reported": {"color": {"timestamp": TS}, "lights": lights_meta},
                        },
                        "version": v + 2,
                    },
                    "timestamp": TS,
                },
            },
        ),
        (
            "update",
            {"state": {"desired": {"lights": {"level": None}}}, "clientToken": "t3"},
            {
                "update/accepted": {
                    "state": {"desired": {"lights": {"level": None}}},
                    "metadata": {"desired": {"lights": {"level": {"timestamp": TS}}}},
                    "version": v + 3,
                    "timestamp": TS,
                    "clientToken": "t3",
                },
                "update/documents": {
                    "previous": {
                        "state": {
                            "desired": {"color": "red", "lights": {"on": True, "level": 3}},
                            "reported": {"color": "red", "lights": {"on": True, "level": 1}},
                        },
                        "metadata": {
                            "desired": {"color": {"timestamp": TS}, "lights": lights_meta},
                            "reported": {"color": {"timestamp": TS}, "lights": lights_meta},
                        },
                        "version": v + 2,
                    },
                    "current": {
                        "state": {
                            "desired": {"color": "red", "lights": {"on": True}},
                            "reported": {"color": "red", "lights": {"on": True, "level": 1}},
                        },
                        "metadata": {
                            "desired": {
                                "color": {"timestamp": TS},
                                "lights": {"on": {"timestamp": TS}},
                            },
                            "reported": {"color": {"timestamp": TS}, "lights": lights_meta},
                        },
                        "version": v + 3,
                    },
                    "timestamp": TS,
                    "clientToken": "t3",
                },
            },
        ),
        (
            "update",
            {"state": {"desired": {"color": "blue"}}, "version": v + 1, "clientToken": "t4"},
            {
                "update/rejected": {
                    "code": 409,
                    "message": "Version conflict",
                    "timestamp": TS,
                    "clientToken": "t4",
                }
            },
        ),
        (
            "update",
            {"state": {"desired": {"seq": [3, 2, 1]}}, "version": v + 3},
            {
                "update/accepted": {
                    "state": {"desired": {"seq": [3, 2, 1]}},
                    "metadata": {"desired": {"seq": [{"timestamp": TS}] * 3}},
                    "version": v + 4,
                    "timestamp": TS,
                },
                "update/delta": {
                    "version": v + 4,
                    "timestamp": TS,
                    "state": {"seq": [3, 2, 1]},
                    "metadata": {"seq": [{"timestamp": TS}] * 3},
                },
                "update/documents": None,
            },
        ),
        (
            "get",
            b"",
            {
                "get/accepted": {
                    "state": {
                        "desired": {"color": "red", "lights": {"on": True}, "seq": [3, 2, 1]},
                        "reported": {"color": "red", "lights": {"on": True, "level": 1}},
                        "delta": {"seq": [3, 2, 1]},
                    },
                    "metadata": {
                        "desired": {
                            "color": {"timestamp": TS},
                            "lights": {"on": {"timestamp": TS}},
                            "seq": [{"timestamp": TS}] * 3,
                        },
                        "reported": {"color": {"timestamp": TS}, "lights": lights_meta},
                    },
                    "version": v + 4,
                    "timestamp": TS,
                }
            },
        ),
        (
            "update",
            {"state": {"desired": None}, "clientToken": "t7"},
            {
                "update/accepted": {
                    "state": {"desired": None},
                    "metadata": {"desired": {"timestamp": TS}},
                    "version": v + 5,
                    "timestamp": TS,
                    "clientToken": "t7",
                },
                "update/documents": None,
            },
        ),
        (
            "delete",
            {"clientToken": "t8"},
            {"delete/accepted": {"version": v + 5, "timestamp": TS, "clientToken": "t8"}},
        ),
        (
            "delete",
            b"",
            {
                "delete/rejected": {
                    "code": 404,
                    "message": f"No shadow exists with name: '{name}'",
                    "timestamp": TS,
                }
            },
        ),
        (
            "update",
            {"state": {"reported": {"back": 1}}},
            {
                "update/accepted": {
                    "state": {"reported": {"back": 1}},
                    "metadata": {"reported": {"back": {"timestamp": TS}}},
                    "version": v + 6,
                    "timestamp": TS,
                },
                "update/documents": {
                    "previous": None,
                    "current": {
                        "state": {"reported": {"back": 1}},
                        "metadata": {"reported": {"back": {"timestamp": TS}}},
                        "version": v + 6,
                    },
                    "timestamp": TS,
                },
            },
        ),
    ]


def run_table(device: ShadowDevice, shadow: str | None, base: int) -> None:
    name = device.thing if shadow is None else shadow
    for number, (op, payload, expected) in enumerate(table(name, base)):
        got = device.request(op, payload, shadow)
        assert set(got) == set(expected), (number, got)
        for topic, body in expected.items():
            if body is not None:
                assert got[topic] == body, (number, topic)


def test_named_shadow_table(device: ShadowDevice) -> None:
    run_table(device, f"cfg-{uuid.uuid4().hex[:8]}", base=0)


def test_classic_shadow_table(sandbox: SandboxProcess) -> None:
    dev = ShadowDevice(sandbox)
    try:
        got = dev.request("get")
        assert got["get/accepted"]["state"]["desired"] == {"sendTelemetryData": True}
        assert dev.request("delete")["delete/accepted"]["version"] == 1
        run_table(dev, None, base=1)
    finally:
        dev.close()


def test_provisioning_sets_send_telemetry(sandbox: SandboxProcess) -> None:
    dev = ShadowDevice(sandbox)
    try:
        got = dev.request("get", {"clientToken": "p"})
        assert got == {
            "get/accepted": {
                "state": {
                    "desired": {"sendTelemetryData": True},
                    "delta": {"sendTelemetryData": True},
                },
                "metadata": {"desired": {"sendTelemetryData": {"timestamp": TS}}},
                "version": 1,
                "timestamp": TS,
                "clientToken": "p",
            }
        }
        reported = dev.request("update", {"state": {"reported": {"sendTelemetryData": True}}})
        assert "update/delta" not in reported
    finally:
        dev.close()


MALFORMED = [
    (b"not json", 400, "Invalid JSON"),
    (b"", 400, "Invalid JSON"),
    (b"[]", 400, "Invalid JSON"),
    (
        b'{"state": {"desired": {"a": "\xff\xfe"}}}',
        415,
        "Unsupported documented encoding; supported encoding is UTF-8",
    ),
    (b"\x00\x01\x02", 400, "Invalid JSON"),
    (b'{"a":' * 5000, 400, "JSON contains too many levels of nesting; maximum is 6"),
    ({"clientToken": "m"}, 400, "Missing required node: state"),
    ({"state": 5}, 400, "State node must be an object"),
    ({"state": {"desired": [1]}}, 400, "Desired node must be an object"),
    ({"state": {"reported": "x"}}, 400, "Reported node must be an object"),
    ({"state": {"other": {}}}, 400, "State contains an invalid node"),
    ({"state": {"desired": {}}, "version": "3"}, 400, "Invalid version"),
    ({"state": {"desired": {}}, "clientToken": "k" * 65}, 400, "Invalid clientToken"),
    (
        {"state": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}},
        400,
        "JSON contains too many levels of nesting; maximum is 6",
    ),
    (
        {"state": {"reported": {"blob": "x" * 9000}}},
        413,
        "The payload exceeds the maximum size allowed",
    ),
    (
        {"state": {"reported": {"blob": "x" * 100_000}}},
        413,
        "The payload exceeds the maximum size allowed",
    ),
]


@pytest.mark.parametrize(("payload", "code", "message"), MALFORMED)
def test_malformed_updates_are_rejected(
    device: ShadowDevice, payload: Any, code: int, message: str
) -> None:
    got = device.request("update", payload, "limits")
    body = got["update/rejected"]
    assert (body["code"], body["message"]) == (code, message)
    assert set(body) <= {"code", "message", "timestamp", "clientToken"}


def test_limits_at_the_edge_are_accepted(device: ShadowDevice) -> None:
    six = {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}
    got = device.request("update", {"state": {"desired": six}, "clientToken": "k" * 64}, "edge")
    assert got["update/accepted"]["clientToken"] == "k" * 64
    got = device.request("update", {"state": {"reported": {"blob": "x" * 8000}}}, "edge")
    assert "update/accepted" in got


def test_service_survives_garbage(device: ShadowDevice) -> None:
    base = prefix(device.thing, "garbage")
    device.subscribe("garbage")
    for i in range(100):
        payload = os.urandom(i * 37 % 700)
        device.send(f"{base}/{('update', 'get', 'delete')[i % 3]}", payload, qos=0)
    got = device.request("update", {"state": {"reported": {"alive": True}}}, "still-alive")
    assert got["update/accepted"]["state"] == {"reported": {"alive": True}}


def test_requests_of_one_shadow_are_processed_in_order(device: ShadowDevice) -> None:
    shadow = f"order-{uuid.uuid4().hex[:6]}"
    device.subscribe(shadow)
    device.drain()
    base = prefix(device.thing, shadow)
    count = 60
    for i in range(count):
        device.send(
            f"{base}/update",
            json.dumps({"state": {"reported": {"n": i}}, "clientToken": str(i)}),
            qos=1,
        )
    seen = []
    while len(seen) < count:
        msg = device.wait({f"{base}/update/accepted"}, timeout=20)
        body = json.loads(msg.payload)
        seen.append((body["clientToken"], body["version"], body["state"]["reported"]["n"]))
    assert [s[0] for s in seen] == [str(i) for i in range(count)]
    assert [s[1] for s in seen] == list(range(1, count + 1))
    got = device.request("get", b"", shadow)
    assert got["get/accepted"]["state"]["reported"] == {"n": count - 1}


def test_messages_of_each_update_arrive_in_order(device: ShadowDevice) -> None:
    """The service hands an update's messages to the broker back to back without waiting
    for each PUBACK: they still arrive as accepted, delta, documents, update after update."""
    shadow = f"burst-{uuid.uuid4().hex[:6]}"
    device.subscribe(shadow)
    device.drain()
    base = prefix(device.thing, shadow)
    count = 30
    for i in range(count):
        device.send(f"{base}/update", json.dumps({"state": {"desired": {"n": i}}}), qos=1)
    topics = {f"{base}/update/{suffix}" for suffix in ("accepted", "delta", "documents")}
    seen = []
    while len(seen) < 3 * count:
        msg = device.wait(topics, timeout=20)
        body = json.loads(msg.payload)
        version = body["current"]["version"] if "current" in body else body["version"]
        seen.append((msg.topic.rsplit("/", 1)[1], version))
    assert seen == [
        (suffix, version)
        for version in range(1, count + 1)
        for suffix in ("accepted", "delta", "documents")
    ]


def test_rest_update_reaches_the_device(sandbox: SandboxProcess, device: ShadowDevice) -> None:
    shadow = "from-rest"
    device.subscribe(shadow)
    device.drain()
    response = httpx.post(
        f"{sandbox.http_url}/things/{device.thing}/shadow",
        params={"name": shadow},
        json={"state": {"desired": {"speed": 7}}, "clientToken": "op"},
        headers=sandbox.admin_headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    base = prefix(device.thing, shadow)
    accepted = device.wait({f"{base}/update/accepted"})
    assert json.loads(accepted.payload) == response.json()
    delta = json.loads(device.wait({f"{base}/update/delta"}).payload)
    assert delta["state"] == {"speed": 7}
    assert delta["clientToken"] == "op"
    documents = json.loads(device.wait({f"{base}/update/documents"}).payload)
    assert documents["current"]["state"] == {"desired": {"speed": 7}}


@pytest.mark.slow
def test_service_reconnects_after_broker_restart(sandbox_factory: Any) -> None:
    sandbox = sandbox_factory("--auto-approve", "--poll-interval", "1")
    dev = ShadowDevice(sandbox)
    try:
        assert "update/accepted" in dev.request("update", {"state": {"reported": {"n": 1}}})
        old = sandbox.mosquitto()
        old.send_signal(signal.SIGKILL)
        old.wait(10)
        sandbox.wait_mosquitto_restarted(old)
        dev.reconnect()
        deadline = time.monotonic() + 30
        while True:
            try:
                got = dev.request("get", b"", timeout=2)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "the shadow service did not come back"
        assert got["get/accepted"]["state"]["reported"] == {"n": 1}
        assert got["get/accepted"]["version"] == 2
    finally:
        dev.close()
