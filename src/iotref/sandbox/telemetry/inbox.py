"""Where the receiving process's awscrt callbacks leave each message until it is forwarded
to the sandbox process."""

from __future__ import annotations

import threading
import time
from collections import deque

from awscrt import mqtt5

from iotref.device.thread_state import keep_thread_state

INBOX_LIMIT = 200_000  # messages waiting in the receiving process before callbacks wait
FORWARD_LIMIT = 2000  # messages per batch sent to the sandbox process


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
