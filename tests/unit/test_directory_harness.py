"""Seed data and the in-process harness itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotref.sandbox.directory.seed import (
    DEMO_EMAIL,
    DEMO_PASSWORD,
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
    make_harness,
)
from tests.support.fake_clock import FakeClock


def test_seed_has_demo_person_two_organizations_and_three_sites(harness: Harness) -> None:
    d = harness.directory.records
    assert [o.id for o in d.organizations_of(DEMO_PERSON_ID)] == [
        FIRST_ORGANIZATION_ID,
        SECOND_ORGANIZATION_ID,
    ]
    assert [s.id for s in d.sites_of(FIRST_ORGANIZATION_ID)] == [FIRST_SITE_ID, SECOND_SITE_ID]
    assert [s.id for s in d.sites_of(SECOND_ORGANIZATION_ID)] == [THIRD_SITE_ID]
    assert d.check_login(DEMO_EMAIL, DEMO_PASSWORD) == DEMO_PERSON_ID
    assert d.check_login(DEMO_EMAIL, "wrong") is None
    assert d.check_login("nobody@iotref.local", DEMO_PASSWORD) is None
    site = d.site(THIRD_SITE_ID)
    assert site is not None
    assert site.organization_id == SECOND_ORGANIZATION_ID
    assert site.organization_name == "Second Demo Press"
    assert d.site("no-such-site") is None
    assert d.sites_of("no-such-org") == []


def test_seed_runs_once_and_survives_reopening(tmp_path: Path, clock: FakeClock) -> None:
    first = make_harness(tmp_path, clock)
    token = first.token()
    first.directory.db.execute(
        "UPDATE directory_organizations SET name = 'Renamed' WHERE id = ?", (FIRST_ORGANIZATION_ID,)
    )
    first.close()
    second = make_harness(tmp_path, clock)
    try:
        org = second.directory.records.organization(FIRST_ORGANIZATION_ID)
        assert org is not None
        assert org.name == "Renamed"  # not re-seeded over
        count = second.ctx.db.query_one("SELECT COUNT(*) AS n FROM directory_people")
        assert count is not None
        assert count["n"] == 1
        grant = second.directory.authenticate(f"Bearer {token['access_token']}")
        assert grant is not None
        assert grant.organization_id == FIRST_ORGANIZATION_ID
    finally:
        second.close()


def test_assert_conforms_rejects_a_bad_body() -> None:
    with pytest.raises(AssertionError):
        assert_conforms("Machine", {"id": "not-a-machine"})
    with pytest.raises(AssertionError):
        assert_conforms("Organization", {"id": "not-a-uuid", "name": "x"})
    with pytest.raises(AssertionError):
        assert_conforms(
            "MachineOwnership",
            {
                "id": "x",
                "machine_id": "y",
                "organization_id": "z",
                "created_at": "t",
                "updated_at": "t",
                "terminated_at": None,
            },
        )
