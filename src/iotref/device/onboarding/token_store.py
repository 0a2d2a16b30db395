"""Where a device keeps its directory tokens: one file per environment address (mode 0600,
0700 folder, written atomically), recording the environment's identity so that a token is
only handed out for the environment that obtained it. Location: docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from iotref.device.errors import StoreError
from iotref.device.files import (
    PRIVATE_FILE_MODE,
    ensure_private_dir,
    file_lock,
    is_private,
    remove_durably,
    write_atomic,
)
from iotref.device.onboarding.device_flow import TokenSet
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.next_steps import Selection, run, steps

log = logging.getLogger(__name__)

HOME_VAR = "IOTREF_HOME"
FORMAT_VERSION = 1


def default_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$IOTREF_HOME``, else ``$XDG_CONFIG_HOME/iotref``, else ``~/.config/iotref``."""
    environ = os.environ if environ is None else environ
    home = environ.get(HOME_VAR, "").strip()
    if home:
        return Path(home).expanduser()
    xdg = environ.get("XDG_CONFIG_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "iotref"
    return Path.home() / ".config" / "iotref"


def _key(env: Environment) -> str:
    digest = hashlib.sha256(f"{env.directory_host}\n{env.client_id}".encode()).hexdigest()
    return f"{env.name}-{digest[:12]}"


class TokenStore:
    """Tokens per environment on disk. Thread- and process-safe refreshes go through
    :meth:`lock`."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else default_config_dir() / "tokens"

    def path_for(self, env: Environment) -> Path:
        return self.directory / f"{_key(env)}.json"

    def load(self, env: Environment) -> TokenSet | None:
        """The environment's tokens, or None if there are none, or they were obtained from
        another sandbox at the same address (ids known and different). A file that cannot
        be read or belongs to another environment raises :class:`StoreError`."""
        path = self.path_for(env)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(
                f"cannot read the token file {path}: {exc.strerror}",
                steps(
                    "check its owner and permissions, or run {} and log in again", ("logout",)
                ).within(Selection.of(env)),
                path=path,
            ) from None
        if not is_private(path):
            log.warning("token file %s was readable by others; tightening it to 0600", path)
            os.chmod(path, PRIVATE_FILE_MODE)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            environment = data.get("environment") or {}
            if (
                environment.get("directory_host") != env.directory_host
                or environment.get("client_id") != env.client_id
            ):
                raise StoreError(
                    f"the token file {path} belongs to another environment",
                    run("logout", then="and log in again").within(Selection.of(env)),
                    path=path,
                )
            saved_sandbox = environment.get("sandbox_id")
            if saved_sandbox and env.sandbox_id and saved_sandbox != env.sandbox_id:
                log.info(
                    "the saved login for %s is from the sandbox %s, not %s: not used",
                    env,
                    saved_sandbox,
                    env.sandbox_id,
                )
                return None
            return TokenSet.from_json(data)
        except StoreError:
            raise
        except (ValueError, TypeError, AttributeError):
            raise StoreError(
                f"the token file {path} is damaged",
                steps("run {} and {} again", ("logout",), ("login",)).within(Selection.of(env)),
                path=path,
            ) from None

    def save(self, env: Environment, tokens: TokenSet) -> Path:
        """Write the environment's tokens atomically (0600 in a 0700 directory)."""
        path = self.path_for(env)
        data: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "environment": {
                "name": env.name,
                "directory_host": env.directory_host,
                "client_id": env.client_id,
            },
            **tokens.to_json(),
        }
        if env.sandbox_id is not None:
            data["environment"]["sandbox_id"] = env.sandbox_id
        try:
            ensure_private_dir(self.directory)
            write_atomic(path, json.dumps(data, indent=2).encode() + b"\n", PRIVATE_FILE_MODE)
        except OSError as exc:
            raise StoreError(
                f"cannot save tokens in {self.directory}: {exc.strerror or exc}",
                f"make {self.directory} writable, or set {HOME_VAR} to a writable directory",
                path=path,
            ) from None
        return path

    def delete(self, env: Environment) -> bool:
        """Remove the environment's tokens; False if there were none."""
        path = self.path_for(env)
        try:
            removed = remove_durably(path)
        except OSError as exc:
            raise StoreError(
                f"cannot delete {path}: {exc.strerror or exc}", "remove it by hand", path=path
            ) from None
        with contextlib.suppress(OSError):
            path.with_suffix(".lock").unlink()
        return removed

    @contextlib.contextmanager
    def lock(self, env: Environment, *, blocking: bool = True) -> Iterator[None]:
        """Hold the environment's refresh lock: a refresh token works once, so two
        processes must not both spend it. With ``blocking=False``, raise
        :class:`~iotref.device.files.LockBusy` at once if it is held."""
        try:
            ensure_private_dir(self.directory)
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.directory}: {exc.strerror or exc}",
                f"make it writable, or set {HOME_VAR} to a writable directory",
                path=self.directory,
            ) from None
        with file_lock(self.path_for(env).with_suffix(".lock"), blocking=blocking):
            yield
