"""Checking a received telemetry message: parse and validate it with the platform's
schemas, check its topic against the thing registry (``{telemetryTopic}/{orgId}/{clientId}``)
and pick out what the monitor shows, into a :class:`~iotref.sandbox.telemetry.record.Record`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from iotref.protocol.message_schemas import MessageValidator, parse_json
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.telemetry.record import Record

log = logging.getLogger(__name__)

UNKNOWN_RECHECK_SECONDS = 5.0
TOPIC_CACHE_LIMIT = 100_000  # checked topics remembered by the RecordBuilder


class ThingDirectory:
    """Client id -> org id of provisioned things, cached; unknown ids are looked up again
    at most every few seconds."""

    def __init__(self, lookup: Callable[[str], str | None]) -> None:
        self._lookup = lookup
        self._known: dict[str, str] = {}
        self._unknown: dict[str, float] = {}
        self._lock = threading.Lock()

    def remember(self, client_id: str, org_id: str) -> None:
        with self._lock:
            self._known[client_id] = org_id
            self._unknown.pop(client_id, None)

    def org_of(self, client_id: str) -> str | None:
        org = self._known.get(client_id)
        if org is not None:
            return org
        now = time.monotonic()
        with self._lock:
            checked = self._unknown.get(client_id)
            if checked is not None and now - checked < UNKNOWN_RECHECK_SECONDS:
                return None
        try:
            org = self._lookup(client_id)
        except Exception:
            log.exception("thing lookup failed")
            org = None
        with self._lock:
            if org is None:
                self._unknown[client_id] = now
            else:
                self._known[client_id] = org
        return org


class RecordBuilder:
    """Turns ``(topic, payload)`` into a :class:`Record`: parse, validate, check the topic,
    pick out what the monitor shows (status, speed, counters).

    A topic whose org id and client id check out is remembered (up to
    :data:`TOPIC_CACHE_LIMIT`), so later messages on it skip the split and the registry:
    the directory's answer for a known client id does not change."""

    def __init__(
        self,
        validator: MessageValidator,
        things: ThingDirectory,
        telemetry_topic: str = TELEMETRY_TOPIC,
    ) -> None:
        self.validator = validator
        self.things = things
        self.prefix = telemetry_topic.rstrip("/")
        self._prefix_levels = self.prefix.split("/")
        self._good_topics: dict[str, tuple[str, str | None, str | None]] = {}

    def topic_ids(self, topic: str) -> tuple[str, str | None, str | None]:
        """``(client id, org id, problem)`` from a telemetry topic."""
        levels = topic.split("/")
        depth = len(self._prefix_levels)
        if len(levels) == depth + 2 and levels[:depth] == self._prefix_levels:
            org_id, client_id = levels[depth], levels[depth + 1]
            if not org_id or not client_id:
                return client_id or "?", org_id or None, f"topic is not {self.prefix}/ORG/CLIENT"
            real_org = self.things.org_of(client_id)
            if real_org is None:
                return client_id, org_id, f"unknown client id {client_id}"
            if real_org != org_id:
                return (
                    client_id,
                    org_id,
                    f"org id {org_id} in the topic is not the device's organization {real_org}",
                )
            return client_id, org_id, None
        tail = levels[depth:] if levels[:depth] == self._prefix_levels else levels
        client_id = tail[-1] if tail and tail[-1] else "?"
        return client_id, None, f"topic is not {self.prefix}/ORG/CLIENT"

    def build(self, topic: str, body: bytes, received_at: float) -> Record:
        ids = self._good_topics.get(topic)
        if ids is None:
            ids = self.topic_ids(topic)
            if ids[2] is None:
                if len(self._good_topics) >= TOPIC_CACHE_LIMIT:
                    self._good_topics.clear()
                self._good_topics[topic] = ids
        client_id, org_id, problem = ids
        value, parse_issue = parse_json(body)
        issues = [parse_issue] if parse_issue is not None else self.validator.validate(value)
        errors = [{"path": i.path, "reason": i.message} for i in issues] if issues else None
        # A message on a topic that is not its sender's own is never valid, whatever its body.
        valid = not issues and problem is None
        if type(value) is not dict:
            return Record(
                received_at, topic, client_id, org_id, problem, None, valid, errors,
                None, None, None, None, None, None, None, None, None, body,
            )  # fmt: skip
        # Parsed JSON holds exact types only (no subclasses): ``type(x) is ...`` is enough.
        get = value.get
        uuid, eventtype, eventsubtype = (
            get("sendereventuuid"),
            get("eventtype"),
            get("eventsubtype"),
        )
        version, assetid, stamp = get("payloadversion"), get("assetid"), get("assettimestamp")
        status = speed = counter = total = None
        payload = get("payload")
        if type(payload) is dict:
            signal = payload.get("signalstatus")
            info = signal.get("deviceinfo") if type(signal) is dict else None
            if type(info) is dict:
                status = info.get("status")
                speed = info.get("speed")
                counter = info.get("productioncounter")
                total = info.get("totalproductioncounter")
        return Record(
            received_at,
            topic,
            client_id,
            org_id,
            problem,
            uuid if type(uuid) is str else None,
            valid,
            errors,
            eventtype if type(eventtype) is str else None,
            eventsubtype if type(eventsubtype) is str else None,
            version if type(version) is int else None,
            assetid if type(assetid) is str else None,
            stamp if type(stamp) is str else None,
            status if type(status) is str else None,
            float(speed) if type(speed) is float or type(speed) is int else None,
            float(counter) if type(counter) is float or type(counter) is int else None,
            float(total) if type(total) is float or type(total) is int else None,
            body,
        )
