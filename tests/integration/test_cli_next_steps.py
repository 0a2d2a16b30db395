"""Every next step the CLI prints runs as printed, with the person's own environment and
store options: each hint is provoked against a real sandbox with a non-default
``--env-file`` and ``--store`` (both with a space in their path), the printed command is
parsed and run, and what it did is checked where it must have happened: the token file of
that environment, that store folder, and nothing in the default store.

The hints used to drop the options: "run 'iotref login' again", "run 'iotref provision'",
"run 'iotref provision --renew'" (which renews the default store)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PROGRESS_FILE,
    PROPERTIES_FILE,
)
from iotref.device.onboarding.environment import load_environment_file
from iotref.device.onboarding.token_store import TokenStore
from tests.conftest import SandboxFactory
from tests.support.cli_process import one_line_error, revoke, run_iotref, start_iotref
from tests.support.onboarding import decide_in_browser
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration

HINT = re.compile(r"""'(iotref (?:[^'"]|"(?:\\.|[^"\\])*")*)'""")
MACHINE = {"NAME": "Hint press", "MANUFACTURER": "iotref tests", "SERIAL": "SN-HINT-1"}


class Setup:
    """A sandbox that does not approve by itself, its env file copied under another name
    into a folder with a space, a store folder with a space, and a home for tokens."""

    def __init__(self, sandbox: SandboxProcess, tmp_path: Path) -> None:
        self.sandbox = sandbox
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.home = tmp_path / "home"
        folder = tmp_path / "my envs"
        folder.mkdir()
        self.env_file = folder / "staging.env"
        shutil.copy(sandbox.info["env_file"], self.env_file)
        self.env = load_environment_file(self.env_file)
        self.store = tmp_path / "stores" / "press one"
        self.options = ["--env-file", str(self.env_file), "--store", str(self.store)]

    def run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return run_iotref(*args, cwd=self.work, iotref_home=self.home, timeout=timeout)

    def start(self, args: list[str]) -> subprocess.Popen[str]:
        return start_iotref(*args, cwd=self.work, iotref_home=self.home)

    def tokens(self) -> str | None:
        saved = TokenStore(self.home / "tokens").load(self.env)
        return None if saved is None else saved.refresh_token

    def nothing_in_default_places(self) -> None:
        assert not (self.work / "certificate_store").exists()


def hint_of(text: str, subcommand: str) -> list[str]:
    """The one printed ``iotref SUBCOMMAND ...`` command, as argv after ``iotref``."""
    found = [shlex.split(c) for c in HINT.findall(text) if c.startswith(f"iotref {subcommand}")]
    assert len(found) == 1, text
    return [MACHINE.get(word, word) for word in found[0][1:]]


def login_as_printed(setup: Setup, argv: list[str], approve: bool = True) -> str:
    """Run a printed ``iotref login ...``; approve (or deny) it on the sign-in page."""
    proc = setup.start([*argv, "--no-qr"])
    try:
        assert proc.stdout is not None
        code = next(line.split()[-1] for line in proc.stdout if line.strip().startswith("code"))
        decide_in_browser(setup.sandbox, code, approve=approve)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if approve:
        assert proc.returncode == 0, stderr
        return stdout
    return one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr))


def certificate_serial(store: Path) -> int:
    return x509.load_pem_x509_certificate((store / CERTIFICATE_FILE).read_bytes()).serial_number


@pytest.fixture
def setup(sandbox_factory: SandboxFactory, tmp_path: Path) -> Setup:
    return Setup(sandbox_factory("--poll-interval", "1"), tmp_path)


def test_every_hint_runs_as_printed_on_the_same_environment_and_store(setup: Setup) -> None:
    # 1. No store yet: status says to provision, with this env file and this store.
    status = setup.run("status", *setup.options)
    assert status.returncode == 1
    provision = hint_of(status.stdout, "provision")
    assert provision[:5] == ["provision", "--env-file", str(setup.env_file), "--store",
                             str(setup.store)]  # fmt: skip

    # 2. Run it: not logged in to this environment yet; the hint logs in to it.
    not_logged_in = one_line_error(setup.run(*provision))
    login = hint_of(not_logged_in, "login")
    assert login == ["login", "--env-file", str(setup.env_file)]
    assert setup.tokens() is None
    login_as_printed(setup, login)
    assert setup.tokens() is not None  # the tokens of this environment

    # 3. The provision hint again: now it provisions into this store.
    provisioned = setup.run(*provision)
    assert provisioned.returncode == 0, provisioned.stderr
    progress = json.loads((setup.store / PROGRESS_FILE).read_text())
    assert progress["environment"]["directory_host"] == setup.env.directory_host
    first_client = json.loads((setup.store / PROPERTIES_FILE).read_text())["client_id"]
    setup.nothing_in_default_places()

    # 4. A broken store: status says to renew this store.
    (setup.store / PROPERTIES_FILE).write_text("{not json")
    broken = setup.run("status", *setup.options)
    assert broken.returncode == 1
    renew = hint_of(broken.stdout, "provision")
    assert renew == ["provision", *setup.options, "--renew"]
    serial = certificate_serial(setup.store)
    renewed = setup.run(*renew)
    assert renewed.returncode == 0, renewed.stderr
    assert certificate_serial(setup.store) != serial
    client = json.loads((setup.store / PROPERTIES_FILE).read_text())["client_id"]
    assert client != first_client
    setup.nothing_in_default_places()

    # 5. A revoked certificate: run says so, and how to renew this store.
    revoked = revoke(setup.sandbox.data_dir, client)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    refused = one_line_error(setup.run("run", *setup.options, "--duration", "30"))
    assert "revoked" in refused
    renew_revoked = hint_of(refused, "provision")
    assert renew_revoked == ["provision", *setup.options, "--renew"]
    status = setup.run("status", *setup.options)
    assert status.returncode == 1
    assert "[certificate_revoked]" in status.stdout
    assert hint_of(status.stdout, "provision") == renew_revoked
    renewed = setup.run(*renew_revoked)
    assert renewed.returncode == 0, renewed.stderr
    assert f"iotref sandbox revoke {client}" in renewed.stdout  # the one it replaced
    ok = setup.run("status", *setup.options)
    assert ok.returncode == 0, ok.stdout
    assert "platform     ok" in ok.stdout
    setup.nothing_in_default_places()

    # 6. A denied login: the hint logs in again to this environment.
    before = setup.tokens()
    denied = login_as_printed(setup, ["login", "--env-file", str(setup.env_file)], approve=False)
    assert "denied" in denied
    again = hint_of(denied, "login")
    assert again == ["login", "--env-file", str(setup.env_file)]
    login_as_printed(setup, again)
    assert setup.tokens() not in (None, before)


def test_expired_login_hint_runs_as_printed(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    setup = Setup(sandbox_factory("--poll-interval", "1", "--device-code-ttl", "10"), tmp_path)
    expired = one_line_error(
        setup.run("login", "--no-qr", "--env-file", str(setup.env_file), timeout=60)
    )
    assert "expired" in expired
    again = hint_of(expired, "login")
    assert again == ["login", "--env-file", str(setup.env_file)]
    login_as_printed(setup, again)  # approved within the new code's lifetime
    assert setup.tokens() is not None
