"""``iotref fleet``: simulate a fleet of machines against the sandbox or a real platform, and
``iotref fleet merge``: one report from the reports of several shards.

The engine is :mod:`iotref.fleet.run`; this module parses options, shows live progress
(rich, on stderr, when it is a terminal) and prints the report (text, or JSON with
``--json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from iotref.cli.output import is_quiet
from iotref.device.errors import IotrefError
from iotref.device.onboarding.environment import BUILTIN_ENVIRONMENTS, resolve_environment
from iotref.device.onboarding.next_steps import Selection
from iotref.fleet.names import Shard
from iotref.fleet.options import DEFAULT_CONNECT_CONCURRENCY, DEFAULT_CONNECT_RATE, FleetOptions
from iotref.fleet.progress import FleetProgress
from iotref.fleet.reports import FleetReport, load_report, merge_reports
from iotref.fleet.run import FleetRun
from iotref.fleet.target import find_sandbox

PROGRESS_INTERVAL_S = 0.5
PLATFORM_POLL_S = 2.0


def _progress_table(p: FleetProgress) -> Table:
    table = Table(title=f"iotref fleet: {p.phase}", show_header=True, expand=False)
    for name in (
        "devices",
        "connected",
        "synced",
        "failed",
        "sent",
        "msgs/s",
        "acked",
        "outbox",
        "platform",
        "errors",
        "RSS MB",
        "elapsed",
    ):
        table.add_column(name, justify="right")
    table.add_row(
        f"{p.provisioned}/{p.devices}",
        str(p.connected),
        str(p.synced),
        str(p.failed),
        str(p.generated),
        f"{p.msgs_per_s:,.0f}",
        str(p.acked),
        str(p.outbox_depth),
        "-" if p.platform_received is None else str(p.platform_received),
        str(p.errors),
        f"{p.rss_mb:,.0f}",
        f"{p.elapsed_s:,.0f} s",
    )
    return table


async def _run_with_progress(run: FleetRun, show: bool) -> FleetReport:
    task = asyncio.ensure_future(run.run())
    if not show:
        return await task
    console = Console(stderr=True)
    polled = 0.0
    loop = asyncio.get_running_loop()
    with Live(_progress_table(run.progress()), console=console, transient=False) as live:
        while not task.done():
            await asyncio.wait({task}, timeout=PROGRESS_INTERVAL_S)
            if loop.time() - polled >= PLATFORM_POLL_S and run.phase in (
                "syncing and sending",
                "sending",
                "draining",
            ):
                polled = loop.time()
                with contextlib.suppress(Exception):
                    await run.poll_platform()
            live.update(_progress_table(run.progress()))
    return await task


@click.group(invoke_without_command=True)
@click.option("--devices", type=click.IntRange(min=1), help="Devices in the whole fleet.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="Status messages per device per second.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds each device sends for (it sends round(rate*duration) messages).",
)
@click.option("--shard", default="0/1", show_default=True, help="Run slice I of N: I/N.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--report",
    "report_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON report to this file.",
)
@click.option(
    "--store-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certificate_store") / "fleet",
    show_default=True,
    help="Where the per-device certificate stores live (reused by later runs).",
)
@click.option(
    "--env",
    "env_name",
    type=click.Choice(BUILTIN_ENVIRONMENTS),
    default=None,
    help="Built-in environment (default: local). [env: IOTREF_ENV]",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="An environment file; a sandbox.json next to it marks a sandbox. [env: IOTREF_ENV_FILE]",
)
@click.option(
    "--sandbox-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The sandbox's data dir (its sandbox.json gives the admin token and operator identity).",
)
@click.option(
    "--connect-concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONNECT_CONCURRENCY,
    show_default=True,
    help="TLS handshakes in flight at once while connecting.",
)
@click.option(
    "--connect-rate",
    type=click.FloatRange(min=0),
    default=DEFAULT_CONNECT_RATE,
    show_default=True,
    help="Connection attempts a second of all devices together, first connects and "
    "reconnects (the account's connect quota: AWS IoT Core allows 500 by default); "
    "0: not limited. Shards run at the same time add up.",
)
@click.option(
    "--watchers",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Independent subscriber processes (sandbox only; 0: none).",
)
@click.option("--site", default=None, help="Site id for new devices (default: the first).")
@click.option(
    "--no-bulk",
    is_flag=True,
    help="Provision through the normal flow even against a sandbox.",
)
@click.option("--seed", type=int, default=None, help="Seed of the send phases.")
@click.option("--no-progress", is_flag=True, help="No live progress display.")
@click.pass_context
def fleet(
    ctx: click.Context,
    devices: int | None,
    rate: float,
    duration: float,
    shard: str,
    as_json: bool,
    report_file: Path | None,
    store_root: Path,
    env_name: str | None,
    env_file: Path | None,
    sandbox_dir: Path | None,
    connect_concurrency: int,
    connect_rate: float,
    watchers: int,
    site: str | None,
    no_bulk: bool,
    seed: int | None,
    no_progress: bool,
) -> None:
    """Simulate a fleet: provision, connect, sync shadows, send status telemetry, report.

    Each device has its own key and certificate, kept in a store under --store-root and
    reused by later runs. Against the sandbox new devices are provisioned in bulk;
    against a real platform (log in first with 'iotref login' and the same --env or
    --env-file) one by one.
    """
    if ctx.invoked_subcommand is not None:
        return
    if devices is None:
        raise click.UsageError("--devices is required")
    try:
        parsed_shard = Shard.parse(shard)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from None
    try:
        env = resolve_environment(env_name, env_file)
        sandbox = find_sandbox(env, env_file, sandbox_dir)
        options = FleetOptions(
            devices=devices,
            rate=rate,
            duration_s=duration,
            shard=parsed_shard,
            store_root=store_root,
            connect_concurrency=connect_concurrency,
            connect_rate=connect_rate,
            watchers=watchers if sandbox is not None else 0,
            site=site,
            bulk=not no_bulk,
            seed=seed,
            tune_malloc=True,
        )
        # The environment's quotas (PUBLISH_RATE_LIMIT, THROUGHPUT_LIMIT), if it sets them.
        options = dataclasses.replace(options, **env.client_limits())
        run = FleetRun(env, options, sandbox=sandbox)
        show = not no_progress and not is_quiet() and sys.stderr.isatty()
        report = asyncio.run(_run_with_progress(run, show))
    except IotrefError as exc:
        selection = Selection.from_options(env_name, env_file, None)
        raise click.ClickException(exc.one_line(selection)) from None
    document = report.to_json()
    if report_file is not None:
        report_file.write_text(json.dumps(document, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(report.text())
    lost = report.lost
    if report.data["connect"]["failed"] or (lost is not None and lost > 0):
        ctx.exit(1)


@fleet.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the merged report as JSON.")
def merge(reports: tuple[Path, ...], as_json: bool) -> None:
    """Merge the JSON reports of the shards of one fleet run."""
    try:
        merged = merge_reports([load_report(path) for path in reports])
    except IotrefError as exc:
        raise click.ClickException(exc.one_line()) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(merged.to_json(), indent=2))
    else:
        click.echo(merged.text())
