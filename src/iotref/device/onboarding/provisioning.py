"""The resumable provisioning run: site, machine, ownership, key and CSR, configuration
and certificate, committed into the certificate store.

Each step that creates something in the directory is recorded in the store's
``.progress.json`` before the next one starts, so a run that died is continued by the next
one with the same machine. A complete store is reused without any network call; ``renew``
makes a new key and certificate for the same machine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from iotref.device.errors import (
    ConfigurationError,
    NotFound,
    ProvisioningError,
    StoreError,
    ValidationFailed,
)
from iotref.device.onboarding.auth import Authenticator
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PROPERTIES_FILE,
    ROOT_CA_FILE,
    CertificateStore,
    DeviceProperties,
    Progress,
    ProgressState,
)
from iotref.device.onboarding.device_flow import TokenSet
from iotref.device.onboarding.directory_client import (
    DirectoryClient,
    Machine,
    MachineOwnership,
    MachineSpec,
    Site,
)
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.keys import (
    DEFAULT_KEY_TYPE,
    KeyType,
    build_csr,
    generate_private_key,
    key_matches_certificate,
    private_key_pem,
)
from iotref.device.onboarding.next_steps import Selection, run, steps
from iotref.device.onboarding.provisioning_client import ProvisioningClient
from iotref.device.onboarding.store_checks import (
    check_store,
    environment_mismatch,
    issuer_fingerprint,
)

log = logging.getLogger(__name__)

#: ``on_step(step, message)``: progress for people; a test may raise from it to simulate a
#: process dying right after ``step`` was recorded.
StepCallback = Callable[[str, str], None]

# Steps reported through ``on_step``, in order.
STEP_RECOVERED = "recovered"
STEP_RESUMED = "resumed"
STEP_SITE = "site"
STEP_MACHINE = "machine"
STEP_OWNERSHIP = "ownership"
STEP_KEY = "key"
STEP_CONFIGURATION = "configuration"
STEP_CERTIFICATE = "certificate"
STEP_STORE = "store"

#: Findings that do not stop a complete store from being reused.
_WARNINGS_ONLY = frozenset({"certificate_expiring"})


@dataclass(frozen=True)
class ProvisionOptions:
    """What to provision. ``machine`` is needed for a new store unless ``machine_id``
    names an existing machine to continue with; ``site`` is a site id or name (default:
    the organization's first site)."""

    machine: MachineSpec | None = None
    site: str | None = None
    key_type: KeyType = DEFAULT_KEY_TYPE
    renew: bool = False
    machine_id: str | None = None


@dataclass(frozen=True)
class ProvisionResult:
    store_path: Path
    properties: DeviceProperties
    outcome: Literal["reused", "provisioned", "resumed", "renewed"]
    machine_created: bool
    key_type: KeyType | None
    warnings: tuple[str, ...] = ()


class Provisioner:
    """Provisioning into one certificate store: the store's lock held for the whole run,
    an interrupted store update finished first, every step reported through ``on_step``."""

    def __init__(
        self,
        env: Environment,
        store: CertificateStore,
        selection: Selection,
        auth: Authenticator,
        directory: DirectoryClient,
        provisioning: ProvisioningClient,
        on_step: StepCallback | None = None,
    ) -> None:
        self.env = env
        self.store = store
        self.selection = selection
        self.auth = auth
        self.directory = directory
        self.provisioning = provisioning
        self.on_step = on_step

    def _step(self, step: str, message: str) -> None:
        log.info("%s: %s", step, message)
        if self.on_step is not None:
            self.on_step(step, message)

    async def provision(self, options: ProvisionOptions) -> ProvisionResult:
        """Provision this device into the store, continue an interrupted run, reuse a
        complete store, or (``renew``) replace its key and certificate."""
        with self.store.lock():
            recovered = self.store.recover()
            if recovered:
                self._step(STEP_RECOVERED, recovered)
            progress = self._own_progress()
            if progress is not None and progress.state is ProgressState.PROVISIONED:
                _check_same_machine(progress, options)
                if not options.renew:
                    return self._reuse(progress)
            if options.renew and (
                progress is None
                or progress.machine_id is None
                or progress.state.rank < ProgressState.OWNED.rank
            ):
                raise ProvisioningError(
                    f"nothing to renew: the store {self.store.path} holds no provisioned machine",
                    run("provision", then="without --renew").within(self.selection),
                )
            return await self._provision(progress, options)

    def _own_progress(self) -> Progress | None:
        progress = self.store.read_progress()
        if progress is None:
            if self.store.present_files():
                raise StoreError(
                    f"the store {self.store.path} holds files but no record of its "
                    "environment (not made by iotref?)",
                    "move it away, or pass --store with another folder",
                    path=self.store.path,
                )
            return None
        mismatch = environment_mismatch(
            self.store.path, progress, self.env.identity, selection=self.selection, command="run"
        )
        if mismatch is not None:
            raise StoreError(
                mismatch.reason, mismatch.hint or mismatch.next_step, path=self.store.path
            )
        return progress

    def _reuse(self, progress: Progress) -> ProvisionResult:
        report = check_store(self.store, expected=self.env.identity)
        blocking = [p for p in report.problems if p.code not in _WARNINGS_ONLY]
        if blocking or report.properties is None:
            first = blocking[0] if blocking else None
            reasons = "; ".join(p.reason for p in blocking) or "properties.json is unusable"
            raise StoreError(
                f"the store {self.store.path} cannot be reused: {reasons}",
                (first.hint or first.next_step)
                if first
                else run("provision", "--renew").within(self.selection),
                path=self.store.path,
            )
        warnings = tuple(p.reason for p in report.problems)
        self._step(
            STEP_STORE,
            f"reusing the store {self.store.path} (machine {progress.machine_id}, "
            f"client id {report.properties.client_id})",
        )
        return ProvisionResult(self.store.path, report.properties, "reused", False, None, warnings)

    async def _provision(
        self, progress: Progress | None, options: ProvisionOptions
    ) -> ProvisionResult:
        tokens = self.auth.tokens()  # LoginRequired before anything is sent
        bearer_org = _organization_of(tokens)
        renew = options.renew
        resumed = progress is not None and not renew
        if progress is None:
            if options.machine is None and options.machine_id is None:
                raise ConfigurationError(
                    "provisioning a new machine needs its name, manufacturer and serial number",
                    "pass --name, --manufacturer and --serial-number (or --config FILE)",
                )
            progress = Progress(
                environment=self.env.identity,
                environment_source=_source_of(self.env),
                machine=options.machine,
                organization_id=bearer_org,
            )
            self.store.write_progress(progress)
        else:
            _check_same_machine(progress, options)
            if progress.organization_id and bearer_org and progress.organization_id != bearer_org:
                raise ProvisioningError(
                    f"this login is for organization {bearer_org}, but the store's machine "
                    f"belongs to organization {progress.organization_id}",
                    steps(
                        "log in again and pick that organization ({}, then {})",
                        ("logout",),
                        ("login",),
                    ).within(self.selection),
                )
            if resumed:
                self._step(
                    STEP_RESUMED,
                    f"continuing the interrupted provisioning (state {progress.state.value}"
                    + (f", machine {progress.machine_id})" if progress.machine_id else ")"),
                )

        progress = await self._ensure_site(progress, options)
        progress, created = await self._ensure_machine(progress, options)
        progress = await self._ensure_ownership(progress, bearer_org)
        assert progress.machine_id is not None
        assert progress.site_id is not None

        key = generate_private_key(options.key_type)
        csr = build_csr(key, common_name=progress.machine_id)
        self._step(STEP_KEY, f"made a new {options.key_type.value} key on this device")
        config = await self.provisioning.configuration()
        self._step(
            STEP_CONFIGURATION, f"platform endpoint {config.mqtt_endpoint}:{config.mqtt_port}"
        )
        issued = await self.provisioning.provision(csr, progress.site_id)
        try:
            certificate = x509.load_pem_x509_certificates(issued.device_cert.encode())[0]
        except ValueError:
            raise ProvisioningError(
                "the provisioning service returned an unreadable certificate",
                "try again later",
            ) from None
        if not key_matches_certificate(key, certificate):
            raise ProvisioningError(
                "the provisioning service returned a certificate for another key",
                "try again; if it persists, report it to the platform operator",
            )
        self._step(STEP_CERTIFICATE, f"certificate issued for client id {issued.client_id}")
        properties = DeviceProperties(
            mqtt_endpoint=config.mqtt_endpoint,
            mqtt_port=config.mqtt_port,
            machine_region=config.machine_region,
            telemetry_topic=config.telemetry_topic,
            client_id=issued.client_id,
            org_id=issued.org_id,
            machine_id=progress.machine_id,
            site_id=progress.site_id,
        )
        issuer, authority_key_id = issuer_fingerprint(certificate)
        final = progress.advanced(
            ProgressState.PROVISIONED,
            key_type=options.key_type.value,
            issuer=issuer,
            authority_key_id=authority_key_id,
        )
        self.store.commit(
            {
                ROOT_CA_FILE: _pem_text(config.server_root_ca),
                CERTIFICATE_FILE: _pem_text(issued.device_cert),
                PRIVATE_KEY_FILE: private_key_pem(key),
                PROPERTIES_FILE: json.dumps(properties.to_json(), indent=2).encode() + b"\n",
            },
            final,
        )
        self._step(STEP_STORE, f"wrote the certificate store {self.store.path}")
        outcome: Literal["provisioned", "resumed", "renewed"] = (
            "renewed" if renew else "resumed" if resumed else "provisioned"
        )
        return ProvisionResult(self.store.path, properties, outcome, created, options.key_type)

    async def _ensure_site(self, progress: Progress, options: ProvisionOptions) -> Progress:
        if progress.site_id is not None:
            if options.site and options.site != progress.site_id:
                site = await self._choose_site(options.site)
                if site.id != progress.site_id:
                    raise ProvisioningError(
                        f"the store's machine is at site {progress.site_id}, not {site.id}",
                        "drop --site, or pass --store with another folder",
                    )
            return progress
        site = await self._choose_site(options.site)
        progress = progress.advanced(progress.state, site_id=site.id)
        self.store.write_progress(progress)
        self._step(STEP_SITE, f"site {site.name or site.id} ({site.id})")
        return progress

    async def _choose_site(self, wanted: str | None) -> Site:
        sites = await self.directory.sites()
        if not sites:
            raise ProvisioningError(
                "the organization has no sites",
                "create a site for the organization in the directory, then try again",
            )
        if wanted is None:
            return sites[0]
        for site in sites:
            if site.id == wanted:
                return site
        by_name = [site for site in sites if site.name.casefold() == wanted.casefold()]
        if len(by_name) == 1:
            return by_name[0]
        available = ", ".join(f"{s.name} ({s.id})" for s in sites)
        raise ProvisioningError(
            f"no single site {wanted!r} in the organization; its sites: {available}",
            "pass --site with one of these ids",
        )

    async def _ensure_machine(
        self, progress: Progress, options: ProvisionOptions
    ) -> tuple[Progress, bool]:
        if progress.machine_id is not None:
            return progress, False
        machine: Machine
        created = False
        if options.machine_id:
            try:
                machine = await self.directory.machine(options.machine_id)
            except NotFound:
                raise ProvisioningError(
                    f"machine {options.machine_id} does not exist in the directory",
                    "check --machine-id",
                ) from None
            message = f"continuing with existing machine {machine.id}"
        else:
            spec = progress.machine or options.machine
            if spec is None:
                raise ConfigurationError(
                    "the machine's name, manufacturer and serial number are missing",
                    "pass --name, --manufacturer and --serial-number (or --config FILE)",
                )
            uncertain = progress.state is ProgressState.MACHINE_REQUESTED
            progress = progress.advanced(ProgressState.MACHINE_REQUESTED, machine=spec)
            self.store.write_progress(progress)
            try:
                machine = await self.directory.create_machine(spec, progress.site_id)
            except ValidationFailed as exc:
                if uncertain and "serial_number" in exc.errors:
                    raise ProvisioningError(
                        "an earlier, interrupted run may already have created this machine "
                        f"(serial number {spec.serial_number} of {spec.manufacturer} is taken)",
                        steps(
                            "find the machine's id in the directory and run {} with it",
                            ("provision", "--machine-id", "MACHINE_ID"),
                        ).within(self.selection),
                    ) from None
                raise
            created = True
            message = f"created machine {machine.id} ({machine.name})"
        progress = progress.advanced(
            ProgressState.MACHINE_CREATED,
            machine_id=machine.id,
            machine=progress.machine
            or MachineSpec(machine.name, machine.manufacturer, machine.serial_number, machine.kind),
        )
        self.store.write_progress(progress)
        self._step(STEP_MACHINE, message)
        return progress, created

    async def _ensure_ownership(self, progress: Progress, bearer_org: str | None) -> Progress:
        if progress.state.rank >= ProgressState.OWNED.rank:
            return progress
        assert progress.machine_id is not None
        ownership: MachineOwnership
        try:
            ownership = await self.directory.create_ownership(progress.machine_id, progress.site_id)
            message = f"organization {ownership.organization_id} owns the machine now"
        except ValidationFailed as exc:
            # Perhaps a run that died had taken ownership already: accept it if it is ours.
            try:
                ownership = await self.directory.ownership(progress.machine_id)
            except NotFound:
                raise exc from None
            ours = bearer_org is None or ownership.organization_id == bearer_org
            if not ownership.active or not ours:
                raise ProvisioningError(
                    f"machine {progress.machine_id} is owned by another organization",
                    "end that ownership in the directory, or provision another machine",
                ) from None
            message = f"organization {ownership.organization_id} already owns the machine"
        progress = progress.advanced(
            ProgressState.OWNED,
            ownership_id=ownership.id,
            organization_id=ownership.organization_id,
        )
        self.store.write_progress(progress)
        self._step(STEP_OWNERSHIP, message)
        return progress


def _source_of(env: Environment) -> str:
    """``built-in``, or the environment file's absolute path."""
    if env.source == "built-in":
        return env.source
    return str(Path(env.source).resolve())


def _organization_of(tokens: TokenSet) -> str | None:
    if tokens.bearer is not None and tokens.bearer.type == "Organization":
        return tokens.bearer.id
    return None


def _check_same_machine(progress: Progress, options: ProvisionOptions) -> None:
    """Refuse options that name another machine than the one the store is for."""
    if options.machine_id and progress.machine_id and options.machine_id != progress.machine_id:
        raise ProvisioningError(
            f"the store is for machine {progress.machine_id}, not {options.machine_id}",
            "pass --store with another folder for another machine",
        )
    if options.machine is not None and progress.machine is not None:
        mine, asked = progress.machine, options.machine
        if (mine.manufacturer, mine.serial_number) != (asked.manufacturer, asked.serial_number):
            raise ProvisioningError(
                f"the store is for {mine.manufacturer} serial {mine.serial_number}, not "
                f"{asked.manufacturer} serial {asked.serial_number}",
                "pass --store with another folder for another machine",
            )


def _pem_text(text: str) -> bytes:
    data = text.strip().encode("ascii", errors="strict")
    return data + b"\n"
