"""The provisioning component with a fake directory and broker: the thing_registered
event, the order of checks, and the admin revocation path."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.testclient import TestClient

from iotref.sandbox.app import build_app
from iotref.sandbox.broker.supervisor import Broker
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.provisioning.certificate_authority import CertificateAuthorities
from iotref.sandbox.provisioning.service import Provisioning
from iotref.sandbox.provisioning.things import Thing, ThingRegistry
from tests.support.device_keys import make_csr, make_key


@dataclass(frozen=True)
class FakeGrant:
    organization_id: str | None
    scopes: frozenset[str]

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True)
class FakeSite:
    organization_id: str


@dataclass
class FakeDirectory:
    grants: dict[str, FakeGrant] = field(default_factory=dict)
    sites: dict[str, FakeSite] = field(default_factory=dict)

    def authenticate(self, authorization: str | None) -> FakeGrant | None:
        token = (authorization or "").removeprefix("Bearer ")
        return self.grants.get(token)

    def site(self, site_id: str) -> FakeSite | None:
        return self.sites.get(site_id)


class FakeBroker:
    """Records what the broker was asked, and what the registry and the CA held then."""

    def __init__(self) -> None:
        self.things: ThingRegistry | None = None
        self.cas: CertificateAuthorities | None = None
        self.applied: list[list[str]] = []  # registered client ids at each apply_policies()
        self.revoked: list[tuple[str, bool, bool]] = []  # (id, marked revoked, in the CRL)

    async def apply_policies(self) -> None:
        assert self.things is not None
        self.applied.append([t.client_id for t in self.things.list()])

    async def revoke(self, client_id: str) -> None:
        assert self.things is not None and self.cas is not None
        thing = self.things.get(client_id)
        assert thing is not None
        self.revoked.append((client_id, thing.revoked, self.cas.is_revoked(thing.serial)))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, SandboxContext, FakeBroker, list[Thing]]]:
    ctx = SandboxContext.open(SandboxSettings(data_dir=tmp_path))
    ctx.mqtt_port = 18883
    cas = CertificateAuthorities(ctx.paths.ca_dir)
    cas.ensure()
    directory = FakeDirectory(
        grants={
            "good": FakeGrant("org-1", frozenset({"Org.prinect.onprem.rw"})),
            "noscope": FakeGrant("org-1", frozenset({"Org.directory.organization.r"})),
            "person": FakeGrant(None, frozenset({"Org.prinect.onprem.rw"})),
        },
        sites={"site-1": FakeSite("org-1"), "site-2": FakeSite("org-2")},
    )
    broker = FakeBroker()
    broker.things, broker.cas = ThingRegistry(ctx.db), cas
    events: list[Thing] = []
    ctx.events.subscribe("thing_registered", lambda thing: events.append(thing))
    provisioning = Provisioning(ctx, directory, cas, ThingRegistry(ctx.db), cast(Broker, broker))
    with TestClient(build_app([provisioning])) as client:
        yield client, ctx, broker, events
    ctx.db.close()


def _body(site: str = "site-1") -> dict[str, Any]:
    return {"certificateSigningRequest": make_csr(make_key()), "siteId": site}


def test_success_emits_thing_registered(setup: Any) -> None:
    client, _ctx, broker, events = setup
    answer = client.post("/v4/provisioning", json=_body(), headers={"Authorization": "Bearer good"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"deviceCert", "clientId", "orgId"}
    # the broker had the new thing's policy before the device got its certificate
    assert broker.applied == [[body["clientId"]]]
    assert [t.client_id for t in events] == [body["clientId"]]
    assert events[0].org_id == "org-1"
    assert events[0].site_id == "site-1"


@pytest.mark.parametrize(
    ("token", "body", "status", "error"),
    [
        (None, _body(), 401, "unauthorized"),
        ("bad", _body(), 401, "invalid_token"),
        ("noscope", _body(), 403, "insufficient_scope"),
        ("person", _body(), 403, "forbidden"),
        ("good", _body("site-2"), 403, "forbidden"),
        ("good", _body("site-3"), 422, "unknown_site"),
        ("good", {"certificateSigningRequest": "x", "siteId": "site-1"}, 400, "invalid_csr"),
    ],
)
def test_refusals_leave_nothing(
    setup: Any, token: str | None, body: Any, status: int, error: str
) -> None:
    client, ctx, broker, events = setup
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = client.post("/v4/provisioning", json=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error
    assert events == []
    assert broker.applied == []
    assert ThingRegistry(ctx.db).count() == 0


def test_admin_revoke(setup: Any) -> None:
    client, ctx, broker, _events = setup
    client_id = client.post(
        "/v4/provisioning", json=_body(), headers={"Authorization": "Bearer good"}
    ).json()["clientId"]
    admin = {"Authorization": f"Bearer {ctx.admin_token}"}
    assert client.post(f"/admin/things/{client_id}/revoke").status_code == 401
    answer = client.post(f"/admin/things/{client_id}/revoke", headers=admin)
    assert answer.status_code == 200
    assert answer.json()["revokedAt"]
    assert not answer.json()["alreadyRevoked"]
    # CRL and registry first, then the broker
    assert broker.revoked == [(client_id, True, True)]
    again = client.post(f"/admin/things/{client_id}/revoke", headers=admin)
    assert again.json()["alreadyRevoked"]
    assert len(broker.revoked) == 1
    listing = client.get("/admin/things", headers=admin).json()["things"]
    assert [t["clientId"] for t in listing] == [client_id]
    assert client.get(f"/admin/things/{client_id}", headers=admin).json()["certificatePem"]
