"""What the sandbox's monitor API says, read with the admin token: its summary and the
record of one device (what the ingestion received, stored and metered)."""

from __future__ import annotations

from typing import Any

from tests.support.sandbox_process import SandboxProcess
from tests.support.waiting import poll


def monitor_get(sandbox: SandboxProcess, path: str) -> dict[str, Any]:
    """``GET /monitor/api/PATH`` (``summary``, ``devices/CLIENT_ID``, ...); asserts 200."""
    with sandbox.admin_http() as http:
        answer = http.get(f"/monitor/api/{path}")
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def device_record(sandbox: SandboxProcess, client_id: str) -> dict[str, Any]:
    """The monitor's record of one device."""
    return monitor_get(sandbox, f"devices/{client_id}")


def wait_received(
    sandbox: SandboxProcess, client_id: str, count: int, timeout: float = 30
) -> dict[str, Any]:
    """The device's record once the ingestion and its quota meter have both counted
    ``count`` messages; ``AssertionError`` if they have not within ``timeout``."""

    def counted(record: dict[str, Any]) -> bool:
        return bool(record["received"] >= count and record["quota"]["messages"] >= count)

    record = poll(lambda: device_record(sandbox, client_id), counted, timeout, interval=0.1)
    assert counted(record), f"{client_id}: {record['received']} of {count} arrived"
    return record
