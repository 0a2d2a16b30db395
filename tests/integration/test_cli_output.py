"""What the CLI prints, against the real sandbox: the demo account where a newcomer needs
it (banner, sign-in page, ``iotref login``), one ingestion line at start-up, the monitor
URL in ``sandbox status``, ``status --json`` and the CRL, ``--quiet``, one line per
failure by default, and ``--log-file`` with the full log and no secret."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from iotref.device.onboarding.certificate_store import PRIVATE_KEY_FILE, PROPERTIES_FILE
from iotref.sandbox.directory.seed import DEMO_EMAIL, DEMO_PASSWORD
from tests.conftest import SandboxFactory
from tests.support.cli_process import run_iotref
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration

DEMO_LINE = f"{DEMO_EMAIL}, password {DEMO_PASSWORD}"
MACHINE = ["--manufacturer", "iotref tests", "--kind", "digital_press"]


def _provision(sb: SandboxProcess, tmp_path: Path, home: Path, store: Path, serial: str) -> None:
    env_file = sb.info["env_file"]
    login = run_iotref("login", "--no-qr", "--env-file", env_file, cwd=tmp_path, iotref_home=home)
    assert login.returncode == 0, login.stderr
    provision = run_iotref(
        "provision", "--env-file", env_file, "--store", str(store), "--name", serial,
        "--serial-number", serial, *MACHINE, cwd=tmp_path, iotref_home=home,
    )  # fmt: skip
    assert provision.returncode == 0, provision.stderr


def test_banner_and_sign_in_page_name_the_demo_account(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory("--poll-interval", "1")  # no --auto-approve: the person signs in
    out = sb.output()
    assert f"sign in:    {DEMO_LINE}" in out
    # sixteen ingestion connections, one line
    assert len(re.findall(r"ingestion subscribed", out)) == 1
    assert "on 16 connections" in out
    with sb.http() as http:
        page = http.get("/oauth/device", params={"user_code": "12345678"})
        account = http.get("/oauth/device/demo_account").json()
    assert DEMO_EMAIL in page.text and f"<code>{DEMO_PASSWORD}</code>" in page.text
    assert account == {"email": DEMO_EMAIL, "password": DEMO_PASSWORD}


def test_login_on_a_local_sandbox_names_the_demo_account(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    login = run_iotref(
        "login", "--no-qr", "--env-file", sandbox.info["env_file"], cwd=tmp_path,
        iotref_home=tmp_path / "home",
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    assert f"sign in as {DEMO_LINE}" in login.stdout


def test_sandbox_status_prints_the_monitor_url(sandbox: SandboxProcess, tmp_path: Path) -> None:
    status = run_iotref(
        "sandbox", "status", "--data-dir", str(sandbox.data_dir), cwd=tmp_path, iotref_home=tmp_path
    )
    assert status.returncode == 0, status.stderr
    url = f"{sandbox.http_url}/monitor?token={sandbox.admin_token}"
    assert f"  monitor: {url}" in status.stdout.splitlines()
    assert httpx.get(url, timeout=10, follow_redirects=True).status_code == 200


def test_status_json_quiet_and_the_crl(sandbox: SandboxProcess, tmp_path: Path) -> None:
    home, store = tmp_path / "home", tmp_path / "store"
    _provision(sandbox, tmp_path, home, store, "SN-JSON-1")
    options = ["--env-file", sandbox.info["env_file"], "--store", str(store)]
    properties = json.loads((store / PROPERTIES_FILE).read_text())

    report = run_iotref("status", "--json", *options, cwd=tmp_path, iotref_home=home)
    assert report.returncode == 0, report.stdout + report.stderr
    document = json.loads(report.stdout)
    assert document["ok"] is True and document["problems"] == []
    assert document["properties"] == properties
    assert document["login"]["logged_in"] is True
    assert document["platform"]["verdict"] == "accepted"
    crl_url = f"{sandbox.http_url}/ca/device.crl"
    assert document["platform"]["crls"] == [
        {"url": crl_url, "state": "good", "detail": "not listed", "revoked_at": None}
    ]
    tokens = json.loads(next((home / "tokens").glob("*.json")).read_text())
    for secret in (tokens["access_token"], tokens["refresh_token"]):
        assert secret not in report.stdout

    text = run_iotref("status", *options, cwd=tmp_path, iotref_home=home).stdout
    assert "  chain " not in text  # the long chain sentence only with a problem or -v
    assert "  chain " in run_iotref("-v", "status", *options, cwd=tmp_path, iotref_home=home).stdout
    quiet = run_iotref("--quiet", "status", *options, cwd=tmp_path, iotref_home=home)
    assert quiet.stdout == "status       ok\n"
    quiet_provision = run_iotref("-q", "provision", *options, cwd=tmp_path, iotref_home=home)
    assert quiet_provision.returncode == 0
    assert quiet_provision.stdout.startswith("The certificate store is complete")
    assert "reusing the store" not in quiet_provision.stdout  # a progress line

    # --quiet run: the summary alone, no intro, no status lines
    loud = run_iotref("run", *options, "--duration", "2", cwd=tmp_path, iotref_home=home)
    assert loud.returncode == 0, loud.stderr
    quiet_run = run_iotref("-q", "run", *options, "--duration", "2", cwd=tmp_path, iotref_home=home)
    assert quiet_run.returncode == 0, quiet_run.stderr
    summary = [line for line in loud.stdout.splitlines() if line.strip()][-1]
    assert quiet_run.stdout.splitlines() == [
        line for line in quiet_run.stdout.splitlines() if line.startswith(summary.split()[0])
    ]
    assert len(quiet_run.stdout.splitlines()) == 1
    assert "Running sender" in loud.stdout and "Running sender" not in quiet_run.stdout

    with sandbox.http() as http:
        revoked = http.post(
            f"/admin/things/{properties['client_id']}/revoke",
            headers=sandbox.admin_headers,
        )
    assert revoked.status_code == 200
    after = run_iotref("status", "--json", *options, cwd=tmp_path, iotref_home=home)
    assert after.returncode == 1
    document = json.loads(after.stdout)
    assert document["platform"]["verdict"] == "revoked"
    assert document["platform"]["crls"][0]["state"] == "revoked"
    assert "revoked" in document["platform"]["handshake"]  # the broker says so too
    assert [p["code"] for p in document["problems"]] == ["certificate_revoked"]
    assert document["problems"][0]["next_step"].endswith(
        f"--store {store} --renew' for a new key and certificate"
    )


def test_a_failure_is_said_once_by_default(sandbox: SandboxProcess, tmp_path: Path) -> None:
    """``iotref run`` towards a broker that is not there: the status line says so; at
    default verbosity no WARNING log line repeats it (with -v the log lines are back)."""
    home, store = tmp_path / "home", tmp_path / "store"
    _provision(sandbox, tmp_path, home, store, "SN-ONCE-1")
    properties = json.loads((store / PROPERTIES_FILE).read_text())
    properties["mqtt_port"] = 9  # nothing listens there
    (store / PROPERTIES_FILE).write_text(json.dumps(properties))
    options = ["--env-file", sandbox.info["env_file"], "--store", str(store), "--duration", "3",
               "--status-every", "0.5"]  # fmt: skip
    quiet_logs = run_iotref("run", *options, cwd=tmp_path, iotref_home=home, timeout=120)
    assert "unreachable" in quiet_logs.stdout + quiet_logs.stderr
    assert "WARNING" not in quiet_logs.stderr
    verbose = run_iotref("-v", "run", *options, cwd=tmp_path, iotref_home=home, timeout=120)
    assert "WARNING iotref.connection" in verbose.stderr


def test_log_file_has_the_full_log_and_no_secret(sandbox: SandboxProcess, tmp_path: Path) -> None:
    home, store, log_file = tmp_path / "home", tmp_path / "store", tmp_path / "iotref.log"
    env_file = sandbox.info["env_file"]
    logged = ["--log-file", str(log_file)]
    login = run_iotref(
        *logged, "login", "--no-qr", "--env-file", env_file, cwd=tmp_path, iotref_home=home
    )
    assert login.returncode == 0, login.stderr
    provision = run_iotref(
        *logged, "provision", "--env-file", env_file, "--store", str(store), "--name", "L1",
        "--serial-number", "SN-LOG-1", *MACHINE, cwd=tmp_path, iotref_home=home,
    )  # fmt: skip
    assert provision.returncode == 0, provision.stderr
    status = run_iotref(*logged, "status", "--env-file", env_file, "--store", str(store),
                    cwd=tmp_path, iotref_home=home)  # fmt: skip
    assert status.returncode == 0, status.stdout
    for result in (login, provision, status):
        assert " DEBUG " not in result.stderr and " INFO " not in result.stderr
    text = log_file.read_text()
    assert " DEBUG iotref.http: " in text  # the full log: every request
    assert " INFO iotref.onboarding" in text or " INFO iotref.device" in text
    tokens = json.loads(next((home / "tokens").glob("*.json")).read_text())
    key_lines = [
        line
        for line in (store / PRIVATE_KEY_FILE).read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    secrets = [tokens["access_token"], tokens["refresh_token"], sandbox.admin_token, *key_lines]
    for secret in secrets:
        assert secret not in text
    assert "PRIVATE KEY" not in text.replace("[redacted]", "")
