"""`iotref demo` end to end, as a newcomer runs it: in an empty folder, twice."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from iotref.protocol.environment_file import parse_env_file
from tests.conftest import SandboxFactory
from tests.support.cli_process import cli_environ, run_iotref
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _demo(cwd: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    return _iotref(cwd, "demo", *args, home=home)


def _iotref(cwd: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``iotref`` run in ``cwd`` as a newcomer runs it there: tokens in ``cwd/home``, or,
    with ``home``, in ``home/.config/iotref`` as for a user whose HOME that is."""
    env = cli_environ(iotref_home=None if home else cwd / "home", home=home)
    return run_iotref(*args, cwd=cwd, env=env, timeout=180)


def _sandboxes_under(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline and ("sandbox" in cmdline or "mosquitto" in cmdline):
            found.append(proc)
    return found


def test_demo_runs_the_whole_story_and_reuses_the_store(tmp_path: Path) -> None:
    ports = ["--http-port", str(free_port()), "--mqtt-port", str(free_port())]
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
    ports = ["--http-port", str(free_port()), "--mqtt-port", str(free_port())]
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
        result = _demo(tmp_path, "--http-port", str(port), "--mqtt-port", str(free_port()))
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

    # A store from another sandbox (another data dir, other ports): given with --store, it
    # is refused in one line that says what differs; the demo's own store is moved aside.
    left_running.stop()
    other_dir = ["--data-dir", str(tmp_path / "other-sandbox")]
    ports = ["--http-port", str(free_port()), "--mqtt-port", str(free_port())]
    given = _demo(
        tmp_path, *other_dir, *ports, "--store", "certificate_store/local", "--duration", "3",
        "--stop-sandbox",
    )  # fmt: skip
    assert given.returncode == 1
    lines = [line for line in given.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, given.stderr
    assert (
        f"the store certificate_store/local belongs to local at {left_running.http_url}, "
        "not local at http://127.0.0.1:" in lines[0]
    )
    assert "(the endpoint differs)" in lines[0]
    assert "--store certificate_store/local'" in lines[0]
    assert "Traceback" not in given.stdout + given.stderr
    own = _demo(tmp_path, *other_dir, *ports, "--duration", "3", "--no-switch", "--stop-sandbox")
    assert own.returncode == 0, own.stdout + own.stderr
    set_aside = f"certificate_store/local.sandbox-{left_running.info['sandbox_id']}"
    assert f"moved it to {set_aside}" in own.stdout
    assert (tmp_path / set_aside / "deviceCert.pem").is_file()  # kept, not deleted
    assert "provisioned: machine" in own.stdout
    assert not _sandboxes_under(tmp_path / "other-sandbox")


def _sandbox_id(checkout: Path) -> str:
    return parse_env_file((checkout / ".sandbox" / "env.local").read_text())["SANDBOX_ID"]


def test_two_fresh_checkouts_on_the_same_ports_both_run_the_demo(tmp_path: Path) -> None:
    """A user runs the demo in one checkout, then in a second one, then again in the first
    after removing its .sandbox: three sandboxes on the same address, one HOME whose saved
    login the first one left. Each sandbox is told apart by its id. (Empty folders stand for
    the checkouts: what the demo keeps there is .sandbox and certificate_store; it runs with
    this checkout's .venv instead of building one per checkout.)"""
    home = tmp_path / "home"
    first, second = tmp_path / "checkout-1", tmp_path / "checkout-2"
    first.mkdir()
    second.mkdir()
    ports = ["--http-port", str(free_port()), "--mqtt-port", str(free_port())]
    story = ["--duration", "3", "--no-switch", "--stop-sandbox"]
    token_dir = home / ".config" / "iotref" / "tokens"

    one = _demo(first, *ports, *story, home=home)
    assert one.returncode == 0, one.stdout + one.stderr
    [token_file] = token_dir.glob("*.json")
    assert json.loads(token_file.read_text())["environment"]["sandbox_id"] == _sandbox_id(first)

    two = _demo(second, *ports, *story, home=home)
    assert two.returncode == 0, two.stdout + two.stderr
    assert _sandbox_id(second) != _sandbox_id(first)
    assert "reusing the saved login" not in two.stdout  # the first sandbox's login is not used
    assert "device flow approved by the sandbox" in two.stdout
    assert "provisioned: machine" in two.stdout
    assert list(token_dir.glob("*.json")) == [token_file]  # replaced: one login per address
    assert json.loads(token_file.read_text())["environment"]["sandbox_id"] == _sandbox_id(second)

    # The first checkout without its .sandbox: its store belongs to a sandbox that is gone.
    # And the saved login is made to look like one from before sandbox ids (no id to
    # compare), so that the demo only learns it is stale when the sandbox refuses it.
    first_id = _sandbox_id(first)
    shutil.rmtree(first / ".sandbox")
    data = json.loads(token_file.read_text())
    del data["environment"]["sandbox_id"]
    token_file.write_text(json.dumps(data))
    three = _demo(first, *ports, *story, home=home)
    assert three.returncode == 0, three.stdout + three.stderr
    out = three.stdout
    assert f"moved it to certificate_store/local.sandbox-{first_id}" in out
    assert "reusing the saved login" in out
    notes = [line for line in out.splitlines() if "no longer valid" in line]
    assert len(notes) == 1 and "logging in again" in notes[0], out
    assert "device flow approved by the sandbox" in out
    assert re.search(r"✓ provision  (provisioned|resumed): machine", out), out
    assert "demo finished" in out
    assert not _sandboxes_under(tmp_path)


def _hold(port: int) -> socket.socket | None:
    """A socket listening on ``port``, or None if something else listens there already."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen(1)
    return sock


def test_the_demo_takes_free_ports_when_the_defaults_are_in_use(tmp_path: Path) -> None:
    # Held only while this one demo runs (if free: a developer's sandbox may hold them).
    held = [_hold(port) for port in (8780, 8883)]
    try:
        result = _demo(tmp_path, "--duration", "3", "--no-switch", "--stop-sandbox")
    finally:
        for sock in held:
            if sock is not None:
                sock.close()
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(
        r"✓ sandbox  started at http://127\.0\.0\.1:(\d+), MQTT port (\d+) \(data in "
        r"\.sandbox; ports 8780 and 8883 are in use, so it took free ones\)",
        result.stdout,
    )
    assert found is not None, result.stdout
    http_port, mqtt_port = int(found.group(1)), int(found.group(2))
    assert {http_port, mqtt_port}.isdisjoint({8780, 8883})
    env = parse_env_file((tmp_path / ".sandbox" / "env.local").read_text())
    assert env["base_url"] == f"http://127.0.0.1:{http_port}"
    assert "demo finished" in result.stdout


def test_make_demo_passes_the_ports_asked_for() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def dry_run(*variables: str) -> list[str]:
        done = subprocess.run(
            ["make", "-n", "demo", *variables], cwd=ROOT, capture_output=True, text=True,
            timeout=30, check=True,
        )  # fmt: skip
        return [line.strip() for line in done.stdout.splitlines()]

    assert ".venv/bin/iotref demo --http-port 8790 --mqtt-port 8893" in dry_run(
        "HTTP_PORT=8790", "MQTT_PORT=8893"
    )
    assert ".venv/bin/iotref demo --mqtt-port 8893" in dry_run("MQTT_PORT=8893")
    assert ".venv/bin/iotref demo" in dry_run()


def test_run_with_a_store_of_another_sandbox_says_what_differs_and_what_to_do(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    made_with = sandbox_factory("--auto-approve", "--poll-interval", "1")
    elsewhere = sandbox_factory("--auto-approve", "--poll-interval", "1")
    made_env = str(Path(made_with.info["env_file"]).relative_to(tmp_path))
    store = "plant-store"
    login = _iotref(tmp_path, "login", "--env-file", made_env, "--no-qr")
    assert login.returncode == 0, login.stderr
    provision = _iotref(
        tmp_path, "provision", "--env-file", made_env, "--store", store, "--name", "Press",
        "--manufacturer", "iotref tests", "--serial-number", f"SN-{uuid.uuid4().hex[:10]}",
    )  # fmt: skip
    assert provision.returncode == 0, provision.stderr

    # Another endpoint: what differs, and the command that uses the store as it is.
    other_env = str(Path(elsewhere.info["env_file"]).relative_to(tmp_path))
    refused = _iotref(tmp_path, "run", "--env-file", other_env, "--store", store)
    assert refused.returncode == 1
    [line] = [line for line in refused.stderr.splitlines() if line.strip()]
    assert line.startswith(
        f"iotref: the store {store} belongs to local at {made_with.http_url}, not local at "
        f"{elsewhere.http_url} (the endpoint differs)"
    ), line
    printed = re.findall(r"'(iotref [^']+)'", line)
    assert printed == [
        f"iotref run --env-file {made_env} --store {store}",
        f"iotref provision --env-file {other_env} --store {store}",
    ], line
    # As printed, plus a duration so that it ends.
    ran = _iotref(tmp_path, *shlex.split(printed[0])[1:], "--duration", "2")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.search(r"accepted [1-9]", ran.stdout), ran.stdout

    # Another sandbox on the same address (a new data dir): the certificate is of no use.
    address = ["--http-port", made_with.http_url.rsplit(":", 1)[1],
               "--mqtt-port", str(made_with.mqtt_port)]  # fmt: skip
    made_with.stop()
    successor = sandbox_factory("--auto-approve", "--poll-interval", "1", *address)
    successor_env = str(Path(successor.info["env_file"]).relative_to(tmp_path))
    refused = _iotref(tmp_path, "run", "--env-file", successor_env, "--store", store)
    assert refused.returncode == 1
    [line] = [line for line in refused.stderr.splitlines() if line.strip()]
    assert (
        f"belongs to the sandbox {made_with.info['sandbox_id']} at {made_with.http_url}, not "
        f"the one there now, {successor.info['sandbox_id']} (another sandbox" in line
    ), line
    assert (
        f"move it away ('mv {store} {store}.old') and run 'iotref provision --env-file "
        f"{successor_env} --store {store}'" in line
    ), line
