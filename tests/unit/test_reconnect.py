"""The reconnect schedule (pure policy, fake clock) and what awscrt's C client is actually
told: its debug log states the reconnect delays it took from the options, which is how
awscrt 0.38's binding quirk (``min_connected_time_to_reset_reconnect_delay_ms`` taken as
the minimum reconnect delay) went unnoticed by a test that only read the Python options.
Last, the real connection against a port where nothing listens: the attempts follow the
schedule (shipped defaults), not awscrt's own reconnect loop."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.reconnect import MIN_ATTEMPT_INTERVAL_S, ReconnectSchedule
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionEvent, ConnectionState
from tests.support.device_keys import self_signed
from tests.support.fake_clock import FakeClock
from tests.support.ports import free_port


def schedule(clock: FakeClock, seed: int = 1, **kwargs: float) -> ReconnectSchedule:
    return ReconnectSchedule(
        kwargs.pop("min_s", 0.5), kwargs.pop("max_s", 30.0), clock=clock, rng=random.Random(seed)
    )


# --------------------------------------------------------------------------- the schedule


def test_after_a_connection_that_was_up_the_first_delay_is_below_the_minimum() -> None:
    for seed in range(200):
        clock = FakeClock(100.0)
        s = schedule(clock, seed)
        s.attempt_started()
        s.connected()
        clock.now += 5.0  # up for 5 s, then lost
        delay = s.next_delay()
        assert 0.0 <= delay <= 0.5


def test_a_short_connection_also_starts_over_from_the_minimum() -> None:
    """awscrt resets its backoff only after 30 s connected; the schedule after any success."""
    clock = FakeClock(100.0)
    s = schedule(clock)
    for _ in range(6):  # a long outage: the bound grew to the maximum
        s.attempt_started()
        clock.now += s.next_delay()
    assert s.cap_s == 30.0
    s.attempt_started()
    s.connected()
    clock.now += 2.0  # up for 2 s only
    assert s.cap_s == 0.5
    assert s.next_delay() <= 0.5


def test_delays_grow_only_while_attempts_fail_and_never_exceed_the_maximum() -> None:
    caps = []
    draws = []
    for seed in range(50):
        clock = FakeClock(100.0)
        s = schedule(clock, seed)
        s.attempt_started()
        clock.now += 10
        seen = []
        for _ in range(12):
            seen.append(s.cap_s)
            delay = s.next_delay()
            draws.append(delay)
            clock.now += delay
            s.attempt_started()
        caps = seen
    assert caps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0]
    assert max(draws) <= 30.0
    assert any(d > 16.0 for d in draws), "full jitter reaches up to the cap"


def test_attempts_of_one_client_id_start_at_least_a_second_apart() -> None:
    clock = FakeClock(100.0)
    s = schedule(clock)
    starts = []
    for _ in range(40):
        s.attempt_started()
        starts.append(clock.now)
        clock.now += 0.01  # attempts that fail at once
        delay = s.next_delay()
        clock.now += delay
        if len(starts) % 3 == 0:
            s.connected()  # and connections that drop right away
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= MIN_ATTEMPT_INTERVAL_S - 1e-9


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="min_s"):
        ReconnectSchedule(0.0, 1.0)
    with pytest.raises(ValueError, match="min_s"):
        ReconnectSchedule(2.0, 1.0)


# --------------------------------------------------------------------------- awscrt's view

_PROBE = """
import json, sys
from pathlib import Path
from awscrt import io, mqtt5
from iotref.device.connection.awscrt_options import (
    build_client_options, supervised_client_options,
)
from iotref.device.connection.settings import ConnectionSettings
log_path, which, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
io.init_logging(io.LogLevel.Debug, log_path)
if which == "raw":
    options = mqtt5.ClientOptions(host_name="localhost", port=1, **extra)
else:
    settings = ConnectionSettings(
        endpoint="localhost", port=1, client_id="probe", cert_path=Path("c"),
        key_path=Path("k"), ca_path=Path("a"), **extra,
    )
    build = build_client_options if which == "build" else supervised_client_options
    options = build(settings)
mqtt5.Client(options)
"""


def crt_reconnect_settings(tmp_path: Path, which: str, **extra: object) -> dict[str, int]:
    """What awscrt's C client says it took: delay min/max, reset time, jitter mode (ms)."""
    log = tmp_path / f"crt-{which}-{len(list(tmp_path.glob('crt-*.log')))}.log"
    subprocess.run(
        [sys.executable, "-c", _PROBE, str(log), which, json.dumps(extra)],
        check=True,
        timeout=60,
    )
    text = log.read_text()
    delays = re.search(r"reconnect delay min set to (\d+) ms, max set to (\d+) ms", text)
    reset = re.search(r"reset the reconnect delay set to (\d+) ms", text)
    jitter = re.search(r"reconnect jitter mode set to (\d+)", text)
    assert delays and reset and jitter, text[-2000:]
    return {
        "min_ms": int(delays.group(1)),
        "max_ms": int(delays.group(2)),
        "reset_ms": int(reset.group(1)),
        "jitter": int(jitter.group(1)),
    }


def test_build_client_options_gives_awscrt_the_backoff_bounds(tmp_path: Path) -> None:
    """The options for awscrt's own reconnect loop (used by tools such as the fleet's
    watchers): the C client must log the minimum and maximum asked for."""
    seen = crt_reconnect_settings(tmp_path, "build")
    assert (seen["min_ms"], seen["max_ms"]) == (500, 30_000), seen
    seen = crt_reconnect_settings(tmp_path, "build", min_backoff_s=0.25, max_backoff_s=20.0)
    assert (seen["min_ms"], seen["max_ms"]) == (250, 20_000), seen


def test_the_connection_leaves_awscrt_only_a_fallback_reconnect(tmp_path: Path) -> None:
    """What :class:`Connection` gives awscrt: a fixed delay of the maximum backoff (no
    jitter), long after the connection's own schedule has restarted the client."""
    seen = crt_reconnect_settings(tmp_path, "supervised")
    assert (seen["min_ms"], seen["max_ms"]) == (30_000, 30_000), seen
    assert seen["jitter"] == 1, seen  # AWS_EXPONENTIAL_BACKOFF_JITTER_NONE


def test_awscrt_binding_quirk_is_known(tmp_path: Path) -> None:
    """awscrt 0.38's binding passes ``min_connected_time_to_reset_reconnect_delay_ms`` as
    the C client's minimum reconnect delay, and never sets the C client's reset time
    (30 s). Should an awscrt upgrade fix this, this test fails: revisit
    docs/operations.md and :mod:`iotref.device.connection.reconnect` then."""
    seen = crt_reconnect_settings(
        tmp_path,
        "raw",
        min_reconnect_delay_ms=500,
        max_reconnect_delay_ms=30_000,
        min_connected_time_to_reset_reconnect_delay_ms=7_000,
    )
    assert seen["min_ms"] == 7_000, seen
    assert seen["reset_ms"] == 30_000, seen


# --------------------------------------------------------------------------- the real client


@pytest.mark.anyio
async def test_attempts_against_a_closed_port_follow_the_schedule(tmp_path: Path) -> None:
    """Shipped defaults, nothing listening: the connection starts offline, and its attempts
    come at least 1 s apart with growing bounds (1, 1, 1..2, 1..4 s after the previous),
    which awscrt's own loop (a fixed 30 s now) could not produce."""
    cert_path, key_path = self_signed(tmp_path, "device")
    settings = ConnectionSettings(
        endpoint="localhost",
        port=free_port(),
        client_id="iotref-reconnect-test",
        cert_path=cert_path,
        key_path=key_path,
        ca_path=cert_path,
    )
    attempts: list[float] = []
    failures: list[str | None] = []

    def on_event(event: ConnectionEvent) -> None:
        if event.state is ConnectionState.CONNECTING:
            attempts.append(time.monotonic())
        elif event.state is ConnectionState.DISCONNECTED:
            failures.append(event.reason)

    connection = Connection(settings, on_event=on_event)
    await connection.start(wait=False)
    try:
        deadline = time.monotonic() + 20
        while len(attempts) < 5 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    finally:
        await connection.stop()
    assert len(attempts) >= 5, (attempts, failures)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    bounds = [1.0, 1.0, 2.0, 4.0]
    for gap, bound in zip(gaps, bounds, strict=False):
        assert MIN_ATTEMPT_INTERVAL_S - 0.05 <= gap <= bound + 0.3, gaps
    assert failures and "unreachable" in str(failures[0]), failures
    assert connection.stats.failures >= 4
