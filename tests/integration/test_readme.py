"""The README's library snippets, run verbatim against the real sandbox, as a reader would
after `iotref login` and `iotref provision`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_process import cli_environ, run_iotref
from tests.support.monitor_api import device_record
from tests.support.sandbox_process import SandboxProcess
from tests.support.waiting import poll

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def snippets() -> dict[str, str]:
    """Code blocks marked ``<!-- readme-snippet: NAME -->`` in the README."""
    text = README.read_text()
    found = re.findall(r"<!-- readme-snippet: (\w+) -->\s*```python\n(.*?)```", text, re.S)
    return dict(found)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_the_readme_has_both_snippets() -> None:
    assert set(snippets()) == {"async", "blocking"}


def test_readme_snippets_run_verbatim(sandbox: SandboxProcess, tmp_path: Path) -> None:
    env = cli_environ(iotref_home=tmp_path / "home")
    env_file = sandbox.info["env_file"]
    login = run_iotref(
        "login", "--env-file", env_file, "--no-qr", cwd=tmp_path, env=env, timeout=120
    )
    assert login.returncode == 0, login.stderr
    provision = run_iotref(
        "provision", "--env-file", env_file, "--name", "README press",
        "--manufacturer", "iotref readme", "--serial-number", f"R-{time.time_ns()}",
        "--kind", "offset_press", cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert provision.returncode == 0, provision.stderr
    store = tmp_path / "certificate_store" / "local"
    client_id = json.loads((store / "properties.json").read_text())["client_id"]

    for name, code in snippets().items():
        result = _run([sys.executable, "-c", code], tmp_path, env)
        assert result.returncode == 0, (name, result.stderr)
        assert "queued=0" in result.stdout, (name, result.stdout)

    # The platform received all twenty, valid, and nothing is left in the outbox.
    def record() -> dict[str, Any]:
        try:
            return device_record(sandbox, client_id)
        except AssertionError:  # not known to the monitor yet
            return {}

    body = poll(record, lambda r: r.get("received") == 20, 15, interval=0.2)
    assert body.get("received") == 20, body
    assert body.get("valid") == 20, body
