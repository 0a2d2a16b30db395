"""The monitor page in a real browser (Playwright driving Debian's Chromium) against the
real sandbox: refused without the token; opened with it; a device's messages appear live;
an invalid message is flagged with its path and reason; switching ``sendTelemetryData``
off on the page changes the shadow's desired state and stops a running sender (the
device runtime: Connection + ShadowSync + Telemetry), switching it on resumes it.

Screenshots of each step go to ``test-artifacts/monitor/``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from bench.bench_ingestion import device_messages

from tests.support.browser import chromium
from tests.support.cli_process import start_iotref
from tests.support.device_connection import device_settings, publish_acknowledged
from tests.support.device_keys import DeviceFiles
from tests.support.monitor_api import wait_received
from tests.support.mqtt_probe import device_probe, device_topic
from tests.support.onboarding import client_id_of, logged_in, machine_of, provision_store
from tests.support.sandbox_process import SandboxProcess
from tests.support.shadow_rest import desired_state
from tests.support.tokens import provision_device
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "monitor"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium() as instance:
        yield instance


@contextmanager
def browser_tab(browser: Any, width: int, height: int) -> Iterator[Any]:
    """A page in its own context; fails if the page's script threw."""
    # The page's CSP forbids eval; Playwright's wait_for_function needs it for its own
    # predicates, so the test context bypasses CSP (the page's code never evals).
    context = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=True)
    errors: list[str] = []
    tab = context.new_page()
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, errors


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    with browser_tab(browser, 1400, 1000) as tab:
        yield tab


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_monitor(page: Any, sandbox: SandboxProcess) -> None:
    page.goto(f"{sandbox.http_url}/monitor?token={sandbox.admin_token}")
    assert page.url == f"{sandbox.http_url}/monitor"  # the token is gone from the URL
    page.wait_for_selector("#connection[data-state='live']", timeout=10_000)


def test_page_without_token_is_refused(page: Any, sandbox: SandboxProcess) -> None:
    answer = page.goto(f"{sandbox.http_url}/monitor")
    assert answer.status == 401
    assert page.locator("h1").inner_text() == "Token required"
    shot(page, "01-refused-without-token")
    answer = page.goto(f"{sandbox.http_url}/monitor?token=wrong")
    assert answer.status == 401
    api = page.request.get(f"{sandbox.http_url}/monitor/api/summary")
    assert api.status == 401
    assert api.json()["error"] == "unauthorized"


def test_messages_appear_live_and_invalid_ones_are_flagged(
    page: Any, sandbox: SandboxProcess
) -> None:
    device = provision_device(sandbox)
    topic = device_topic(device)
    open_monitor(page, sandbox)
    row = page.locator(f'#devices tr[data-client-id="{device.client_id}"]')
    row.wait_for(timeout=10_000)  # provisioned devices are listed before they send
    shot(page, "02-opened-with-token")
    row.click()
    page.wait_for_selector("#device-panel:not([hidden])")
    stream = page.locator("#stream li.message")
    with device_probe(sandbox, device) as probe:
        for payload in device_messages(5, "live"):
            assert probe.publish(topic, payload) == 0
            time.sleep(0.15)
        page.wait_for_function("document.querySelectorAll('#stream li.valid').length >= 5")
        assert stream.count() == 5
        shot(page, "03-messages-live")

        bad = json.loads(device_messages(1, "bad")[0])
        bad["payload"]["signalstatus"]["deviceinfo"]["speed"] = "fast"
        probe.publish(topic, json.dumps(bad))
        probe.publish(topic, b'{"headerversion": 3, "sendereventuuid": "x"')
    page.wait_for_function("document.querySelectorAll('#stream li.invalid').length >= 2")
    flagged = page.locator("#stream li.invalid")
    texts = flagged.all_inner_texts()
    assert any("$.payload.signalstatus.deviceinfo.speed" in t and "number" in t for t in texts), (
        texts
    )
    assert any("invalid JSON" in t for t in texts), texts
    page.wait_for_function("document.querySelector('#device-counters .bad b').textContent === '2'")
    # JSON on demand
    flagged.nth(1).locator(".line").click()
    pre = flagged.nth(1).locator("pre.json")
    pre.wait_for()
    page.wait_for_function(
        "(el) => !el.textContent.startsWith('loading')", arg=pre.element_handle()
    )
    assert '"speed": "fast"' in pre.inner_text()
    shot(page, "04-invalid-flagged")


def off_the_page_loop(coroutine: Any) -> Any:
    """Run a device's coroutine on a thread of its own (Playwright's sync API keeps an
    event loop running on this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=60)


def test_a_device_over_the_quota_shows_what_aws_would_have_throttled(
    page: Any, sandbox: SandboxProcess
) -> None:
    """A device publishing as fast as the library lets it (no pacing): its card shows the
    rate against the quota and the publishes AWS IoT Core would have throttled, live, as
    the device's record counts them; a device under the quota shows none."""
    fast, slow = provision_device(sandbox), provision_device(sandbox)
    open_monitor(page, sandbox)
    page.locator(f'#devices tr[data-client-id="{fast.client_id}"]').click()
    page.wait_for_selector("#device-quota-throttled")
    assert page.locator("#device-quota-throttled b").inner_text() == "0"
    assert page.locator("#device-quota-rate b").inner_text().endswith("/ 100")
    off_the_page_loop(publish_acknowledged(sandbox, fast, device_messages(600, "fast")))
    record = wait_received(sandbox, fast.client_id, 600)
    throttled = record["quota"]["throttled"]
    assert throttled > 0
    page.wait_for_function(
        "(n) => document.querySelector('#device-quota-throttled b').textContent === n",
        arg=f"{throttled:,}",
        timeout=10_000,
    )
    assert "bad" in (page.locator("#device-quota-throttled").get_attribute("class") or "")
    row_text = page.locator(f'#devices tr[data-client-id="{fast.client_id}"] .sub').inner_text()
    assert f"{throttled:,} over quota" in row_text
    shot(page, "07-over-the-quota")

    page.locator(f'#devices tr[data-client-id="{slow.client_id}"]').click()
    off_the_page_loop(
        publish_acknowledged(sandbox, slow, device_messages(30, "slow"), pace_s=1 / 30)
    )
    wait_received(sandbox, slow.client_id, 30)
    page.wait_for_function(
        "(id) => document.querySelector('#device-title').textContent === id",
        arg=slow.client_id,
    )
    # Its figures have arrived (a busiest second above 0), and nothing is over the quota.
    page.wait_for_function(
        "!document.querySelector('#device-quota-rate').title.includes('busiest second 0;')",
        timeout=10_000,
    )
    assert page.locator("#device-quota-throttled b").inner_text() == "0"
    assert "bad" not in (page.locator("#device-quota-throttled").get_attribute("class") or "")
    shot(page, "08-under-the-quota")


class RunningSender(threading.Thread):
    """A device built from the device runtime: connects, syncs its shadow and sends a
    Status message every 100 ms through Telemetry, gated by sendTelemetryData."""

    def __init__(self, sandbox: SandboxProcess, device: DeviceFiles, tmp: Path) -> None:
        super().__init__(daemon=True)
        self.sandbox = sandbox
        self.device = device
        self.tmp = tmp
        self.sent = 0
        self.dropped = 0
        self.permission: bool | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(20)

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        from iotref.device.connection.connection import Connection
        from iotref.device.shadow.sync import ShadowSync
        from iotref.device.telemetry.messages import (
            Asset,
            AssetType,
            DeviceStatusV2,
            Sender,
            SenderType,
            StatusV2,
            build_message,
        )
        from iotref.device.telemetry.outbox import Outbox
        from iotref.device.telemetry.permission import ShadowPermission
        from iotref.device.telemetry.publisher import Telemetry
        from iotref.device.telemetry.results import SendStatus

        settings = device_settings(self.sandbox.info, self.device)
        sender = Sender(SenderType.PRESS, "monitor-test", "1.0")
        asset = Asset("press-sender", "SN-S", AssetType.SHEETFED_PRESS)
        topic = device_topic(self.device)
        async with (
            Connection(settings) as conn,
            ShadowSync(conn, self.device.client_id) as shadow,
        ):
            with Outbox(self.tmp / "outbox.sqlite3") as outbox:
                tel = Telemetry(
                    conn, outbox, topic, permission=ShadowPermission(shadow), policy="drop"
                )
                self.ready.set()
                index = 0
                while not self._halt.is_set():
                    self.permission = tel.permission
                    message = build_message(
                        sender,
                        asset,
                        StatusV2(
                            status=DeviceStatusV2.PRODUCTION,
                            speed=9000.0 + (index % 40) * 25,
                            totalproductioncounter=50_000.0 + index,
                            productioncounter=float(index),
                        ),
                    )
                    result = await tel.send(message)
                    if result.status is SendStatus.DROPPED_NO_PERMISSION:
                        self.dropped += 1
                    else:
                        self.sent += 1
                    index += 1
                    await asyncio.sleep(0.1)
                await tel.close(max_wait=5, drain=True)


def received(page: Any) -> int:
    text = page.locator("#device-counters div:first-child b").inner_text()
    return int(text.replace(",", ""))


def test_switching_send_telemetry_stops_and_resumes_a_running_sender(
    page: Any, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    device = provision_device(sandbox)
    sender = RunningSender(sandbox, device, tmp_path)
    sender.start()
    try:
        assert sender.ready.wait(30), "sender did not start"
        assert sender.error is None, sender.error
        open_monitor(page, sandbox)
        row = page.locator(f'#devices tr[data-client-id="{device.client_id}"]')
        row.wait_for(timeout=10_000)
        row.click()
        page.wait_for_function("document.querySelectorAll('#stream li.valid').length >= 10")
        toggle = page.locator("#send-telemetry")
        assert toggle.is_checked()
        page.wait_for_function(
            "document.getElementById('send-telemetry-state').textContent.includes('reports on')"
        )
        shot(page, "05-sender-running")

        page.locator("label.switch").click()  # off
        wait_until(
            lambda: desired_state(sandbox, device.client_id).get("sendTelemetryData") is False,
            10,
            "desired.sendTelemetryData false",
        )
        wait_until(lambda: sender.permission is False, 10, "the sender to lose permission")
        time.sleep(1.0)  # what was in flight arrives
        count_off = received(page)
        dropped_before = sender.dropped
        time.sleep(2.5)
        assert sender.dropped > dropped_before, "the sender kept being allowed"
        assert received(page) == count_off, "messages kept arriving with the permission off"
        assert not toggle.is_checked()
        page.wait_for_function(
            "document.getElementById('send-telemetry-state').textContent.includes('reports off')"
        )
        shot(page, "06-sender-stopped")

        page.locator("label.switch").click()  # on again
        wait_until(
            lambda: desired_state(sandbox, device.client_id).get("sendTelemetryData") is True,
            10,
            "desired.sendTelemetryData true",
        )
        wait_until(lambda: received(page) >= count_off + 5, 15, "messages after switching on")
        assert toggle.is_checked()
        shot(page, "07-sender-resumed")

        # The desired-state editor: invalid JSON is refused before anything is sent.
        page.locator("#desired-details summary").click()
        editor = page.locator("#desired-editor")
        editor.fill('{"sendTelemetryData": true, "color": ')
        assert "not JSON" in page.locator("#desired-validity").inner_text()
        assert page.locator("#desired-save").is_disabled()
        editor.fill('{"sendTelemetryData": true, "color": "green"}')
        page.wait_for_function(
            "document.getElementById('desired-validity').textContent.includes('valid shadow')"
        )
        page.locator("#desired-save").click()
        wait_until(
            lambda: desired_state(sandbox, device.client_id).get("color") == "green",
            10,
            "desired.color",
        )
        page.wait_for_function(
            "document.getElementById('shadow-desired').textContent.includes('green')"
        )
        shot(page, "08-desired-edited")
    finally:
        sender.stop()
    assert sender.error is None, sender.error


# --------------------------------------------------------------------------- real presses

VIEWPORTS = [(1280, 800), (1440, 900)]
KEY_CONTROLS = {
    "device counts": "#device-counts",
    "machine chart": "#chart-speed",
    "chart metric buttons": "#metric",
    "asset legend": "#asset-legend",
    "sendTelemetryData switch": "label.switch",
    "invalid-only filter": "label:has(#invalid-only)",
    "pause": "#pause",
    "clear": "#clear",
}
FIT = """(controls) => {
  const width = window.innerWidth;
  const outside = [];
  for (const [name, selector] of Object.entries(controls)) {
    const node = document.querySelector(selector);
    const r = node ? node.getBoundingClientRect() : null;
    if (!r || r.width === 0) outside.push(`${name}: not shown`);
    else if (r.left < 0 || r.right > width) outside.push(`${name}: ${r.left}..${r.right}`);
  }
  const stream = document.getElementById("stream");
  const edge = stream.getBoundingClientRect().right + 0.5;
  for (const part of stream.querySelectorAll(".line > *, .summary > *")) {
    const r = part.getBoundingClientRect();
    if (r.right > edge) outside.push(`stream ${part.className}: right ${r.right} > ${edge}`);
  }
  if (stream.scrollWidth > stream.clientWidth) outside.push("stream scrolls sideways");
  return {scrollWidth: document.scrollingElement.scrollWidth, width, outside};
}"""
SERIES = """() => Array.from(document.querySelectorAll("#chart-speed g.series"), (g) => ({
  asset: g.dataset.asset,
  runs: Number(g.dataset.runs),
  points: Number(g.dataset.points),
  moves: (g.querySelector("path.line").getAttribute("d").match(/M/g) || []).length,
}))"""


@pytest.fixture
def store(sandbox: SandboxProcess, tmp_path: Path) -> Path:
    """A complete certificate store for a new machine. Made on a thread of its own: the
    blocking onboarding refuses to run inside Playwright's event loop."""

    def make() -> Path:
        env, tokens = logged_in(sandbox, tmp_path / "tokens")
        return provision_store(env, tokens, tmp_path / "store", "Client test press")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(make).result(timeout=120)


def run_presses(store_path: Path, assets: int, *args: str) -> subprocess.Popen[str]:
    """``iotref run`` with simulated presses: a reading every 0.2 s from each asset."""
    return start_iotref(
        "run", "--store", str(store_path), "--assets", str(assets), "--interval", "0.2",
        "--speedup", "20", "--status-every", "1", *args,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], *, terminate: bool = False) -> None:
    if terminate and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "outbox empty" in out.splitlines()[-1], out


def select_device(page: Any, sandbox: SandboxProcess, client_id: str) -> None:
    open_monitor(page, sandbox)
    row = page.locator(f'#devices tr[data-client-id="{client_id}"]')
    row.wait_for(timeout=10_000)
    row.click()
    page.wait_for_selector("#device-panel:not([hidden])")


def stored_runs(sandbox: SandboxProcess, client_id: str) -> dict[str, int]:
    """Per asset, the runs of readings the platform stored (telemetry.db): a new run after
    a silence longer than five of the asset's usual intervals and at least 2 s."""
    db = sandbox.data_dir / "telemetry.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT assetid, received_at FROM telemetry_messages WHERE client_id = ? AND "
            "speed IS NOT NULL ORDER BY id",
            (client_id,),
        ).fetchall()
    times: dict[str, list[float]] = {}
    for asset, at in rows:
        times.setdefault(asset, []).append(at)
    runs = {}
    for asset, ts in times.items():
        ts.sort()
        steps = sorted(b - a for a, b in itertools.pairwise(ts) if b > a)
        gap = max(5 * steps[len(steps) // 2], 2.0) if steps else 2.0
        runs[asset] = 1 + sum(1 for a, b in itertools.pairwise(ts) if b - a > gap)
    return runs


def stored_points(sandbox: SandboxProcess, client_id: str) -> dict[str, int]:
    db = sandbox.data_dir / "telemetry.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT assetid, COUNT(*) FROM telemetry_messages WHERE client_id = ? AND "
            "speed IS NOT NULL GROUP BY assetid",
            (client_id,),
        ).fetchall()
    return dict(rows)


def test_the_page_fits_with_the_asset_ids_iotref_run_produces(
    browser: Any,
    sandbox: SandboxProcess,
    store: Path,
) -> None:
    client_id = client_id_of(store)
    presses = [f"{machine_of(store)}-press-{i}" for i in (1, 2, 3)]
    proc = run_presses(store, 3, "--duration", "120")
    try:
        for width, height in VIEWPORTS:
            with browser_tab(browser, width, height) as tab:
                select_device(tab, sandbox, client_id)
                tab.wait_for_function(
                    "new Set(Array.from(document.querySelectorAll('#stream .asset'),"
                    " (a) => a.title)).size >= 3 &&"
                    " document.querySelectorAll('#chart-speed g.series').length === 3",
                    timeout=20_000,
                )
                shot(tab, f"09-three-presses-{width}x{height}")
                fit = tab.evaluate(FIT, KEY_CONTROLS)
                assert fit["scrollWidth"] <= width, fit
                assert fit["outside"] == [], fit
                # Long ids are shortened on the page; the full id is the chip's title.
                chips = tab.eval_on_selector_all(
                    "#stream .asset", "(els) => els.map((e) => [e.title, e.textContent])"
                )
                assert {title for title, _ in chips} == set(presses)
                for title, text in chips:
                    assert text == "…" + title[title.index("press-") :], (title, text)
                legend = tab.eval_on_selector_all(
                    "#asset-legend .asset", "(els) => els.map((e) => e.title)"
                )
                assert legend == presses
    finally:
        finish(proc, terminate=True)


def test_machine_chart_draws_one_line_per_asset_and_leaves_gaps_open(
    browser: Any,
    sandbox: SandboxProcess,
    store: Path,
) -> None:
    client_id = client_id_of(store)
    press = [f"{machine_of(store)}-press-{i}" for i in (1, 2, 3)]
    finish(run_presses(store, 3, "--duration", "3"))
    with browser_tab(browser, 1440, 900) as tab:
        select_device(tab, sandbox, client_id)
        tab.wait_for_function("document.querySelectorAll('#chart-speed g.series').length === 3")
        first = {s["asset"]: s for s in tab.evaluate(SERIES)}
        assert sorted(first) == press
        time.sleep(4)  # silence: a gap of several seconds at 5 readings per second
        finish(run_presses(store, 2, "--duration", "3"))  # presses 1 and 2 only, seen live
        expected_points = stored_points(sandbox, client_id)
        tab.wait_for_function(
            "(want) => Array.from(document.querySelectorAll('#chart-speed g.series'))"
            ".every((g) => Number(g.dataset.points) === want[g.dataset.asset])",
            arg=expected_points,
            timeout=15_000,
        )
        shot(tab, "10-chart-per-asset-with-gap")
        runs = stored_runs(sandbox, client_id)
        assert runs[press[0]] >= 2 and runs[press[1]] >= 2, runs  # the pause is a gap
        assert runs[press[2]] < runs[press[0]], runs  # press 3 was silent in the 2nd run
        for view in ("live", "reloaded"):
            if view == "reloaded":  # the same from the API's series on a fresh load
                select_device(tab, sandbox, client_id)
                tab.wait_for_function(
                    "document.querySelectorAll('#chart-speed g.series').length === 3"
                )
            series = {s["asset"]: s for s in tab.evaluate(SERIES)}
            assert sorted(series) == press, series
            for asset, s in series.items():
                # One subpath per run: no straight line bridges a gap.
                assert s["runs"] == s["moves"] == runs[asset], (view, asset, s, runs)
                assert s["points"] == expected_points[asset], (view, asset, s)
        legend = tab.eval_on_selector_all(
            "#asset-legend .asset", "(els) => els.map((e) => e.title)"
        )
        assert legend == press
        # Another metric: the same assets, each on the same scale.
        tab.locator("#metric button[data-metric='totalproductioncounter']").click()
        assert tab.locator("#metric button[aria-pressed='true']").inner_text() == "total counter"
        assert "total counter" in tab.locator("#machine-hint").inner_text()
        assert sorted(s["asset"] for s in tab.evaluate(SERIES)) == press
        shot(tab, "11-chart-total-counter")
