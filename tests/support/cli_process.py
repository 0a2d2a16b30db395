"""The real ``iotref`` command in a subprocess (``python -m iotref.cli.main``), as a person
or a service manager runs it: in an environment without the caller's own iotref settings,
run to its end or started in the background, and the one line it prints on a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: where the commands run unless a test says."""
IOTREF = (sys.executable, "-m", "iotref.cli.main")


def cli_environ(
    *, iotref_home: Path | None = None, home: Path | None = None, **extra: str
) -> dict[str, str]:
    """This process's environment without iotref's settings (``IOTREF_*``,
    ``XDG_CONFIG_HOME``), unbuffered; tokens in ``iotref_home`` (``IOTREF_HOME``), or with
    ``home`` in ``home/.config/iotref`` as for a user whose ``HOME`` that is; then ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("IOTREF_") and key != "XDG_CONFIG_HOME"
    }
    env["PYTHONUNBUFFERED"] = "1"
    if iotref_home is not None:
        env["IOTREF_HOME"] = str(iotref_home)
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra)
    return env


def run_iotref(
    *args: str,
    cwd: Path = ROOT,
    iotref_home: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``iotref ARGS`` to its end, output captured, ``input`` (or nothing) on stdin; in
    ``env``, else in :func:`cli_environ` with ``iotref_home``."""
    return subprocess.run(
        [*IOTREF, *args],
        cwd=cwd,
        env=dict(env) if env is not None else cli_environ(iotref_home=iotref_home),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_iotref(
    *args: str,
    cwd: Path = ROOT,
    iotref_home: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: Any = subprocess.DEVNULL,
    **popen: Any,
) -> subprocess.Popen[str]:
    """Start ``iotref ARGS`` in the background, stdout and stderr piped unless ``popen``
    says otherwise, text; the environment as for :func:`run_iotref`."""
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    proc: subprocess.Popen[str] = subprocess.Popen(
        [*IOTREF, *args],
        cwd=cwd,
        env=dict(env) if env is not None else cli_environ(iotref_home=iotref_home),
        stdin=stdin,
        text=True,
        **options,
    )
    return proc


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's single stderr line (and no traceback)."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("iotref: ")
    return lines[0]


def revoke(data_dir: Path, client_id: str) -> subprocess.CompletedProcess[str]:
    """``iotref sandbox revoke CLIENT_ID --data-dir DATA_DIR``, as the operator runs it."""
    return run_iotref("sandbox", "revoke", client_id, "--data-dir", str(data_dir))
