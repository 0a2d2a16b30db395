"""The ingestion's thread in the sandbox process: it runs the receiving process (again,
should it end), turns what that forwards into checked records and hands them on in
batches."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from iotref.sandbox.quota_meter import QuotaMeter, count_by_client
from iotref.sandbox.telemetry import receiving_process
from iotref.sandbox.telemetry.connection_options import (
    RECONNECT_MAX_SECONDS,
    RECONNECT_MIN_SECONDS,
    ReceiverSettings,
)
from iotref.sandbox.telemetry.receiving_process import STOP_WAIT_SECONDS
from iotref.sandbox.telemetry.record import Record
from iotref.sandbox.telemetry.record_builder import RecordBuilder

log = logging.getLogger(__name__)

WRITE_BATCH_LIMIT = 10_000  # records per database transaction


class Receiver(threading.Thread):
    """In the sandbox process: runs the receiving process (again, should it end), turns
    the messages it forwards into checked records and hands them to ``sink`` (the
    :class:`~iotref.sandbox.telemetry.writer.BatchWriter`) in batches: whatever has
    arrived while the previous batch was being stored, up to :data:`WRITE_BATCH_LIMIT`
    records.

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
            main = f"from {receiving_process.__name__} import receiver_process_main as m"
            code = f"import sys; {main}; "
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
        # One connection's subscription is a detail; all of them subscribed is one line.
        log.log(logging.DEBUG if subscribed else level, "%s (connection %d)", text, index)
        if subscribed:
            self._connections.add(index)
        else:
            self._connections.discard(index)
        total = len(self.settings.client_ids)
        if len(self._connections) == total:
            if not self.subscribed.is_set():
                log.info(
                    "ingestion subscribed to %s on %d connection%s",
                    self.settings.topic_filter,
                    total,
                    "" if total == 1 else "s",
                )
                if self.on_subscribed is not None:
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
