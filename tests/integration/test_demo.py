"""`iotref demo` end to end, as a newcomer runs it: in an empty folder, twice."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import SandboxFactory

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _demo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IOTREF_HOME": str(cwd / "home")}
    env.pop("IOTREF_ENV", None)
    env.pop("IOTREF_ENV_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "iotref.cli.main", "demo", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _sandboxes_under(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline and ("sandbox" in cmdline or "mosquitto" in cmdline):
            found.append(proc)
    return found


def test_demo_runs_the_whole_story_and_reuses_the_store(tmp_path: Path) -> None:
    ports = ["--http-port", str(_free_port()), "--mqtt-port", str(_free_port())]
    first = _demo(tmp_path, *ports, "--duration", "6", "--stop-sandbox")
    out = first.stdout
    assert first.returncode == 0, out + first.stderr
    assert "Traceback" not in out + first.stderr
    for step in ("sandbox", "login", "provision", "connect", "shadow"):
        assert re.search(rf"✓ {step}\b", out), (step, out)
    assert "provisioned: machine" in out
    sent = int(re.search(r"sent (\d+), acknowledged by the broker (\d+)", out).group(1))  # type: ignore[union-attr]
    received, valid = map(
        int, re.search(r"received by the platform (\d+), valid (\d+)", out).groups()
    )  # type: ignore[union-attr]
    assert sent > 10
    assert received == sent  # every message arrived once (the monitor deduplicates)
    assert valid == received
    switch = re.search(
        r"while sendTelemetryData was off, (\d+) messages reached the platform; (\d+) were held",
        out,
    )  # type: ignore[union-attr]
    assert switch is not None, out
    assert int(switch.group(1)) == 0
    assert int(switch.group(2)) > 0
    assert "demo finished" in out
    assert "sandbox stopped" in out
    assert not _sandboxes_under(tmp_path)

    second = _demo(tmp_path, *ports, "--duration", "4", "--no-switch", "--stop-sandbox")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing the certificate store" in second.stdout
    assert "login  not needed" in second.stdout
    assert not _sandboxes_under(tmp_path)


def test_the_demo_press_prints(tmp_path: Path) -> None:
    """The press produces from the first message: speed above zero and a job counter that
    rises, as the platform stored them (the sandbox's telemetry.db), not as the demo says."""
    ports = ["--http-port", str(_free_port()), "--mqtt-port", str(_free_port())]
    result = _demo(tmp_path, *ports, "--duration", "4", "--no-switch", "--stop-sandbox")
    assert result.returncode == 0, result.stdout + result.stderr
    sent = int(re.search(r"sent (\d+), acknowledged", result.stdout).group(1))  # type: ignore[union-attr]
    db = tmp_path / ".sandbox" / "telemetry.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT speed, productioncounter FROM telemetry_messages WHERE valid ORDER BY id"
        ).fetchall()
    assert len(rows) == sent > 10
    speeds = [speed for speed, _ in rows]
    assert all(speed is not None for speed in speeds)
    assert sum(1 for speed in speeds if speed > 0) > len(rows) / 2, speeds
    counters = [counter for _, counter in rows]
    assert counters == sorted(counters) and counters[-1] > counters[0], counters


def test_demo_reports_a_port_in_use_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = _demo(tmp_path, "--http-port", str(port), "--mqtt-port", str(_free_port()))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"port {port} is in use" in lines[0]
    assert "--http-port" in lines[0]


def _expire_certificate(store: Path, data_dir: Path) -> None:
    """Replace the store's certificate by one of the same key and subject, signed by the
    sandbox's device CA, that expired yesterday."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert = x509.load_pem_x509_certificate((data_dir / "ca" / "device-ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key(
        (data_dir / "ca" / "device-ca.key").read_bytes(), None
    )
    old = x509.load_pem_x509_certificate((store / "deviceCert.pem").read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca_cert.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (store / "deviceCert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_errors_a_newcomer_meets_are_one_clear_line(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    # A sandbox left running on the data dir is used, not fought.
    left_running = sandbox_factory("--auto-approve", "--poll-interval", "1",
                                   data_dir=tmp_path / ".sandbox")  # fmt: skip
    first = _demo(tmp_path, "--duration", "3", "--no-switch")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "using the sandbox already running" in first.stdout
    store = tmp_path / "certificate_store" / "local"

    # An expired certificate: one line, and the way out.
    _expire_certificate(store, left_running.data_dir)
    expired = _demo(tmp_path, "--duration", "3", "--no-switch")
    assert expired.returncode == 1
    lines = [line for line in expired.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, expired.stderr
    assert "expired" in lines[0]
    assert "iotref provision --renew" in lines[0]

    # A store from another environment (another sandbox, other ports): refused, one line.
    left_running.stop()
    ports = ["--http-port", str(_free_port()), "--mqtt-port", str(_free_port())]
    other = _demo(
        tmp_path, "--data-dir", str(tmp_path / "other-sandbox"), *ports, "--duration", "3",
        "--stop-sandbox",
    )  # fmt: skip
    assert other.returncode == 1
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, other.stderr
    assert "belongs to environment" in lines[0]
    assert "--store" in lines[0]
    assert "Traceback" not in other.stdout + other.stderr
    assert not _sandboxes_under(tmp_path / "other-sandbox")
