"""iotref: connect print-shop machines to the Zaikio / connectprint IoT platform.

The public API, one layer deep: the client facade (:class:`AsyncClient`, the blocking
:class:`Client`, their options and stats, the four ways to send: ``send``, ``send_many``,
``send_message``, ``send_messages``), the message models, the errors (one name each) and
the onboarding entry points. Everything else (the connection, the shadow requests, the
publisher, the validator) is importable from its module under :mod:`iotref.device` and
:mod:`iotref.protocol` but is not part of this namespace. The local platform is
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
import warnings
from typing import TYPE_CHECKING

from iotref._version import __version__

if TYPE_CHECKING:
    from iotref.device.blocking import BlockingAssetChannel, BlockingOnboarding, Client
    from iotref.device.client import AssetChannel, AsyncClient
    from iotref.device.connection.errors import ConnectionFailed, ConnectionTakenOver
    from iotref.device.connection.state import ConnectionState
    from iotref.device.errors import (
        AuthorizationDenied,
        AuthorizationExpired,
        ClientClosed,
        ClientError,
        ConfigurationError,
        InvalidMessageError,
        IotrefError,
        LoginRequired,
        MessageTooLargeError,
        NetworkError,
        OutboxBusy,
        OutboxFullError,
        ProvisioningError,
        SendRefused,
        StoreError,
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
    from iotref.device.onboarding.service import Onboarding
    from iotref.device.onboarding.store_checks import check_store
    from iotref.device.options import ClientOptions, ClientStats
    from iotref.device.raw_payload import RawPayload
    from iotref.device.shadow.desired import DesiredChange, Refuse
    from iotref.device.shadow.errors import ShadowRejected, ShadowTimeout
    from iotref.device.telemetry.messages import (
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
    from iotref.device.telemetry.results import SendResult, SendStatus
    from iotref.protocol.message_schemas import ValidationIssue

#: Where each public name lives. Nothing is imported until a name is first used, so that
#: ``import iotref`` (and the ``iotref`` command) stays quick; :func:`__getattr__` imports
#: the module then.
_LAZY: dict[str, tuple[str, ...]] = {
    # the facade
    "iotref.device.blocking": ("BlockingAssetChannel", "BlockingOnboarding", "Client"),
    "iotref.device.client": ("AssetChannel", "AsyncClient"),
    "iotref.device.options": ("ClientOptions", "ClientStats"),
    "iotref.device.telemetry.results": ("SendResult", "SendStatus"),
    "iotref.device.shadow.desired": ("DesiredChange", "Refuse"),
    "iotref.device.shadow.errors": ("ShadowRejected", "ShadowTimeout"),
    "iotref.device.connection.errors": ("ConnectionFailed", "ConnectionTakenOver"),
    "iotref.device.connection.state": ("ConnectionState",),
    # messages
    "iotref.device.telemetry.messages": (
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
    "iotref.device.raw_payload": ("RawPayload",),
    # errors
    "iotref.device.errors": (
        "AuthorizationDenied",
        "AuthorizationExpired",
        "ClientClosed",
        "ClientError",
        "ConfigurationError",
        "InvalidMessageError",
        "IotrefError",
        "LoginRequired",
        "MessageTooLargeError",
        "NetworkError",
        "OutboxBusy",
        "OutboxFullError",
        "ProvisioningError",
        "SendRefused",
        "StoreError",
    ),
    "iotref.protocol.message_schemas": ("ValidationIssue",),
    # onboarding
    "iotref.device.onboarding.service": ("Onboarding",),
    "iotref.device.onboarding.provisioning": ("ProvisionOptions",),
    "iotref.device.onboarding.directory_client": ("MachineSpec",),
    "iotref.device.onboarding.keys": ("KeyType",),
    "iotref.device.onboarding.certificate_store": (
        "CertificateStore",
        "DeviceIdentity",
        "DeviceProperties",
    ),
    "iotref.device.onboarding.store_checks": ("check_store",),
    "iotref.device.onboarding.environment": (
        "Environment",
        "load_environment",
        "load_environment_file",
    ),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

#: Names this namespace had in the previous release, kept for one more: each still
#: resolves, with a :class:`DeprecationWarning` naming what to use instead. ``(module, name)``
#: is where the object is now.
_DEPRECATED: dict[str, tuple[str, str]] = {
    # a second name of a public error
    "InvalidMessage": ("iotref.device.errors", "InvalidMessageError"),
    "OutboxFull": ("iotref.device.errors", "OutboxFullError"),
    # internals, importable from their modules
    "Connection": ("iotref.device.connection.connection", "Connection"),
    "ConnectionEvent": ("iotref.device.connection.state", "ConnectionEvent"),
    "ConnectionSettings": ("iotref.device.connection.settings", "ConnectionSettings"),
    "PublishFailed": ("iotref.device.connection.errors", "PublishFailed"),
    "ShadowClient": ("iotref.device.shadow.requests", "ShadowClient"),
    "ShadowSync": ("iotref.device.shadow.sync", "ShadowSync"),
    "MessageValidator": ("iotref.protocol.message_schemas", "MessageValidator"),
    "PressSimulator": ("iotref.fleet.press", "PressSimulator"),
}


def _deprecated(name: str) -> object:
    module, new_name = _DEPRECATED[name]
    public = new_name in _MODULE_OF
    instead = f"use iotref.{new_name}" if public else f"import it from {module}"
    warnings.warn(
        f"iotref.{name} is deprecated and goes away in the next release; {instead}",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(module), new_name)


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        if name in _DEPRECATED:
            return _deprecated(name)  # not cached: every use warns
        raise AttributeError(f"module 'iotref' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without calling this again
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Asset",
    "AssetChannel",
    "AssetType",
    "AsyncClient",
    "AuthorizationDenied",
    "AuthorizationExpired",
    "BlockingAssetChannel",
    "BlockingOnboarding",
    "CertificateStore",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientOptions",
    "ClientStats",
    "ConfigurationError",
    "ConnectionFailed",
    "ConnectionState",
    "ConnectionTakenOver",
    "DesiredChange",
    "DeviceIdentity",
    "DeviceProperties",
    "DeviceStatusV1",
    "DeviceStatusV2",
    "Environment",
    "Event",
    "InvalidMessageError",
    "IotrefError",
    "JobPhaseStatusV1",
    "JobPhaseStatusV2",
    "JobPhaseV1",
    "JobPhaseV2",
    "KeyType",
    "LoginRequired",
    "MachineSpec",
    "MessageTooLargeError",
    "NetworkError",
    "Onboarding",
    "OutboxBusy",
    "OutboxFullError",
    "Part",
    "ProvisionOptions",
    "ProvisioningError",
    "RawPayload",
    "Refuse",
    "SendRefused",
    "SendResult",
    "SendStatus",
    "Sender",
    "SenderType",
    "ShadowRejected",
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
