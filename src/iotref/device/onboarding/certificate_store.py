"""The certificate store (contract section 5): one folder per environment holding the
contract's four files, plus ``.progress.json`` (the environment the store belongs to and how
far provisioning got) and ``.lock`` (one provisioning run at a time). The four files are
committed together through ``.staging/`` and a commit marker; :meth:`CertificateStore.recover`
finishes or discards an interrupted commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iotref.device.errors import StoreError
from iotref.device.files import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    LockBusy,
    ensure_private_dir,
    file_lock,
    fsync_dir,
    write_atomic,
    write_file_synced,
)
from iotref.device.onboarding.directory_client import MachineSpec
from iotref.device.onboarding.environment import EnvironmentIdentity
from iotref.device.onboarding.next_steps import NextStep, Selection, run
from iotref.device.stdlib_compat import StrEnum

ROOT_CA_FILE = "amazonRootCA1.pem"
PRIVATE_KEY_FILE = "devicePrivateKey.pem"
CERTIFICATE_FILE = "deviceCert.pem"
PROPERTIES_FILE = "properties.json"
PROGRESS_FILE = ".progress.json"
LOCK_FILE = ".lock"
STAGING_DIR = ".staging"
COMMIT_MARKER = ".commit"

#: The contract's files, in the order a commit moves them into place.
STORE_FILES = (ROOT_CA_FILE, CERTIFICATE_FILE, PRIVATE_KEY_FILE, PROPERTIES_FILE)
FILE_MODES = {
    ROOT_CA_FILE: PUBLIC_FILE_MODE,
    CERTIFICATE_FILE: PUBLIC_FILE_MODE,
    PROPERTIES_FILE: PUBLIC_FILE_MODE,
    PRIVATE_KEY_FILE: PRIVATE_FILE_MODE,
    PROGRESS_FILE: PRIVATE_FILE_MODE,
}
PROPERTIES_KEYS = (
    "mqtt_endpoint",
    "mqtt_port",
    "machine_region",
    "telemetry_topic",
    "client_id",
    "org_id",
    "machine_id",
    "site_id",
)
PROGRESS_FORMAT = 1
DEFAULT_STORE_ROOT = Path("certificate_store")


def default_store_path(environment_name: str, base: Path | None = None) -> Path:
    """``certificate_store/<env>`` under ``base`` (default: the working directory)."""
    return (base if base is not None else Path.cwd()) / DEFAULT_STORE_ROOT / environment_name


@dataclass(frozen=True)
class DeviceProperties:
    """``properties.json``: exactly the contract's eight keys."""

    mqtt_endpoint: str
    mqtt_port: int
    machine_region: str
    telemetry_topic: str
    client_id: str
    org_id: str
    machine_id: str
    site_id: str

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in PROPERTIES_KEYS}

    @classmethod
    def from_json(cls, data: Any) -> DeviceProperties:
        """Strict: ``ValueError`` naming missing, unexpected or mistyped keys."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in PROPERTIES_KEYS if k not in data]
        extra = sorted(k for k in data if k not in PROPERTIES_KEYS)
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected {', '.join(extra)}")
        if problems:
            raise ValueError("; ".join(problems))
        port = data["mqtt_port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("mqtt_port is not a port number")
        for key in PROPERTIES_KEYS:
            if key == "mqtt_port":
                continue
            if not isinstance(data[key], str):
                raise ValueError(f"{key} is not a string")
            if key != "machine_region" and not data[key]:
                raise ValueError(f"{key} is empty")
        return cls(**{key: data[key] for key in PROPERTIES_KEYS})


class ProgressState(StrEnum):
    """How far provisioning got, in order."""

    STARTED = "started"
    #: ``POST /machines`` was sent; if no machine id follows, it may or may not exist.
    MACHINE_REQUESTED = "machine_requested"
    MACHINE_CREATED = "machine_created"
    OWNED = "owned"
    PROVISIONED = "provisioned"

    @property
    def rank(self) -> int:
        return list(ProgressState).index(self)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Progress:
    """``.progress.json``: the store's environment and what provisioning has done."""

    environment: EnvironmentIdentity
    state: ProgressState = ProgressState.STARTED
    #: Where the environment came from when provisioning started: ``built-in`` or the
    #: environment file's absolute path (for a hint that names it).
    environment_source: str | None = None
    machine: MachineSpec | None = None
    machine_id: str | None = None
    site_id: str | None = None
    organization_id: str | None = None
    ownership_id: str | None = None
    key_type: str | None = None
    #: The device certificate's issuer (RFC 4514) and authority key id (hex), recorded
    #: when it arrived, to notice a certificate from another CA later.
    issuer: str | None = None
    authority_key_id: str | None = None
    updated_at: str = field(default_factory=_now_iso)

    def advanced(self, state: ProgressState, **changes: Any) -> Progress:
        return replace(self, state=state, updated_at=_now_iso(), **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROGRESS_FORMAT,
            "environment": self.environment.as_dict(),
            "environment_source": self.environment_source,
            "state": self.state.value,
            "machine": None if self.machine is None else self.machine.as_dict(),
            "machine_id": self.machine_id,
            "site_id": self.site_id,
            "organization_id": self.organization_id,
            "ownership_id": self.ownership_id,
            "key_type": self.key_type,
            "issuer": self.issuer,
            "authority_key_id": self.authority_key_id,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Progress:
        if not isinstance(data, dict) or data.get("format") != PROGRESS_FORMAT:
            raise ValueError("unknown progress format")
        machine = data.get("machine")
        spec = None
        if isinstance(machine, dict):
            spec = MachineSpec(
                name=str(machine["name"]),
                manufacturer=str(machine["manufacturer"]),
                serial_number=str(machine["serial_number"]),
                kind=str(machine["kind"]) if machine.get("kind") else None,
            )

        def opt(key: str) -> str | None:
            value = data.get(key)
            return str(value) if value else None

        return cls(
            environment=EnvironmentIdentity.from_dict(data["environment"]),
            state=ProgressState(data["state"]),
            environment_source=opt("environment_source"),
            machine=spec,
            machine_id=opt("machine_id"),
            site_id=opt("site_id"),
            organization_id=opt("organization_id"),
            ownership_id=opt("ownership_id"),
            key_type=opt("key_type"),
            issuer=opt("issuer"),
            authority_key_id=opt("authority_key_id"),
            updated_at=str(data.get("updated_at", "")),
        )


@dataclass(frozen=True)
class DeviceIdentity:
    """A complete store, as the connection needs it: file paths and properties."""

    store_path: Path
    root_ca_path: Path
    private_key_path: Path
    certificate_path: Path
    properties: DeviceProperties


class CertificateStore:
    """One environment's store folder."""

    def __init__(self, path: Path, *, selection: Selection | None = None) -> None:
        self.path = path
        #: The options that select this store in next steps (default: ``--store PATH``).
        self.selection = selection or Selection(store=path)

    def file(self, name: str) -> Path:
        return self.path / name

    def present_files(self) -> list[str]:
        """Which of the four contract files exist."""
        return [name for name in STORE_FILES if self.file(name).exists()]

    def is_empty(self) -> bool:
        return not self.present_files() and not self.file(PROGRESS_FILE).exists()

    def _error(self, reason: str, next_step: str | NextStep | None = None) -> StoreError:
        if isinstance(next_step, NextStep):
            next_step = next_step.within(self.selection)
        return StoreError(reason, next_step, path=self.path)

    # -- progress -----------------------------------------------------------------------------

    def read_progress(self) -> Progress | None:
        path = self.file(PROGRESS_FILE)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(f"cannot read {path}: {exc.strerror}") from None
        try:
            return Progress.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            raise self._error(
                f"{path} is damaged",
                f"move {self.path} away and provision again (the directory keeps the machine)",
            ) from None

    def write_progress(self, progress: Progress) -> None:
        try:
            ensure_private_dir(self.path)
            write_atomic(
                self.file(PROGRESS_FILE),
                json.dumps(progress.to_json(), indent=2).encode() + b"\n",
                PRIVATE_FILE_MODE,
            )
        except OSError as exc:
            raise self._error(
                f"cannot write to the store {self.path}: {exc.strerror or exc}",
                "make the folder writable or choose another one with --store",
            ) from None

    # -- locking ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the store for one provisioning run (not blocking)."""
        with contextlib.ExitStack() as stack:
            try:
                ensure_private_dir(self.path)
                stack.enter_context(file_lock(self.file(LOCK_FILE), blocking=False))
            except LockBusy:
                raise self._error(
                    f"another iotref process is provisioning into {self.path}",
                    "wait for it to finish",
                ) from None
            except OSError as exc:
                raise self._error(
                    f"cannot use the store {self.path}: {exc.strerror or exc}",
                    "make the folder writable or choose another one with --store",
                ) from None
            yield

    # -- committing the contract files ---------------------------------------------------------

    def commit(self, files: Mapping[str, bytes], progress: Progress) -> None:
        """Replace the contract files (any subset) and the progress record together."""
        unknown = set(files) - set(STORE_FILES)
        if unknown:
            raise ValueError(f"not store files: {sorted(unknown)}")
        staging = self.file(STAGING_DIR)
        try:
            ensure_private_dir(self.path)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(mode=0o700)
            for name in STORE_FILES:
                if name in files:
                    write_file_synced(staging / name, files[name], FILE_MODES[name])
            write_file_synced(
                staging / PROGRESS_FILE,
                json.dumps(progress.to_json(), indent=2).encode() + b"\n",
                PRIVATE_FILE_MODE,
            )
            fsync_dir(staging)
            write_file_synced(staging / COMMIT_MARKER, b"", PRIVATE_FILE_MODE)
            fsync_dir(staging)
            self._roll_forward(staging)
        except OSError as exc:
            raise self._error(
                f"cannot write the store {self.path}: {exc.strerror or exc}",
                run("provision", before="free disk space or fix permissions, then", then="again"),
            ) from None

    def _roll_forward(self, staging: Path) -> None:
        for name in (*STORE_FILES, PROGRESS_FILE):
            source = staging / name
            if source.exists():
                os.replace(source, self.file(name))
        fsync_dir(self.path)
        shutil.rmtree(staging)
        fsync_dir(self.path)

    def recover(self) -> str | None:
        """Finish (or discard) a commit that was interrupted; say which, or None."""
        staging = self.file(STAGING_DIR)
        if not staging.is_dir():
            return None
        try:
            if (staging / COMMIT_MARKER).exists():
                self._roll_forward(staging)
                return "completed an interrupted store update"
            shutil.rmtree(staging)
            fsync_dir(self.path)
            return "discarded an unfinished store update"
        except OSError as exc:
            raise self._error(
                f"cannot repair the interrupted update in {staging}: {exc.strerror or exc}",
                "fix the folder's permissions and run the command again",
            ) from None

    # -- reading ------------------------------------------------------------------------------

    def read_properties(self) -> DeviceProperties:
        path = self.file(PROPERTIES_FILE)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise self._error(f"{path} is missing", run("provision")) from None
        except OSError as exc:
            raise self._error(f"cannot read {path}: {exc.strerror}") from None
        except ValueError:
            raise self._error(f"{path} is not valid JSON", run("provision", "--renew")) from None
        try:
            return DeviceProperties.from_json(data)
        except ValueError as exc:
            raise self._error(f"{path}: {exc}", run("provision", "--renew")) from None

    def load(self) -> DeviceIdentity:
        """The store's identity for connecting; :class:`StoreError` if files are missing or
        ``properties.json`` is unusable. Run
        :func:`~iotref.device.onboarding.store_checks.check_store` for the full set of checks."""
        missing = [name for name in STORE_FILES if not self.file(name).is_file()]
        if missing:
            raise self._error(
                f"the certificate store {self.path} is incomplete (missing {', '.join(missing)})",
                run("provision"),
            )
        return DeviceIdentity(
            store_path=self.path,
            root_ca_path=self.file(ROOT_CA_FILE),
            private_key_path=self.file(PRIVATE_KEY_FILE),
            certificate_path=self.file(CERTIFICATE_FILE),
            properties=self.read_properties(),
        )
