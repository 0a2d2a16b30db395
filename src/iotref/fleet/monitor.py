"""What the sandbox's monitor stored per device (``GET /monitor/api/summary``): the
platform's own count of a run's messages, read over HTTP with the admin token."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Final

import httpx
import orjson

from iotref.fleet.options import SETTLED_AFTER_S
from iotref.fleet.target import SandboxInfo

log = logging.getLogger("iotref.fleet")

MONITOR_SUMMARY_PATH: Final = "/monitor/api/summary"


async def monitor_counts(sandbox: SandboxInfo, clients: set[str]) -> dict[str, int] | None:
    """Messages the sandbox's monitor stored per device (deduplicated: valid + invalid),
    for ``clients``; ``None`` if the sandbox has no monitor."""
    try:
        async with httpx.AsyncClient(base_url=sandbox.http_url, timeout=60) as http:
            answer = await http.get(
                MONITOR_SUMMARY_PATH, headers={"Authorization": f"Bearer {sandbox.admin_token}"}
            )
    except httpx.HTTPError as exc:
        log.warning("monitor not reachable: %s", exc)
        return None
    if answer.status_code != 200:
        return None
    counts: dict[str, int] = {}
    for device in orjson.loads(answer.content).get("devices", []):
        client = device.get("client_id")
        if client in clients:
            counts[client] = int(device.get("valid") or 0) + int(device.get("invalid") or 0)
    return counts


async def monitor_delta(
    sandbox: SandboxInfo,
    clients: set[str],
    baseline: Mapping[str, int],
    expected: int,
    timeout_s: float,
) -> dict[str, int] | None:
    """What the monitor stored per device since ``baseline``: asked again until the total
    reaches ``expected``, stops changing, or ``timeout_s`` passed. ``None`` if the sandbox
    has no monitor."""
    counts: dict[str, int] | None = None
    last = -1
    still = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = await monitor_counts(sandbox, clients)
        if counts is None:
            return None
        total = sum(counts.get(c, 0) - baseline.get(c, 0) for c in clients)
        if total >= expected:
            break
        if total != last:
            last, still = total, time.monotonic()
        elif time.monotonic() - still > SETTLED_AFTER_S:
            break
        await asyncio.sleep(0.5)
    if counts is None:
        return None
    return {c: counts.get(c, 0) - baseline.get(c, 0) for c in clients}
