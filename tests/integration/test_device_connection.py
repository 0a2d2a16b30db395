"""The device connection against the real sandbox (Mosquitto with mutual TLS): connect,
publish, subscribe; clear failures for a wrong CA, an unknown certificate and an unreachable
port; a cut network and a killed broker survived; two processes with one identity end with
one ConnectionTakenOver instead of a fight."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iotref.device.connection import loop_bridge
from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import ConnectionFailed, PublishFailed
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionEvent, ConnectionState, IncomingMessage
from tests.support.device_connection import QUICK_RETRY, device_settings
from tests.support.device_keys import DeviceFiles, self_signed
from tests.support.fault_proxy import FaultProxy
from tests.support.mqtt_probe import device_topic
from tests.support.ports import free_port
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device
from tests.support.waiting import wait_state

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- tests


async def test_connects_with_mutual_tls_publishes_and_receives(
    sandbox: SandboxProcess, device: DeviceFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeping_threads: set[str] = set()
    keep = loop_bridge.keep_thread_state

    def recording_keep() -> None:
        comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
        keeping_threads.add(comm.read_text().strip())
        keep()

    monkeypatch.setattr(loop_bridge, "keep_thread_state", recording_keep)
    events: list[ConnectionEvent] = []
    received: asyncio.Queue[IncomingMessage] = asyncio.Queue()
    async with Connection(
        device_settings(sandbox.info, device, QUICK_RETRY), on_event=events.append
    ) as conn:
        assert conn.connected and conn.state is ConnectionState.CONNECTED
        assert [e.state for e in events] == [ConnectionState.CONNECTING, ConnectionState.CONNECTED]
        await conn.publish(device_topic(device), b'{"hello": 1}')
        await asyncio.gather(
            *(conn.publish_nowait(device_topic(device), b"{}") for _ in range(200))
        )
        # a topic the device may not publish to: Mosquitto answers PUBACK 0x87
        with pytest.raises(PublishFailed) as refused:
            await conn.publish("not/allowed", b"{}")
        assert refused.value.reason_code == 0x87
        # request/response on its own shadow
        topic = f"$aws/things/{device.client_id}/shadow/get/rejected"
        await conn.subscribe(topic, received.put_nowait)
        await conn.publish(f"$aws/things/{device.client_id}/shadow/get", b"not json")
        msg = await asyncio.wait_for(received.get(), 5)
        assert msg.topic == topic and json.loads(msg.payload)["code"] == 400
        stats = conn.stats
        assert stats.connects == 1 and stats.pubacks >= 202 and stats.publish_failures == 1
        # The callbacks came on awscrt's event-loop thread, which kept its thread state.
        assert any(name.startswith("AwsEventLoop") for name in keeping_threads)
    assert events[-1].state is ConnectionState.STOPPED
    assert conn.state is ConnectionState.STOPPED


def write_store(store: Path, sandbox: SandboxProcess, device: DeviceFiles) -> None:
    """A certificate store as onboarding leaves it (contract section 5)."""
    store.mkdir()
    (store / "deviceCert.pem").write_bytes(device.cert_path.read_bytes())
    (store / "devicePrivateKey.pem").write_bytes(device.key_path.read_bytes())
    (store / "amazonRootCA1.pem").write_bytes(Path(sandbox.info["ca_file"]).read_bytes())
    (store / "properties.json").write_text(
        json.dumps(
            {
                "mqtt_endpoint": sandbox.info["mqtt_host"],
                "mqtt_port": sandbox.mqtt_port,
                "client_id": device.client_id,
            }
        )
    )


async def test_from_store_connects(
    sandbox: SandboxProcess, device: DeviceFiles, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    write_store(store, sandbox, device)
    async with Connection(ConnectionSettings.from_store(store)) as conn:
        assert conn.connected


async def test_wrong_ca_is_a_clear_tls_failure(
    sandbox: SandboxProcess, device: DeviceFiles, tmp_path: Path
) -> None:
    other_ca, _ = self_signed(tmp_path, "Some Other Root", ca=True)
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        await Connection(
            device_settings(sandbox.info, device, QUICK_RETRY, ca_path=other_ca)
        ).start()
    assert info.value.kind == "tls", info.value.reason
    assert "not trusted" in info.value.reason and info.value.next_step
    assert time.monotonic() - started < 4  # fail fast: retrying cannot fix it


async def test_unknown_certificate_is_refused(
    sandbox: SandboxProcess, device: DeviceFiles, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path, device.client_id, ca=False)
    with pytest.raises(ConnectionFailed) as info:
        await Connection(
            device_settings(sandbox.info, device, QUICK_RETRY, cert_path=cert, key_path=key)
        ).start()
    assert info.value.kind in ("tls", "refused"), info.value.reason
    assert "localhost" in info.value.reason


async def test_unreachable_port(sandbox: SandboxProcess, device: DeviceFiles) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionFailed) as info:
        await Connection(
            device_settings(sandbox.info, device, QUICK_RETRY, port=port, connect_timeout_s=2)
        ).start()
    assert info.value.kind == "unreachable", info.value.reason


async def test_network_cut_reconnects_and_keeps_queued_publishes(
    sandbox: SandboxProcess, device: DeviceFiles
) -> None:
    link = FaultProxy(sandbox.mqtt_port).start()
    events: list[ConnectionEvent] = []
    try:
        s = device_settings(
            sandbox.info, device, QUICK_RETRY, port=link.port, keepalive_s=5, ping_timeout_s=2
        )
        async with Connection(s, on_event=events.append) as conn:
            n = len(events)
            link.refuse()  # the network is gone: open connections cut, new ones refused
            link.cut()
            await wait_state(events, ConnectionState.DISCONNECTED, n)
            pending = [conn.publish_nowait(device_topic(device), b"{}") for _ in range(20)]
            await asyncio.sleep(0.5)
            assert not any(p.done() for p in pending)
            link.admit()
            await conn.wait_connected(30)
            await asyncio.wait_for(asyncio.gather(*pending), 10)
            assert conn.stats.connects == 2 and conn.stats.disconnects >= 1
    finally:
        link.close()


async def test_broker_killed_reconnects_and_resubscribes(
    sandbox: SandboxProcess, device: DeviceFiles
) -> None:
    from tests.support.mqtt_probe import connect as probe_connect

    events: list[ConnectionEvent] = []
    got: asyncio.Queue[IncomingMessage] = asyncio.Queue()
    topic = f"$aws/things/{device.client_id}/shadow/name/probe/update/delta"
    async with Connection(
        device_settings(sandbox.info, device, QUICK_RETRY), on_event=events.append
    ) as conn:
        await conn.subscribe(topic, got.put_nowait)
        n = len(events)
        old = sandbox.mosquitto()
        old.send_signal(signal.SIGKILL)
        await wait_state(events, ConnectionState.DISCONNECTED, n)
        connected = await wait_state(events, ConnectionState.CONNECTED, n, timeout=60)
        assert sandbox.mosquitto().pid != old.pid
        # no session survived a SIGKILL: the connection subscribed again by itself
        assert connected.session_present is False
        await asyncio.sleep(0.3)
        operator = await asyncio.to_thread(
            probe_connect,
            sandbox.mqtt_port,
            sandbox.info["ca_file"],
            sandbox.info["operator_cert"],
            sandbox.info["operator_key"],
        )
        try:
            await asyncio.to_thread(operator.publish, topic, b'{"ping": 1}')
            msg = await asyncio.wait_for(got.get(), 10)
            assert json.loads(msg.payload) == {"ping": 1}
        finally:
            await asyncio.to_thread(operator.close)


TAKEOVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from iotref.device.connection.connection import Connection
    from iotref.device.connection.errors import ConnectionTakenOver
    from iotref.device.connection.settings import ConnectionSettings
    from iotref.device.connection.state import ConnectionState

    args = json.loads(sys.argv[1])
    settings = ConnectionSettings(
        endpoint=args["host"], port=args["port"], client_id=args["client_id"],
        cert_path=Path(args["cert"]), key_path=Path(args["key"]), ca_path=Path(args["ca"]),
        min_backoff_s=0.2, max_backoff_s=2.0)

    async def main() -> int:
        conn = Connection(settings)
        try:
            await conn.start()
            print("CONNECTED", flush=True)
            await asyncio.wait_for(conn.wait_closed(), args["duration"])
        except ConnectionTakenOver as exc:
            print("TAKEN_OVER", exc.reason, flush=True)
            return 3
        except asyncio.TimeoutError:
            pass
        state = conn.state
        await conn.stop()
        print("END", state.value, json.dumps(conn.stats.__dict__), flush=True)
        return 0 if state is ConnectionState.CONNECTED else 1

    sys.exit(asyncio.run(main()))
    """
)


@dataclass
class Proc:
    popen: subprocess.Popen[str]

    def output(self) -> str:
        out, _ = self.popen.communicate(timeout=30)
        return out


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


async def test_two_processes_one_identity_one_stops_instead_of_fighting(
    sandbox: SandboxProcess,
    spawn: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    dev = provision_device(sandbox)
    args = {
        "host": sandbox.info["mqtt_host"],
        "port": sandbox.mqtt_port,
        "client_id": dev.client_id,
        "cert": str(dev.cert_path),
        "key": str(dev.key_path),
        "ca": sandbox.info["ca_file"],
        "duration": 25,
    }
    script = tmp_path / "device.py"
    script.write_text(TAKEOVER_SCRIPT)

    def start() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, str(script), json.dumps(args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        spawn.append(p)
        return p

    first = start()
    assert first.stdout is not None
    line = await asyncio.to_thread(first.stdout.readline)
    assert line.startswith("CONNECTED"), line
    second = start()
    started = time.monotonic()
    loser = None
    while time.monotonic() - started < 40:
        for p in (first, second):
            if p.poll() is not None:
                loser = p
                break
        if loser:
            break
        await asyncio.sleep(0.1)
    assert loser is not None, "both processes still running: they fight"
    out = await asyncio.to_thread(lambda: loser.communicate(timeout=10)[0])
    assert loser.returncode == 3, out
    assert "TAKEN_OVER" in out and dev.client_id in out
    winner = second if loser is first else first
    # the other one keeps (or regains) the session and stays connected to the end
    out = await asyncio.to_thread(lambda: winner.communicate(timeout=60)[0])
    assert winner.returncode == 0, out
    assert "END connected" in out
