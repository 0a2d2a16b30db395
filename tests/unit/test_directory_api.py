"""The directory's /api/v1, in-process: every success body is checked against the published
OpenAPI schemas, and every error is 4xx JSON."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from iotref.sandbox.directory.seed import (
    DEMO_EMAIL,
    DEMO_PERSON_ID,
    FIRST_ORGANIZATION_ID,
    FIRST_SITE_ID,
    SECOND_ORGANIZATION_ID,
    SECOND_SITE_ID,
    THIRD_SITE_ID,
)
from tests.support.directory_harness import (  # noqa: F401
    Harness,
    assert_conforms,
    clock_fixture,
    harness_fixture,
)
from tests.support.fake_clock import FakeClock

ORG_SCOPE = "Org.prinect.onprem.rw,Org.directory.machines.rw,Org.directory.organization.r"


def _auth(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['access_token']}"}


def _machine(serial: str = "HDB1337", **extra: str) -> dict[str, str]:
    params = {
        "machine[name]": "Speedmaster 2020",
        "machine[manufacturer]": "Heidelberger Druckmaschinen AG",
        "machine[serial_number]": serial,
        "machine[kind]": "offset_press",
        "machine[site_id]": FIRST_SITE_ID,
    }
    params.update(extra)
    return params


@pytest.fixture
def org_token(harness: Harness) -> dict[str, Any]:
    return harness.token(ORG_SCOPE)


def _json_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/api/v1/person", "/api/v1/organization", "/api/v1/sites", f"/api/v1/machines/{uuid.uuid4()}"],
)
def test_missing_or_invalid_token_is_401(harness: Harness, path: str) -> None:
    missing = _json_error(harness.client.get(path), 401)
    assert missing["error"] == "unauthorized"
    invalid = harness.client.get(path, headers={"Authorization": "Bearer nope"})
    assert _json_error(invalid, 401)["error"] == "invalid_token"
    assert "invalid_token" in invalid.headers["www-authenticate"]
    basic = harness.client.get(path, headers={"Authorization": "Basic Zm9vOmJhcg=="})
    _json_error(basic, 401)


def test_expired_token_is_401(
    harness: Harness, clock: FakeClock, org_token: dict[str, Any]
) -> None:
    assert harness.client.get("/api/v1/sites", headers=_auth(org_token)).status_code == 200
    clock.advance(3601)
    _json_error(harness.client.get("/api/v1/sites", headers=_auth(org_token)), 401)
    post = harness.client.post("/api/v1/machines", params=_machine(), headers=_auth(org_token))
    _json_error(post, 401)


# -- person, organization, sites -----------------------------------------------------------------


def test_person_with_a_person_bearer(harness: Harness) -> None:
    token = harness.token("directory.person.r", organization_id=None)
    answer = harness.client.get("/api/v1/person", headers=_auth(token))
    assert answer.status_code == 200
    body = answer.json()
    assert_conforms("Person", body)
    assert body["id"] == DEMO_PERSON_ID
    assert body["email"] == DEMO_EMAIL
    assert [m["organization"]["id"] for m in body["organization_memberships"]] == [
        FIRST_ORGANIZATION_ID,
        SECOND_ORGANIZATION_ID,
    ]
    memberships = harness.client.get(
        "/api/v1/person/organization_memberships", headers=_auth(token)
    )
    assert memberships.status_code == 200
    for membership in memberships.json():
        assert_conforms("OrganizationMembership", membership)
    # a Person bearer is not an organization
    _json_error(harness.client.get("/api/v1/organization", headers=_auth(token)), 403)


def test_person_with_an_organization_bearer_is_403(
    harness: Harness, org_token: dict[str, Any]
) -> None:
    body = _json_error(harness.client.get("/api/v1/person", headers=_auth(org_token)), 403)
    assert body["error"] == "forbidden"


def test_person_without_person_scope_is_403(harness: Harness) -> None:
    token = harness.token("directory.machines.r", organization_id=None)
    _json_error(harness.client.get("/api/v1/person", headers=_auth(token)), 403)


def test_organization(harness: Harness, org_token: dict[str, Any]) -> None:
    answer = harness.client.get("/api/v1/organization", headers=_auth(org_token))
    assert answer.status_code == 200
    assert_conforms("Organization", answer.json())
    assert answer.json()["id"] == FIRST_ORGANIZATION_ID
    assert answer.json()["name"] == "Demo Print Works"


def test_organization_needs_a_scope(harness: Harness) -> None:
    token = harness.token("Org.prinect.onprem.rw")
    body = _json_error(harness.client.get("/api/v1/organization", headers=_auth(token)), 403)
    assert body["error"] == "insufficient_scope"


def test_sites(harness: Harness, org_token: dict[str, Any]) -> None:
    answer = harness.client.get("/api/v1/sites", headers=_auth(org_token))
    assert answer.status_code == 200
    assert_conforms("Site", answer.json(), array=True)
    assert [s["id"] for s in answer.json()] == [FIRST_SITE_ID, SECOND_SITE_ID]
    assert answer.json()[0]["organization"] == {
        "id": FIRST_ORGANIZATION_ID,
        "name": "Demo Print Works",
    }
    second = harness.token(ORG_SCOPE, SECOND_ORGANIZATION_ID)
    assert [s["id"] for s in harness.client.get("/api/v1/sites", headers=_auth(second)).json()] == [
        THIRD_SITE_ID
    ]
    person = harness.token("directory.machines.r", organization_id=None)
    listed = harness.client.get("/api/v1/sites", headers=_auth(person)).json()
    assert_conforms("Site", listed, array=True)
    assert len(listed) == 3


def test_sites_need_a_machines_scope(harness: Harness) -> None:
    token = harness.token("Org.directory.organization.r")
    _json_error(harness.client.get("/api/v1/sites", headers=_auth(token)), 403)


# -- machines ------------------------------------------------------------------------------------


def test_create_and_read_machine(harness: Harness, org_token: dict[str, Any]) -> None:
    answer = harness.client.post("/api/v1/machines", params=_machine(), headers=_auth(org_token))
    assert answer.status_code == 201, answer.text
    machine = answer.json()
    assert_conforms("Machine", machine)
    assert machine["serial_number"] == "HDB1337"
    assert machine["kind"] == "offset_press"
    assert machine["created_at"].endswith("Z")
    assert answer.headers["location"] == f"/api/v1/machines/{machine['id']}"
    got = harness.client.get(f"/api/v1/machines/{machine['id']}", headers=_auth(org_token))
    assert got.status_code == 200
    assert_conforms("Machine", got.json())
    assert got.json() == machine


def test_create_machine_from_form_and_json(harness: Harness, org_token: dict[str, Any]) -> None:
    form = harness.client.post("/api/v1/machines", data=_machine("F1"), headers=_auth(org_token))
    assert form.status_code == 201, form.text
    nested = {
        "machine": {"name": "Folder", "manufacturer": "MBO", "serial_number": 42, "kind": "folder"}
    }
    answer = harness.client.post("/api/v1/machines", json=nested, headers=_auth(org_token))
    assert answer.status_code == 201, answer.text
    assert answer.json()["serial_number"] == "42"
    assert_conforms("Machine", answer.json())
    without_kind = harness.client.post(
        "/api/v1/machines", params=_machine("K1", **{"machine[kind]": ""}), headers=_auth(org_token)
    )
    assert without_kind.status_code == 201
    assert "kind" not in without_kind.json()
    assert_conforms("Machine", without_kind.json())


def test_duplicate_serial_is_422_per_manufacturer(
    harness: Harness, org_token: dict[str, Any]
) -> None:
    assert (
        harness.client.post(
            "/api/v1/machines", params=_machine(), headers=_auth(org_token)
        ).status_code
        == 201
    )
    again = harness.client.post("/api/v1/machines", params=_machine(), headers=_auth(org_token))
    body = _json_error(again, 422)
    assert body == {"errors": {"serial_number": ["has already been taken"]}}
    assert_conforms("ValidationErrors", body)
    other = harness.client.post(
        "/api/v1/machines",
        params=_machine(**{"machine[manufacturer]": "Koenig & Bauer"}),
        headers=_auth(org_token),
    )
    assert other.status_code == 201
    # another organization cannot reuse it either
    second = harness.token(ORG_SCOPE, SECOND_ORGANIZATION_ID)
    _json_error(
        harness.client.post(
            "/api/v1/machines",
            params=_machine(**{"machine[site_id]": THIRD_SITE_ID}),
            headers=_auth(second),
        ),
        422,
    )


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"machine[name]": ""}, "name"),
        ({"machine[name]": "   "}, "name"),
        ({"machine[manufacturer]": ""}, "manufacturer"),
        ({"machine[serial_number]": ""}, "serial_number"),
        ({"machine[serial_number]": "x" * 256}, "serial_number"),
        ({"machine[kind]": "toaster"}, "kind"),
        ({"machine[site_id]": THIRD_SITE_ID}, "site_id"),
        ({"machine[site_id]": "not-a-uuid"}, "site_id"),
        ({"machine[site_id]": str(uuid.uuid4())}, "site_id"),
    ],
)
def test_invalid_machine_is_422(
    harness: Harness, org_token: dict[str, Any], override: dict[str, str], field: str
) -> None:
    answer = harness.client.post(
        "/api/v1/machines", params=_machine(**override), headers=_auth(org_token)
    )
    body = _json_error(answer, 422)
    assert_conforms("ValidationErrors", body)
    assert field in body["errors"]


def test_no_parameters_is_422_with_every_field(harness: Harness, org_token: dict[str, Any]) -> None:
    body = _json_error(harness.client.post("/api/v1/machines", headers=_auth(org_token)), 422)
    assert set(body["errors"]) == {"name", "manufacturer", "serial_number"}


def test_malformed_json_is_400(harness: Harness, org_token: dict[str, Any]) -> None:
    answer = harness.client.post(
        "/api/v1/machines",
        content=b"{oops",
        headers={**_auth(org_token), "content-type": "application/json"},
    )
    _json_error(answer, 400)


def test_create_machine_without_write_scope_is_403(harness: Harness) -> None:
    token = harness.token("Org.directory.machines.r,Org.directory.organization.r")
    answer = harness.client.post("/api/v1/machines", params=_machine(), headers=_auth(token))
    assert _json_error(answer, 403)["error"] == "insufficient_scope"


def test_machine_not_found_or_not_visible_is_404(
    harness: Harness, org_token: dict[str, Any]
) -> None:
    for machine_id in (str(uuid.uuid4()), "not-a-uuid", "%00"):
        answer = harness.client.get(f"/api/v1/machines/{machine_id}", headers=_auth(org_token))
        assert _json_error(answer, 404)["error"] == "not_found"
    second = harness.token(ORG_SCOPE, SECOND_ORGANIZATION_ID)
    theirs = harness.client.post(
        "/api/v1/machines",
        params=_machine("S2", **{"machine[site_id]": THIRD_SITE_ID}),
        headers=_auth(second),
    ).json()
    _json_error(
        harness.client.get(f"/api/v1/machines/{theirs['id']}", headers=_auth(org_token)), 404
    )
    _json_error(
        harness.client.get(
            f"/api/v1/machines/{theirs['id']}/machine_ownership", headers=_auth(org_token)
        ),
        404,
    )


def test_person_bearer_sees_machines_of_its_organizations(
    harness: Harness, org_token: dict[str, Any]
) -> None:
    machine = harness.client.post(
        "/api/v1/machines", params=_machine(), headers=_auth(org_token)
    ).json()
    person = harness.token("directory.machines.rw", organization_id=None)
    answer = harness.client.get(f"/api/v1/machines/{machine['id']}", headers=_auth(person))
    assert answer.status_code == 200
    own = harness.client.post("/api/v1/machines", params=_machine("P1"), headers=_auth(person))
    assert own.status_code == 201
    assert (
        harness.client.get(
            f"/api/v1/machines/{own.json()['id']}", headers=_auth(person)
        ).status_code
        == 200
    )


# -- ownership -----------------------------------------------------------------------------------


def test_machine_ownership(harness: Harness, org_token: dict[str, Any]) -> None:
    machine = harness.client.post(
        "/api/v1/machines", params=_machine(), headers=_auth(org_token)
    ).json()
    path = f"/api/v1/machines/{machine['id']}/machine_ownership"
    none_yet = harness.client.get(path, headers=_auth(org_token))
    _json_error(none_yet, 404)
    created = harness.client.post(
        path, params={"site_id": SECOND_SITE_ID}, headers=_auth(org_token)
    )
    assert created.status_code == 201, created.text
    ownership = created.json()
    assert_conforms("MachineOwnership", ownership)
    assert ownership["machine_id"] == machine["id"]
    assert ownership["organization_id"] == FIRST_ORGANIZATION_ID
    got = harness.client.get(path, headers=_auth(org_token))
    assert got.status_code == 200
    assert got.json() == ownership
    again = harness.client.post(path, params={"site_id": FIRST_SITE_ID}, headers=_auth(org_token))
    assert_conforms("ValidationErrors", _json_error(again, 422))
    # another organization cannot take an owned machine
    second = harness.token(ORG_SCOPE, SECOND_ORGANIZATION_ID)
    _json_error(harness.client.post(path, headers=_auth(second)), 422)


def test_ownership_errors(harness: Harness, org_token: dict[str, Any]) -> None:
    unknown = f"/api/v1/machines/{uuid.uuid4()}/machine_ownership"
    _json_error(harness.client.post(unknown, headers=_auth(org_token)), 404)
    _json_error(harness.client.get(unknown, headers=_auth(org_token)), 404)
    machine = harness.client.post(
        "/api/v1/machines", params=_machine(), headers=_auth(org_token)
    ).json()
    path = f"/api/v1/machines/{machine['id']}/machine_ownership"
    foreign_site = harness.client.post(
        path, params={"site_id": THIRD_SITE_ID}, headers=_auth(org_token)
    )
    assert "site_id" in _json_error(foreign_site, 422)["errors"]
    reader = harness.token("Org.directory.machines.r")
    _json_error(harness.client.post(path, headers=_auth(reader)), 403)
    assert harness.client.delete(path, headers=_auth(org_token)).status_code == 405


def test_person_bearer_ownership_needs_an_organization(
    harness: Harness, org_token: dict[str, Any]
) -> None:
    person = harness.token("directory.machines.rw", organization_id=None)
    machine = harness.client.post(
        "/api/v1/machines", params=_machine("P9"), headers=_auth(person)
    ).json()
    path = f"/api/v1/machines/{machine['id']}/machine_ownership"
    missing = _json_error(harness.client.post(path, headers=_auth(person)), 422)
    assert "organization_id" in missing["errors"]
    foreign = harness.client.post(
        path, params={"organization_id": str(uuid.uuid4())}, headers=_auth(person)
    )
    _json_error(foreign, 422)
    created = harness.client.post(
        path, params={"organization_id": SECOND_ORGANIZATION_ID}, headers=_auth(person)
    )
    assert created.status_code == 201
    assert created.json()["organization_id"] == SECOND_ORGANIZATION_ID


# -- general -------------------------------------------------------------------------------------


def test_unknown_paths_and_methods_are_json(harness: Harness, org_token: dict[str, Any]) -> None:
    _json_error(harness.client.get("/api/v1/nothing", headers=_auth(org_token)), 404)
    _json_error(harness.client.get("/api/v2/person"), 404)
    _json_error(harness.client.put("/api/v1/person", headers=_auth(org_token)), 405)
    _json_error(harness.client.get("/api/v1/machines", headers=_auth(org_token)), 405)
    _json_error(harness.client.post("/api/v1/sites", headers=_auth(org_token)), 405)
