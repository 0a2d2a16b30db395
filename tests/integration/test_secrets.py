"""Secrets stay secret, against the real sandbox and the real command line: the actual
access and refresh tokens, the device's private key, the sandbox's CA and operator keys and
its admin token appear in no log, error or crash report; and every secret file has a
private mode.

Searched: the CLI's ``-vv`` output of a whole login / provision / status / failure, the
sandbox's log files (``DATA_DIR/logs``) and console output, pytest's captured log records
of a device running in this process at DEBUG, and the traceback of a device process that
crashes with the secrets loaded. The admin token may only be in ``sandbox.json`` and in the
monitor link that ``sandbox up`` prints on its console for the operator to open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.onboarding.certificate_store import PRIVATE_KEY_FILE, PROPERTIES_FILE
from iotref.device.onboarding.token_store import TokenStore
from iotref.device.shadow.sync import ShadowSync
from iotref.sandbox.provisioning.certificate_authority import CertificateAuthorities
from tests.conftest import SandboxFactory
from tests.support.cli_process import cli_environ, run_iotref
from tests.support.figures import record
from tests.support.onboarding import machine_spec, sandbox_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    from pathlib import Path
    from iotref.device.connection.connection import Connection
    from iotref.device.connection.settings import ConnectionSettings
    from iotref.device.onboarding.environment import load_environment_file
    from iotref.device.onboarding.token_store import TokenStore

    logging.basicConfig(level=logging.DEBUG)
    store = Path(sys.argv[1])
    tokens = TokenStore(Path(sys.argv[2]) / "tokens").load(load_environment_file(Path(sys.argv[3])))
    key_pem = (store / "devicePrivateKey.pem").read_text()

    async def main() -> None:
        async with Connection(ConnectionSettings.from_store(store)) as conn:
            await conn.publish("not/allowed/here", b"{}")  # refused: PublishFailed

    asyncio.run(main())
    """
)


def _body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM (what would betray a key)."""
    return [line for line in pem.strip().splitlines() if not line.startswith("-----")]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_no_secret_in_logs_errors_or_crash_reports(
    sandbox_factory: SandboxFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sb = sandbox_factory("--auto-approve", "--poll-interval", "0", "--access-token-ttl", "2")
    home = tmp_path / "home"
    env_file = sb.info["env_file"]
    env = sandbox_env(sb)
    tokens = TokenStore(home / "tokens")
    outputs: dict[str, str] = {}
    token_values: set[str] = set()

    def run(label: str, *args: str, ok: bool = True) -> None:
        result = run_iotref("-vv", *args, cwd=tmp_path, iotref_home=home)
        assert (result.returncode == 0) == ok, result.stderr
        outputs[f"cli {label}"] = result.stdout + result.stderr
        saved = tokens.load(env)
        if saved is not None:
            token_values.update((saved.access_token, saved.refresh_token))

    spec = machine_spec("secrets")
    run("login", "login", "--env-file", env_file)
    run("provision", "provision", "--env-file", env_file, "--name", spec.name,
        "--manufacturer", spec.manufacturer, "--serial-number", spec.serial_number)  # fmt: skip
    run("provision --renew", "provision", "--renew", "--env-file", env_file)
    run("status", "status", "--env-file", env_file)
    run("provision (bad site)", "provision", "--env-file", env_file, "--name", "x",
        "--manufacturer", "y", "--serial-number", "z", "--site", "nowhere", ok=False)  # fmt: skip
    store = tmp_path / "certificate_store" / "local"
    assert len(token_values) >= 4, "the refresh did not rotate the tokens"

    # A device in this process at DEBUG: connection, shadow sync, a refused publish.
    caplog.set_level(logging.DEBUG)

    async def device() -> None:
        async with (
            Connection(ConnectionSettings.from_store(store)) as conn,
            ShadowSync(conn, json.loads((store / PROPERTIES_FILE).read_text())["client_id"]),
        ):
            with pytest.raises(Exception, match="refused"):
                await conn.publish("not/allowed/here", b"{}")

    asyncio.run(device())
    outputs["pytest captured log"] = caplog.text

    # A device process that crashes (unhandled PublishFailed) with the secrets loaded.
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    crash = subprocess.run(
        [sys.executable, str(script), str(store), str(home), env_file],
        cwd=REPO, env=cli_environ(iotref_home=home), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert crash.returncode != 0 and "Traceback" in crash.stderr, crash.stderr
    outputs["crash report"] = crash.stdout + crash.stderr

    sb.stop()  # flush the sandbox's logs
    logs = sorted(p for p in (sb.data_dir / "logs").rglob("*") if p.is_file())
    assert logs, "the sandbox wrote no logs"
    for path in logs:
        outputs[f"sandbox log {path.name}"] = path.read_text(errors="replace")
    console = sb.output()

    cas = CertificateAuthorities(sb.data_dir / "ca")
    secrets: dict[str, list[str]] = {
        "access/refresh tokens": sorted(token_values),
        "device private key": _body_lines((store / PRIVATE_KEY_FILE).read_text()),
        "admin token": [str(sb.info["admin_token"])],
        "device CA key": _body_lines(cas.device_ca_key_path.read_text()),
        "operator key": _body_lines(cas.operator_key_path.read_text()),
        "AWS secret access key": [str(sb.info.get("aws_secret_access_key", ""))],
    }
    secrets = {k: [v for v in vs if len(v) >= 16] for k, vs in secrets.items()}
    leaks = [
        f"{what} in {where}"
        for where, text in outputs.items()
        for what, values in secrets.items()
        if any(v in text for v in values)
    ]
    assert "PRIVATE KEY" not in "\n".join(outputs.values())
    # The console of `sandbox up` may show the admin token in the monitor link only.
    console_leaks = [
        what
        for what, values in secrets.items()
        for line in console.splitlines()
        if any(v in line for v in values) and "/monitor?token=" not in line
    ]
    record(
        "security",
        {
            "check": "secrets in logs, errors and crash reports",
            "outcome": "none found"
            if not leaks and not console_leaks
            else f"LEAKS: {leaks + console_leaks}",
            "searched": [*sorted(outputs), "sandbox console"],
        },
    )
    assert leaks == []
    assert console_leaks == []


def test_secret_files_are_private(sandbox_factory: SandboxFactory, tmp_path: Path) -> None:
    sb = sandbox_factory("--auto-approve", "--poll-interval", "0")
    home = tmp_path / "home"
    env_file = sb.info["env_file"]
    assert (
        run_iotref("login", "--env-file", env_file, cwd=tmp_path, iotref_home=home).returncode == 0
    )
    spec = machine_spec("modes")
    provision = run_iotref("provision", "--env-file", env_file, "--name", spec.name,
                       "--manufacturer", spec.manufacturer, "--serial-number",
                       spec.serial_number, cwd=tmp_path, iotref_home=home)  # fmt: skip
    assert provision.returncode == 0, provision.stderr
    store = tmp_path / "certificate_store" / "local"
    cas = CertificateAuthorities(sb.data_dir / "ca")
    files = {
        "token files": sorted((home / "tokens").glob("*.json")),
        "devicePrivateKey.pem": [store / PRIVATE_KEY_FILE],
        "sandbox CA and service keys": sorted(cas.ca_dir.glob("*.key")),
        "sandbox.json": [sb.data_dir / "sandbox.json"],
    }
    dirs = {
        "token dir": home / "tokens",
        "certificate store": store,
        "sandbox data dir": sb.data_dir,
        "sandbox CA dir": cas.ca_dir,
    }
    assert files["token files"] and len(files["sandbox CA and service keys"]) >= 4
    found = {str(p): oct(_mode(p)) for paths in files.values() for p in paths}
    found |= {str(p): oct(_mode(p)) for p in dirs.values()}
    bad_files = [f"{p} {oct(_mode(p))}" for ps in files.values() for p in ps if _mode(p) & 0o077]
    bad_dirs = [f"{p} {oct(_mode(p))}" for p in dirs.values() if _mode(p) & 0o077]
    record(
        "security",
        {
            "check": "file modes of secrets",
            "outcome": "all private (files 0600, dirs 0700)"
            if not bad_files + bad_dirs
            else f"NOT PRIVATE: {bad_files + bad_dirs}",
            "files": found,
        },
    )
    assert bad_dirs == []
    assert bad_files == []


def test_sandbox_database_holding_the_admin_token_is_private(
    sandbox_factory: SandboxFactory,
) -> None:
    sb = sandbox_factory("--auto-approve", "--poll-interval", "0")
    database = sb.data_dir / "sandbox.db"
    files = [f for f in (database, sb.data_dir / "sandbox.db-wal") if f.exists()]
    # The token sits in the database or, before a checkpoint, in its write-ahead log.
    assert any(str(sb.info["admin_token"]).encode() in f.read_bytes() for f in files)
    for extra in files[1:]:
        assert _mode(extra) & 0o077 == 0, (extra, oct(_mode(extra)))
    mode = _mode(database)
    record(
        "security",
        {
            "check": "file mode of sandbox.db (admin token, AWS secret key)",
            "outcome": f"{oct(mode)} (data dir {oct(_mode(sb.data_dir))})",
        },
    )
    assert mode & 0o077 == 0, oct(mode)
