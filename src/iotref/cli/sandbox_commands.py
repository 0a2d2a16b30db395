"""``iotref sandbox up|status|revoke``: run and inspect the local platform."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import click

from iotref.cli import log_setup
from iotref.cli.output import result
from iotref.cli.sandbox_limit_options import limit_options, limits_from
from iotref.protocol.limits import (
    DEFAULT_SESSION_EXPIRY_SECONDS,
    MAX_KEEPALIVE_SECONDS,
    MAX_PAYLOAD_BYTES,
    MAX_SESSION_EXPIRY_SECONDS,
)
from iotref.sandbox.context import (
    DEFAULT_DATA_DIR,
    DEFAULT_HTTP_PORT,
    DEFAULT_MQTT_PORT,
    SandboxSettings,
)
from iotref.sandbox.runner import monitor_url, read_running, run_sandbox

_data_dir = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Where the sandbox keeps its CAs, database and logs.",
)


@click.group()
def sandbox() -> None:
    """Run the local copy of the platform on 127.0.0.1."""


@sandbox.command()
@_data_dir
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_HTTP_PORT,
    show_default=True,
    help="HTTP port (0: any free port).",
)
@click.option(
    "--mqtt-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_MQTT_PORT,
    show_default=True,
    help="MQTT/TLS port for devices (0: any free port).",
)
@click.option(
    "--auto-approve",
    is_flag=True,
    help="Approve device-flow requests as the demo person, for demos and tests.",
)
@click.option(
    "--access-token-ttl",
    type=click.IntRange(1),
    default=3600,
    show_default=True,
    help="Access token lifetime in seconds.",
)
@click.option(
    "--refresh-token-ttl",
    type=click.IntRange(1),
    default=7 * 24 * 3600,
    show_default=True,
    help="Refresh token lifetime in seconds.",
)
@click.option(
    "--device-code-ttl",
    type=click.IntRange(1),
    default=900,
    show_default=True,
    help="Device-flow code lifetime in seconds.",
)
@click.option(
    "--poll-interval",
    type=click.IntRange(0),
    default=5,
    show_default=True,
    help="Device-flow polling interval in seconds.",
)
@click.option(
    "--telemetry-max-messages",
    type=click.IntRange(0),
    default=1_000_000,
    show_default=True,
    help="Stored telemetry messages the monitor keeps (oldest pruned first); 0: no limit.",
)
@click.option(
    "--telemetry-max-age",
    type=click.IntRange(0),
    default=7 * 24 * 3600,
    show_default=True,
    help="Seconds a stored telemetry message is kept (by receive time); 0: no limit.",
)
@click.option(
    "--max-payload-bytes",
    type=click.IntRange(1024, 256 * 1024 * 1024),
    default=MAX_PAYLOAD_BYTES,
    show_default=True,
    help="Largest publish payload the broker accepts (AWS IoT Core: 128 KB); a packet over "
    "this plus 4 KiB of headers is answered with a disconnect.",
)
@click.option(
    "--max-keepalive",
    type=click.IntRange(10, 65535),
    default=MAX_KEEPALIVE_SECONDS,
    show_default=True,
    help="Keep-alive, seconds, the broker grants an MQTT 5 client asking for more or for 0 "
    "(AWS IoT Core: 1200).",
)
@click.option(
    "--session-expiry-hours",
    type=click.IntRange(1, MAX_SESSION_EXPIRY_SECONDS // 3600),
    default=DEFAULT_SESSION_EXPIRY_SECONDS // 3600,
    show_default=True,
    help="Longest time a persistent session outlives its connection (AWS IoT Core: 1 hour "
    "by default, up to 7 days).",
)
@limit_options
def up(
    data_dir: Path,
    http_port: int,
    mqtt_port: int,
    auto_approve: bool,
    access_token_ttl: int,
    refresh_token_ttl: int,
    device_code_ttl: int,
    poll_interval: int,
    telemetry_max_messages: int,
    telemetry_max_age: int,
    max_payload_bytes: int,
    max_keepalive: int,
    session_expiry_hours: int,
    **limits: int,
) -> int:
    """Start the sandbox and run until Ctrl-C or SIGTERM."""
    log_setup.as_server()
    settings = SandboxSettings(
        data_dir=data_dir,
        http_port=http_port,
        mqtt_port=mqtt_port,
        auto_approve=auto_approve,
        access_token_ttl=access_token_ttl,
        refresh_token_ttl=refresh_token_ttl,
        device_code_ttl=device_code_ttl,
        poll_interval=poll_interval,
        telemetry_max_messages=telemetry_max_messages,
        telemetry_max_age=telemetry_max_age,
        max_payload_bytes=max_payload_bytes,
        max_keepalive=max_keepalive,
        session_expiry_hours=session_expiry_hours,
        limits=limits_from(limits),
    )
    code = run_sandbox(settings)
    if code:
        raise SystemExit(code)
    return 0


@sandbox.command()
@_data_dir
@click.option("--json", "as_json", is_flag=True, help="Print sandbox.json.")
def status(data_dir: Path, as_json: bool) -> None:
    """Say whether a sandbox runs on DATA_DIR, and where."""
    running = read_running(data_dir)
    if running.pid is None:
        click.echo(f"no sandbox is running on {data_dir}")
        raise SystemExit(3)
    info = running.info or {}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    result(f"sandbox running on {data_dir} (pid {running.pid})")
    for key in ("http_url", "mqtt_host", "mqtt_port", "env_file", "ca_file"):
        if key in info:
            result(f"  {key}: {info[key]}")
    if "http_url" in info and "admin_token" in info:
        result(f"  monitor: {monitor_url(info)}")


@sandbox.command()
@click.argument("client_id")
@_data_dir
def revoke(client_id: str, data_dir: Path) -> None:
    """Revoke CLIENT_ID's certificate on the sandbox running on DATA_DIR.

    The device is disconnected now and refused from now on; every other connection stays.
    """
    import httpx

    running = read_running(data_dir)
    info = running.info or {}
    if running.pid is None or "http_url" not in info or "admin_token" not in info:
        click.echo(f"no sandbox is running on {data_dir}", err=True)
        raise SystemExit(3)
    url = f"{info['http_url']}/admin/things/{client_id}/revoke"
    try:
        response = httpx.post(
            url, headers={"Authorization": f"Bearer {info['admin_token']}"}, timeout=30
        )
    except httpx.HTTPError as exc:
        click.echo(f"cannot reach the sandbox at {info['http_url']}: {exc}", err=True)
        raise SystemExit(1) from None
    if response.status_code == 404:
        click.echo(f"the sandbox has no thing {client_id}", err=True)
        raise SystemExit(1)
    if response.status_code != 200:
        click.echo(f"revoking {client_id} failed: HTTP {response.status_code}", err=True)
        raise SystemExit(1)
    body = response.json()
    if body.get("alreadyRevoked"):
        click.echo(f"{client_id} was already revoked")
    else:
        click.echo(f"revoked {client_id} (certificate serial {body.get('serial')})")


@sandbox.command()
@_data_dir
@click.option(
    "--timeout",
    type=click.FloatRange(1, 300),
    default=30.0,
    show_default=True,
    help="Seconds to wait for it to stop.",
)
def stop(data_dir: Path, timeout: float) -> None:
    """Stop the sandbox running on DATA_DIR (as Ctrl-C would)."""
    running = read_running(data_dir)
    if running.pid is None:
        click.echo(f"no sandbox is running on {data_dir}")
        return
    try:
        os.kill(running.pid, signal.SIGTERM)
    except ProcessLookupError:
        click.echo(f"no sandbox is running on {data_dir}")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_running(data_dir).pid is None:
            click.echo(f"sandbox on {data_dir} stopped (pid {running.pid})")
            return
        time.sleep(0.1)
    raise click.ClickException(
        f"the sandbox (pid {running.pid}) did not stop within {timeout:g} s; "
        f"see {data_dir / 'logs' / 'sandbox.log'}"
    )
