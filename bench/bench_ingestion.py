"""Telemetry ingestion throughput: how many messages per second the sandbox's monitor
receives, validates and stores, against the raw broker throughput to a plain subscriber
measured in the same run.

Both phases use the same publishers: several TLS connections pushing pre-built QoS 1
PUBLISH packets as fast as the broker acknowledges them (no client library in the way).

* raw: operator connections publish to ``bench/raw/N`` (a topic the ingestion does not
  subscribe to); a plain subscriber in this process only splits packets and acknowledges.
  Figure: messages/s delivered to it.
* ingestion: provisioned devices publish valid messages to their own telemetry topics;
  the figure is messages/s from the first publish until the monitor's API counts all of
  them (received, stored, no duplicates), and whether every one was counted.

``IOTREF_BENCH_INGEST_MESSAGES`` (default 100,000) and ``IOTREF_BENCH_PUBLISHERS``
(default 4) change the size.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import BenchContext, Figure
from iotref.device.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
    to_json,
)
from iotref.sandbox.broker_config import TELEMETRY_TOPIC
from iotref.sandbox.ingestion import publish_packet, split_packets

MESSAGES = int(os.environ.get("IOTREF_BENCH_INGEST_MESSAGES", "100000"))
PUBLISHERS = int(os.environ.get("IOTREF_BENCH_PUBLISHERS", "4"))
WINDOW = 4000  # unacknowledged messages per publisher
CHUNK = 200  # packets per write


def _tls(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def _connect_311(client_id: str) -> bytes:
    raw = client_id.encode()
    body = (
        b"\x00\x04MQTT\x04\x02\x00\x3c" + len(raw).to_bytes(2, "big") + raw
    )  # MQTT 3.1.1, clean session, keepalive 60
    return b"\x10" + bytes([len(body)]) + body


def _read_connack(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        split = split_packets(data, mqtt5=False)
        if split.others:
            first, body = split.others[0]
            if first >> 4 != 2 or len(body) < 2 or (body[-1] != 0 and body[1] != 0):
                raise RuntimeError(f"connection refused: {body!r}")
            return data[split.consumed :]
        more = sock.recv(4096)
        if not more:
            raise RuntimeError("connection closed before CONNACK")
        data += more


@dataclass
class Outcome:
    sent: int = 0
    acked: int = 0
    seconds: float = 0.0
    error: str | None = None


def blast(
    port: int,
    tls: ssl.SSLContext,
    client_id: str,
    packets: list[bytes],
    outcome: Outcome,
    start: threading.Event | None = None,
) -> None:
    """Publish pre-built MQTT 3.1.1 QoS 1 packets and wait for every PUBACK."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with tls.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(_connect_311(client_id))
            pending = _read_connack(sock)
            if start is not None:
                start.wait()
            began = time.perf_counter()
            total = len(packets)
            index = 0
            while outcome.acked < total:
                can_send = index < total and index - outcome.acked < WINDOW
                if can_send:
                    sock.sendall(b"".join(packets[index : index + CHUNK]))
                    index = min(total, index + CHUNK)
                    outcome.sent = index
                wait = 0.0 if can_send else 30.0
                if sock.pending() or select.select([sock], [], [], wait)[0]:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise RuntimeError("the broker closed the connection")
                    pending += data
                    split = split_packets(pending, mqtt5=False)
                    pending = pending[split.consumed :]
                    outcome.acked += sum(1 for first, _ in split.others if first >> 4 == 4)
                elif not can_send:
                    raise RuntimeError("no PUBACK for 30 s")
            outcome.seconds = time.perf_counter() - began
            sock.sendall(b"\xe0\x00")
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"


def publish_all(
    port: int, jobs: list[tuple[ssl.SSLContext, str, list[bytes]]], timeout: float = 300
) -> tuple[list[Outcome], float]:
    """Run one publisher thread per job, started together; (outcomes, wall seconds)."""
    start = threading.Event()
    outcomes = [Outcome() for _ in jobs]
    threads = [
        threading.Thread(target=blast, args=(port, tls, cid, packets, out, start), daemon=True)
        for (tls, cid, packets), out in zip(jobs, outcomes, strict=True)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # let them connect
    began = time.perf_counter()
    start.set()
    for thread in threads:
        thread.join(timeout)
    return outcomes, time.perf_counter() - began


def packets_for(topic: str, payloads: list[bytes]) -> list[bytes]:
    return [
        publish_packet(topic, payload, 1, index % 65535 + 1, mqtt5=False)
        for index, payload in enumerate(payloads)
    ]


def device_messages(count: int, name: str) -> list[bytes]:
    sender = Sender(SenderType.PRESS, f"bench-{name}", "1.0")
    asset = Asset(f"press-{name}", f"SN-{name}", AssetType.SHEETFED_PRESS)
    out = []
    for i in range(count):
        payload = StatusV2(
            status=DeviceStatusV2.PRODUCTION,
            speed=float(10000 + i % 5000),
            totalproductioncounter=float(1_000_000 + i),
            productioncounter=float(i),
        )
        out.append(to_json(build_message(sender, asset, payload)))
    return out


class PlainSubscriber:
    """``mosquitto_sub`` (C, MQTT 5, Receive Maximum 65535, QoS 1) printing one byte per
    message; a thread counts them. No parsing, no storing: the broker's delivery rate."""

    def __init__(self, port: int, info: dict[str, Any], topic_filter: str) -> None:
        cmd = [
            "mosquitto_sub",
            "-h", "127.0.0.1", "-p", str(port), "--insecure",
            "--cafile", str(info["ca_file"]),
            "--cert", str(info["operator_cert"]), "--key", str(info["operator_key"]),
            "-i", f"bench-plain-{os.getpid()}",
            "-V", "mqttv5", "-D", "CONNECT", "receive-maximum", "65535",
            "-q", "1", "-t", topic_filter, "-F", ".", "-N",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.count = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            data = self.proc.stdout.read1(1 << 16)
            if not data:
                return
            now = time.perf_counter()
            if not self.count:
                self.first_at = now
            self.count += len(data)
            self.last_at = now

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _monitor_totals(http: httpx.Client) -> dict[str, Any]:
    answer = http.get("/monitor/api/summary")
    answer.raise_for_status()
    totals: dict[str, Any] = answer.json()["totals"]
    return totals


def _wait_counted(http: httpx.Client, target: int, timeout: float) -> tuple[dict[str, Any], float]:
    deadline = time.perf_counter() + timeout
    while True:
        totals = _monitor_totals(http)
        now = time.perf_counter()
        if totals["received"] >= target or now > deadline:
            return totals, now
        time.sleep(0.05)


def run(ctx: BenchContext) -> list[Figure]:
    from tests.support.tokens import provision_device

    sandbox = ctx.sandbox()
    info = sandbox.info
    ca = info["ca_file"]
    per = max(1, MESSAGES // PUBLISHERS)
    total = per * PUBLISHERS
    figures: list[Figure] = []

    # raw: operator connections -> broker -> plain subscriber
    operator = _tls(ca, info["operator_cert"], info["operator_key"])
    plain = PlainSubscriber(int(info["platform_mqtt_port"]), info, "bench/raw/#")
    time.sleep(1.0)  # connected and subscribed
    sample = device_messages(per, "raw")
    raw_jobs = [
        (operator, f"bench-raw-{i}", packets_for(f"bench/raw/{i}", sample))
        for i in range(PUBLISHERS)
    ]
    outcomes, _ = publish_all(int(info["platform_mqtt_port"]), raw_jobs)
    deadline = time.monotonic() + 60
    while plain.count < total and time.monotonic() < deadline:
        time.sleep(0.02)
    plain.close()
    errors = [o.error for o in outcomes if o.error]
    if errors:
        raise RuntimeError(f"raw publishers failed: {errors}")
    raw_seconds = plain.last_at - min(plain.first_at, plain.last_at) or 1e-9
    raw_rate = plain.count / raw_seconds
    figures.append(
        Figure(
            "ingestion.raw_broker_to_plain_subscriber",
            raw_rate,
            "msg/s",
            f"{plain.count}/{total} delivered, {PUBLISHERS} publishers, QoS 1, TLS",
        )
    )

    # ingestion: devices -> broker -> monitor (parse, validate, dedup, SQLite)
    devices = [provision_device(sandbox) for _ in range(PUBLISHERS)]
    jobs = []
    for index, device in enumerate(devices):
        topic = f"{TELEMETRY_TOPIC}/{device.org_id}/{device.client_id}"
        payloads = device_messages(per, str(index))
        tls = _tls(ca, device.cert_path, device.key_path)
        jobs.append((tls, device.client_id, packets_for(topic, payloads)))
    with httpx.Client(
        base_url=sandbox.http_url,
        headers={"Authorization": f"Bearer {sandbox.admin_token}"},
        timeout=10,
    ) as http:
        before = _monitor_totals(http)
        began = time.perf_counter()
        outcomes, publish_seconds = publish_all(sandbox.mqtt_port, jobs)
        errors = [o.error for o in outcomes if o.error]
        if errors:
            raise RuntimeError(f"device publishers failed: {errors}")
        totals, counted_at = _wait_counted(http, before["received"] + total, 120)
    received = totals["received"] - before["received"]
    stored = totals["stored"] - before["stored"]
    duplicates = totals["duplicates"] - before["duplicates"]
    invalid = totals["invalid"] - before["invalid"]
    seconds = counted_at - began
    rate = received / seconds
    figures += [
        Figure(
            "ingestion.monitor_stored_per_second",
            rate,
            "msg/s",
            f"{received}/{total} counted, {stored} stored, {duplicates} duplicates, "
            f"{invalid} invalid, {PUBLISHERS} devices; publishers done in "
            f"{publish_seconds:.2f} s, all counted after {seconds:.2f} s",
        ),
        Figure("ingestion.monitor_vs_raw", rate / raw_rate, "ratio", "monitor / plain subscriber"),
        Figure(
            "ingestion.all_counted", 1.0 if received == total and stored == total else 0.0, "bool"
        ),
    ]
    return figures


if __name__ == "__main__":
    context = BenchContext()
    try:
        for fig in run(context):
            print(f"{fig.name:<45} {fig.value:>12.4g} {fig.unit}  {fig.note}")
    finally:
        context.close()
