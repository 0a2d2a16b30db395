"""The generated mosquitto.conf and ACL file."""

from __future__ import annotations

from pathlib import Path

from iotref.protocol.topics import SHADOW_RESPONSE_SUFFIXES
from iotref.sandbox.broker_config import (
    MAX_QUEUED_MESSAGES,
    TELEMETRY_TOPIC,
    BrokerConfig,
    Listener,
    render_acl,
    render_config,
)


def test_acl_rules() -> None:
    lines = render_acl().splitlines()
    writes = {ln.split(" ", 2)[2] for ln in lines if ln.startswith("pattern write ")}
    reads = {ln.split(" ", 2)[2] for ln in lines if ln.startswith("pattern read ")}
    assert f"{TELEMETRY_TOPIC}/+/%u" in writes
    for op in ("get", "update", "delete"):
        assert f"$aws/things/%u/shadow/{op}" in writes
        assert f"$aws/things/%u/shadow/name/+/{op}" in writes
    assert len(writes) == 7
    for suffix in SHADOW_RESPONSE_SUFFIXES:
        assert f"$aws/things/%u/shadow/{suffix}" in reads
        assert f"$aws/things/%u/shadow/name/+/{suffix}" in reads
    assert len(reads) == 2 * len(SHADOW_RESPONSE_SUFFIXES)
    assert not any(ln.startswith("pattern readwrite") for ln in lines)
    text = "\n".join(lines)
    for user in ("iotref-platform", "iotref-operator"):
        assert f"user {user}\ntopic readwrite #\ntopic readwrite $aws/#" in text


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
    )
    text = render_config(config)
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
    assert "user root" not in render_config(
        BrokerConfig(tmp_path, tmp_path / "l", tmp_path / "a", tmp_path / "c", tmp_path / "k")
    )
