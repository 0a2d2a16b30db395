"""Start-up stays light: ``import iotref``, ``iotref --help`` and ``iotref validate FILE``
import neither awscrt, httpx nor cryptography (checked in ``sys.modules`` of a fresh
process, no timing); the package's public names still resolve, list and type-check; the
command registry's help matches each command's own."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

import iotref
from iotref.cli.main import COMMANDS, cli

HEAVY = (
    "awscrt",
    "httpx",
    "cryptography",
    "rich",
    "segno",
    "iotref.device.client",
    "iotref.device.blocking",
)
INIT = Path(iotref.__file__)

REPORT_HEAVY = f"""
import json, sys

def _report(heavy={HEAVY!r}):
    loaded = [m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)]
    sys.stderr.write("HEAVY=" + json.dumps(sorted(loaded)) + "\\n")

import atexit
atexit.register(_report)
"""


def _heavy_modules_after(code: str, tmp_path: Path) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``code``."""
    script = tmp_path / "probe.py"
    script.write_text(REPORT_HEAVY + code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    marker = [line for line in result.stderr.splitlines() if line.startswith("HEAVY=")]
    assert marker, result.stderr
    return list(json.loads(marker[-1].removeprefix("HEAVY=")))


def test_import_iotref_loads_nothing_heavy(tmp_path: Path) -> None:
    assert _heavy_modules_after("import iotref\n", tmp_path) == []


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sandbox", "--help"]])
def test_iotref_help_loads_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    code = f"from iotref.cli.main import main\nmain({args!r})\n"
    assert _heavy_modules_after(code, tmp_path) == []


def test_validate_of_a_file_loads_nothing_heavy(tmp_path: Path) -> None:
    message = tmp_path / "m.json"
    message.write_text('{"headerversion": 3}')
    code = f"from iotref.cli.main import main\nmain(['validate', {str(message)!r}])\n"
    assert _heavy_modules_after(code, tmp_path) == []


def test_public_names_resolve_and_are_listed() -> None:
    for name in iotref.__all__:
        assert getattr(iotref, name) is not None, name
    assert set(iotref.__all__) <= set(dir(iotref))
    with pytest.raises(AttributeError):
        iotref.NoSuchName  # type: ignore[attr-defined]  # noqa: B018


def test_star_import_gives_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from iotref import *", namespace)
    assert set(iotref.__all__) <= set(namespace)


def test_type_checking_imports_match_the_lazy_table() -> None:
    """The ``if TYPE_CHECKING:`` imports (what type checkers see) name exactly the lazily
    loaded names, from the same modules, and ``__all__`` lists them all."""
    tree = ast.parse(INIT.read_text())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    )
    seen: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names:
            seen[alias.name] = node.module
    table = {name: module for module, names in iotref._LAZY.items() for name in names}
    assert seen == table
    assert set(iotref.__all__) == {*table, "__version__"}


def _all_commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []

    def walk(prefix: str, command: click.Command) -> None:
        found.append((prefix, command))
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(f"{prefix} {name}", sub)

    walk("iotref", cli)
    return found


def test_registry_help_is_each_commands_own() -> None:
    ctx = click.Context(cli)
    for name, entry in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None
        own = command.get_short_help_str(limit=200)
        assert entry.short_help == own, name


def test_every_environment_option_names_its_variable() -> None:
    """``fleet --env`` lacked the ``[env: IOTREF_ENV]`` note the other commands have."""
    checked = 0
    for path, command in _all_commands():
        for param in command.params:
            if "--env" in getattr(param, "opts", ()):
                assert "[env: IOTREF_ENV]" in (param.help or ""), path  # type: ignore[attr-defined]
                checked += 1
            if "--env-file" in getattr(param, "opts", ()):
                assert "[env: IOTREF_ENV_FILE]" in (param.help or ""), path  # type: ignore[attr-defined]
    assert checked >= 6
