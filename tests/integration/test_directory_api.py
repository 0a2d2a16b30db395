"""The directory's /api/v1 on the real sandbox process (auto-approve), bodies checked against
the published OpenAPI schemas."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from iotref.sandbox.directory.seed import FIRST_ORGANIZATION_ID, FIRST_SITE_ID
from tests.support.directory_harness import assert_conforms
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import bearer, get_token

pytestmark = pytest.mark.integration


def _json(answer: httpx.Response, status: int) -> Any:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    return answer.json()


def test_api_success_and_error_paths(sandbox: SandboxProcess) -> None:
    serial = f"IT-{uuid.uuid4().hex[:8]}"
    with sandbox.http() as http:
        auth = bearer(get_token(sandbox))
        org = _json(http.get("/api/v1/organization", headers=auth), 200)
        assert_conforms("Organization", org)
        assert org["id"] == FIRST_ORGANIZATION_ID
        sites = _json(http.get("/api/v1/sites", headers=auth), 200)
        assert_conforms("Site", sites, array=True)
        assert len(sites) == 2

        params = {
            "machine[name]": "Speedmaster 2020",
            "machine[manufacturer]": "Heidelberger Druckmaschinen AG",
            "machine[serial_number]": serial,
            "machine[kind]": "offset_press",
            "machine[site_id]": FIRST_SITE_ID,
        }
        machine = _json(http.post("/api/v1/machines", params=params, headers=auth), 201)
        assert_conforms("Machine", machine)
        duplicate = _json(http.post("/api/v1/machines", params=params, headers=auth), 422)
        assert duplicate == {"errors": {"serial_number": ["has already been taken"]}}
        assert_conforms(
            "Machine", _json(http.get(f"/api/v1/machines/{machine['id']}", headers=auth), 200)
        )
        path = f"/api/v1/machines/{machine['id']}/machine_ownership"
        _json(http.get(path, headers=auth), 404)
        ownership = _json(http.post(path, params={"site_id": FIRST_SITE_ID}, headers=auth), 201)
        assert_conforms("MachineOwnership", ownership)
        assert_conforms("ValidationErrors", _json(http.post(path, headers=auth), 422))
        assert _json(http.get(path, headers=auth), 200) == ownership

        _json(http.get(f"/api/v1/machines/{uuid.uuid4()}", headers=auth), 404)
        _json(http.post(f"/api/v1/machines/{uuid.uuid4()}/machine_ownership", headers=auth), 404)
        _json(http.get("/api/v1/person", headers=auth), 403)
        reader = bearer(get_token(sandbox, "Org.directory.machines.r"))
        params["machine[serial_number]"] = serial + "-2"
        assert (
            _json(http.post("/api/v1/machines", params=params, headers=reader), 403)["error"]
            == "insufficient_scope"
        )
        _json(http.get("/api/v1/sites"), 401)
        _json(http.get("/api/v1/sites", headers={"Authorization": "Bearer forged"}), 401)
        _json(http.get("/api/v1/nowhere", headers=auth), 404)
        _json(http.delete("/api/v1/sites", headers=auth), 405)

        person = bearer(get_token(sandbox, "directory.person.r"))
        me = _json(http.get("/api/v1/person", headers=person), 200)
        assert_conforms("Person", me)
