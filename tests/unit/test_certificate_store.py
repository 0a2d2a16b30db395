"""The certificate store: atomic commits, recovery, and every check of store_checks."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iotref.device.errors import StoreError
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    COMMIT_MARKER,
    PRIVATE_KEY_FILE,
    PROGRESS_FILE,
    PROPERTIES_FILE,
    PROPERTIES_KEYS,
    ROOT_CA_FILE,
    STAGING_DIR,
    CertificateStore,
    DeviceProperties,
    Progress,
    ProgressState,
    default_store_path,
)
from iotref.device.onboarding.directory_client import MachineSpec
from iotref.device.onboarding.environment import EnvironmentIdentity, load_environment
from iotref.device.onboarding.keys import KeyType, generate_private_key, private_key_pem
from iotref.device.onboarding.next_steps import Selection
from iotref.device.onboarding.service import Onboarding
from iotref.device.onboarding.store_checks import (
    check_store,
    environment_mismatch,
    issuer_fingerprint,
)
from iotref.device.onboarding.token_store import TokenStore

IDENTITY = EnvironmentIdentity("local", "http://127.0.0.1:8780")
NOW = dt.datetime(2030, 6, 1, tzinfo=dt.timezone.utc)
PROPS = DeviceProperties(
    mqtt_endpoint="localhost",
    mqtt_port=8883,
    machine_region="local",
    telemetry_topic="connectprint/telemetry",
    client_id="iotref-abc",
    org_id="org-1",
    machine_id="machine-1",
    site_id="site-1",
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    days: int = 365,
    start: dt.datetime = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("Server Root CA", root_key, "Server Root CA", root_key, ca=True, days=7300)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Device CA", ca_key, "Device CA", ca_key, ca=True, days=7300)
    key = generate_private_key(KeyType.EC256)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = _cert("iotref-abc", key, "Device CA", ca_key)
    return Pki(root_key, root, ca_key, ca, key, cert)


def _progress(cert: x509.Certificate, state: ProgressState = ProgressState.PROVISIONED) -> Progress:
    issuer, aki = issuer_fingerprint(cert)
    return Progress(
        environment=IDENTITY,
        state=state,
        machine=MachineSpec("Press", "ACME", "SN1"),
        machine_id="machine-1",
        site_id="site-1",
        organization_id="org-1",
        issuer=issuer,
        authority_key_id=aki,
    )


def _make_store(tmp_path: Path, pki: Pki, cert: x509.Certificate | None = None) -> CertificateStore:
    store = CertificateStore(tmp_path / "certificate_store" / "local")
    cert = cert or pki.cert
    store.commit(
        {
            ROOT_CA_FILE: _pem(pki.root),
            CERTIFICATE_FILE: _pem(cert),
            PRIVATE_KEY_FILE: private_key_pem(pki.key),
            PROPERTIES_FILE: json.dumps(PROPS.to_json()).encode(),
        },
        _progress(cert),
    )
    return store


def _codes(store: CertificateStore, **kwargs: object) -> list[str]:
    report = check_store(store, expected=IDENTITY, now=NOW, **kwargs)  # type: ignore[arg-type]
    return [p.code for p in report.problems]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- layout and atomic commits ----------------------------------------------------------------


def test_default_store_path(tmp_path: Path) -> None:
    assert default_store_path("test", tmp_path) == tmp_path / "certificate_store" / "test"


def test_commit_writes_exactly_the_contract_files(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    names = sorted(p.name for p in store.path.iterdir())
    assert names == sorted(
        [ROOT_CA_FILE, CERTIFICATE_FILE, PRIVATE_KEY_FILE, PROPERTIES_FILE, PROGRESS_FILE]
    )
    assert list(json.loads(store.file(PROPERTIES_FILE).read_text())) == list(PROPERTIES_KEYS)
    assert _mode(store.path) == 0o700
    assert _mode(store.path.parent) == 0o700
    assert _mode(store.file(PRIVATE_KEY_FILE)) == 0o600
    assert _mode(store.file(PROGRESS_FILE)) == 0o600
    identity = store.load()
    assert identity.properties == PROPS
    assert identity.private_key_path == store.file(PRIVATE_KEY_FILE)


def test_interrupted_commit_with_marker_is_completed(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    new_key = generate_private_key(KeyType.EC256)
    staging = store.file(STAGING_DIR)
    staging.mkdir()
    # The certificate was already moved into place when the process died.
    store.file(CERTIFICATE_FILE).write_bytes(_pem(_cert("new", new_key, "Device CA", pki.ca_key)))  # type: ignore[arg-type]
    (staging / PRIVATE_KEY_FILE).write_bytes(private_key_pem(new_key))
    (staging / COMMIT_MARKER).write_bytes(b"")
    assert store.recover() == "completed an interrupted store update"
    assert not staging.exists()
    assert store.file(PRIVATE_KEY_FILE).read_bytes() == private_key_pem(new_key)
    assert "key_mismatch" not in _codes(store)


def test_interrupted_commit_without_marker_is_discarded(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    before = store.file(PRIVATE_KEY_FILE).read_bytes()
    staging = store.file(STAGING_DIR)
    staging.mkdir()
    (staging / PRIVATE_KEY_FILE).write_bytes(b"half")
    assert store.recover() == "discarded an unfinished store update"
    assert not staging.exists()
    assert store.file(PRIVATE_KEY_FILE).read_bytes() == before
    assert store.recover() is None


def test_progress_round_trip(tmp_path: Path, pki: Pki) -> None:
    store = CertificateStore(tmp_path / "s")
    progress = _progress(pki.cert, ProgressState.MACHINE_CREATED)
    store.write_progress(progress)
    assert store.read_progress() == progress
    store.file(PROGRESS_FILE).write_text("{}")
    with pytest.raises(StoreError, match="damaged"):
        store.read_progress()


def test_store_lock_is_exclusive(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "s")
    with store.lock(), pytest.raises(StoreError, match="another iotref process"):  # noqa: SIM117
        with CertificateStore(tmp_path / "s").lock():
            pass


def test_properties_are_strict() -> None:
    data = PROPS.to_json()
    assert DeviceProperties.from_json(data) == PROPS
    with pytest.raises(ValueError, match="missing site_id"):
        DeviceProperties.from_json({k: v for k, v in data.items() if k != "site_id"})
    with pytest.raises(ValueError, match="unexpected extra"):
        DeviceProperties.from_json({**data, "extra": 1})
    with pytest.raises(ValueError, match="mqtt_port"):
        DeviceProperties.from_json({**data, "mqtt_port": "8883"})
    with pytest.raises(ValueError, match="client_id is empty"):
        DeviceProperties.from_json({**data, "client_id": ""})


# -- checks -----------------------------------------------------------------------------------


def test_complete_store_is_ok_and_says_what_was_checked(tmp_path: Path, pki: Pki) -> None:
    report = check_store(_make_store(tmp_path, pki), expected=IDENTITY, now=NOW)
    assert report.ok, report.problems
    assert report.properties == PROPS
    assert report.key == "EC P-256"
    assert report.certificate is not None
    assert report.certificate.subject == "CN=iotref-abc"
    assert "not in the store" in report.chain
    assert "broker" in report.chain


def test_absent_store(tmp_path: Path) -> None:
    assert _codes(CertificateStore(tmp_path / "nothing")) == ["absent"]


def test_incomplete_store_after_an_interrupted_provisioning(tmp_path: Path, pki: Pki) -> None:
    store = CertificateStore(tmp_path / "s")
    store.write_progress(_progress(pki.cert, ProgressState.OWNED))
    report = check_store(store, expected=IDENTITY, now=NOW)
    assert [p.code for p in report.problems] == ["incomplete"]
    assert "continues with machine machine-1" in report.problems[0].next_step


def test_incomplete_complete_store(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    store.file(CERTIFICATE_FILE).unlink()
    report = check_store(store, expected=IDENTITY, now=NOW)
    assert [p.code for p in report.problems] == ["incomplete"]
    assert "deviceCert.pem" in report.problems[0].reason
    assert "--renew" in report.problems[0].next_step


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "properties_invalid"),
        (json.dumps({**PROPS.to_json(), "extra": "x"}).encode(), "properties_invalid"),
        (json.dumps({"mqtt_port": 1}).encode(), "properties_invalid"),
    ],
)
def test_bad_properties(tmp_path: Path, pki: Pki, content: bytes, code: str) -> None:
    store = _make_store(tmp_path, pki)
    store.file(PROPERTIES_FILE).write_bytes(content)
    assert _codes(store) == [code]


def test_properties_of_another_machine(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    store.file(PROPERTIES_FILE).write_text(
        json.dumps({**PROPS.to_json(), "machine_id": "machine-2"})
    )
    assert _codes(store) == ["identity_mismatch"]


@pytest.mark.parametrize(
    ("name", "code"),
    [
        (ROOT_CA_FILE, "root_ca_unparsable"),
        (CERTIFICATE_FILE, "certificate_unparsable"),
        (PRIVATE_KEY_FILE, "key_unparsable"),
    ],
)
def test_unparsable_files(tmp_path: Path, pki: Pki, name: str, code: str) -> None:
    store = _make_store(tmp_path, pki)
    store.file(name).write_text("garbage\n")
    assert _codes(store) == [code]


def test_root_ca_that_is_not_a_ca(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    store.file(ROOT_CA_FILE).write_bytes(_pem(pki.cert))
    assert _codes(store) == ["root_ca_invalid"]


def test_certificate_not_matching_the_key(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    store.file(PRIVATE_KEY_FILE).write_bytes(private_key_pem(generate_private_key("ec256")))
    report = check_store(store, expected=IDENTITY, now=NOW)
    assert [p.code for p in report.problems] == ["key_mismatch"]
    assert "--renew" in report.problems[0].next_step


def test_self_signed_device_certificate(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    store.file(CERTIFICATE_FILE).write_bytes(
        _pem(_cert("iotref-abc", pki.key, "iotref-abc", pki.key))
    )
    assert "certificate_self_signed" in _codes(store)


def test_certificate_from_another_ca_is_noticed(tmp_path: Path, pki: Pki) -> None:
    """Same key, same issuer name, but another CA key: the recorded issuer catches it."""
    store = _make_store(tmp_path, pki)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    store.file(CERTIFICATE_FILE).write_bytes(
        _pem(_cert("iotref-abc", pki.key, "Device CA", rogue_key))
    )
    assert _codes(store) == ["issuer_changed"]


def test_chain_in_the_certificate_file_is_verified(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    store.file(CERTIFICATE_FILE).write_bytes(_pem(pki.cert) + _pem(pki.ca))
    report = check_store(store, expected=IDENTITY, now=NOW)
    assert report.ok, report.problems
    assert report.chain.startswith("verified up to CN=Device CA")
    # A chain certificate with the right name but the wrong key: the signature fails.
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = _cert("Device CA", impostor_key, "Device CA", impostor_key, ca=True)
    store.file(CERTIFICATE_FILE).write_bytes(_pem(pki.cert) + _pem(impostor))
    assert _codes(store) == ["certificate_signature_invalid"]


def test_certificate_issued_by_the_root_is_verified_against_it(tmp_path: Path, pki: Pki) -> None:
    direct = _cert("iotref-abc", pki.key, "Server Root CA", pki.root_key)
    store = _make_store(tmp_path, pki, cert=direct)
    report = check_store(store, expected=IDENTITY, now=NOW)
    assert report.ok, report.problems
    assert report.chain == f"verified up to the root CA in {ROOT_CA_FILE}"
    # Signed by another key under the root's name: detected.
    forged = _cert("iotref-abc", pki.key, "Server Root CA", pki.ca_key)
    store.file(CERTIFICATE_FILE).write_bytes(_pem(forged))
    assert "certificate_signature_invalid" in _codes(store)


def test_expiry(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)  # valid 2030-01-01 .. 2031-01-01
    assert _codes(store) == []
    near = dt.datetime(2030, 12, 20, tzinfo=dt.timezone.utc)
    report = check_store(store, expected=IDENTITY, now=near)
    assert [p.code for p in report.problems] == ["certificate_expiring"]
    assert "in 12 days" in report.problems[0].reason
    assert check_store(store, expected=IDENTITY, now=near, threshold_days=5).ok
    late = dt.datetime(2031, 2, 1, tzinfo=dt.timezone.utc)
    assert [p.code for p in check_store(store, now=late).problems] == ["certificate_expired"]
    early = dt.datetime(2029, 12, 1, tzinfo=dt.timezone.utc)
    assert "certificate_not_yet_valid" in [p.code for p in check_store(store, now=early).problems]


def test_store_of_another_environment(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    other = EnvironmentIdentity("local", "http://127.0.0.1:9999")
    report = check_store(store, expected=other, now=NOW)
    assert [p.code for p in report.problems] == ["wrong_environment"]
    assert "127.0.0.1:8780" in report.problems[0].reason


def _recorded(store: CertificateStore, identity: EnvironmentIdentity, source: str) -> Progress:
    progress = store.read_progress()
    assert progress is not None
    progress = replace(progress, environment=identity, environment_source=source)
    store.write_progress(progress)
    assert store.read_progress() == progress  # both fields survive the round trip
    return progress


def test_a_store_of_another_endpoint_says_which_and_how_to_use_it(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = _make_store(tmp_path, pki)
    old_env = tmp_path / "old-sandbox" / "env.local"
    old_env.parent.mkdir()
    old_env.write_text(
        "base_url=http://127.0.0.1:46281\nDIRECTORY_HOST=http://127.0.0.1:46281\n"
        "DIRECTORY_OAUTH_CLIENT_ID=abc\nSCOPE=x\nSANDBOX_ID=aaaa0001\n"
    )
    made_with = EnvironmentIdentity("local", "http://127.0.0.1:46281", "aaaa0001")
    progress = _recorded(store, made_with, str(old_env))
    now_used = EnvironmentIdentity("local", "http://127.0.0.1:8780", "bbbb0002")
    mine = Selection(("--env", "local"), Path("certificate_store/local"))
    problem = environment_mismatch(store.path, progress, now_used, selection=mine, command="run")
    assert problem is not None and problem.code == "wrong_environment"
    assert problem.reason == (
        "the store certificate_store/local belongs to local at http://127.0.0.1:46281, "
        "not local at http://127.0.0.1:8780 (the endpoint differs)"
    )
    assert problem.next_step == (
        "run 'iotref run --env-file old-sandbox/env.local --store certificate_store/local' "
        "to use it with the environment it was made for, or move it away "
        "('mv certificate_store/local certificate_store/local.old') and run "
        "'iotref provision --env local --store certificate_store/local' for this one"
    )
    # The file that was used now describes another sandbox: it is not suggested.
    old_env.write_text(old_env.read_text().replace("aaaa0001", "cccc0003"))
    local = Selection(("--env", "local"))
    problem = environment_mismatch(store.path, progress, now_used, selection=local)
    assert problem is not None
    assert problem.next_step.startswith(
        "select local (http://127.0.0.1:46281) with its own --env or --env-file"
    )
    assert "'iotref provision --env local' for this one" in problem.next_step


def test_a_store_of_an_earlier_sandbox_at_the_same_address(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = _make_store(tmp_path, pki)
    made_with = EnvironmentIdentity("local", "http://127.0.0.1:8780", "aaaa0001")
    _recorded(store, made_with, str(tmp_path / ".sandbox" / "env.local"))
    now_used = EnvironmentIdentity("local", "http://127.0.0.1:8780", "bbbb0002")
    store.selection = Selection(("--env", "local"))
    report = check_store(store, expected=now_used, now=NOW)
    assert [p.code for p in report.problems] == ["wrong_environment"]
    problem = report.problems[0]
    assert "another sandbox" in problem.reason
    assert "aaaa0001" in problem.reason and "bbbb0002" in problem.reason
    assert problem.next_step == (
        "its certificate is not valid with the sandbox there now: move it away "
        "('mv certificate_store/local certificate_store/local.old') and run "
        "'iotref provision --env local'"
    )
    # While no sandbox answers on the address, its id is unknown: nothing to report.
    assert check_store(store, expected=IDENTITY, now=NOW).ok


def test_store_without_a_record_of_its_environment(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    store.file(PROGRESS_FILE).unlink()
    assert _codes(store) == ["unknown_environment"]


def test_insecure_permissions(tmp_path: Path, pki: Pki) -> None:
    store = _make_store(tmp_path, pki)
    os.chmod(store.file(PRIVATE_KEY_FILE), 0o644)
    os.chmod(store.path, 0o755)
    report = check_store(store, expected=IDENTITY, now=NOW)
    assert [p.code for p in report.problems] == ["insecure_permissions"] * 2
    assert "chmod 600" in report.problems[1].next_step


def test_status_finishes_an_interrupted_update_but_not_a_running_one(
    tmp_path: Path, pki: Pki
) -> None:
    store = _make_store(tmp_path, pki)
    staging = store.file(STAGING_DIR)
    staging.mkdir()
    (staging / PRIVATE_KEY_FILE).write_bytes(b"half-written")
    onboarding = Onboarding(
        load_environment("local"), store_path=store.path, token_store=TokenStore(tmp_path / "t")
    )
    try:
        with store.lock():  # a provisioning run holds the store: its update is in progress
            onboarding.check()
        assert staging.exists()
        report = onboarding.check()  # nobody holds it: the update was interrupted
        assert not staging.exists()
        assert "key_unparsable" not in [p.code for p in report.problems]
    finally:
        asyncio.run(onboarding.aclose())
