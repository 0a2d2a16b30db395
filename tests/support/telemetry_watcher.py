"""An independent subscriber that counts what the platform delivers: paho with the sandbox
operator's identity, outside the library under test. It records every telemetry message in
arrival order, comes back quickly after a broker restart and subscribes again, and
:meth:`~TelemetryWatcher.attach` moves it to a restarted sandbox."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from tests.support.counted_messages import index_of


@dataclass(frozen=True)
class Arrival:
    """One delivery: its topic, the message's asset, running index (``None`` if it has
    none) and ``sendereventuuid``."""

    topic: str
    assetid: str
    index: int | None
    uuid: str


class TelemetryWatcher:
    """Subscribes to ``topic`` (every device's telemetry unless told) with ``qos``.

    QoS 0 (the default) means Mosquitto's per-client queue limit cannot drop anything while
    the watcher catches up. With ``keep_messages`` the parsed messages are kept too
    (:attr:`messages`, :meth:`of`); without, only what :class:`Arrival` holds."""

    def __init__(
        self, topic: str = f"{TELEMETRY_TOPIC}/#", *, qos: int = 0, keep_messages: bool = False
    ) -> None:
        self.topic = topic
        self.qos = qos
        self.keep_messages = keep_messages
        self.arrivals: list[Arrival] = []
        self.messages: list[tuple[str, dict[str, Any]]] = []
        """``(topic, message)`` of every delivery, with ``keep_messages``."""
        self.subscriptions = 0
        """SUBACKs so far: one more after each (re)connect."""
        self._lock = threading.Condition()
        self._client: paho.Client | None = None

    def attach(
        self,
        info: Mapping[str, Any],
        *,
        listener: Literal["platform", "device"] = "platform",
        timeout: float = 20,
    ) -> TelemetryWatcher:
        """(Re)connect to the sandbox described by ``info`` (its ``sandbox.json``), on its
        platform or its device listener, and wait for the SUBACK."""
        self.detach()
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"watcher-{uuid.uuid4().hex[:10]}",
            protocol=paho.MQTTv311,
        )
        context = ssl.create_default_context(cafile=info["ca_file"])
        context.load_cert_chain(info["operator_cert"], info["operator_key"])
        client.tls_set_context(context)
        client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]
        client.on_connect = lambda c, *_: c.subscribe(self.topic, qos=self.qos)
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        port = info["platform_mqtt_port"] if listener == "platform" else info["mqtt_port"]
        before = self.subscriptions
        client.connect(info["mqtt_host"], int(port), keepalive=10)
        client.loop_start()
        self._client = client
        self.wait_subscribed(before + 1, timeout)
        return self

    def detach(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    close = detach

    def __enter__(self) -> TelemetryWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _on_subscribe(self, *_: Any) -> None:
        with self._lock:
            self.subscriptions += 1
            self._lock.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        message = json.loads(msg.payload)
        try:
            index: int | None = index_of(message)
        except (KeyError, TypeError, ValueError):
            index = None
        arrival = Arrival(
            msg.topic, str(message.get("assetid")), index, str(message.get("sendereventuuid"))
        )
        with self._lock:
            self.arrivals.append(arrival)
            if self.keep_messages:
                self.messages.append((msg.topic, message))

    def wait_subscribed(self, count: int = 1, timeout: float = 20) -> None:
        """Until ``count`` SUBACKs have come (one per connection so far)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.subscriptions >= count, timeout):
                raise AssertionError(f"watcher not subscribed ({self.subscriptions})")

    def snapshot(self) -> list[tuple[str, int | None, str]]:
        """``(assetid, index, sendereventuuid)`` of every delivery so far."""
        with self._lock:
            return [(a.assetid, a.index, a.uuid) for a in self.arrivals]

    def of(self, asset_id: str) -> list[tuple[str, dict[str, Any]]]:
        """``(topic, message)`` of the deliveries of ``asset_id`` (with ``keep_messages``)."""
        assert self.keep_messages, "messages are kept only with keep_messages=True"
        with self._lock:
            return [(t, m) for t, m in self.messages if m.get("assetid") == asset_id]

    def indices(self, asset_id: str) -> list[int]:
        """The running indices of the deliveries of ``asset_id``, in arrival order."""
        with self._lock:
            return [a.index for a in self.arrivals if a.assetid == asset_id and a.index is not None]

    def wait_for(self, asset_id: str, expected: set[int], timeout: float = 20) -> list[int]:
        """Until every index of ``expected`` has arrived for ``asset_id``; returns all of
        its indices (duplicates included)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.indices(asset_id)
            if expected <= set(got):
                return got
            time.sleep(0.05)
        missing = sorted(expected - set(self.indices(asset_id)))
        raise AssertionError(f"{len(missing)} never arrived, e.g. {missing[:20]}")
