"""Group commit: the ``send()`` calls of several tasks that wait at the same time share
one commit of the message store (one flush with ``durability="power"``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final

from iotref.device.telemetry.outbox_records import AppendResult, OutboxEntry
from iotref.device.telemetry.seams import MessageStore

SOLO_LIMIT: Final = 4
"""Group commits of a single message in a row after which sends stop being grouped."""

_Member = tuple[bytes, str | None, asyncio.Future[AppendResult]]


class GroupCommit:
    """Groups the appends of concurrent senders to one topic of ``store``.

    Grouping starts when a second task sends and stops after :data:`SOLO_LIMIT` groups in
    a row held one message only; a single sender appends directly. ``on_stored(seq,
    payload, dropped)`` hears every message a group stored, before its sender resumes."""

    __slots__ = ("_group", "_grouping", "_last_sender", "_on_stored", "_solos", "_store", "_topic")

    def __init__(
        self, store: MessageStore, topic: str, on_stored: Callable[[int, bytes, int], None]
    ) -> None:
        self._store = store
        self._topic = topic
        self._on_stored = on_stored
        self._group: list[_Member] | None = None
        self._grouping = False
        self._solos = 0
        self._last_sender: asyncio.Task[Any] | None = None

    def wanted(self) -> bool:
        """Whether the current task's send should join a group (rather than append
        directly): a group is open or grouping is on, or a second task sends."""
        if self._group is not None or self._grouping:
            return True
        task = asyncio.current_task()
        if task is not self._last_sender:
            if self._last_sender is not None:
                self._grouping = True
                self._solos = 0
                self._last_sender = None
                return True
            self._last_sender = task
        return False

    async def append(self, payload: bytes, message_id: str | None) -> AppendResult:
        """Store the message in the group commit of this loop pass: every append that gets
        here before the commit runs (at the end of the pass) joins it, and each returns
        once the one transaction committed. Outcomes are those of separate appends in call
        order (see :meth:`MessageStore.append_each`). A caller cancelled before the commit
        is left out of it."""
        loop = asyncio.get_running_loop()
        group = self._group
        if group is None:
            group = self._group = []
            loop.call_soon(self._commit)
        waiter: asyncio.Future[AppendResult] = loop.create_future()
        group.append((payload, message_id, waiter))
        return await waiter

    def _commit(self) -> None:
        group, self._group = self._group or [], None
        group = [member for member in group if not member[2].done()]  # cancelled callers
        if len(group) > 1:
            self._solos = 0
        else:
            self._solos += 1
            if self._solos >= SOLO_LIMIT:
                self._grouping = False
        if not group:
            return
        topic = self._topic
        outcomes: Sequence[AppendResult | BaseException]
        try:
            outcomes = self._store.append_each(
                [OutboxEntry(topic, payload, mid) for payload, mid, _ in group]
            )
        except Exception as exc:  # closed, SQLite: every caller gets it
            outcomes = [exc] * len(group)
        for (payload, _, waiter), outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
                continue
            self._on_stored(outcome.seq, payload, outcome.dropped)
            waiter.set_result(outcome)
