"""``GET /healthz``: whether the sandbox's HTTP server runs, its version and its id (which
``--env local`` asks for, to know which sandbox serves the default port); with its OpenAPI
fragment."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from iotref._version import __version__
from iotref.sandbox.openapi_fragment import TAG_SANDBOX, Fragment, json_response

HEALTH_PATH = "/healthz"


def health_route(sandbox_id: str | None) -> Route:
    """The route, answering ``sandbox_id`` when there is one."""
    body = {"status": "ok", "version": __version__}
    if sandbox_id:
        body["sandbox_id"] = sandbox_id

    async def health(request: Request) -> Response:
        return JSONResponse(body)

    return Route(HEALTH_PATH, health, methods=["GET"])


def health_fragment() -> Fragment:
    """The OpenAPI fragment of ``GET /healthz``."""
    return {
        "paths": {
            HEALTH_PATH: {
                "get": {
                    "tags": [TAG_SANDBOX],
                    "operationId": "health",
                    "summary": "Whether the sandbox's HTTP server runs",
                    "security": [],
                    "responses": {
                        "200": json_response(
                            "Running.",
                            {
                                "type": "object",
                                "required": ["status", "version"],
                                "properties": {
                                    "status": {"type": "string", "enum": ["ok"]},
                                    "version": {"type": "string"},
                                    "sandbox_id": {
                                        "type": "string",
                                        "description": "This sandbox's id, as in its "
                                        "env.local (SANDBOX_ID); new with each data dir.",
                                    },
                                },
                                "additionalProperties": False,
                            },
                        )
                    },
                }
            },
        }
    }
