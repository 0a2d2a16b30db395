"""The errors of the device's shadow requests and sync."""

from __future__ import annotations

from iotref.device.errors import IotrefError


class ShadowError(IotrefError):
    """Base class of shadow failures."""


class ShadowRejected(ShadowError):
    """The shadow service answered on ``/rejected``: ``code`` (HTTP-style) and ``message``
    as documented in "Device Shadow error messages"."""

    def __init__(self, code: int, message: str, client_token: str | None = None) -> None:
        super().__init__(f"shadow request rejected: {code} {message}")
        self.code = code
        self.message = message
        self.client_token = client_token


class ShadowTimeout(ShadowError):
    """No answer to a shadow request in time (not connected, or the service is slow)."""


class DesiredChangeRefused(ShadowError):
    """Raise from a desired-change handler to refuse the change (or return
    :class:`~iotref.device.shadow.desired.Refuse`)."""


__all__ = ["DesiredChangeRefused", "ShadowError", "ShadowRejected", "ShadowTimeout"]
