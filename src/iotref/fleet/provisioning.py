"""Provisioning the fleet's devices that have no store yet: in bulk through the sandbox's
``POST /admin/things/bulk``, or one by one through the platform's normal onboarding. The
keys are made on this machine and never leave it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Final

import httpx

from iotref.device.onboarding.certificate_store import ROOT_CA_FILE, DeviceProperties
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.http_client import create_http_client
from iotref.device.onboarding.keys import KeyType, build_csr, generate_private_key, private_key_pem
from iotref.fleet.errors import FleetError
from iotref.fleet.names import device_name
from iotref.fleet.stores import FleetDeviceIdentity, FleetStores
from iotref.fleet.target import SandboxInfo

BULK_PATH: Final = "/admin/things/bulk"
BULK_BATCH: Final = 500
PROVISION_WORKERS: Final = 8
PLATFORM_PROVISION_CONCURRENCY: Final = 4


def _key_and_csr(name: str) -> tuple[bytes, str]:
    key = generate_private_key(KeyType.EC256)
    return private_key_pem(key), build_csr(key, common_name=name).decode()


async def provision_bulk(
    sandbox: SandboxInfo,
    stores: FleetStores,
    indices: Sequence[int],
    *,
    site_id: str | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[FleetDeviceIdentity]:
    """Provision ``indices`` through the sandbox's ``POST /admin/things/bulk``: keys and
    CSRs made here (the keys never leave this machine), certificates in batches."""
    if not indices:
        return []
    loop = asyncio.get_running_loop()
    out: list[FleetDeviceIdentity] = []
    with concurrent.futures.ThreadPoolExecutor(PROVISION_WORKERS) as pool:
        async with httpx.AsyncClient(base_url=sandbox.http_url, timeout=120) as http:
            for start in range(0, len(indices), BULK_BATCH):
                batch = list(indices[start : start + BULK_BATCH])
                keys = await asyncio.gather(
                    *(loop.run_in_executor(pool, _key_and_csr, device_name(i)) for i in batch)
                )
                body: dict[str, Any] = {
                    "devices": [
                        {"certificateSigningRequest": csr, "machineId": device_name(i)}
                        for i, (_, csr) in zip(batch, keys, strict=True)
                    ]
                }
                if site_id:
                    body["siteId"] = site_id
                answer = await http.post(
                    BULK_PATH,
                    json=body,
                    headers={"Authorization": f"Bearer {sandbox.admin_token}"},
                )
                if answer.status_code == 404:
                    raise FleetError(
                        "this sandbox has no bulk provisioning route",
                        "update the sandbox, or run against it as a platform (--no-bulk)",
                    )
                if answer.status_code != 200:
                    raise FleetError(
                        f"bulk provisioning failed: {answer.status_code} {answer.text[:300]}"
                    )
                data = answer.json()
                config = data["configuration"]
                connectivity = config["connectivity"]
                root_ca = str(connectivity["serverRootCA"])
                stores.meta(root_ca)
                things = data["things"]
                jobs = []
                for i, (key_pem, _), thing in zip(batch, keys, things, strict=True):
                    props = DeviceProperties(
                        mqtt_endpoint=str(connectivity["mqttEndPoint"]),
                        mqtt_port=int(connectivity["mqttPort"]),
                        machine_region=str(connectivity.get("machineRegion", "")),
                        telemetry_topic=str(config["provisioning"]["telemetryTopic"]),
                        client_id=str(thing["clientId"]),
                        org_id=str(data["orgId"]),
                        machine_id=device_name(i),
                        site_id=str(data["siteId"]),
                    )
                    jobs.append(
                        loop.run_in_executor(
                            pool,
                            stores.commit,
                            i,
                            key_pem,
                            str(thing["deviceCert"]),
                            root_ca,
                            props,
                            str(data["orgId"]),
                        )
                    )
                done = await asyncio.gather(*jobs)
                out.extend(done)
                if on_done is not None:
                    on_done(len(done))
    return out


async def provision_platform(
    env: Environment,
    stores: FleetStores,
    indices: Sequence[int],
    *,
    site: str | None = None,
    concurrency: int = PLATFORM_PROVISION_CONCURRENCY,
    on_done: Callable[[int], None] | None = None,
) -> list[FleetDeviceIdentity]:
    """Provision ``indices`` the normal way (needs ``iotref login`` for ``env`` first):
    per device a machine in the directory, its ownership, a key, a CSR and
    ``/v4/provisioning``, each into its own store (resumable, as ``iotref provision``)."""
    from iotref.device.onboarding.provisioning import ProvisionOptions
    from iotref.device.onboarding.service import Onboarding

    if not indices:
        return []
    stores.meta()
    limit = asyncio.Semaphore(max(1, concurrency))
    out: list[FleetDeviceIdentity] = []
    async with create_http_client() as http:

        async def one(index: int) -> None:
            async with (
                limit,
                Onboarding(env, store_path=stores.path(index), http=http) as onb,
            ):
                await onb.provision(ProvisionOptions(machine=stores.machine(index), site=site))
            identity = stores.load(index)
            if identity is None:
                raise FleetError(f"provisioning {device_name(index)} left an incomplete store")
            out.append(identity)
            if on_done is not None:
                on_done(1)

        await asyncio.gather(*(one(i) for i in indices))
    out.sort(key=lambda d: d.index)
    return out


async def provision_fleet(
    env: Environment,
    stores: FleetStores,
    indices: Sequence[int],
    *,
    sandbox: SandboxInfo | None,
    bulk: bool = True,
    site: str | None = None,
    on_done: Callable[[int], None] | None = None,
) -> tuple[list[FleetDeviceIdentity], int, str]:
    """The identities of the devices ``indices``: those with a complete store reused, the
    others provisioned (in bulk from a sandbox when ``bulk``, else through the platform).
    Returns them in the order of ``indices``, how many were reused and the path taken
    (``"reused"``, ``"bulk"`` or ``"platform"``). ``on_done`` counts devices as they
    become ready (the reused ones first)."""
    existing: dict[int, FleetDeviceIdentity] = {}
    missing: list[int] = []
    for index in indices:
        identity = stores.load(index)
        if identity is None:
            missing.append(index)
        else:
            existing[index] = identity
    if existing and sandbox is not None:
        first = next(iter(existing.values()))
        stores.meta((first.store_path / ROOT_CA_FILE).read_text())
        _check_root_ca(stores, sandbox, first)
    if on_done is not None:
        on_done(len(existing))
    path = "reused"
    new: list[FleetDeviceIdentity] = []
    if missing:
        if sandbox is not None and bulk:
            path = "bulk"
            new = await provision_bulk(sandbox, stores, missing, site_id=site, on_done=on_done)
        else:
            path = "platform"
            new = await provision_platform(env, stores, missing, site=site, on_done=on_done)
    for identity in new:
        existing[identity.index] = identity
    return [existing[i] for i in indices], len(indices) - len(missing), path


def _check_root_ca(
    stores: FleetStores, sandbox: SandboxInfo, identity: FleetDeviceIdentity
) -> None:
    """Refuse stores whose root CA is not the sandbox's (made against another sandbox)."""
    with contextlib.suppress(OSError):
        theirs = sandbox.ca_file.read_text().strip()
        ours = (identity.store_path / ROOT_CA_FILE).read_text().strip()
        if theirs and ours and theirs != ours:
            raise FleetError(
                f"the device stores in {stores.base} belong to another sandbox (another root CA)",
                "pass another --store-root, or delete that folder",
            )
