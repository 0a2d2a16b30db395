"""The shadow REST data plane: in process (Starlette TestClient, requests signed by
botocore's own SigV4 signer) and against the real sandbox with boto3's ``iot-data`` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from starlette.testclient import TestClient

from iotref.sandbox.app import build_app
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.shadow.service import ShadowService

BASE = "http://testserver"


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.ctx = SandboxContext.open(SandboxSettings(data_dir=tmp))
        self.ctx.http_url = BASE
        self.service = ShadowService(self.ctx, cas=None)
        self.published: list[tuple[str, Any, int, bool]] = []

        async def fake_publish(
            topic: str, payload: bytes, qos: int = 1, retain: bool = False
        ) -> bool:
            try:
                body: Any = json.loads(payload)
            except ValueError:
                body = payload
            self.published.append((topic, body, qos, retain))
            return True

        self.service._publish = fake_publish  # type: ignore[method-assign]
        self.client = TestClient(build_app([self.service]), base_url=BASE)
        self.admin = {"Authorization": f"Bearer {self.ctx.admin_token}"}

    def signed(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        secret: str | None = None,
        region: str = "local",
        service: str = "iotdata",
        params: dict[str, str] | None = None,
    ) -> Any:
        creds = self.service.credentials
        url = BASE + path
        if params:
            url += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items())
        request = AWSRequest(method=method, url=url, data=body)
        SigV4Auth(
            Credentials(creds.access_key_id, secret or creds.secret_access_key), service, region
        ).add_auth(request)
        return self.client.request(method, url, content=body, headers=dict(request.headers))

    def topics(self) -> list[str]:
        return [t for t, *_ in self.published]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    with h.client:
        yield h
    h.ctx.db.close()


def test_admin_token_crud_and_mqtt_messages(harness: Harness) -> None:
    c = harness.client
    r = c.get("/things/t1/shadow", headers=harness.admin)
    assert r.status_code == 404
    assert r.headers["x-amzn-errortype"] == "ResourceNotFoundException:"
    assert r.json()["code"] == 404
    assert r.json()["message"] == "No shadow exists with name: 't1'"

    body = {"state": {"desired": {"color": "red"}}, "clientToken": "rest-1"}
    r = c.post("/things/t1/shadow", json=body, headers=harness.admin)
    assert r.status_code == 200, r.text
    accepted = r.json()
    assert accepted["state"] == {"desired": {"color": "red"}}
    assert accepted["version"] == 1
    assert accepted["clientToken"] == "rest-1"
    assert harness.topics() == [
        "$aws/things/t1/shadow/update/accepted",
        "$aws/things/t1/shadow/update/delta",
        "$aws/things/t1/shadow/update/documents",
    ]
    assert harness.published[0][1] == accepted
    assert harness.published[1][1]["state"] == {"color": "red"}
    assert harness.published[2][1]["current"]["version"] == 1
    assert all(qos == 1 for *_, qos, _retain in harness.published)

    r = c.get("/things/t1/shadow", headers=harness.admin)
    assert r.status_code == 200
    got = r.json()
    assert got["state"] == {"desired": {"color": "red"}, "delta": {"color": "red"}}
    assert got["version"] == 1

    harness.published.clear()
    r = c.delete("/things/t1/shadow", headers=harness.admin)
    assert r.status_code == 200
    assert set(r.json()) == {"version", "timestamp"}
    assert r.json()["version"] == 1
    assert harness.topics() == ["$aws/things/t1/shadow/delete/accepted"]
    assert c.get("/things/t1/shadow", headers=harness.admin).status_code == 404
    assert c.delete("/things/t1/shadow", headers=harness.admin).status_code == 404

    r = c.post("/things/t1/shadow", json={"state": {"reported": {"a": 1}}}, headers=harness.admin)
    assert r.json()["version"] == 2, "a re-created shadow continues the version numbers"


@pytest.mark.parametrize(
    ("body", "status", "error_type", "message"),
    [
        (b"nope", 400, "InvalidRequestException", "Invalid JSON"),
        (b"{}", 400, "InvalidRequestException", "Missing required node: state"),
        (b'{"state": 1}', 400, "InvalidRequestException", "State node must be an object"),
        (
            b'{"state": {"desired": {"a": "\xff"}}}',
            415,
            "UnsupportedDocumentEncodingException",
            "Unsupported documented encoding; supported encoding is UTF-8",
        ),
        (
            json.dumps({"state": {"desired": {"a": "x" * 9000}}}).encode(),
            413,
            "RequestEntityTooLargeException",
            "The payload exceeds the maximum size allowed",
        ),
        (
            # 8 KB for desired and reported together, not each (metadata does not count)
            json.dumps(
                {"state": {"desired": {"a": "x" * 4500}, "reported": {"a": "x" * 4500}}}
            ).encode(),
            413,
            "RequestEntityTooLargeException",
            "The payload exceeds the maximum size allowed",
        ),
        (
            json.dumps({"state": {"desired": {"a": 1}}, "version": 7}).encode(),
            409,
            "ConflictException",
            "Version conflict",
        ),
    ],
)
def test_update_errors(
    harness: Harness, body: bytes, status: int, error_type: str, message: str
) -> None:
    r = harness.client.post("/things/t2/shadow", content=body, headers=harness.admin)
    assert r.status_code == status
    assert r.headers["x-amzn-errortype"] == error_type + ":"
    assert r.json()["message"] == message
    assert r.json()["code"] == status
    assert harness.published == [], "REST errors are not published on MQTT"


def test_named_shadows_and_listing(harness: Harness) -> None:
    c = harness.client
    for name in ("zeta", "alpha", "mid"):
        r = c.post(
            "/things/t3/shadow",
            params={"name": name},
            json={"state": {"reported": {"n": name}}},
            headers=harness.admin,
        )
        assert r.status_code == 200
    assert "$aws/things/t3/shadow/name/zeta/update/accepted" in harness.topics()
    r = c.get("/things/t3/shadow", params={"name": "mid"}, headers=harness.admin)
    assert r.json()["state"] == {"reported": {"n": "mid"}}
    r = c.get("/things/t3/shadow", headers=harness.admin)
    assert r.status_code == 404
    r = c.get("/things/t3/shadow", params={"name": "nothere"}, headers=harness.admin)
    assert r.json()["message"] == "No shadow exists with name: 'nothere'"
    url = "/api/things/shadow/ListNamedShadowsForThing/t3"
    r = c.get(url, headers=harness.admin)
    assert r.json()["results"] == ["alpha", "mid", "zeta"]
    page = c.get(url, params={"pageSize": "2"}, headers=harness.admin).json()
    assert page["results"] == ["alpha", "mid"]
    rest = c.get(
        url, params={"pageSize": "2", "nextToken": page["nextToken"]}, headers=harness.admin
    ).json()
    assert rest["results"] == ["zeta"]
    assert "nextToken" not in rest
    # A token is a position among the names: any shadow name is one, nothing else is.
    after_m = c.get(url, params={"nextToken": "m"}, headers=harness.admin).json()
    assert after_m["results"] == ["mid", "zeta"]
    bad = c.get(url, params={"nextToken": "not/a-name"}, headers=harness.admin)
    assert (bad.status_code, bad.json()["message"]) == (400, "Invalid nextToken")
    assert c.get(url, params={"pageSize": "0"}, headers=harness.admin).status_code == 400
    assert c.get(url.replace("t3", "nobody"), headers=harness.admin).json()["results"] == []


def test_bad_names_are_400(harness: Harness) -> None:
    r = harness.client.get("/things/bad%20name/shadow", headers=harness.admin)
    assert r.status_code == 400
    assert r.headers["x-amzn-errortype"] == "InvalidRequestException:"
    r = harness.client.get("/things/t/shadow", params={"name": "a/b"}, headers=harness.admin)
    assert r.status_code == 400
    r = harness.client.head("/things/t/shadow", headers=harness.admin)
    assert r.status_code == 404


def test_authentication(harness: Harness) -> None:
    c = harness.client
    assert c.get("/things/t4/shadow").status_code == 403
    r = c.get("/things/t4/shadow", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403
    assert r.headers["x-amzn-errortype"] == "ForbiddenException:"
    assert harness.signed("GET", "/things/t4/shadow").status_code == 404
    assert harness.signed("GET", "/things/t4/shadow", secret="wrong-secret").status_code == 403
    assert harness.signed("GET", "/things/t4/shadow", region="us-east-1").status_code == 403
    assert harness.signed("GET", "/things/t4/shadow", service="iot").status_code == 403
    body = json.dumps({"state": {"desired": {"x": 1}}}).encode()
    r = harness.signed("POST", "/things/t4/shadow", body, params={"name": "cfg"})
    assert r.status_code == 200, r.text
    # a signature covers the body: the same headers with another body are refused
    creds = harness.service.credentials
    request = AWSRequest(method="POST", url=BASE + "/things/t4/shadow", data=body)
    SigV4Auth(
        Credentials(creds.access_key_id, creds.secret_access_key), "iotdata", "local"
    ).add_auth(request)
    r = harness.client.post(
        "/things/t4/shadow", content=body.replace(b"1", b"2"), headers=dict(request.headers)
    )
    assert r.status_code == 403


def test_publish(harness: Harness) -> None:
    topic = "$aws/things/t5/shadow/update"
    r = harness.signed(
        "POST", "/topics/" + quote(topic, safe=""), b'{"hello": 1}', params={"qos": "1"}
    )
    assert r.status_code == 200, r.text
    assert harness.published == [(topic, {"hello": 1}, 1, False)]
    r = harness.client.post("/topics/a/b", params={"qos": "2"}, content=b"x", headers=harness.admin)
    assert r.status_code == 400
    r = harness.client.post(
        "/topics/a/%2B", params={"qos": "0"}, content=b"x", headers=harness.admin
    )
    assert r.status_code == 400
    r = harness.client.post(
        "/topics/a/b", params={"retain": "true"}, content=b"x", headers=harness.admin
    )
    assert r.status_code == 200
    assert harness.published[-1] == ("a/b", b"x", 0, True)


def test_thing_registered_event_sets_send_telemetry(harness: Harness) -> None:
    class Thing:
        client_id = "iotref-00000000000000000001"

    harness.client.portal.call(lambda: harness.ctx.events.emit("thing_registered", thing=Thing()))
    r = harness.client.get(f"/things/{Thing.client_id}/shadow", headers=harness.admin)
    assert r.json()["state"]["desired"] == {"sendTelemetryData": True}
    assert f"$aws/things/{Thing.client_id}/shadow/update/delta" in harness.topics()


def test_describe_and_persistent_credentials(tmp_path: Path) -> None:
    first = Harness(tmp_path)
    info = first.service.describe()
    assert info["aws_region"] == "local"
    assert info["aws_access_key_id"].startswith("AKIA")
    first.ctx.db.close()
    second = Harness(tmp_path)
    assert second.service.describe() == info
    second.ctx.db.close()


# --------------------------------------------------------------------------- real sandbox


@pytest.fixture(scope="module")
def iot_data(sandbox: Any) -> Any:
    info = sandbox.info
    return boto3.client(
        "iot-data",
        endpoint_url=info["http_url"],
        region_name=info["aws_region"],
        aws_access_key_id=info["aws_access_key_id"],
        aws_secret_access_key=info["aws_secret_access_key"],
        config=Config(retries={"max_attempts": 1}),
    )


def _payload(response: dict[str, Any]) -> Any:
    return json.loads(response["payload"].read())


@pytest.mark.integration
def test_boto3_shadow_round_trip(iot_data: Any) -> None:
    thing = f"boto-{int(time.time() * 1000)}"
    with pytest.raises(ClientError) as info:
        iot_data.get_thing_shadow(thingName=thing)
    assert info.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    doc = {"state": {"desired": {"speed": 5}}, "clientToken": "boto"}
    accepted = _payload(iot_data.update_thing_shadow(thingName=thing, payload=json.dumps(doc)))
    assert accepted["state"] == {"desired": {"speed": 5}}
    assert accepted["version"] == 1
    assert accepted["clientToken"] == "boto"
    got = _payload(iot_data.get_thing_shadow(thingName=thing))
    assert got["state"]["delta"] == {"speed": 5}

    with pytest.raises(ClientError) as info:
        iot_data.update_thing_shadow(
            thingName=thing, payload=json.dumps({"state": {"desired": {"speed": 6}}, "version": 9})
        )
    assert info.value.response["Error"]["Code"] == "ConflictException"
    assert info.value.response["Error"]["Message"] == "Version conflict"
    with pytest.raises(ClientError) as info:
        iot_data.update_thing_shadow(thingName=thing, payload=b"{oops")
    assert info.value.response["Error"]["Code"] == "InvalidRequestException"
    with pytest.raises(ClientError) as info:
        iot_data.update_thing_shadow(
            thingName=thing, payload=json.dumps({"state": {"reported": {"x": "y" * 9000}}})
        )
    assert info.value.response["Error"]["Code"] == "RequestEntityTooLargeException"

    for name in ("b-config", "a-settings"):
        iot_data.update_thing_shadow(
            thingName=thing, shadowName=name, payload=json.dumps({"state": {"reported": {}}})
        )
    listed = iot_data.list_named_shadows_for_thing(thingName=thing)
    assert listed["results"] == ["a-settings", "b-config"]
    named = _payload(iot_data.get_thing_shadow(thingName=thing, shadowName="b-config"))
    assert named["version"] == 1

    deleted = _payload(iot_data.delete_thing_shadow(thingName=thing))
    assert deleted["version"] == 1
    with pytest.raises(ClientError) as info:
        iot_data.delete_thing_shadow(thingName=thing)
    assert info.value.response["Error"]["Code"] == "ResourceNotFoundException"
    again = _payload(
        iot_data.update_thing_shadow(
            thingName=thing, payload=json.dumps({"state": {"reported": {"a": 1}}})
        )
    )
    assert again["version"] == 2

    iot_data.publish(topic=f"boto/{thing}/hello", qos=1, payload=b"hi")


@pytest.mark.integration
def test_boto3_wrong_secret_is_refused(sandbox: Any) -> None:
    info = sandbox.info
    client = boto3.client(
        "iot-data",
        endpoint_url=info["http_url"],
        region_name=info["aws_region"],
        aws_access_key_id=info["aws_access_key_id"],
        aws_secret_access_key="not-the-secret",
        config=Config(retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as err:
        client.get_thing_shadow(thingName="anything")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert err.value.response["Error"]["Code"] == "ForbiddenException"
