"""The sandbox's OpenAPI 3.0 description, served without authentication at ``GET /openapi.json``.

It assembles the fragments (:mod:`iotref.sandbox.openapi_fragment`): the common one, the
health route's and this route's own, and each component's from its ``openapi()`` method,
written beside the component's routes. :func:`describe_app` keeps only the operations the
application really routes, so an application built from some components describes
exactly those.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotref._version import __version__
from iotref.sandbox.health import health_fragment
from iotref.sandbox.openapi_fragment import (
    HTTP_METHODS,
    TAG_SANDBOX,
    Fragment,
    common_fragment,
    json_response,
    merge,
)

OPENAPI_PATH = "/openapi.json"
OPENAPI_VERSION = "3.0.3"

_PARAM = re.compile(r"\{[^}]*\}")


def openapi_fragment() -> Fragment:
    """The fragment of ``GET /openapi.json`` itself."""
    return {
        "paths": {
            OPENAPI_PATH: {
                "get": {
                    "tags": [TAG_SANDBOX],
                    "operationId": "openapi",
                    "summary": "This description",
                    "security": [],
                    "responses": {
                        "200": json_response(
                            "The OpenAPI 3.0 description of the sandbox's HTTP endpoints.",
                            {"type": "object", "required": ["openapi", "info", "paths"]},
                        )
                    },
                }
            }
        }
    }


def base_fragments() -> list[Fragment]:
    """What every application describes besides its components: the common parts, the
    health route and this route."""
    return [common_fragment(), health_fragment(), openapi_fragment()]


def component_fragments(components: Iterable[object]) -> list[Fragment]:
    """The fragments that components contribute through an ``openapi()`` method."""
    fragments: list[Fragment] = []
    for component in components:
        contribute = getattr(component, "openapi", None)
        if callable(contribute):
            fragment = contribute()
            if not isinstance(fragment, dict):
                raise TypeError(f"{type(component).__name__}.openapi() must return a dict")
            fragments.append(fragment)
    return fragments


def path_shape(path: str) -> str:
    """A path with every parameter replaced by ``{}`` (``/a/{x:path}`` → ``/a/{}``)."""
    return _PARAM.sub("{}", path)


def served_operations(routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    """``(path shape, lower-case method)`` of every plain route (HEAD implied by GET)."""
    served: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    served.add((path_shape(route.path), method.lower()))
    return served


def described_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path_shape(path), method)
        for path, item in document.get("paths", {}).items()
        for method in item
        if method in HTTP_METHODS
    }


def build_description(
    fragments: Iterable[Fragment], served: set[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """The whole OpenAPI document; with ``served``, only the operations routed."""
    merged = merge(fragments)
    paths: dict[str, Any] = {}
    for path, item in merged["paths"].items():
        kept = {
            key: value
            for key, value in item.items()
            if key not in HTTP_METHODS or served is None or (path_shape(path), key) in served
        }
        if any(key in HTTP_METHODS for key in kept):
            paths[path] = kept
    tags = sorted(
        {tag for item in paths.values() for op in _operations(item) for tag in op.get("tags", ())}
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "iotref sandbox",
            "version": __version__,
            "description": "A local copy of the Zaikio directory and the connectprint IoT "
            "platform: the OAuth device flow and its verification page, the directory API "
            "(v1), configuration and provisioning, the thing admin API and AWS IoT's "
            "Device Shadow REST API.",
        },
        "tags": [{"name": tag} for tag in tags],
        "paths": paths,
        "components": merged["components"],
    }


def _operations(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [value for key, value in item.items() if key in HTTP_METHODS]


def describe_app(routes: Sequence[BaseRoute], components: Iterable[object]) -> dict[str, Any]:
    """The description an application of ``routes`` built from ``components`` serves:
    the base fragments plus the components' own, cut down to what is routed."""
    served = served_operations(routes) | {(OPENAPI_PATH, "get")}
    return build_description([*base_fragments(), *component_fragments(components)], served)


def openapi_route(routes: Sequence[BaseRoute], components: Iterable[object]) -> Route:
    """``GET /openapi.json`` describing ``routes`` (plus itself), built once."""
    document = describe_app(routes, components)

    async def serve(request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        return JSONResponse({**document, "servers": [{"url": base}]})

    return Route(OPENAPI_PATH, serve, methods=["GET"])
