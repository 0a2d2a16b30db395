"""Checks of a certificate store without the network: what ``iotref status`` reports about
the store itself (environment, files, ``properties.json``, key and certificate, validity,
permissions, who signed the certificate, the outbox kept in the store), each problem with
a code, the reason and a next step. What the platform says of the certificate is
:mod:`iotref.device.onboarding.revocation`; why the store alone cannot prove the device
certificate's chain is in docs/security.md.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from iotref.device.errors import ConfigurationError, StoreError
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PROPERTIES_FILE,
    ROOT_CA_FILE,
    STORE_FILES,
    CertificateStore,
    DeviceProperties,
    Progress,
    ProgressState,
)
from iotref.device.onboarding.environment import EnvironmentIdentity, load_environment_file
from iotref.device.onboarding.keys import (
    PrivateKey,
    describe_key,
    key_matches_certificate,
    load_private_key,
)
from iotref.device.onboarding.next_steps import (
    NextStep,
    Selection,
    provision_new_machine,
    run,
    shell_word,
    steps,
)
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME
from iotref.device.telemetry.outbox_integrity import (
    DAMAGED_INFIX,
    MARKER_SUFFIX,
    REPORT_SUFFIX,
    SHM_SUFFIX,
    WAL_SUFFIX,
    inspect_outbox,
)
from iotref.device.telemetry.outbox_salvage import read_reports

DEFAULT_EXPIRY_THRESHOLD_DAYS = 30.0

RENEW = run("provision", "--renew", then="for a new key and certificate")


@dataclass(frozen=True)
class StoreProblem:
    """One finding: a stable ``code``, the ``reason`` and the ``next_step``; ``hint`` is
    the next step as a :class:`~iotref.device.onboarding.next_steps.NextStep` where it names
    ``iotref`` commands (for a command line to render with the person's options)."""

    code: str
    reason: str
    next_step: str
    hint: NextStep | None = None


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    issuer: str
    serial_number: str
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str
    key: str

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


@dataclass
class StoreReport:
    """Everything ``iotref status`` shows about a store."""

    path: Path
    progress: Progress | None = None
    properties: DeviceProperties | None = None
    certificate: CertificateInfo | None = None
    key: str | None = None
    chain: str = ""
    missing: list[str] = field(default_factory=list)
    problems: list[StoreProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The options that selected this store, for next steps that run as printed.
    selection: Selection | None = None
    outbox: str | None = None
    """The outbox in one line (queued, refused, in use), or None when there is none."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def environment(self) -> EnvironmentIdentity | None:
        return None if self.progress is None else self.progress.environment

    def add(self, code: str, reason: str, next_step: str | NextStep) -> None:
        if isinstance(next_step, NextStep):
            hint = next_step.within(self.selection) if self.selection else next_step
            self.problems.append(StoreProblem(code, reason, hint.render(), hint))
        else:
            self.problems.append(StoreProblem(code, reason, next_step))


def _read_pem_certificates(path: Path) -> list[x509.Certificate]:
    certificates = x509.load_pem_x509_certificates(path.read_bytes())
    if not certificates:
        raise ValueError("no certificate")
    return certificates


def _key_id(certificate: x509.Certificate) -> str | None:
    try:
        ext = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        return None
    return ext.value.key_identifier.hex() if ext.value.key_identifier else None


def certificate_info(certificate: x509.Certificate) -> CertificateInfo:
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        serial_number=format(certificate.serial_number, "x"),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        key=describe_key(certificate.public_key()),  # type: ignore[arg-type]
    )


def issuer_fingerprint(certificate: x509.Certificate) -> tuple[str, str | None]:
    """What :class:`~iotref.device.onboarding.certificate_store.Progress` records of the issuer."""
    return certificate.issuer.rfc4514_string(), _key_id(certificate)


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        # X.509 v1 roots (old ones do exist) carry no extensions at all.
        return certificate.version is x509.Version.v1


def check_store(
    store: CertificateStore,
    *,
    expected: EnvironmentIdentity | None = None,
    threshold_days: float = DEFAULT_EXPIRY_THRESHOLD_DAYS,
    now: datetime | None = None,
) -> StoreReport:
    """Inspect ``store`` locally. ``expected`` is the environment in use: a store of another
    environment is a problem (see :func:`environment_mismatch`). Next steps carry the
    store's :attr:`~CertificateStore.selection`. Never raises for a broken store; reports
    it."""
    now = now or datetime.now(timezone.utc)
    report = StoreReport(path=store.path, selection=store.selection)
    if not store.path.exists() or store.is_empty():
        report.add(
            "absent", f"there is no certificate store at {store.path}", provision_new_machine()
        )
        return report

    _check_environment(store, report, expected)
    report.missing = [name for name in STORE_FILES if not store.file(name).is_file()]
    progress = report.progress
    if report.missing:
        if progress is not None and progress.state is not ProgressState.PROVISIONED:
            then = "to finish provisioning"
            if progress.machine_id:
                then += f" (it continues with machine {progress.machine_id})"
            step = run("provision", then=then)
            report.add(
                "incomplete",
                f"provisioning has not finished (state {progress.state.value}); missing "
                f"{', '.join(report.missing)}",
                step,
            )
        else:
            report.add(
                "incomplete",
                f"the store is incomplete: missing {', '.join(report.missing)}",
                RENEW if progress is not None and progress.machine_id else provision_new_machine(),
            )

    _check_properties(store, report)
    root = _check_root_ca(store, report, now)
    key = _check_key(store, report)
    _check_certificate(store, report, key, root, now, threshold_days)
    _check_permissions(store, report)
    _check_outbox(store.path / OUTBOX_FILE_NAME, report)
    return report


def _check_outbox(path: Path, report: StoreReport) -> None:
    """The outbox's state and its damaged copies (see the module docstring)."""
    keep_next = "check the storage (disk, SD card) for faults; once inspected, remove the copy"
    reported: set[Path] = set()
    for recovery in read_reports(path):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(recovery.at))
        files = [*recovery.kept_as]
        if files:
            files.append(files[0].with_name(files[0].name + REPORT_SUFFIX))
        reported.update(recovery.kept_as)
        report.add(
            "outbox_damaged",
            f"on {when} {recovery.summary()}",
            f"{keep_next}: rm {' '.join(str(f) for f in files)}",
        )
    for kept in sorted(path.parent.glob(f"{path.name}{DAMAGED_INFIX}*")):
        if kept in reported or kept.name.endswith(
            (WAL_SUFFIX, SHM_SUFFIX, MARKER_SUFFIX, REPORT_SUFFIX)
        ):
            continue
        report.add(
            "outbox_damaged",
            f"a damaged outbox was set aside as {kept} (its recovery was interrupted)",
            f"{keep_next}: rm {kept}*",
        )
    if not path.exists():
        return
    try:
        found = inspect_outbox(path)
    except sqlite3.OperationalError:
        report.outbox = "in use by a running sender"
        return
    except OSError as exc:
        report.add(
            "outbox_unreadable",
            f"cannot read the outbox {path}: {exc.strerror or exc}",
            "check the folder's owner and permissions",
        )
        return
    if found.damage is not None:
        report.add(
            "outbox_damaged",
            f"the outbox is damaged: {found.damage.detail}",
            steps("the next {} sets it aside and recovers every readable message", ("run",)),
        )
        report.outbox = "damaged"
        return
    report.outbox = f"{found.depth} message(s) queued, {found.refused} refused by the platform"


def _check_environment(
    store: CertificateStore,
    report: StoreReport,
    expected: EnvironmentIdentity | None,
) -> None:
    try:
        report.progress = store.read_progress()
    except StoreError as exc:
        report.add("progress_unreadable", exc.reason, exc.hint or exc.next_step or "")
        return
    progress = report.progress
    if progress is None:
        if store.present_files():
            report.add(
                "unknown_environment",
                "the store has no record of its environment (not made by iotref, or the "
                f"record {store.file('.progress.json').name} was removed)",
                run(
                    "provision",
                    before="move the folder away and",
                    then="or pass --store for a store of this environment",
                ),
            )
        return
    if expected is not None:
        problem = environment_mismatch(
            store.path, progress, expected, selection=store.selection, command="status"
        )
        if problem is not None:
            report.problems.append(problem)


def _shown(path: Path) -> str:
    """``path`` for a message: relative to the working directory when inside it."""
    text = str(path)
    if path.is_absolute():
        with_cwd = os.path.relpath(path)
        if not with_cwd.startswith(".."):
            text = with_cwd
    return text


def _own_selection(progress: Progress) -> tuple[str, ...] | None:
    """The option that selects the environment a store was made for, if it still does."""
    recorded, source = progress.environment, progress.environment_source
    if source == "built-in":
        return ("--env", recorded.name)
    if not source:
        return None
    try:
        env = load_environment_file(Path(source))
    except ConfigurationError:
        return None
    if not env.identity.matches(recorded):
        return None  # the file now describes something else (e.g. a restarted sandbox)
    return ("--env-file", _shown(Path(source)))


def environment_mismatch(
    store_path: Path,
    progress: Progress,
    current: EnvironmentIdentity,
    *,
    selection: Selection | None = None,
    command: str = "run",
) -> StoreProblem | None:
    """``wrong_environment`` if the store was made for another environment than
    ``current``: the reason says what differs (environment, endpoint or sandbox); the next
    step is ``iotref COMMAND`` with the store's own environment, or provisioning for this
    one, with ``selection`` (the person's ``--env``/``--env-file`` and ``--store``)."""
    recorded = progress.environment
    if recorded.matches(current):
        return None
    store = _shown(store_path)
    mv = f"mv {shell_word(store)} {shell_word(store + '.old')}".replace("{", "{{")
    move = f"move it away ('{mv.replace('}', '}}')}') and run {{}}"
    reason = f"the store {store} belongs to {recorded.difference(current)}"
    if (recorded.name, recorded.directory_host) == (current.name, current.directory_host):
        text = f"its certificate is not valid with the sandbox there now: {move}"
    else:
        own = _own_selection(progress)
        use = (
            f"run '{Selection(own, Path(store)).command(command)}'"
            if own
            else f"select {recorded} with its own --env or --env-file"
        )
        text = (
            f"{use.replace('{', '{{').replace('}', '}}')} to use it with the environment it "
            f"was made for, or {move} for this one"
        )
    hint = NextStep(text, (("provision",),), selection)
    return StoreProblem("wrong_environment", reason, hint.render(), hint)


def _check_properties(store: CertificateStore, report: StoreReport) -> None:
    if not store.file(PROPERTIES_FILE).is_file():
        return
    try:
        report.properties = store.read_properties()
    except StoreError as exc:
        report.add("properties_invalid", exc.reason, RENEW)
        return
    progress = report.progress
    props = report.properties
    if progress is not None and progress.machine_id and props.machine_id != progress.machine_id:
        report.add(
            "identity_mismatch",
            f"properties.json names machine {props.machine_id}, but the store was "
            f"provisioned for machine {progress.machine_id}",
            RENEW,
        )


def _check_root_ca(
    store: CertificateStore, report: StoreReport, now: datetime
) -> x509.Certificate | None:
    path = store.file(ROOT_CA_FILE)
    if not path.is_file():
        return None
    try:
        root = _read_pem_certificates(path)[0]
    except (ValueError, OSError):
        report.add("root_ca_unparsable", f"{ROOT_CA_FILE} is not a PEM certificate", RENEW)
        return None
    if not _is_ca(root) or root.issuer != root.subject or not _signed_by(root, root):
        report.add(
            "root_ca_invalid",
            f"{ROOT_CA_FILE} is not a self-signed CA certificate "
            f"(subject {root.subject.rfc4514_string()})",
            RENEW,
        )
    elif not root.not_valid_before_utc <= now <= root.not_valid_after_utc:
        report.add(
            "root_ca_expired",
            f"the server root CA is outside its validity period "
            f"(until {root.not_valid_after_utc:%Y-%m-%d})",
            RENEW,
        )
    return root


def _check_key(store: CertificateStore, report: StoreReport) -> PrivateKey | None:
    path = store.file(PRIVATE_KEY_FILE)
    if not path.is_file():
        return None
    try:
        key = load_private_key(path.read_bytes())
    except (ValueError, OSError) as exc:
        report.add("key_unparsable", f"{PRIVATE_KEY_FILE} is unusable: {exc}", RENEW)
        return None
    report.key = describe_key(key)
    return key


def _check_certificate(
    store: CertificateStore,
    report: StoreReport,
    key: PrivateKey | None,
    root: x509.Certificate | None,
    now: datetime,
    threshold_days: float,
) -> None:
    path = store.file(CERTIFICATE_FILE)
    if not path.is_file():
        return
    try:
        chain = _read_pem_certificates(path)
    except (ValueError, OSError):
        report.add("certificate_unparsable", f"{CERTIFICATE_FILE} is not a PEM certificate", RENEW)
        return
    cert = chain[0]
    info = certificate_info(cert)
    report.certificate = info
    if key is not None and not key_matches_certificate(key, cert):
        report.add(
            "key_mismatch",
            f"{CERTIFICATE_FILE} does not belong to {PRIVATE_KEY_FILE}",
            RENEW,
        )
    if now < info.not_before:
        report.add(
            "certificate_not_yet_valid",
            f"the certificate is valid only from {info.not_before:%Y-%m-%d %H:%M} UTC "
            "(is the clock right?)",
            run(
                "provision",
                "--renew",
                before="check the system clock, then",
                then="for a new key and certificate",
            ),
        )
    elif now > info.not_after:
        report.add(
            "certificate_expired", f"the certificate expired on {info.not_after:%Y-%m-%d}", RENEW
        )
    elif info.not_after - now < timedelta(days=threshold_days):
        report.add(
            "certificate_expiring",
            f"the certificate expires on {info.not_after:%Y-%m-%d}, in "
            f"{info.days_left(now):.0f} days (threshold {threshold_days:g})",
            RENEW,
        )
    _check_issuer(report, cert, chain[1:], root)


def _check_issuer(
    report: StoreReport,
    cert: x509.Certificate,
    intermediates: list[x509.Certificate],
    root: x509.Certificate | None,
) -> None:
    issuer = cert.issuer.rfc4514_string()
    if cert.issuer == cert.subject and _signed_by(cert, cert):
        report.add(
            "certificate_self_signed",
            "the device certificate is self-signed; the platform only accepts "
            "certificates it issued",
            RENEW,
        )
        report.chain = "self-signed"
        return
    progress = report.progress
    if progress is not None and progress.issuer:
        recorded = (progress.issuer, progress.authority_key_id)
        if issuer_fingerprint(cert) != recorded:
            report.add(
                "issuer_changed",
                f"the certificate is issued by {issuer}, not by the CA that issued this "
                f"store's certificate ({progress.issuer})",
                RENEW,
            )
    candidates = [*intermediates, *([root] if root is not None else [])]
    current = cert
    verified: list[str] = []
    while True:
        parent = next((c for c in candidates if c.subject == current.issuer), None)
        if parent is None:
            break
        if not _signed_by(current, parent):
            report.add(
                "certificate_signature_invalid",
                f"the signature on {current.subject.rfc4514_string()} does not verify "
                f"with {parent.subject.rfc4514_string()}",
                RENEW,
            )
            report.chain = "signature invalid"
            return
        verified.append(parent.subject.rfc4514_string())
        if parent is root or parent.issuer == parent.subject:
            break
        candidates = [c for c in candidates if c is not parent]
        current = parent
    if verified and root is not None and verified[-1] == root.subject.rfc4514_string():
        report.chain = f"verified up to the root CA in {ROOT_CA_FILE}"
    elif verified:
        report.chain = (
            f"verified up to {verified[-1]}, which is not the root CA in {ROOT_CA_FILE}; "
            "the broker checks the rest when the device connects"
        )
    else:
        report.chain = (
            f"issued by {issuer}, whose certificate is not in the store; "
            f"{ROOT_CA_FILE} is the server's root CA and does not sign device certificates, "
            "so the broker checks this signature when the device connects"
        )


def _check_permissions(store: CertificateStore, report: StoreReport) -> None:
    try:
        folder_mode = stat.S_IMODE(store.path.stat().st_mode)
        if folder_mode & 0o077:
            report.add(
                "insecure_permissions",
                f"the store folder is accessible to others (mode {folder_mode:o})",
                f"chmod 700 {store.path}",
            )
        key_path = store.file(PRIVATE_KEY_FILE)
        if key_path.is_file():
            key_mode = stat.S_IMODE(key_path.stat().st_mode)
            if key_mode & 0o077:
                report.add(
                    "insecure_permissions",
                    f"{PRIVATE_KEY_FILE} is readable by others (mode {key_mode:o})",
                    run(
                        "provision",
                        "--renew",
                        before=f"chmod 600 {key_path}; if others may have copied it,",
                        then="for a new key and certificate",
                    ),
                )
    except OSError as exc:
        report.add(
            "unreadable",
            f"cannot inspect {store.path}: {exc.strerror}",
            "check the folder's owner and permissions",
        )
