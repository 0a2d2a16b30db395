"""``iotref login | logout | provision | status`` against the real sandbox: the whole flow,
one clear line for every expected failure, a provisioning process killed half-way, every
broken store, secrets kept out of the output, and the test/live environments offline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from iotref.cli.main import main
from iotref.device.blocking import BlockingOnboarding
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PROGRESS_FILE,
    PROPERTIES_FILE,
    ROOT_CA_FILE,
)
from iotref.device.onboarding.keys import generate_private_key, load_private_key, private_key_pem
from iotref.device.onboarding.provisioning import ProvisionOptions
from iotref.device.onboarding.token_store import TokenStore
from tests.conftest import SandboxFactory
from tests.support.cli_process import cli_environ, one_line_error, run_iotref, start_iotref
from tests.support.device_keys import self_signed_pem
from tests.support.onboarding import (
    decide_in_browser,
    login_with_auto_approve,
    machine_spec,
    sandbox_env,
)
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command in-process (same entry point as the console script)."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    for var in ("IOTREF_ENV", "IOTREF_ENV_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IOTREF_HOME", str(path))
    return path


# -- the whole flow ---------------------------------------------------------------------------


def test_login_provision_status_reuse_logout(
    sandbox: SandboxProcess, home: Path, tmp_path: Path
) -> None:
    env_file = sandbox.info["env_file"]
    login = run_iotref("login", "--env-file", env_file, cwd=tmp_path, iotref_home=home)
    assert login.returncode == 0, login.stderr
    out = login.stdout
    assert "/oauth/device?user_code=" in out
    assert "code   " in out
    assert "█" in out or "▀" in out  # the QR code
    assert "expires in 1" in out  # 15:00 minutes by default
    assert "Logged in to local" in out

    spec = machine_spec("cli")
    provision = run_iotref(
        "provision", "--env-file", env_file, "--name", spec.name,
        "--manufacturer", spec.manufacturer, "--serial-number", spec.serial_number,
        "--kind", "digital_press", cwd=tmp_path, iotref_home=home,
    )  # fmt: skip
    assert provision.returncode == 0, provision.stderr
    assert "Provisioned." in provision.stdout
    store = tmp_path / "certificate_store" / "local"
    properties = json.loads((store / PROPERTIES_FILE).read_text())

    status = run_iotref("status", "--env-file", env_file, cwd=tmp_path, iotref_home=home)
    assert status.returncode == 0, status.stdout + status.stderr
    for expected in (
        properties["client_id"],
        properties["org_id"],
        properties["machine_id"],
        properties["site_id"],
        f"{properties['mqtt_endpoint']}:{properties['mqtt_port']}",
        f"CN={properties['client_id']}",
        "expires",
        "status       ok",
        "logged in as Organization",
    ):
        assert expected in status.stdout

    again = run_iotref("provision", "--env-file", env_file, cwd=tmp_path, iotref_home=home)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert json.loads((store / PROPERTIES_FILE).read_text()) == properties

    logout = run_iotref("logout", "--env-file", env_file, cwd=tmp_path, iotref_home=home)
    assert logout.returncode == 0
    assert "tokens deleted" in logout.stdout
    assert not list((home / "tokens").glob("*.json"))
    status = run_iotref("status", "--env-file", env_file, cwd=tmp_path, iotref_home=home)
    assert "not logged in" in status.stdout
    assert status.returncode == 0  # the store is still fine


def test_provision_from_json_and_toml_config(
    sandbox: SandboxProcess, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = sandbox.info["env_file"]
    login_with_auto_approve(sandbox_env(sandbox), TokenStore(home / "tokens"))
    spec = machine_spec("json")
    (tmp_path / "m.json").write_text(
        json.dumps({**spec.as_dict(), "site": "Finishing Hall", "key_type": "ec384"})
    )
    code, out, err = run_main(
        ["provision", "--env-file", env_file, "--config", str(tmp_path / "m.json"),
         "--store", str(tmp_path / "a")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "ec384 key" in out
    toml_spec = machine_spec("toml")
    (tmp_path / "m.toml").write_text(
        textwrap.dedent(f"""\
        [machine]
        name = "{toml_spec.name}"
        manufacturer = "{toml_spec.manufacturer}"
        serial-number = "{toml_spec.serial_number}"
        """)
    )
    code, out, err = run_main(
        ["provision", "--env-file", env_file, "--config", str(tmp_path / "m.toml"),
         "--store", str(tmp_path / "b"), "--key-type", "rsa3072"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "rsa3072 key" in out
    (tmp_path / "bad.toml").write_text('nmae = "typo"\n')
    code, _, err = run_main(
        ["provision", "--env-file", env_file, "--config", str(tmp_path / "bad.toml")], capsys
    )
    assert code == 1
    assert "unknown setting(s) nmae" in err


# -- one clear line for every expected failure ------------------------------------------------


def _login_process(sb: SandboxProcess, tmp_path: Path, home: Path) -> subprocess.Popen[str]:
    return start_iotref(
        "login", "--no-qr", "--env-file", sb.info["env_file"], cwd=tmp_path, iotref_home=home
    )


def _user_code(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip().startswith("code"):
            return line.split()[-1]
    raise AssertionError("no user code shown")


def test_denied_login_is_one_line(
    sandbox_factory: SandboxFactory, home: Path, tmp_path: Path
) -> None:
    sb = sandbox_factory("--poll-interval", "1")
    proc = _login_process(sb, tmp_path, home)
    try:
        decide_in_browser(sb, _user_code(proc), approve=False)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert "login denied" in one_line_error(result)


def test_expired_login_is_one_line(
    sandbox_factory: SandboxFactory, home: Path, tmp_path: Path
) -> None:
    sb = sandbox_factory("--poll-interval", "1", "--device-code-ttl", "2")
    result = run_iotref(
        "login", "--no-qr", "--env-file", sb.info["env_file"], cwd=tmp_path, iotref_home=home
    )
    assert "login expired" in one_line_error(result)
    assert "expires in 0:0" in result.stdout


def test_network_failure_is_one_line(home: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "env.down"
    env_file.write_text(
        "base_url=http://127.0.0.1:9\nDIRECTORY_HOST=http://127.0.0.1:9\n"
        "DIRECTORY_OAUTH_CLIENT_ID=x\nSCOPE=Org.directory.machines.rw\n"
    )
    result = run_iotref("login", "--env-file", str(env_file), cwd=tmp_path, iotref_home=home)
    line = one_line_error(result)
    assert "cannot reach http://127.0.0.1:9" in line
    assert "next:" in line


def test_usage_and_configuration_errors_are_one_line(home: Path, tmp_path: Path) -> None:
    remote_http = tmp_path / "env.remote"
    remote_http.write_text(
        "base_url=http://example.com\nDIRECTORY_HOST=https://example.com\n"
        "DIRECTORY_OAUTH_CLIENT_ID=x\nSCOPE=a\n"
    )
    line = one_line_error(
        run_iotref("login", "--env-file", str(remote_http), cwd=tmp_path, iotref_home=home)
    )
    assert "plain http:// for example.com" in line
    line = one_line_error(
        run_iotref("status", "--env", "test", "--env-file", str(remote_http), cwd=tmp_path,
               iotref_home=home)
    )  # fmt: skip
    assert "not both" in line
    line = one_line_error(
        run_iotref("provision", "--env", "test", "--name", "x", cwd=tmp_path, iotref_home=home)
    )
    assert "manufacturer, serial-number is missing" in line


# -- a provisioning process killed half-way ---------------------------------------------------

_KILL_AFTER_MACHINE = """
import os, sys
from iotref.device.onboarding import certificate_store
from iotref.device.onboarding.certificate_store import ProgressState

original = certificate_store.CertificateStore.write_progress

def write_then_die(self, progress):
    original(self, progress)
    if progress.state is ProgressState.MACHINE_CREATED:
        os.kill(os.getpid(), {signal})

certificate_store.CertificateStore.write_progress = write_then_die
from iotref.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_provisioning_resumes_without_a_second_machine(
    sandbox: SandboxProcess, home: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    env_file = sandbox.info["env_file"]
    login_with_auto_approve(sandbox_env(sandbox), TokenStore(home / "tokens"))
    spec = machine_spec("killed")
    args = ["provision", "--env-file", env_file, "--name", spec.name,
            "--manufacturer", spec.manufacturer, "--serial-number", spec.serial_number]  # fmt: skip
    wrapper = tmp_path / "dies.py"
    wrapper.write_text(_KILL_AFTER_MACHINE.format(signal=int(sig)))
    killed = subprocess.run(
        [sys.executable, str(wrapper), *args], cwd=tmp_path, env=cli_environ(iotref_home=home),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert killed.returncode == -sig, killed.stderr
    store = tmp_path / "certificate_store" / "local"
    progress = json.loads((store / PROGRESS_FILE).read_text())
    assert progress["state"] == "machine_created"
    assert not (store / CERTIFICATE_FILE).exists()

    status = run_iotref("status", "--env-file", env_file, cwd=tmp_path, iotref_home=home)
    assert status.returncode == 1
    assert "[incomplete]" in status.stdout
    assert f"continues with machine {progress['machine_id']}" in status.stdout

    resumed = run_iotref(*args, cwd=tmp_path, iotref_home=home)
    assert resumed.returncode == 0, resumed.stderr
    assert "continued the interrupted run" in resumed.stdout
    assert "created machine" not in resumed.stdout
    properties = json.loads((store / PROPERTIES_FILE).read_text())
    assert properties["machine_id"] == progress["machine_id"]
    assert (
        run_iotref("status", "--env-file", env_file, cwd=tmp_path, iotref_home=home).returncode == 0
    )


# -- every broken store -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def provisioned_store(
    sandbox: SandboxProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A provisioned store and a second one (for a foreign key), made once."""
    base = tmp_path_factory.mktemp("stores")
    tokens = TokenStore(base / "home" / "tokens")
    env = sandbox_env(sandbox)
    login_with_auto_approve(env, tokens)
    for name in ("good", "other"):
        with BlockingOnboarding(env, store_path=base / name, token_store=tokens) as ob:
            ob.provision(ProvisionOptions(machine=machine_spec(name)))
    return base / "good", base / "other"


def _break(kind: str, store: Path, other: Path) -> list[str]:
    """Break ``store`` in one way; return extra arguments for ``iotref status``."""
    if kind == "incomplete":
        (store / CERTIFICATE_FILE).unlink()
    elif kind == "properties_invalid":
        (store / PROPERTIES_FILE).write_text("{broken")
    elif kind == "properties_extra_key":
        data = json.loads((store / PROPERTIES_FILE).read_text())
        (store / PROPERTIES_FILE).write_text(json.dumps({**data, "thing_name": "x"}))
    elif kind == "certificate_unparsable":
        (store / CERTIFICATE_FILE).write_text("not a certificate\n")
    elif kind == "key_unparsable":
        (store / PRIVATE_KEY_FILE).write_text("-----BEGIN PRIVATE KEY-----\nAA\n")
    elif kind == "key_mismatch":
        shutil.copy(other / PRIVATE_KEY_FILE, store / PRIVATE_KEY_FILE)
    elif kind == "certificate_self_signed":
        (store / CERTIFICATE_FILE).write_bytes(
            self_signed_pem(
                load_private_key((store / PRIVATE_KEY_FILE).read_bytes()), "forged", days=400
            )
        )
    elif kind == "root_ca_invalid":
        shutil.copy(store / CERTIFICATE_FILE, store / ROOT_CA_FILE)
    elif kind == "root_ca_unparsable":
        (store / ROOT_CA_FILE).write_text("")
    elif kind == "insecure_permissions":
        os.chmod(store / PRIVATE_KEY_FILE, 0o644)
    elif kind == "certificate_expiring":
        return ["--expiry-threshold-days", "400"]
    elif kind == "wrong_environment":
        env_file = store.parent / "env.local"
        env_file.write_text(
            "base_url=http://127.0.0.1:9\nDIRECTORY_HOST=http://127.0.0.1:9\n"
            "DIRECTORY_OAUTH_CLIENT_ID=x\nSCOPE=Org.directory.machines.rw\n"
        )
        return ["--env-file", str(env_file)]
    elif kind == "unknown_environment":
        (store / PROGRESS_FILE).unlink()
    elif kind == "key_replaced":
        (store / PRIVATE_KEY_FILE).write_bytes(private_key_pem(generate_private_key("rsa2048")))
    else:
        raise AssertionError(kind)
    return []


BROKEN = {
    "incomplete": ("incomplete", "missing deviceCert.pem"),
    "properties_invalid": ("properties_invalid", "not valid JSON"),
    "properties_extra_key": ("properties_invalid", "unexpected thing_name"),
    "certificate_unparsable": ("certificate_unparsable", "not a PEM certificate"),
    "key_unparsable": ("key_unparsable", "unusable"),
    "key_mismatch": ("key_mismatch", "does not belong to devicePrivateKey.pem"),
    "key_replaced": ("key_mismatch", "does not belong"),
    "certificate_self_signed": ("certificate_self_signed", "self-signed"),
    "root_ca_invalid": ("root_ca_invalid", "not a self-signed CA certificate"),
    "root_ca_unparsable": ("root_ca_unparsable", "not a PEM certificate"),
    "insecure_permissions": ("insecure_permissions", "readable by others"),
    "certificate_expiring": ("certificate_expiring", "threshold 400"),
    "wrong_environment": ("wrong_environment", "(the endpoint differs)"),
    "unknown_environment": ("unknown_environment", "no record of its environment"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_store_is_reported_with_reason_and_next_step(
    sandbox: SandboxProcess,
    provisioned_store: tuple[Path, Path],
    tmp_path: Path,
    home: Path,
    kind: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good, other = provisioned_store
    store = tmp_path / "store"
    shutil.copytree(good, store)
    extra = _break(kind, store, other)
    args = ["status", "--store", str(store)]
    if "--env-file" not in extra:
        args += ["--env-file", sandbox.info["env_file"]]
    code, out, err = run_main([*args, *extra], capsys)
    code_name, reason = BROKEN[kind]
    assert code == 1, out + err
    assert f"[{code_name}]" in out
    assert reason in out
    if kind == "wrong_environment":  # said once, in the problem list
        assert out.count("belongs to") == 1, out
    assert "    next: " in out
    assert "Traceback" not in out + err


def test_provision_refuses_a_broken_or_foreign_store(
    sandbox: SandboxProcess,
    provisioned_store: tuple[Path, Path],
    tmp_path: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good, other = provisioned_store
    store = tmp_path / "store"
    shutil.copytree(good, store)
    shutil.copy(other / PRIVATE_KEY_FILE, store / PRIVATE_KEY_FILE)
    code, _, err = run_main(
        ["provision", "--env-file", sandbox.info["env_file"], "--store", str(store)], capsys
    )
    assert code == 1
    assert "cannot be reused" in err
    assert "--renew" in err
    (store / PROGRESS_FILE).unlink()
    code, _, err = run_main(
        ["provision", "--env-file", sandbox.info["env_file"], "--store", str(store)], capsys
    )
    assert code == 1
    assert "no record of its environment" in err


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_in_cli_output_at_debug(
    sandbox_factory: SandboxFactory, home: Path, tmp_path: Path
) -> None:
    sb = sandbox_factory("--auto-approve", "--poll-interval", "0", "--access-token-ttl", "1")
    env_file = sb.info["env_file"]
    outputs: list[str] = []
    tokens = TokenStore(home / "tokens")
    env = sandbox_env(sb)
    secrets: list[str] = []

    def run(*args: str) -> None:
        result = run_iotref("-vv", *args, "--env-file", env_file, cwd=tmp_path, iotref_home=home)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
        saved = tokens.load(env)
        if saved is not None:
            secrets.extend([saved.access_token, saved.refresh_token])

    run("login")
    spec = machine_spec("secret")
    run("provision", "--name", spec.name, "--manufacturer", spec.manufacturer,
        "--serial-number", spec.serial_number)  # fmt: skip
    run("provision", "--renew")
    run("status")
    text = "\n".join(outputs)
    assert "DEBUG iotref.http" in text
    assert len(set(secrets)) >= 4  # the refresh rotated the pair
    for secret in secrets:
        assert secret not in text
    key = (tmp_path / "certificate_store" / "local" / PRIVATE_KEY_FILE).read_text()
    for line in key.strip().splitlines()[1:-1]:
        assert line not in text
    assert "PRIVATE KEY" not in text


# -- test and live, offline -------------------------------------------------------------------


def test_test_and_live_environments_load_without_the_network(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def no_network(*args: object, **kwargs: object) -> httpx.Response:
        raise AssertionError("no request may be sent")

    monkeypatch.setattr(httpx.AsyncClient, "send", no_network)
    monkeypatch.chdir(tmp_path)
    expected = {
        "test": "https://directory.sandbox.zaikio.com",
        "live": "https://directory.heidelberg.cloud",
    }
    for name, host in expected.items():
        code, out, _ = run_main(["status", "--env", name], capsys)
        assert code == 1
        assert f"environment  {name} ({host})" in out
        assert f"certificate_store/{name}" in out
        assert f"'iotref login --env {name}'" in out
        code, out, _ = run_main(["logout", "--env", name], capsys)
        assert (code, out.strip()) == (0, f"Not logged in to {name} ({host}); nothing to delete.")
        code, _, err = run_main(
            ["provision", "--env", name, "--name", "a", "--manufacturer", "b",
             "--serial-number", "c"],
            capsys,
        )  # fmt: skip
        assert code == 1
        assert f"not logged in to {name} ({host})" in err
        assert f"iotref login --env {name}" in err
    monkeypatch.setenv("IOTREF_ENV", "live")
    code, out, _ = run_main(["status"], capsys)
    assert "environment  live (https://directory.heidelberg.cloud)" in out
