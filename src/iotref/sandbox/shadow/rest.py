"""The shadow REST data plane in the shape of AWS IoT's (``iot-data``) API.

``GET|POST|DELETE /things/{thingName}/shadow[?name=]`` (GetThingShadow, UpdateThingShadow,
DeleteThingShadow), ``GET /api/things/shadow/ListNamedShadowsForThing/{thingName}`` and
``POST /topics/{topic}?qos=&retain=`` (Publish, through the platform's MQTT connection).
Callers authenticate with the sandbox's admin token (``Authorization: Bearer``) or AWS
Signature V4 with the access key the sandbox issues, so boto3's ``iot-data`` client works
unchanged. Errors carry ``x-amzn-ErrorType`` and an error response document, which AWS
clients turn into ``ResourceNotFoundException``, ``ConflictException`` and so on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from iotref.protocol import shadow_document as sd
from iotref.protocol.limits import MAX_PAYLOAD_BYTES
from iotref.sandbox.shadow import aws_sigv4
from iotref.sandbox.shadow.store import AwsCredentials

ERROR_TYPES = {
    400: "InvalidRequestException",
    401: "UnauthorizedException",
    403: "ForbiddenException",
    404: "ResourceNotFoundException",
    405: "MethodNotAllowedException",
    409: "ConflictException",
    413: "RequestEntityTooLargeException",
    415: "UnsupportedDocumentEncodingException",
    429: "ThrottlingException",
    500: "InternalFailureException",
    503: "ServiceUnavailableException",
}
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 100


class ShadowOperations(Protocol):
    """What the data plane needs of the shadow service
    (:class:`~iotref.sandbox.shadow.service.ShadowService`): the shadows' operations, the
    platform's publish, and the credentials and region that signatures are checked with."""

    @property
    def credentials(self) -> AwsCredentials: ...

    @property
    def region(self) -> str: ...

    async def get(self, thing: str, shadow: str | None) -> sd.JsonObject: ...

    async def update(self, thing: str, shadow: str | None, payload: bytes) -> sd.JsonObject: ...

    async def delete(self, thing: str, shadow: str | None) -> sd.JsonObject: ...

    def named_shadows(self, thing: str) -> list[str]: ...

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> bool: ...


AdminCheck = Callable[[str | None], bool]
"""Whether an ``Authorization`` header carries the admin token
(:meth:`iotref.sandbox.context.SandboxContext.check_admin`)."""


class RestError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(code: int, message: str, client_token: str | None = None) -> Response:
    body = sd.error_document(code, message, int(time.time()), client_token)
    error_type = ERROR_TYPES.get(code, "InvalidRequestException")
    return _json_response(sd.to_json(body), code, {"x-amzn-ErrorType": f"{error_type}:"})


def _names(request: Request, *, shadow_name: bool = True) -> tuple[str, str | None]:
    """The thing name (and the ``name`` query parameter), checked as AWS checks them."""
    thing = str(request.path_params["thingName"])
    shadow = request.query_params.get("name") if shadow_name else None
    refused = sd.name_error(thing, shadow)
    if refused is not None:
        raise RestError(refused.code, refused.message)
    return thing, shadow


class ShadowRest:
    """Request handlers over one shadow service's operations."""

    def __init__(self, service: ShadowOperations, check_admin: AdminCheck) -> None:
        self.service = service
        self.check_admin = check_admin

    async def _authorize(self, request: Request) -> bytes:
        """Read the body and check the caller; raise :class:`RestError` 403 if refused."""
        body = await request.body()
        authorization = request.headers.get("authorization")
        if authorization and authorization.lower().startswith("bearer "):
            if self.check_admin(authorization):
                return body
            raise RestError(403, "Forbidden")
        if authorization and aws_sigv4.is_sigv4(authorization):
            raw_path = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
            headers: dict[str, list[str]] = {}
            for name, value in request.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            signed = aws_sigv4.SignedRequest(
                method=request.method,
                raw_path=bytes(raw_path).decode("latin-1"),
                query=aws_sigv4.decode_query(request.scope.get("query_string", b"")),
                headers=headers,
                body=body,
            )
            creds = self.service.credentials
            try:
                aws_sigv4.verify(
                    signed,
                    authorization,
                    access_key_id=creds.access_key_id,
                    secret_access_key=creds.secret_access_key,
                    region=self.service.region,
                    service="iotdata",
                )
            except aws_sigv4.SignatureError as exc:
                raise RestError(403, str(exc)) from None
            return body
        raise RestError(403, "Missing Authentication Token")

    async def _run(self, request: Request, operation: str) -> Response:
        try:
            body = await self._authorize(request)
            if operation == "list":
                return await self._list(request)
            if operation == "publish":
                return await self._publish(request, body)
            thing, shadow = _names(request)
            if operation == "get":
                result = await self.service.get(thing, shadow)
            elif operation == "update":
                result = await self.service.update(thing, shadow, body)
            else:
                result = await self.service.delete(thing, shadow)
            return _json_response(sd.to_json(result))
        except RestError as exc:
            return error_response(exc.code, exc.message)
        except sd.ShadowError as exc:
            return error_response(exc.code, exc.message, exc.client_token)

    async def shadow(self, request: Request) -> Response:
        operation = {"POST": "update", "DELETE": "delete"}.get(request.method, "get")
        return await self._run(request, operation)

    async def list_named(self, request: Request) -> Response:
        return await self._run(request, "list")

    async def publish(self, request: Request) -> Response:
        return await self._run(request, "publish")

    async def _list(self, request: Request) -> Response:
        thing, _ = _names(request, shadow_name=False)
        page_size = DEFAULT_PAGE_SIZE
        raw_size = request.query_params.get("pageSize")
        if raw_size is not None:
            if not raw_size.isdigit() or not 1 <= int(raw_size) <= MAX_PAGE_SIZE:
                raise RestError(400, f"pageSize must be between 1 and {MAX_PAGE_SIZE}")
            page_size = int(raw_size)
        # The token is where the previous page ended: the last name it held. Any shadow
        # name is a valid position (names sort as strings), anything else is refused.
        after = request.query_params.get("nextToken")
        if after is not None and not sd.SHADOW_NAME_PATTERN.fullmatch(after):
            raise RestError(400, "Invalid nextToken")
        names = [n for n in self.service.named_shadows(thing) if after is None or n > after]
        page = names[:page_size]
        result: dict[str, Any] = {"results": page, "timestamp": int(time.time())}
        if len(names) > page_size:
            result["nextToken"] = page[-1]
        return _json_response(sd.to_json(result))

    async def _publish(self, request: Request, body: bytes) -> Response:
        topic = str(request.path_params["topic"])
        if not topic or "+" in topic or "#" in topic or len(topic.encode()) > 256:
            raise RestError(400, "Invalid topic name")
        if any(_unfit_for_topic(char) for char in topic):
            # MQTT forbids U+0000 and brokers refuse control characters and non-characters
            # (Mosquitto drops the publisher's connection as a malformed packet).
            raise RestError(400, "Invalid topic name")
        qos_text = request.query_params.get("qos", "0")
        if qos_text not in ("0", "1"):
            raise RestError(400, "Invalid QoS value; supported values are 0 and 1")
        retain_text = request.query_params.get("retain", "false").lower()
        if retain_text not in ("true", "false"):
            raise RestError(400, "Invalid retain value; supported values are true and false")
        if len(body) > MAX_PAYLOAD_BYTES:
            raise RestError(413, sd.MSG_TOO_LARGE)
        sent = await self.service.publish(topic, body, int(qos_text), retain_text == "true")
        if not sent:
            raise RestError(503, "Service Unavailable: the broker is not reachable")
        return _json_response(b'{"message":"OK"}')


def shadow_routes(service: ShadowOperations, check_admin: AdminCheck) -> Sequence[BaseRoute]:
    """The data plane's routes over ``service``; the admin token passes ``check_admin``."""
    rest = ShadowRest(service, check_admin)
    return [
        Route("/things/{thingName}/shadow", rest.shadow, methods=["GET", "POST", "DELETE"]),
        Route(
            "/api/things/shadow/ListNamedShadowsForThing/{thingName}",
            rest.list_named,
            methods=["GET"],
        ),
        Route("/topics/{topic:path}", rest.publish, methods=["POST"]),
    ]


def _unfit_for_topic(char: str) -> bool:
    code = ord(char)
    return (
        code <= 0x1F
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xDFFF
        or 0xFDD0 <= code <= 0xFDEF
        or (code & 0xFFFE) == 0xFFFE
    )
