"""``iotref sandbox up``: start every component in one process, write ``sandbox.json`` and
``env.local`` when ready, and stop everything on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import uvicorn

from iotref._version import __version__
from iotref.device.files import PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from iotref.protocol.environment_file import (
    BASE_URL,
    DEFAULT_SCOPE,
    DIRECTORY_HOST,
    DIRECTORY_OAUTH_CLIENT_ID,
    PUBLISH_RATE_LIMIT,
    SANDBOX_ID,
    SCOPE,
    THROUGHPUT_LIMIT,
    format_env_file,
)
from iotref.sandbox.app import Component, build_app
from iotref.sandbox.context import LOOPBACK, SandboxContext, SandboxPaths, SandboxSettings
from iotref.sandbox.errors import SandboxError

log = logging.getLogger("iotref.sandbox")


@dataclass
class RunningSandbox:
    """What ``sandbox.json`` says about a running sandbox, if its lock is held."""

    pid: int | None
    info: dict[str, Any] | None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _bind_http(port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio turns TCP_NODELAY on for accepted connections only when
    # the listening socket says so; without it every request on a kept-alive connection
    # waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SandboxError(
                f"HTTP port {port} is in use: stop what uses it or pass --http-port 0"
            ) from exc
        raise
    sock.listen(512)
    sock.set_inheritable(False)
    return sock


def _check_port_free(port: int, what: str, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            raise SandboxError(
                f"{what} port {port} is in use: stop what uses it or pass {option} 0"
            ) from exc


class _Lock:
    """An exclusive ``flock`` on ``sandbox.lock``: one sandbox per data dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            running = read_running(self.path.parent)
            where = ""
            if running.info:
                where = f" at {running.info.get('http_url')}"
            pid = f" (pid {running.pid})" if running.pid else ""
            raise SandboxError(
                f"a sandbox is already running on {self.path.parent}{pid}{where}; "
                "stop it first or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def read_running(data_dir: Path) -> RunningSandbox:
    """Whether a sandbox holds ``data_dir``'s lock, and what its ``sandbox.json`` says."""
    paths = SandboxPaths(data_dir)
    if not paths.lock_file.exists():
        return RunningSandbox(None, None)
    try:
        fd = os.open(paths.lock_file, os.O_RDONLY)
    except OSError:
        return RunningSandbox(None, None)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: running
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return RunningSandbox(None, None)
        raw = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    pid = int(raw) if raw.isdigit() else None
    info: dict[str, Any] | None = None
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(paths.sandbox_json.read_text())
    return RunningSandbox(pid, info)


def _configure_logging(paths: SandboxPaths, stream: TextIO) -> logging.Handler:
    """Info and up into ``logs/sandbox.log``; on ``stream`` too unless the caller (the
    ``iotref`` command, by its -v/--quiet) already logs somewhere. Returns the file's
    handler."""
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    if not root.handlers:
        console = logging.StreamHandler(stream)
        console.setFormatter(formatter)
        console.setLevel(logging.INFO)
        root.addHandler(console)
    file_handler = logging.FileHandler(paths.log_dir / "sandbox.log")
    file_handler.setFormatter(formatter)
    file_handler.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.setLevel(min(handler.level or logging.DEBUG for handler in root.handlers))
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return file_handler


class Sandbox:
    """One running sandbox: its components, HTTP server and files."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.paths = SandboxPaths(settings.data_dir)
        self._lock = _Lock(self.paths.lock_file)
        self._stop = asyncio.Event()
        self.components: list[Component] = []
        self.ctx: SandboxContext | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, ready: Any = None) -> None:
        """Start, announce readiness through ``ready(info)``, wait for stop, shut down."""
        ensure_private_dir(self.paths.data_dir)
        self._lock.acquire()
        started: list[Component] = []
        server: uvicorn.Server | None = None
        serve_task: asyncio.Task[None] | None = None
        try:
            ctx = SandboxContext.open(self.settings)
            self.ctx = ctx
            http_sock = _bind_http(self.settings.http_port)
            http_port = http_sock.getsockname()[1]
            ctx.http_url = f"http://{LOOPBACK}:{http_port}"
            ctx.mqtt_port = self.settings.mqtt_port or _free_port()
            if self.settings.mqtt_port:
                _check_port_free(ctx.mqtt_port, "MQTT", "--mqtt-port")
            ctx.platform_mqtt_port = self.settings.platform_mqtt_port or _free_port()
            self.components = self._make_components(ctx)
            for component in self.components:
                await component.start()
                started.append(component)
            app = build_app(self.components, sandbox_id=ctx.sandbox_id)
            config = uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=3
            )
            server = uvicorn.Server(config)
            serve_task = asyncio.create_task(server.serve(sockets=[http_sock]))
            while not server.started:
                if serve_task.done():
                    serve_task.result()
                    raise SandboxError("the HTTP server stopped while starting")
                await asyncio.sleep(0.02)
            info = self._write_files(ctx)
            if ready is not None:
                ready(info)
            stop_wait = asyncio.create_task(self._stop.wait())
            await asyncio.wait({stop_wait, serve_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
        finally:
            with contextlib.suppress(OSError):
                self.paths.sandbox_json.unlink()
            if server is not None and serve_task is not None:
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(serve_task, 10)
            for component in reversed(started):
                try:
                    await component.stop()
                except Exception:
                    log.exception("stopping %s failed", type(component).__name__)
            if self.ctx is not None:
                self.ctx.db.close()
            self._lock.release()

    def _make_components(self, ctx: SandboxContext) -> list[Component]:
        from iotref.sandbox.broker.supervisor import Broker
        from iotref.sandbox.directory.service import Directory
        from iotref.sandbox.monitor.component import Monitor
        from iotref.sandbox.provisioning.bulk import BulkProvisioning
        from iotref.sandbox.provisioning.certificate_authority import (
            DEVICE_CRL_PATH,
            CertificateAuthorities,
        )
        from iotref.sandbox.provisioning.service import Provisioning
        from iotref.sandbox.provisioning.things import ThingRegistry
        from iotref.sandbox.quota_meter import QuotaMeter
        from iotref.sandbox.shadow.service import ShadowService
        from iotref.sandbox.telemetry.ingestion import Ingestion

        cas = CertificateAuthorities(ctx.paths.ca_dir)
        cas.ensure()
        cas.device_crl_url = f"{ctx.http_url}{DEVICE_CRL_PATH}"
        self.cas = cas
        things = ThingRegistry(ctx.db)
        directory = Directory(ctx)
        broker = Broker(ctx, cas, things)
        provisioning = Provisioning(ctx, directory, cas, things, broker)
        bulk_provisioning = BulkProvisioning(ctx, directory, cas, things, provisioning)
        limits = ctx.settings.limits
        meter = QuotaMeter(limits.publish_rate, limits.throughput)
        shadows = ShadowService(ctx, cas, meter=meter)
        ingestion = Ingestion(ctx, cas, things, meter=meter)
        monitor = Monitor(ctx, ingestion, shadows, directory, things, meter=meter)
        # The ingestion subscribes before the shadow service answers: a device that
        # boots with the sandbox publishes only once its shadow granted the permission,
        # and then the ingestion already takes every message (Mosquitto 2.0 does not
        # restore the ingestion's shared subscription from its database).
        return [directory, broker, provisioning, bulk_provisioning, ingestion, shadows, monitor]

    def _write_files(self, ctx: SandboxContext) -> dict[str, Any]:
        env = {
            BASE_URL: ctx.http_url,
            DIRECTORY_HOST: ctx.http_url,
            DIRECTORY_OAUTH_CLIENT_ID: self._client_id(),
            SCOPE: DEFAULT_SCOPE,
            SANDBOX_ID: ctx.sandbox_id,
            # The quotas this sandbox measures: a device using this file paces to them.
            PUBLISH_RATE_LIMIT: str(ctx.settings.limits.publish_rate),
            THROUGHPUT_LIMIT: str(ctx.settings.limits.throughput),
        }
        write_atomic(
            self.paths.env_file,
            format_env_file(
                env, comment="iotref sandbox on this machine (written by sandbox up)"
            ).encode(),
            PUBLIC_FILE_MODE,
        )
        cas = self.cas
        info: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data_dir": str(self.paths.data_dir.resolve()),
            "sandbox_id": ctx.sandbox_id,
            "http_url": ctx.http_url,
            "mqtt_host": ctx.mqtt_host,
            "mqtt_port": ctx.mqtt_port,
            "platform_mqtt_port": ctx.platform_mqtt_port,
            "admin_token": ctx.admin_token,
            "env_file": str(self.paths.env_file.resolve()),
            "ca_file": str(cas.ca_bundle_path.resolve()),
            "operator_cert": str(cas.operator_cert_path.resolve()),
            "operator_key": str(cas.operator_key_path.resolve()),
        }
        for component in self.components:
            describe = getattr(component, "describe", None)
            if describe is not None:
                info.update(describe())
        write_atomic(self.paths.sandbox_json, (json.dumps(info, indent=2) + "\n").encode())
        return info

    @staticmethod
    def _client_id() -> str:
        from iotref.sandbox.directory.seed import OAUTH_CLIENT_ID

        return OAUTH_CLIENT_ID


def monitor_url(info: dict[str, Any]) -> str:
    """The monitor's address with the admin token, from ``sandbox.json``'s values."""
    return f"{info['http_url']}/monitor?token={info['admin_token']}"


def banner(info: dict[str, Any], sandbox_json: Path, auto_approve: bool) -> str:
    """What ``iotref sandbox up`` prints once the sandbox is ready."""
    from iotref.sandbox.directory.seed import DEMO_EMAIL, DEMO_PASSWORD

    sign_in = f"{DEMO_EMAIL}, password {DEMO_PASSWORD}"
    if auto_approve:
        sign_in += " (not needed: --auto-approve approves every request as this person)"
    else:
        sign_in += " (on the page 'iotref login' opens)"
    return (
        f"sandbox ready: {info['http_url']}  mqtts://{info['mqtt_host']}:{info['mqtt_port']}\n"
        f"  monitor:    {monitor_url(info)}\n"
        f"  sign in:    {sign_in}\n"
        f"  env file:   {info['env_file']}\n"
        f"  details:    {sandbox_json.resolve()}\n"
        "Press Ctrl-C to stop.\n"
    )


def run_sandbox(settings: SandboxSettings, out: TextIO = sys.stdout) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    paths = SandboxPaths(settings.data_dir)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    log_file = _configure_logging(paths, sys.stderr)
    sandbox = Sandbox(settings)

    def ready(info: dict[str, Any]) -> None:
        out.write(banner(info, paths.sandbox_json, settings.auto_approve))
        out.flush()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sandbox.request_stop)
        await sandbox.run(ready)

    try:
        asyncio.run(main())
    except SandboxError as exc:
        sys.stderr.write(f"iotref sandbox: {exc}\n")
        return 1
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    out.write("sandbox stopped\n")
    return 0
