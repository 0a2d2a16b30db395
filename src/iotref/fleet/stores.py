"""The fleet's device stores: one ordinary certificate store per device under
``root/<environment>/<device name>``, and ``fleet.json`` beside them (the fleet id and the
platform's root CA fingerprint)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from iotref.device.errors import IotrefError
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
from iotref.device.onboarding.directory_client import MachineSpec
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.keys import KeyType
from iotref.device.onboarding.store_checks import issuer_fingerprint
from iotref.fleet.errors import FleetError
from iotref.fleet.names import device_name

FLEET_FILE: Final = "fleet.json"
MANUFACTURER: Final = "iotref fleet"


@dataclass(frozen=True)
class FleetDeviceIdentity:
    """A provisioned fleet device: index, name, store and properties."""

    index: int
    name: str
    store_path: Path
    properties: DeviceProperties

    @property
    def client_id(self) -> str:
        return self.properties.client_id


class FleetStores:
    """Per-device certificate stores under ``root/<environment>/<device name>``.

    Each is an ordinary certificate store (contract section 5), so one device of the fleet
    can also be used with ``iotref status --store``. ``fleet.json`` beside them records the
    fleet id (part of every machine serial number) and the platform's server root CA, to
    notice stores made against another sandbox.
    """

    def __init__(self, root: Path, env: Environment) -> None:
        self.env = env
        self.base = root / env.name
        self._meta: dict[str, Any] | None = None

    def path(self, index: int) -> Path:
        return self.base / device_name(index)

    def meta(self, server_root_ca: str | None = None) -> dict[str, Any]:
        """``fleet.json`` (made on first use). With ``server_root_ca``, refuse stores that
        were made against a platform with another root CA."""
        if self._meta is None:
            path = self.base / FLEET_FILE
            meta: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(path.read_text())
            if not isinstance(meta, dict) or "fleet_id" not in meta:
                meta = {
                    "fleet_id": secrets.token_hex(4),
                    "environment": self.env.identity.as_dict(),
                }
                self.base.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(meta, indent=2) + "\n")
            self._meta = meta
        if server_root_ca is not None:
            digest = hashlib.sha256(server_root_ca.strip().encode()).hexdigest()
            known = self._meta.get("server_root_ca_sha256")
            if known is None:
                self._meta["server_root_ca_sha256"] = digest
                (self.base / FLEET_FILE).write_text(json.dumps(self._meta, indent=2) + "\n")
            elif known != digest:
                raise FleetError(
                    f"the device stores in {self.base} were made for a platform with another "
                    "root CA (another sandbox data dir?)",
                    "pass another --store-root, or delete that folder",
                )
        return self._meta

    def load(self, index: int) -> FleetDeviceIdentity | None:
        """The device's identity if its store is complete, else ``None``."""
        store = CertificateStore(self.path(index))
        for name in (ROOT_CA_FILE, CERTIFICATE_FILE, PRIVATE_KEY_FILE):
            if not store.file(name).is_file():
                return None
        try:
            props = store.read_properties()
        except IotrefError:
            return None
        # One copy of what all devices share (endpoint, topic, organisation, site, region)
        # instead of one per device.
        props = dataclasses.replace(
            props,
            mqtt_endpoint=sys.intern(props.mqtt_endpoint),
            machine_region=sys.intern(props.machine_region),
            telemetry_topic=sys.intern(props.telemetry_topic),
            org_id=sys.intern(props.org_id),
            site_id=sys.intern(props.site_id),
        )
        return FleetDeviceIdentity(index, device_name(index), store.path, props)

    def machine(self, index: int) -> MachineSpec:
        fleet_id = str(self.meta()["fleet_id"])
        return MachineSpec(
            name=device_name(index),
            manufacturer=MANUFACTURER,
            serial_number=f"{fleet_id}-{index:06d}",
            kind="offset_press",
        )

    def commit(
        self,
        index: int,
        key_pem: bytes,
        cert_pem: str,
        root_ca: str,
        properties: DeviceProperties,
        organization_id: str,
    ) -> FleetDeviceIdentity:
        """Write a complete store for device ``index`` (atomically, as provisioning does)."""
        from cryptography import x509

        store = CertificateStore(self.path(index))
        certificate = x509.load_pem_x509_certificate(cert_pem.encode())
        issuer, key_id = issuer_fingerprint(certificate)
        progress = Progress(
            environment=self.env.identity,
            state=ProgressState.PROVISIONED,
            machine=self.machine(index),
            machine_id=properties.machine_id,
            site_id=properties.site_id,
            organization_id=organization_id,
            key_type=KeyType.EC256.value,
            issuer=issuer,
            authority_key_id=key_id,
        )
        with store.lock():
            store.commit(
                {
                    ROOT_CA_FILE: _pem(root_ca),
                    CERTIFICATE_FILE: _pem(cert_pem),
                    PRIVATE_KEY_FILE: key_pem,
                    PROPERTIES_FILE: json.dumps(properties.to_json(), indent=2).encode() + b"\n",
                },
                progress,
            )
        return FleetDeviceIdentity(index, device_name(index), store.path, properties)


def _pem(text: str) -> bytes:
    return text.strip().encode() + b"\n"
