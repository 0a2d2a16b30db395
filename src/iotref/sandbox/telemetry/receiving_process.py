"""The receiving process: a small child of the sandbox that runs the ingestion's awscrt
clients, (re)subscribes each after every connect and forwards what they receive over a
pipe to the sandbox process (:class:`~iotref.sandbox.telemetry.receiver.Receiver`).
docs/architecture.md ("Telemetry ingestion") says why it is a process of its own.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from awscrt import io, mqtt5

from iotref.sandbox.telemetry.connection_options import (
    ReceiverSettings,
    client_options,
    subscription_granted,
    tls_context,
)
from iotref.sandbox.telemetry.inbox import Inbox

STOP_WAIT_SECONDS = 10.0
SUBSCRIBE_RETRY_SECONDS = 2.0
FORWARD_LINGER_SECONDS = 0.005  # a short wait for more, so that batches are not tiny


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
