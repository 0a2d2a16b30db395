"""What a command prints, by kind: progress (left out with ``iotref --quiet``) and results
(always printed). Errors go through ``click.ClickException`` and are always printed."""

from __future__ import annotations

from typing import Any

import click

#: ``ctx.meta`` keys of the global ``--quiet`` flag and ``-v`` count (set by
#: :func:`iotref.cli.main.cli`).
QUIET_KEY = "iotref.quiet"
VERBOSE_KEY = "iotref.verbose"


def is_quiet() -> bool:
    """True if ``iotref --quiet`` was given."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(QUIET_KEY))


def verbosity() -> int:
    """How many ``-v`` were given."""
    ctx = click.get_current_context(silent=True)
    return int(ctx.meta.get(VERBOSE_KEY, 0)) if ctx is not None else 0


def progress(message: Any = "", **kwargs: Any) -> None:
    """A line about what is going on: printed unless ``--quiet``."""
    if not is_quiet():
        click.echo(message, **kwargs)


def result(message: Any = "", **kwargs: Any) -> None:
    """A line of the command's result: always printed."""
    click.echo(message, **kwargs)
