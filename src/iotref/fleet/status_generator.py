"""The ``Status`` readings a fleet device sends: a small, deterministic generator per
device (production, idle and non-productive phases; growing counters)."""

from __future__ import annotations

from typing import Final

from iotref.device.telemetry.messages import DeviceStatusV2, StatusV2


class StatusGenerator:
    """Plausible ``Status`` v2 readings of one simulated press: production at a speed
    around its nominal one, with idle and non-productive phases in between; the counters
    grow. Deterministic per ``seed`` and small (no random generator object per device:
    thousands of them would cost megabytes)."""

    __slots__ = ("_state", "job", "nominal", "step", "total")

    _NOMINAL: Final = (10_000, 12_000, 15_000, 18_000)

    def __init__(self, seed: int) -> None:
        self._state = (seed * 2654435761 + 1) & 0xFFFFFFFF
        self.nominal = self._NOMINAL[self._next() % len(self._NOMINAL)]
        self.total = 1_000_000 + self._next() % 49_000_000
        self.job = 0
        self.step = self._next() % 8

    def _next(self) -> int:
        # xorshift32: good enough for plausible noise, and a few bytes of state.
        x = self._state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self._state = x
        return x

    def next(self) -> StatusV2:
        """The next reading."""
        self.step += 1
        phase = self.step % 8
        if phase < 6:
            status = DeviceStatusV2.PRODUCTION
            speed = float(round(self.nominal * (0.85 + 0.15 * (self._next() % 1000) / 1000)))
            made = int(speed / 360)  # sheets in ten seconds
            self.total += made
            self.job += made
        else:
            status = DeviceStatusV2.IDLE if phase == 6 else DeviceStatusV2.NON_PRODUCTIVE
            speed = 0.0
            if phase == 7:
                self.job = 0
        return StatusV2(
            status=status,
            speed=speed,
            totalproductioncounter=float(self.total),
            productioncounter=float(self.job),
            statusdetails="simulated by iotref fleet",
        )
