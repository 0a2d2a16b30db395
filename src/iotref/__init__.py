"""iotref: connect print-shop machines to the Zaikio / connectprint IoT platform.

The public device API lives here; everything else is an implementation detail of
:mod:`iotref.device` and :mod:`iotref.protocol`. The local platform is
:mod:`iotref.sandbox` (installed with the ``iotref[sandbox]`` extra) and is not imported
by anything here.

Send telemetry from a provisioned machine::

    import asyncio
    import iotref

    async def main() -> None:
        press = iotref.Asset("press-1", "SN-0001", iotref.AssetType.SHEETFED_PRESS)
        async with iotref.AsyncClient.from_store("certificate_store/local") as client:
            await client.send(press, iotref.StatusV2("Production", 12000, 1_000_000))

    asyncio.run(main())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from iotref._version import __version__

if TYPE_CHECKING:
    from iotref.device.client import (
        AsyncClient,
        Client,
        ClientClosed,
        ClientError,
        ClientOptions,
        ClientStats,
        InvalidMessageError,
        OutboxBusy,
        OutboxFullError,
        SendRefused,
    )
    from iotref.device.connection import (
        Connection,
        ConnectionEvent,
        ConnectionFailed,
        ConnectionSettings,
        ConnectionState,
        ConnectionTakenOver,
        PublishFailed,
    )
    from iotref.device.errors import (
        AuthorizationDenied,
        AuthorizationExpired,
        ConfigurationError,
        IotrefError,
        LoginRequired,
        NetworkError,
        ProvisioningError,
        StoreError,
    )
    from iotref.device.messages import (
        Asset,
        AssetType,
        DeviceStatusV1,
        DeviceStatusV2,
        Event,
        JobPhaseStatusV1,
        JobPhaseStatusV2,
        JobPhaseV1,
        JobPhaseV2,
        Part,
        Sender,
        SenderType,
        StatusV1,
        StatusV2,
        build_message,
    )
    from iotref.device.onboarding.certificate_store import (
        CertificateStore,
        DeviceIdentity,
        DeviceProperties,
    )
    from iotref.device.onboarding.directory_client import MachineSpec
    from iotref.device.onboarding.environment import (
        Environment,
        load_environment,
        load_environment_file,
    )
    from iotref.device.onboarding.keys import KeyType
    from iotref.device.onboarding.provisioning import ProvisionOptions
    from iotref.device.onboarding.service import BlockingOnboarding, Onboarding
    from iotref.device.onboarding.store_checks import check_store
    from iotref.device.shadow import (
        DesiredChange,
        Refuse,
        ShadowClient,
        ShadowRejected,
        ShadowSync,
        ShadowTimeout,
    )
    from iotref.device.simulator import PressSimulator
    from iotref.device.telemetry import SendResult, SendStatus
    from iotref.protocol.message_schemas import InvalidMessage, MessageValidator, ValidationIssue

#: Where each public name lives. Nothing is imported until a name is first used, so that
#: ``import iotref`` (and the ``iotref`` command) stays quick; :func:`__getattr__` imports
#: the module then.
_LAZY: dict[str, tuple[str, ...]] = {
    "iotref.device.onboarding.certificate_store": (
        "CertificateStore",
        "DeviceIdentity",
        "DeviceProperties",
    ),
    "iotref.device.client": (
        "AsyncClient",
        "Client",
        "ClientClosed",
        "ClientError",
        "ClientOptions",
        "ClientStats",
        "InvalidMessageError",
        "OutboxBusy",
        "OutboxFullError",
        "SendRefused",
    ),
    "iotref.device.connection": (
        "Connection",
        "ConnectionEvent",
        "ConnectionFailed",
        "ConnectionSettings",
        "ConnectionState",
        "ConnectionTakenOver",
        "PublishFailed",
    ),
    "iotref.device.onboarding.directory_client": ("MachineSpec",),
    "iotref.device.onboarding.environment": (
        "Environment",
        "load_environment",
        "load_environment_file",
    ),
    "iotref.device.errors": (
        "AuthorizationDenied",
        "AuthorizationExpired",
        "ConfigurationError",
        "IotrefError",
        "LoginRequired",
        "NetworkError",
        "ProvisioningError",
        "StoreError",
    ),
    "iotref.device.onboarding.keys": ("KeyType",),
    "iotref.device.messages": (
        "Asset",
        "AssetType",
        "DeviceStatusV1",
        "DeviceStatusV2",
        "Event",
        "JobPhaseStatusV1",
        "JobPhaseStatusV2",
        "JobPhaseV1",
        "JobPhaseV2",
        "Part",
        "Sender",
        "SenderType",
        "StatusV1",
        "StatusV2",
        "build_message",
    ),
    "iotref.device.onboarding.provisioning": ("ProvisionOptions",),
    "iotref.device.onboarding.service": (
        "BlockingOnboarding",
        "Onboarding",
    ),
    "iotref.device.shadow": (
        "DesiredChange",
        "Refuse",
        "ShadowClient",
        "ShadowRejected",
        "ShadowSync",
        "ShadowTimeout",
    ),
    "iotref.device.simulator": ("PressSimulator",),
    "iotref.device.onboarding.store_checks": ("check_store",),
    "iotref.device.telemetry": (
        "SendResult",
        "SendStatus",
    ),
    "iotref.protocol.message_schemas": (
        "InvalidMessage",
        "MessageValidator",
        "ValidationIssue",
    ),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'iotref' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without calling this again
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Asset",
    "AssetType",
    "AsyncClient",
    "AuthorizationDenied",
    "AuthorizationExpired",
    "BlockingOnboarding",
    "CertificateStore",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientOptions",
    "ClientStats",
    "ConfigurationError",
    "Connection",
    "ConnectionEvent",
    "ConnectionFailed",
    "ConnectionSettings",
    "ConnectionState",
    "ConnectionTakenOver",
    "DesiredChange",
    "DeviceIdentity",
    "DeviceProperties",
    "DeviceStatusV1",
    "DeviceStatusV2",
    "Environment",
    "Event",
    "InvalidMessage",
    "InvalidMessageError",
    "IotrefError",
    "JobPhaseStatusV1",
    "JobPhaseStatusV2",
    "JobPhaseV1",
    "JobPhaseV2",
    "KeyType",
    "LoginRequired",
    "MachineSpec",
    "MessageValidator",
    "NetworkError",
    "Onboarding",
    "OutboxBusy",
    "OutboxFullError",
    "Part",
    "PressSimulator",
    "ProvisionOptions",
    "ProvisioningError",
    "PublishFailed",
    "Refuse",
    "SendRefused",
    "SendResult",
    "SendStatus",
    "Sender",
    "SenderType",
    "ShadowClient",
    "ShadowRejected",
    "ShadowSync",
    "ShadowTimeout",
    "StatusV1",
    "StatusV2",
    "StoreError",
    "ValidationIssue",
    "__version__",
    "build_message",
    "check_store",
    "load_environment",
    "load_environment_file",
]
