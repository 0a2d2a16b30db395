"""Payloads given as plain JSON objects: :class:`RawPayload` (the body and the kind of event
it is, ``generic.signal``/``Status`` v2 unless told otherwise) and :func:`as_payload`, which
turns what ``send()`` accepts into a payload :func:`~iotref.device.telemetry.messages.build_message`
takes. Nothing is checked here: the built message is validated against the platform schemas
before it is queued."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from iotref.device.telemetry.messages import Payload

__all__ = ["PayloadLike", "RawPayload", "as_payload"]


@dataclass(frozen=True)
class RawPayload:
    """``body`` (e.g. ``{"signalstatus": {...}}``) as the payload of an ``eventtype`` /
    ``eventsubtype`` message of ``payloadversion``."""

    body: Mapping[str, Any]
    eventtype: str = "generic.signal"
    eventsubtype: str = "Status"
    payloadversion: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.body, Mapping):
            raise TypeError("a raw payload is a JSON object (a mapping)")
        # A copy taken now: changing the caller's dict later changes no message.
        object.__setattr__(self, "body", dict(self.body))

    def to_payload(self) -> dict[str, Any]:
        return dict(self.body)


PayloadLike = Payload | Mapping[str, Any]
"""A typed payload (``StatusV2(...)``, a :class:`RawPayload`) or a plain JSON object (a
Status payload of version 2 unless ``payloadversion`` says otherwise)."""


def as_payload(payload: PayloadLike, payloadversion: int | None = None) -> Payload:
    """``payload`` as a payload model. A plain mapping becomes a Status
    :class:`RawPayload` of ``payloadversion`` (default 2); a model is returned as it is,
    and a ``payloadversion`` that is not its own is a ``ValueError``."""
    if isinstance(payload, Mapping):
        return RawPayload(payload, payloadversion=payloadversion or 2)
    if payloadversion is not None and payloadversion != payload.payloadversion:
        raise ValueError(
            f"payloadversion={payloadversion} given with a version {payload.payloadversion} payload"
        )
    return payload
