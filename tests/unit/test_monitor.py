"""Unit tests of the monitor's HTTP side (auth, CSRF, JSON API, bad input, the stream)
with a real telemetry store and shadow store but no broker, and of ``iotref monitor``'s
stream parsing and formatting."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from iotref.cli.monitor_command import format_event, sse_events, summarize
from iotref.protocol import shadow_document as sd
from iotref.sandbox.app import build_app
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.database import Database
from iotref.sandbox.monitor.access import COOKIE_NAME
from iotref.sandbox.monitor.component import Monitor
from iotref.sandbox.monitor.stream import sse_event
from iotref.sandbox.provisioning.things import ThingRegistry
from iotref.sandbox.shadow.store import ShadowStore
from iotref.sandbox.telemetry.feed import TelemetryFeed, event_of
from iotref.sandbox.telemetry.record_builder import RecordBuilder, ThingDirectory
from iotref.sandbox.telemetry.store import TelemetryStore
from tests.support.ingestion_inputs import CLIENT, ORG, TOPIC, message

TOKEN = "admin-token-for-tests"


class FakeIngestion:
    def __init__(self, store: TelemetryStore) -> None:
        self.store = store
        self.feed = TelemetryFeed()

    def status(self) -> dict[str, Any]:
        return {"subscribed": True, "connections": 1, "topic_filter": "t/#"}


class FakeShadows:
    """The shadow service's update path without MQTT."""

    def __init__(self, db: Database) -> None:
        self.store = ShadowStore(db)
        self.updates: list[bytes] = []

    async def update(self, thing: str, shadow: str | None, payload: bytes) -> dict[str, Any]:
        self.updates.append(payload)
        now = int(time.time())
        request = sd.parse_update(payload)
        outcome = sd.apply_update(self.store.get(thing, shadow), request, now)
        self.store.put(thing, shadow, outcome.document, now)
        return outcome.accepted


class FakeDirectory:
    def pending_authorizations(self) -> list[dict[str, Any]]:
        return [
            {
                "user_code": "12345678",
                "created_at": "2026-01-01T00:00:00Z",
                "expires_at": "2026-01-01T00:15:00Z",
                "verification_uri_complete": "http://testserver/device?user_code=12345678",
            }
        ]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, FakeShadows, TelemetryStore]]:
    db = Database(tmp_path / "sandbox.db")
    ctx = SandboxContext(
        settings=SandboxSettings(data_dir=tmp_path),
        db=db,
        admin_token=TOKEN,
        http_url="http://testserver",
    )
    things = ThingRegistry(db)
    things.register(
        client_id=CLIENT,
        org_id=ORG,
        site_id="site-1",
        certificate_pem="-----BEGIN CERTIFICATE-----\n",
        serial=1,
        not_after=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc),
    )
    store = TelemetryStore(tmp_path / "telemetry.db")
    shadows = FakeShadows(db)
    monitor = Monitor(ctx, FakeIngestion(store), shadows, FakeDirectory(), things)  # type: ignore[arg-type]
    with TestClient(build_app([monitor]), follow_redirects=False) as client:
        yield client, shadows, store
    store.close()
    db.close()


def login(client: TestClient) -> str:
    answer = client.get(f"/monitor?token={TOKEN}")
    assert answer.status_code == 303
    page = client.get("/monitor")
    assert page.status_code == 200
    marker = 'name="csrf-token" content="'
    start = page.text.index(marker) + len(marker)
    return page.text[start : page.text.index('"', start)]


def test_page_without_token_is_refused_with_html(setup: Any) -> None:
    client, _, _ = setup
    answer = client.get("/monitor")
    assert answer.status_code == 401
    assert answer.headers["content-type"].startswith("text/html")
    assert "Token required" in answer.text
    wrong = client.get("/monitor?token=<script>alert(1)</script>")
    assert wrong.status_code == 401
    assert "<script>" not in wrong.text
    assert COOKIE_NAME not in wrong.headers.get("set-cookie", "")


def test_token_link_sets_a_strict_httponly_cookie_and_redirects(setup: Any) -> None:
    client, _, _ = setup
    answer = client.get(f"/monitor?token={TOKEN}")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/monitor"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
    assert TOKEN not in cookie
    page = client.get("/monitor")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "{{CSRF_TOKEN}}" not in page.text
    assert TOKEN not in page.text


def test_api_needs_auth_and_answers_json(setup: Any) -> None:
    client, _, _ = setup
    for path in ("/monitor/api/summary", "/monitor/api/stream", f"/monitor/api/devices/{CLIENT}"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert answer.json()["error"] == "unauthorized"
    bearer = client.get("/monitor/api/summary", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200
    wrong = client.get("/monitor/api/summary", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_summary_lists_provisioned_and_unknown_devices(setup: Any) -> None:
    client, _, store = setup
    builder = RecordBuilder(TelemetryStoreFree.validator(), ThingDirectory({CLIENT: ORG}.get))
    store.write_batch(
        [
            builder.build(TOPIC, message(), time.time()),
            builder.build(f"connectprint/telemetry/{ORG}/iotref-stranger", b"{}", time.time()),
        ]
    )
    login(client)
    body = client.get("/monitor/api/summary").json()
    devices = {d["client_id"]: d for d in body["devices"]}
    assert devices[CLIENT]["known"] is True
    assert devices[CLIENT]["online"] is True
    assert devices[CLIENT]["valid"] == 1
    assert devices["iotref-stranger"]["known"] is False
    assert devices["iotref-stranger"]["topic_problem"] == "unknown client id iotref-stranger"
    assert body["totals"]["received"] == 2
    assert body["pending_authorizations"][0]["user_code"] == "12345678"


class TelemetryStoreFree:
    @staticmethod
    def validator() -> Any:
        from iotref.protocol.message_schemas import MessageValidator

        return MessageValidator()


def test_device_messages_and_message_json(setup: Any) -> None:
    client, _, store = setup
    builder = RecordBuilder(TelemetryStoreFree.validator(), ThingDirectory({CLIENT: ORG}.get))
    [(_, row_id)] = store.write_batch([builder.build(TOPIC, b'{"x": 1}', time.time())])
    login(client)
    device = client.get(f"/monitor/api/devices/{CLIENT}").json()
    assert device["messages"][0]["valid"] is False
    assert device["messages"][0]["errors"]
    assert len(device["rate"]) == 300
    one = client.get(f"/monitor/api/messages/{row_id}").json()
    assert json.loads(one["body"]) == {"x": 1}
    assert client.get("/monitor/api/messages/999999").status_code == 404
    assert client.get(f"/monitor/api/messages/{2**70}").status_code == 404
    assert client.get("/monitor/api/messages/abc").status_code == 404
    assert client.get("/monitor/api/devices/iotref-nobody").status_code == 404


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=abc", "limit=100000", "before=-1", "invalid=maybe"],
)
def test_bad_query_parameters_are_400_json(setup: Any, query: str) -> None:
    client, _, _ = setup
    login(client)
    answer = client.get(f"/monitor/api/devices/{CLIENT}/messages?{query}")
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"


def test_post_needs_csrf_token_with_the_cookie(setup: Any) -> None:
    client, shadows, _ = setup
    csrf = login(client)
    path = f"/monitor/api/devices/{CLIENT}/send-telemetry"
    missing = client.post(path, json={"enabled": False})
    assert missing.status_code == 403
    assert missing.json()["error"] == "csrf_failed"
    foreign = client.post(
        path,
        json={"enabled": False},
        headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
    )
    assert foreign.status_code == 403
    ok = client.post(path, json={"enabled": False}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200, ok.text
    assert ok.json()["shadow"]["desired"] == {"sendTelemetryData": False}
    assert json.loads(shadows.updates[-1]) == {"state": {"desired": {"sendTelemetryData": False}}}
    shadow = client.get(f"/monitor/api/devices/{CLIENT}/shadow").json()
    assert shadow["version"] == 1
    assert shadow["desired"] == {"sendTelemetryData": False}


def test_bearer_post_needs_no_csrf(setup: Any) -> None:
    client, _, _ = setup
    answer = client.post(
        f"/monitor/api/devices/{CLIENT}/send-telemetry",
        json={"enabled": True},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (b'{"enabled": "yes"}', 400),
    ],
)
def test_send_telemetry_bad_bodies(setup: Any, body: bytes, status: int) -> None:
    client, _, _ = setup
    csrf = login(client)
    answer = client.post(
        f"/monitor/api/devices/{CLIENT}/send-telemetry",
        content=body,
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert answer.status_code == status
    assert "error" in answer.json()


def test_desired_editor_updates_validate_with_the_shadow_rules(setup: Any) -> None:
    client, shadows, _ = setup
    csrf = login(client)
    headers = {"X-CSRF-Token": csrf}
    base = f"/monitor/api/devices/{CLIENT}/shadow"
    deep: Any = {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}
    too_deep = client.post(f"{base}/validate", json={"desired": deep}, headers=headers)
    assert too_deep.status_code == 400
    assert too_deep.json()["message"] == sd.MSG_TOO_DEEP
    not_object = client.post(base, json={"desired": [1]}, headers=headers)
    assert not_object.status_code == 400
    missing = client.post(base, json={}, headers=headers)
    assert missing.status_code == 400
    big = client.post(base, json={"desired": {"x": "y" * 9000}}, headers=headers)
    assert big.status_code == 413
    null_in_array = client.post(base, json={"desired": {"x": [None]}}, headers=headers)
    assert null_in_array.status_code == 400
    nan = client.post(
        base, content=b'{"desired": {"x": NaN}}', headers={**headers, "content-type": "x"}
    )
    assert nan.status_code == 400
    assert not shadows.updates
    fine = client.post(f"{base}/validate", json={"desired": {"color": "red"}}, headers=headers)
    assert fine.json()["ok"] is True
    saved = client.post(base, json={"desired": {"color": "red"}, "version": 0}, headers=headers)
    assert saved.status_code == 200, saved.text
    assert saved.json()["shadow"]["version"] == 1
    conflict = client.post(base, json={"desired": {"color": "blue"}, "version": 0}, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["message"] == sd.MSG_VERSION_CONFLICT


def test_shadow_actions_need_a_provisioned_device(setup: Any) -> None:
    client, _, _ = setup
    csrf = login(client)
    answer = client.post(
        "/monitor/api/devices/iotref-nobody/send-telemetry",
        json={"enabled": True},
        headers={"X-CSRF-Token": csrf},
    )
    assert answer.status_code == 404
    bad = client.post(
        "/monitor/api/devices/bad%20id/send-telemetry",
        json={"enabled": True},
        headers={"X-CSRF-Token": csrf},
    )
    assert bad.status_code == 400


def test_assets_are_served_and_unknown_ones_are_404(setup: Any) -> None:
    client, _, _ = setup
    js = client.get("/monitor/assets/monitor.js")
    assert js.status_code == 200
    assert js.headers["content-type"].startswith("text/javascript")
    assert ".innerHTML" not in js.text
    assert "insertAdjacentHTML" not in js.text
    assert client.get("/monitor/assets/index.html").status_code == 404
    assert client.get("/monitor/assets/..%2fmonitor.py").status_code == 404
    assert client.get("/monitor/assets/nope.js").status_code == 404


def test_stream_bad_parameters(setup: Any) -> None:
    client, _, _ = setup
    login(client)
    assert client.get("/monitor/api/stream?device=a%20b").status_code == 400
    assert client.get("/monitor/api/stream?invalid_only=perhaps").status_code == 400


def test_sse_event_is_one_json_line() -> None:
    text = sse_event("message", {"a": "line\nbreak </script>"}, "7")
    assert text.startswith("id: 7\nevent: message\ndata: ")
    assert text.endswith("\n\n")
    assert text.count("\n") == 4


# --------------------------------------------------------------------------- CLI


def test_sse_parser() -> None:
    lines = [
        "retry: 2000",
        "",
        ": keepalive",
        "",
        "id: 1",
        "event: message",
        'data: {"a": 1}',
        "",
        "event: stats",
        "data: {}",
        "",
    ]
    assert list(sse_events(iter(lines))) == [("message", '{"a": 1}'), ("stats", "{}")]


def test_format_event_marks_valid_and_invalid() -> None:
    builder = RecordBuilder(TelemetryStoreFree.validator(), ThingDirectory({CLIENT: ORG}.get))
    good = event_of(builder.build(TOPIC, message(speed=12.0, counter=3), 1.0), 1)
    [(line, style)] = format_event(good)
    assert "✓" in line
    assert CLIENT in line
    assert "speed 12" in line
    assert style == {}
    bad = event_of(builder.build(TOPIC, b'{"headerversion": 3}', 1.0), 2)
    lines = format_event(bad)
    assert "✗" in lines[0][0]
    assert lines[1][0].strip().startswith("$.")
    assert "more" in lines[-1][0]
    assert summarize({"valid": False}) == "invalid message"


def test_schema_invalid_json_is_called_invalid_not_unreadable() -> None:
    """Well-formed JSON that is not a telemetry message is invalid, with its first issue;
    only a body that is not JSON is unreadable (the monitor called both unreadable)."""
    builder = RecordBuilder(TelemetryStoreFree.validator(), ThingDirectory({CLIENT: ORG}.get))
    invalid = event_of(builder.build(TOPIC, b'{"hello": "world"}', 1.0), 1)
    head = format_event(invalid)[0][0]
    assert "unreadable" not in head
    assert "invalid message ($" in head
    first = invalid["errors"][0]
    assert f"{first['path']}: {first['reason']}" in head
    garbage = event_of(builder.build(TOPIC, b"{not json", 1.0), 2)
    assert "unreadable message (invalid JSON" in format_event(garbage)[0][0]


def test_absurdly_nested_body_is_400(setup: Any) -> None:
    client, _, _ = setup
    csrf = login(client)
    answer = client.post(
        f"/monitor/api/devices/{CLIENT}/shadow",
        content=b'{"desired": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"
