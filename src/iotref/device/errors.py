"""The device library's exceptions: one small hierarchy under :class:`IotrefError`.

Every error carries a ``reason`` (what went wrong, one sentence) and, where there is one, a
``next_step`` (what the person should do); a next step that names ``iotref`` commands is a
:class:`~iotref.device.onboarding.next_steps.NextStep` too (``hint``), which a command line renders
with the person's own environment and store options. Messages never contain secrets: no tokens,
device codes, refresh tokens or key material, and no raw answers of the token endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from iotref.device.onboarding.next_steps import NextStep, Selection


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
