"""The device library works without the sandbox's dependencies: importing the public API
and running the device commands never touches ``iotref.sandbox`` or its packages. The fleet
simulator sits on the device library: device and protocol code never import it, and it
never imports the sandbox."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "iotref"
SANDBOX_ONLY = ("starlette", "uvicorn", "aiomqtt", "paho", "multipart", "iotref.sandbox")

BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == p or name.startswith(p + ".") for p in {SANDBOX_ONLY!r}):
            raise ImportError(f"device code imported sandbox-only module {{name}}")
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=60
    )


def test_public_api_imports_without_sandbox_packages() -> None:
    result = _run("import iotref; print(len(iotref.__all__))")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 20


@pytest.mark.parametrize(
    "command",
    [
        "--help",
        "login --help",
        "provision --help",
        "status --help",
        "run --help",
        "validate --help",
        "fleet --help",
    ],
)
def test_device_commands_run_without_sandbox_packages(command: str) -> None:
    code = f"import sys; from iotref.cli.main import main; sys.exit(main({command.split()!r}))"
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_sandbox_command_says_what_is_missing() -> None:
    code = "import sys; from iotref.cli.main import main; sys.exit(main(['sandbox', 'up']))"
    result = _run(code)
    assert result.returncode != 0
    assert "iotref[sandbox]" in result.stderr
    assert "Traceback" not in result.stderr


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """The files of ``package`` that import one of ``forbidden`` (or a submodule), with
    what they import."""
    offenders = {
        str(path.relative_to(SRC)): sorted(
            name
            for name in _imports(path)
            if any(name == p or name.startswith(p + ".") for p in forbidden)
        )
        for path in (SRC / package).rglob("*.py")
    }
    return {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("package", ["device", "protocol", "fleet"])
def test_device_protocol_and_fleet_code_never_import_the_sandbox(package: str) -> None:
    assert (SRC / package).is_dir()
    assert _offenders(package, SANDBOX_ONLY) == {}


@pytest.mark.parametrize("package", ["device", "protocol"])
def test_device_and_protocol_code_never_import_the_fleet_simulator(package: str) -> None:
    assert _offenders(package, ("iotref.fleet",)) == {}


def test_the_import_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """``_imports`` finds module-level and function-level imports of both forms."""
    module = tmp_path / "m.py"
    module.write_text(
        "import iotref.fleet.run\ndef f():\n    from iotref.sandbox.errors import SandboxError\n"
    )
    assert _imports(module) == {"iotref.fleet.run", "iotref.sandbox.errors"}
