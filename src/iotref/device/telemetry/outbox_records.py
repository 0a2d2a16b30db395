"""The values that go into and come out of an outbox: entries to append, stored and
refused records, the outcome of an append, a statistics snapshot, and the two policies
(durability, overflow)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Durability = Literal["process", "power"]
"""``"process"``: a committed message survives a crash of the process; ``"power"``: also
a power cut (every commit is flushed). See :mod:`iotref.device.telemetry.outbox`."""
OverflowPolicy = Literal["reject_new", "drop_oldest"]
"""What an append does when the outbox is full: refuse the new message, or delete the
oldest ones until it fits."""

PendingMessage = tuple[int, str, bytes]
"""A stored message as the publisher needs it: ``(seq, topic, payload)``."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A message to append: topic, payload and an optional id for tracing (the
    ``sendereventuuid``)."""

    topic: str
    payload: bytes
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One stored message, as read back for inspection."""

    seq: int
    topic: str
    payload: bytes
    enqueued_at: float
    attempts: int
    message_id: str | None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append did: the new ``seq`` and how many of the oldest messages were
    dropped to make room (``drop_oldest`` only)."""

    seq: int
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class RefusedRecord:
    """A message the platform refused for good, kept in the ``refused`` table."""

    seq: int
    topic: str
    payload: bytes
    enqueued_at: float
    attempts: int
    message_id: str | None
    refused_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot. Counters (``accepted`` .. ``rejected``) count since the outbox was
    opened; ``depth``/``bytes``/``oldest_age_s`` describe what is stored now."""

    depth: int
    bytes: int
    oldest_age_s: float | None
    oldest_seq: int | None
    max_messages: int
    max_bytes: int
    overflow: OverflowPolicy
    durability: Durability
    accepted: int
    acked: int
    dropped_overflow: int
    rejected: int
    ack_rate: float
    """Acknowledged (removed) messages per second over the last ten seconds."""
    refused: int = 0
    """Messages moved to the ``refused`` table since the outbox was opened."""
    refused_kept: int = 0
    """Messages in the ``refused`` table now (earlier runs included)."""
