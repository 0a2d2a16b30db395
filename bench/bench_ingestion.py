"""Telemetry ingestion throughput: how many messages per second the sandbox's monitor
receives, validates and stores, against the raw broker throughput to a plain subscriber
measured in the same run.

Both phases use the same publishers: one ``mosquitto_pub`` process per sender (the
Mosquitto project's client, C, MQTT 5, QoS 1) publishing one message per line of its
standard input as fast as the broker acknowledges them, so the publishers cost little of
the machine the sandbox runs on. Each prints every PUBACK (``-d``); they are counted.

* raw: operator connections publish to ``bench/raw/N`` (a topic the ingestion does not
  subscribe to); a plain subscriber (``mosquitto_sub``) only counts them.
  Figure: messages/s delivered to it.
* ingestion: provisioned devices publish valid messages to their own telemetry topics;
  the figure is messages/s from the first publish until the monitor's API counts all of
  them (received, stored, no duplicates), and whether every one was counted.

``IOTREF_BENCH_INGEST_MESSAGES`` (default 100,000) and ``IOTREF_BENCH_PUBLISHERS``
(default 4) change the size.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tests.support.mqtt_probe import device_topic

from bench.harness import BenchContext, Figure
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
    to_json,
)

MESSAGES = int(os.environ.get("IOTREF_BENCH_INGEST_MESSAGES", "100000"))
PUBLISHERS = int(os.environ.get("IOTREF_BENCH_PUBLISHERS", "4"))
CONNECT_TIMEOUT = 15.0


@dataclass
class Job:
    """One publisher: its identity, its topic and what it sends (one message per line)."""

    ca: str | Path
    cert: str | Path
    key: str | Path
    client_id: str
    topic: str
    payloads: list[bytes]


@dataclass
class Outcome:
    sent: int = 0
    acked: int = 0
    seconds: float = 0.0
    error: str | None = None


class Publisher:
    """``mosquitto_pub -l -d`` for one job: connected at construction, publishing once
    :meth:`publish` hands it the lines; counts PUBACKs from its debug output."""

    def __init__(self, port: int, job: Job) -> None:
        if any(b"\n" in payload for payload in job.payloads):
            raise ValueError("mosquitto_pub -l sends one message per line: no newlines")
        self.job = job
        self.outcome = Outcome()
        self.connected = threading.Event()
        self.refused: str | None = None
        # Its output is block-buffered (a pipe): the CONNACK line arrives with the first
        # publishes, so connections are seen in the broker's log (see publish_all).
        # Line buffering would cost a write per message on the machine being measured.
        cmd = [
            "mosquitto_pub",
            "-h", "127.0.0.1", "-p", str(port), "--insecure",
            "--cafile", str(job.ca), "--cert", str(job.cert), "--key", str(job.key),
            "-i", job.client_id, "-V", "mqttv5", "-q", "1", "-t", job.topic, "-l", "-d",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        rest = b""
        while True:
            data = stdout.read1(1 << 16)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            lines, rest = data[:cut], data[cut:]
            if not self.connected.is_set() and b"received CONNACK" in lines:
                if b"received CONNACK (0)" not in lines:
                    self.refused = lines.decode(errors="replace").strip()
                self.connected.set()
            self.outcome.sent += lines.count(b" sending PUBLISH ")
            self.outcome.acked += lines.count(b" received PUBACK ")
        self.connected.set()

    def publish(self) -> None:
        """Feed every line, wait until mosquitto_pub has them all acknowledged and exits."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"\n".join(self.job.payloads) + b"\n")
            self.proc.stdin.close()
        except OSError as exc:
            self.outcome.error = f"{type(exc).__name__}: {exc}"

    def wait(self, started: float, timeout: float) -> Outcome:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self._reader.join(5)
        self.outcome.seconds = time.perf_counter() - started
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        if self.outcome.error is None:
            if code is None:
                self.outcome.error = f"mosquitto_pub did not finish in {timeout:g} s"
            elif code != 0 or self.refused:
                self.outcome.error = f"mosquitto_pub exited {code}: {self.refused or stderr}"
            elif self.outcome.acked != len(self.job.payloads):
                self.outcome.error = (
                    f"{self.outcome.acked} of {len(self.job.payloads)} acknowledged"
                )
        return self.outcome

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class PublishRun:
    outcomes: list[Outcome]
    began: float  # time.perf_counter() when the publishers were handed their messages
    seconds: float  # from ``began`` until the last publisher had every PUBACK
    connect_seconds: float  # from starting the publishers until ``began``
    connected: int  # publishers the broker had seen connect before ``began``


def wait_connected(broker_log: Path, offset: int, client_ids: list[str], timeout: float) -> int:
    """Wait until Mosquitto's log (from byte ``offset``) says every client connected;
    how many did."""
    waiting = {f" as {client_id} ".encode() for client_id in client_ids}
    deadline = time.monotonic() + timeout
    with broker_log.open("rb") as log:
        log.seek(offset)
        rest = b""
        while waiting and time.monotonic() < deadline:
            data = log.read()
            if not data:
                time.sleep(0.005)
                continue
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if b"New client connected" in line:
                    waiting = {w for w in waiting if w not in line}
    return len(client_ids) - len(waiting)


def publish_all(
    port: int, jobs: list[Job], timeout: float = 300, broker_log: Path | None = None
) -> PublishRun:
    """Connect one publisher per job, start them together, wait for every PUBACK.
    With ``broker_log`` (Mosquitto's log file) they start once the broker has seen all
    connect; without, at once (their first messages then wait for the connection)."""
    publishers: list[Publisher] = []
    try:
        starting = time.perf_counter()
        offset = broker_log.stat().st_size if broker_log is not None else 0
        for job in jobs:
            publishers.append(Publisher(port, job))
        connected = 0
        if broker_log is not None:
            connected = wait_connected(
                broker_log, offset, [job.client_id for job in jobs], CONNECT_TIMEOUT
            )
        began = time.perf_counter()
        feeders = [threading.Thread(target=p.publish, daemon=True) for p in publishers]
        for feeder in feeders:
            feeder.start()
        outcomes = [p.wait(began, timeout) for p in publishers]
        for feeder in feeders:
            feeder.join(5)
        return PublishRun(outcomes, began, time.perf_counter() - began, began - starting, connected)
    finally:
        for publisher in publishers:
            publisher.close()


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
    log = sandbox.data_dir / "logs" / "mosquitto.log"

    # raw: operator connections -> broker -> plain subscriber
    plain = PlainSubscriber(int(info["platform_mqtt_port"]), info, "bench/raw/#")
    time.sleep(1.0)  # connected and subscribed
    sample = device_messages(per, "raw")
    raw_jobs = [
        Job(
            ca,
            info["operator_cert"],
            info["operator_key"],
            f"bench-raw-{i}",
            f"bench/raw/{i}",
            sample,
        )
        for i in range(PUBLISHERS)
    ]
    outcomes = publish_all(int(info["platform_mqtt_port"]), raw_jobs, broker_log=log).outcomes
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
        topic = device_topic(device)
        payloads = device_messages(per, str(index))
        jobs.append(Job(ca, device.cert_path, device.key_path, device.client_id, topic, payloads))
    with httpx.Client(
        base_url=sandbox.http_url,
        headers=sandbox.admin_headers,
        timeout=10,
    ) as http:
        before = _monitor_totals(http)
        published = publish_all(sandbox.mqtt_port, jobs, broker_log=log)
        errors = [o.error for o in published.outcomes if o.error]
        if errors:
            raise RuntimeError(f"device publishers failed: {errors}")
        totals, counted_at = _wait_counted(http, before["received"] + total, 120)
    received = totals["received"] - before["received"]
    stored = totals["stored"] - before["stored"]
    duplicates = totals["duplicates"] - before["duplicates"]
    invalid = totals["invalid"] - before["invalid"]
    seconds = counted_at - published.began
    rate = received / seconds
    figures += [
        Figure(
            "ingestion.monitor_stored_per_second",
            rate,
            "msg/s",
            f"{received}/{total} counted, {stored} stored, {duplicates} duplicates, "
            f"{invalid} invalid, {PUBLISHERS} devices; publishers done in "
            f"{published.seconds:.2f} s, all counted after {seconds:.2f} s "
            f"(from the first publish; {published.connected}/{PUBLISHERS} connected "
            f"in {published.connect_seconds:.2f} s before)",
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
