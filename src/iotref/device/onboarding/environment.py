"""Environments (contract section 1): which directory, configuration service and OAuth app a
device talks to, from the built-in files in ``environments/`` or an environment file, and
an environment's identity (name, directory host, sandbox id) that tokens and certificates
are tied to. Plain ``http://`` only for loopback hosts.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlsplit

from iotref.device.errors import ConfigurationError

# The variables, re-exported (the command line reads them from here too).
from iotref.device.onboarding.environment_variables import ENV_FILE_VAR as ENV_FILE_VAR
from iotref.device.onboarding.environment_variables import ENV_VAR as ENV_VAR
from iotref.protocol.environment_file import (
    BASE_URL,
    DIRECTORY_HOST,
    DIRECTORY_OAUTH_CLIENT_ID,
    PUBLISH_RATE_LIMIT,
    REQUIRED_KEYS,
    SANDBOX_ID,
    SCOPE,
    THROUGHPUT_LIMIT,
    EnvironmentFileError,
    parse_env_file,
)

BUILTIN_ENVIRONMENTS = ("local", "test", "live")
DEFAULT_ENVIRONMENT = "local"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class EnvironmentIdentity:
    """What ties tokens and certificates to one environment: its name, its directory host
    and, for a sandbox, the sandbox's id (``None``: not a sandbox, or not known)."""

    name: str
    directory_host: str
    sandbox_id: str | None = None

    def as_dict(self) -> dict[str, str]:
        data = {"name": self.name, "directory_host": self.directory_host}
        if self.sandbox_id is not None:
            data["sandbox_id"] = self.sandbox_id
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnvironmentIdentity:
        name, host = data.get("name"), data.get("directory_host")
        sandbox_id = data.get("sandbox_id")
        if not isinstance(name, str) or not isinstance(host, str):
            raise ValueError("environment identity needs name and directory_host")
        if sandbox_id is not None and not isinstance(sandbox_id, str):
            raise ValueError("sandbox_id must be a string")
        return cls(name, host, sandbox_id or None)

    def matches(self, other: EnvironmentIdentity) -> bool:
        """Same name and directory host, and the same sandbox where both ids are known
        (an id is unknown for ``--env local`` while no sandbox answers on its port)."""
        if (self.name, self.directory_host) != (other.name, other.directory_host):
            return False
        return (
            self.sandbox_id is None
            or other.sandbox_id is None
            or (self.sandbox_id == other.sandbox_id)
        )

    def difference(self, current: EnvironmentIdentity) -> str:
        """What sets this (a store's or a login's) environment apart from ``current``, the
        one in use, as the end of a sentence "... belongs to ..."; empty if they match."""
        if self.matches(current):
            return ""
        if self.name != current.name:
            return f"environment {self}, not {current} (another environment)"
        if self.directory_host != current.directory_host:
            return (
                f"{self.name} at {self.directory_host}, not {current.name} at "
                f"{current.directory_host} (the endpoint differs)"
            )
        return (
            f"the sandbox {self.sandbox_id} at {self.directory_host}, not the one there now, "
            f"{current.sandbox_id} (another sandbox: a new data dir on the same address)"
        )

    def __str__(self) -> str:
        return f"{self.name} ({self.directory_host})"


class ClientLimits(TypedDict, total=False):
    """The per-connection quotas an environment sets, by their option names."""

    publish_rate_limit: float | None
    throughput_limit: int | None


@dataclass(frozen=True)
class Environment:
    """One environment: the contract's four keys plus a name and where it came from."""

    name: str
    base_url: str
    directory_host: str
    client_id: str
    scope: str
    source: str = "built-in"
    #: The sandbox's id, from the ``SANDBOX_ID`` of the file it wrote; ``None`` otherwise.
    sandbox_id: str | None = None
    #: The platform's quota of publishes a second per connection (``PUBLISH_RATE_LIMIT``;
    #: 0: not paced); ``None``: not given, the client's default.
    publish_rate_limit: float | None = None
    #: The platform's quota of bytes a second per connection (``THROUGHPUT_LIMIT``; 0: not
    #: paced); ``None``: not given, the client's default.
    throughput_limit: int | None = None

    @property
    def identity(self) -> EnvironmentIdentity:
        return EnvironmentIdentity(self.name, self.directory_host, self.sandbox_id)

    @property
    def cli_selector(self) -> str:
        """The CLI option that selects this environment: ``--env NAME`` or ``--env-file``."""
        if self.source == "built-in":
            return f"--env {self.name}"
        return f"--env-file {self.source}"

    def client_limits(self) -> ClientLimits:
        """The quotas this environment sets, as :class:`~iotref.device.options.ClientOptions`
        fields (only those it sets; 0 becomes ``None``: not paced)."""
        given: ClientLimits = {}
        if self.publish_rate_limit is not None:
            given["publish_rate_limit"] = self.publish_rate_limit or None
        if self.throughput_limit is not None:
            given["throughput_limit"] = self.throughput_limit or None
        return given

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(s for s in re.split(r"[,\s]+", self.scope) if s)

    def __str__(self) -> str:
        return f"{self.name} ({self.directory_host})"


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (brackets allowed)."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_sandbox_id(env: Environment, sandbox_id: str | None) -> Environment:
    """``env`` tied to the sandbox ``sandbox_id`` (e.g. the one answering at the built-in
    ``local`` environment's address); ``env`` itself for ``None`` or an unusable id."""
    if sandbox_id is None or not _SANDBOX_ID_RE.match(sandbox_id):
        return env
    return replace(env, sandbox_id=sandbox_id)


def check_service_url(url: str, key: str, *, source: str = "") -> str:
    """A service base URL without its trailing slash; ``https`` required unless loopback."""
    where = f" in {source}" if source else ""
    try:
        parts = urlsplit(url.strip())
        hostname = parts.hostname
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ConfigurationError(f"{key}{where} is not a valid URL: {url!r}") from None
    if parts.scheme not in ("https", "http") or not hostname:
        raise ConfigurationError(f"{key}{where} must be an https:// URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise ConfigurationError(f"{key}{where} must not carry credentials")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{key}{where} must not have a query or fragment: {url!r}")
    if parts.scheme == "http" and not is_loopback_host(hostname):
        raise ConfigurationError(
            f"{key}{where} uses plain http:// for {hostname}, which is not a loopback host",
            "use https://; plain http is allowed only for 127.0.0.1, ::1 and localhost",
        )
    return url.strip().rstrip("/")


def environment_from_values(
    name: str, values: Mapping[str, str], *, source: str = "built-in"
) -> Environment:
    """Build and check an :class:`Environment` from an environment file's keys."""
    if not _NAME_RE.match(name):
        raise ConfigurationError(
            f"environment name {name!r} is not usable",
            "use letters, digits, '.', '_' and '-' only",
        )
    missing = [key for key in REQUIRED_KEYS if not values.get(key, "").strip()]
    if missing:
        raise ConfigurationError(
            f"environment {name} ({source}) lacks {', '.join(missing)}",
            f"an environment file needs {', '.join(REQUIRED_KEYS)}",
        )
    client_id = values[DIRECTORY_OAUTH_CLIENT_ID].strip()
    if any(c.isspace() for c in client_id):
        raise ConfigurationError(f"{DIRECTORY_OAUTH_CLIENT_ID} in {source} contains spaces")
    sandbox_id = values.get(SANDBOX_ID, "").strip() or None
    if sandbox_id is not None and not _SANDBOX_ID_RE.match(sandbox_id):
        raise ConfigurationError(
            f"{SANDBOX_ID} in {source} is not usable: {sandbox_id!r}",
            "use up to 64 letters, digits and '-' (a sandbox writes it; leave it as written)",
        )
    return Environment(
        publish_rate_limit=_limit(values, PUBLISH_RATE_LIMIT, source, float),
        throughput_limit=_limit(values, THROUGHPUT_LIMIT, source, int),
        name=name,
        base_url=check_service_url(values[BASE_URL], BASE_URL, source=source),
        directory_host=check_service_url(values[DIRECTORY_HOST], DIRECTORY_HOST, source=source),
        client_id=client_id,
        scope=values[SCOPE].strip(),
        source=source,
        sandbox_id=sandbox_id,
    )


def _limit(values: Mapping[str, str], key: str, source: str, kind: type[float] | type[int]) -> Any:
    """The quota ``key`` of an environment file: a number >= 0, or ``None`` if absent."""
    text = values.get(key, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if not (math.isfinite(value) and value >= 0):
        unit = "publishes a second" if kind is float else "bytes a second (a whole number)"
        raise ConfigurationError(
            f"{key} in {source} is not usable: {text!r}",
            f"give the platform's quota in {unit}, or 0 to send without pacing",
        )
    return value


def load_environment(name: str) -> Environment:
    """One of the built-in environments: ``local``, ``test`` or ``live``."""
    if name not in BUILTIN_ENVIRONMENTS:
        raise ConfigurationError(
            f"unknown environment {name!r}",
            f"use one of {', '.join(BUILTIN_ENVIRONMENTS)}, or --env-file PATH",
        )
    text = (
        resources.files("iotref.device.onboarding") / "environments" / f"env.{name}"
    ).read_text()
    return environment_from_values(name, parse_env_file(text))


def environment_name_for_file(path: Path) -> str:
    """``env.local`` -> ``local``, ``staging.env`` -> ``staging``, ``.env`` -> ``env``."""
    file_name = path.name
    if file_name.startswith("env.") and len(file_name) > 4:
        return file_name[4:]
    if file_name.endswith(".env") and len(file_name) > 4:
        return file_name[:-4]
    return file_name.lstrip(".") or "custom"


def load_environment_file(path: Path, name: str | None = None) -> Environment:
    """An environment from a dotenv file; its name comes from the file name unless given."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"environment file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read environment file {path}: {exc}") from None
    try:
        values = parse_env_file(text)
    except EnvironmentFileError as exc:
        raise ConfigurationError(f"environment file {path}: {exc}") from None
    return environment_from_values(
        name or environment_name_for_file(path), values, source=str(path)
    )


def resolve_environment(
    env: str | None = None,
    env_file: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Environment:
    """The environment asked for: ``env_file`` or ``env`` (not both), else ``IOTREF_ENV_FILE``
    or ``IOTREF_ENV`` (not both), else ``local``."""
    environ = os.environ if environ is None else environ
    if env and env_file:
        raise ConfigurationError("give --env or --env-file, not both")
    if env_file:
        return load_environment_file(Path(env_file))
    if env:
        return load_environment(env)
    from_var_file = environ.get(ENV_FILE_VAR, "").strip()
    from_var = environ.get(ENV_VAR, "").strip()
    if from_var_file and from_var:
        raise ConfigurationError(f"both {ENV_VAR} and {ENV_FILE_VAR} are set", "unset one of them")
    if from_var_file:
        return load_environment_file(Path(from_var_file))
    if from_var:
        return load_environment(from_var)
    return load_environment(DEFAULT_ENVIRONMENT)
