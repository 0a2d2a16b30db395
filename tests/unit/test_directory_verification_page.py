"""The verification page, in-process, driven by form posts as a browser would."""

from __future__ import annotations

from iotref.sandbox.directory.seed import (
    DEMO_PERSON_ID,
    FIRST_ORGANIZATION_ID,
    SECOND_ORGANIZATION_ID,
)
from iotref.sandbox.directory.verification_page import SESSION_COOKIE
from tests.support.directory_harness import (  # noqa: F401
    Harness,
    clock_fixture,
    harness_fixture,
)
from tests.support.fake_clock import FakeClock


def test_page_asks_to_sign_in_with_safe_headers(harness: Harness) -> None:
    page = harness.client.get("/oauth/device", params={"user_code": "12345678"})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert 'name="email"' in page.text
    assert 'name="password"' in page.text
    assert 'name="user_code" value="12345678"' in page.text
    assert "<script" not in page.text
    assert "http" not in page.text.split("<body>")[0].replace("http-equiv", "")  # no assets
    cookie = page.headers["set-cookie"]
    assert SESSION_COOKIE in cookie
    assert "httponly" in cookie.lower()
    assert "samesite=lax" in cookie.lower()


def test_sign_in_and_approve_for_the_chosen_organization(harness: Harness) -> None:
    started = harness.authorize()
    signed_in = harness.sign_in(started["user_code"])
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == f"/oauth/device?user_code={started['user_code']}"
    page = harness.client.get(signed_in.headers["location"])
    assert page.status_code == 200
    assert started["user_code"] in page.text
    assert "Demo Print Works" in page.text
    assert "Second Demo Press" in page.text
    assert "iotref device client" in page.text
    assert "Org.directory.machines.rw" in page.text
    done = harness.decide(
        harness.csrf(page.text), started["user_code"], "approve", SECOND_ORGANIZATION_ID
    )
    assert done.status_code == 200
    assert "Approved" in done.text
    token = harness.poll(started["device_code"]).json()
    assert token["bearer"] == {"id": SECOND_ORGANIZATION_ID, "type": "Organization"}
    grant = harness.directory.authenticate(f"Bearer {token['access_token']}")
    assert grant is not None
    assert grant.person_id == DEMO_PERSON_ID


def test_deny_via_the_page(harness: Harness) -> None:
    started = harness.authorize()
    harness.sign_in()
    page = harness.client.get("/oauth/device", params={"user_code": started["user_code"]})
    done = harness.decide(harness.csrf(page.text), started["user_code"], "deny")
    assert done.status_code == 200
    assert "Denied" in done.text
    answer = harness.poll(started["device_code"])
    assert answer.status_code == 400
    assert answer.json()["error"] == "access_denied"
    # a decided code cannot be decided again
    again = harness.decide(
        harness.csrf(page.text), started["user_code"], "approve", FIRST_ORGANIZATION_ID
    )
    assert again.status_code == 400
    assert "is not valid" in again.text


def test_wrong_code_shows_a_message(harness: Harness) -> None:
    harness.authorize()
    harness.sign_in()
    page = harness.client.get("/oauth/device", params={"user_code": "00000000"})
    assert page.status_code == 400
    assert "“00000000” is not valid" in page.text
    bad = harness.client.get("/oauth/device", params={"user_code": "<script>x</script>"})
    assert bad.status_code == 400
    assert "<script>x" not in bad.text
    assert "&lt;script&gt;x&lt;/script&gt;" in bad.text
    blank = harness.client.get("/oauth/device")
    assert blank.status_code == 200
    assert 'name="user_code"' in blank.text


def test_code_with_dashes_or_spaces_is_accepted(harness: Harness) -> None:
    started = harness.authorize()
    harness.sign_in()
    code = started["user_code"]
    page = harness.client.get("/oauth/device", params={"user_code": f"{code[:4]}-{code[4:]}"})
    assert page.status_code == 200
    assert 'value="approve"' in page.text


def test_expired_code_on_the_page(harness: Harness, clock: FakeClock) -> None:
    started = harness.authorize()
    harness.sign_in()
    clock.advance(601)
    page = harness.client.get("/oauth/device", params={"user_code": started["user_code"]})
    assert page.status_code == 400
    assert "expired" in page.text


def test_wrong_password(harness: Harness) -> None:
    answer = harness.sign_in("12345678", password="nope")
    assert answer.status_code == 401
    assert "Wrong email or password" in answer.text
    assert 'name="user_code" value="12345678"' in answer.text
    # still not signed in
    assert 'name="password"' in harness.client.get("/oauth/device").text


def test_forms_need_the_csrf_token(harness: Harness) -> None:
    started = harness.authorize()
    page = harness.client.get("/oauth/device")
    no_token = harness.client.post(
        "/oauth/device/sign_in", data={"email": "demo@iotref.local", "password": "demo"}
    )
    assert no_token.status_code == 403
    assert no_token.json()["error"] == "invalid_csrf_token"
    harness.sign_in()
    page = harness.client.get("/oauth/device", params={"user_code": started["user_code"]})
    assert page.status_code == 200
    forged = harness.decide("0" * 64, started["user_code"], "approve", FIRST_ORGANIZATION_ID)
    assert forged.status_code == 403
    assert harness.poll(started["device_code"]).json()["error"] == "authorization_pending"


def test_post_without_a_session(harness: Harness) -> None:
    started = harness.authorize()
    harness.client.cookies.clear()
    answer = harness.decide("x", started["user_code"], "approve")
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("application/json")


def test_session_is_renewed_on_sign_in(harness: Harness) -> None:
    harness.client.get("/oauth/device")
    before = harness.client.cookies.get(SESSION_COOKIE)
    harness.sign_in()
    after = harness.client.cookies.get(SESSION_COOKIE)
    assert before
    assert after
    assert before != after


def test_organization_must_be_one_of_the_persons(harness: Harness) -> None:
    started = harness.authorize()
    harness.sign_in()
    page = harness.client.get("/oauth/device", params={"user_code": started["user_code"]})
    answer = harness.decide(
        harness.csrf(page.text),
        started["user_code"],
        "approve",
        "00000000-0000-0000-0000-000000000000",
    )
    assert answer.status_code == 400
    assert "Choose one of your organizations" in answer.text
    bad_decision = harness.decide(harness.csrf(page.text), started["user_code"], "maybe")
    assert bad_decision.status_code == 400
    assert bad_decision.json()["error"] == "invalid_request"
    assert harness.poll(started["device_code"]).json()["error"] == "authorization_pending"


def test_person_scopes_need_no_organization(harness: Harness) -> None:
    started = harness.authorize("directory.person.r")
    harness.sign_in()
    page = harness.client.get("/oauth/device", params={"user_code": started["user_code"]})
    assert "organization_id" not in page.text
    done = harness.decide(harness.csrf(page.text), started["user_code"], "approve")
    assert done.status_code == 200
    assert harness.poll(started["device_code"]).json()["bearer"]["type"] == "Person"


def test_sign_out(harness: Harness) -> None:
    harness.sign_in()
    page = harness.client.get("/oauth/device")
    out = harness.client.post(
        "/oauth/device/sign_out", data={"csrf_token": harness.csrf(page.text)}
    )
    assert out.status_code == 303
    assert 'name="password"' in harness.client.get("/oauth/device").text


def test_wrong_methods_are_json(harness: Harness) -> None:
    answer = harness.client.get("/oauth/device/sign_in")
    assert answer.status_code == 405
    assert answer.headers["content-type"].startswith("application/json")
    assert harness.client.put("/oauth/device").status_code == 405
