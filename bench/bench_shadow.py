"""Shadow round trip against raw MQTT, measured in the same run through the same broker.

Shadow round trip: an operator's desired change over the sandbox's REST API
(``POST /things/{thing}/shadow``) until the device (iotref Connection + ShadowSync) has
applied it and the new reported state is visible over REST (``GET``, polled).

Raw MQTT round trip: the operator publishes to a topic the device subscribes to, the
device's handler publishes an answer, the operator receives it: the same two broker hops
between the same two parties, over the same client library and at the same QoS as the
shadow traffic, without the shadow service, HTTP or SQLite.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.x509.oid import NameOID
from tests.support.tokens import provision_device

from bench.harness import BenchContext, Figure, percentile
from iotref.device.connection import Connection, ConnectionSettings, IncomingMessage
from iotref.device.shadow import SHADOW_QOS, ShadowSync
from iotref.sandbox.broker_config import TELEMETRY_TOPIC

CHANGES = 1000
RAW_ROUNDS = 1000
WARMUP = 20


def _common_name(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def _measure(ctx: BenchContext) -> dict[str, list[float]]:
    sandbox = ctx.sandbox()
    dev = provision_device(sandbox)
    ca = Path(sandbox.info["ca_file"])
    host = str(sandbox.info["mqtt_host"])
    device_settings = ConnectionSettings(
        endpoint=host,
        port=sandbox.mqtt_port,
        client_id=dev.client_id,
        cert_path=dev.cert_path,
        key_path=dev.key_path,
        ca_path=ca,
    )
    operator_cert = Path(sandbox.info["operator_cert"])
    operator_settings = ConnectionSettings(
        endpoint=host,
        port=sandbox.mqtt_port,
        client_id=_common_name(operator_cert),
        cert_path=operator_cert,
        key_path=Path(sandbox.info["operator_key"]),
        ca_path=ca,
    )
    out: dict[str, list[float]] = {"shadow": [], "applied": [], "raw": []}
    http = httpx.AsyncClient(
        base_url=sandbox.http_url,
        headers={"Authorization": f"Bearer {sandbox.admin_token}"},
        timeout=10,
    )
    url = f"/things/{dev.client_id}/shadow"
    try:
        async with (
            Connection(device_settings) as device,
            Connection(operator_settings) as operator,
            ShadowSync(device, dev.client_id) as sync,
        ):
            # ---- raw MQTT: operator -> device -> operator
            ping = f"$aws/things/{dev.client_id}/shadow/name/bench/update/delta"
            pong = f"{TELEMETRY_TOPIC}/{dev.org_id}/{dev.client_id}"
            answers: asyncio.Queue[bytes] = asyncio.Queue()

            def echo(msg: IncomingMessage) -> None:
                device.publish_nowait(pong, msg.payload, SHADOW_QOS)

            # At the QoS the shadow sync uses for requests, answers and deltas.
            await device.subscribe(ping, echo, qos=SHADOW_QOS)
            await operator.subscribe(pong, lambda m: answers.put_nowait(m.payload), qos=SHADOW_QOS)
            for i in range(WARMUP + RAW_ROUNDS):
                body = str(i).encode()
                started = time.perf_counter()
                await operator.publish(ping, body, SHADOW_QOS)
                while (await answers.get()) != body:
                    pass
                if i >= WARMUP:
                    out["raw"].append(time.perf_counter() - started)

            # ---- shadow: REST desired change -> device applies -> reported visible in REST
            for i in range(WARMUP + CHANGES):
                started = time.perf_counter()
                answer = await http.post(url, json={"state": {"desired": {"seq": i}}})
                answer.raise_for_status()
                await sync.wait_for("seq", i, timeout=10)
                applied = time.perf_counter()
                while True:
                    doc = (await http.get(url)).json()
                    if doc["state"].get("reported", {}).get("seq") == i:
                        break
                if i >= WARMUP:
                    out["shadow"].append(time.perf_counter() - started)
                    out["applied"].append(applied - started)
    finally:
        await http.aclose()
    return out


def run(ctx: BenchContext) -> list[Figure]:
    m = asyncio.run(_measure(ctx))
    ms = 1000.0
    shadow_p50, shadow_p99 = percentile(m["shadow"], 50) * ms, percentile(m["shadow"], 99) * ms
    raw_p50, raw_p99 = percentile(m["raw"], 50) * ms, percentile(m["raw"], 99) * ms
    applied_p50 = percentile(m["applied"], 50) * ms
    note = f"{CHANGES} sequential changes"
    return [
        Figure("shadow.roundtrip_p50", shadow_p50, "ms", f"REST change -> applied -> REST; {note}"),
        Figure("shadow.roundtrip_p99", shadow_p99, "ms", note),
        Figure("shadow.device_applied_p50", applied_p50, "ms", "REST change -> applied on device"),
        Figure("shadow.raw_mqtt_roundtrip_p50", raw_p50, "ms", f"{RAW_ROUNDS} op->dev->op"),
        Figure("shadow.raw_mqtt_roundtrip_p99", raw_p99, "ms", f"{RAW_ROUNDS} op->dev->op"),
        Figure(
            "shadow.roundtrip_p99_over_raw_p99",
            shadow_p99 / raw_p99,
            "x",
            "goal <= 5",
        ),
    ]
