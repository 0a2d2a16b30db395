"""Telemetry throughput over the sandbox broker (mutual TLS, QoS 1, ~1 KB status messages).

In one run, one device identity, one client at a time, each measurement in a fresh Python
process of its own (see :func:`isolated`):

(a) raw paho-mqtt publishing prepared payloads, pipelined (up to ``WINDOW`` unacked);
(b) raw awscrt MQTT 5, the same, as an application using awscrt directly runs it;
(b') the same with the thread-state fix that the library applies to its own awscrt
    callbacks (:mod:`iotref.device.thread_state`: without it CPython builds and destroys a
    thread state for every PUBACK callback on awscrt's thread), to show what the full
    path's own work costs against raw awscrt on equal terms (``c/b'``);
(c) the full path at its documented high rate: build the messages, and hand them over with
    ``Telemetry.send_many()``, ``SEND_MANY`` at a time, which validates and serializes each
    and commits them to the durable outbox in one transaction before it returns; then
    publish through :class:`iotref.device.connection.connection.Connection`, PUBACK, delete;
(c') the same full path with one ``await send()`` after the other, so that every message
    is its own commit (reported on its own, ``telemetry.full_path_sequential``);
(c'') (c) with the connection publishing through awscrt's public ``Client.publish`` instead
    of its native entry point (:mod:`iotref.device.connection.native_publish`), patched in
    that child process only: what the native publish is worth (c/c'').

The prepared payloads of (a) and (b) are distinct messages (each its own
``sendereventuuid``), as the full path's are: the sandbox's ingestion, which runs on the
same machine and receives all of them, stores a new message but only counts a duplicate,
so the same payload sent 20,000 times would leave the raw clients more of the machine.

Also the full path with ``durability="power"`` (an fsync per commit), with one sender and
with ``SENDERS`` tasks sending at once, whose sends then share commits.

Figures: messages per second of each (median of ``ROUNDS``), the ratios c/a and c/b (and
c'/b); the drain rate of a 100,000-message backlog after a reconnect; the cost of one outbox
append with ``durability="process"`` and ``"power"`` (and ``"power"`` in batches of 100);
and where the sequential full path's CPU time goes per message (no network).

The full path runs with the connection's publish pacing turned off (``UNPACED``:
``publish_rate_limit=None``; by default a device stays under the platform's 100 publishes a
second per connection): these figures measure the path's own cost. Draining a backlog at
the quota, as shipped, is ``bench_drain``'s figure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import ssl
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from awscrt import io, mqtt5
from paho.mqtt.enums import CallbackAPIVersion
from tests.support.device_connection import UNPACED, device_settings
from tests.support.device_keys import DeviceFiles
from tests.support.tokens import provision_device

from bench.harness import BenchContext, Figure
from iotref.device.connection import publishes
from iotref.device.connection.connection import Connection
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
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_records import Durability, OutboxEntry
from iotref.device.telemetry.permission import PermissionFlag
from iotref.device.telemetry.publisher import Telemetry
from iotref.device.thread_state import keep_thread_state
from iotref.protocol.message_schemas import MessageValidator
from iotref.protocol.topics import telemetry_topic
from iotref.sandbox.broker.config import TELEMETRY_TOPIC

N = 20_000
ROUNDS = 3
SENDERS = 4
N_POWER = 2_000
WINDOW = 1000
BACKLOG = 100_000
DETAILS = "d" * 560  # makes the serialized message about 1 KB

SENDER = Sender(SenderType.PRESS, "bench-gateway", "1.0")
SEND_MANY = 100
"""Messages per ``send_many()`` call in (c)."""
CPU_US: dict[str, list[float]] = {
    "awscrt": [],
    "awscrt_kept": [],
    "full": [],
    "full_sequential": [],
}
"""CPU time of this process (all its threads) per message, per run."""


def isolated(name: str, *args: Any, **kwargs: Any) -> float:
    """Run the measurement ``name`` of this module in a fresh Python process and return its
    rate (its CPU figures are added to :data:`CPU_US`). Each path gets a process of its own,
    as it would in an application: nothing one path leaves behind (Python thread states on
    awscrt's threads, a grown heap for the garbage collector, warm caches) helps or slows
    the next. ``run_paho``/``run_awscrt`` get ``N`` prepared payloads made in the child."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        rate, cpu = pool.submit(_child_measure, name, args, kwargs).result()
    for key, values in cpu.items():
        CPU_US[key].extend(values)
    return rate


def _child_measure(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[float, dict[str, list[float]]]:
    if name == "run_paho":
        info, dev, topic, n = args
        rate = run_paho(info, dev, topic, prepared_payloads(n))
    elif name == "run_awscrt":
        info, dev, topic, n = args
        rate = run_awscrt(info, dev, topic, prepared_payloads(n), **kwargs)
    else:
        if not kwargs.pop("native_publish", True):
            # (c''): the connection finds no native entry point and uses the public one.
            publishes.raw_publish_function = lambda: None  # type: ignore[assignment]
        rate = asyncio.run(full_path(*args, **kwargs))
    return rate, CPU_US


def make_message(asset: Asset, i: int) -> dict[str, Any]:
    return build_message(
        SENDER,
        asset,
        StatusV2(
            status=DeviceStatusV2.PRODUCTION,
            speed=12000 + i % 100,
            totalproductioncounter=i,
            productioncounter=i,
            statusdetails=DETAILS,
        ),
    )


# --------------------------------------------------------------------------- (a) paho


def run_paho(info: dict[str, Any], dev: DeviceFiles, topic: str, payloads: list[bytes]) -> float:
    n = len(payloads)
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=dev.client_id,
        protocol=paho.MQTTv311,
    )
    context = ssl.create_default_context(cafile=info["ca_file"])
    context.load_cert_chain(str(dev.cert_path), str(dev.key_path))
    client.tls_set_context(context)
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    slots = threading.Semaphore(WINDOW)
    done = threading.Event()
    acked = [0]
    connected = threading.Event()

    def on_connect(*_: Any) -> None:
        connected.set()

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        slots.release()
        if acked[0] == n:
            done.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(info["mqtt_host"], info["mqtt_port"], keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("paho: no CONNACK")
        started = time.perf_counter()
        for payload in payloads:
            slots.acquire()
            client.publish(topic, payload, qos=1)
        if not done.wait(120):
            raise RuntimeError(f"paho: only {acked[0]} of {n} acked")
        return n / (time.perf_counter() - started)
    finally:
        client.disconnect()
        client.loop_stop()


# --------------------------------------------------------------------------- (b) awscrt


def run_awscrt(
    info: dict[str, Any],
    dev: DeviceFiles,
    topic: str,
    payloads: list[bytes],
    keep_state: bool = False,
) -> float:
    """(b), or with ``keep_state`` (b'): the same with the thread-state fix the library
    applies to its own awscrt callbacks (:mod:`iotref.device.thread_state`)."""
    n = len(payloads)
    tls = io.TlsContextOptions.create_client_with_mtls_from_path(
        str(dev.cert_path), str(dev.key_path)
    )
    tls.override_default_trust_store_from_path(None, info["ca_file"])
    connected: concurrent.futures.Future[None] = concurrent.futures.Future()
    stopped = threading.Event()

    def on_success(_: Any) -> None:
        if not connected.done():
            connected.set_result(None)

    client = mqtt5.Client(
        mqtt5.ClientOptions(
            host_name=info["mqtt_host"],
            port=info["mqtt_port"],
            connect_options=mqtt5.ConnectPacket(
                client_id=dev.client_id, keep_alive_interval_sec=30
            ),
            tls_ctx=io.ClientTlsContext(tls),
            on_lifecycle_event_connection_success_fn=on_success,
            on_lifecycle_event_stopped_fn=lambda _: stopped.set(),
        )
    )
    client.start()
    try:
        connected.result(10)
        slots = threading.Semaphore(WINDOW)
        done = threading.Event()
        acked = [0]
        lock = threading.Lock()

        def on_done(_: Any) -> None:
            if keep_state:
                keep_thread_state()
            with lock:
                acked[0] += 1
                last = acked[0] == n
            slots.release()
            if last:
                done.set()

        packets = [
            mqtt5.PublishPacket(topic=topic, payload=p, qos=mqtt5.QoS.AT_LEAST_ONCE)
            for p in payloads
        ]
        cpu = time.process_time()
        started = time.perf_counter()
        for packet in packets:
            slots.acquire()
            client.publish(packet).add_done_callback(on_done)
        if not done.wait(120):
            raise RuntimeError(f"awscrt: only {acked[0]} of {n} acked")
        CPU_US["awscrt_kept" if keep_state else "awscrt"].append(
            (time.process_time() - cpu) / n * 1e6
        )
        return n / (time.perf_counter() - started)
    finally:
        client.stop()
        stopped.wait(10)


# --------------------------------------------------------------------------- (c) full path


def prepared_payloads(n: int) -> list[bytes]:
    """``n`` distinct serialized messages for the raw peers, built before the clock starts.
    Distinct like the full path's (each its own ``sendereventuuid``): the sandbox's
    ingestion, on the same machine, stores a new message but only counts a duplicate."""
    asset = Asset("bench-press", "SN-1", AssetType.SHEETFED_PRESS)
    return [to_json(make_message(asset, i)) for i in range(n)]


async def full_path(
    info: dict[str, Any],
    dev: DeviceFiles,
    topic: str,
    n: int,
    db: Path,
    senders: int = 1,
    durability: Durability = "process",
    batch: int = 1,
    cpu_key: str | None = None,
) -> float:
    """(c) with ``senders`` tasks, each with its own asset, sending ``n / senders``: one
    ``await send()`` after the other, or with ``batch > 1`` ``await send_many()`` of
    ``batch`` messages at a time (one commit per call). Every message is built, validated,
    committed, published and acknowledged either way."""
    with Outbox(db, max_messages=max(n, 100_000), durability=durability) as outbox:
        async with Connection(device_settings(info, dev, **UNPACED)) as conn:
            await conn.wait_connected(10)
            tel = Telemetry(
                conn, outbox, topic, MessageValidator(), PermissionFlag(True), window=WINDOW
            )
            await tel.start()

            async def send(k: int, count: int) -> None:
                asset = Asset(f"bench-press-{k}", f"SN-{k}", AssetType.SHEETFED_PRESS)
                if batch == 1:
                    for i in range(count):
                        await tel.send(make_message(asset, i))
                    return
                for first in range(0, count, batch):
                    last = min(count, first + batch)
                    await tel.send_many([make_message(asset, i) for i in range(first, last)])

            cpu = time.process_time()
            started = time.perf_counter()
            if senders == 1:
                await send(0, n)
            else:
                await asyncio.gather(*(send(k, n // senders) for k in range(senders)))
            # Until all acknowledged; ``depth`` (which writes the buffered deletions) only
            # once nothing is in flight any more.
            while tel.in_flight or outbox.depth:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            rate = n / (time.perf_counter() - started)
            if cpu_key is not None:
                CPU_US[cpu_key].append((time.process_time() - cpu) / n * 1e6)
            await tel.close()
            return rate


async def drain_backlog(info: dict[str, Any], dev: DeviceFiles, topic: str, db: Path) -> float:
    """Messages per second to empty a backlog of ``BACKLOG`` stored while offline, from
    the moment the connection is up."""
    asset = Asset("bench-press", "SN-1", AssetType.SHEETFED_PRESS)
    with Outbox(db, max_messages=BACKLOG * 2) as outbox:
        chunk = [OutboxEntry(topic, to_json(make_message(asset, i)), None) for i in range(1000)]
        for _ in range(BACKLOG // len(chunk)):
            outbox.append_many(chunk)
        assert outbox.depth == BACKLOG
        conn = Connection(device_settings(info, dev, **UNPACED))
        tel = Telemetry(conn, outbox, topic, MessageValidator(), PermissionFlag(True))
        await tel.start()  # registered before the connection comes up
        async with conn:
            await conn.wait_connected(10)
            started = time.perf_counter()
            while outbox.depth:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            rate = BACKLOG / (time.perf_counter() - started)
            await tel.close()
            return rate


# --------------------------------------------------------------------------- local costs


def append_cost_us(workdir: Path, durability: str, n: int, batch: int = 1) -> float:
    payload = b"x" * 1024
    path = workdir / f"append-{durability}-{batch}.sqlite3"
    with Outbox(path, durability=durability) as ob:  # type: ignore[arg-type]
        entries = [OutboxEntry("t/o/c", payload, "id")] * batch
        started = time.perf_counter()
        for _ in range(n // batch):
            if batch == 1:
                ob.append("t/o/c", payload, "id")
            else:
                ob.append_many(entries)
        return (time.perf_counter() - started) / n * 1e6


def cpu_breakdown_us(workdir: Path, n: int = 20_000, repeats: int = 3) -> dict[str, float]:
    """CPU time per message of each step, the best of ``repeats`` passes (the first pass
    also pays for the process growing its heap, and the machine is shared)."""
    validator = MessageValidator()
    best: dict[str, float] = {}

    def note(step: str, started: float) -> None:
        us = (time.process_time() - started) / n * 1e6
        best[step] = min(us, best.get(step, us))

    for r in range(repeats):
        asset = Asset("bench-press", "SN-1", AssetType.SHEETFED_PRESS)
        t = time.process_time()
        messages = [make_message(asset, i) for i in range(n)]
        note("build", t)
        t = time.process_time()
        for m in messages:
            validator.validate_or_raise(m)
        note("validate", t)
        t = time.process_time()
        payloads = [to_json(m) for m in messages]
        note("serialize", t)
        with Outbox(workdir / f"breakdown-{r}.sqlite3") as ob:
            t = time.process_time()
            seqs = [ob.append("t/o/c", p).seq for p in payloads]
            note("append", t)
            t = time.process_time()
            after = 0
            while batch := ob.read_batch(after, 256):
                after = batch[-1].seq
            for s in seqs:
                ob.ack(s)
            ob.flush_acks()
            note("read_and_delete", t)
    return best


# --------------------------------------------------------------------------- run


def run(ctx: BenchContext) -> list[Figure]:
    sandbox = ctx.sandbox()
    info = dict(sandbox.info)
    dev = provision_device(sandbox, directory=ctx.workdir / "telemetry-device")
    topic = telemetry_topic(TELEMETRY_TOPIC, dev.org_id, dev.client_id)
    asset = Asset("bench-press", "SN-1", AssetType.SHEETFED_PRESS)
    payload = to_json(make_message(asset, 0))
    size = len(payload)

    rates: dict[str, list[float]] = {
        "paho": [],
        "awscrt": [],
        "awscrt_kept": [],
        "full": [],
        "sequential": [],
        "public_publish": [],
    }
    for r in range(ROUNDS):  # interleaved, so that drifts of the machine hit all of them
        rates["paho"].append(isolated("run_paho", info, dev, topic, N))
        rates["awscrt"].append(isolated("run_awscrt", info, dev, topic, N))
        rates["awscrt_kept"].append(isolated("run_awscrt", info, dev, topic, N, keep_state=True))
        db = ctx.workdir / f"telemetry-full-{r}.sqlite3"
        rates["full"].append(
            isolated("full_path", info, dev, topic, N, db, batch=SEND_MANY, cpu_key="full")
        )
        db = ctx.workdir / f"telemetry-sequential-{r}.sqlite3"
        rates["sequential"].append(
            isolated("full_path", info, dev, topic, N, db, cpu_key="full_sequential")
        )
        db = ctx.workdir / f"telemetry-public-publish-{r}.sqlite3"
        rates["public_publish"].append(
            isolated("full_path", info, dev, topic, N, db, batch=SEND_MANY, native_publish=False)
        )
    a, b, c, s = (statistics.median(rates[k]) for k in ("paho", "awscrt", "full", "sequential"))
    b_kept = statistics.median(rates["awscrt_kept"])
    c_public = statistics.median(rates["public_publish"])
    power_rates = {
        senders: asyncio.run(
            full_path(
                info,
                dev,
                topic,
                N_POWER,
                ctx.workdir / f"telemetry-power-{senders}.sqlite3",
                senders=senders,
                durability="power",
            )
        )
        for senders in (1, SENDERS)
    }
    drain = asyncio.run(drain_backlog(info, dev, topic, ctx.workdir / "telemetry-backlog.sqlite3"))
    normal = append_cost_us(ctx.workdir, "process", 20_000)
    power = append_cost_us(ctx.workdir, "power", 500)
    power_batched = append_cost_us(ctx.workdir, "power", 5_000, batch=100)
    cpu = cpu_breakdown_us(ctx.workdir)

    note = (
        f"{N} msgs of {size} B, QoS 1, mTLS, window {WINDOW}, median of {ROUNDS}, "
        "publishes not paced (limiter off)"
    )
    spread = {k: f"{min(v):.0f}..{max(v):.0f}" for k, v in rates.items()}
    figures = [
        Figure("telemetry.raw_paho", a, "msg/s", f"{note}; runs {spread['paho']}"),
        Figure("telemetry.raw_awscrt", b, "msg/s", f"{note}; runs {spread['awscrt']}"),
        Figure(
            "telemetry.raw_awscrt_kept_thread_state",
            b_kept,
            "msg/s",
            f"(b') raw awscrt with the library's thread-state fix; {note}; "
            f"runs {spread['awscrt_kept']}",
        ),
        Figure(
            "telemetry.full_path",
            c,
            "msg/s",
            f"{note}; build+validate+outbox+publish+ack+delete, send_many() of {SEND_MANY} "
            f"(one commit per call); runs {spread['full']}",
        ),
        Figure(
            "telemetry.full_path_sequential",
            s,
            "msg/s",
            f"{note}; the same, one await send() after the other (one commit per message); "
            f"runs {spread['sequential']}",
        ),
        Figure(
            "telemetry.full_path_public_publish",
            c_public,
            "msg/s",
            f"(c'') the full path through awscrt's public Client.publish instead of its native "
            f"entry point; {note}; runs {spread['public_publish']}",
        ),
        Figure(
            "telemetry.native_publish_gain",
            c / c_public,
            "ratio",
            "c/c'': the full path with the native publish over the same with the public one "
            "(kept while > 1.10)",
        ),
        Figure("telemetry.full_vs_paho", c / a, "ratio", "c/a"),
        Figure("telemetry.full_vs_awscrt", c / b, "ratio", "c/b (goal >= 1.0)"),
        Figure(
            "telemetry.full_vs_awscrt_kept_thread_state",
            c / b_kept,
            "ratio",
            "c/b': what the full path's own work costs against raw awscrt given the same fix",
        ),
        Figure(
            "telemetry.full_sequential_vs_awscrt",
            s / b,
            "ratio",
            "sequential send() / raw awscrt",
        ),
        Figure(
            "telemetry.full_path_power",
            power_rates[1],
            "msg/s",
            f"{N_POWER} msgs, the full path with durability=power (fsync per commit), one sender",
        ),
        Figure(
            f"telemetry.full_path_power_{SENDERS}_senders",
            power_rates[SENDERS],
            "msg/s",
            f"{N_POWER} msgs, durability=power, {SENDERS} tasks sending at once "
            "(their sends share commits)",
        ),
        Figure(
            "telemetry.backlog_drain",
            drain,
            "msg/s",
            f"{BACKLOG} stored messages, from connected to outbox empty; limiter off",
        ),
        Figure(
            "telemetry.outbox_append.process",
            normal,
            "us/msg",
            "synchronous=NORMAL (survives SIGKILL), 1 KB",
        ),
        Figure(
            "telemetry.outbox_append.power",
            power,
            "us/msg",
            "synchronous=FULL (survives power loss), one fsync per append",
        ),
        Figure(
            "telemetry.outbox_append.power_batch100",
            power_batched,
            "us/msg",
            "synchronous=FULL, append_many of 100",
        ),
    ]
    figures += [
        Figure(
            f"telemetry.process_cpu.{k}",
            statistics.median(v),
            "us/msg",
            "CPU of the sending process (all threads) per message, over the broker",
        )
        for k, v in CPU_US.items()
    ]
    figures += [
        Figure(f"telemetry.cpu.{k}", v, "us/msg", "full path, per message, no network, CPU time")
        for k, v in cpu.items()
    ]
    return figures
