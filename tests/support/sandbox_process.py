"""Start the real sandbox (``iotref sandbox up``) as a subprocess on free ports with a
temporary data dir, wait until it is ready, and stop it leaving no process behind; find
its Mosquitto and wait for the sandbox to restart a killed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.ports import port_open
from tests.support.waiting import wait_until


class SandboxStartError(RuntimeError):
    pass


@dataclass
class SandboxProcess:
    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None
    _descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return str(self.info["http_url"])

    @property
    def admin_token(self) -> str:
        return str(self.info["admin_token"])

    @property
    def mqtt_port(self) -> int:
        return int(self.info["mqtt_port"])

    @property
    def admin_headers(self) -> dict[str, str]:
        """The ``Authorization`` header of the operator (admin token)."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.http_url, timeout=10, **kwargs)

    def admin_http(self) -> httpx.Client:
        """An HTTP client of the sandbox that sends the admin token."""
        return self.http(headers=self.admin_headers)

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 45) -> SandboxProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sandbox_json = self.data_dir / "sandbox.json"
        sandbox_json.unlink(missing_ok=True)
        self.log_path = self.data_dir / "process-output.log"
        out = self.log_path.open("ab")
        cmd = [
            sys.executable,
            "-m",
            "iotref.cli.main",
            "sandbox",
            "up",
            "--data-dir",
            str(self.data_dir),
            "--http-port",
            "0",
            "--mqtt-port",
            "0",
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SandboxStartError(
                    f"sandbox exited with {self.proc.returncode}:\n{self.output()}"
                )
            if sandbox_json.exists():
                try:
                    self.info = json.loads(sandbox_json.read_text())
                    break
                except ValueError:
                    pass
            time.sleep(0.05)
        else:
            self.stop()
            raise SandboxStartError(f"sandbox not ready in {timeout}s:\n{self.output()}")
        self._remember_descendants()
        return self

    def _remember_descendants(self) -> None:
        assert self.proc is not None
        try:
            self._descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            self._descendants = []

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def mosquitto_processes(self) -> list[psutil.Process]:
        """The sandbox's Mosquitto processes (one while it runs, none while restarting)."""
        return [p for p in self.descendants() if p.name() == "mosquitto"]

    def mosquitto(self) -> psutil.Process:
        """The sandbox's one running Mosquitto."""
        found = self.mosquitto_processes()
        assert len(found) == 1, found
        return found[0]

    def wait_mosquitto_restarted(self, old: psutil.Process, timeout: float = 30) -> None:
        """Until the sandbox runs a Mosquitto other than ``old`` and the device port
        accepts connections again."""

        def back() -> bool:
            running = self.mosquitto_processes()
            return any(p.pid != old.pid for p in running) and port_open(self.mqtt_port)

        wait_until(back, timeout, "the sandbox to restart Mosquitto")

    def output(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-20000:]
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stop the sandbox; return its exit code. Kills stragglers and fails loudly if any."""
        if self.proc is None:
            return 0
        self._remember_descendants_if_running()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(
                    f"sandbox did not stop in {timeout}s:\n{self.output()}"
                ) from None
        leftovers = [p for p in self._descendants if _alive(p)]
        for p in leftovers:
            p.kill()
        if leftovers:
            raise AssertionError(f"sandbox left processes behind: {leftovers}")
        return self.proc.returncode

    def _remember_descendants_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            current = self.descendants()
            known = {p.pid for p in self._descendants}
            self._descendants += [p for p in current if p.pid not in known]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
