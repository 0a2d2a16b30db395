"""The simulated devices' outbox: an ordered, acknowledge-to-remove queue in memory, and the
fleet-wide totals of all of them. Not durable: a simulator's messages are synthetic and a
crashed run is repeated, not resumed (docs/fleet.md, "What the devices share")."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from iotref.device.telemetry.outbox_errors import OutboxFull
from iotref.device.telemetry.outbox_records import (
    AppendResult,
    Durability,
    OutboxEntry,
    OutboxRecord,
    OutboxStats,
    OverflowPolicy,
    PendingMessage,
)

UNBOUNDED: Final = 1 << 62


@dataclass
class OutboxTotals:
    """Fleet-wide counters of every :class:`MemoryOutbox` (for the progress display)."""

    depth: int = 0
    appended: int = 0
    acked: int = 0


class MemoryOutbox:
    """An outbox kept in memory: an ordered queue of unacknowledged messages, removed on
    acknowledgement or refusal; a :class:`~iotref.device.telemetry.seams.MessageStore` for
    the publisher (:class:`~iotref.device.telemetry.publisher.Telemetry`). Not durable
    (``durability`` is ``"process"``), unbounded, and acknowledgements are never buffered."""

    __slots__ = (
        "_accepted",
        "_acked_count",
        "_closed",
        "_last_seq",
        "_refused_count",
        "_rows",
        "_totals",
    )

    # The same for every instance: on the class, not in each of thousands of instances.
    max_messages: Final = UNBOUNDED
    max_bytes: Final = UNBOUNDED
    overflow: Final[OverflowPolicy] = "reject_new"
    durability: Final[Durability] = "process"

    def __init__(self, totals: OutboxTotals | None = None) -> None:
        self._rows: dict[int, OutboxRecord] = {}
        self._last_seq = 0
        self._closed = False
        self._accepted = 0
        self._acked_count = 0
        self._refused_count = 0
        self._totals = totals if totals is not None else OutboxTotals()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def append(self, topic: str, payload: bytes, message_id: str | None = None) -> AppendResult:
        """Queue one message; its ``seq`` is one more than the last one's."""
        seq = self._last_seq + 1
        self._last_seq = seq
        self._rows[seq] = OutboxRecord(seq, topic, payload, time.time(), 0, message_id)
        self._accepted += 1
        self._totals.depth += 1
        self._totals.appended += 1
        return AppendResult(seq, 0)

    def append_many(self, entries: Sequence[OutboxEntry]) -> list[AppendResult]:
        return [self.append(e.topic, e.payload, e.message_id) for e in entries]

    def append_each(self, entries: Sequence[OutboxEntry]) -> list[AppendResult | OutboxFull]:
        """The outcome of each append: always a result (the queue is unbounded)."""
        return list(self.append_many(entries))

    def read_batch(self, after_seq: int = 0, limit: int = 500) -> list[OutboxRecord]:
        """Up to ``limit`` queued messages with ``seq > after_seq``, in ``seq`` order."""
        out: list[OutboxRecord] = []
        for seq, record in self._rows.items():
            if seq > after_seq:
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def read_pending(self, after_seq: int = 0, limit: int = 500) -> list[PendingMessage]:
        """:meth:`read_batch` as bare ``(seq, topic, payload)`` tuples."""
        return [(r.seq, r.topic, r.payload) for r in self.read_batch(after_seq, limit)]

    def mark_attempted(self, first_seq: int, last_seq: int) -> None:
        """Attempts are not counted here."""

    def __len__(self) -> int:
        return len(self._rows)

    def ack(self, seq: int) -> None:
        if self._rows.pop(seq, None) is not None:
            self._acked_count += 1
            self._totals.depth -= 1
            self._totals.acked += 1

    def ack_many(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self.ack(seq)

    def flush_acks(self) -> int:
        return 0

    def refuse(self, seq: int, reason: str) -> bool:
        """A message the platform refused for good leaves the queue (counted; the
        simulator keeps no table of them)."""
        if self._rows.pop(seq, None) is None:
            return False
        self._refused_count += 1
        self._totals.depth -= 1
        return True

    @property
    def pending_acks(self) -> int:
        """Always 0: an acknowledgement removes the message at once."""
        return 0

    def stats(self) -> OutboxStats:
        oldest = next(iter(self._rows.values()), None)
        return OutboxStats(
            depth=len(self._rows),
            bytes=sum(len(r.payload) + len(r.topic) for r in self._rows.values()),
            oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest.enqueued_at),
            oldest_seq=None if oldest is None else oldest.seq,
            max_messages=self.max_messages,
            max_bytes=self.max_bytes,
            overflow=self.overflow,
            durability=self.durability,
            accepted=self._accepted,
            acked=self._acked_count,
            dropped_overflow=0,
            rejected=0,
            ack_rate=0.0,
            refused=self._refused_count,
            refused_kept=0,
        )

    @property
    def depth(self) -> int:
        return len(self._rows)

    @property
    def last_seq(self) -> int:
        return self._last_seq
