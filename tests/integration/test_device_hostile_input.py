"""The device side under hostile input, against the real sandbox: malformed shadow answers
(garbage, non-UTF-8, JSON that is not an object, wrong types, huge and deep documents)
published on the device's own shadow response topics with the operator identity, and an
unexpected server certificate. The device keeps running - connected, syncing its shadow,
publishing telemetry - or refuses cleanly, and reports what it met in its logs and stats."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import ConnectionFailed
from iotref.device.connection.state import ConnectionState
from iotref.device.shadow.sync import ShadowSync
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.permission import ShadowPermission
from iotref.device.telemetry.publisher import Telemetry
from iotref.sandbox.provisioning.certificate_authority import CertificateAuthorities
from tests.support.counted_messages import status_message
from tests.support.device_connection import QUICK_RETRY, device_settings
from tests.support.fault_proxy import FaultProxy
from tests.support.figures import record
from tests.support.mqtt_probe import device_topic, operator_probe
from tests.support.sandbox_process import SandboxProcess
from tests.support.shadow_rest import set_desired, shadow_document
from tests.support.tls_servers import TlsServer
from tests.support.tokens import provision_device
from tests.support.waiting import wait_until_async

pytestmark = pytest.mark.integration

RESPONSE_SUFFIXES = (
    "get/accepted",
    "get/rejected",
    "update/accepted",
    "update/rejected",
    "update/delta",
    "delete/rejected",
)
DEEP = 60_000


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# Input classes: (name, payloads, topics). Each payload goes to each topic of its class.
NOT_JSON = [b"garbage", b"{not json", b"", b"\x00\x01\x02", b"{" * 10]
NOT_UTF8 = [b"\xff\xfe\xfd", b'{"state": "\xff\xfe"}', "\u00e9t\u00e9".encode("latin-1")]
NOT_OBJECT = [b"[]", b"42", b"null", b'"text"', b"true", b"[{}]"]
WRONG_TYPES = [
    _json({"state": "not an object"}),
    _json({"state": None, "version": "seven"}),
    _json({"state": [1, 2, 3], "version": 1.5}),
    _json({"state": 7, "version": True}),
    _json({"code": "four hundred", "message": 5, "clientToken": 7}),
    _json({"code": None, "message": None, "clientToken": None}),
    _json({"clientToken": ["a"], "state": False}),
    _json({"version": {"nested": 1}, "metadata": "x", "timestamp": "y"}),
]
# Objects with a ``state`` object are instructions on update/delta (a delta names desired
# keys), so these go to the other response topics only.
WRONG_TYPES_IN_STATE = [
    _json({"state": {"desired": [1, 2, 3]}, "version": 1.5}),
    _json({"state": {"desired": "x", "reported": 7}, "version": True}),
    _json({"clientToken": ["a"], "state": {"desired": {}}}),
]
HUGE = [b"x" * 120_000, _json({"state": {"reported": {"blob": "x" * 120_000}}})]
DEEPLY_NESTED = [b"[" * DEEP + b"]" * DEEP, b'{"a":' * 5_000 + b"1" + b"}" * 5_000]
INPUT_CLASSES: dict[str, list[bytes]] = {
    "not JSON": NOT_JSON,
    "not UTF-8": NOT_UTF8,
    "JSON, not an object": NOT_OBJECT,
    "wrong types": WRONG_TYPES,
    "wrong types inside state": WRONG_TYPES_IN_STATE,
    "huge (120 KB)": HUGE,
    "deeply nested": DEEPLY_NESTED,
}
NOT_ON_DELTA = {"wrong types inside state": None, "huge (120 KB)": 1}
"""Classes (and which payload of them, ``None``: all) not sent on update/delta."""
NON_OBJECT_CLASSES = ("not JSON", "not UTF-8", "JSON, not an object", "deeply nested")


RETRY = {**QUICK_RETRY, "min_backoff_s": 0.2, "max_backoff_s": 2.0}


def _client_ca(sandbox: SandboxProcess) -> Path:
    """Whom the impostor asks client certificates of: the platform's device CAs."""
    return CertificateAuthorities(sandbox.data_dir / "ca").client_ca_bundle_path


def test_malformed_shadow_answers_and_garbage_keep_the_device_running(
    sandbox: SandboxProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = provision_device(sandbox, directory=tmp_path / "device")
    thing = device.client_id
    prefix = f"$aws/things/{thing}/shadow"
    caplog.set_level(logging.WARNING, logger="iotref")
    sent: dict[str, int] = dict.fromkeys(INPUT_CLASSES, 0)

    async def main() -> None:
        async with (
            Connection(device_settings(sandbox.info, device, RETRY)) as conn,
            ShadowSync(conn, thing) as shadow,
        ):
            with Outbox(tmp_path / "outbox.sqlite3") as outbox:
                telemetry = Telemetry(
                    conn, outbox, device_topic(device), permission=ShadowPermission(shadow)
                )
                await telemetry.start()
                received_before = conn.stats.messages_received
                operator = await asyncio.to_thread(operator_probe, sandbox)
                try:
                    for name, payloads in INPUT_CLASSES.items():
                        for n, payload in enumerate(payloads):
                            for suffix in (*RESPONSE_SUFFIXES, "name/x/update/delta", "get"):
                                if suffix == "update/delta" and NOT_ON_DELTA.get(name, -1) in (
                                    None,
                                    n,
                                ):
                                    continue
                                code = await asyncio.to_thread(
                                    operator.publish, f"{prefix}/{suffix}", payload
                                )
                                assert code < 0x80, (name, suffix, code)
                                sent[name] += 1
                finally:
                    await asyncio.to_thread(operator.close)
                await asyncio.sleep(1.0)
                # Still there: connected once, the garbage received, nothing crashed.
                assert conn.state is ConnectionState.CONNECTED
                assert conn.stats.connects == 1 and conn.stats.disconnects == 0
                arrived = conn.stats.messages_received - received_before
                assert arrived >= sum(sent.values()) * len(RESPONSE_SUFFIXES) // 8 - 20
                # ... and still working: a desired change is applied and reported ...
                set_desired(sandbox, thing, {"setpoint": 42, "mode": "run"})
                assert await shadow.wait_for("setpoint", 42, timeout=15) == 42
                await shadow.flush(15)
                # ... and telemetry flows.
                asset = telemetry_asset()
                for i in range(20):
                    assert (await telemetry.send(status_message(asset, i))).queued
                await wait_until_async(lambda: outbox.depth == 0, 20, "telemetry to drain")
                await telemetry.close()
                state = shadow_document(sandbox, thing)["state"]
                assert state.get("desired") == state.get("reported")

    asyncio.run(main())
    warnings = [r for r in caplog.records if r.name == "iotref.shadow"]
    ignored = [r for r in warnings if "non-JSON" in r.getMessage()]
    handler_errors = [r for r in caplog.records if "handler" in r.getMessage()]
    non_objects = sum(len(INPUT_CLASSES[c]) * len(RESPONSE_SUFFIXES) for c in NON_OBJECT_CLASSES)
    # Every payload that is not a JSON object is reported (a warning per message).
    assert len(ignored) + len(handler_errors) >= non_objects, (len(ignored), non_objects)
    for name, payloads in INPUT_CLASSES.items():
        record(
            "hostile_input",
            {
                "input_class": name,
                "payloads": len(payloads),
                "messages": sent[name],
                "target": "device shadow response topics (operator identity)",
                "outcome": "device stayed connected, synced and published; non-objects "
                "logged as ignored",
            },
        )
    record(
        "hostile_input_reports",
        {"ignored_warnings": len(ignored), "handler_errors": len(handler_errors)},
    )


def _publish_delta(sandbox: SandboxProcess, thing: str, delta: dict[str, Any]) -> None:
    """Publish ``delta`` on the thing's ``update/delta`` topic with the operator identity."""
    with operator_probe(sandbox) as operator:
        operator.publish(f"$aws/things/{thing}/shadow/update/delta", _json(delta))


def telemetry_asset() -> Any:
    from iotref.device.telemetry.messages import Asset, AssetType

    return Asset("press-hostile", "SN-HOSTILE", AssetType.SHEETFED_PRESS)


def test_a_delta_with_an_absurd_version_does_not_wedge_the_sync(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    device = provision_device(sandbox, directory=tmp_path / "device")
    thing = device.client_id

    async def main() -> None:
        async with (
            Connection(device_settings(sandbox.info, device, RETRY)) as conn,
            ShadowSync(conn, thing) as shadow,
        ):
            await asyncio.to_thread(
                _publish_delta, sandbox, thing, {"state": {"bogus": 1}, "version": 2**62}
            )
            await asyncio.sleep(0.5)
            set_desired(sandbox, thing, {"setpoint": 7})
            await shadow.wait_for("setpoint", 7, timeout=10)

    asyncio.run(main())


def test_one_refused_report_does_not_block_later_reports(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    device = provision_device(sandbox, directory=tmp_path / "device")
    thing = device.client_id

    async def main() -> None:
        async with (
            Connection(device_settings(sandbox.info, device, RETRY)) as conn,
            ShadowSync(conn, thing) as shadow,
        ):
            await asyncio.to_thread(
                _publish_delta, sandbox, thing, {"state": {"blob": "x" * 9_000}}
            )
            await shadow.wait_for("blob", timeout=10)
            set_desired(sandbox, thing, {"setpoint": 9})
            await shadow.wait_for("setpoint", 9, timeout=10)
            await wait_until_async(
                lambda: (
                    shadow_document(sandbox, thing)["state"].get("reported", {}).get("setpoint")
                    == 9
                ),
                10,
                "the setpoint reported",
            )

    asyncio.run(main())


def test_impostor_server_certificate_is_refused_at_start(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    device = provision_device(sandbox, directory=tmp_path / "device")
    foreign = CertificateAuthorities(tmp_path / "foreign-ca")
    foreign.ensure()  # its broker certificate is for "localhost" too, from another root
    from tests.support.tls_servers import ServerIdentity

    identity = ServerIdentity(foreign.broker_cert_path, foreign.broker_key_path)
    with TlsServer(identity, client_ca=_client_ca(sandbox)) as impostor:
        settings = device_settings(
            sandbox.info, device, RETRY, port=impostor.port, connect_timeout_s=4
        )
        started = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            asyncio.run(Connection(settings).start())
        took = time.monotonic() - started
        time.sleep(0.3)
        assert info.value.kind == "tls", info.value.reason
        assert "TLS" in info.value.reason or "trusted" in info.value.reason, info.value.reason
        assert impostor.app_bytes == 0  # no CONNECT, no identity sent to the impostor
    record(
        "security",
        {
            "check": "impostor broker (certificate from another CA) at start",
            "outcome": f"refused in {took:.1f} s: {info.value.reason}",
        },
    )


def test_impostor_met_mid_life_is_refused_and_the_device_recovers(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """The network path starts leading to an impostor (say, a TLS-intercepting firewall):
    the device refuses it on every attempt, says so in its stats, keeps trying, and is back
    as soon as the path leads to the platform again."""
    device = provision_device(sandbox, directory=tmp_path / "device")
    foreign = CertificateAuthorities(tmp_path / "foreign-ca")
    foreign.ensure()
    from tests.support.tls_servers import ServerIdentity

    identity = ServerIdentity(foreign.broker_cert_path, foreign.broker_key_path)

    async def main() -> dict[str, Any]:
        with (
            FaultProxy(sandbox.mqtt_port) as proxy,
            TlsServer(identity, client_ca=_client_ca(sandbox)) as impostor,
        ):
            settings = device_settings(
                sandbox.info, device, RETRY, port=proxy.port, max_backoff_s=1.0
            )
            async with Connection(settings) as conn:
                proxy.retarget(impostor.port)
                accepted = proxy.stats().accepted
                proxy.cut()
                await wait_until_async(lambda: proxy.stats().accepted > accepted, 20, "an attempt")
                await asyncio.sleep(3)
                assert not conn.connected and not conn.state.terminal
                assert impostor.app_bytes == 0  # no CONNECT, no identity
                proxy.retarget(sandbox.mqtt_port)
                healed = time.monotonic()
                # s2n holds a failed handshake for a random 10-30 s ("blinding") first.
                await conn.wait_connected(60)
                assert conn.stats.failures >= 1
                assert "TLS" in (conn.stats.last_error or ""), conn.stats.last_error
                assert impostor.app_bytes == 0
                return {
                    "attempts_at_impostor": proxy.stats().accepted - accepted,
                    "last_error": conn.stats.last_error,
                    "recovered_s": round(time.monotonic() - healed, 1),
                }

    outcome = asyncio.run(main())
    record(
        "security",
        {
            "check": "impostor broker met mid-life (path redirected, connection reset)",
            "outcome": f"refused on every attempt ({outcome['attempts_at_impostor']} made), "
            f"reported as {outcome['last_error']!r}; reconnected to the platform "
            f"{outcome['recovered_s']} s after the path was restored",
        },
    )
