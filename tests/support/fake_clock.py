"""A clock a test moves by hand: pass it where code takes a ``clock`` callable."""

from __future__ import annotations


class FakeClock:
    """Returns ``now`` when called; the test sets or :meth:`advance`\\ s it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
