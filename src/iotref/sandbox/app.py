"""The sandbox's one HTTP application: every component's routes behind JSON errors, plus
``GET /openapi.json`` describing them (see :mod:`iotref.sandbox.openapi`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotref._version import __version__
from iotref.sandbox.http_errors import EXCEPTION_HANDLERS, BodyLimitMiddleware
from iotref.sandbox.openapi import openapi_route


class Component(Protocol):
    """A part of the sandbox: HTTP routes plus a lifecycle. A component may also define
    ``describe() -> dict`` whose keys the runner adds to ``sandbox.json``, and
    ``openapi() -> dict``, an OpenAPI fragment (``paths`` + ``components``) describing
    routes that :func:`iotref.sandbox.openapi.builtin_fragments` does not."""

    def routes(self) -> Sequence[BaseRoute]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _health_route(sandbox_id: str | None) -> Route:
    """``GET /healthz``: running, the version and the sandbox's id (which ``--env local``
    asks for, to know which sandbox serves the default port)."""
    body = {"status": "ok", "version": __version__}
    if sandbox_id:
        body["sandbox_id"] = sandbox_id

    async def health(request: Request) -> Response:
        return JSONResponse(body)

    return Route("/healthz", health, methods=["GET"])


def build_app(components: Sequence[Component], *, sandbox_id: str | None = None) -> Starlette:
    routes: list[BaseRoute] = [_health_route(sandbox_id)]
    for component in components:
        routes.extend(component.routes())
    routes.append(openapi_route(routes, components))
    return Starlette(
        routes=routes,
        middleware=[Middleware(BodyLimitMiddleware)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
