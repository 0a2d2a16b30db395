"""Entry point of the ``iotref`` command: a click group whose subcommands live in one
module per area. Any expected failure ends with one clear line and a non-zero exit."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from iotref._version import __version__

# (module, attribute) of each top-level command; imported lazily so that the device
# commands work without the sandbox extra installed.
_COMMANDS: dict[str, tuple[str, str]] = {
    "sandbox": ("iotref.cli.sandbox_commands", "sandbox"),
    "login": ("iotref.cli.onboarding_commands", "login"),
    "logout": ("iotref.cli.onboarding_commands", "logout"),
    "provision": ("iotref.cli.onboarding_commands", "provision"),
    "status": ("iotref.cli.onboarding_commands", "status"),
    "validate": ("iotref.cli.validate_command", "validate"),
    "demo": ("iotref.cli.demo_command", "demo"),
    "run": ("iotref.cli.run_command", "run"),
    "monitor": ("iotref.cli.monitor_command", "monitor"),
    "fleet": ("iotref.cli.fleet_command", "fleet"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _COMMANDS:
            module_name, attr = _COMMANDS[cmd_name]
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                return _unavailable(cmd_name, getattr(exc, "name", None) or str(exc))
            command: click.Command = getattr(module, attr)
            return command
        return super().get_command(ctx, cmd_name)


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
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """iotref: connect print-shop machines to the Zaikio / connectprint IoT platform."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
