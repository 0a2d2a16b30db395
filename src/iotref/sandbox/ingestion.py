"""Telemetry ingestion: the sandbox receives every telemetry message as the platform
would, checks it and stores it for the monitor.

How it keeps up (20,000+ messages/s on a small machine):

* Receiving runs on threads, not on the event loop: each receiver thread holds one MQTT 5
  connection to the broker's platform listener (mutual TLS, the platform identity) and
  speaks the few packets it needs itself (CONNECT, SUBSCRIBE, PUBLISH in, PUBACK out,
  PINGREQ, DISCONNECT), reading the socket in large chunks and splitting many PUBLISH
  packets per read. A general MQTT client library reads packet by packet and costs several
  times more per message. With more than one connection the subscription is shared
  (``$share/iotref-ingest/...``) so the broker spreads the messages over them.
* The receiver asks for a Receive Maximum of 65,535, so the broker keeps sending without
  waiting for acknowledgements, and acknowledges a whole chunk with one write once its
  messages have been parsed and validated (QoS 1; a message is acknowledged once it is
  queued for the database, so a crash of the sandbox may lose the last moment's messages).
* Each message is parsed and validated with the platform's schemas
  (:class:`iotref.protocol.message_schemas.MessageValidator`) on the receiver thread; its
  topic is checked against the thing registry (org id and client id of
  ``{telemetryTopic}/{orgId}/{clientId}``).
* One writer thread stores batches in ``telemetry.db`` (:mod:`telemetry_store`) in one
  transaction per batch; duplicates (same ``sendereventuuid``) are recognised by the
  database's unique index, counted and not stored again.
* After each batch the writer hands the new messages to :class:`TelemetryFeed`, the
  in-process pub/sub of the monitor's live streams, on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotref.protocol.message_schemas import MessageValidator, parse_json
from iotref.sandbox.broker_config import TELEMETRY_TOPIC
from iotref.sandbox.context import LOOPBACK, SandboxContext
from iotref.sandbox.telemetry_store import Record, TelemetryStore

log = logging.getLogger(__name__)

SHARE_GROUP = "iotref-ingest"
DEFAULT_CONNECTIONS = 4  # each can hold tens of thousands of unacknowledged messages
KEEPALIVE_SECONDS = 30
RECEIVE_MAXIMUM = 65535
READ_SIZE = 1 << 16
CHUNK_LIMIT = 1 << 20  # bytes gathered from the socket before they are processed
WRITE_BATCH_LIMIT = 20_000  # records per database transaction
QUEUE_CHUNKS = 256  # chunks waiting for the writer before the receivers wait
CONNECT_WAIT_SECONDS = 15.0
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 2.0
UNKNOWN_RECHECK_SECONDS = 5.0
FEED_QUEUE_SIZE = 2000


# --------------------------------------------------------------------------- MQTT wire


class ProtocolError(Exception):
    """The broker sent something this receiver does not accept."""


def encode_varint(value: int) -> bytes:
    """MQTT's variable byte integer (0 .. 268,435,455)."""
    if not 0 <= value <= 268_435_455:
        raise ValueError("value out of range for a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """``(value, position after it)``, or None if ``data`` ends inside it."""
    value = 0
    shift = 0
    for index in range(pos, min(pos + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    if len(data) - pos >= 4:
        raise ProtocolError("malformed variable byte integer")
    return None


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_varint(len(body)) + body


def connect_packet(
    client_id: str,
    keepalive: int = KEEPALIVE_SECONDS,
    *,
    receive_maximum: int = RECEIVE_MAXIMUM,
    session_expiry: int = 0,
    clean_start: bool = True,
) -> bytes:
    """An MQTT 5 CONNECT (no credentials: the TLS client certificate identifies us)."""
    props = (
        b"\x11" + session_expiry.to_bytes(4, "big") + b"\x21" + receive_maximum.to_bytes(2, "big")
    )
    flags = 0x02 if clean_start else 0x00
    body = (
        _string("MQTT")
        + bytes([5, flags])
        + keepalive.to_bytes(2, "big")
        + encode_varint(len(props))
        + props
        + _string(client_id)
    )
    return _packet(0x10, body)


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"\x00" + _string(topic_filter) + bytes([qos])
    return _packet(0x82, body)


def publish_packet(
    topic: str, payload: bytes, qos: int = 1, packet_id: int = 0, *, mqtt5: bool = True
) -> bytes:
    """A PUBLISH packet (tests and the benchmark pre-build them)."""
    body = _string(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    if mqtt5:
        body += b"\x00"
    return _packet(0x30 | (qos << 1), body + payload)


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


@dataclass
class Split:
    """What :func:`split_packets` found in a chunk of bytes."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    others: list[tuple[int, bytes]] = field(default_factory=list)
    consumed: int = 0


def split_packets(data: bytes, *, mqtt5: bool = True) -> Split:
    """Split complete packets off the front of ``data``: PUBLISH packets become
    ``(topic, payload)`` (plus the packet id to acknowledge for QoS > 0), anything else
    ``(first byte, body)``. ``consumed`` says where the incomplete rest begins."""
    out = Split()
    pos = 0
    size = len(data)
    messages = out.messages
    acks = out.acks
    while pos + 2 <= size:
        first = data[pos]
        header = decode_varint(data, pos + 1)
        if header is None:
            break
        length, start = header
        end = start + length
        if end > size:
            break
        if first >> 4 == 3:
            if length < 2:
                raise ProtocolError("PUBLISH too short")
            topic_len = (data[start] << 8) | data[start + 1]
            cursor = start + 2 + topic_len
            try:
                topic = data[start + 2 : cursor].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolError("PUBLISH topic is not UTF-8") from exc
            if first & 0x06:
                acks.append((data[cursor] << 8) | data[cursor + 1])
                cursor += 2
            if mqtt5:
                props = decode_varint(data, cursor)
                if props is None:
                    raise ProtocolError("PUBLISH properties cut off")
                cursor = props[1] + props[0]
            if cursor > end:
                raise ProtocolError("PUBLISH header longer than the packet")
            messages.append((topic, data[cursor:end]))
        else:
            out.others.append((first, data[start:end]))
        pos = end
    out.consumed = pos
    return out


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


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class RecordBuilder:
    """Turns ``(topic, payload)`` into a :class:`Record`: parse, validate, check the topic,
    pick out what the monitor shows (status, speed, counters)."""

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
        client_id, org_id, problem = self.topic_ids(topic)
        value, parse_issue = parse_json(body)
        issues = [parse_issue] if parse_issue is not None else self.validator.validate(value)
        record = Record(
            received_at=received_at,
            topic=topic,
            client_id=client_id,
            org_id=org_id,
            topic_problem=problem,
            sendereventuuid=None,
            valid=not issues,
            errors=[{"path": i.path, "reason": i.message} for i in issues] or None,
            eventtype=None,
            eventsubtype=None,
            payloadversion=None,
            assetid=None,
            assettimestamp=None,
            status=None,
            speed=None,
            productioncounter=None,
            totalproductioncounter=None,
            body=body,
        )
        if isinstance(value, dict):
            record.sendereventuuid = _text(value.get("sendereventuuid"))
            record.eventtype = _text(value.get("eventtype"))
            record.eventsubtype = _text(value.get("eventsubtype"))
            version = value.get("payloadversion")
            record.payloadversion = (
                version if isinstance(version, int) and not isinstance(version, bool) else None
            )
            record.assetid = _text(value.get("assetid"))
            record.assettimestamp = _text(value.get("assettimestamp"))
            payload = value.get("payload")
            signal = payload.get("signalstatus") if isinstance(payload, dict) else None
            info = signal.get("deviceinfo") if isinstance(signal, dict) else None
            if isinstance(info, dict):
                record.status = _text(info.get("status"))
                record.speed = _number(info.get("speed"))
                record.productioncounter = _number(info.get("productioncounter"))
                record.totalproductioncounter = _number(info.get("totalproductioncounter"))
        return record


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


# --------------------------------------------------------------------------- threads


@dataclass
class ReceiverSettings:
    host: str
    port: int
    tls: Callable[[], ssl.SSLContext]
    topic_filter: str
    client_id: str


class Receiver(threading.Thread):
    """One MQTT connection that receives telemetry and queues parsed records."""

    def __init__(
        self,
        settings: ReceiverSettings,
        builder: RecordBuilder,
        out: queue.Queue[list[Record] | None],
    ) -> None:
        super().__init__(name=f"ingest-{settings.client_id}", daemon=True)
        self.settings = settings
        self.builder = builder
        self.out = out
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self.messages = 0
        self._sock: ssl.SSLSocket | None = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while not self.stopping.is_set():
            try:
                self._session()
                delay = RECONNECT_MIN_SECONDS
            except (OSError, ProtocolError, ssl.SSLError) as exc:
                if self.subscribed.is_set():
                    log.warning("ingestion lost the broker connection: %s", exc)
                else:
                    log.debug("ingestion cannot connect yet: %s", exc)
            except Exception:
                log.exception("ingestion receiver failed; reconnecting")
            finally:
                self.subscribed.clear()
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.close()
                    self._sock = None
            if self.stopping.wait(delay):
                break
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _session(self) -> None:
        settings = self.settings
        raw = socket.create_connection((settings.host, settings.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock = settings.tls().wrap_socket(raw, server_hostname="localhost")
        self._sock = sock
        sock.sendall(connect_packet(settings.client_id))
        pending = b""
        handshake = 0  # 0: waiting for CONNACK, 1: for SUBACK, 2: receiving
        last_sent = time.monotonic()
        sock.settimeout(1.0)
        while not self.stopping.is_set():
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                data = None
            if data is not None:
                if not data:
                    raise OSError("the broker closed the connection")
                chunks = [pending, data] if pending else [data]
                size = len(data)
                while size < CHUNK_LIMIT and (
                    sock.pending() or select.select([sock], [], [], 0)[0]
                ):
                    more = sock.recv(READ_SIZE)
                    if not more:
                        break
                    chunks.append(more)
                    size += len(more)
                buffer = b"".join(chunks)
                split = split_packets(buffer)
                pending = buffer[split.consumed :]
                for first, body in split.others:
                    handshake = self._control(sock, first, body, handshake)
                if split.messages:
                    now = time.time()
                    build = self.builder.build
                    records = [build(topic, payload, now) for topic, payload in split.messages]
                    self.messages += len(records)
                    self.out.put(records)
                if split.acks:
                    sock.sendall(b"".join(puback_packet(pid) for pid in split.acks))
                    last_sent = time.monotonic()
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS / 2:
                sock.sendall(PINGREQ)
                last_sent = time.monotonic()
        with contextlib.suppress(OSError):
            sock.sendall(DISCONNECT)

    def _control(self, sock: ssl.SSLSocket, first: int, body: bytes, handshake: int) -> int:
        kind = first >> 4
        if kind == 2:  # CONNACK
            if len(body) < 2 or body[1] != 0:
                code = body[1] if len(body) > 1 else -1
                raise ProtocolError(f"the broker refused the connection (reason {code:#x})")
            sock.sendall(subscribe_packet(1, self.settings.topic_filter, 1))
            return 1
        if kind == 9:  # SUBACK
            codes = body[2:]
            props = decode_varint(codes, 0)
            if props is not None:
                codes = codes[props[1] + props[0] :]
            if not codes or codes[0] >= 0x80:
                raise ProtocolError(
                    f"the broker refused the subscription to {self.settings.topic_filter}"
                )
            self.subscribed.set()
            log.info("ingestion subscribed to %s", self.settings.topic_filter)
            return 2
        if kind == 14:  # DISCONNECT from the server
            reason = body[0] if body else 0
            raise ProtocolError(f"the broker disconnected us (reason {reason:#x})")
        return handshake  # PINGRESP and anything else


class Writer(threading.Thread):
    """Stores queued records in batches and hands them to the feed."""

    def __init__(
        self,
        store: TelemetryStore,
        source: queue.Queue[list[Record] | None],
        deliver: Callable[[list[dict[str, Any]]], None],
        feed_active: Callable[[], bool],
    ) -> None:
        super().__init__(name="ingest-writer", daemon=True)
        self.store = store
        self.source = source
        self.deliver = deliver
        self.feed_active = feed_active
        self.batches = 0

    def run(self) -> None:
        done = False
        while not done:
            first = self.source.get()
            if first is None:
                break
            batch = list(first)
            while len(batch) < WRITE_BATCH_LIMIT:
                try:
                    more = self.source.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                batch.extend(more)
            try:
                results = self.store.write_batch(batch)
            except Exception:
                log.exception("storing %d telemetry messages failed", len(batch))
                continue
            self.batches += 1
            if self.feed_active():
                events = [
                    event_of(record, row_id, None if row_id else self._original(record))
                    for record, row_id in results
                ]
                self.deliver(events)

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
    ) -> None:
        self.ctx = ctx
        self.cas = cas
        self.things = things
        env_connections = os.environ.get("IOTREF_INGEST_CONNECTIONS", "")
        self.connections = connections or (
            int(env_connections) if env_connections.isdigit() else DEFAULT_CONNECTIONS
        )
        self.connections = max(1, min(self.connections, 16))
        self.telemetry_topic = telemetry_topic.rstrip("/")
        self.feed = TelemetryFeed()
        self.store: TelemetryStore | None = None
        self.directory = ThingDirectory(self._lookup_org)
        self._queue: queue.Queue[list[Record] | None] = queue.Queue(QUEUE_CHUNKS)
        self._receivers: list[Receiver] = []
        self._writer: Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        ctx.events.subscribe("thing_registered", self._on_thing_registered)

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

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cas.server_root_ca_path))
        context.load_cert_chain(str(self.cas.platform_cert_path), str(self.cas.platform_key_path))
        return context

    @property
    def topic_filter(self) -> str:
        base = f"{self.telemetry_topic}/#"
        return f"$share/{SHARE_GROUP}/{base}" if self.connections > 1 else base

    @property
    def subscribed(self) -> bool:
        return bool(self._receivers) and all(r.subscribed.is_set() for r in self._receivers)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store = await asyncio.to_thread(TelemetryStore, self.database_path)
        builder = RecordBuilder(MessageValidator(), self.directory, self.telemetry_topic)
        self._writer = Writer(self.store, self._queue, self._deliver, lambda: self.feed.active)
        self._writer.start()
        for index in range(self.connections):
            settings = ReceiverSettings(
                host=LOOPBACK,
                port=self.ctx.platform_mqtt_port,
                tls=self._tls,
                topic_filter=self.topic_filter,
                client_id=f"iotref-platform-ingest-{os.getpid()}-{index}",
            )
            receiver = Receiver(settings, builder, self._queue)
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
            await asyncio.to_thread(receiver.join, 5)
        self._receivers.clear()
        if self._writer is not None:
            await asyncio.to_thread(self._queue.put, None)
            await asyncio.to_thread(self._writer.join, 10)
            self._writer = None
        if self.store is not None:
            self.store.close()
        self._loop = None

    def status(self) -> dict[str, Any]:
        totals = self.store.totals() if self.store is not None else {}
        return {
            "subscribed": self.subscribed,
            "connections": self.connections,
            "topic_filter": self.topic_filter,
            "queued_chunks": self._queue.qsize(),
            **totals,
        }
