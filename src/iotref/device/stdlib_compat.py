"""Standard-library features newer than Python 3.10, for every Python the package supports.

Owns the few names the package uses that the standard library only has from Python 3.11 on:
:class:`StrEnum`, the :func:`timeout` context manager, :class:`Runner`, ``Unpack`` and
:func:`fromisoformat`. On 3.11 and later they are the standard library's own; on 3.10 they
behave the same:

- ``StrEnum`` members are strings whose ``str()`` and ``format()`` are their value;
- ``timeout(delay)`` cancels the enclosed block after ``delay`` seconds (``None``: never)
  and raises the built-in :class:`TimeoutError` (on 3.10 ``asyncio`` raises its own
  ``asyncio.TimeoutError``, which ``except TimeoutError`` would not catch). It is built on
  ``async-timeout``, the library ``asyncio.timeout`` was taken from;
- ``Runner`` runs coroutines one after another on one private event loop and, on
  ``close()``, cancels what is left and closes the loop;
- ``Unpack`` is ``typing_extensions``'s;
- ``fromisoformat(text)`` is ``datetime.fromisoformat`` as of 3.11 for the forms the platform
  writes: a ``Z`` offset, any number of fraction digits (more than six are cut), an offset
  without a colon (``+0100``, ``+01``).

Code that catches a timeout of ``asyncio.wait_for`` catches ``asyncio.TimeoutError``, which
is the built-in ``TimeoutError`` from 3.11 on.
"""

from __future__ import annotations

import enum
import sys
from datetime import datetime

__all__ = ["Runner", "StrEnum", "Unpack", "fromisoformat", "timeout"]

if sys.version_info >= (3, 11):
    from asyncio import Runner, timeout
    from enum import StrEnum
    from typing import Unpack

    fromisoformat = datetime.fromisoformat
else:  # pragma: no cover - exercised by the unit tests run under Python 3.10
    import asyncio
    import contextlib
    import re
    from collections.abc import AsyncIterator, Coroutine
    from typing import Any, TypeVar

    import async_timeout
    from typing_extensions import Unpack

    _T = TypeVar("_T")

    # The time of day's seconds, then the optional fraction and offset that 3.10 is strict about.
    _ISO_TAIL = re.compile(
        r"(?P<sec>\d{2}:\d{2}:\d{2})(?:[.,](?P<frac>\d+))?"
        r"(?:(?P<zulu>[zZ])|(?P<sign>[+-])(?P<oh>\d{2}):?(?P<om>\d{2})?)?$"
    )

    class StrEnum(str, enum.Enum):
        """An enum whose members are strings, printed and formatted as their value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(str(self.value), format_spec)

    @contextlib.asynccontextmanager
    async def timeout(delay: float | None) -> AsyncIterator[None]:
        """Cancel the block after ``delay`` seconds and raise :class:`TimeoutError`."""
        try:
            async with async_timeout.timeout(delay):
                yield
        except asyncio.TimeoutError as exc:
            raise TimeoutError from exc

    class Runner:
        """Runs coroutines on one private event loop (``asyncio.Runner`` without its options)."""

        def __init__(self) -> None:
            self._loop = asyncio.new_event_loop()

        def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
            """Run ``coro`` to completion on the runner's loop and return its result."""
            if self._loop.is_closed():
                raise RuntimeError("Runner is closed")
            return self._loop.run_until_complete(coro)

        def close(self) -> None:
            """Cancel the tasks still pending, finish async generators, close the loop."""
            loop = self._loop
            if loop.is_closed():
                return
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def fromisoformat(text: str) -> datetime:
        """``datetime.fromisoformat`` that also reads ``Z``, 1-9 fraction digits, ``+HHMM``."""
        match = _ISO_TAIL.search(text)
        if match is None:
            return datetime.fromisoformat(text)
        tail = match["sec"]
        if match["frac"] is not None:
            tail += "." + match["frac"][:6].ljust(6, "0")
        if match["zulu"] is not None:
            tail += "+00:00"
        elif match["sign"] is not None:
            tail += f"{match['sign']}{match['oh']}:{match['om'] or '00'}"
        return datetime.fromisoformat(text[: match.start()] + tail)
