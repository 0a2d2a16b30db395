"""Storing checked records: one transaction per batch, then the live feed when someone
watches, then the store's retention pass when one is due."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from iotref.sandbox.telemetry.feed import event_of
from iotref.sandbox.telemetry.record import Record
from iotref.sandbox.telemetry.store import TelemetryStore

log = logging.getLogger(__name__)


class BatchWriter:
    """Stores a batch of records (one transaction) and hands them to the live feed when
    someone is watching; called by the
    :class:`~iotref.sandbox.telemetry.receiver.Receiver`'s thread."""

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
