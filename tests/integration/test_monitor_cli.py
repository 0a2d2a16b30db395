"""``iotref monitor`` against the real sandbox: one line per message with ✓/✗ and the
path + reason of invalid ones, a device filter, a clean end on Ctrl-C, and one clear line
with a non-zero exit when no sandbox runs."""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
from pathlib import Path

import pytest
from bench.bench_ingestion import device_messages

from tests.support.cli_process import cli_environ, run_iotref, start_iotref
from tests.support.mqtt_probe import device_probe, device_topic
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration


class MonitorProcess:
    def __init__(self, *args: str) -> None:
        env = cli_environ(PYTHONIOENCODING="utf-8")
        self.proc = start_iotref("monitor", *args, env=env, encoding="utf-8")
        self.lines: queue.Queue[str] = queue.Queue()
        self.err_lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=self._pump, args=(self.proc.stdout, self.lines), daemon=True
        ).start()
        threading.Thread(
            target=self._pump, args=(self.proc.stderr, self.err_lines), daemon=True
        ).start()

    @staticmethod
    def _pump(stream: object, out: queue.Queue[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            out.put(line.rstrip("\n"))

    def wait_line(self, predicate: object, timeout: float = 15, source: str = "out") -> str:
        lines = self.lines if source == "out" else self.err_lines
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line)
            if predicate(line):  # type: ignore[operator]
                return line
        raise AssertionError(f"no matching line; got {seen}")

    def drain(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def test_monitor_prints_messages_and_ends_on_ctrl_c(sandbox: SandboxProcess) -> None:
    device = provision_device(sandbox)
    other = provision_device(sandbox)
    monitor = MonitorProcess("--data-dir", str(sandbox.data_dir), "--device", device.client_id)
    try:
        monitor.wait_line(lambda line: line.startswith("following device"), source="err")
        time.sleep(0.3)
        good = device_messages(1, "cli")[0]
        bad = json.loads(device_messages(1, "cli-bad")[0])
        del bad["assetid"]
        for dev, payloads in ((other, [good]), (device, [good, json.dumps(bad).encode()])):
            topic = device_topic(dev)
            with device_probe(sandbox, dev) as probe:
                for payload in payloads:
                    probe.publish(topic, payload)
        first = monitor.wait_line(lambda line: "✓" in line)
        assert device.client_id in first
        assert "generic.signal/Status v2" in first
        invalid = monitor.wait_line(lambda line: "✗" in line)
        assert device.client_id in invalid
        reason = monitor.wait_line(lambda line: line.strip().startswith("$."))
        assert "$.assetid: required property is missing" in reason
        assert all(other.client_id not in line for line in monitor.drain())
        monitor.proc.send_signal(signal.SIGINT)
        assert monitor.proc.wait(10) == 0
    finally:
        monitor.close()


def test_monitor_without_a_sandbox_says_so(tmp_path: Path) -> None:
    result = run_iotref("monitor", "--data-dir", str(tmp_path), timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"iotref: no sandbox is running on {tmp_path} "
        f"(start one with: iotref sandbox up --data-dir {tmp_path})"
    ]
