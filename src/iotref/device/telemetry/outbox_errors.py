"""The errors an outbox raises: full, locked by another process, closed."""

from __future__ import annotations


class OutboxError(RuntimeError):
    """Base class of the outbox's errors."""


class OutboxFull(OutboxError):
    """The message does not fit and the policy is ``reject_new`` (or it is larger than the
    whole outbox). Nothing was written; the caller still owns the message."""

    def __init__(self, reason: str, *, depth: int, size: int) -> None:
        super().__init__(reason)
        self.depth = depth
        self.size = size


class OutboxLocked(OutboxError):
    """Another process (or another :class:`~iotref.device.telemetry.outbox.Outbox`
    object) holds this outbox."""


class OutboxClosed(OutboxError):
    """The outbox was closed."""
