"""The client facade without a broker: options, store errors, raw payloads, typed errors,
what works before start and after close, the outbox lock, and ``iotref run``'s offline
parts (store errors, status lines)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from iotref.cli.main import cli
from iotref.cli.run_command import EndOfInputDrain
from iotref.cli.run_status import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    RunCounters,
    duration_text,
    exit_code_of,
    status_renderable,
    status_text,
    summary_text,
)
from iotref.device.blocking import Client
from iotref.device.client import AsyncClient
from iotref.device.connection.state import ConnectionState
from iotref.device.errors import (
    ClientClosed,
    ClientError,
    InvalidMessageError,
    IotrefError,
    OutboxBusy,
    OutboxFullError,
    SendRefused,
    StoreError,
)
from iotref.device.loop_thread import LoopThread
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PROPERTIES_FILE,
    ROOT_CA_FILE,
)
from iotref.device.options import ClientOptions, ClientStats
from iotref.device.raw_payload import RawPayload, as_payload
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    Sender,
    SenderType,
    StatusV2,
    build_message,
)
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME, Outbox
from iotref.protocol.message_schemas import ValidationIssue, default_validator

PROPERTIES = {
    "mqtt_endpoint": "localhost",
    "mqtt_port": 1,
    "machine_region": "",
    "telemetry_topic": "connectprint/telemetry",
    "client_id": "iotref-unit",
    "org_id": "org-1",
    "machine_id": "machine-1",
    "site_id": "site-1",
}


def fake_store(path: Path) -> Path:
    """A complete-looking store (the PEM files are never read: no connection is made)."""
    path.mkdir(parents=True)
    (path / PROPERTIES_FILE).write_text(json.dumps(PROPERTIES))
    for name in (ROOT_CA_FILE, CERTIFICATE_FILE, PRIVATE_KEY_FILE):
        (path / name).write_text("not used\n")
    return path


def test_options_defaults_and_checks() -> None:
    o = ClientOptions()
    assert (o.policy, o.overflow, o.durability, o.drain_on_close) == (
        "hold",
        "reject_new",
        "process",
        True,
    )
    with pytest.raises(ValueError, match="policy"):
        ClientOptions(policy="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        ClientOptions(port=70000)
    with pytest.raises(ValueError, match="max_backoff_s"):
        ClientOptions(min_backoff_s=5, max_backoff_s=1)
    # Publishes are paced under AWS IoT Core's per-connection quotas unless turned off.
    assert (o.publish_rate_limit, o.throughput_limit) == (100.0, 512 * 1024)
    with pytest.raises(ValueError, match="publish_rate_limit must be 0"):
        ClientOptions(publish_rate_limit=-5)


def test_from_store_reads_identity_and_options(tmp_path: Path) -> None:
    store = fake_store(tmp_path / "store")
    client = AsyncClient.from_store(store, policy="drop", port=443, alpn=True)
    assert client.client_id == "iotref-unit"
    assert client.topic == "connectprint/telemetry/org-1/iotref-unit"
    assert client.outbox_path == store / OUTBOX_FILE_NAME
    assert client.settings.port == 443 and client.settings.alpn
    assert client.options.policy == "drop"
    # The sender's site comes from the store when the sender names none.
    assert client.sender.siteid == "site-1"
    named = Sender(SenderType.PRESS, "gw", "2.0", siteid="elsewhere")
    assert AsyncClient.from_store(store, sender=named).sender.siteid == "elsewhere"
    options = ClientOptions(max_messages=10)
    assert AsyncClient.from_store(store, options=options, window=5).options.max_messages == 10
    # The connection gets the quotas it paces to; 0 turns pacing off.
    assert (client.settings.publish_rate_limit, client.settings.throughput_limit) == (
        100.0,
        512 * 1024,
    )
    unpaced = AsyncClient.from_store(store, publish_rate_limit=0, throughput_limit=0)
    assert unpaced.settings.publish_rate_limit is None
    assert unpaced.settings.throughput_limit is None


def test_missing_or_incomplete_store_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as missing:
        AsyncClient.from_store(tmp_path / "nothing")
    assert "iotref provision" in (missing.value.next_step or "")
    store = fake_store(tmp_path / "store")
    (store / PRIVATE_KEY_FILE).unlink()
    with pytest.raises(StoreError, match=PRIVATE_KEY_FILE):
        Client.from_store(store)


def test_errors_are_iotref_errors() -> None:
    issue = ValidationIssue("$.payload", "required property is missing")
    error = InvalidMessageError([issue, issue])
    assert isinstance(error, SendRefused) and isinstance(error, ValueError)
    assert isinstance(error, IotrefError) and error.issues == (issue, issue)
    assert "$.payload" in str(error) and "1 more" in str(error)
    full = OutboxFullError("the outbox is full", depth=3)
    assert isinstance(full, ClientError) and full.depth == 3 and full.next_step
    for cls in (ClientClosed, OutboxBusy):
        assert issubclass(cls, ClientError)


def test_raw_payload_builds_a_valid_message() -> None:
    body = {
        "signalstatus": {
            "deviceinfo": {
                "status": "Idle",
                "speed": 0,
                "statusdetails": "",
                "totalproductioncounter": 1,
            }
        }
    }
    payload = RawPayload(body)
    assert (payload.eventtype, payload.eventsubtype, payload.payloadversion) == (
        "generic.signal",
        "Status",
        2,
    )
    # One class for every kind of raw payload: the kind is in the fields.
    other = RawPayload({}, eventtype="generic.event", eventsubtype="Alarm", payloadversion=1)
    assert type(other) is RawPayload
    assert (other.eventtype, other.eventsubtype, other.payloadversion) == (
        "generic.event",
        "Alarm",
        1,
    )
    message = build_message(
        Sender(SenderType.SYSTEM, "t", "1"), Asset("a", "s", AssetType.CUTTER), payload
    )
    assert (message["eventtype"], message["eventsubtype"], message["payloadversion"]) == (
        "generic.signal",
        "Status",
        2,
    )
    assert default_validator().validate(message) == []
    # The payload keeps the keys it was made with (a shallow copy of the body).
    body["signalstatus"] = {"deviceinfo": {"status": "Bogus"}}
    again = build_message(
        Sender(SenderType.SYSTEM, "t", "1"), Asset("a", "s", AssetType.CUTTER), payload
    )
    assert again["payload"]["signalstatus"]["deviceinfo"]["status"] == "Idle"
    bogus = build_message(
        Sender(SenderType.SYSTEM, "t", "1"), Asset("a", "s", AssetType.CUTTER), RawPayload(body)
    )
    assert default_validator().validate(bogus)
    with pytest.raises(TypeError):
        RawPayload([1, 2])  # type: ignore[arg-type]


def test_what_send_accepts_as_a_payload() -> None:
    status = StatusV2(status="Idle", speed=0, totalproductioncounter=1)
    assert as_payload(status) is status
    assert as_payload(status, 2) is status
    with pytest.raises(ValueError, match="payloadversion=1 given with a version 2 payload"):
        as_payload(status, 1)
    plain = as_payload({"signalstatus": {}})
    assert isinstance(plain, RawPayload) and plain.payloadversion == 2
    assert as_payload({"signalstatus": {}}, 1).payloadversion == 1


def test_not_started_and_closed(tmp_path: Path) -> None:
    store = fake_store(tmp_path / "store")

    async def main() -> None:
        client = AsyncClient.from_store(store)
        asset = Asset("a", "s", AssetType.CUTTER)
        with pytest.raises(ClientClosed, match="not started"):
            await client.send(asset, {"signalstatus": {}})
        with pytest.raises(ClientClosed):
            _ = client.shadow
        stats = client.stats()
        assert isinstance(stats, ClientStats)
        assert stats.state is ConnectionState.STOPPED and not stats.connected
        final = await client.close()
        assert final.accepted == 0
        # Every way to send refuses alike once closed.
        channel = client.asset(asset)
        for attempt in (
            client.send(asset, {}),
            client.send_many(asset, [{}, {}]),
            client.send_message({}),
            client.send_messages([{}]),
            channel.send({}),
            channel.send_many([{}]),
        ):
            with pytest.raises(ClientClosed, match="closed"):
                await attempt
        assert await client.close() is final

    asyncio.run(main())


def test_a_second_sender_on_the_same_store_is_refused_before_connecting(tmp_path: Path) -> None:
    store = fake_store(tmp_path / "store")

    async def main() -> None:
        with Outbox(store / OUTBOX_FILE_NAME):
            client = AsyncClient.from_store(store)
            with pytest.raises(OutboxBusy) as busy:
                await client.start()
            assert "only one process" in (busy.value.next_step or "")
            assert client.stats().state is ConnectionState.STOPPED

    asyncio.run(main())


def test_blocking_client_start_failure_leaves_no_thread(tmp_path: Path) -> None:
    store = fake_store(tmp_path / "store")
    before = set(threading.enumerate())
    with Outbox(store / OUTBOX_FILE_NAME):
        client = Client.from_store(store)
        with pytest.raises(OutboxBusy):
            client.start()
    for thread in set(threading.enumerate()) - before:
        thread.join(5)
        assert not thread.is_alive(), thread
    blocking = Client.from_store(store)
    asset = Asset("a", "s", AssetType.CUTTER)
    for attempt in (
        lambda: blocking.send(asset, {}),
        lambda: blocking.send_many(asset, [{}]),
        lambda: blocking.send_message({}),
        lambda: blocking.send_messages([{}]),
        lambda: blocking.asset(asset).send({}),
        lambda: blocking.asset(asset).send_many([{}]),
    ):
        with pytest.raises(ClientClosed, match="not started"):
            attempt()


def test_loop_thread_refuses_calls_from_its_own_thread() -> None:
    runner = LoopThread("test-loop")
    try:

        async def inner() -> int:
            return 1

        async def outer() -> str:
            coro = inner()
            try:
                runner.call(coro)
            except RuntimeError as exc:
                return str(exc)
            return "no error"

        assert "own thread" in runner.call(outer())
        assert runner.call(inner()) == 1
    finally:
        runner.stop()
    assert not runner.thread.is_alive()
    with pytest.raises(ClientClosed):
        runner.call(asyncio.sleep(0))


# --------------------------------------------------------------------------- iotref run


def test_run_without_a_store_says_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "--store", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "no certificate store" in result.output and "iotref provision" in result.output


def test_run_with_a_broken_store_says_what_to_do(tmp_path: Path) -> None:
    store = fake_store(tmp_path / "store")
    (store / PROPERTIES_FILE).write_text("{broken")
    result = CliRunner().invoke(cli, ["run", "--store", str(store), "--duration", "0"])
    assert result.exit_code == 1
    assert "not valid JSON" in result.output and "iotref provision" in result.output


def stats(**changes: object) -> ClientStats:
    values: dict[str, object] = dict(
        state=ConnectionState.CONNECTED,
        connected=True,
        permission=True,
        policy="hold",
        shadow_synced=True,
        accepted=10,
        dropped_no_permission=1,
        published=9,
        republished=0,
        acked=9,
        queued=1,
        held=0,
        in_flight=1,
        dropped_overflow=2,
        rejected_full=0,
        rejected_invalid=0,
        oldest_age_s=0.1,
        ack_rate=5.0,
        connects=1,
        disconnects=0,
        last_error=None,
    )
    values.update(changes)
    return ClientStats(**values)  # type: ignore[arg-type]


def test_status_and_summary_lines() -> None:
    counters = RunCounters(invalid=4)
    line = status_text(stats(), counters, 3.0)
    for part in (
        "connected",
        "permission yes",
        "accepted 10",
        "acked 9",
        "queued 1",
        "evicted 2",
        "dropped (no permission) 1",
        "invalid 4",
    ):
        assert part in line, line
    assert "sent" not in line and "held" not in line, line
    held = status_text(
        stats(permission=False, held=5, connected=False, state=ConnectionState.DISCONNECTED),
        counters,
        1,
    )
    assert "disconnected" in held and "permission no" in held and "queued 1 (held 5)" in held
    waiting = status_text(
        stats(
            connected=False,
            state=ConnectionState.DISCONNECTED,
            waiting_for_platform=True,
            connection_error="localhost:1 is unreachable (AWS_IO_SOCKET_CONNECTION_REFUSED)",
        ),
        counters,
        1,
    )
    assert "waiting for the platform (localhost:1 is unreachable" in waiting, waiting
    summary = summary_text(stats(), counters, 12.0)
    assert summary.startswith("Stopped after 12.0 s: accepted 10, acked 9, "), summary
    assert "1 left in the outbox: the next run sends them" in summary, summary
    assert "invalid 4" in summary and "evicted (outbox full) 2" in summary, summary


def test_status_line_counts_add_up_with_earlier_runs() -> None:
    # 5 left by an earlier run + 10 accepted now = 12 acked + 3 still queued
    earlier = stats(carried_over=5, accepted=10, acked=12, queued=3, dropped_overflow=0)
    assert earlier.carried_over + earlier.accepted == (
        earlier.acked + earlier.queued + earlier.dropped_overflow
    )
    line = status_text(earlier, RunCounters(), 1.0)
    assert "accepted 10 (+5 from earlier runs) | acked 12 | queued 3" in line, line
    summary = summary_text(earlier, RunCounters(), 1.0)
    assert "accepted 10 (+5 from earlier runs), acked 12, 3 left in the outbox" in summary


def test_end_of_input_drains_while_the_platform_acknowledges() -> None:
    drain = EndOfInputDrain(10.0)
    # Acknowledgements keep coming: the run goes on past the patience, 60 s in all.
    for second in range(60):
        assert drain.goes_on(stats(queued=3000 - 50 * second, acked=50 * second), second)
    # An empty outbox ends it at once.
    assert not drain.goes_on(stats(queued=0, acked=3000), 60.0)
    # No acknowledgement for the patience (platform gone, no permission): it stops.
    stalled = EndOfInputDrain(10.0)
    assert stalled.goes_on(stats(queued=500, acked=100), 0.0)
    assert stalled.goes_on(stats(queued=500, acked=100), 9.9)
    assert not stalled.goes_on(stats(queued=500, acked=100), 10.0)
    # An acknowledgement restarts the patience.
    assert stalled.goes_on(stats(queued=499, acked=101), 10.5)
    assert stalled.goes_on(stats(queued=499, acked=101), 20.4)
    assert not stalled.goes_on(stats(queued=499, acked=101), 20.5)
    # A run with --close-timeout 0 stops at the end of input.
    assert not EndOfInputDrain(0.0, 40.0).goes_on(stats(queued=5, acked=1), 0.0)


def test_end_of_input_waits_for_a_lost_connection_to_come_back() -> None:
    down = {"connected": False, "state": ConnectionState.DISCONNECTED}
    # The connection was up in this run (a broker restart): the reconnect gets its time.
    lost = EndOfInputDrain(10.0, 40.0)
    assert lost.goes_on(stats(queued=600, acked=2400, connects=3, **down), 0.0)
    assert lost.goes_on(stats(queued=600, acked=2400, connects=3, **down), 49.9)
    assert not lost.goes_on(stats(queued=600, acked=2400, connects=3, **down), 50.0)
    # Back and acknowledging: the patience is the plain one again.
    assert lost.goes_on(stats(queued=500, acked=2500, connects=4), 55.0)
    assert not lost.goes_on(stats(queued=500, acked=2500, connects=4), 65.0)
    # Never connected in this run (platform out of reach): no extra wait.
    never = EndOfInputDrain(1.0, 40.0)
    assert never.goes_on(stats(queued=7, acked=0, connects=0, **down), 0.0)
    assert not never.goes_on(stats(queued=7, acked=0, connects=0, **down), 1.0)


def test_a_stopped_client_is_shown_stopped() -> None:
    final = stats(state=ConnectionState.STOPPED, connected=False, queued=0)
    line = status_text(final, RunCounters(), 5.0)
    assert "| stopped |" in line and "connected" not in line, line
    renderable = status_renderable(final, RunCounters(), 5.0)
    assert "stopped" in renderable.plain and "connected" not in renderable.plain


def test_a_backlog_shows_its_drain_rate_and_the_time_left() -> None:
    line = status_text(stats(queued=19_200, ack_rate=96.0, acked=800), RunCounters(), 9.0)
    assert "| queued 19200 | draining 96/s, 3 min 20 s left |" in line, line
    # The last few seconds of a backlog, to the second.
    assert "draining 96/s, 5 s left" in status_text(
        stats(queued=480, ack_rate=96.0), RunCounters(), 1
    )
    # Not a backlog (a steady run's few queued messages), not sending, or no rate yet.
    for quiet in (
        stats(queued=1, ack_rate=5.0),
        stats(queued=100, ack_rate=96.0),  # about one second: not shown
        stats(queued=5000, ack_rate=0.0),
        stats(queued=5000, ack_rate=96.0, permission=False, held=5000),
        stats(queued=5000, ack_rate=96.0, connected=False, state=ConnectionState.DISCONNECTED),
    ):
        assert "draining" not in status_text(quiet, RunCounters(), 1.0)
    # The live terminal line says the same.
    live = status_renderable(stats(queued=19_200, ack_rate=96.0), RunCounters(), 9.0)
    assert "draining 96/s, 3 min 20 s left" in live.plain


def test_throttling_by_the_platform_shows_on_the_status_line() -> None:
    slowed = stats(throttled=3, pace=48.0, slowed=True)
    assert "| throttled by platform 3 (pacing 48/s)" in status_text(slowed, RunCounters(), 1)
    recovered = status_text(stats(throttled=3, pace=96.0), RunCounters(), 1)
    assert "| throttled by platform 3 |" in recovered and "pacing" not in recovered, recovered
    assert "throttled" not in status_text(stats(), RunCounters(), 1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (44.6, "45 s"), (59.4, "59 s"), (60, "1 min 0 s"), (200, "3 min 20 s"),
     (3599, "59 min 59 s"), (3600, "1 h 00 min"), (7530, "2 h 05 min")],
)  # fmt: skip
def test_duration_text(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_exit_codes_say_what_was_refused() -> None:
    final = stats(state=ConnectionState.STOPPED, connected=False)
    assert exit_code_of(final, RunCounters()) == EXIT_OK == 0
    assert exit_code_of(final, RunCounters(dropped=3)) == EXIT_OK  # --policy drop: chosen
    assert exit_code_of(final, RunCounters(invalid=1)) == EXIT_REFUSED == 3
    assert exit_code_of(final, RunCounters(refused_full=1)) == EXIT_REFUSED
    taken = stats(state=ConnectionState.TAKEN_OVER, connected=False)
    assert exit_code_of(taken, RunCounters(invalid=1)) == EXIT_FAILED == 1
    assert exit_code_of(final, RunCounters(refused_taken_over=1)) == EXIT_FAILED
