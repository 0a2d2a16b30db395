"""Every failure of the sandbox's HTTP app answers JSON, never an HTML page or a traceback."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.testclient import TestClient

from iotref.sandbox.app import build_app
from iotref.sandbox.http_errors import ApiError, read_form_or_json, read_json_object


class _Echo:
    def routes(self) -> Sequence[BaseRoute]:
        async def echo(request: Request) -> Response:
            return JSONResponse(await read_json_object(request))

        async def form(request: Request) -> Response:
            return JSONResponse(await read_form_or_json(request))

        async def teapot(request: Request) -> Response:
            raise ApiError(409, "conflict", "already there")

        async def boom(request: Request) -> Response:
            raise RuntimeError("secret detail that must not leak")

        return [
            Route("/echo", echo, methods=["POST"]),
            Route("/form", form, methods=["POST"]),
            Route("/conflict", teapot, methods=["GET"]),
            Route("/conflict", teapot, methods=["DELETE"]),
            Route("/boom", boom, methods=["GET"]),
        ]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@pytest.fixture
def client() -> TestClient:
    return TestClient(build_app([_Echo()]), raise_server_exceptions=False)


def test_unknown_path_is_json_404(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_wrong_method_is_json_405(client: TestClient) -> None:
    response = client.get("/echo")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_allow_names_the_methods_of_every_route_at_the_path(client: TestClient) -> None:
    """Starlette's own 405 names only the first route whose path matches."""
    response = client.request("OPTIONS", "/conflict")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, DELETE"


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe", b"[1, 2]", b"42"])
def test_malformed_json_is_400(client: TestClient, body: bytes) -> None:
    response = client.post("/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_oversized_body_is_413(client: TestClient) -> None:
    response = client.post("/echo", content=b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b"y" * 65536

    response = client.post("/echo", content=chunks())
    assert response.status_code == 413


def test_bad_content_length_is_400(client: TestClient) -> None:
    response = client.post("/echo", content=b"{}", headers={"content-length": "abc"})
    assert response.status_code == 400


def test_api_error_body(client: TestClient) -> None:
    response = client.get("/conflict")
    assert response.status_code == 409
    assert response.json() == {"error": "conflict", "error_description": "already there"}


def test_unexpected_error_is_json_500_without_details(client: TestClient) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    assert "secret detail" not in response.text
    assert response.json()["error"] == "internal_error"


def test_form_json_and_query_parameters(client: TestClient) -> None:
    assert client.post("/form?a=1", data={"b": "2"}).json() == {"a": "1", "b": "2"}
    assert client.post("/form", json={"c": "3", "n": 4}).json() == {"c": "3"}
