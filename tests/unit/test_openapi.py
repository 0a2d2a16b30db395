"""The sandbox's OpenAPI description: valid OpenAPI 3.0, Zaikio's schemas reused unchanged,
every route described (the monitor's through its own fragment), errors documented, and
fragments assembled without conflicts."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
import yaml
from starlette.routing import BaseRoute, Route

from iotref.protocol import shadow_document as sd
from iotref.sandbox import openapi, openapi_fragment
from iotref.sandbox.app import build_app
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.directory.openapi import zaikio_description
from iotref.sandbox.directory.service import Directory
from iotref.sandbox.monitor.component import Monitor
from iotref.sandbox.provisioning.things import ThingRegistry
from iotref.sandbox.runner import Sandbox
from iotref.sandbox.shadow.store import ShadowStore
from iotref.sandbox.telemetry.record import Record
from iotref.sandbox.telemetry.store import TelemetryStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ZAIKIO_YAML = Path(__file__).resolve().parents[1] / "data" / "zaikio-directory-v1.openapi.yaml"
# Routes that may go undescribed: none (every component describes its routes).
UNDESCRIBED_PREFIXES: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def sandbox_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[BaseRoute], Any]]:
    """The routes and components of the whole sandbox as the runner makes them (none
    started)."""
    settings = SandboxSettings(data_dir=tmp_path_factory.mktemp("openapi"), http_port=0)
    ctx = SandboxContext.open(settings)
    components = Sandbox(settings)._make_components(ctx)
    yield list(build_app(components).routes), components
    ctx.db.close()


@pytest.fixture(scope="module")
def sandbox_routes(sandbox_app: tuple[list[BaseRoute], Any]) -> list[BaseRoute]:
    return sandbox_app[0]


@pytest.fixture(scope="module")
def document(sandbox_app: tuple[list[BaseRoute], Any]) -> dict[str, Any]:
    """What the whole sandbox serves (without ``servers``)."""
    routes, components = sandbox_app
    return openapi.describe_app(routes, components)


def test_the_fragments_alone_make_a_description(sandbox_app: tuple[list[BaseRoute], Any]) -> None:
    _, components = sandbox_app
    fragments = [*openapi.base_fragments(), *openapi.component_fragments(components)]
    document = openapi.build_description(fragments)
    assert "/things/{thingName}/shadow" in document["paths"]
    assert {"/healthz", "/openapi.json", "/monitor/api/summary"} <= set(document["paths"])


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def test_each_components_fragment_stands_on_its_own(
    sandbox_app: tuple[list[BaseRoute], Any],
) -> None:
    """With the common fragment, a component's fragment resolves every reference it makes
    and names only security schemes it or the common fragment defines: an application of
    that component alone describes itself completely."""
    _, components = sandbox_app
    contributing = [c for c in components if callable(getattr(c, "openapi", None))]
    assert {type(c).__name__ for c in contributing} >= {
        "Directory",
        "Provisioning",
        "BulkProvisioning",
        "ShadowService",
        "Monitor",
    }
    for component in contributing:
        merged = openapi_fragment.merge([openapi_fragment.common_fragment(), component.openapi()])
        label = type(component).__name__
        for reference in _references(merged):
            _, _, kind, name = reference.split("/")
            assert name in merged["components"].get(kind, {}), (label, reference)
        schemes = set(merged["components"]["securitySchemes"])
        for item in merged["paths"].values():
            for op in item.values():
                for requirement in op.get("security", []):
                    assert set(requirement) <= schemes, (label, requirement)


def _openapi_30_metaschema() -> dict[str, Any]:
    definitions = pytest.importorskip("schemathesis.specs.openapi.definitions")
    schema: dict[str, Any] = definitions.OPENAPI_30
    return schema


def test_the_description_is_valid_openapi_30(document: dict[str, Any]) -> None:
    errors = list(jsonschema.Draft4Validator(_openapi_30_metaschema()).iter_errors(document))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    assert document["openapi"].startswith("3.0.")


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    for reference in _references(document):
        assert reference.startswith("#/components/"), reference
        _, _, kind, name = reference.split("/")
        assert name in document["components"].get(kind, {}), reference


def test_the_packaged_zaikio_description_is_the_published_one() -> None:
    assert zaikio_description() == yaml.safe_load(ZAIKIO_YAML.read_text())


def test_zaikio_schemas_are_reused_unchanged(document: dict[str, Any]) -> None:
    zaikio = zaikio_description()["components"]["schemas"]
    for name, schema in zaikio.items():
        assert document["components"]["schemas"][name] == schema, name
    success = {
        ("/api/v1/person", "get"): "Person",
        ("/api/v1/organization", "get"): "Organization",
        ("/api/v1/machines", "post"): "Machine",
        ("/api/v1/machines/{machineId}", "get"): "Machine",
        ("/api/v1/machines/{machineId}/machine_ownership", "get"): "MachineOwnership",
        ("/api/v1/machines/{machineId}/machine_ownership", "post"): "MachineOwnership",
    }
    for (path, method), name in success.items():
        responses = document["paths"][path][method]["responses"]
        code = "201" if method == "post" else "200"
        schema = responses[code]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{name}"}, (path, method)
    sites = document["paths"]["/api/v1/sites"]["get"]["responses"]["200"]
    assert sites["content"]["application/json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/Site"
    }


def test_every_route_is_described_and_every_operation_routed(
    document: dict[str, Any], sandbox_routes: list[BaseRoute]
) -> None:
    served = openapi.served_operations(sandbox_routes)
    described = openapi.described_operations(document)
    undescribed = {op for op in served - described if not op[0].startswith(UNDESCRIBED_PREFIXES)}
    assert not undescribed, sorted(undescribed)
    assert not described - served, sorted(described - served)


def test_every_operation_documents_security_and_errors(document: dict[str, Any]) -> None:
    schemes = set(document["components"]["securitySchemes"])
    for path, item in document["paths"].items():
        for method, op in item.items():
            label = f"{method.upper()} {path}"
            assert "security" in op, label
            for requirement in op["security"]:
                assert set(requirement) <= schemes, label
            assert "operationId" in op, label
            responses = op["responses"]
            # 5xx only where documented on purpose: Publish when the broker is away.
            server_errors = [code for code in responses if code.startswith("5")]
            assert server_errors in ([], ["503"]) and (
                not server_errors or path == "/topics/{topic}"
            ), label
            if op["security"] and {} not in op["security"]:
                assert {"401", "403"} & set(responses), label
            for code, answer in responses.items():
                if "$ref" in answer:
                    answer = document["components"]["responses"][answer["$ref"].split("/")[-1]]
                if code.startswith("4"):
                    assert answer.get("content"), f"{label} {code} has no body"
            if "requestBody" in op:
                assert "413" in responses, label


def test_shadow_errors_carry_the_aws_error_type(document: dict[str, Any]) -> None:
    for path in ("/things/{thingName}/shadow", "/topics/{topic}"):
        for op in document["paths"][path].values():
            for code, answer in op["responses"].items():
                if code.startswith(("4", "5")):
                    name = answer["$ref"].split("/")[-1]
                    headers = document["components"]["responses"][name]["headers"]
                    assert "x-amzn-ErrorType" in headers, (path, code)


def test_operation_ids_are_unique(document: dict[str, Any]) -> None:
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_served_by_an_app_of_some_components_describes_only_those(tmp_path: Path) -> None:
    ctx = SandboxContext.open(SandboxSettings(data_dir=tmp_path))
    try:
        with TestClient(build_app([Directory(ctx)])) as client:
            answer = client.get("/openapi.json")
            assert client.post("/openapi.json").status_code == 405
    finally:
        ctx.db.close()
    assert answer.status_code == 200
    served = answer.json()
    assert served["servers"] == [{"url": "http://testserver"}]
    paths = set(served["paths"])
    assert "/api/v1/machines" in paths
    assert "/oauth/device" in paths
    assert {"/healthz", "/openapi.json"} <= paths
    assert not {p for p in paths if p.startswith(("/v4", "/things", "/admin", "/topics"))}
    assert json.loads(json.dumps(served)) == served


class _Extra:
    """A component with its own fragment, as the monitor would add one."""

    def routes(self) -> list[BaseRoute]:
        return [Route("/extra/{name}", _nothing, methods=["GET"])]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def openapi(self) -> dict[str, Any]:
        return {
            "paths": {
                "/extra/{name}": {
                    "get": {
                        "operationId": "extra",
                        "security": [{openapi_fragment.ADMIN_BEARER: []}],
                        "parameters": [
                            {"in": "path", "name": "name", "required": True, "schema": {}}
                        ],
                        "responses": {
                            "200": openapi_fragment.json_response(
                                "x", openapi_fragment.schema_ref("Extra")
                            ),
                            "401": openapi_fragment.response_ref("Unauthorized"),
                        },
                    }
                },
                "/extra/unrouted": {"get": {"responses": {"200": {"description": "x"}}}},
            },
            "components": {"schemas": {"Extra": {"type": "object"}}},
        }


async def _nothing(request: Any) -> Any:  # pragma: no cover - only routed, never called
    from starlette.responses import JSONResponse

    return JSONResponse({})


def test_components_contribute_fragments() -> None:
    app = build_app([_Extra()])
    with TestClient(app) as client:
        served = client.get("/openapi.json").json()
    assert "/extra/{name}" in served["paths"]
    assert "/extra/unrouted" not in served["paths"]  # described but not routed: left out
    assert served["components"]["schemas"]["Extra"] == {"type": "object"}
    assert "Unauthorized" in served["components"]["responses"]


def test_conflicting_fragments_are_refused() -> None:
    op = {"responses": {"200": {"description": "a"}}}
    other = {"responses": {"200": {"description": "b"}}}
    with pytest.raises(openapi_fragment.FragmentConflict, match="GET /a"):
        openapi_fragment.merge([{"paths": {"/a": {"get": op}}}, {"paths": {"/a": {"get": other}}}])
    with pytest.raises(openapi_fragment.FragmentConflict, match="schemas/X"):
        openapi_fragment.merge(
            [
                {"components": {"schemas": {"X": {"type": "string"}}}},
                {"components": {"schemas": {"X": {"type": "integer"}}}},
            ]
        )
    with pytest.raises(openapi_fragment.FragmentConflict):
        openapi_fragment.merge([{"info": {}}])
    # The same definition twice is fine; different methods of one path merge.
    merged = openapi_fragment.merge(
        [
            {"paths": {"/a": {"get": op}}, "components": {"schemas": {"X": {}}}},
            {"paths": {"/a": {"get": op, "post": other}}, "components": {"schemas": {"X": {}}}},
        ]
    )
    assert set(merged["paths"]["/a"]) == {"get", "post"}


def test_path_shapes() -> None:
    assert openapi.path_shape("/topics/{topic:path}") == "/topics/{}"
    assert openapi.path_shape("/machines/{machineId}/x") == "/machines/{}/x"


# -- the monitor's answers with telemetry (the fuzzed sandbox has none) ---------------------

MONITOR_CLIENT = "iotref-00000000000000000001"


class _MonitorIngestion:
    """What the monitor uses of the ingestion: the store and the status."""

    def __init__(self, store: TelemetryStore) -> None:
        self.store = store

    def status(self) -> dict[str, Any]:
        return {"subscribed": True, "connections": 2, "topic_filter": "t/#", "queued_chunks": 0}


class _MonitorShadows:
    """The shadow service's update path, straight into the shadow store."""

    def __init__(self, store: ShadowStore) -> None:
        self.store = store

    async def update(self, thing: str, shadow: str | None, payload: bytes) -> dict[str, Any]:
        now = int(time.time())
        outcome = sd.apply_update(self.store.get(thing, shadow), sd.parse_update(payload), now)
        self.store.put(thing, shadow, outcome.document, now)
        return outcome.accepted


def _record(client_id: str, body: bytes, *, valid: bool, speed: float | None) -> Record:
    return Record(
        received_at=time.time(),
        topic=f"connectprint/telemetry/org/{client_id}",
        client_id=client_id,
        org_id="org" if client_id == MONITOR_CLIENT else None,
        topic_problem=None if client_id == MONITOR_CLIENT else "unknown client id",
        sendereventuuid=str(uuid.uuid4()),
        valid=valid,
        errors=None if valid else [{"path": "$.header", "reason": "required"}],
        eventtype="status" if valid else None,
        eventsubtype=None,
        payloadversion=2 if valid else None,
        assetid="press-1" if valid else None,
        assettimestamp="2026-01-01T00:00:00Z" if valid else None,
        status="production" if valid else None,
        speed=speed,
        productioncounter=1.0 if speed is not None else None,
        totalproductioncounter=None,
        body=body,
    )


def test_monitor_answers_with_telemetry_conform(tmp_path: Path) -> None:
    ctx = SandboxContext.open(SandboxSettings(data_dir=tmp_path, http_port=0))
    store = TelemetryStore(tmp_path / "telemetry.db")
    try:
        things = ThingRegistry(ctx.db)
        for serial, client_id in enumerate((MONITOR_CLIENT, "iotref-00000000000000000002"), 1):
            things.register(  # the second sends nothing
                client_id=client_id,
                org_id="org",
                site_id="site",
                certificate_pem="-----BEGIN CERTIFICATE-----\n",
                serial=serial,
                not_after=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc),
            )
        written = store.write_batch(
            [
                _record(MONITOR_CLIENT, b'{"ok": true}', valid=True, speed=10.0),
                _record(MONITOR_CLIENT, b"\xff\xfe", valid=False, speed=None),
                _record("stranger", b"{}", valid=False, speed=None),
            ]
        )
        ids = [row_id for _, row_id in written]
        monitor = Monitor(
            ctx,
            _MonitorIngestion(store),  # type: ignore[arg-type]
            _MonitorShadows(ShadowStore(ctx.db)),
            Directory(ctx),
            things,
        )
        app = build_app([monitor])
        description = schemathesis.openapi.from_dict(openapi.describe_app(app.routes, [monitor]))
        bearer = {"Authorization": f"Bearer {ctx.admin_token}"}
        device = f"/monitor/api/devices/{MONITOR_CLIENT}"
        with TestClient(app, headers=bearer) as client:

            def check(method: str, path: str, template: str, status: int, **kw: Any) -> Any:
                answer = client.request(method, path, **kw)
                assert answer.status_code == status, (path, answer.text)
                description[template][method].validate_response(answer)
                return answer.json()

            shadow_path = "/monitor/api/devices/{client_id}/shadow"
            check("GET", device + "/shadow", shadow_path, 404)  # no shadow yet
            send = "/monitor/api/devices/{client_id}/send-telemetry"
            check("POST", device + "/send-telemetry", send, 200, json={"enabled": True})
            summary = check("GET", "/monitor/api/summary", "/monitor/api/summary", 200)
            assert {d["known"] for d in summary["devices"]} == {True, False}
            check("GET", device, "/monitor/api/devices/{client_id}", 200)
            check("GET", "/monitor/api/devices/stranger", "/monitor/api/devices/{client_id}", 200)
            listed = check(
                "GET",
                device + "/messages?invalid=1",
                "/monitor/api/devices/{client_id}/messages",
                200,
            )
            assert [m["id"] for m in listed["messages"]] == [ids[1]]
            template = "/monitor/api/messages/{message_id}"
            assert "body" in check("GET", f"/monitor/api/messages/{ids[0]}", template, 200)
            assert "body_base64" in check("GET", f"/monitor/api/messages/{ids[1]}", template, 200)
            check("GET", device + "/shadow", shadow_path, 200)
            check(
                "POST",
                device + "/shadow",
                shadow_path,
                409,
                json={"desired": {"a": 1}, "version": 99},
            )
            check(
                "POST",
                device + "/shadow/validate",
                shadow_path + "/validate",
                400,
                json={"desired": {"a": [None]}},
            )
            # Bad input that used to answer 500: non-ASCII digits, an integer too long for
            # int(), an Origin that is not a URL, a desired state that json.loads takes
            # but json.dumps, two levels deeper, does not.
            messages = "/monitor/api/devices/{client_id}/messages"
            for query in ("limit=%C2%B2", "before=" + "9" * 5000):
                check("GET", f"{device}/messages?{query}", messages, 400)
            check("GET", "/monitor/api/devices/x%0A/messages", messages, 400)
            client.get(f"/monitor?token={ctx.admin_token}", headers={"Authorization": ""})
            page = client.get("/monitor", headers={"Authorization": ""}).text
            csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
            cookie_post = {"Authorization": "", "X-CSRF-Token": csrf, "Origin": "http://[::1"}
            check("POST", device + "/shadow", shadow_path, 403, json={}, headers=cookie_post)
            for depth in range(900, 1000):
                deep = '{"desired": ' + '{"a":' * depth + "1" + "}" * depth + "}"
                answer = client.post(
                    device + "/shadow/validate",
                    content=deep,
                    headers={"Content-Type": "application/json"},
                )
                assert answer.status_code == 400, depth
    finally:
        store.close()
        ctx.db.close()


def _nest(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    "state",
    [
        {"reported": _nest(6)},
        {"reported": _nest(7)},
        {"desired": {"a": [1, [2, {"b": None}]]}},
        {"desired": {"a": [1, None]}},
        {"desired": {"a": None}, "reported": None},
        {"desired": {"a": [[[[[1]]]]]}},
        {"desired": {"a": [[[[[[1]]]]]]}},
        {"delta": {}},
        None,
    ],
)
def test_shadow_updates_are_described_as_the_service_takes_them(
    document: dict[str, Any], state: Any
) -> None:
    """The description of an update and the document rules agree (but for the 8 KB,
    which JSON Schema cannot state)."""
    from openapi_schema_validator import OAS30Validator

    schema = {"$ref": "#/components/schemas/ShadowUpdate", "components": document["components"]}
    described = OAS30Validator(schema).is_valid({"state": state})
    refusal: sd.ShadowError | None = None
    try:
        sd.parse_update(json.dumps({"state": state}))
    except sd.ShadowError as exc:
        refusal = exc
    assert refusal is None or refusal.code == 400, refusal
    assert described == (refusal is None)


def test_list_tokens_are_shadow_names(document: dict[str, Any]) -> None:
    path = document["paths"]["/api/things/shadow/ListNamedShadowsForThing/{thingName}"]
    (token,) = [p for p in path["get"]["parameters"] if p["name"] == "nextToken"]
    assert token["schema"]["pattern"] == sd.SHADOW_NAME_PATTERN.pattern
