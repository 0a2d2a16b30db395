"""The generated mosquitto.conf and ACL file."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotref.protocol.limits import MAX_KEEPALIVE_SECONDS, MAX_PAYLOAD_BYTES
from iotref.protocol.topics import SHADOW_RESPONSE_SUFFIXES
from iotref.sandbox.broker.config import (
    MAX_QUEUED_MESSAGES,
    PACKET_OVERHEAD_BYTES,
    TELEMETRY_TOPIC,
    BrokerConfig,
    BrokerLimits,
    Listener,
    ThingPolicy,
    is_topic_level,
    render_acl,
    render_config,
)


def test_acl_rules() -> None:
    things = [ThingPolicy("iotref-aaa", "org-1"), ThingPolicy("iotref-bbb", "org-2")]
    text = render_acl(things)
    lines = text.splitlines()
    writes = {ln.split(" ", 2)[2] for ln in lines if ln.startswith("pattern write ")}
    reads = {ln.split(" ", 2)[2] for ln in lines if ln.startswith("pattern read ")}
    for op in ("get", "update", "delete"):
        assert f"$aws/things/%u/shadow/{op}" in writes
        assert f"$aws/things/%u/shadow/name/+/{op}" in writes
    assert len(writes) == 6  # no telemetry pattern: that one is per thing
    for suffix in SHADOW_RESPONSE_SUFFIXES:
        assert f"$aws/things/%u/shadow/{suffix}" in reads
        assert f"$aws/things/%u/shadow/name/+/{suffix}" in reads
    assert len(reads) == 2 * len(SHADOW_RESPONSE_SUFFIXES)
    assert not any(ln.startswith("pattern readwrite") for ln in lines)
    assert f"user iotref-aaa\ntopic write {TELEMETRY_TOPIC}/org-1/iotref-aaa\n" in text
    assert f"user iotref-bbb\ntopic write {TELEMETRY_TOPIC}/org-2/iotref-bbb\n" in text
    topic_lines = [ln for ln in lines if ln.startswith("topic ")]
    assert len(topic_lines) == 2
    # the services and the operator are not in the ACL file (the plugin grants them)
    assert "iotref-platform" not in text and "iotref-operator" not in text


@pytest.mark.parametrize(
    "thing",
    [
        ThingPolicy("iotref-a", "org/other"),
        ThingPolicy("iotref-a", "+"),
        ThingPolicy("iotref-#", "org-1"),
        ThingPolicy("iotref-a", "org 1"),
        ThingPolicy("iotref-a\nuser x", "org-1"),
        ThingPolicy("", "org-1"),
    ],
)
def test_acl_refuses_ids_that_are_not_one_topic_level(thing: ThingPolicy) -> None:
    assert not (is_topic_level(thing.client_id) and is_topic_level(thing.org_id))
    with pytest.raises(ValueError, match="unusable"):
        render_acl([thing])


def test_config(tmp_path: Path) -> None:
    common = {"cafile": tmp_path / "ca.pem", "crlfile": tmp_path / "crl.pem"}
    config = BrokerConfig(
        broker_dir=tmp_path,
        log_file=tmp_path / "log",
        acl_file=tmp_path / "acl",
        certfile=tmp_path / "cert",
        keyfile=tmp_path / "key",
        listeners=[
            Listener(8883, "127.0.0.1", max_connections=100, identity_is_client_id=True, **common),
            Listener(9999, "127.0.0.1", max_connections=5, identity_is_client_id=False, **common),
        ],
        run_as_root=True,
        dynsec_plugin=tmp_path / "dynsec.so",
        dynsec_config=tmp_path / "dynamic-security.json",
    )
    text = render_config(config)
    lines = text.splitlines()
    # the plugin is asked before the ACL file
    plugin = lines.index(f"plugin {tmp_path}/dynsec.so")
    assert lines[plugin + 1] == f"plugin_opt_config_file {tmp_path}/dynamic-security.json"
    assert lines.index(f"acl_file {tmp_path}/acl") > plugin
    # AWS IoT Core's limits, as shipped
    assert f"max_packet_size {MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES}" in lines
    assert f"max_keepalive {MAX_KEEPALIVE_SECONDS}" in lines
    assert "persistent_client_expiration 1h" in lines
    assert not any(ln.startswith("message_size_limit") for ln in lines)
    assert "per_listener_settings false" in text
    assert "allow_anonymous false" in text
    assert f"persistence_location {tmp_path}/" in text
    assert "user root" in text
    # A burst to the ingestion's connections waits in the broker instead of being dropped.
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}" in text.splitlines()
    first, second = text.split("\nlistener ")[1:]
    assert first.startswith("8883 127.0.0.1")
    assert "use_username_as_clientid true" in first
    assert "use_username_as_clientid false" in second
    for block in (first, second):
        for line in (
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            f"crlfile {tmp_path}/crl.pem",
        ):
            assert line in block
    plain = render_config(
        BrokerConfig(tmp_path, tmp_path / "l", tmp_path / "a", tmp_path / "c", tmp_path / "k")
    )
    assert "user root" not in plain
    assert "plugin " not in plain


def test_limits_from_options(tmp_path: Path) -> None:
    limits = BrokerLimits(max_payload_bytes=4096, max_keepalive=60, session_expiry_hours=168)
    config = BrokerConfig(
        tmp_path, tmp_path / "l", tmp_path / "a", tmp_path / "c", tmp_path / "k", limits=limits
    )
    lines = render_config(config).splitlines()
    assert f"max_packet_size {4096 + PACKET_OVERHEAD_BYTES}" in lines
    assert "max_keepalive 60" in lines
    assert "persistent_client_expiration 168h" in lines
