"""``iotref run`` as a subprocess against the real sandbox: simulated presses for a
``--duration``, JSON lines from ``--stdin`` (bad lines reported and counted, not fatal),
and SIGTERM: a clean stop with exit code 0 and a final summary. An independent subscriber
checks what arrives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iotref.protocol.message_schemas import MessageValidator
from tests.integration.test_client import (
    Subscriber,
    counter_of,
    onboarding_env,  # noqa: F401  (a fixture)
    outbox_depth,
    store,  # noqa: F401  (a fixture)
    subscriber,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = MessageValidator(strict=True)


def iotref(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = subprocess.Popen(
        [sys.executable, "-m", "iotref.cli.main", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kwargs,  # type: ignore[call-overload]
    )
    return proc


def machine_of(path: Path) -> str:
    return str(json.loads((path / "properties.json").read_text())["machine_id"])


def test_simulated_presses_for_a_duration(store: Path, subscriber: Subscriber) -> None:  # noqa: F811
    proc = iotref(
        "run", "--store", str(store), "--assets", "2", "--interval", "0.1",
        "--duration", "3", "--status-every", "0.5", "--seed", "7", "--speedup", "30",
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    status_lines = [line for line in lines if "permission" in line]
    assert len(status_lines) >= 3, out  # periodic plain lines: stdout is not a terminal
    assert "connected" in status_lines[-1] and "permission yes" in status_lines[-1]
    summary = lines[-1]
    assert summary.startswith("Stopped after") and "outbox empty" in summary, out
    sent = int(summary.split("sent ")[1].split(",")[0])
    assert sent >= 40  # 2 presses, 10 per second each, for 3 s (minus start-up)
    machine = machine_of(store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        arrived = [m for _, m in subscriber.messages if m["assetid"].startswith(machine)]
        if len(arrived) >= sent:
            break
        time.sleep(0.05)
    assert len(arrived) == sent
    assert {m["assetid"] for m in arrived} == {f"{machine}-press-1", f"{machine}-press-2"}
    assert {m["assettype"] for m in arrived} == {"SheetfedPress", "DigitalPrinter"}
    for message in arrived:
        assert VALIDATOR.validate(message) == [], message
    totals = [counter_of(m) for m in arrived if m["assetid"] == f"{machine}-press-1"]
    assert totals == sorted(totals), "the press's impression counter went backwards"
    assert outbox_depth(store) == 0


def test_stdin_lines_good_and_bad(store: Path, subscriber: Subscriber) -> None:  # noqa: F811
    def payload(n: int, status: str = "Production") -> dict[str, object]:
        return {
            "signalstatus": {
                "deviceinfo": {
                    "status": status,
                    "speed": 100,
                    "statusdetails": "from stdin",
                    "totalproductioncounter": n,
                }
            }
        }

    full = {
        "headerversion": 3,
        "eventtype": "generic.signal",
        "eventsubtype": "Status",
        "payloadversion": 2,
        "sendereventuuid": "0b7c1d0e-8f31-4f7e-9d55-2f1f0a6c9e11",
        "sendertimestamp": "2026-01-01T10:00:00.000Z",
        "assettimestamp": "2026-01-01T10:00:00.000Z",
        "sendertype": "system",
        "assetid": "stdin-full-message",
        "assetserial": "SN-STDIN",
        "assettype": "Cutter",
        "payload": payload(99),
    }
    lines = [
        json.dumps(payload(1)),
        "not json at all",
        json.dumps([1, 2, 3]),
        json.dumps(payload(2, status="Bogus")),
        "",
        json.dumps(full),
        json.dumps(payload(3)),
    ]
    proc = iotref("run", "--store", str(store), "--stdin", stdin=subprocess.PIPE)
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=60)
    assert proc.returncode == 0, err
    errors = [line for line in err.splitlines() if line.startswith("iotref: stdin line")]
    assert len(errors) == 3, err
    assert "line 2: not JSON" in errors[0]
    assert "line 3: not a JSON object" in errors[1]
    assert "line 4: invalid message: $.payload.signalstatus.deviceinfo.status" in errors[2]
    assert "Traceback" not in err
    assert "sent 3," in out.splitlines()[-1] and "invalid 3" in out.splitlines()[-1], out

    machine = machine_of(store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(subscriber.of("stdin-full-message")) < 1:
        time.sleep(0.05)
    assert [counter_of(m) for _, m in subscriber.of("stdin-full-message")] == [99]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(subscriber.of(f"{machine}-press-1")) < 2:
        time.sleep(0.05)
    assert sorted(counter_of(m) for _, m in subscriber.of(f"{machine}-press-1")) == [1, 3]


def test_sigterm_stops_cleanly_with_a_summary(store: Path) -> None:  # noqa: F811
    proc = iotref(
        "run", "--store", str(store), "--interval", "0.05", "--status-every", "0.2",
    )  # fmt: skip
    seen: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "sent " in line and "sent 0 " not in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(30), "".join(seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(5)
    assert seen[-1].startswith("Stopped after"), seen[-3:]
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    assert outbox_depth(store) == 0
