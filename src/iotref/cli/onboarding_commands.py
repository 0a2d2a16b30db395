"""``iotref login | logout | provision | status``: a device's onboarding from the shell.

Every expected failure ends with one line on stderr and a non-zero exit (1; ``status``
exits 1 when it finds a problem). Tokens and keys are never printed.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
import segno

from iotref.cli.local_sandbox import resolve_cli_environment
from iotref.device.device_flow import DeviceAuthorization, PollEvent
from iotref.device.directory_client import MACHINE_KINDS, MachineSpec
from iotref.device.environment import BUILTIN_ENVIRONMENTS, Environment
from iotref.device.errors import ConfigurationError, IotrefError
from iotref.device.keys import DEFAULT_KEY_TYPE, KeyType
from iotref.device.onboarding import Onboarding, ProvisionOptions, ProvisionResult
from iotref.device.store_checks import DEFAULT_EXPIRY_THRESHOLD_DAYS, StoreReport

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

P = ParamSpec("P")
R = TypeVar("R")

_CONFIG_KEYS = {"name", "manufacturer", "serial_number", "kind", "site", "key_type"}


def _expected_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the library's expected errors into one clear line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except IotrefError as exc:
            raise click.ClickException(exc.one_line()) from None

    return wrapper


def _environment_options(func: Callable[P, R]) -> Callable[P, R]:
    func = click.option(
        "--env-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="An environment file (contract keys) instead of --env. [env: IOTREF_ENV_FILE]",
    )(func)
    return click.option(
        "--env",
        "env_name",
        type=click.Choice(BUILTIN_ENVIRONMENTS),
        default=None,
        help="Built-in environment (default: local). [env: IOTREF_ENV]",
    )(func)


def _store_option(func: Callable[P, R]) -> Callable[P, R]:
    return click.option(
        "--store",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Certificate store folder (default: certificate_store/<env>).",
    )(func)


def _env(env_name: str | None, env_file: Path | None) -> Environment:
    return resolve_cli_environment(env_name, env_file)


def _format_left(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _qr_text(uri: str) -> str | None:
    """The URI as a QR code in block characters, or None if stdout cannot show them."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "█▀▄".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return None
    buffer = io.StringIO()
    segno.make(uri, error="m").terminal(out=buffer, compact=True, border=2)
    return buffer.getvalue()


@click.command()
@_environment_options
@click.option("--no-qr", is_flag=True, help="Do not print the QR code.")
@_expected_errors
def login(env_name: str | None, env_file: Path | None, no_qr: bool) -> None:
    """Log this device in with the OAuth device flow (RFC 8628)."""
    env = _env(env_name, env_file)
    interactive = sys.stdout.isatty()

    def show(authorization: DeviceAuthorization) -> None:
        left = authorization.seconds_left(time.time())
        click.echo(f"Log this device in to {env}:")
        click.echo(f"  open   {authorization.verification_uri_complete}")
        click.echo(f"  code   {authorization.user_code}")
        click.echo(f"  (or open {authorization.verification_uri} and type the code)")
        qr = None if no_qr else _qr_text(authorization.verification_uri_complete)
        if qr:
            click.echo(qr, nl=False)
        click.echo(
            f"The code expires in {_format_left(left)} min. Waiting for approval "
            f"(checking every {authorization.interval:g} s)..."
        )

    def pending(event: PollEvent) -> None:
        if event.outcome == "slow_down":
            if interactive:
                click.echo()
            click.echo(f"The directory asked to poll slower: every {event.interval:g} s now.")
        elif interactive:
            click.echo(f"\r  {_format_left(event.seconds_left)} left ", nl=False)

    async def run() -> None:
        async with Onboarding(env) as onboarding:
            result = await onboarding.login(show, pending)
        if interactive:
            click.echo()
        who = f"{result.bearer.type} {result.bearer.id}" if result.bearer else "unknown bearer"
        click.echo(f"Logged in to {env} as {who}.")
        click.echo(f"Tokens saved in {result.token_path} (never shown).")

    asyncio.run(run())


@click.command()
@_environment_options
@_expected_errors
def logout(env_name: str | None, env_file: Path | None) -> None:
    """Delete this environment's saved tokens."""
    env = _env(env_name, env_file)
    onboarding = Onboarding(env)
    try:
        removed = onboarding.logout()
    finally:
        asyncio.run(onboarding.aclose())
    if removed:
        click.echo(f"Logged out of {env}: tokens deleted.")
    else:
        click.echo(f"Not logged in to {env}; nothing to delete.")


def _load_config(path: Path) -> dict[str, str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    data: Any
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ConfigurationError(f"{path} is not valid {kind}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("machine"), dict) and len(data) == 1:
        data = data["machine"]
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold an object/table of machine settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise ConfigurationError(
            f"{path}: unknown setting(s) {', '.join(unknown)}",
            f"allowed: {', '.join(sorted(_CONFIG_KEYS))}",
        )
    settings: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigurationError(f"{path}: {key} must be a string")
        settings[key] = value
    return settings


def _machine_spec(values: dict[str, str | None]) -> MachineSpec | None:
    required = ("name", "manufacturer", "serial_number")
    given = {k: (values.get(k) or "").strip() for k in required}
    if not any(given.values()):
        return None
    missing = [k.replace("_", "-") for k, v in given.items() if not v]
    if missing:
        raise ConfigurationError(
            f"the machine's {', '.join(missing)} is missing",
            "pass --name, --manufacturer and --serial-number together (or --config FILE)",
        )
    kind = (values.get("kind") or "").strip() or None
    if kind is not None and kind not in MACHINE_KINDS:
        raise ConfigurationError(f"machine kind {kind!r} is not one of {', '.join(MACHINE_KINDS)}")
    return MachineSpec(given["name"], given["manufacturer"], given["serial_number"], kind)


@click.command()
@_environment_options
@_store_option
@click.option("--name", help="Machine name, e.g. 'Speedmaster 2020'.")
@click.option("--manufacturer", help="Machine manufacturer.")
@click.option("--serial-number", help="Serial number (unique per manufacturer).")
@click.option("--kind", type=click.Choice(MACHINE_KINDS), help="Machine kind.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON or TOML file with name, manufacturer, serial_number, kind, site, key_type; "
    "options override it.",
)
@click.option("--site", help="Site id or name (default: the organization's first site).")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    default=None,
    help=f"Key made on this device (default {DEFAULT_KEY_TYPE.value}).",
)
@click.option("--renew", is_flag=True, help="New key and certificate for the same machine.")
@click.option("--machine-id", help="Continue with this existing machine instead of creating one.")
@_expected_errors
def provision(
    env_name: str | None,
    env_file: Path | None,
    store: Path | None,
    name: str | None,
    manufacturer: str | None,
    serial_number: str | None,
    kind: str | None,
    config_file: Path | None,
    site: str | None,
    key_type: str | None,
    renew: bool,
    machine_id: str | None,
) -> None:
    """Register this machine and get its certificate into the certificate store."""
    env = _env(env_name, env_file)
    values: dict[str, str | None] = dict(_load_config(config_file)) if config_file else {}
    for key, value in (
        ("name", name),
        ("manufacturer", manufacturer),
        ("serial_number", serial_number),
        ("kind", kind),
        ("site", site),
        ("key_type", key_type),
    ):
        if value is not None:
            values[key] = value
    chosen_key = values.get("key_type") or DEFAULT_KEY_TYPE.value
    if chosen_key not in {k.value for k in KeyType}:
        raise ConfigurationError(
            f"key type {chosen_key!r} is not one of {', '.join(k.value for k in KeyType)}"
        )
    options = ProvisionOptions(
        machine=_machine_spec(values),
        site=values.get("site") or None,
        key_type=KeyType(chosen_key),
        renew=renew,
        machine_id=machine_id,
    )

    def step(_: str, message: str) -> None:
        click.echo(f"  {message}")

    async def run() -> ProvisionResult:
        async with Onboarding(env, store_path=store, on_step=step) as onboarding:
            return await onboarding.provision(options)

    result = asyncio.run(run())
    props = result.properties
    headline = {
        "reused": "The certificate store is complete; nothing to do.",
        "provisioned": "Provisioned.",
        "resumed": "Provisioned (continued the interrupted run).",
        "renewed": "Renewed the key and certificate.",
    }[result.outcome]
    click.echo(headline)
    click.echo(f"  store      {result.store_path}")
    click.echo(f"  client id  {props.client_id}")
    click.echo(f"  machine    {props.machine_id}   site {props.site_id}   org {props.org_id}")
    click.echo(f"  endpoint   {props.mqtt_endpoint}:{props.mqtt_port}")
    for warning in result.warnings:
        click.echo(f"  warning: {warning} (renew with 'iotref provision --renew')")


def _print_report(env: Environment, report: StoreReport, login_line: str) -> None:
    click.echo(f"environment  {env}")
    click.echo(f"store        {report.path}")
    if report.environment is not None and not report.environment.matches(env.identity):
        click.echo(f"  belongs to {report.environment.difference(env.identity)}")
    props = report.properties
    if props is not None:
        click.echo(f"client id    {props.client_id}")
        click.echo(f"organization {props.org_id}")
        click.echo(f"machine      {props.machine_id}")
        click.echo(f"site         {props.site_id}")
        region = f" (region {props.machine_region})" if props.machine_region else ""
        click.echo(f"endpoint     {props.mqtt_endpoint}:{props.mqtt_port}{region}")
        click.echo(f"telemetry    {props.telemetry_topic}/{props.org_id}/{props.client_id}")
    elif report.progress is not None and report.progress.machine_id:
        click.echo(f"machine      {report.progress.machine_id} (provisioning not finished)")
    cert = report.certificate
    if cert is not None:
        days = cert.days_left(datetime.now(timezone.utc))
        click.echo(f"certificate  {cert.subject}")
        click.echo(f"  issuer     {cert.issuer}")
        click.echo(f"  expires    {cert.not_after:%Y-%m-%d %H:%M} UTC ({days:.0f} days)")
        click.echo(f"  key        {report.key or cert.key}")
    if report.chain:
        click.echo(f"  chain      {report.chain}")
    click.echo(f"login        {login_line}")
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s):")
        for problem in report.problems:
            click.echo(f"  - [{problem.code}] {problem.reason}")
            click.echo(f"    next: {problem.next_step}")
    else:
        click.echo("status       ok")


@click.command()
@_environment_options
@_store_option
@click.option(
    "--expiry-threshold-days",
    type=click.FloatRange(min=0),
    default=DEFAULT_EXPIRY_THRESHOLD_DAYS,
    show_default=True,
    help="Report a certificate that expires within this many days.",
)
@click.pass_context
@_expected_errors
def status(
    ctx: click.Context,
    env_name: str | None,
    env_file: Path | None,
    store: Path | None,
    expiry_threshold_days: float,
) -> None:
    """Show this device's identity and check its certificate store (no network)."""
    env = _env(env_name, env_file)
    onboarding = Onboarding(env, store_path=store)
    try:
        report = onboarding.check(expiry_threshold_days)
        login_state = onboarding.login_status()
    finally:
        asyncio.run(onboarding.aclose())
    if login_state.problem:
        login_line = f"unusable: {login_state.problem}"
    elif not login_state.logged_in:
        login_line = f"not logged in ('iotref login {env.cli_selector}' when needed)"
    else:
        bearer = login_state.bearer
        who = f"{bearer.type} {bearer.id}" if bearer else "unknown bearer"
        expires = login_state.access_token_expires_at or 0.0
        left = expires - time.time()
        validity = (
            f"access token valid for {_format_left(left)} min"
            if left > 0
            else "access token expired (refreshed on next use)"
        )
        login_line = f"logged in as {who}; {validity}"
    _print_report(env, report, login_line)
    if report.problems:
        ctx.exit(1)
