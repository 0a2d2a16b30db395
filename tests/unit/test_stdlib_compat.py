"""The standard-library stand-ins behave like Python 3.11's on every supported Python
(``make test`` runs this module under each interpreter it finds)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import datetime, timedelta, timezone

import pytest

from iotref.device.stdlib_compat import Runner, StrEnum, fromisoformat, timeout


class Colour(StrEnum):
    CYAN = "cyan"
    MAGENTA = "magenta"


def test_str_enum_members_are_their_value_as_text() -> None:
    assert Colour.CYAN == "cyan"
    assert isinstance(Colour.CYAN, str)
    assert str(Colour.CYAN) == "cyan"
    assert f"{Colour.MAGENTA}" == "magenta"
    assert f"[{Colour.CYAN:>6}]" == "[  cyan]"
    assert Colour("magenta") is Colour.MAGENTA
    assert "-".join(Colour) == "cyan-magenta"


def test_timeout_raises_the_builtin_timeout_error() -> None:
    async def main() -> None:
        async with timeout(0.01):
            await asyncio.sleep(5)

    with pytest.raises(TimeoutError) as caught:
        asyncio.run(main())
    assert type(caught.value) is TimeoutError


def test_timeout_that_does_not_expire_changes_nothing() -> None:
    async def main() -> str:
        async with timeout(5):
            await asyncio.sleep(0)
        async with timeout(None):
            await asyncio.sleep(0.01)
        # No cancellation is left pending for the task after the blocks.
        await asyncio.sleep(0.02)
        return "done"

    assert asyncio.run(main()) == "done"


def test_timeout_lets_an_outer_cancellation_through() -> None:
    async def inner(started: asyncio.Event) -> None:
        async with timeout(5):
            started.set()
            await asyncio.sleep(5)

    async def main() -> bool:
        started = asyncio.Event()
        task = asyncio.create_task(inner(started))
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(main()) is True


def test_timeout_suppressed_as_the_runtime_uses_it() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with contextlib.suppress(TimeoutError):
            async with timeout(0.05):
                await asyncio.Event().wait()
        return loop.time() - start

    assert 0.04 <= asyncio.run(main()) < 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T10:00:00Z", datetime(2026, 11, 25, 10, tzinfo=timezone.utc)),
        (
            "2026-11-25T10:00:00.123Z",
            datetime(2026, 11, 25, 10, 0, 0, 123000, tzinfo=timezone.utc),
        ),
        ("2026-11-25T10:00:00.1Z", datetime(2026, 11, 25, 10, 0, 0, 100000, tzinfo=timezone.utc)),
        (
            "2026-11-25T10:00:00.123456789+01:00",
            datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1))),
        ),
        (
            "2026-11-25T10:00:00-0530",
            datetime(2026, 11, 25, 10, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
        ),
        ("2026-11-25T10:00:00+02", datetime(2026, 11, 25, 10, tzinfo=timezone(timedelta(hours=2)))),
        ("2026-11-25T10:00:00", datetime(2026, 11, 25, 10)),
        ("2026-11-25", datetime(2026, 11, 25)),
    ],
)
def test_fromisoformat_reads_what_the_platform_writes(text: str, expected: datetime) -> None:
    parsed = fromisoformat(text)
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-25T25:00:00Z"])
def test_fromisoformat_refuses_what_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError):
        fromisoformat(text)


def test_runner_runs_coroutines_on_one_loop_and_cleans_up() -> None:
    cancelled: list[bool] = []

    async def loop_id() -> int:
        return id(asyncio.get_running_loop())

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def spawn() -> None:
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0)

    runner = Runner()
    try:
        first = runner.run(loop_id())
        runner.run(spawn())
        assert runner.run(loop_id()) == first
    finally:
        runner.close()
    assert cancelled == [True]
    coro = loop_id()
    with pytest.raises(RuntimeError):
        runner.run(coro)
    coro.close()


def test_the_standard_library_is_used_where_it_has_these() -> None:
    if sys.version_info >= (3, 11):
        import enum

        assert StrEnum is enum.StrEnum
        assert timeout is asyncio.timeout
        assert Runner is asyncio.Runner
        assert fromisoformat == datetime.fromisoformat
    else:
        assert not hasattr(asyncio, "timeout")
