"""For unit tests of the telemetry publisher: a fake MQTT connection that implements
:class:`iotref.device.telemetry.seams.TelemetryConnection`, records what is published and
acknowledges or fails publishes when the test says so; valid messages told apart by a
counter carried as the status ``speed`` (:func:`message`, :func:`counter_of`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
)
from iotref.device.telemetry.seams import PublishPace

SENDER = Sender(SenderType.PRESS, "gw", "1.0")
ASSET = Asset("asset-1", "SN-1", AssetType.SHEETFED_PRESS)


def message(i: int) -> dict[str, Any]:
    """A valid Status v2 message carrying ``i`` as its speed (see :func:`counter_of`)."""
    return build_message(
        SENDER,
        ASSET,
        StatusV2(status=DeviceStatusV2.PRODUCTION, speed=i, totalproductioncounter=i),
    )


async def settle(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait, letting the loop run, until ``condition()`` holds (AssertionError after
    ``timeout`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


class PublishFailed(Exception):
    """A publish the fake connection failed."""


class FakeConnection:
    """A :class:`~iotref.device.telemetry.seams.TelemetryConnection` that publishes into a
    list; PUBACKs come when the test says so (or at once with ``auto_ack``); ``drop()``
    loses the connection and fails what is in flight."""

    def __init__(
        self, *, auto_ack: bool = False, connected: bool = True, pace: PublishPace | None = None
    ) -> None:
        self.connected = connected
        self.rate_limiter = pace
        self.auto_ack = auto_ack
        self.callbacks: list[Callable[[bool], Awaitable[None] | None]] = []
        self.published: list[tuple[str, bytes]] = []
        self.pending: list[tuple[int, asyncio.Future[None]]] = []

    def add_connected_callback(self, cb: Callable[[bool], Awaitable[None] | None]) -> None:
        self.callbacks.append(cb)

    def remove_connected_callback(self, cb: Callable[[bool], Awaitable[None] | None]) -> None:
        self.callbacks.remove(cb)

    def publish_callback(
        self,
        topic: str,
        payload: bytes,
        callback: Callable[[BaseException | None], None],
        qos: int = 1,
    ) -> None:
        def done(f: asyncio.Future[None]) -> None:
            callback(asyncio.CancelledError() if f.cancelled() else f.exception())

        self.publish_future(topic, payload, qos).add_done_callback(done)

    def publish_future(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        """The publish as a future the test resolves (acknowledges or fails)."""
        assert qos == 1
        if not self.connected:
            raise PublishFailed("not connected")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.published.append((topic, payload))
        if self.auto_ack:
            asyncio.get_running_loop().call_soon(_resolve, fut)
        else:
            self.pending.append((counter_of(payload), fut))
        return fut

    @property
    def in_flight(self) -> int:
        return sum(1 for _, f in self.pending if not f.done())

    def ack(self, *counters: int) -> None:
        for c, fut in self.pending:
            if c in counters and not fut.done():
                fut.set_result(None)

    def ack_all(self) -> None:
        for _, fut in self.pending:
            if not fut.done():
                fut.set_result(None)
        self.pending.clear()

    def fail_all(self, exc: Exception) -> None:
        for _, fut in self.pending:
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()

    def drop(self) -> None:
        self.connected = False
        self.fail_all(PublishFailed("connection lost"))

    async def reconnect(self, session_present: bool = False) -> None:
        self.connected = True
        for cb in self.callbacks:
            result = cb(session_present)
            if result is not None:
                await result

    def counters(self) -> list[int]:
        return [counter_of(p) for _, p in self.published]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def counter_of(payload: bytes) -> int:
    return int(json.loads(payload)["payload"]["signalstatus"]["deviceinfo"]["speed"])
