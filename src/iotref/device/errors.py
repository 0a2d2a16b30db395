"""The device library's exceptions: one small hierarchy under :class:`IotrefError`, the
client's own (:class:`ClientError` and below: what ``send()`` refuses) included.

Every error carries a ``reason`` (what went wrong, one sentence) and, where there is one, a
``next_step`` (what the person should do); a next step that names ``iotref`` commands is a
:class:`~iotref.device.onboarding.next_steps.NextStep` too (``hint``), which a command line renders
with the person's own environment and store options. Messages never contain secrets: no tokens,
device codes, refresh tokens or key material, and no raw answers of the token endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from iotref.device.onboarding.next_steps import NextStep, Selection

if TYPE_CHECKING:
    from iotref.protocol.message_schemas import ValidationIssue


class IotrefError(Exception):
    """Base class of every expected failure of the device library."""

    def __init__(self, reason: str, next_step: str | NextStep | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = next_step if isinstance(next_step, NextStep) else None
        self.next_step = next_step.render() if isinstance(next_step, NextStep) else next_step

    def __str__(self) -> str:
        return self.reason

    def next_step_for(self, selection: Selection | None) -> str | None:
        """The next step, its commands with ``selection``'s options where it names any."""
        if self.hint is not None and selection is not None:
            return self.hint.render(selection)
        return self.next_step

    def one_line(self, selection: Selection | None = None) -> str:
        """The reason and the next step on one line, for a CLI (commands in the next step
        carry ``selection``'s options)."""
        text = " ".join(self.reason.split())
        next_step = self.next_step_for(selection)
        if next_step:
            text += f" (next: {' '.join(next_step.split())})"
        return text


class ConfigurationError(IotrefError):
    """An environment, option or configuration file that cannot be used."""


class NetworkError(IotrefError):
    """A service could not be reached or did not answer in time."""


class ProtocolError(IotrefError):
    """A service answered with something the contract does not describe."""


class AuthError(IotrefError):
    """Base class of login and token failures."""


class AuthorizationDenied(AuthError):
    """The person denied the device's request (``access_denied``)."""


class AuthorizationExpired(AuthError):
    """The device code expired before the person approved it (``expired_token``)."""


class AuthorizationFailed(AuthError):
    """The directory refused the device flow for another reason (``invalid_client``...)."""

    def __init__(
        self, reason: str, next_step: str | NextStep | None = None, *, error: str = ""
    ) -> None:
        super().__init__(reason, next_step)
        self.error = error


class LoginRequired(AuthError):
    """No usable tokens for this environment: never logged in, logged out, or the refresh
    token was refused (spent, expired or revoked)."""


class ApiError(IotrefError):
    """A directory, configuration or provisioning call answered with an error status."""

    def __init__(
        self, reason: str, next_step: str | NextStep | None = None, *, status: int = 0
    ) -> None:
        super().__init__(reason, next_step)
        self.status = status


class PermissionDenied(ApiError):
    """403: the token lacks a scope, or is the wrong kind of bearer."""


class NotFound(ApiError):
    """404: the machine, ownership or site does not exist (for this organization)."""


class ValidationFailed(ApiError):
    """422: the service refused the values, e.g. a duplicate serial number."""

    def __init__(
        self,
        reason: str,
        next_step: str | NextStep | None = None,
        *,
        status: int = 422,
        errors: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(reason, next_step, status=status)
        self.errors: dict[str, list[str]] = {k: list(v) for k, v in (errors or {}).items()}


class ProvisioningError(IotrefError):
    """Onboarding cannot go on: no site, a machine that conflicts with the store..."""


class StoreError(IotrefError):
    """A certificate or token store that is missing, broken, foreign or not writable."""

    def __init__(
        self, reason: str, next_step: str | NextStep | None = None, *, path: Path | None = None
    ) -> None:
        super().__init__(reason, next_step)
        self.path = path


class ClientError(IotrefError):
    """Base class of the client facade's own errors. (Connecting raises
    :class:`~iotref.device.connection.ConnectionFailed`, a broken store
    :class:`StoreError`, a refused shadow :class:`~iotref.device.shadow.errors.ShadowRejected`:
    all :class:`IotrefError` too.)"""


class ClientClosed(ClientError):
    """The client is not started, or closed: nothing can be sent."""


class OutboxBusy(ClientError):
    """Another process (or client) holds this store's outbox, i.e. runs as this machine."""


class SendRefused(ClientError):
    """A message was not accepted; nothing was queued and the caller still has it."""


class InvalidMessageError(SendRefused, ValueError):
    """The message is not valid against the platform schemas. ``issues`` lists every
    problem (JSON path and reason); the first is in the message."""

    def __init__(self, issues: Sequence[ValidationIssue]) -> None:
        self.issues: tuple[ValidationIssue, ...] = tuple(issues)
        first = str(self.issues[0]) if self.issues else "invalid message"
        more = len(self.issues) - 1
        super().__init__(
            f"invalid message: {first}" + (f" (and {more} more)" if more > 0 else ""),
            "fix the message; nothing was queued",
        )


class MessageTooLargeError(SendRefused, ValueError):
    """The encoded message is over the platform's payload limit (``size`` and ``limit``
    in bytes); it was not queued."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message too large: {size:,} bytes encoded, over the platform's limit of "
            f"{limit:,} bytes",
            "send less in one message (split it); nothing was queued",
        )
        self.size = size
        self.limit = limit


class OutboxFullError(SendRefused):
    """The outbox is full and its overflow policy is ``reject_new``."""

    def __init__(self, reason: str, *, depth: int) -> None:
        super().__init__(
            reason,
            "wait until the platform acknowledged more, or raise max_messages / max_bytes",
        )
        self.depth = depth
