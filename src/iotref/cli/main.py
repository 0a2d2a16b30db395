"""Entry point of the ``iotref`` command: a click group whose subcommands live in one
module per area. Any expected failure ends with one clear line and a non-zero exit.

A command's module is imported only when that command runs: ``iotref --help`` lists the
commands from :data:`COMMANDS` alone, so that it starts about as fast as click itself
(logging, too, is set up only when a command runs).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import NamedTuple

import click

from iotref._version import __version__
from iotref.cli.output import QUIET_KEY, VERBOSE_KEY


class CommandEntry(NamedTuple):
    """Where a top-level command lives, and its one-line help for ``iotref --help``
    (the same as the command's own; a unit test compares them); ``sandbox``: needs the
    ``iotref[sandbox]`` extra. (Not a dataclass: that module alone costs ``--help`` 15 ms.)"""

    module: str
    attr: str
    short_help: str
    sandbox: bool = False


COMMANDS: dict[str, CommandEntry] = {
    "demo": CommandEntry(
        "iotref.cli.demo_command",
        "demo",
        "Run the whole story: sandbox, login, provision, connect, shadow, telemetry.",
        sandbox=True,
    ),
    "fleet": CommandEntry(
        "iotref.cli.fleet_command",
        "fleet",
        "Simulate a fleet: provision, connect, sync shadows, send status telemetry, report.",
    ),
    "login": CommandEntry(
        "iotref.cli.onboarding_commands",
        "login",
        "Log this device in with the OAuth device flow (RFC 8628).",
    ),
    "logout": CommandEntry(
        "iotref.cli.onboarding_commands", "logout", "Delete this environment's saved tokens."
    ),
    "monitor": CommandEntry(
        "iotref.cli.monitor_command",
        "monitor",
        "Follow the sandbox's telemetry live: one line per message, ✓ valid / ✗ invalid.",
        sandbox=True,
    ),
    "provision": CommandEntry(
        "iotref.cli.onboarding_commands",
        "provision",
        "Register this machine and get its certificate into the certificate store.",
    ),
    "run": CommandEntry(
        "iotref.cli.run_command",
        "run",
        "Run this machine's sender: simulated presses (or stdin) until stopped.",
    ),
    "sandbox": CommandEntry(
        "iotref.cli.sandbox_commands",
        "sandbox",
        "Run the local copy of the platform on 127.0.0.1.",
        sandbox=True,
    ),
    "status": CommandEntry(
        "iotref.cli.onboarding_commands",
        "status",
        "Show this device's identity and check its certificate store and certificate.",
    ),
    "validate": CommandEntry(
        "iotref.cli.validate_command",
        "validate",
        "Check telemetry messages against the platform's schemas.",
    ),
}

#: Packages of the ``iotref[sandbox]`` extra (looked up, not imported, for the help).
_SANDBOX_PACKAGES = ("starlette", "uvicorn", "aiomqtt")


def _sandbox_installed() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in _SANDBOX_PACKAGES)
    except (ImportError, ValueError):
        return False


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        try:
            module = importlib.import_module(entry.module)
        except ImportError as exc:
            return _unavailable(cmd_name, getattr(exc, "name", None) or str(exc))
        command: click.Command = getattr(module, entry.attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from :data:`COMMANDS`, without importing any command."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        sandbox = _sandbox_installed()
        rows = []
        for name in names:
            entry = COMMANDS.get(name)
            if entry is None:
                command = super().get_command(ctx, name)
                if command is None or command.hidden:
                    continue
                text = command.get_short_help_str(limit)
            elif entry.sandbox and not sandbox:
                text = "(needs iotref[sandbox])"
            else:
                text = click.Command(name, help=entry.short_help).get_short_help_str(limit)
            rows.append((name, text))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str, missing: str) -> click.Command:
    """A stand-in for a command whose packages are not installed: listed in the help,
    and one clear line when run."""

    def fail() -> None:
        raise click.ClickException(
            f"'{name}' needs a package that is not installed ({missing}); install iotref[sandbox]"
        )

    return click.Command(
        name,
        callback=fail,
        help="(needs iotref[sandbox])",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iotref")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More log output on stderr (-v: warnings and info, -vv: debug).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print only errors and each command's result (no progress, no log lines).",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Append the full log (debug level, secrets masked) to this file.",
)
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, log_file: str | None) -> None:
    """iotref: connect print-shop machines to the Zaikio / connectprint IoT platform."""
    from pathlib import Path

    from iotref.cli import log_setup

    if quiet and verbose:
        raise click.UsageError("give -q/--quiet or -v/--verbose, not both")
    ctx.meta[QUIET_KEY] = quiet
    ctx.meta[VERBOSE_KEY] = verbose
    log_setup.configure(verbose=verbose, quiet=quiet, log_file=Path(log_file) if log_file else None)


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli.main(args=argv, prog_name="iotref", standalone_mode=False)
    except click.exceptions.Abort:
        sys.stderr.write("iotref: aborted\n")
        return 130
    except click.ClickException as exc:
        sys.stderr.write(f"iotref: {exc.format_message()}\n")
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            sys.stderr.write(f"Try '{exc.ctx.command_path} --help'.\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("iotref: interrupted\n")
        return 130
    finally:
        log_setup = sys.modules.get("iotref.cli.log_setup")
        if log_setup is not None:
            log_setup.close()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
