"""The publish pace and the connect gate on a fake clock: a publisher that sends whatever
the limiter lets go never puts more than the quota into a one-second window (fixed
windows as the platform counts them, and sliding ones), and still reaches 95 % of the
quota, also when its event loop wakes late; "quota exceeded" halves the pace and it comes
back; a task waiting for its turn is left one."""

from __future__ import annotations

import asyncio
import bisect
import math
import random

import pytest

from iotref.device.connection.rate_limit import (
    HEADROOM,
    MIN_PACE_SHARE,
    RECOVERY_PER_S,
    THROTTLE_EVERY_S,
    ConnectGate,
    PublishLimiter,
    pacing,
)
from iotref.protocol import limits

QUOTA = limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION
BYTES = limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def greedy(
    limiter: PublishLimiter,
    clock: Clock,
    seconds: float,
    size: int = 300,
    lateness_s: float = 0.0,
    rng: random.Random | None = None,
) -> list[tuple[float, int]]:
    """Publish whatever the limiter lets go, as the telemetry drainer does: ask how many
    may go, send them (each charged), else sleep the delay (plus up to ``lateness_s`` of
    an event loop waking late). Returns ``(time, size)`` of every publish."""
    rng = rng or random.Random(1)
    sent: list[tuple[float, int]] = []
    end = clock.now + seconds
    while clock.now < end:
        allowed = limiter.ready()
        room = limiter.byte_room()
        published = 0
        while published < allowed and room >= 0:
            limiter.spend(size)
            sent.append((clock.now, size))
            room -= size
            published += 1
        if published == 0:
            clock.now += max(limiter.delay(), 0.001) + rng.uniform(0, lateness_s)
    return sent


def busiest_fixed_window(times: list[float]) -> int:
    """The most publishes in one wall-clock second (what the sandbox's meter counts)."""
    counts: dict[int, int] = {}
    for t in times:
        counts[int(t)] = counts.get(int(t), 0) + 1
    return max(counts.values())


def busiest_sliding_window(times: list[float], length: float = 1.0) -> int:
    """The most publishes in any closed interval of ``length`` seconds."""
    ordered = sorted(times)
    return max(bisect.bisect_right(ordered, t + length) - i for i, t in enumerate(ordered))


def achieved_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def test_pacing_of_the_platform_quota() -> None:
    rate, burst = pacing(QUOTA)
    assert (rate, burst) == (pytest.approx(96.9), 2.0)
    # Whole publishes: a window holds at most floor(r + b) = 98, 2 % below the quota.
    assert math.floor(rate + burst) == QUOTA * (1 - HEADROOM) == 98
    # Bytes are not whole: r + b is 98 % of the quota itself.
    byte_rate, byte_burst = pacing(BYTES, whole=False)
    assert byte_rate + byte_burst == pytest.approx(BYTES * (1 - HEADROOM))


@pytest.mark.parametrize("limit", [1, 2, 3, 10, 50, 100, 250, 1000])
def test_no_one_second_window_holds_more_than_the_limit(limit: int) -> None:
    clock = Clock()
    limiter = PublishLimiter(limit, None, clock=clock)
    sent = [t for t, _ in greedy(limiter, clock, 30)]
    # 2 % below the limit; a limit of one or two a second gets half of it (see pacing()).
    most = math.floor(limit * (1 - HEADROOM)) if limit >= 3 else limit
    assert busiest_sliding_window(sent) <= most
    assert busiest_fixed_window(sent) <= most
    # The pace itself is reached; it is 95 % of the limit or more from 100 a second up
    # (below, the burst of at least one publish is a larger share of the limit).
    assert achieved_rate(sent) >= 0.99 * pacing(limit)[0]
    if limit >= 100:
        assert achieved_rate(sent) >= 0.95 * limit


@pytest.mark.parametrize("lateness_ms", [0, 1, 4, 8])
def test_a_loop_that_wakes_late_still_drains_at_95_percent_of_the_quota(lateness_ms: int) -> None:
    # The burst of 2 makes up for wake-ups up to a few milliseconds late: the tokens that
    # came in meanwhile are not lost.
    clock = Clock()
    limiter = PublishLimiter(QUOTA, BYTES, clock=clock)
    sent = [t for t, _ in greedy(limiter, clock, 60, lateness_s=lateness_ms / 1000)]
    assert busiest_sliding_window(sent) <= QUOTA * (1 - HEADROOM)
    assert achieved_rate(sent) >= 0.95 * QUOTA


@pytest.mark.parametrize("size", [1_000, 10_000, 64 * 1024, 128 * 1024])
def test_throughput_is_paced_in_bytes(size: int) -> None:
    clock = Clock()
    limiter = PublishLimiter(QUOTA, BYTES, clock=clock)
    sent = greedy(limiter, clock, 30, size=size)
    times = [t for t, _ in sent]
    per_second: dict[int, int] = {}
    for t, n in sent:
        per_second[int(t)] = per_second.get(int(t), 0) + n
    if size * QUOTA <= BYTES:  # the publish quota binds first
        assert achieved_rate(times) >= 0.95 * QUOTA
    else:  # the byte quota binds: ~96 % of it on average
        assert (len(sent) - 1) * size / (times[-1] - times[0]) >= 0.95 * BYTES
    # A window holds at most the paced bytes plus one message: the byte bucket lets a
    # message larger than itself go into debt (it could never go otherwise).
    bound = BYTES * (1 - HEADROOM) + size
    assert max(per_second.values()) <= bound
    if size <= BYTES * 0.02:
        assert max(per_second.values()) <= BYTES


def test_quota_exceeded_halves_the_pace_once_a_second_and_it_comes_back() -> None:
    clock = Clock()
    limiter = PublishLimiter(QUOTA, BYTES, clock=clock)
    full = limiter.full_pace
    assert full == pytest.approx(96.9) and limiter.pace == full and not limiter.slowed
    assert limiter.throttled()
    assert limiter.pace == full / 2 and limiter.slowed
    # Answers to publishes sent before the pace changed do not lower it again.
    clock.now += THROTTLE_EVERY_S / 2
    assert not limiter.throttled()
    assert limiter.throttle_answers == 2
    clock.now += THROTTLE_EVERY_S / 2
    pace = limiter.pace
    assert pace is not None and pace == pytest.approx(full / 2 + full * RECOVERY_PER_S)
    assert limiter.throttled()  # a second later: lowered again
    assert limiter.pace == pytest.approx(pace / 2)
    for _ in range(20):  # answered every second: halved each time, never below the floor
        clock.now += THROTTLE_EVERY_S
        limiter.throttled()
        assert limiter.pace is not None and limiter.pace >= full * MIN_PACE_SHARE
    low = limiter.pace
    assert low < full * 0.11  # what halving each second against the recovery leaves
    # Back to the full pace linearly, then no longer slowed.
    clock.now += 1.0
    assert limiter.pace == pytest.approx(low + full * RECOVERY_PER_S)
    clock.now += 1 / RECOVERY_PER_S
    assert limiter.pace == full and not limiter.slowed


def test_a_throttled_publisher_sends_less_and_recovers() -> None:
    clock = Clock()
    limiter = PublishLimiter(QUOTA, None, clock=clock)
    greedy(limiter, clock, 2)
    limiter.throttled()
    full, _ = pacing(QUOTA)
    slow = greedy(limiter, clock, 1)
    # Half the pace, growing back by RECOVERY_PER_S of it a second: at most this in 1 s.
    assert len(slow) <= full / 2 + full * RECOVERY_PER_S / 2 + 1
    greedy(limiter, clock, 10)
    later = [t for t, _ in greedy(limiter, clock, 5)]
    assert achieved_rate(later) >= 0.95 * QUOTA


def test_unpaced_limits_and_nonsense() -> None:
    assert PublishLimiter.from_limits(None, None) is None
    assert PublishLimiter.from_limits(0, 0) is None
    only_bytes = PublishLimiter.from_limits(None, BYTES)
    assert only_bytes is not None and only_bytes.pace is None
    assert only_bytes.ready() > 10**6
    only_publishes = PublishLimiter(QUOTA, None)
    assert only_publishes.byte_room() == math.inf
    with pytest.raises(ValueError):
        pacing(0)
    with pytest.raises(ValueError):
        ConnectGate(0)


def test_a_message_larger_than_the_byte_bucket_waits_for_the_debt() -> None:
    clock = Clock()
    limiter = PublishLimiter(QUOTA, BYTES, clock=clock)
    assert limiter.ready() >= 1
    limiter.spend(128 * 1024)
    assert limiter.ready() == 0 and limiter.byte_room() < 0
    wait = limiter.delay()
    rate, _ = pacing(BYTES, whole=False)
    assert wait == pytest.approx(-limiter.byte_room() / rate, rel=1e-6)
    clock.now += wait
    assert limiter.ready() >= 1


@pytest.mark.anyio
async def test_a_waiting_request_gets_its_turn_before_a_greedy_publisher() -> None:
    limiter = PublishLimiter(QUOTA, None)
    while limiter.ready():
        limiter.spend(100)
    waiting = asyncio.ensure_future(limiter.wait())  # a shadow request
    await asyncio.sleep(0)
    greedy_got = 0
    while not waiting.done():  # the drainer, asking every millisecond
        n = limiter.ready()
        for _ in range(n):
            limiter.spend(100)
        greedy_got += n
        await asyncio.sleep(0.001)
    # The request's token was left to it, whatever the drainer took meanwhile (one token
    # in every ~10 ms beyond the request's).
    assert limiter.delay() == 0, greedy_got


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_connect_gate_spaces_attempts_of_many_connections() -> None:
    clock = Clock()
    gate = ConnectGate(100, clock=clock)
    starts = [gate.reserve() for _ in range(1000)]  # a thousand devices at once
    assert starts == sorted(starts) and len(set(starts)) == 1000
    assert starts[-1] - starts[0] == pytest.approx(999 / 100)
    assert busiest_sliding_window(starts) <= 101
    assert busiest_fixed_window(starts) <= 100
    # Reconnects: one planned 2 s ahead does not hold back one that may start now.
    clock.now = starts[-1] + 5
    assert gate.delay(2.0) == pytest.approx(2.0)
    assert gate.delay(0.0) == pytest.approx(0.0, abs=0.011)
    assert gate.delay(2.0) == pytest.approx(2.01, abs=0.011)  # the slot after the first


def test_connect_gate_with_thousands_of_reconnects_spread_by_their_backoff() -> None:
    clock = Clock()
    gate = ConnectGate(100, clock=clock)
    rng = random.Random(3)
    wanted = [clock.now + rng.uniform(0, 30) for _ in range(10_000)]
    starts = [gate.reserve(w) for w in wanted]
    assert all(s >= w - 1e-9 for s, w in zip(starts, wanted, strict=True))
    assert len(set(starts)) == len(starts)
    assert busiest_fixed_window(starts) <= 100
    assert busiest_sliding_window(starts) <= 101
    # 10,000 attempts at 100 a second need 100 s; nobody waits much longer than that.
    assert max(starts) - clock.now <= 100.5
    # Slots in the past are forgotten: another such wave later keeps the memory bounded.
    clock.now += 200
    for _ in range(20_000):
        gate.reserve(clock.now + rng.uniform(0, 30))
    assert len(gate._next_free) < 25_000
