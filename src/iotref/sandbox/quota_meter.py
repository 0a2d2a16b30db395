"""Per-connection publish rate and throughput against AWS IoT Core's quotas, measured as
the platform receives the messages (Mosquitto cannot throttle, so nothing is refused): the
ingestion and the shadow service feed one :class:`QuotaMeter`, keyed by client id. What
counts as "would have been throttled" (a token bucket of one second's quota, plus
:data:`ARRIVAL_SLACK_SECONDS`) and the one-second windows kept beside it:
docs/configuration.md, "Publish rate and throughput: measured, not enforced".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from iotref.protocol.token_bucket import EPSILON, TokenBucket

ARRIVAL_SLACK_SECONDS = 0.05
"""How far apart in arrival time messages may be stamped together without being counted
(the meter's resolution): the buckets hold this much more than one second's quota."""


def _bucket(rate: int, now: float) -> TokenBucket | None:
    if not rate:
        return None
    return TokenBucket(rate, capacity=rate * (1 + ARRIVAL_SLACK_SECONDS), now=now)


class _Connection:
    """What the meter keeps for one client id."""

    __slots__ = (
        "byte_bucket",
        "bytes",
        "messages",
        "peak_bytes",
        "peak_messages",
        "prev_bytes",
        "prev_messages",
        "prev_second",
        "publish_bucket",
        "second",
        "second_bytes",
        "second_messages",
        "seconds_over",
        "throttled",
        "throttled_bytes",
    )

    def __init__(self, publish_rate: int, throughput: int, now: float) -> None:
        self.publish_bucket = _bucket(publish_rate, now)
        self.byte_bucket = _bucket(throughput, now)
        self.messages = 0
        self.bytes = 0
        self.throttled = 0
        self.throttled_bytes = 0
        self.second = int(now)
        self.second_messages = 0
        self.second_bytes = 0
        self.prev_second = self.second - 1
        self.prev_messages = 0
        self.prev_bytes = 0
        self.peak_messages = 0
        self.peak_bytes = 0
        self.seconds_over = 0


@dataclass(frozen=True)
class QuotaLimits:
    """The per-connection quotas measured against (0: not measured)."""

    publish_rate: int
    throughput: int


class QuotaMeter:
    """Thread-safe: the ingestion's thread and the event loop both add to it."""

    def __init__(self, publish_rate: int, throughput: int) -> None:
        self.limits = QuotaLimits(publish_rate, throughput)
        self._connections: dict[str, _Connection] = {}
        self._lock = threading.Lock()

    def add(self, client_id: str, messages: int, size: int, now: float) -> None:
        """``messages`` publishes of ``size`` bytes in all from ``client_id`` at ``now``."""
        with self._lock:
            self._add(client_id, messages, size, now)

    def add_batch(self, now: float, counts: dict[str, list[int]]) -> None:
        """Several client ids' ``[messages, bytes]`` that arrived together at ``now``."""
        with self._lock:
            for client_id, (messages, size) in counts.items():
                self._add(client_id, messages, size, now)

    def _add(self, client_id: str, messages: int, size: int, now: float) -> None:
        if messages <= 0:
            return
        entry = self._connections.get(client_id)
        if entry is None:
            entry = _Connection(self.limits.publish_rate, self.limits.throughput, now)
            self._connections[client_id] = entry
        second = int(now)
        if second > entry.second:
            self._close_second(entry)
            entry.second = second
        entry.messages += messages
        entry.bytes += size
        entry.second_messages += messages
        entry.second_bytes += size
        admitted = messages
        if entry.publish_bucket is not None:
            admitted = min(admitted, int(entry.publish_bucket.refill(now) + EPSILON))
        if entry.byte_bucket is not None:
            each = size / messages
            room = entry.byte_bucket.refill(now)
            admitted = min(admitted, messages if each == 0 else int(room / each + EPSILON))
        admitted = max(admitted, 0)
        if entry.publish_bucket is not None:
            entry.publish_bucket.tokens -= admitted
        if entry.byte_bucket is not None:
            entry.byte_bucket.tokens -= admitted * (size / messages)
        refused = messages - admitted
        if refused:
            entry.throttled += refused
            entry.throttled_bytes += round(refused * size / messages)

    def _close_second(self, entry: _Connection) -> None:
        """The second ``entry.second`` is over: remember it and start a new one."""
        entry.prev_second = entry.second
        entry.prev_messages = entry.second_messages
        entry.prev_bytes = entry.second_bytes
        entry.peak_messages = max(entry.peak_messages, entry.second_messages)
        entry.peak_bytes = max(entry.peak_bytes, entry.second_bytes)
        if self._over(entry.second_messages, entry.second_bytes):
            entry.seconds_over += 1
        entry.second_messages = 0
        entry.second_bytes = 0

    def _over(self, messages: int, size: int) -> bool:
        publish_rate, throughput = self.limits.publish_rate, self.limits.throughput
        return bool(publish_rate and messages > publish_rate) or bool(
            throughput and size > throughput
        )

    def snapshot(self, client_id: str, now: float) -> dict[str, Any]:
        """The client id's figures at ``now`` (zeros for one never seen)."""
        with self._lock:
            entry = self._connections.get(client_id)
            return self._snapshot(entry, now)

    def snapshots(self, now: float) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {cid: self._snapshot(entry, now) for cid, entry in self._connections.items()}

    def _snapshot(self, entry: _Connection | None, now: float) -> dict[str, Any]:
        limits = {
            "publish_limit": self.limits.publish_rate,
            "throughput_limit": self.limits.throughput,
        }
        if entry is None:
            return {
                **limits,
                "messages": 0,
                "bytes": 0,
                "rate": 0,
                "bytes_rate": 0,
                "peak_rate": 0,
                "peak_bytes_rate": 0,
                "seconds_over": 0,
                "throttled": 0,
                "throttled_bytes": 0,
            }
        last = int(now) - 1
        # The rate is the last complete second's: the open one if it has ended, else the
        # one before. The open second counts toward the peak and the seconds over as far
        # as it got (its count only grows).
        if entry.second <= last:
            ended = entry.second == last
            rate = entry.second_messages if ended else 0
            bytes_rate = entry.second_bytes if ended else 0
        else:
            in_prev = entry.prev_second == last
            rate = entry.prev_messages if in_prev else 0
            bytes_rate = entry.prev_bytes if in_prev else 0
        open_over = self._over(entry.second_messages, entry.second_bytes)
        peak = max(entry.peak_messages, entry.second_messages)
        peak_bytes = max(entry.peak_bytes, entry.second_bytes)
        return {
            **limits,
            "messages": entry.messages,
            "bytes": entry.bytes,
            "rate": rate,
            "bytes_rate": bytes_rate,
            "peak_rate": peak,
            "peak_bytes_rate": peak_bytes,
            "seconds_over": entry.seconds_over + int(open_over),
            "throttled": entry.throttled,
            "throttled_bytes": entry.throttled_bytes,
        }


def count_by_client(records: list[Any]) -> dict[str, list[int]]:
    """``{client id: [messages, bytes]}`` of a batch of ingested records whose topic
    checked out (the topic names the publisher); bytes are topic plus payload."""
    counts: dict[str, list[int]] = {}
    for record in records:
        if record.topic_problem is None:
            entry = counts.get(record.client_id)
            size = len(record.topic) + len(record.body)
            if entry is None:
                counts[record.client_id] = [1, size]
            else:
                entry[0] += 1
                entry[1] += size
    return counts
