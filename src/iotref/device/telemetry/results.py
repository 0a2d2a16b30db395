"""What the telemetry publisher reports: the outcome of a send, its refusals (closed, too
large) and a snapshot of its statistics."""

from __future__ import annotations

from dataclasses import dataclass

from iotref.device.stdlib_compat import StrEnum
from iotref.device.telemetry.permission import PermissionPolicy


class SendStatus(StrEnum):
    """What :meth:`~iotref.device.telemetry.publisher.Telemetry.send` did with a valid
    message."""

    QUEUED = "queued"
    """Stored in the outbox; it will be published (at least once, in order)."""
    DROPPED_NO_PERMISSION = "dropped_no_permission"
    """Not stored: no permission to send telemetry and the policy is ``drop``."""


@dataclass(frozen=True, slots=True)
class SendResult:
    status: SendStatus
    seq: int | None = None
    """The outbox sequence number (queued messages only)."""
    evicted: int = 0
    """Older messages dropped from the outbox to make room (``drop_oldest`` only)."""

    @property
    def queued(self) -> bool:
        return self.status is SendStatus.QUEUED


class TelemetryClosed(RuntimeError):
    """``send()`` after ``close()``."""


class MessageTooLarge(ValueError):
    """The encoded message is larger than the platform accepts; nothing was queued."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the message is {size:,} bytes encoded, over the platform's limit of "
            f"{limit:,} bytes per message"
        )
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class TelemetryStats:
    """A snapshot of the publisher and its outbox."""

    connected: bool
    permission: bool
    policy: PermissionPolicy
    queued: int
    """Messages accepted into the outbox by this object."""
    published: int
    """Publish calls, re-publications included."""
    republished: int
    acked: int
    """PUBACKs received (a message re-published twice may be acked twice)."""
    delivered: int
    """Messages acknowledged and removed from the outbox, each counted once."""
    failed: int
    """Publishes that failed (connection loss, error reason code)."""
    dropped_no_permission: int
    rejected_invalid: int
    rejected_full: int
    rejected_too_large: int
    """``send()`` calls refused because the message is over the payload limit."""
    refused: int
    """Messages the platform refused for good, moved out of the queue by this object."""
    refused_kept: int
    """Messages in the outbox's ``refused`` table (earlier runs included)."""
    dropped_overflow: int
    in_flight: int
    window: int
    depth: int
    bytes: int
    oldest_age_s: float | None
    ack_rate: float
    """Messages removed from the outbox per second (last ten seconds)."""
    last_error: str | None
