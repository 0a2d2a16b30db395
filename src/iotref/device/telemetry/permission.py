"""The permission to send telemetry (the shadow's ``sendTelemetryData``): a settable
flag, the shadow as a source, and the policy that says what a send does without it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from iotref.device.telemetry.seams import ShadowPermissionLike

log = logging.getLogger(__name__)

PermissionPolicy = Literal["hold", "drop"]
"""What ``send()`` does while the permission is withdrawn: ``"hold"`` queues the message
(published once it returns), ``"drop"`` discards it after validating it."""


class PermissionFlag:
    """A settable :class:`~iotref.device.telemetry.seams.PermissionSource`; listeners hear
    every change."""

    def __init__(self, allowed: bool = False) -> None:
        self._allowed = allowed
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def allowed(self) -> bool:
        return self._allowed

    def set(self, allowed: bool) -> None:
        """Change the permission (``allowed`` is taken as ``allowed is True``)."""
        allowed = allowed is True
        if allowed == self._allowed:
            return
        self._allowed = allowed
        for cb in list(self._listeners):
            try:
                cb(allowed)
            except Exception:
                log.exception("permission listener failed")

    def add_listener(self, cb: Callable[[bool], None]) -> None:
        self._listeners.append(cb)


class ShadowPermission:
    """A :class:`~iotref.device.telemetry.seams.PermissionSource` reading a shadow sync's
    ``send_telemetry_allowed`` (``False`` until the shadow was read) and listening to its
    changes."""

    __slots__ = ("_shadow",)

    def __init__(self, shadow: ShadowPermissionLike) -> None:
        self._shadow = shadow

    @property
    def allowed(self) -> bool:
        return self._shadow.send_telemetry_allowed is True

    def add_listener(self, cb: Callable[[bool], None]) -> None:
        self._shadow.on_send_telemetry_changed(cb)
