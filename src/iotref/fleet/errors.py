"""The fleet simulator's errors."""

from __future__ import annotations

from iotref.device.errors import IotrefError


class FleetError(IotrefError):
    """A fleet run cannot start or went wrong as a whole."""


class FleetLimitError(FleetError):
    """The machine's or the broker's limits cannot hold the fleet; the message has the
    numbers."""
