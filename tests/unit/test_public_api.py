"""``iotref``'s namespace is one layer: the client facade, the message models, the errors
(one name each) and the onboarding entry points. Internals stay importable from their
modules but not from ``iotref``; last release's extra names still resolve, with a
``DeprecationWarning`` saying what to use."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import iotref

FACADE = {
    "AsyncClient",
    "Client",
    "AssetChannel",
    "BlockingAssetChannel",
    "ClientOptions",
    "ClientStats",
    "ConnectionState",
    "SendResult",
    "SendStatus",
    "DesiredChange",
    "Refuse",
}
MESSAGES = {
    "Asset",
    "AssetType",
    "Sender",
    "SenderType",
    "StatusV1",
    "StatusV2",
    "DeviceStatusV1",
    "DeviceStatusV2",
    "Event",
    "JobPhaseV1",
    "JobPhaseV2",
    "JobPhaseStatusV1",
    "JobPhaseStatusV2",
    "Part",
    "RawPayload",
    "build_message",
}
ERRORS = {
    "IotrefError",
    "ConfigurationError",
    "NetworkError",
    "StoreError",
    "ProvisioningError",
    "LoginRequired",
    "AuthorizationDenied",
    "AuthorizationExpired",
    "ClientError",
    "ClientClosed",
    "OutboxBusy",
    "SendRefused",
    "InvalidMessageError",
    "MessageTooLargeError",
    "OutboxFullError",
    "ConnectionFailed",
    "ConnectionTakenOver",
    "ShadowRejected",
    "ShadowTimeout",
    "ValidationIssue",
}
ONBOARDING = {
    "Onboarding",
    "BlockingOnboarding",
    "ProvisionOptions",
    "MachineSpec",
    "KeyType",
    "CertificateStore",
    "DeviceIdentity",
    "DeviceProperties",
    "check_store",
    "Environment",
    "load_environment",
    "load_environment_file",
}
INTERNALS = {
    "Connection",
    "ConnectionEvent",
    "ConnectionSettings",
    "PublishFailed",
    "ShadowClient",
    "ShadowSync",
    "MessageValidator",
    "PressSimulator",
}
SECOND_NAMES = {"InvalidMessage": "InvalidMessageError", "OutboxFull": "OutboxFullError"}


def test_all_is_the_facade_messages_errors_and_onboarding() -> None:
    groups = (FACADE, MESSAGES, ERRORS, ONBOARDING)
    assert sum(len(g) for g in groups) == len(set().union(*groups)), "a name in two groups"
    assert set(iotref.__all__) == {*FACADE, *MESSAGES, *ERRORS, *ONBOARDING, "__version__"}
    assert len(iotref.__all__) == len(set(iotref.__all__))


def test_every_public_name_is_its_modules_object() -> None:
    for module, names in iotref._LAZY.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert getattr(iotref, name) is getattr(loaded, name), name


def test_errors_are_exceptions_under_iotref_error() -> None:
    for name in ERRORS - {"ValidationIssue"}:
        error = getattr(iotref, name)
        assert issubclass(error, iotref.IotrefError), name
    for name in ("InvalidMessageError", "MessageTooLargeError", "OutboxFullError"):
        assert issubclass(getattr(iotref, name), iotref.SendRefused), name


def test_internals_are_not_public() -> None:
    assert not INTERNALS & set(iotref.__all__)
    assert not set(SECOND_NAMES) & set(iotref.__all__)
    assert not (INTERNALS | set(SECOND_NAMES)) & set(dir(iotref))
    namespace: dict[str, object] = {}
    exec("from iotref import *", namespace)
    assert not (INTERNALS | set(SECOND_NAMES)) & set(namespace)


@pytest.mark.parametrize(("old", "new"), sorted(SECOND_NAMES.items()))
def test_second_name_of_an_error_is_a_deprecated_alias(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"iotref.{old} is deprecated.*use iotref.{new}"):
        alias = getattr(iotref, old)
    assert alias is getattr(iotref, new)
    # Each use warns (the alias is not cached in the namespace).
    with pytest.warns(DeprecationWarning, match=old):
        getattr(iotref, old)


@pytest.mark.parametrize("name", sorted(INTERNALS))
def test_internal_names_still_resolve_with_a_deprecation_warning(name: str) -> None:
    module, attribute = iotref._DEPRECATED[name]
    with pytest.warns(DeprecationWarning, match=f"import it from {module}"):
        value = getattr(iotref, name)
    assert value is getattr(importlib.import_module(module), attribute)


def test_deprecation_warning_points_at_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ = iotref.InvalidMessage
    assert [w.filename for w in caught] == [__file__]


def test_public_names_do_not_warn() -> None:
    code = (
        "import warnings, iotref\n"
        "warnings.simplefilter('error')\n"
        "for name in iotref.__all__: getattr(iotref, name)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
