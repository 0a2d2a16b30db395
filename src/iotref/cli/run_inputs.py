"""What ``iotref run`` sends: JSON lines read from stdin, or simulated presses
(:mod:`iotref.fleet.press`) producing on their own clock; each message goes through
:class:`~iotref.device.client.AsyncClient` and is counted in
:class:`~iotref.cli.run_status.RunCounters`.

stdin lines: a complete message (it has ``headerversion``) is sent as it is; any other
JSON object is taken as a Status payload (``--payload-version``) of the first asset. A line
that is not JSON, not an object, not valid against the schemas or over the platform's
payload limit gets one line on stderr, is counted, and the run goes on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
from datetime import datetime, timezone
from typing import Any, Literal

from iotref._version import __version__
from iotref.cli.run_status import Display, RunCounters, error_line
from iotref.device import stdlib_compat
from iotref.device.client import AsyncClient
from iotref.device.connection.errors import ConnectionTakenOver
from iotref.device.errors import (
    InvalidMessageError,
    MessageTooLargeError,
    OutboxFullError,
)
from iotref.device.onboarding.certificate_store import (
    DeviceIdentity,
)
from iotref.device.telemetry.messages import Asset
from iotref.device.telemetry.results import SendStatus
from iotref.fleet.press import PressEvent, PressKind, PressSimulator, profile_for

Kind = Literal["offset", "digital", "mixed"]
READ_CHUNK = 65536


# --------------------------------------------------------------------------- inputs


async def simulate(
    client: AsyncClient,
    sims: list[tuple[Asset, PressSimulator]],
    interval: float,
    speedup: float,
    version: int,
    counters: RunCounters,
    display: Display,
    stop: asyncio.Event,
) -> None:
    """Every ``interval`` seconds, move every press on and send its status."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        for asset, sim in sims:
            events: list[PressEvent] = sim.step(interval * speedup)
            for event in events:
                if event.kind != "phase":
                    display.note(f"{asset.assetid}: {event.message}")
            await _send(client, counters, client.send(asset, sim.payload(version)))
        next_at += interval
        delay = next_at - loop.time()
        if delay < 0:
            next_at = loop.time()  # fell behind: do not try to catch up in a burst
            delay = 0
        with contextlib.suppress(TimeoutError):
            async with stdlib_compat.timeout(delay):
                await stop.wait()


async def _send(client: AsyncClient, counters: RunCounters, sending: Any, where: str = "") -> None:
    try:
        result = await sending
    except InvalidMessageError as exc:
        counters.invalid += 1
        error_line(f"iotref: {where}{exc.reason}")
        return
    except MessageTooLargeError as exc:
        counters.too_large += 1
        error_line(f"iotref: {where}{exc.reason}; not queued")
        return
    except OutboxFullError as exc:
        counters.refused_full += 1
        if counters.refused_full == 1 or counters.refused_full % 1000 == 0:
            error_line(f"iotref: {where}{exc.one_line()}")
        return
    except ConnectionTakenOver:
        counters.refused_taken_over += 1  # the run is stopping: see run_sender
        return
    if result.status is SendStatus.DROPPED_NO_PERMISSION:
        counters.dropped += 1


def _start_stdin_reader(
    loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[bytes | None]
) -> None:
    """Read stdin in a daemon thread with ``os.read`` (no buffered reader whose lock could
    be held at exit) and hand complete lines to the loop; ``None`` at the end."""
    fd = sys.stdin.fileno()

    def put(item: bytes | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
            loop.call_soon_threadsafe(lines.put_nowait, item)

    def read() -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    put(line)
        except OSError as exc:
            error_line(f"iotref: reading stdin failed: {exc}")
        if pending:
            put(pending)
        put(None)

    threading.Thread(target=read, name="iotref-stdin", daemon=True).start()


async def read_stdin(
    client: AsyncClient,
    asset: Asset,
    version: int,
    counters: RunCounters,
    stop: asyncio.Event,
) -> None:
    """Send what stdin says until it ends or ``stop`` is set (the run notices the end by
    this coroutine's return, see :class:`EndOfInputDrain`)."""
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    _start_stdin_reader(asyncio.get_running_loop(), lines)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            getting = asyncio.ensure_future(lines.get())
            await asyncio.wait({getting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                return
            raw = getting.result()
            if raw is None:
                return
            if not raw.strip():
                continue
            counters.lines += 1
            where = f"stdin line {counters.lines}: "
            try:
                value = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                counters.invalid += 1
                error_line(f"iotref: {where}not JSON ({exc})")
                continue
            if not isinstance(value, dict):
                counters.invalid += 1
                error_line(f"iotref: {where}not a JSON object")
                continue
            if "headerversion" in value:
                await _send(client, counters, client.send_message(value), where)
            else:
                await _send(
                    client, counters, client.send(asset, value, payloadversion=version), where
                )
    finally:
        stopped.cancel()


def make_presses(
    identity: DeviceIdentity, assets: int, kind: Kind, seed: int
) -> list[tuple[Asset, PressSimulator]]:
    """``assets`` simulated presses of this machine (``mixed``: offset and digital in
    turn), each with its own seed."""
    machine = identity.properties.machine_id or identity.properties.client_id
    start = datetime.now(timezone.utc)
    presses = []
    for i in range(assets):
        if kind == "mixed":
            press_kind = PressKind.OFFSET if i % 2 == 0 else PressKind.DIGITAL
        else:
            press_kind = PressKind(kind)
        profile = profile_for(press_kind)
        asset = Asset(
            assetid=f"{machine}-press-{i + 1}",
            assetserial=f"SIM-{machine[:8]}-{i + 1}",
            assettype=profile.asset_type,
            assetname=f"Simulated {press_kind.value} press {i + 1}",
            assetmanufacturername="iotref simulator",
            assetsoftwareversion=__version__,
        )
        presses.append((asset, PressSimulator(press_kind, seed=seed + i, start=start)))
    return presses
