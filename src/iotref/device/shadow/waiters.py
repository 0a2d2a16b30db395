"""Awaiting a value: futures that resolve once a key of the local (``reported``) or
``desired`` state matches a predicate."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from iotref.device import stdlib_compat
from iotref.protocol.shadow_document import json_equal

ANY = object()
"""The value that matches any value of the key."""
SECTIONS = ("reported", "desired")


def matcher(value: Any, predicate: Callable[[Any], bool] | None) -> Callable[[Any], bool]:
    """``predicate`` if given, else a match on ``value`` by JSON equality (any value for
    :data:`ANY`)."""
    if predicate is not None:
        return predicate
    if value is ANY:
        return lambda _: True
    return lambda v: json_equal(v, value)


@dataclass
class _Waiter:
    section: str
    key: str
    predicate: Callable[[Any], bool]
    future: asyncio.Future[Any]


class ValueWaiters:
    """The outstanding waits of one shadow sync."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[_Waiter] = []

    async def wait(
        self, section: str, key: str, predicate: Callable[[Any], bool], timeout: float | None
    ) -> Any:
        """The value of ``key`` in ``section`` once :meth:`check` finds it matching;
        :class:`TimeoutError` after ``timeout``."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(section, key, predicate, fut)
        self._waiters.append(waiter)
        try:
            async with stdlib_compat.timeout(timeout):
                return await fut
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def check(self, reported: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
        """Resolve the waits whose key now matches (a copy of the value); a predicate that
        raises fails its wait."""
        for waiter in list(self._waiters):
            current = reported if waiter.section == "reported" else desired
            if waiter.future.done() or waiter.key not in current:
                continue
            value = current[waiter.key]
            try:
                matched = waiter.predicate(value)
            except Exception as exc:
                waiter.future.set_exception(exc)
                continue
            if matched:
                waiter.future.set_result(copy.deepcopy(value))

    def cancel(self) -> None:
        for waiter in self._waiters:
            waiter.future.cancel()


__all__ = ["ANY", "SECTIONS", "ValueWaiters", "matcher"]
