"""Reliability scenarios of the outbox, with ``iotref run`` and its shipped defaults on a
provisioned certificate store, against a sandbox of their own:

* damaged outbox: 300 messages queued (by a run that stopped, or by one that was killed),
  the outbox damaged (database or WAL cut to 0 bytes, WAL cut to half, database replaced
  by garbage, header overwritten), then ``iotref run --stdin`` with 20 new messages;
* oversize message: ``iotref run --stdin`` fed 500 messages of which 5 are 200 KB, with an
  outbox left by an earlier run holding 10 messages of which 2 are for a topic the broker
  refuses (PUBACK 0x87) and 1 is over the limit.

Counted from outside: an independent subscriber (operator identity, platform listener) and
the platform's store (``telemetry.db``), by ``sendereventuuid``; what is left in the outbox
is read after the run. Figures recorded for ``docs/reliability.md``
(:mod:`tests.reliability.report`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.token_store import TokenStore
from iotref.device.telemetry.messages import Asset, AssetType, to_json
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME, Outbox
from iotref.protocol.limits import MAX_PAYLOAD_BYTES
from iotref.protocol.topics import telemetry_topic
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from tests.reliability.harness import (
    Platform,
    stored_telemetry,
)
from tests.reliability.scenarios import order_violations
from tests.support.cli_process import run_iotref
from tests.support.counted_messages import status_message
from tests.support.figures import record
from tests.support.onboarding import logged_in, provision_store, store_properties, store_topic
from tests.support.telemetry_watcher import TelemetryWatcher
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

QUEUED = 300
FIRST_RUN = 150
NEW = 20
FED = 500
OVERSIZE_EVERY = 100


@pytest.fixture(scope="module")
def onboarding(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Environment, TokenStore]:
    return logged_in(platform.process, tmp_path_factory.mktemp("outbox-home") / "tokens")


def new_store(onboarding: tuple[Environment, TokenStore], path: Path) -> Path:
    return provision_store(*onboarding, path, "Outbox scenario press")


def run_stdin(store: Path, lines: list[str]) -> subprocess.CompletedProcess[str]:
    """``iotref run --stdin`` fed ``lines``, to its end."""
    text = "\n".join(lines) + "\n"
    return run_iotref("run", "--store", str(store), "--stdin", input=text, timeout=300)


def queue(ob: Outbox, topic: str, messages: list[dict[str, Any]]) -> None:
    for m in messages:
        ob.append(topic, to_json(m), m["sendereventuuid"])


# --------------------------------------------------------------------------- damaged outbox


def _truncate(name: str, fraction: float = 0.0) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        target = store / name
        os.truncate(target, int(target.stat().st_size * fraction))

    return damage


def _garbage_file(store: Path) -> None:
    (store / OUTBOX_FILE_NAME).write_bytes(os.urandom(400_000))


def _garbage_header(store: Path) -> None:
    with (store / OUTBOX_FILE_NAME).open("r+b") as handle:
        handle.write(os.urandom(100))


DAMAGES: dict[str, tuple[str, bool, Callable[[Path], None]]] = {
    # kind: (what was done, left by a crash, how)
    "db-zero": ("database cut to 0 bytes after a clean stop", False, _truncate(OUTBOX_FILE_NAME)),
    "wal-zero": (
        "WAL cut to 0 bytes after a crash",
        True,
        _truncate(f"{OUTBOX_FILE_NAME}-wal"),
    ),
    "wal-half": (
        "WAL cut to half after a crash",
        True,
        _truncate(f"{OUTBOX_FILE_NAME}-wal", 0.5),
    ),
    "garbage-file": ("database replaced by 400 KB of random bytes", False, _garbage_file),
    "garbage-header": ("database's first 100 bytes overwritten", False, _garbage_header),
}


def leave_queue(store: Path, asset: Asset, *, crashed: bool) -> list[dict[str, Any]]:
    """300 messages queued in the store's outbox: by a run that stopped, or (``crashed``)
    150 by a run that stopped and 150 by one that was killed (those only in the WAL)."""
    messages = [status_message(asset, n) for n in range(1, QUEUED + 1)]
    topic = store_topic(store)
    if not crashed:
        with Outbox(store / OUTBOX_FILE_NAME) as ob:
            queue(ob, topic, messages)
        return messages
    scratch = store.parent / f"{store.name}-build"
    scratch.mkdir()
    with Outbox(scratch / OUTBOX_FILE_NAME) as ob:
        queue(ob, topic, messages[:FIRST_RUN])
    ob = Outbox(scratch / OUTBOX_FILE_NAME)
    queue(ob, topic, messages[FIRST_RUN:])
    for f in scratch.iterdir():  # while it is open: what a SIGKILL leaves
        shutil.copy2(f, store / f.name)
    ob.close()
    shutil.rmtree(scratch)
    return messages


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_outbox(
    kind: str, platform: Platform, onboarding: tuple[Environment, TokenStore], tmp_path: Path
) -> None:
    detail, crashed, damage = DAMAGES[kind]
    store = new_store(onboarding, tmp_path / "store")
    client_id = store_properties(store)["client_id"]
    asset = Asset(f"queued-{kind}", "SN-Q", AssetType.SHEETFED_PRESS)
    fresh = Asset(f"new-{kind}", "SN-N", AssetType.SHEETFED_PRESS)
    queued = leave_queue(store, asset, crashed=crashed)
    damage(store)
    watcher = TelemetryWatcher(store_topic(store))
    watcher.attach(platform.info)
    try:
        new = [status_message(fresh, n) for n in range(1, NEW + 1)]
        done = run_stdin(store, [json.dumps(m) for m in new])
        warnings = [line for line in done.stderr.splitlines() if "outbox was damaged" in line]
        said = re.search(r"recovered (\d+)", warnings[0]) if warnings else None
        recovered = int(said.group(1)) if said else -1
        queued_uuids = [m["sendereventuuid"] for m in queued]
        new_uuids = {m["sendereventuuid"] for m in new}

        def arrived() -> set[str]:
            return {u for _, _, u in watcher.snapshot()}

        wait_until(lambda: new_uuids <= arrived(), 60, "the new messages")
        wait_until(lambda: len(arrived() & set(queued_uuids)) >= max(recovered, 0), 60, "the queue")
        received = watcher.snapshot()
    finally:
        watcher.detach()
    stored = stored_telemetry(platform.data_dir, client_id)
    wait_until(
        lambda: new_uuids <= stored_telemetry(platform.data_dir, client_id).uuids,
        60,
        "the platform's store",
    )
    stored = stored_telemetry(platform.data_dir, client_id)
    delivered_queue = [u for u in queued_uuids if u in {x for _, _, x in received}]
    with Outbox(store / OUTBOX_FILE_NAME) as ob:
        left = ob.depth
    kept = sorted(
        p.name for p in store.glob(f"{OUTBOX_FILE_NAME}.damaged-*") if p.suffix != ".json"
    )
    status = run_iotref("status", "--store", str(store))
    figures = {
        "scenario": "damaged outbox",
        "damage": kind,
        "detail": detail,
        "queued": QUEUED,
        "recovered_said": recovered,
        "delivered_from_queue": len(delivered_queue),
        "stored_from_queue": len(set(queued_uuids) & stored.uuids),
        "lost": QUEUED - len(delivered_queue),
        "new_fed": NEW,
        "new_delivered": len(new_uuids & {u for _, _, u in received}),
        "order_violations": order_violations(received),
        "duplicates_stored": stored.rows - stored.distinct,
        "left_in_outbox": left,
        "kept_files": len(kept),
        "warning_lines": len(warnings),
        "exit_code": done.returncode,
        "status_reports_it": status.returncode == 1 and "[outbox_damaged]" in status.stdout,
    }
    record("outbox_scenario", figures)
    assert done.returncode == 0, done.stderr
    assert len(warnings) == 1, done.stderr
    assert "Traceback" not in done.stderr
    # every message the device said it recovered arrived: the first ones of the queue
    assert delivered_queue == queued_uuids[:recovered], figures
    assert figures["stored_from_queue"] == recovered, figures
    assert figures["new_delivered"] == NEW and figures["order_violations"] == 0, figures
    assert left == 0 and kept and figures["status_reports_it"], figures
    assert stored.rows == stored.distinct, figures


# --------------------------------------------------------------------------- oversize


def test_oversize_message(
    platform: Platform, onboarding: tuple[Environment, TokenStore], tmp_path: Path
) -> None:
    store = new_store(onboarding, tmp_path / "store")
    client_id = store_properties(store)["client_id"]
    topic = store_topic(store)
    foreign = telemetry_topic(TELEMETRY_TOPIC, "another-org", "another-device")
    earlier = Asset("earlier-run", "SN-E", AssetType.SHEETFED_PRESS)
    seeded = [status_message(earlier, n) for n in range(1, 11)]
    oversize_seeded = seeded[5]
    oversize_seeded["payload"]["signalstatus"]["deviceinfo"]["statusdetails"] = "x" * 200_000
    with Outbox(store / OUTBOX_FILE_NAME) as ob:  # an earlier run (or version) left these
        for n, m in enumerate(seeded, 1):
            ob.append(foreign if n in (3, 8) else topic, to_json(m), m["sendereventuuid"])
    refused_seeded = {seeded[i]["sendereventuuid"] for i in (2, 5, 7)}

    asset = Asset("stdin-press", "SN-S", AssetType.SHEETFED_PRESS)
    fed = [status_message(asset, n) for n in range(1, FED + 1)]
    for n in range(OVERSIZE_EVERY, FED + 1, OVERSIZE_EVERY):
        fed[n - 1]["payload"]["signalstatus"]["deviceinfo"]["statusdetails"] = "y" * 200_000
    oversize = {m["sendereventuuid"] for m in fed if len(to_json(m)) > MAX_PAYLOAD_BYTES}
    watcher = TelemetryWatcher(topic)
    watcher.attach(platform.info)
    try:
        done = run_stdin(store, [json.dumps(m) for m in fed])
        expected = {m["sendereventuuid"] for m in [*seeded, *fed]} - oversize - refused_seeded

        def arrived() -> set[str]:
            return {u for _, _, u in watcher.snapshot()}

        wait_until(lambda: expected <= arrived(), 60, "every valid message")
        received = watcher.snapshot()
    finally:
        watcher.detach()
    wait_until(
        lambda: expected <= stored_telemetry(platform.data_dir, client_id).uuids,
        60,
        "the platform's store",
    )
    stored = stored_telemetry(platform.data_dir, client_id)
    refused_lines = [line for line in done.stderr.splitlines() if "message too large" in line]
    with Outbox(store / OUTBOX_FILE_NAME) as ob:
        left = ob.depth
        kept = [json.loads(r.payload)["sendereventuuid"] for r in ob.refused_records()]
        reasons = sorted(
            {
                "PUBACK 0x87" if "0x87" in r.reason else "over the limit, never sent"
                for r in ob.refused_records()
            }
        )
    arrived_uuids = {u for _, _, u in received}
    figures = {
        "scenario": "oversize message",
        "fed": FED,
        "oversize_fed": len(oversize),
        "refused_at_send": len(refused_lines),
        "sizes_named": all(re.search(r"[\d,]+ bytes encoded", line) for line in refused_lines),
        "seeded": len(seeded),
        "refused_by_platform_kept": len(kept),
        "refusal_reasons": reasons,
        "delivered": len(arrived_uuids & expected),
        "expected": len(expected),
        "lost": len(expected - arrived_uuids),
        "oversize_delivered": len(arrived_uuids & (oversize | refused_seeded)),
        "stored": len(stored.uuids & expected),
        "duplicates_stored": stored.rows - stored.distinct,
        "order_violations": order_violations(received),
        "left_in_outbox": left,
        "exit_code": done.returncode,
    }
    record("outbox_scenario", figures)
    assert done.returncode == 3, done.stderr  # input was refused (exit 3); the run went on
    assert figures["refused_at_send"] == len(oversize) == FED // OVERSIZE_EVERY, figures
    assert figures["sizes_named"], refused_lines
    assert set(kept) == refused_seeded, figures
    assert figures["lost"] == 0 and figures["oversize_delivered"] == 0, figures
    assert figures["stored"] == len(expected) and figures["order_violations"] == 0, figures
    assert left == 0 and stored.rows == stored.distinct, figures
