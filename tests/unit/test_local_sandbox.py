"""Which sandbox ``--env local`` means: the id the sandbox on the default port publishes
(the real sandbox's answer is tested in test_sandbox_lifecycle), nothing from other
servers, and no question asked for any other environment."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iotref.cli import local_sandbox
from iotref.cli.local_sandbox import resolve_cli_environment, sandbox_id_at
from tests.support.ports import free_port


@contextlib.contextmanager
def _server(status: int, body: bytes) -> Iterator[str]:
    """A real HTTP server on a free port that answers every GET with ``status``/``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, {"status": "ok", "version": "1", "sandbox_id": "0a1b2c3d"}, "0a1b2c3d"),
        (200, {"status": "ok"}, None),  # a health check of something else
        (200, {"sandbox_id": 42}, None),
        (404, {"sandbox_id": "0a1b2c3d"}, None),
    ],
)
def test_the_id_comes_only_from_a_sandbox_answer(
    status: int, body: dict[str, object], expected: str | None
) -> None:
    with _server(status, json.dumps(body).encode()) as url:
        assert sandbox_id_at(url) == expected


def test_no_id_from_garbage_a_closed_port_or_a_silent_listener() -> None:
    with _server(200, b"<html>not json</html>") as url:
        assert sandbox_id_at(url) is None
    assert sandbox_id_at(f"http://127.0.0.1:{free_port()}") is None
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        assert sandbox_id_at(f"http://127.0.0.1:{port}", timeout=0.2) is None
    assert sandbox_id_at("https://directory.sandbox.zaikio.com") is None  # only plain loopback


def test_only_the_built_in_local_environment_asks_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def probe(url: str, timeout: float = 1.0) -> str | None:
        asked.append(url)
        return "c0ffee00c0ffee00"

    monkeypatch.setattr(local_sandbox, "sandbox_id_at", probe)
    monkeypatch.delenv("IOTREF_ENV", raising=False)
    monkeypatch.delenv("IOTREF_ENV_FILE", raising=False)
    env = resolve_cli_environment("local", None)
    assert asked == ["http://127.0.0.1:8780"]
    assert env.sandbox_id == "c0ffee00c0ffee00"
    assert env.identity.sandbox_id == "c0ffee00c0ffee00"
    assert resolve_cli_environment(None, None).sandbox_id == "c0ffee00c0ffee00"  # the default

    asked.clear()
    assert resolve_cli_environment("test", None).sandbox_id is None
    written = tmp_path / "env.local"
    written.write_text(
        "base_url=http://127.0.0.1:8780\nDIRECTORY_HOST=http://127.0.0.1:8780\n"
        "DIRECTORY_OAUTH_CLIENT_ID=abc\nSCOPE=x\nSANDBOX_ID=aaaa0001\n"
    )
    # A sandbox's own env file already names its sandbox.
    assert resolve_cli_environment(None, written).sandbox_id == "aaaa0001"
    assert asked == []
