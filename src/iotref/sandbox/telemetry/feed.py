"""The monitor's live view of stored messages: what a stream shows of each message
(:func:`event_of`) and the in-process pub/sub of the live streams (:class:`TelemetryFeed`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from iotref.sandbox.telemetry.record import Record

FEED_QUEUE_SIZE = 2000


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
