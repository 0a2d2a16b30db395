"""``iotref run`` as a subprocess against the real sandbox: simulated presses for a
``--duration``, JSON lines from ``--stdin`` (bad lines reported and counted, the run goes
on and exits 3), the ``--json`` summary and counts that add up across an offline run and
the next, ``--port``/``--alpn`` through an ALPN-checking front, systemd's notification
protocol on a real datagram socket (READY, STATUS, WATCHDOG, STOPPING), and SIGTERM: a
clean stop with exit code 0 and a final summary. An independent subscriber checks what
arrives."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from iotref.protocol.message_schemas import MessageValidator
from tests.support.alpn_front import ALPN, ThreadedAlpnFront
from tests.support.cli_process import cli_environ, start_iotref
from tests.support.counted_messages import index_of
from tests.support.onboarding import machine_of, outbox_depth, store_properties
from tests.support.ports import free_port
from tests.support.sandbox_process import SandboxProcess
from tests.support.telemetry_watcher import TelemetryWatcher

pytestmark = pytest.mark.integration

VALIDATOR = MessageValidator(strict=True)


def test_simulated_presses_for_a_duration(store: Path, subscriber: TelemetryWatcher) -> None:
    proc = start_iotref(
        "run", "--store", str(store), "--assets", "2", "--interval", "0.1",
        "--duration", "3", "--status-every", "0.5", "--seed", "7", "--speedup", "30",
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    status_lines = [line for line in lines if "permission" in line]
    assert len(status_lines) >= 3, out  # periodic plain lines: stdout is not a terminal
    assert "| connected |" in status_lines[-2] and "permission yes" in status_lines[-2]
    # The last status line is the one after the stop: stopped, not connected.
    assert "| stopped |" in status_lines[-1] and "connected" not in status_lines[-1], out
    summary = lines[-1]
    assert summary.startswith("Stopped after") and "outbox empty" in summary, out
    sent = int(summary.split("accepted ")[1].split(",")[0])
    assert f"acked {sent}," in summary, summary
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
    totals = [index_of(m) for m in arrived if m["assetid"] == f"{machine}-press-1"]
    assert totals == sorted(totals), "the press's impression counter went backwards"
    assert outbox_depth(store) == 0


def test_stdin_lines_good_and_bad(store: Path, subscriber: TelemetryWatcher) -> None:
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
    proc = start_iotref("run", "--store", str(store), "--stdin", stdin=subprocess.PIPE)
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=60)
    assert proc.returncode == 3, err  # some input refused; the rest went through
    errors = [line for line in err.splitlines() if line.startswith("iotref: stdin line")]
    assert len(errors) == 3, err
    assert "line 2: not JSON" in errors[0]
    assert "line 3: not a JSON object" in errors[1]
    assert "line 4: invalid message: $.payload.signalstatus.deviceinfo.status" in errors[2]
    assert "iotref: 3 message(s) of the input were refused" in err, err
    assert "Traceback" not in err
    summary = out.splitlines()[-1]
    assert summary.startswith("Stopped after") and "accepted 3, acked 3, outbox empty" in summary
    assert "invalid 3" in summary, out

    machine = machine_of(store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(subscriber.of("stdin-full-message")) < 1:
        time.sleep(0.05)
    assert [index_of(m) for _, m in subscriber.of("stdin-full-message")] == [99]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(subscriber.of(f"{machine}-press-1")) < 2:
        time.sleep(0.05)
    assert sorted(index_of(m) for _, m in subscriber.of(f"{machine}-press-1")) == [1, 3]


def test_sigterm_stops_cleanly_with_a_summary(store: Path) -> None:
    proc = start_iotref(
        "run", "--store", str(store), "--interval", "0.05", "--status-every", "0.2",
    )  # fmt: skip
    seen: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "accepted " in line and "accepted 0 " not in line:
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


def status_payload(n: int) -> str:
    return json.dumps(
        {
            "signalstatus": {
                "deviceinfo": {
                    "status": "Production",
                    "speed": 50,
                    "statusdetails": "from stdin",
                    "totalproductioncounter": n,
                }
            }
        }
    )


def test_stdin_with_every_line_invalid_exits_3_with_the_summary(store: Path) -> None:
    proc = start_iotref("run", "--store", str(store), "--stdin", stdin=subprocess.PIPE)
    out, err = proc.communicate('nope\n[1]\n{"speed": "fast"}\n', timeout=60)
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    summary = out.splitlines()[-1]
    assert summary.startswith("Stopped after"), out
    assert "accepted 0, acked 0, outbox empty; invalid 3." in summary, summary
    assert outbox_depth(store) == 0


def test_json_summary_on_stdout_status_on_stderr(store: Path, subscriber: TelemetryWatcher) -> None:
    lines = [status_payload(n) for n in range(1, 6)] + ["{not json"]
    proc = start_iotref(
        "run", "--store", str(store), "--stdin", "--json", "--status-every", "0.2",
        stdin=subprocess.PIPE,
    )  # fmt: skip
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=60)
    assert proc.returncode == 3, err
    assert out.count("\n") == 1, out  # one JSON object, nothing else on stdout
    record = json.loads(out)
    machine = machine_of(store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(subscriber.of(f"{machine}-press-1")) < 5:
        time.sleep(0.05)
    arrived = sorted(index_of(m) for _, m in subscriber.of(f"{machine}-press-1"))
    assert arrived == [1, 2, 3, 4, 5]  # counted by an independent subscriber
    assert record["exit_code"] == 3 and record["outcome"] == "input_refused"
    assert record["state"] == "stopped" and record["permission"] is True
    assert record["client_id"] == store_properties(store)["client_id"]
    assert record["alpn"] is False and record["endpoint"].endswith(
        f":{store_properties(store)['mqtt_port']}"
    )
    messages = record["messages"]
    assert messages == {
        "carried_over": 0,
        "accepted": 5,
        "acked": 5,
        "left_in_outbox": 0,
        "held": 0,
        "evicted": 0,
        "refused_by_platform": 0,
        "dropped_no_permission": 0,
    }
    assert record["refused"] == {
        "total": 1,
        "invalid": 1,
        "too_large": 0,
        "outbox_full": 0,
        "taken_over": 0,
    }
    assert record["stdin_lines"] == 6
    assert record["connects"] >= 1 and isinstance(record["elapsed_s"], float)
    # The people's part went to stderr: the banner, status lines, the summary.
    assert "Running sender" in err and "| permission yes |" in err
    assert "Stopped after" in err and "accepted 5, acked 5, outbox empty" in err
    assert "| stopped |" in err.split("Stopped after")[0].splitlines()[-1]
    assert outbox_depth(store) == 0


def test_counts_add_up_across_an_offline_run_and_the_next(
    store: Path,
    subscriber: TelemetryWatcher,
) -> None:
    # First run: --port points where no broker listens, so it runs offline; what it accepts
    # stays in the outbox.
    offline = start_iotref(
        "run", "--store", str(store), "--stdin", "--json", "--port", str(free_port()),
        "--close-timeout", "1", stdin=subprocess.PIPE,
    )  # fmt: skip
    out, err = offline.communicate(
        "\n".join(status_payload(n) for n in range(1, 8)) + "\n", timeout=60
    )
    assert offline.returncode == 0, err
    first = json.loads(out)
    assert first["state"] == "stopped"
    assert first["messages"]["accepted"] == 7 and first["messages"]["acked"] == 0
    assert first["messages"]["left_in_outbox"] == 7
    assert "waiting for the platform" in err
    assert "accepted 7, acked 0, 7 left in the outbox: the next run sends them" in err
    assert outbox_depth(store) == 7
    # Second run on the store's own port: the 7 carried over plus 3 new are delivered.
    online = start_iotref("run", "--store", str(store), "--stdin", "--json", stdin=subprocess.PIPE)
    out, err = online.communicate(
        "\n".join(status_payload(n) for n in range(8, 11)) + "\n", timeout=60
    )
    assert online.returncode == 0, err
    second = json.loads(out)["messages"]
    assert second["carried_over"] == 7 and second["accepted"] == 3
    assert second["acked"] == 10 and second["left_in_outbox"] == 0
    assert second["carried_over"] + second["accepted"] == (
        second["acked"] + second["left_in_outbox"] + second["evicted"]
    )
    assert "accepted 3 (+7 from earlier runs), acked 10, outbox empty" in err, err
    machine = machine_of(store)
    got = subscriber.wait_for(f"{machine}-press-1", set(range(1, 11)))
    assert sorted(set(got)) == list(range(1, 11))
    assert outbox_depth(store) == 0


def test_port_and_alpn_through_an_alpn_front(
    sandbox: SandboxProcess,
    store: Path,
    subscriber: TelemetryWatcher,
) -> None:
    with ThreadedAlpnFront(sandbox.mqtt_port) as front:
        proc = start_iotref(
            "run", "--store", str(store), "--port", str(front.port), "--alpn", "--json",
            "--interval", "0.2", "--duration", "2", "--seed", "3",
        )  # fmt: skip
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        record = json.loads(out)
        assert record["alpn"] is True and record["endpoint"].endswith(f":{front.port}")
        assert f":{front.port} (ALPN)" in err  # the banner names where it connects
        accepted = record["messages"]["accepted"]
        assert accepted > 0 and record["messages"]["acked"] == accepted
        machine = machine_of(store)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(subscriber.of(f"{machine}-press-1")) < accepted:
            time.sleep(0.05)
        assert len(subscriber.of(f"{machine}-press-1")) == accepted
        assert front.seen and all(p is not None and ALPN in p for p in front.seen)

        # Without --alpn the front hangs up, as AWS IoT Core's 443 does.
        refused = start_iotref(
            "run", "--store", str(store), "--port", str(front.port), "--fail-fast",
            "--duration", "1",
        )  # fmt: skip
        out, err = refused.communicate(timeout=60)
        assert refused.returncode == 1, err
        assert "Traceback" not in err
        last = err.splitlines()[-1]
        assert last.startswith("iotref: ") and "handshake" in last, err
        said = [line for line in err.splitlines() if "handshake" in line]
        assert said == [last], err  # the failure is said once, not also as a log line
        assert [] in front.seen  # the connection that offered no ALPN


class NotifyListener:
    """systemd's side of NOTIFY_SOCKET: a bound AF_UNIX datagram socket with SO_PASSCRED,
    read in a thread; each datagram kept with the sender's PID and the time it came."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, int, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", value[:12])[0]
            self.received.append((time.monotonic(), pid, data.decode().split("\n")))

    def with_key(self, key: str) -> list[tuple[float, int, list[str]]]:
        return [r for r in list(self.received) if any(a.startswith(key) for a in r[2])]

    def wait_for(self, key: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.with_key(key)) < count:
            time.sleep(0.05)
        assert len(self.with_key(key)) >= count, self.received

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_systemd_ready_status_watchdog_and_stopping(store: Path, tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    listener = NotifyListener(address)
    env = cli_environ(NOTIFY_SOCKET=address, WATCHDOG_USEC="3000000")
    env.pop("WATCHDOG_PID", None)
    proc = start_iotref(
        "run", "--store", str(store), "--interval", "0.2", "--status-every", "5", env=env,
    )  # fmt: skip
    try:
        listener.wait_for("READY=1")
        listener.wait_for("WATCHDOG=1", count=4)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            "| connected |" in a for _, _, r in listener.with_key("STATUS=") for a in r
        ):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listener.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    received = listener.received
    # Every notification comes from the run's own process (systemd checks the PID).
    assert {pid for _, pid, _ in received} == {proc.pid}
    ready = listener.with_key("READY=1")
    assert len(ready) == 1 and any(a.startswith("STATUS=") for a in ready[0][2])
    statuses = [a for _, _, r in listener.with_key("STATUS=") for a in r if a.startswith("STATUS=")]
    assert any("| connected |" in s and "accepted" in s for s in statuses), statuses
    stopping = listener.with_key("STOPPING=1")
    assert len(stopping) == 1 and stopping[0][0] > ready[0][0]
    assert any("stopping" in a for a in stopping[0][2] if a.startswith("STATUS="))
    # WATCHDOG=1 at half of WATCHDOG_USEC (3 s): never a gap that would have had systemd
    # kill the service, from READY until the stop.
    pings = [at for at, _, r in listener.with_key("WATCHDOG=1")]
    assert len(pings) >= 4
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 3.0, gaps
    assert out.splitlines()[-1].startswith("Stopped after")
    assert outbox_depth(store) == 0


def test_systemd_abstract_socket_and_a_watchdog_of_another_process(store: Path) -> None:
    name = f"iotref-run-test-{uuid.uuid4().hex}"
    listener = NotifyListener(b"\0" + name.encode())
    env = cli_environ(
        NOTIFY_SOCKET=f"@{name}",
        WATCHDOG_USEC="1000000",
        WATCHDOG_PID="1",  # the watchdog is PID 1's, not this run's
    )
    proc = start_iotref("run", "--store", str(store), "--stdin", env=env, stdin=subprocess.PIPE)
    try:
        _, err = proc.communicate(status_payload(1) + "\n", timeout=60)
    finally:
        listener.close()
    assert proc.returncode == 0, err
    assert listener.with_key("READY=1") and listener.with_key("STOPPING=1")
    assert not listener.with_key("WATCHDOG=1")
    assert {pid for _, pid, _ in listener.received} == {proc.pid}
