"""Where the ``iotref`` command's log records go: stderr by verbosity, and ``--log-file``.

On stderr a failure is said once, by the command's own ``iotref: ...`` line, so by default
(and with ``--quiet``) only records of level ERROR reach it; ``-v`` adds warnings and info,
``-vv`` debug. A server (``iotref sandbox up``) shows its info lines by default. The
``--log-file`` gets everything from debug level on, appended. Every line on either is
passed through :func:`redact` first: tokens, codes, passwords and private keys never reach
a log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "[redacted]"

_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
# key=value, key: value, "key": "value" for the names of secrets (JSON, forms, URLs).
_SECRET_FIELD = re.compile(
    r"""(?ix)
    (["']?\b(?:access_token|refresh_token|device_code|user_code|id_token|client_secret|
        password|admin_token|token|csrf_token|authorization)\b["']?\s*[:=]\s*["']?)
    ([^"'&\s,;}\]]+)
    """
)


def redact(text: str) -> str:
    """``text`` with private keys, bearer tokens and secret fields masked."""
    text = _PRIVATE_KEY.sub(f"-----BEGIN PRIVATE KEY----- {MASK} -----END PRIVATE KEY-----", text)
    text = _BEARER.sub(rf"\1 {MASK}", text)
    return _SECRET_FIELD.sub(rf"\1{MASK}", text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose whole output (message, arguments, traceback) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _State:
    console: logging.Handler | None = None
    file: logging.Handler | None = None
    verbose: int = 0
    quiet: bool = False


_state = _State()


def console_level(verbose: int, quiet: bool, *, server: bool = False) -> int:
    """The lowest level shown on stderr."""
    if quiet:
        return logging.ERROR
    if verbose >= 2:
        return logging.DEBUG
    if verbose == 1 or server:
        return logging.INFO
    return logging.ERROR


def open_log_file(path: Path) -> logging.Handler:
    """A handler appending to ``path``, created 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8", buffering=1))
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(RedactingFormatter(FORMAT))
    return handler


def configure(*, verbose: int = 0, quiet: bool = False, log_file: Path | None = None) -> None:
    """Install the stderr handler (and the log file's) on the root logger."""
    close()
    root = logging.getLogger()
    console = _Stderr()
    console.setLevel(console_level(verbose, quiet))
    console.setFormatter(RedactingFormatter(FORMAT))
    root.addHandler(console)
    _state.console, _state.verbose, _state.quiet = console, verbose, quiet
    if log_file is not None:
        _state.file = open_log_file(log_file)
        root.addHandler(_state.file)
    _update_root_level()


def as_server() -> None:
    """Show info lines on stderr by default (a long-running server's own log)."""
    if _state.console is not None:
        _state.console.setLevel(console_level(_state.verbose, _state.quiet, server=True))
        _update_root_level()


def _update_root_level() -> None:
    levels = [h.level for h in (_state.console, _state.file) if h is not None]
    if levels:
        logging.getLogger().setLevel(min(levels))


def close() -> None:
    """Remove (and close) the handlers :func:`configure` installed."""
    root = logging.getLogger()
    for handler in (_state.console, _state.file):
        if handler is not None:
            root.removeHandler(handler)
            if handler is _state.file:
                handler.close()
    _state.console = _state.file = None
