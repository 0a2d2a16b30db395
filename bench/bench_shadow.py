"""Shadow round trip against raw MQTT, measured in the same run through the same broker.

Shadow round trip: an operator's desired change over the sandbox's REST API
(``POST /things/{thing}/shadow``) until the device (iotref Connection + ShadowSync) has
applied it and the new reported state is visible over REST. The operator learns that the
shadow service has stored the device's report from the service's own announcement, the
``update/accepted`` message it publishes after storing an update (the operator subscribes
to it over MQTT, as an AWS IoT application may), and then confirms with one
``GET /things/{thing}/shadow`` that must show the new ``reported.seq`` (polled again if
not: the clock stops only when REST shows it). Polling REST in a tight loop instead would
measure mostly the polling, which shares the sandbox's one event loop with the service
that has to store the report.

The operator is its own party: its REST calls go over one keep-alive connection of the
standard library's ``http.client`` on a thread of its own (the device's asyncio loop keeps
running meanwhile, as it would on a real device). httpx's async client, used before, cost
about 0.6 ms per request on this machine by itself, more than the sandbox takes to answer
(about 0.2 ms), and two such requests were half of the measured round trip.

Raw MQTT round trip: the operator publishes to a topic the device subscribes to, the
device's handler publishes an answer, the operator receives it: the same two broker hops
between the same two parties, over the same client library and at the same QoS as the
shadow traffic, without the shadow service, HTTP or SQLite.

The two are measured in five alternating blocks (200 raw round trips, 200 shadow changes,
and again), not one phase after the other: on a shared machine a burst of other work then
falls into both, and the ratio of the two p99s compares like with like.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID
from tests.support.device_connection import UNPACED, device_settings
from tests.support.mqtt_probe import device_topic
from tests.support.tokens import provision_device

from bench.harness import BenchContext, Figure, percentile
from iotref.device import stdlib_compat
from iotref.device.connection.connection import Connection
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import IncomingMessage
from iotref.device.shadow.requests import SHADOW_QOS
from iotref.device.shadow.sync import ShadowSync

CHANGES = 1000
RAW_ROUNDS = 1000
WARMUP = 20
BLOCKS = 5  # raw and shadow measured in alternating blocks of 200


class OperatorRest:
    """The operator's REST client: one keep-alive ``http.client`` connection, used from a
    thread of its own so that the asyncio loop (the device) runs meanwhile."""

    def __init__(self, base_url: str, token: str) -> None:
        parts = urlsplit(base_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._conn = http.client.HTTPConnection(self._host, self._port, timeout=10)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="operator-rest")

    def _call(self, method: str, path: str, body: bytes | None) -> Any:
        for attempt in range(2):
            try:
                self._conn.request(method, path, body, self._headers)
                response = self._conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                # The server closed the idle keep-alive connection: connect again, once.
                self._conn.close()
                if attempt:
                    raise
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
        return json.loads(data)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        raw = None if body is None else json.dumps(body).encode()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._call, method, path, raw)

    def close(self) -> None:
        self._thread.shutdown()
        self._conn.close()


def _common_name(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


UNLIMITED = ("--shadow-rate-limit", "0", "--shadow-in-flight-limit", "0")
"""A thousand back-to-back changes of one shadow are about 3,000 shadow requests of one
thing a second, far over AWS's 20: this measures latency, on a sandbox without the limit."""
# The device's and the operator's connections do not pace their publishes either
# (``UNPACED``): back-to-back round trips exceed the per-connection quota (100 a second).


async def _measure(ctx: BenchContext) -> dict[str, list[float]]:
    sandbox = ctx.sandbox(*UNLIMITED)
    dev = provision_device(sandbox)
    ca = Path(sandbox.info["ca_file"])
    host = str(sandbox.info["mqtt_host"])
    operator_cert = Path(sandbox.info["operator_cert"])
    operator_settings = ConnectionSettings(
        endpoint=host,
        port=sandbox.mqtt_port,
        client_id=_common_name(operator_cert),
        cert_path=operator_cert,
        key_path=Path(sandbox.info["operator_key"]),
        ca_path=ca,
        **UNPACED,
    )
    out: dict[str, list[float]] = {"shadow": [], "applied": [], "raw": []}
    rest = OperatorRest(sandbox.http_url, sandbox.admin_token)
    url = f"/things/{dev.client_id}/shadow"
    try:
        async with (
            Connection(device_settings(sandbox.info, dev, **UNPACED)) as device,
            Connection(operator_settings) as operator,
            ShadowSync(device, dev.client_id) as sync,
        ):
            # ---- raw MQTT: operator -> device -> operator
            ping = f"$aws/things/{dev.client_id}/shadow/name/bench/update/delta"
            pong = device_topic(dev)
            answers: asyncio.Queue[bytes] = asyncio.Queue()

            def echo(msg: IncomingMessage) -> None:
                device.publish_nowait(pong, msg.payload, SHADOW_QOS)

            # At the QoS the shadow sync uses for requests, answers and deltas.
            await device.subscribe(ping, echo, qos=SHADOW_QOS)
            await operator.subscribe(pong, lambda m: answers.put_nowait(m.payload), qos=SHADOW_QOS)

            async def raw_round(i: int) -> float:
                body = str(i).encode()
                started = time.perf_counter()
                await operator.publish(ping, body, SHADOW_QOS)
                while (await answers.get()) != body:
                    pass
                return time.perf_counter() - started

            # ---- shadow: REST desired change -> device applies -> reported visible in REST
            stored: asyncio.Queue[object] = asyncio.Queue()

            def on_accepted(msg: IncomingMessage) -> None:
                state = json.loads(msg.payload).get("state", {})
                if "reported" in state:
                    stored.put_nowait((state["reported"] or {}).get("seq"))

            await operator.subscribe(
                f"$aws/things/{dev.client_id}/shadow/update/accepted", on_accepted, qos=SHADOW_QOS
            )

            async def shadow_round(i: int) -> tuple[float, float]:
                started = time.perf_counter()
                await rest.call("POST", url, {"state": {"desired": {"seq": i}}})
                await sync.wait_for("seq", i, timeout=10)
                applied = time.perf_counter()
                async with stdlib_compat.timeout(10):
                    while (await stored.get()) != i:
                        pass
                while True:
                    doc = await rest.call("GET", url)
                    if doc["state"].get("reported", {}).get("seq") == i:
                        break
                return time.perf_counter() - started, applied - started

            for i in range(WARMUP):
                await raw_round(i)
                await shadow_round(i)
            # Alternating blocks, so that both paths meet the same moments of a shared,
            # noisy machine (a burst of other work lands in both, not in one phase only).
            raw_i, change_i = WARMUP, WARMUP
            for _ in range(BLOCKS):
                for _ in range(RAW_ROUNDS // BLOCKS):
                    out["raw"].append(await raw_round(raw_i))
                    raw_i += 1
                for _ in range(CHANGES // BLOCKS):
                    roundtrip, applied = await shadow_round(change_i)
                    change_i += 1
                    out["shadow"].append(roundtrip)
                    out["applied"].append(applied)
    finally:
        rest.close()
    return out


def run(ctx: BenchContext) -> list[Figure]:
    m = asyncio.run(_measure(ctx))
    ms = 1000.0
    shadow_p50, shadow_p99 = percentile(m["shadow"], 50) * ms, percentile(m["shadow"], 99) * ms
    raw_p50, raw_p99 = percentile(m["raw"], 50) * ms, percentile(m["raw"], 99) * ms
    applied_p50 = percentile(m["applied"], 50) * ms
    note = (
        f"{CHANGES} sequential changes, in {BLOCKS} blocks alternating with the raw ones; "
        "per-thing shadow request limits off (sandbox up " + " ".join(UNLIMITED) + "), "
        "publishes not paced"
    )
    raw_note = f"{RAW_ROUNDS} op->dev->op, {BLOCKS} blocks, publishes not paced"
    return [
        Figure("shadow.roundtrip_p50", shadow_p50, "ms", f"REST change -> applied -> REST; {note}"),
        Figure("shadow.roundtrip_p99", shadow_p99, "ms", note),
        Figure("shadow.device_applied_p50", applied_p50, "ms", "REST change -> applied on device"),
        Figure("shadow.raw_mqtt_roundtrip_p50", raw_p50, "ms", raw_note),
        Figure("shadow.raw_mqtt_roundtrip_p99", raw_p99, "ms", raw_note),
        Figure(
            "shadow.roundtrip_p99_over_raw_p99",
            shadow_p99 / raw_p99,
            "x",
            "goal <= 5",
        ),
    ]
