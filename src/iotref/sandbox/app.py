"""The sandbox's one HTTP application: every component's routes behind JSON errors, plus
``GET /healthz`` and ``GET /openapi.json`` describing them all (see
:mod:`iotref.sandbox.openapi`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from iotref.sandbox.health import health_route
from iotref.sandbox.http_errors import EXCEPTION_HANDLERS, BodyLimitMiddleware
from iotref.sandbox.openapi import openapi_route


class Component(Protocol):
    """A part of the sandbox: HTTP routes plus a lifecycle. A component may also define
    ``describe() -> dict`` whose keys the runner adds to ``sandbox.json``, and
    ``openapi() -> dict``, the OpenAPI fragment (``paths`` + ``components``) describing
    its routes (:mod:`iotref.sandbox.openapi_fragment`)."""

    def routes(self) -> Sequence[BaseRoute]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_app(components: Sequence[Component], *, sandbox_id: str | None = None) -> Starlette:
    routes: list[BaseRoute] = [health_route(sandbox_id)]
    for component in components:
        routes.extend(component.routes())
    routes.append(openapi_route(routes, components))
    return Starlette(
        routes=routes,
        middleware=[Middleware(BodyLimitMiddleware)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
