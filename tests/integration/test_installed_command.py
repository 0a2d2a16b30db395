"""The installed ``iotref`` console script, run as a shell runs it: ``validate`` reading a
file and stdin, the shell completion scripts and completions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iotref.device.telemetry.messages import Asset, AssetType
from tests.support.counted_messages import status_message

pytestmark = pytest.mark.integration

IOTREF_BIN = Path(sys.executable).with_name("iotref")


@pytest.fixture(autouse=True)
def installed() -> None:
    if not IOTREF_BIN.exists():
        pytest.skip("iotref script not installed in this environment")


def test_installed_command(tmp_path: Path) -> None:
    good = status_message(Asset("a1", "SN1", AssetType.CUTTER), 1)
    bogus = json.loads(json.dumps(good))
    bogus["payload"]["signalstatus"]["deviceinfo"]["status"] = "Bogus"
    one = tmp_path / "one.json"
    one.write_text(json.dumps(good, indent=2), encoding="utf-8")
    proc = subprocess.run(
        [str(IOTREF_BIN), "validate", "-", str(one)],
        input=json.dumps(bogus).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout.decode().splitlines()[-1] == "1 valid, 1 invalid"
    assert proc.stderr == b""


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F _iotref_completion iotref"), ("zsh", "#compdef iotref"),
     ("fish", "complete --no-files --command iotref")],
)  # fmt: skip
def test_shell_completion_script_is_produced(shell: str, marker: str) -> None:
    """What docs/configuration.md tells to put in the shell's startup file."""
    result = subprocess.run(
        [str(IOTREF_BIN)],
        env={"_IOTREF_COMPLETE": f"{shell}_source", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout


def test_shell_completion_completes_commands_and_options() -> None:

    def complete(words: str) -> list[str]:
        result = subprocess.run(
            [str(IOTREF_BIN)],
            env={
                "_IOTREF_COMPLETE": "bash_complete",
                "COMP_WORDS": words,
                "COMP_CWORD": str(len(words.split()) - 1),
                "PATH": "/usr/bin:/bin",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return [line.split(",", 1)[1] for line in result.stdout.splitlines()]

    assert complete("iotref pro") == ["provision"]
    assert "--env-file" in complete("iotref status --e")
