"""Whether a disconnect means that another connection took the session over: the
broker's SESSION_TAKEN_OVER, or a run of short-lived connections the broker hung up on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

SESSION_TAKEN_OVER = 0x8E
"""The DISCONNECT reason code with which AWS IoT Core closes a session taken over."""
HANGUP_ERRORS = frozenset(
    {"AWS_ERROR_MQTT_UNEXPECTED_HANGUP", "AWS_IO_SOCKET_CLOSED", "AWS_IO_BROKEN_PIPE"}
)
"""Disconnects that look like the broker closing the socket on purpose (what Mosquitto does
to the old connection on a session takeover), as opposed to timeouts."""


class TakeoverDetector:
    """Decides whether a disconnect means that another connection took the session over.

    A DISCONNECT with reason code 0x8E (SESSION_TAKEN_OVER, what AWS IoT Core sends) is a
    takeover. Brokers that just close the socket (Mosquitto 2.0) are recognized by a
    heuristic: ``limit`` hang-ups within ``window_s`` seconds, each of a connection that
    had been up for less than ``uptime_s``. ``limit`` 0 turns the heuristic off.
    Thread-safe; times come from ``clock`` (monotonic seconds).
    """

    # One per connection: no instance dict (see the Connection's ``__slots__``).
    __slots__ = ("_clock", "_connected_at", "_lock", "_short", "limit", "uptime_s", "window_s")

    def __init__(
        self,
        limit: int,
        window_s: float,
        uptime_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.uptime_s = uptime_s
        self._clock = clock
        self._lock = threading.Lock()
        self._connected_at: float | None = None
        # The times of the recent short-lived hang-ups, oldest first: at most a few (a
        # list, not a deque: an empty deque already takes a 760-byte block).
        self._short: list[float] = []

    def connected(self) -> None:
        with self._lock:
            self._connected_at = self._clock()

    def disconnected(self, error_name: str | None, reason_code: int | None) -> str | None:
        """Record a disconnect; return why it is a takeover, or ``None``."""
        with self._lock:
            now = self._clock()
            connected_at, self._connected_at = self._connected_at, None
            if reason_code == SESSION_TAKEN_OVER:
                return "the broker reported SESSION_TAKEN_OVER"
            if self.limit <= 0 or connected_at is None:
                return None
            if error_name not in HANGUP_ERRORS or now - connected_at > self.uptime_s:
                return None
            short = self._short
            short.append(now)
            expired = 0
            while expired < len(short) and now - short[expired] > self.window_s:
                expired += 1
            del short[:expired]
            if len(short) >= self.limit:
                return (
                    f"the broker closed {len(short)} connections within "
                    f"{self.window_s:g} s, each soon after it was accepted: another process "
                    "is probably using this identity (or the network drops every new "
                    "connection)"
                )
            return None
