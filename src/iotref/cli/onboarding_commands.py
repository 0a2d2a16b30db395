"""``iotref login | logout | provision | status``: a device's onboarding from the shell.

Every expected failure ends with one line on stderr and a non-zero exit (1; ``status``
exits 1 when it finds a problem). Tokens and keys are never printed. Next steps name
``iotref`` commands with the environment and store options the person used
(:func:`cli_selection`), so that they run as printed.
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
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import click

from iotref.cli.local_sandbox import resolve_cli_environment
from iotref.cli.output import is_quiet, progress, result, verbosity
from iotref.device.errors import ConfigurationError, IotrefError
from iotref.device.onboarding.directory_client import MACHINE_KINDS, MachineSpec
from iotref.device.onboarding.environment import BUILTIN_ENVIRONMENTS, Environment, is_loopback_host
from iotref.device.onboarding.keys import DEFAULT_KEY_TYPE, KeyType
from iotref.device.onboarding.next_steps import NextStep, Selection, shell_word
from iotref.device.onboarding.store_checks import DEFAULT_EXPIRY_THRESHOLD_DAYS

if TYPE_CHECKING:
    from iotref.device.onboarding.device_flow import DeviceAuthorization, PollEvent
    from iotref.device.onboarding.provisioning import ProvisionResult
    from iotref.device.onboarding.revocation import RevocationStatus
    from iotref.device.onboarding.service import LoginStatus
    from iotref.device.onboarding.store_checks import StoreReport

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

#: Seconds to wait for a local sandbox to name its demo account.
DEMO_ACCOUNT_TIMEOUT = 1.0

P = ParamSpec("P")
R = TypeVar("R")

_CONFIG_KEYS = {"name", "manufacturer", "serial_number", "kind", "site", "key_type"}


def cli_selection() -> Selection:
    """The running command's environment and store options (``--env``, ``--env-file``,
    ``--store``, or the variables), which every next step it prints carries."""
    ctx = click.get_current_context(silent=True)
    params: dict[str, Any] = ctx.params if ctx is not None else {}
    return Selection.from_options(
        params.get("env_name"), params.get("env_file"), params.get("store")
    )


def next_step_text(step: str | NextStep | None) -> str | None:
    """A next step as this command prints it: its commands with the person's options."""
    return cli_selection().render(step)


def _expected_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the library's expected errors into one clear line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except IotrefError as exc:
            raise click.ClickException(exc.one_line(cli_selection())) from None

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


def _demo_account(env: Environment) -> tuple[str, str] | None:
    """The demo account (email, password) of a sandbox serving ``env``'s directory on
    this machine, or None (not a loopback host, not a sandbox, no answer)."""
    if not is_loopback_host(urlsplit(env.directory_host).hostname or ""):
        return None
    import httpx

    try:
        answer = httpx.get(
            f"{env.directory_host}/oauth/device/demo_account", timeout=DEMO_ACCOUNT_TIMEOUT
        )
        data = answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    email, password = data.get("email"), data.get("password")
    if isinstance(email, str) and isinstance(password, str):
        return email, password
    return None


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
    import segno

    buffer = io.StringIO()
    segno.make(uri, error="m").terminal(out=buffer, compact=True, border=2)
    return buffer.getvalue()


@click.command()
@_environment_options
@click.option("--no-qr", is_flag=True, help="Do not print the QR code.")
@_expected_errors
def login(env_name: str | None, env_file: Path | None, no_qr: bool) -> None:
    """Log this device in with the OAuth device flow (RFC 8628)."""
    from iotref.device.onboarding.service import Onboarding

    env = _env(env_name, env_file)
    interactive = sys.stdout.isatty() and not is_quiet()
    demo = _demo_account(env)

    def show(authorization: DeviceAuthorization) -> None:
        left = authorization.seconds_left(time.time())
        result(f"Log this device in to {env}:")
        result(f"  open   {authorization.verification_uri_complete}")
        result(f"  code   {authorization.user_code}")
        progress(f"  (or open {authorization.verification_uri} and type the code)")
        if demo is not None:
            result(f"  sign in as {demo[0]}, password {demo[1]} (the sandbox's demo account)")
        qr = None if no_qr or is_quiet() else _qr_text(authorization.verification_uri_complete)
        if qr:
            click.echo(qr, nl=False)
        progress(
            f"The code expires in {_format_left(left)} min. Waiting for approval "
            f"(checking every {authorization.interval:g} s)..."
        )

    def pending(event: PollEvent) -> None:
        if event.outcome == "slow_down":
            if interactive:
                click.echo()
            progress(f"The directory asked to poll slower: every {event.interval:g} s now.")
        elif interactive:
            click.echo(f"\r  {_format_left(event.seconds_left)} left ", nl=False)

    async def run() -> None:
        async with Onboarding(env) as onboarding:
            outcome = await onboarding.login(show, pending)
        if interactive:
            click.echo()
        who = f"{outcome.bearer.type} {outcome.bearer.id}" if outcome.bearer else "unknown bearer"
        result(f"Logged in to {env} as {who}.")
        progress(f"Tokens saved in {outcome.token_path} (never shown).")

    asyncio.run(run())


@click.command()
@_environment_options
@_expected_errors
def logout(env_name: str | None, env_file: Path | None) -> None:
    """Delete this environment's saved tokens."""
    from iotref.device.onboarding.service import Onboarding

    env = _env(env_name, env_file)
    onboarding = Onboarding(env)
    try:
        removed = onboarding.logout()
    finally:
        asyncio.run(onboarding.aclose())
    if removed:
        result(f"Logged out of {env}: tokens deleted.")
    else:
        result(f"Not logged in to {env}; nothing to delete.")


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
    from iotref.device.onboarding.provisioning import ProvisionOptions
    from iotref.device.onboarding.service import Onboarding

    options = ProvisionOptions(
        machine=_machine_spec(values),
        site=values.get("site") or None,
        key_type=KeyType(chosen_key),
        renew=renew,
        machine_id=machine_id,
    )
    selection = cli_selection()

    def step(_: str, message: str) -> None:
        progress(f"  {message}")

    async def run() -> tuple[ProvisionResult, str | None]:
        async with Onboarding(env, store_path=store, on_step=step) as onboarding:
            previous = _client_id_in(onboarding) if renew else None
            return await onboarding.provision(options), previous

    outcome, previous = asyncio.run(run())
    props = outcome.properties
    headline = {
        "reused": "The certificate store is complete; nothing to do.",
        "provisioned": "Provisioned.",
        "resumed": "Provisioned (continued the interrupted run).",
        "renewed": "Renewed the key and certificate.",
    }[outcome.outcome]
    result(headline)
    result(f"  store      {outcome.store_path}")
    result(f"  client id  {props.client_id}")
    result(f"  machine    {props.machine_id}   site {props.site_id}   org {props.org_id}")
    result(f"  endpoint   {props.mqtt_endpoint}:{props.mqtt_port}")
    for warning in outcome.warnings:
        result(f"  warning: {warning} (renew with '{selection.command('provision', '--renew')}')")
    if outcome.outcome == "renewed" and previous and previous != props.client_id:
        for line in _old_certificate_advice(env, previous):
            result(line)


def _client_id_in(onboarding: Any) -> str | None:
    """The client id of the store's current certificate, if it has one."""
    try:
        return str(onboarding.store.read_properties().client_id)
    except IotrefError:
        return None


def _running_sandbox_dir(env: Environment) -> Path | None:
    """The data dir of the running sandbox that serves ``env`` (its ``sandbox.json`` names
    the directory's URL), looked for beside the environment file and in ``.sandbox``."""
    candidates = [Path(".sandbox")]
    if env.source != "built-in":
        candidates.insert(0, Path(env.source).parent)
    for folder in candidates:
        try:
            info = json.loads((folder / "sandbox.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and str(info.get("http_url", "")).rstrip("/") == (
            env.directory_host
        ):
            return folder
    return None


def _old_certificate_advice(env: Environment, old_client_id: str) -> list[str]:
    """What ``provision --renew`` says about the certificate it replaced, which the
    platform still accepts: how to revoke it where that is possible."""
    lines = [
        f"  note: the previous certificate (client id {old_client_id}) stays valid until it "
        "is revoked (if it was not already); its key is no longer in the store, but a copy "
        "of the key could still connect with it"
    ]
    sandbox_dir = _running_sandbox_dir(env)
    loopback = is_loopback_host(urlsplit(env.directory_host).hostname or "")
    if sandbox_dir is not None:
        lines.append(
            "  revoke it: "
            f"iotref sandbox revoke {shell_word(old_client_id)} --data-dir "
            f"{shell_word(str(sandbox_dir))}"
        )
    elif loopback:
        lines.append(
            "  revoke it while the sandbox runs: "
            f"iotref sandbox revoke {shell_word(old_client_id)} --data-dir SANDBOX_DATA_DIR"
        )
    else:
        lines.append(
            "  the platform gives devices no way to revoke a certificate: ask the platform's "
            f"operator to revoke the certificate of thing {old_client_id} "
            "(AWS IoT Core: UpdateCertificate to REVOKED, or delete the thing)"
        )
    return lines


def _login_line(state: LoginStatus, selection: Selection) -> str:
    if state.problem:
        return f"unusable: {state.problem}"
    if not state.logged_in:
        return f"not logged in ('{selection.command('login')}' when needed)"
    bearer = state.bearer
    who = f"{bearer.type} {bearer.id}" if bearer else "unknown bearer"
    left = (state.access_token_expires_at or 0.0) - time.time()
    validity = (
        f"access token valid for {_format_left(left)} min"
        if left > 0
        else "access token expired (refreshed on next use)"
    )
    return f"logged in as {who}; {validity}"


def _platform_line(platform: RevocationStatus | None, offline: bool) -> str:
    if platform is None:
        return "not asked (--offline)" if offline else "not asked (no usable certificate)"
    if platform.verdict == "accepted":
        return f"ok: {platform.reason}"
    return platform.reason


def _print_report(
    env: Environment,
    report: StoreReport,
    login_line: str,
    platform_line: str,
    selection: Selection,
) -> None:
    if is_quiet():
        _print_verdict(report, selection)
        return
    click.echo(f"environment  {env}")
    click.echo(f"store        {report.path}")
    # A store of another environment is a problem: the list below says so, once.
    said = any(problem.code == "wrong_environment" for problem in report.problems)
    recorded = report.environment
    if recorded is not None and not said and not recorded.matches(env.identity):
        click.echo(f"  belongs to {recorded.difference(env.identity)}")
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
    if report.chain and (report.problems or verbosity() > 0):
        click.echo(f"  chain      {report.chain}")
    if report.outbox is not None:
        click.echo(f"outbox       {report.outbox}")
    click.echo(f"platform     {platform_line}")
    click.echo(f"login        {login_line}")
    _print_verdict(report, selection)


def _print_verdict(report: StoreReport, selection: Selection) -> None:
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s):")
        for problem in report.problems:
            click.echo(f"  - [{problem.code}] {problem.reason}")
            click.echo(f"    next: {selection.render(problem.hint or problem.next_step)}")
    else:
        click.echo("status       ok")


def _report_json(
    env: Environment,
    report: StoreReport,
    login: LoginStatus,
    platform: RevocationStatus | None,
    selection: Selection,
) -> dict[str, Any]:
    """``status --json``: the same facts as the text, no secrets."""
    props = report.properties
    cert = report.certificate
    bearer = login.bearer
    expires = login.access_token_expires_at
    return {
        "ok": not report.problems,
        "environment": {
            "name": env.name,
            "directory_host": env.directory_host,
            "base_url": env.base_url,
            "source": env.source,
        },
        "store": str(report.path),
        "store_environment": None if report.environment is None else report.environment.as_dict(),
        "properties": None if props is None else props.to_json(),
        "machine_id": props.machine_id
        if props is not None
        else (report.progress.machine_id if report.progress is not None else None),
        "certificate": None
        if cert is None
        else {
            "subject": cert.subject,
            "issuer": cert.issuer,
            "serial_number": cert.serial_number,
            "not_before": cert.not_before.isoformat(),
            "not_after": cert.not_after.isoformat(),
            "fingerprint_sha256": cert.fingerprint_sha256,
            "key": report.key or cert.key,
            "chain": report.chain,
        },
        "platform": None if platform is None else platform.as_json(),
        "login": {
            "logged_in": login.logged_in,
            "bearer": None if bearer is None else {"type": bearer.type, "id": bearer.id},
            "access_token_expires_at": None
            if expires is None
            else datetime.fromtimestamp(expires, timezone.utc).isoformat(),
            "problem": login.problem,
        },
        "problems": [
            {
                "code": problem.code,
                "reason": problem.reason,
                "next_step": selection.render(problem.hint or problem.next_step),
            }
            for problem in report.problems
        ],
    }


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
@click.option(
    "--offline",
    is_flag=True,
    help="Do not ask the platform (its CRL, a TLS handshake) whether it accepts the certificate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
@click.pass_context
@_expected_errors
def status(
    ctx: click.Context,
    env_name: str | None,
    env_file: Path | None,
    store: Path | None,
    expiry_threshold_days: float,
    offline: bool,
    as_json: bool,
) -> None:
    """Show this device's identity and check its certificate store and certificate.

    Checks the store's files, then asks the platform whether it still accepts the
    certificate: the CRL the certificate names, if any, and a TLS handshake with the broker
    (no MQTT session; --offline: neither). Exit status 1 if a problem is found.
    """
    from iotref.device.onboarding.service import Onboarding

    env = _env(env_name, env_file)
    selection = cli_selection()
    onboarding = Onboarding(env, store_path=store)
    try:
        report = onboarding.check(expiry_threshold_days)
        login_state = onboarding.login_status()
    finally:
        asyncio.run(onboarding.aclose())
    platform = None if offline else _ask_platform(onboarding, report)
    if platform is not None and platform.verdict in ("revoked", "failed"):
        report.add(
            "certificate_revoked" if platform.revoked else "certificate_refused",
            platform.reason,
            platform.next_step or "",
        )
    if as_json:
        document = _report_json(env, report, login_state, platform, selection)
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        _print_report(
            env,
            report,
            _login_line(login_state, selection),
            _platform_line(platform, offline),
            selection,
        )
    if report.problems:
        ctx.exit(1)


def _ask_platform(onboarding: Any, report: StoreReport) -> RevocationStatus | None:
    """The platform's answer about the store's certificate, if the store has one to ask
    about (a complete store whose key and certificate belong together)."""
    from iotref.device.onboarding.revocation import check_revocation

    unusable = {"key_mismatch", "certificate_unparsable", "key_unparsable", "properties_invalid"}
    if report.missing or report.certificate is None or report.properties is None:
        return None
    if any(problem.code in unusable for problem in report.problems):
        return None
    try:
        identity = onboarding.store.load()
    except IotrefError:
        return None
    return asyncio.run(check_revocation(identity))
