"""The ``iotref`` command's logging: a failure is said once at default verbosity (no
WARNING line beside the ``iotref:`` line), -v/-vv show more, --quiet shows only errors,
--log-file gets everything (0600, appended) and never a secret."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from iotref.cli import log_setup
from iotref.cli.log_setup import MASK, redact

KEY = (
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"wrote {KEY} to disk", "MIGHAgEAMBMG"),
        ("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----", "AAAA"),
        ("headers {'Authorization': 'Bearer abc.def-ghi'}", "abc.def-ghi"),
        ('{"access_token": "tok123", "scope": "x"}', "tok123"),
        ("refresh_token=r3fr3sh&grant_type=refresh_token", "r3fr3sh"),
        ("device_code: dc-999", "dc-999"),
        ("http://127.0.0.1:1/monitor?token=adm1n", "adm1n"),
        ("password=hunter2", "hunter2"),
    ],
)
def test_redact_masks_secrets(text: str, secret: str) -> None:
    masked = redact(text)
    assert secret not in masked
    assert MASK in masked


def test_redact_keeps_ordinary_text() -> None:
    text = "token file /x/y.json was readable by others; tightening it to 0600"
    assert redact(text) == text


def _run_cli(args: list[str], code: str = "") -> subprocess.CompletedProcess[str]:
    """A command whose callback logs one record per level, then fails with one line."""
    script = f"""
import logging, sys, click
from iotref.cli.main import cli, main

@cli.command("noisy")
def noisy():
    log = logging.getLogger("iotref.test")
    log.debug("debug line")
    log.info("info line")
    log.warning("warning line")
    log.error("error line")
    raise click.ClickException("the one failure line")

sys.exit(main({args!r}))
"""
    return subprocess.run(
        [sys.executable, "-c", script + code], capture_output=True, text=True, timeout=60
    )


def test_default_shows_only_errors_and_the_failure_line() -> None:
    result = _run_cli(["noisy"])
    assert result.returncode == 1
    assert "warning line" not in result.stderr
    assert "info line" not in result.stderr
    assert "error line" in result.stderr
    assert result.stderr.strip().endswith("iotref: the one failure line")


def test_verbose_levels() -> None:
    one = _run_cli(["-v", "noisy"]).stderr
    assert "warning line" in one and "info line" in one and "debug line" not in one
    two = _run_cli(["-vv", "noisy"]).stderr
    assert "debug line" in two


def test_quiet_shows_errors_only_and_refuses_verbose_too() -> None:
    quiet = _run_cli(["--quiet", "noisy"]).stderr
    assert "warning line" not in quiet and "error line" in quiet
    both = _run_cli(["-q", "-v", "noisy"])
    assert both.returncode == 2
    assert "not both" in both.stderr


def test_log_file_gets_everything_private_and_appended(tmp_path: Path) -> None:
    log_file = tmp_path / "iotref.log"
    first = _run_cli(["--log-file", str(log_file), "noisy"])
    assert "warning line" not in first.stderr  # the console stays as by default
    text = log_file.read_text()
    for line in ("debug line", "info line", "warning line", "error line"):
        assert line in text
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    _run_cli(["--log-file", str(log_file), "noisy"])
    assert log_file.read_text().count("debug line") == 2


def test_configure_and_close_leave_no_handler_behind(tmp_path: Path) -> None:
    root = logging.getLogger()
    log_setup.close()  # what an earlier in-process command may have left
    before = list(root.handlers)
    log_setup.configure(verbose=0, log_file=tmp_path / "x.log")
    assert len(root.handlers) == len(before) + 2
    log_setup.as_server()
    log_setup.close()
    assert root.handlers == before
