"""What one device publishes, as the platform receives it: an independent subscriber (paho,
the sandbox operator's identity) stamps the arrival of every publish of the device, its
telemetry and its shadow requests (both count against the per-connection quota), and
:func:`count_windows` counts them in one-second windows, as the platform's quota does.
Shared by the integration test of the device's pacing and the drain benchmark."""

from __future__ import annotations

import bisect
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.counted_messages import index_of

SHADOW_REQUESTS = ("get", "update", "delete")


@dataclass(frozen=True)
class Arrival:
    at: float
    """``time.time()`` when the subscriber received it."""
    topic: str
    index: int | None
    """The counted message's index (telemetry), else ``None``."""


class ArrivalRecorder:
    """Subscribes (QoS 1) to ``telemetry_topic`` and to the request topics of the thing's
    classic and named shadows, and records every publish with its arrival time."""

    def __init__(self, info: dict[str, Any], client_id: str, telemetry_topic: str) -> None:
        self.telemetry_topic = telemetry_topic
        self.arrivals: list[Arrival] = []
        self._seen: set[int] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        topics = [telemetry_topic]
        for request in SHADOW_REQUESTS:
            topics.append(f"$aws/things/{client_id}/shadow/{request}")
            topics.append(f"$aws/things/{client_id}/shadow/name/+/{request}")
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"arrivals-{uuid.uuid4().hex[:10]}",
            protocol=paho.MQTTv311,
        )
        context = ssl.create_default_context(cafile=info["ca_file"])
        context.load_cert_chain(info["operator_cert"], info["operator_key"])
        client.tls_set_context(context)
        client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        self.client = client
        client.connect(info["mqtt_host"], int(info["mqtt_port"]), keepalive=30)
        client.loop_start()
        if not self._subscribed.wait(20):
            self.close()
            raise AssertionError("the arrival recorder did not get its SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        at = time.time()  # first: the stamp is the arrival, not the parsing
        index = index_of(json.loads(msg.payload)) if msg.topic == self.telemetry_topic else None
        with self._lock:
            self.arrivals.append(Arrival(at, msg.topic, index))
            if index is not None:
                self._seen.add(index)

    def snapshot(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)

    def telemetry_indices(self) -> list[int]:
        """The counted messages' indices, in arrival order (duplicates included)."""
        return [a.index for a in self.snapshot() if a.index is not None]

    def wait_for(self, expected: set[int], timeout: float) -> list[int]:
        """Until every index of ``expected`` arrived; the indices in arrival order. Checks
        twice a second, cheaply, so as not to hold up the subscriber's thread (its arrival
        times are the measurement)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                complete = len(self._seen) >= len(expected) and expected <= self._seen
            if complete:
                return self.telemetry_indices()
            if time.monotonic() > deadline:
                missing = sorted(expected - set(self.telemetry_indices()))
                raise AssertionError(f"{len(missing)} never arrived, e.g. {missing[:20]}")
            time.sleep(0.5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> ArrivalRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Windows:
    """Publishes counted in one-second windows."""

    publishes: int
    span_s: float
    """From the first arrival to the last."""
    rate: float
    """Publishes a second over the span (``(publishes - 1) / span_s``)."""
    busiest_second: int
    """The most publishes in one wall-clock second (``int(time)``), as the platform's meter
    counts its one-second windows."""
    seconds_over: int
    """Wall-clock seconds with more publishes than the quota."""
    busiest_sliding_second: int
    """The most publishes in any one-second interval, wherever it starts."""


def count_windows(times: list[float], quota: int) -> Windows:
    ordered = sorted(times)
    per_second: dict[int, int] = {}
    for t in ordered:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    sliding = max(
        (bisect.bisect_right(ordered, t + 1.0) - i for i, t in enumerate(ordered)), default=0
    )
    span = ordered[-1] - ordered[0] if len(ordered) > 1 else 0.0
    return Windows(
        publishes=len(ordered),
        span_s=span,
        rate=(len(ordered) - 1) / span if span > 0 else 0.0,
        busiest_second=max(per_second.values(), default=0),
        seconds_over=sum(1 for n in per_second.values() if n > quota),
        busiest_sliding_second=sliding,
    )
