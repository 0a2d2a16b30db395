"""Outbox faults against the real sandbox, with the shipped defaults: ``iotref run`` on a
store whose outbox WAL was cut to half says so in one line, keeps the damaged files,
delivers every recovered message and ``iotref status`` reports it; a 200 KB stdin line is
refused at once with its size and the run goes on; messages the broker refuses for good
(PUBACK 0x87) or that awscrt refuses to send are moved to the refused table and the ones
after them are delivered, in order. Deliveries are counted by an independent subscriber."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
    to_json,
)
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME, Outbox
from iotref.device.telemetry.publisher import Telemetry
from iotref.protocol.limits import MAX_PAYLOAD_BYTES
from iotref.protocol.topics import telemetry_topic
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from tests.support.cli_process import start_iotref
from tests.support.counted_messages import index_of
from tests.support.onboarding import store_properties, store_topic
from tests.support.telemetry_watcher import TelemetryWatcher
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SENDER = Sender(SenderType.PRESS, "outbox-faults", "1.0")
QUEUED = 300
FIRST_RUN = 150


def message(asset: Asset, n: int, details: str = "queued earlier") -> dict[str, Any]:
    status = StatusV2(
        status=DeviceStatusV2.PRODUCTION, speed=100, totalproductioncounter=n, statusdetails=details
    )
    return build_message(SENDER, asset, status)


def stdin_line(n: int, details: str = "from stdin") -> str:
    return json.dumps(
        {
            "signalstatus": {
                "deviceinfo": {
                    "status": "Production",
                    "speed": 100,
                    "statusdetails": details,
                    "totalproductioncounter": n,
                }
            }
        }
    )


def crash_with_a_queue(store_path: Path, asset: Asset) -> list[str]:
    """The store's outbox as a crash leaves it: 150 messages queued by a run that
    stopped, 150 more by one that was killed (those only in the WAL). Returns the
    ``sendereventuuid`` of the 300, in order."""
    scratch = store_path.parent / "outbox-build"
    scratch.mkdir()
    topic = store_topic(store_path)
    uuids: list[str] = []

    def queue(ob: Outbox, first: int, last: int) -> None:
        for n in range(first, last + 1):
            m = message(asset, n)
            uuids.append(m["sendereventuuid"])
            ob.append(topic, to_json(m), m["sendereventuuid"])

    ob = Outbox(scratch / OUTBOX_FILE_NAME)
    queue(ob, 1, FIRST_RUN)
    ob.close()
    ob = Outbox(scratch / OUTBOX_FILE_NAME)
    queue(ob, FIRST_RUN + 1, QUEUED)
    for f in scratch.iterdir():  # while it is open: what a SIGKILL leaves
        shutil.copy2(f, store_path / f.name)
    ob.close()
    shutil.rmtree(scratch)
    return uuids


def test_run_recovers_an_outbox_whose_wal_was_cut_to_half(
    store: Path,
    subscriber: TelemetryWatcher,
) -> None:
    asset = Asset(f"recovery-{uuid.uuid4().hex[:8]}", "SN-R", AssetType.SHEETFED_PRESS)
    queued = crash_with_a_queue(store, asset)
    wal = store / f"{OUTBOX_FILE_NAME}-wal"
    os.truncate(wal, wal.stat().st_size // 2)
    half = wal.stat().st_size

    proc = start_iotref("run", "--store", str(store), "--stdin", stdin=subprocess.PIPE)
    out, err = proc.communicate(
        "\n".join(stdin_line(1000 + i) for i in range(5)) + "\n", timeout=120
    )
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "outbox was damaged" in line]
    assert len(warnings) == 1, err  # said once, in one line
    found = re.search(r"recovered (\d+) of (\d+) queued .* kept as (\S+)", warnings[0])
    assert found is not None, warnings[0]
    recovered, expected = int(found.group(1)), int(found.group(2))
    kept = Path(found.group(3).rstrip(";"))
    assert expected == QUEUED and FIRST_RUN < recovered < QUEUED
    assert kept.exists() and kept.name.startswith(f"{OUTBOX_FILE_NAME}.damaged-")
    assert (kept.stat().st_mode & 0o777) == 0o600
    assert kept.with_name(kept.name + "-wal").stat().st_size == half  # kept as it was found

    # Counted by the independent subscriber: the recovered ones are the first of the
    # queue, in order, with their own sendereventuuid; nothing else of it arrived.
    wait_until(lambda: len(subscriber.of(asset.assetid)) >= recovered, 30, "the recovered queue")
    arrived = [m["sendereventuuid"] for _, m in subscriber.of(asset.assetid)]
    assert arrived == queued[:recovered]
    assert [index_of(m) for _, m in subscriber.of(asset.assetid)] == list(range(1, recovered + 1))
    machine = store_properties(store)["machine_id"]
    wait_until(lambda: len(subscriber.of(f"{machine}-press-1")) >= 5, 30, "the new stdin messages")
    assert "outbox empty" in out.splitlines()[-1], out

    status = start_iotref("status", "--store", str(store))
    report, status_err = status.communicate(timeout=60)
    assert status.returncode == 1, report + status_err
    assert "[outbox_damaged]" in report and f"recovered {recovered} of {QUEUED}" in report
    assert str(kept) in report
    assert "outbox       0 message(s) queued" in report


def test_run_refuses_an_oversize_stdin_line_at_once_and_goes_on(
    store: Path,
    subscriber: TelemetryWatcher,
) -> None:
    lines = [stdin_line(1), stdin_line(2, details="x" * 200_000), stdin_line(3)]
    size = len(lines[1])
    proc = start_iotref("run", "--store", str(store), "--stdin", stdin=subprocess.PIPE)
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=60)
    assert proc.returncode == 3, err  # input was refused; the run went on
    refused = [line for line in err.splitlines() if line.startswith("iotref: stdin line")]
    assert len(refused) == 1, err
    assert refused[0].startswith("iotref: stdin line 2: message too large: ")
    named = int(re.search(r"too large: ([\d,]+) bytes", refused[0]).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert size < named < size + 2000  # the encoded message: the line plus its header
    assert f"{MAX_PAYLOAD_BYTES:,} bytes" in refused[0]
    summary = out.splitlines()[-1]
    assert "accepted 2," in summary and "too large 1" in summary, summary
    assert "outbox empty" in summary, summary
    machine = store_properties(store)["machine_id"]
    wait_until(lambda: len(subscriber.of(f"{machine}-press-1")) >= 2, 30, "lines 1 and 3")
    assert [index_of(m) for _, m in subscriber.of(f"{machine}-press-1")] == [1, 3]


def test_run_moves_what_the_broker_refuses_for_good_and_delivers_the_rest_in_order(
    store: Path,
    subscriber: TelemetryWatcher,
) -> None:
    asset = Asset(f"refusal-{uuid.uuid4().hex[:8]}", "SN-F", AssetType.SHEETFED_PRESS)
    topic = store_topic(store)
    foreign = telemetry_topic(TELEMETRY_TOPIC, "another-org", "another-device")
    queued: list[tuple[str, dict[str, Any]]] = [
        (foreign if n in (3, 7) else topic, message(asset, n)) for n in range(1, 11)
    ]
    with Outbox(store / OUTBOX_FILE_NAME) as ob:  # left by an earlier run
        for t, m in queued:
            ob.append(t, to_json(m), m["sendereventuuid"])

    proc = start_iotref(
        "run", "--store", str(store), "--stdin", "--status-every", "0.2", stdin=subprocess.PIPE
    )
    out, err = proc.communicate(stdin_line(1) + "\n", timeout=60)
    assert proc.returncode == 0, err
    wait_until(lambda: len(subscriber.of(asset.assetid)) >= 8, 30, "the allowed messages")
    assert [index_of(m) for _, m in subscriber.of(asset.assetid)] == [1, 2, 4, 5, 6, 8, 9, 10]
    assert not [t for t, _ in subscriber.messages if t == foreign]
    summary = out.splitlines()[-1]
    assert "refused by the platform 2" in summary and "outbox empty" in summary, summary
    assert any("refused by platform 2" in line for line in out.splitlines()), out
    with Outbox(store / OUTBOX_FILE_NAME) as ob:
        kept = ob.refused_records()
    assert [json.loads(r.payload)["sendereventuuid"] for r in kept] == [
        queued[2][1]["sendereventuuid"],
        queued[6][1]["sendereventuuid"],
    ]
    assert all("not authorized (0x87)" in r.reason for r in kept)
    status = start_iotref("status", "--store", str(store))
    report, _ = status.communicate(timeout=60)
    assert "outbox       0 message(s) queued, 2 refused by the platform" in report


def test_what_awscrt_refuses_to_send_is_moved_aside(
    store: Path,
    subscriber: TelemetryWatcher,
    tmp_path: Path,
) -> None:
    """The MQTT library's own refusal (the broker's maximum packet size, announced in
    CONNACK): reached only with the publisher's payload check raised above the broker's
    limit, a setting made for this test alone."""
    settings = ConnectionSettings.from_store(store)
    asset = Asset(f"crt-{uuid.uuid4().hex[:8]}", "SN-C", AssetType.SHEETFED_PRESS)

    async def main(ob: Outbox) -> int:
        async with Connection(settings) as conn:
            tel = Telemetry(conn, ob, store_topic(store), max_payload_bytes=1 << 20)
            async with tel:
                for n in range(1, 6):
                    details = "x" * 200_000 if n == 2 else "ok"
                    await tel.send(message(asset, n, details))
                await asyncio.wait_for(_drained(ob), 30)
                return tel.stats().refused

    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        refused = asyncio.run(main(ob))
        (kept,) = ob.refused_records()
    assert refused == 1 and "AWS_ERROR_MQTT5_PACKET_VALIDATION" in kept.reason
    assert index_of(json.loads(kept.payload)) == 2
    wait_until(lambda: len(subscriber.of(asset.assetid)) >= 4, 30, "the other messages")
    assert [index_of(m) for _, m in subscriber.of(asset.assetid)] == [1, 3, 4, 5]


async def _drained(ob: Outbox) -> None:
    while ob.depth:  # noqa: ASYNC110  (the outbox has no event to wait on)
        await asyncio.sleep(0.05)
