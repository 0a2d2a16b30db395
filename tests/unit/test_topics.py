"""Topic names of the platform contract (section 6)."""

from __future__ import annotations

import pytest

from iotref.protocol.topics import (
    parse_shadow_topic,
    shadow_topic,
    telemetry_topic,
)


def test_telemetry_topic() -> None:
    assert telemetry_topic("a/telemetry/", "org", "thing") == "a/telemetry/org/thing"


def test_classic_and_named_shadow_topics_round_trip() -> None:
    classic = shadow_topic("thing-1", "update/accepted")
    assert classic == "$aws/things/thing-1/shadow/update/accepted"
    assert parse_shadow_topic(classic) == ("thing-1", None, "update/accepted")
    named = shadow_topic("thing-1", "get", shadow_name="config")
    assert named == "$aws/things/thing-1/shadow/name/config/get"
    assert parse_shadow_topic(named) == ("thing-1", "config", "get")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "telemetry/x/y",
        "$aws/things/t/shadow",
        "$aws/things/t/shadow/name/n",
        "$aws/things/t/shadow/update/other",
        "$aws/things/t/jobs/get",
    ],
)
def test_non_shadow_topics_are_refused(topic: str) -> None:
    assert parse_shadow_topic(topic) is None
