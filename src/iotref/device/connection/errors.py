"""The errors of the MQTT connection: connecting, a takeover, publishing, subscribing."""

from __future__ import annotations

from iotref.device.errors import IotrefError
from iotref.device.onboarding.next_steps import NextStep


class MqttError(IotrefError):
    """Base class of the connection's errors."""


class ConnectionFailed(MqttError):
    """The connection could not be established.

    ``kind`` is one of ``"config"`` (unreadable settings or files), ``"tls"`` (handshake
    failed: wrong CA, certificate not accepted, host name mismatch), ``"refused"`` (the
    broker refused the CONNECT or closed the connection during it), ``"unreachable"``
    (DNS, no route, nothing listening, timeout) or ``"other"``. ``error_name`` is awscrt's
    error name when there is one. ``revoked`` is true when the broker refused the device
    certificate as revoked (a ``"tls"`` failure).
    """

    def __init__(
        self,
        reason: str,
        next_step: str | NextStep | None = None,
        *,
        kind: str = "other",
        error_name: str | None = None,
        revoked: bool = False,
    ) -> None:
        super().__init__(reason, next_step)
        self.kind = kind
        self.error_name = error_name
        self.revoked = revoked

    def copy(self) -> ConnectionFailed:
        """The same failure as a new exception (to raise it again from elsewhere)."""
        return ConnectionFailed(
            self.reason,
            self.hint or self.next_step,
            kind=self.kind,
            error_name=self.error_name,
            revoked=self.revoked,
        )


class ConnectionTakenOver(MqttError):
    """Another connection with the same client id took the session over, repeatedly (or the
    broker said so); this connection stopped instead of fighting for the session."""


class ConnectionClosed(MqttError):
    """The connection was stopped; no more operations are possible on it."""


class PublishFailed(MqttError):
    """A publish was not acknowledged: a PUBACK reason code >= 0x80 (``reason_code``), an
    error of the MQTT library (``error_name``, e.g. ``AWS_ERROR_MQTT5_PACKET_VALIDATION``),
    or the connection stopped / was taken over before it completed."""

    def __init__(
        self,
        reason: str,
        next_step: str | None = None,
        *,
        reason_code: int | None = None,
        error_name: str | None = None,
    ) -> None:
        super().__init__(reason, next_step)
        self.reason_code = reason_code
        self.error_name = error_name


class SubscribeFailed(MqttError):
    """The broker refused a subscription (a SUBACK reason code >= 0x80) or it could not be
    sent."""

    def __init__(
        self, reason: str, next_step: str | None = None, *, reason_codes: tuple[int, ...] = ()
    ) -> None:
        super().__init__(reason, next_step)
        self.reason_codes = reason_codes
