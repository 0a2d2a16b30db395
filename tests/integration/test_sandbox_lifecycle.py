"""`iotref sandbox up` / `status`: readiness files, one sandbox per data dir, clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from pathlib import Path

import httpx
import psutil
import pytest

from iotref.device.onboarding.environment import load_environment_file
from iotref.protocol.environment_file import REQUIRED_KEYS, parse_env_file
from tests.conftest import SandboxFactory
from tests.support.cli_process import run_iotref
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration

REQUIRED_INFO = (
    "http_url",
    "mqtt_host",
    "mqtt_port",
    "admin_token",
    "env_file",
    "ca_file",
    "operator_cert",
    "operator_key",
)


def test_up_writes_sandbox_json_and_env_file(sandbox: SandboxProcess) -> None:
    info = sandbox.info
    for key in REQUIRED_INFO:
        assert info.get(key), key
    assert info["http_url"].startswith("http://127.0.0.1:")
    assert info["mqtt_host"] == "localhost"
    for key in ("ca_file", "operator_cert", "operator_key", "env_file"):
        assert Path(info[key]).is_file(), key
    sandbox_json = sandbox.data_dir / "sandbox.json"
    assert stat.S_IMODE(sandbox_json.stat().st_mode) == 0o600, "sandbox.json holds the admin token"
    env = parse_env_file(Path(info["env_file"]).read_text())
    assert set(REQUIRED_KEYS) <= set(env)
    assert env["base_url"] == info["http_url"]
    assert env["DIRECTORY_HOST"] == info["http_url"]
    # The quotas it measures, for the devices that use this file to pace to.
    assert (env["PUBLISH_RATE_LIMIT"], env["THROUGHPUT_LIMIT"]) == ("100", "524288")
    assert load_environment_file(Path(info["env_file"])).client_limits() == {
        "publish_rate_limit": 100.0,
        "throughput_limit": 524288,
    }
    health = httpx.get(f"{info['http_url']}/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"


def test_status_reports_running_sandbox(sandbox: SandboxProcess) -> None:
    result = run_iotref("sandbox", "status", "--data-dir", str(sandbox.data_dir))
    assert result.returncode == 0, result.stderr
    assert f"pid {sandbox.proc.pid}" in result.stdout  # type: ignore[union-attr]
    assert sandbox.http_url in result.stdout
    as_json = run_iotref("sandbox", "status", "--data-dir", str(sandbox.data_dir), "--json")
    assert json.loads(as_json.stdout)["http_url"] == sandbox.http_url


def test_status_without_sandbox_says_so(tmp_path: Path) -> None:
    result = run_iotref("sandbox", "status", "--data-dir", str(tmp_path / "none"))
    assert result.returncode == 3
    assert "no sandbox is running" in result.stdout


def test_second_up_on_same_data_dir_refuses(sandbox: SandboxProcess) -> None:
    result = run_iotref(
        "sandbox",
        "up",
        "--data-dir",
        str(sandbox.data_dir),
        "--http-port",
        "0",
        "--mqtt-port",
        "0",
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "already running" in lines[0]
    assert "Traceback" not in result.stderr
    # the running one is untouched
    assert httpx.get(f"{sandbox.http_url}/healthz", timeout=5).status_code == 200


def test_http_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_iotref(
            "sandbox",
            "up",
            "--data-dir",
            str(tmp_path / "d"),
            "--http-port",
            str(port),
            "--mqtt-port",
            "0",
        )
    assert result.returncode != 0
    assert f"HTTP port {port} is in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_everything(sandbox_factory: SandboxFactory, sig: int) -> None:
    sb = sandbox_factory()
    children = sb.descendants()
    assert any("mosquitto" in p.name() for p in children), children
    code = sb.stop(sig)
    assert code == 0, sb.output()
    for p in children:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
    assert not (sb.data_dir / "sandbox.json").exists()
    assert run_iotref("sandbox", "status", "--data-dir", str(sb.data_dir)).returncode == 3


def test_sigkill_of_the_sandbox_takes_mosquitto_down(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory()
    children = sb.descendants()
    assert sb.proc is not None
    os.kill(sb.proc.pid, signal.SIGKILL)
    sb.proc.wait(10)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind after SIGKILL: {alive}"
    # a new sandbox can take the data dir over
    again = sandbox_factory(data_dir=sb.data_dir)
    assert httpx.get(f"{again.http_url}/healthz", timeout=5).status_code == 200


def test_admin_token_is_kept_across_restarts(sandbox_factory: SandboxFactory) -> None:
    first = sandbox_factory()
    token = first.admin_token
    first.stop()
    second = sandbox_factory(data_dir=first.data_dir)
    assert second.admin_token == token


def test_a_sandbox_has_an_identity_of_its_own(sandbox_factory: SandboxFactory) -> None:
    """sandbox.json, env.local and /healthz carry one id; a restart keeps it, a new data dir
    on the same ports is another sandbox with another id."""
    from iotref.cli.local_sandbox import sandbox_id_at

    first = sandbox_factory()
    sandbox_id = str(first.info["sandbox_id"])
    env = parse_env_file(Path(first.info["env_file"]).read_text())
    assert env["SANDBOX_ID"] == sandbox_id
    assert httpx.get(f"{first.http_url}/healthz", timeout=5).json()["sandbox_id"] == sandbox_id
    assert sandbox_id_at(first.http_url) == sandbox_id
    ports = ["--http-port", str(first.info["http_url"].rsplit(":", 1)[1]),
             "--mqtt-port", str(first.mqtt_port)]  # fmt: skip
    first.stop()
    assert sandbox_id_at(first.http_url) is None  # nothing answers there now

    again = sandbox_factory(*ports, data_dir=first.data_dir)
    assert again.info["sandbox_id"] == sandbox_id
    again.stop()
    other = sandbox_factory(*ports)
    assert other.http_url == first.http_url
    assert other.info["sandbox_id"] != sandbox_id
    assert sandbox_id_at(other.http_url) == other.info["sandbox_id"]
