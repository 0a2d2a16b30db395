"""The monitor page in a real browser (Playwright driving Debian's Chromium) against the
real sandbox: refused without the token; opened with it; a device's messages appear live;
an invalid message is flagged with its path and reason; switching ``sendTelemetryData``
off on the page changes the shadow's desired state and stops a running sender (the
device runtime: Connection + ShadowSync + Telemetry), switching it on resumes it.

Screenshots of each step go to ``test-artifacts/monitor/``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench.bench_ingestion import device_messages

from iotref.sandbox.broker_config import TELEMETRY_TOPIC
from tests.support.browser import chromium
from tests.support.device_keys import DeviceFiles
from tests.support.mqtt_probe import device_probe
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "monitor"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium() as instance:
        yield instance


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # The page's CSP forbids eval; Playwright's wait_for_function needs it for its own
    # predicates, so the test context bypasses CSP (the page's code never evals).
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    errors: list[str] = []
    tab = context.new_page()
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, errors


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def shadow_desired(sandbox: SandboxProcess, thing: str) -> dict[str, Any]:
    answer = httpx.get(
        f"{sandbox.http_url}/things/{thing}/shadow",
        headers={"Authorization": f"Bearer {sandbox.admin_token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    desired: dict[str, Any] = answer.json()["state"]["desired"]
    return desired


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


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
    topic = f"{TELEMETRY_TOPIC}/{device.org_id}/{device.client_id}"
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
        from iotref.device.connection import Connection, ConnectionSettings
        from iotref.device.messages import (
            Asset,
            AssetType,
            DeviceStatusV2,
            Sender,
            SenderType,
            StatusV2,
            build_message,
        )
        from iotref.device.outbox import Outbox
        from iotref.device.shadow import ShadowSync
        from iotref.device.telemetry import SendStatus, ShadowPermission, Telemetry

        settings = ConnectionSettings(
            endpoint=self.sandbox.info["mqtt_host"],
            port=self.sandbox.mqtt_port,
            client_id=self.device.client_id,
            cert_path=self.device.cert_path,
            key_path=self.device.key_path,
            ca_path=Path(self.sandbox.info["ca_file"]),
        )
        sender = Sender(SenderType.PRESS, "monitor-test", "1.0")
        asset = Asset("press-sender", "SN-S", AssetType.SHEETFED_PRESS)
        topic = f"{TELEMETRY_TOPIC}/{self.device.org_id}/{self.device.client_id}"
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
            lambda: shadow_desired(sandbox, device.client_id).get("sendTelemetryData") is False,
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
            lambda: shadow_desired(sandbox, device.client_id).get("sendTelemetryData") is True,
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
            lambda: shadow_desired(sandbox, device.client_id).get("color") == "green",
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
