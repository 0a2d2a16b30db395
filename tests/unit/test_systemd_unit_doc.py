"""The systemd unit in docs/operations.md: systemd's own ``systemd-analyze verify`` finds
nothing to say about it, it has what a gateway service needs (notify, watchdog, restart,
its own user, hardening, the store writable), and its ``ExecStart`` is a valid
``iotref run`` command line whose store lies in the writable paths."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iotref.cli.run_command import run

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- systemd-unit: checked by tests/unit/test_systemd_unit_doc.py -->"


def documented_unit() -> str:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    found = re.search(re.escape(MARKER) + r"\n```ini\n(.*?)```", text, re.DOTALL)
    assert found, "the unit block after the marker is missing from docs/operations.md"
    return found.group(1)


def settings(unit: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in unit.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_the_unit_has_what_a_gateway_service_needs() -> None:
    service = settings(documented_unit())["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "User": "iotref",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    assert int(service["WatchdogSec"][0]) > 0
    # A stop may take --close-timeout (10 s by default) plus about 2 s.
    assert int(service["TimeoutStopSec"][0]) >= 15


def test_exec_start_is_a_valid_run_whose_store_is_writable() -> None:
    service = settings(documented_unit())["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert Path(argv[0]).name == "iotref" and argv[1] == "run"
    context = run.make_context("run", argv[2:])  # click's own parser: unknown options fail
    store = Path(context.params["store"])
    writable = [Path(p) for value in service["ReadWritePaths"] for p in value.split()]
    assert any(store.is_relative_to(path) for path in writable), (store, writable)
    state_dirs = [Path("/var/lib") / d for d in service["StateDirectory"][0].split()]
    assert any(store.is_relative_to(path) for path in state_dirs)


def test_the_unit_parses_as_ini() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(documented_unit())
    assert parser.sections() == ["Unit", "Service", "Install"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    unit = documented_unit()
    # verify checks that the program exists: point ExecStart at this checkout's iotref.
    program = Path(sys.executable).with_name("iotref")
    assert program.exists(), program
    unit = unit.replace("/opt/iotref/bin/iotref", str(program))
    path = tmp_path / "iotref.service"
    path.write_text(unit, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    # Unknown keys, bad values and misplaced settings are warnings on stderr.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        result.stdout + result.stderr
    )
