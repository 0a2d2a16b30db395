"""Telemetry ingestion: the sandbox receives every telemetry message as the platform
would, checks it and stores it for the monitor.

How it keeps up (20,000+ messages/s on a small machine):

* The MQTT side is awscrt's MQTT 5 client (the library the device side uses): several
  connections to the broker's platform listener (mutual TLS, the platform identity), with
  a shared subscription (``$share/iotref-ingest/...``) when there is more than one, so the
  broker spreads the messages over them. Each connection asks for a Receive Maximum of
  :data:`RECEIVE_MAXIMUM` (200): enough that the broker rarely waits for an
  acknowledgement, and few enough that awscrt's queue of outgoing PUBACKs stays short
  (queueing one walks the PUBACKs already queued; with 65,535 allowed in flight that
  walk took ~40% of the receiving process's CPU in a 100,000-message burst, measured
  with ``perf``). What does not fit in flight waits in Mosquitto's per-client queue,
  which the sandbox raises to ``max_queued_messages`` 100,000
  (:data:`iotref.sandbox.broker.config.MAX_QUEUED_MESSAGES`) so a burst is not dropped.
  Fewer than 16 connections were slower again (more queued PUBACKs per connection).
* Nothing the broker accepted is missed while the ingestion is away: its connections keep
  persistent sessions (:data:`SESSION_EXPIRY_SECONDS`, client ids stable across restarts
  of the sandbox) that they rejoin on every connect, so Mosquitto queues telemetry for
  them meanwhile; and once they have subscribed, Mosquitto is told to save its database
  (event ``ingestion_subscribed``, see :mod:`iotref.sandbox.broker.supervisor`), so that a broker
  that crashes and is restarted still has the sessions before any device reconnects.
  Mosquitto 2.0 restores a plain subscription with its session, but not a shared one:
  with several connections (the default), telemetry that a crashed and restarted broker
  accepts before the ingestion has subscribed again reaches nobody. (AWS IoT Core's rules
  engine never misses a message the broker took; docs/reliability.md says how the
  scenarios keep devices out meanwhile.)
* The clients run in a small child process (:func:`receiver_process_main`) that does
  nothing else: awscrt calls back once per message on its own threads and each callback
  needs Python's GIL, so in the sandbox process, next to the threads that validate and
  store, the callbacks would wait for the GIL, awscrt would stop reading the sockets and
  Mosquitto would drop what no longer fits in its per-connection queue
  (``max_queued_messages``). The callback only appends ``(topic, payload)`` to an
  in-memory queue (:class:`Inbox`); awscrt acknowledges the message (QoS 1 PUBACK) when
  the callback returns, so an acknowledged message is at least in that queue (a crash of
  the sandbox may lose the last moment's messages). A forwarding thread sends the queue
  in batches over a pipe to the sandbox process (waiting a few milliseconds for more
  when there are only a few, so that batches are not tiny).
* awscrt's event-loop thread is not a Python thread: each callback used to create and
  destroy a Python thread state, and with it map and unmap memory (page faults, TLB
  flushes), about half of that process's CPU.
  :func:`iotref.device.thread_state.keep_thread_state` keeps one for the thread's life:
  the process's CPU in a 100,000-message burst went from ~2.1 s to ~1.1 s (``perf``).
  What is left is mostly awscrt itself (a third of it walking its queue of PUBACKs) and
  the sockets.
* There :class:`Receiver`'s thread parses (orjson, through
  :func:`iotref.protocol.message_schemas.parse_json`) and validates each message with
  the platform's schemas (:class:`iotref.protocol.message_schemas.MessageValidator`),
  checks its topic against the thing registry (org id and client id of
  ``{telemetryTopic}/{orgId}/{clientId}``; a topic that checked out is remembered; a
  message on a topic that does not is stored with its ``topic_problem`` and counted as
  invalid, whatever its body) and
  stores whatever has arrived meanwhile in ``telemetry.db`` (:mod:`telemetry_store`),
  one transaction per batch (:class:`BatchWriter`, rows inserted with one
  ``executemany``, a 32 MB page cache); duplicates (same ``sendereventuuid``) are
  recognised by the database's unique index, counted and not stored again. Checking and
  storing share one thread on purpose: as two threads they passed the GIL back and forth
  for every row and spent most of their time waiting for it. Per message this costs
  about 5 us to check and 7 us to store (from 7.5 and 9.5 us before orjson, the
  streamlined record and the store's changes); the process's CPU in a burst went from
  ~2.1 s to ~1.5 s, polled every 50 ms by the benchmark.
* Each batch also goes to the per-connection quota meter
  (:mod:`iotref.sandbox.quota_meter`) as one count of messages and bytes per client id:
  a dictionary update per message, nothing more.
* The monitor's counters (totals, per device, rates) are kept in memory as batches are
  stored, so its summary never counts rows. After each batch, only when a live stream is
  open, the new messages go to :class:`TelemetryFeed`, the in-process pub/sub of the
  monitor's live streams, on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from awscrt import io, mqtt5

from iotref.device.thread_state import keep_thread_state
from iotref.protocol.message_schemas import MessageValidator, parse_json
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.context import INGESTION_SUBSCRIBED, LOOPBACK, THING_REGISTERED, SandboxContext
from iotref.sandbox.quota_meter import QuotaMeter, count_by_client
from iotref.sandbox.telemetry_store import Record, Retention, TelemetryStore

log = logging.getLogger(__name__)

SHARE_GROUP = "iotref-ingest"
SESSION_EXPIRY_SECONDS = 3600  # as a device's: the broker queues for a while, not forever
DEFAULT_CONNECTIONS = 16  # each adds room for a burst in Mosquitto's per-connection queue
KEEPALIVE_SECONDS = 30
RECEIVE_MAXIMUM = 200  # unacknowledged messages per connection (see the module doc)
EVENT_LOOP_THREADS = 1  # the callbacks take turns on the GIL anyway; one thread, no contention
INBOX_LIMIT = 200_000  # messages waiting in the receiving process before callbacks wait
FORWARD_LIMIT = 2000  # messages per batch sent to the sandbox process
FORWARD_LINGER_SECONDS = 0.005  # a short wait for more, so that batches are not tiny
WRITE_BATCH_LIMIT = 10_000  # records per database transaction
CONNECT_WAIT_SECONDS = 15.0
STOP_WAIT_SECONDS = 10.0
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 2.0
SUBSCRIBE_RETRY_SECONDS = 2.0
UNKNOWN_RECHECK_SECONDS = 5.0
FEED_QUEUE_SIZE = 2000
TOPIC_CACHE_LIMIT = 100_000  # checked topics remembered by the RecordBuilder


# --------------------------------------------------------------------------- checking


class ThingDirectory:
    """Client id -> org id of provisioned things, cached; unknown ids are looked up again
    at most every few seconds."""

    def __init__(self, lookup: Callable[[str], str | None]) -> None:
        self._lookup = lookup
        self._known: dict[str, str] = {}
        self._unknown: dict[str, float] = {}
        self._lock = threading.Lock()

    def remember(self, client_id: str, org_id: str) -> None:
        with self._lock:
            self._known[client_id] = org_id
            self._unknown.pop(client_id, None)

    def org_of(self, client_id: str) -> str | None:
        org = self._known.get(client_id)
        if org is not None:
            return org
        now = time.monotonic()
        with self._lock:
            checked = self._unknown.get(client_id)
            if checked is not None and now - checked < UNKNOWN_RECHECK_SECONDS:
                return None
        try:
            org = self._lookup(client_id)
        except Exception:
            log.exception("thing lookup failed")
            org = None
        with self._lock:
            if org is None:
                self._unknown[client_id] = now
            else:
                self._known[client_id] = org
        return org


class RecordBuilder:
    """Turns ``(topic, payload)`` into a :class:`Record`: parse, validate, check the topic,
    pick out what the monitor shows (status, speed, counters).

    A topic whose org id and client id check out is remembered (up to
    :data:`TOPIC_CACHE_LIMIT`), so later messages on it skip the split and the registry:
    the directory's answer for a known client id does not change."""

    def __init__(
        self,
        validator: MessageValidator,
        things: ThingDirectory,
        telemetry_topic: str = TELEMETRY_TOPIC,
    ) -> None:
        self.validator = validator
        self.things = things
        self.prefix = telemetry_topic.rstrip("/")
        self._prefix_levels = self.prefix.split("/")
        self._good_topics: dict[str, tuple[str, str | None, str | None]] = {}

    def topic_ids(self, topic: str) -> tuple[str, str | None, str | None]:
        """``(client id, org id, problem)`` from a telemetry topic."""
        levels = topic.split("/")
        depth = len(self._prefix_levels)
        if len(levels) == depth + 2 and levels[:depth] == self._prefix_levels:
            org_id, client_id = levels[depth], levels[depth + 1]
            if not org_id or not client_id:
                return client_id or "?", org_id or None, f"topic is not {self.prefix}/ORG/CLIENT"
            real_org = self.things.org_of(client_id)
            if real_org is None:
                return client_id, org_id, f"unknown client id {client_id}"
            if real_org != org_id:
                return (
                    client_id,
                    org_id,
                    f"org id {org_id} in the topic is not the device's organization {real_org}",
                )
            return client_id, org_id, None
        tail = levels[depth:] if levels[:depth] == self._prefix_levels else levels
        client_id = tail[-1] if tail and tail[-1] else "?"
        return client_id, None, f"topic is not {self.prefix}/ORG/CLIENT"

    def build(self, topic: str, body: bytes, received_at: float) -> Record:
        ids = self._good_topics.get(topic)
        if ids is None:
            ids = self.topic_ids(topic)
            if ids[2] is None:
                if len(self._good_topics) >= TOPIC_CACHE_LIMIT:
                    self._good_topics.clear()
                self._good_topics[topic] = ids
        client_id, org_id, problem = ids
        value, parse_issue = parse_json(body)
        issues = [parse_issue] if parse_issue is not None else self.validator.validate(value)
        errors = [{"path": i.path, "reason": i.message} for i in issues] if issues else None
        # A message on a topic that is not its sender's own is never valid, whatever its body.
        valid = not issues and problem is None
        if type(value) is not dict:
            return Record(
                received_at, topic, client_id, org_id, problem, None, valid, errors,
                None, None, None, None, None, None, None, None, None, body,
            )  # fmt: skip
        # Parsed JSON holds exact types only (no subclasses): ``type(x) is ...`` is enough.
        get = value.get
        uuid, eventtype, eventsubtype = (
            get("sendereventuuid"),
            get("eventtype"),
            get("eventsubtype"),
        )
        version, assetid, stamp = get("payloadversion"), get("assetid"), get("assettimestamp")
        status = speed = counter = total = None
        payload = get("payload")
        if type(payload) is dict:
            signal = payload.get("signalstatus")
            info = signal.get("deviceinfo") if type(signal) is dict else None
            if type(info) is dict:
                status = info.get("status")
                speed = info.get("speed")
                counter = info.get("productioncounter")
                total = info.get("totalproductioncounter")
        return Record(
            received_at,
            topic,
            client_id,
            org_id,
            problem,
            uuid if type(uuid) is str else None,
            valid,
            errors,
            eventtype if type(eventtype) is str else None,
            eventsubtype if type(eventsubtype) is str else None,
            version if type(version) is int else None,
            assetid if type(assetid) is str else None,
            stamp if type(stamp) is str else None,
            status if type(status) is str else None,
            float(speed) if type(speed) is float or type(speed) is int else None,
            float(counter) if type(counter) is float or type(counter) is int else None,
            float(total) if type(total) is float or type(total) is int else None,
            body,
        )


# --------------------------------------------------------------------------- live feed


def event_of(record: Record, row_id: int | None, original_id: int | None = None) -> dict[str, Any]:
    """What the live stream shows of a message (no body: that is fetched on demand)."""
    return {
        "id": row_id if row_id is not None else original_id,
        "duplicate": row_id is None,
        "t": record.received_at,
        "client_id": record.client_id,
        "org_id": record.org_id,
        "topic": record.topic,
        "topic_problem": record.topic_problem,
        "valid": record.valid,
        "errors": record.errors or [],
        "sendereventuuid": record.sendereventuuid,
        "eventtype": record.eventtype,
        "eventsubtype": record.eventsubtype,
        "payloadversion": record.payloadversion,
        "assetid": record.assetid,
        "assettimestamp": record.assettimestamp,
        "status": record.status,
        "speed": record.speed,
        "productioncounter": record.productioncounter,
        "totalproductioncounter": record.totalproductioncounter,
        "size": len(record.body),
    }


class Subscription:
    """One listener of the feed: a bounded queue of events; what does not fit is counted
    in ``dropped`` (a browser cannot show 20,000 messages a second anyway)."""

    def __init__(self, client_id: str | None, invalid_only: bool, size: int) -> None:
        self.client_id = client_id
        self.invalid_only = invalid_only
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(size)
        self.dropped = 0

    def wants(self, event: dict[str, Any]) -> bool:
        if self.client_id is not None and event["client_id"] != self.client_id:
            return False
        return not (self.invalid_only and event["valid"] and not event["topic_problem"])

    def offer(self, event: dict[str, Any] | None) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1


class TelemetryFeed:
    """In-process pub/sub of stored messages; used on the event loop's thread."""

    def __init__(self, queue_size: int = FEED_QUEUE_SIZE) -> None:
        self._subscriptions: set[Subscription] = set()
        self._queue_size = queue_size

    @property
    def active(self) -> bool:
        return bool(self._subscriptions)

    def subscribe(self, client_id: str | None = None, invalid_only: bool = False) -> Subscription:
        sub = Subscription(client_id, invalid_only, self._queue_size)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def publish(self, events: Iterable[dict[str, Any]]) -> None:
        subs = list(self._subscriptions)
        if not subs:
            return
        for event in events:
            for sub in subs:
                if sub.wants(event):
                    sub.offer(event)

    def close(self) -> None:
        """End every subscription (``None`` in its queue means: the feed is closing)."""
        for sub in list(self._subscriptions):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
            if sub.queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)
        self._subscriptions.clear()


# --------------------------------------------------------------------------- receiving


@dataclass(frozen=True)
class ReceiverSettings:
    """What the receiving process needs (plain values: it is pickled to the child)."""

    host: str
    port: int
    ca_path: str
    cert_path: str
    key_path: str
    topic_filter: str
    client_ids: tuple[str, ...]
    receive_maximum: int = RECEIVE_MAXIMUM
    keepalive: int = KEEPALIVE_SECONDS
    event_loop_threads: int = EVENT_LOOP_THREADS


def tls_context(settings: ReceiverSettings) -> io.ClientTlsContext:
    """Mutual TLS with the platform identity; only the sandbox's root CA is trusted."""
    options = io.TlsContextOptions.create_client_with_mtls_from_path(
        settings.cert_path, settings.key_path
    )
    options.override_default_trust_store_from_path(None, settings.ca_path)
    options.min_tls_ver = io.TlsVersion.TLSv1_2
    options.verify_peer = True
    return io.ClientTlsContext(options)


def client_options(
    settings: ReceiverSettings,
    client_id: str,
    tls: io.ClientTlsContext | None,
    bootstrap: io.ClientBootstrap | None = None,
) -> mqtt5.ClientOptions:
    """awscrt options of one receiving connection (callbacks are added by the caller)."""
    return mqtt5.ClientOptions(
        host_name=settings.host,
        port=settings.port,
        bootstrap=bootstrap,
        tls_ctx=tls,
        connect_options=mqtt5.ConnectPacket(
            client_id=client_id,
            keep_alive_interval_sec=settings.keepalive,
            session_expiry_interval_sec=SESSION_EXPIRY_SECONDS,
            receive_maximum=settings.receive_maximum,
        ),
        # Rejoin the session on every connect, also the first of a new receiving process.
        session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS,
        # Mosquitto, not AWS IoT Core: no IoT Core throughput and size limits client-side.
        extended_validation_and_flow_control_options=(
            mqtt5.ExtendedValidationAndFlowControlOptions.NONE
        ),
        offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
        min_reconnect_delay_ms=round(RECONNECT_MIN_SECONDS * 1000),
        max_reconnect_delay_ms=round(RECONNECT_MAX_SECONDS * 1000),
        connack_timeout_ms=10_000,
        ack_timeout_sec=10,
        disable_metrics=True,
    )


def subscription_granted(suback: Any) -> bool:
    codes = list(getattr(suback, "reason_codes", None) or [])
    return bool(codes) and all(int(code) < 0x80 for code in codes)


class Inbox:
    """Where awscrt's callbacks leave received messages, in arrival order, until the
    forwarding thread takes them. ``deque.append``/``popleft`` are thread-safe."""

    def __init__(self, limit: int = INBOX_LIMIT) -> None:
        self.limit = limit
        self.closed = False
        self._messages: deque[tuple[str, bytes]] = deque()
        self._ready = threading.Event()

    def __len__(self) -> int:
        return len(self._messages)

    def on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        """awscrt callback (its event-loop thread): queue, nothing else. The QoS 1
        acknowledgement goes out when this returns."""
        keep_thread_state()
        packet = data.publish_packet
        messages = self._messages
        while len(messages) >= self.limit and not self.closed:
            time.sleep(0.005)  # the sandbox is behind: stop reading the socket meanwhile
        messages.append((packet.topic, bytes(packet.payload or b"")))
        if not self._ready.is_set():
            self._ready.set()

    def close(self) -> None:
        """No more waiting in :meth:`on_publish` (stopping)."""
        self.closed = True
        self._ready.set()

    def take(
        self, timeout: float, limit: int = FORWARD_LIMIT, linger: float = 0.0
    ) -> list[tuple[str, bytes]]:
        """Up to ``limit`` messages, waiting up to ``timeout`` for the first, then up to
        ``linger`` seconds more for others when there are fewer than ``limit``."""
        self._ready.clear()
        if not self._messages:
            self._ready.wait(timeout)
        messages = self._messages
        if messages and linger > 0 and len(messages) < limit and not self.closed:
            time.sleep(linger)
        popleft = messages.popleft
        return [popleft() for _ in range(min(len(messages), limit))]


class ReceivingClients:
    """Runs in the receiving process: the awscrt clients, (re)subscribing after every
    connect, and the thread that forwards the inbox to the sandbox process.

    To the sandbox process it sends ``("messages", received_at, [(topic, payload), ...])``,
    ``("state", index, subscribed, level, text)`` and finally ``("stopped",)``; it stops
    when it receives anything, when the pipe closes or when its parent goes away.
    """

    def __init__(self, settings: ReceiverSettings, conn: Connection) -> None:
        self.settings = settings
        self.conn = conn
        self.inbox = Inbox()
        self.events: queue.Queue[tuple[str, int, int, Any]] = queue.Queue()
        self.clients: list[mqtt5.Client] = []
        self._generation = [0] * len(settings.client_ids)
        self._retry_at: dict[int, float] = {}
        self._stopped = [threading.Event() for _ in settings.client_ids]
        self._forwarding = True
        self._send_lock = threading.Lock()

    def send(self, item: tuple[Any, ...]) -> bool:
        with self._send_lock:
            try:
                self.conn.send(item)
            except (OSError, ValueError):
                return False
        return True

    def state(self, index: int, subscribed: bool, level: int, text: str) -> None:
        self.send(("state", index, subscribed, level, text))

    def run(self) -> None:
        tls = tls_context(self.settings)
        bootstrap = io.ClientBootstrap(
            io.EventLoopGroup(self.settings.event_loop_threads),
            io.DefaultHostResolver(io.EventLoopGroup(1)),
        )
        for index, client_id in enumerate(self.settings.client_ids):
            options = client_options(self.settings, client_id, tls, bootstrap)
            options.on_publish_callback_fn = self.inbox.on_publish
            options.on_lifecycle_event_connection_success_fn = self._event("connected", index)
            options.on_lifecycle_event_connection_failure_fn = self._event("failed", index)
            options.on_lifecycle_event_disconnection_fn = self._event("disconnected", index)
            options.on_lifecycle_event_stopped_fn = lambda _data, i=index: self._stopped[i].set()
            self.clients.append(mqtt5.Client(options))
        forwarder = threading.Thread(target=self._forward, name="ingest-forward", daemon=True)
        forwarder.start()
        for client in self.clients:
            client.start()
        parent = os.getppid()
        try:
            while not self._told_to_stop() and os.getppid() == parent:
                self._handle_events(0.2)
        finally:
            for client in self.clients:
                client.stop()
            deadline = time.monotonic() + STOP_WAIT_SECONDS / 2
            for stopped in self._stopped:
                stopped.wait(max(0.0, deadline - time.monotonic()))
            self.inbox.close()
            self._forwarding = False
            forwarder.join(STOP_WAIT_SECONDS / 2)
            self.send(("stopped",))

    def _told_to_stop(self) -> bool:
        try:
            return self.conn.poll(0)
        except (OSError, EOFError):
            return True

    def _event(self, kind: str, index: int) -> Callable[[Any], None]:
        def callback(data: Any) -> None:
            self.events.put((kind, index, 0, getattr(data, "exception", None)))

        return callback

    def _handle_events(self, timeout: float) -> None:
        now = time.monotonic()
        for index, when in list(self._retry_at.items()):
            if when <= now:
                del self._retry_at[index]
                self._subscribe(index)
        try:
            kind, index, generation, detail = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        topic_filter = self.settings.topic_filter
        if kind == "connected":
            self._generation[index] += 1
            self._subscribe(index)
        elif kind == "failed":
            self.state(index, False, logging.DEBUG, f"ingestion cannot connect yet: {detail}")
        elif kind == "disconnected":
            self._generation[index] += 1
            self._retry_at.pop(index, None)
            self.state(
                index, False, logging.WARNING, f"ingestion lost the broker connection: {detail}"
            )
        elif kind == "suback" and generation == self._generation[index]:
            if isinstance(detail, BaseException):
                self.state(index, False, logging.DEBUG, f"subscribing failed: {detail}")
            elif subscription_granted(detail):
                self.state(index, True, logging.INFO, f"ingestion subscribed to {topic_filter}")
                return
            else:
                self.state(
                    index,
                    False,
                    logging.WARNING,
                    f"the broker refused the subscription to {topic_filter}",
                )
            self._retry_at[index] = time.monotonic() + SUBSCRIBE_RETRY_SECONDS

    def _subscribe(self, index: int) -> None:
        generation = self._generation[index]
        packet = mqtt5.SubscribePacket(
            [mqtt5.Subscription(self.settings.topic_filter, mqtt5.QoS.AT_LEAST_ONCE)]
        )

        def done(future: Any) -> None:
            try:
                detail = future.result()
            except Exception as exc:
                detail = exc
            self.events.put(("suback", index, generation, detail))

        try:
            self.clients[index].subscribe(packet).add_done_callback(done)
        except Exception as exc:
            self.events.put(("suback", index, generation, exc))

    def _forward(self) -> None:
        inbox = self.inbox
        while True:
            batch = inbox.take(0.1, linger=FORWARD_LINGER_SECONDS)
            if batch:
                if not self.send(("messages", time.time(), batch)):
                    return  # the sandbox process is gone
            elif not self._forwarding and not len(inbox):
                return


def receiver_process_main(fd: int) -> None:
    """Entry point of the receiving process: settings arrive first on the pipe ``fd``."""
    conn = Connection(fd)
    try:
        settings = conn.recv()
    except (OSError, EOFError):
        return
    try:
        ReceivingClients(settings, conn).run()
    finally:
        conn.close()


class Receiver(threading.Thread):
    """In the sandbox process: runs the receiving process (again, should it end), turns
    the messages it forwards into checked records and hands them to ``sink`` (the
    :class:`BatchWriter`) in batches: whatever has arrived while the previous batch was
    being stored, up to :data:`WRITE_BATCH_LIMIT` records.

    Checking and storing happen on this one thread. With a thread for each, they would
    pass Python's GIL back and forth for every row (SQLite lets go of it for each
    statement), and each time wait for the other's switch interval: most of the time
    would go to waiting."""

    def __init__(
        self,
        settings: ReceiverSettings,
        builder: RecordBuilder,
        sink: Callable[[list[Record]], None],
        idle: Callable[[], None] | None = None,
        on_subscribed: Callable[[], None] | None = None,
        meter: QuotaMeter | None = None,
    ) -> None:
        super().__init__(name="ingest-receiver", daemon=True)
        self.on_subscribed = on_subscribed  # called (on this thread) when all subscribed
        self.settings = settings
        self.builder = builder
        self.sink = sink
        self.idle = idle  # called between batches when nothing arrives (e.g. retention)
        self.meter = meter  # per-connection quotas: one count per client id per batch
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self.messages = 0
        self._connections: set[int] = set()
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(("stop",))

    def run(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self._session()
            except Exception:
                log.exception("ingestion receiver failed; restarting it")
            finally:
                self._end_session()
            if time.monotonic() - started > 30:
                delay = RECONNECT_MIN_SECONDS
            if self.stopping.wait(delay):
                break
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _session(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            code = "import sys; from iotref.sandbox.ingestion import receiver_process_main as m; "
            process = subprocess.Popen(
                [sys.executable, "-c", code + "m(int(sys.argv[1]))", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
            conn = Connection(os.dup(ours.fileno()))
        with self._lock:
            self._process = process
            self._conn = conn
        conn.send(self.settings)
        if self.stopping.is_set():
            self.stop()
        self._pump(conn)

    def _pump(self, conn: Connection) -> None:
        """Handle what the receiving process sends until it stops (or does not in time
        after :meth:`stop`)."""
        stop_deadline: float | None = None
        while True:
            if stop_deadline is None and self.stopping.is_set():
                stop_deadline = time.monotonic() + STOP_WAIT_SECONDS
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                log.warning("ingestion: the receiving process did not stop in time")
                return
            if not conn.poll(0.5):
                if self.idle is not None:
                    self.idle()
                continue
            records: list[Record] = []
            ended = False
            # Everything already waiting in the pipe, up to a batch: one transaction.
            while True:
                try:
                    item = conn.recv()
                except EOFError:
                    if not self.stopping.is_set():
                        log.warning("ingestion: the receiving process ended unexpectedly")
                    ended = True
                    break
                ended = self._handle_item(item, records)
                if ended or len(records) >= WRITE_BATCH_LIMIT or not conn.poll(0):
                    break
            if records:
                self.sink(records)
            if ended:
                return

    def _handle_item(self, item: tuple[Any, ...], records: list[Record]) -> bool:
        """Handle one item from the receiving process; True once it has stopped."""
        kind = item[0]
        if kind == "messages":
            records += self._received(item[1], item[2])
        elif kind == "state":
            self._state(item[1], item[2], item[3], item[4])
        elif kind == "stopped":
            return True
        return False

    def _received(self, received_at: float, messages: list[tuple[str, bytes]]) -> list[Record]:
        build = self.builder.build
        records = [build(topic, payload, received_at) for topic, payload in messages]
        self.messages += len(records)
        if self.meter is not None:
            self.meter.add_batch(received_at, count_by_client(records))
        return records

    def _state(self, index: int, subscribed: bool, level: int, text: str) -> None:
        log.log(level, "%s (connection %d)", text, index)
        if subscribed:
            self._connections.add(index)
        else:
            self._connections.discard(index)
        if len(self._connections) == len(self.settings.client_ids):
            if not self.subscribed.is_set() and self.on_subscribed is not None:
                try:
                    self.on_subscribed()
                except Exception:
                    log.exception("ingestion: the subscribed callback failed")
            self.subscribed.set()
        else:
            self.subscribed.clear()

    def _end_session(self) -> None:
        with self._lock:
            conn, process = self._conn, self._process
            self._conn = None
            self._process = None
        self._connections.clear()
        self.subscribed.clear()
        if conn is not None:
            conn.close()
        if process is not None:
            try:
                process.wait(STOP_WAIT_SECONDS / 2)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(2)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# --------------------------------------------------------------------------- writer


class BatchWriter:
    """Stores a batch of records (one transaction) and hands them to the live feed when
    someone is watching; called by the :class:`Receiver`'s thread."""

    def __init__(
        self,
        store: TelemetryStore,
        deliver: Callable[[list[dict[str, Any]]], None],
        feed_active: Callable[[], bool],
    ) -> None:
        self.store = store
        self.deliver = deliver
        self.feed_active = feed_active
        self.batches = 0

    def __call__(self, batch: list[Record]) -> None:
        try:
            results = self.store.write_batch(batch)
        except Exception:
            log.exception("storing %d telemetry messages failed", len(batch))
            return
        self.batches += 1
        if self.feed_active():
            events = [
                event_of(record, row_id, None if row_id else self._original(record))
                for record, row_id in results
            ]
            self.deliver(events)
        self.housekeeping()

    def housekeeping(self) -> None:
        """Between batches, on this thread: the store's retention pass when one is due
        (at most every few seconds, in bounded chunks)."""
        try:
            self.store.maybe_prune()
        except Exception:
            log.exception("pruning stored telemetry failed")

    def _original(self, record: Record) -> int | None:
        if record.sendereventuuid is None:
            return None
        return self.store.message_id(record.sendereventuuid)


# --------------------------------------------------------------------------- component


class Ingestion:
    """Sandbox component: receives, checks and stores all telemetry (see module doc)."""

    def __init__(
        self,
        ctx: SandboxContext,
        cas: Any,
        things: Any,
        *,
        connections: int | None = None,
        telemetry_topic: str = TELEMETRY_TOPIC,
        meter: QuotaMeter | None = None,
    ) -> None:
        self.ctx = ctx
        self.cas = cas
        self.things = things
        self.meter = meter
        env_connections = os.environ.get("IOTREF_INGEST_CONNECTIONS", "")
        self.connections = connections or (
            int(env_connections) if env_connections.isdigit() else DEFAULT_CONNECTIONS
        )
        self.connections = max(1, min(self.connections, 16))
        self.telemetry_topic = telemetry_topic.rstrip("/")
        self.feed = TelemetryFeed()
        self.store: TelemetryStore | None = None
        self.directory = ThingDirectory(self._lookup_org)
        self._receivers: list[Receiver] = []
        self._writer: BatchWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._announcing: set[asyncio.Future[None]] = set()
        ctx.events.subscribe(THING_REGISTERED, self._on_thing_registered)

    @property
    def database_path(self) -> Path:
        return self.ctx.paths.data_dir / "telemetry.db"

    def routes(self) -> list[Any]:
        return []

    def _lookup_org(self, client_id: str) -> str | None:
        thing = self.things.get(client_id)
        return None if thing is None else str(thing.org_id)

    def _on_thing_registered(self, thing: Any = None, **_: Any) -> None:
        client_id = getattr(thing, "client_id", None)
        org_id = getattr(thing, "org_id", None)
        if client_id and org_id:
            self.directory.remember(str(client_id), str(org_id))

    def receiver_settings(self) -> ReceiverSettings:
        return ReceiverSettings(
            host=LOOPBACK,
            port=self.ctx.platform_mqtt_port,
            ca_path=str(self.cas.server_root_ca_path),
            cert_path=str(self.cas.platform_cert_path),
            key_path=str(self.cas.platform_key_path),
            topic_filter=self.topic_filter,
            # Stable across restarts (the sessions persist), one set per connection count.
            client_ids=tuple(
                f"iotref-platform-ingest-{self.connections}-{index}"
                for index in range(self.connections)
            ),
        )

    @property
    def topic_filter(self) -> str:
        base = f"{self.telemetry_topic}/#"
        # A group per connection count: the sessions of another count (an earlier run)
        # must not take a share of the messages of this one.
        group = f"{SHARE_GROUP}-{self.connections}"
        return f"$share/{group}/{base}" if self.connections > 1 else base

    @property
    def subscribed(self) -> bool:
        return bool(self._receivers) and all(r.subscribed.is_set() for r in self._receivers)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        settings = self.ctx.settings
        retention = Retention(
            max_messages=settings.telemetry_max_messages or None,
            max_age_seconds=settings.telemetry_max_age or None,
        )
        self.store = await asyncio.to_thread(TelemetryStore, self.database_path, retention)
        builder = RecordBuilder(MessageValidator(), self.directory, self.telemetry_topic)
        self._writer = BatchWriter(self.store, self._deliver, lambda: self.feed.active)
        receiver = Receiver(
            self.receiver_settings(),
            builder,
            self._writer,
            self._writer.housekeeping,
            on_subscribed=self._announce_subscribed,
            meter=self.meter,
        )
        receiver.start()
        self._receivers.append(receiver)
        deadline = time.monotonic() + CONNECT_WAIT_SECONDS
        for receiver in self._receivers:
            left = deadline - time.monotonic()
            if left > 0:
                await asyncio.to_thread(receiver.subscribed.wait, left)
        if not self.subscribed:
            log.warning(
                "ingestion: not subscribed after %.0f s; still trying", CONNECT_WAIT_SECONDS
            )

    def _announce_subscribed(self) -> None:
        """From the receiver's thread: tell the other components (the broker saves its
        database then, see the module docstring)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def emit() -> None:
            task = asyncio.ensure_future(self.ctx.events.emit(INGESTION_SUBSCRIBED))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(emit)

    def _deliver(self, events: list[dict[str, Any]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.feed.publish, events)

    async def stop(self) -> None:
        self.feed.close()
        for receiver in self._receivers:
            receiver.stop()
        for receiver in self._receivers:
            await asyncio.to_thread(receiver.join, STOP_WAIT_SECONDS + 5)
        self._receivers.clear()
        if self.store is not None:
            self.store.close()
        self._loop = None

    def status(self) -> dict[str, Any]:
        totals = self.store.totals() if self.store is not None else {}
        return {
            "subscribed": self.subscribed,
            "connections": self.connections,
            "topic_filter": self.topic_filter,
            "batches": self._writer.batches if self._writer is not None else 0,
            **totals,
        }
