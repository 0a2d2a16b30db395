"""Mosquitto run and supervised by the sandbox: the MQTT side of the platform.

Owns the broker process: writes ``mosquitto.conf``, the ACL file (every thing's policy),
the CRL and the dynamic-security plugin's file into the broker dir, starts Mosquitto, waits
until its TLS listeners answer, restarts it (with a backoff) when it dies unexpectedly, and
stops it with the sandbox. While it runs, a provisioned or revoked thing's policy takes
effect through a reload (SIGHUP: the ACL file and the CRL are read again, no connection is
dropped), and a revoked thing is disconnected through the dynamic-security plugin. Mosquitto
gets ``PR_SET_PDEATHSIG`` so it never outlives a killed sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import resource
import shutil
import signal
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
from starlette.routing import BaseRoute

from iotref.device.files import PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from iotref.sandbox.broker import dynamic_security as dynsec
from iotref.sandbox.broker.config import (
    PLATFORM_MAX_CONNECTIONS,
    TELEMETRY_TOPIC,
    BrokerConfig,
    BrokerLimits,
    Listener,
    ThingPolicy,
    is_topic_level,
    render_acl,
    render_config,
)
from iotref.sandbox.context import INGESTION_SUBSCRIBED, LOOPBACK, SandboxContext
from iotref.sandbox.errors import SandboxError
from iotref.sandbox.provisioning.certificate_authority import CertificateAuthorities
from iotref.sandbox.provisioning.things import ThingRegistry

log = logging.getLogger(__name__)

IPV6_LOOPBACK = "::1"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a run this long resets the backoff
FD_RESERVE = 512  # descriptors kept for listeners, log, persistence, platform clients
NOFILE_CAP = 1 << 20  # used when the hard limit is "unlimited"
_PR_SET_PDEATHSIG = 1
DYNSEC_PLUGIN_ENV = "IOTREF_DYNSEC_PLUGIN"


class BrokerError(SandboxError):
    """Mosquitto cannot be started; the message says why in one line."""


def nofile_target() -> int:
    """The descriptor limit Mosquitto will run with: this process's hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return NOFILE_CAP
    return int(hard)


def _make_preexec(parent_pid: int, nofile: int) -> Callable[[], None]:
    """What runs in the child between fork and exec (no logging, no locks there)."""
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(libc_name, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the sandbox died before prctl took effect
            os._exit(1)
        with contextlib.suppress(OSError, ValueError):
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    return preexec


def ipv6_loopback_free(port: int) -> bool:
    """Whether ``[::1]:port`` exists on this machine and can be bound."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((IPV6_LOOPBACK, port))
    except OSError:
        return False
    return True


class Broker:
    """The supervised Mosquitto of one sandbox (a sandbox component)."""

    def __init__(self, ctx: SandboxContext, cas: CertificateAuthorities, things: ThingRegistry):
        self.ctx = ctx
        self.cas = cas
        self.things = things
        self.telemetry_topic = TELEMETRY_TOPIC
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._expected_exit = False
        self._ipv6 = False
        self._started_at = 0.0
        self.restarts = 0
        self.nofile = nofile_target()
        self._binary = ctx.settings.mosquitto_binary
        self._plugin: Path | None = None
        settings = ctx.settings
        self.limits = BrokerLimits(
            max_payload_bytes=settings.max_payload_bytes,
            max_keepalive=settings.max_keepalive,
            session_expiry_hours=settings.session_expiry_hours,
        )
        self._policy_requests = 0
        self._policy_applied = 0
        self._unusable: set[str] = set()
        ctx.events.subscribe(INGESTION_SUBSCRIBED, self.save_database)

    # --- files -------------------------------------------------------------------------

    @property
    def broker_dir(self) -> Path:
        return self.ctx.paths.broker_dir

    @property
    def config_path(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def crl_path(self) -> Path:
        return self.broker_dir / "crl.pem"

    @property
    def dynsec_path(self) -> Path:
        """The dynamic-security plugin's file (kept by the plugin while Mosquitto runs)."""
        return self.broker_dir / "dynamic-security.json"

    @property
    def log_path(self) -> Path:
        return self.ctx.paths.log_dir / "mosquitto.log"

    @property
    def output_path(self) -> Path:
        """Mosquitto's stdout/stderr (errors before its log file is open)."""
        return self.ctx.paths.log_dir / "mosquitto.out"

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    def save_database(self, **_: Any) -> None:
        """Have Mosquitto write its persistence database now (SIGUSR1): the platform's
        persistent sessions just made survive a crash of the broker from then on."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return
        log.info("mosquitto (pid %d) asked to save its database", pid)

    @property
    def listens_on_ipv6(self) -> bool:
        return self._ipv6

    def routes(self) -> Sequence[BaseRoute]:
        return []

    def write_files(self) -> None:
        """Write every file Mosquitto reads into the broker dir (Mosquitto not running)."""
        ensure_private_dir(self.broker_dir)
        self.ctx.paths.log_dir.mkdir(parents=True, exist_ok=True)
        revoked = self._write_policy_files()
        dynsec.reconcile(self.dynsec_path, revoked)
        device_connections = max(self.nofile - FD_RESERVE - PLATFORM_MAX_CONNECTIONS, 64)
        cas = self.cas
        device_listeners = [LOOPBACK] + ([IPV6_LOOPBACK] if self._ipv6 else [])
        listeners = [
            Listener(
                port=self.ctx.mqtt_port,
                address=address,
                cafile=cas.client_ca_bundle_path.resolve(),
                crlfile=self.crl_path.resolve(),
                max_connections=device_connections,
                identity_is_client_id=True,
            )
            for address in device_listeners
        ]
        listeners.append(
            Listener(
                port=self.ctx.platform_mqtt_port,
                address=LOOPBACK,
                cafile=cas.platform_ca_path.resolve(),
                crlfile=self.crl_path.resolve(),
                max_connections=PLATFORM_MAX_CONNECTIONS,
                identity_is_client_id=False,
            )
        )
        config = BrokerConfig(
            broker_dir=self.broker_dir.resolve(),
            log_file=self.log_path.resolve(),
            acl_file=self.acl_path.resolve(),
            certfile=cas.broker_cert_path.resolve(),
            keyfile=cas.broker_key_path.resolve(),
            listeners=listeners,
            run_as_root=os.geteuid() == 0,
            dynsec_plugin=self._plugin,
            dynsec_config=self.dynsec_path.resolve(),
            limits=self.limits,
        )
        write_atomic(self.config_path, render_config(config).encode())

    def _write_policy_files(self) -> list[str]:
        """Write the ACL file (from the thing registry) and the CRL; the revoked things."""
        requested = self._policy_requests
        policies: list[ThingPolicy] = []
        revoked: list[str] = []
        for client_id, org_id, is_revoked in self.things.policies():
            if is_revoked:
                revoked.append(client_id)
            elif is_topic_level(client_id) and is_topic_level(org_id):
                policies.append(ThingPolicy(client_id, org_id))
            elif client_id not in self._unusable:
                self._unusable.add(client_id)
                log.error("thing %r has an id unusable in a topic; it gets no rights", client_id)
        acl = render_acl(policies, self.telemetry_topic)
        write_atomic(self.acl_path, acl.encode())
        self._copy_crl()
        self._policy_applied = max(self._policy_applied, requested)
        return revoked

    def _copy_crl(self) -> None:
        write_atomic(self.crl_path, self.cas.crl_path.read_bytes(), PUBLIC_FILE_MODE)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        binary = shutil.which(self.ctx.settings.mosquitto_binary)
        if binary is None:
            raise BrokerError(
                f"the MQTT broker '{self.ctx.settings.mosquitto_binary}' was not found; "
                "install Mosquitto (e.g. apt-get install mosquitto) or put it on PATH"
            )
        self._binary = binary
        configured = self.ctx.settings.dynsec_plugin or os.environ.get(DYNSEC_PLUGIN_ENV)
        plugin = dynsec.find_plugin(configured)
        if plugin is None:
            where = configured or f"the usual library folders ({dynsec.PLUGIN_FILE})"
            raise BrokerError(
                f"Mosquitto's dynamic-security plugin was not found in {where}; install "
                f"Mosquitto 2.0 or newer with its plugins, or set {DYNSEC_PLUGIN_ENV} to its path"
            )
        self._plugin = plugin
        self._stopping = False
        self._ipv6 = ipv6_loopback_free(self.ctx.mqtt_port)
        if not self._ipv6:
            log.warning(
                "not listening on [::1]:%d (IPv6 loopback missing or port taken); "
                "clients should connect to 127.0.0.1",
                self.ctx.mqtt_port,
            )
        self.write_files()
        log.info("mosquitto file descriptor limit: %d", self.nofile)
        async with self._lock:
            await self._launch()
        self._supervisor = asyncio.create_task(self._supervise(), name="mosquitto-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        async with self._lock:
            await self._terminate()

    async def restart(self) -> None:
        """Stop Mosquitto (it saves its sessions) and start it again with fresh files; every
        connection is dropped. Policies and revocations do not need this."""
        async with self._lock:
            if self._stopping:
                return
            self._expected_exit = True
            try:
                await self._terminate()
                self.write_files()
                await self._launch()
            finally:
                self._expected_exit = False
        log.info("mosquitto restarted (pid %s)", self.pid)

    async def apply_policies(self) -> None:
        """Make the registry's things and revocations the broker's: rewrite the ACL file and
        the CRL and have Mosquitto read them again (SIGHUP; no connection is dropped).
        Returns once Mosquitto has; calls made meanwhile share one reload."""
        self._policy_requests += 1
        wanted = self._policy_requests
        async with self._lock:
            if self._policy_applied >= wanted:
                return
            self._write_policy_files()
            proc = self._proc
            if self._stopping or proc is None or proc.returncode is not None:
                return  # the next start reads the files
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)
            try:
                async with self._control().session() as session:
                    await dynsec.barrier(session)
            except (dynsec.DynsecError, aiomqtt.MqttError, OSError) as exc:
                log.warning("mosquitto reloads its policies; not confirmed: %s", exc)

    async def revoke(self, client_id: str) -> None:
        """Disconnect ``client_id`` now and refuse it from now on (its certificate must be
        revoked and the thing marked revoked first): a disabled client with no rights in
        the dynamic-security plugin, no policy in the ACL file, the new CRL read by
        Mosquitto. Every other connection stays up."""
        await self._disable(client_id)
        await self.apply_policies()
        # A reconnect between the first disable and the reload got in with no rights at
        # all; the CRL refuses it from now on, this disconnects it.
        await self._disable(client_id)

    async def _disable(self, client_id: str) -> None:
        proc = self._proc
        if self._stopping or proc is None or proc.returncode is not None:
            return  # the plugin's file is brought in line before the next start
        try:
            async with self._control().session() as session:
                await dynsec.revoke(session, client_id)
        except (dynsec.DynsecError, aiomqtt.MqttError, OSError) as exc:
            log.error("disconnecting revoked %s failed: %s", client_id, exc)
            return
        log.info("%s disabled in the broker (disconnected)", client_id)

    def _control(self) -> dynsec.DynsecControl:
        return dynsec.DynsecControl(
            self.ctx.platform_mqtt_port,
            self.cas.ca_bundle_path,
            self.cas.platform_cert_path,
            self.cas.platform_key_path,
        )

    # --- internals ---------------------------------------------------------------------

    async def _launch(self) -> None:
        out = self.output_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._binary,
                "-c",
                str(self.config_path.resolve()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=_make_preexec(os.getpid(), self.nofile),
            )
        finally:
            out.close()
        self._started_at = time.monotonic()
        try:
            await self._wait_ready(self._proc)
        except BaseException:
            await self._terminate()
            raise
        log.info(
            "mosquitto (pid %d) ready on mqtts://%s:%d (devices) and %s:%d (platform)",
            self._proc.pid,
            self.ctx.mqtt_host,
            self.ctx.mqtt_port,
            LOOPBACK,
            self.ctx.platform_mqtt_port,
        )

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        targets = [(LOOPBACK, self.ctx.mqtt_port), (LOOPBACK, self.ctx.platform_mqtt_port)]
        if self._ipv6:
            targets.append((IPV6_LOOPBACK, self.ctx.mqtt_port))
        context = ssl.create_default_context(cafile=str(self.cas.ca_bundle_path))
        context.load_cert_chain(self.cas.platform_cert_path, self.cas.platform_key_path)
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(targets)
        last_error = ""
        while pending:
            if proc.returncode is not None:
                raise BrokerError(
                    f"mosquitto exited with code {proc.returncode} while starting: "
                    f"{self._last_error_line()}"
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not accept TLS connections in {READY_TIMEOUT:.0f}s "
                    f"({last_error}); see {self.log_path}"
                )
            host, port = pending[0]
            try:
                _reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=context, server_hostname="localhost"),
                    timeout=2,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                last_error = f"{host}:{port}: {exc}"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            pending.pop(0)

    def _last_error_line(self) -> str:
        for path in (self.output_path, self.log_path):
            try:
                lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
            except OSError:
                continue
            errors = [ln for ln in lines if "error" in ln.lower()]
            if errors:
                return errors[-1]
        return f"see {self.output_path}"

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning(
                "mosquitto (pid %d) did not stop in %.0fs; killing it", proc.pid, STOP_TIMEOUT
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _supervise(self) -> None:
        backoff = BACKOFF_INITIAL
        while not self._stopping:
            proc = self._proc
            if proc is None:
                await asyncio.sleep(0.1)
                continue
            await proc.wait()
            if self._stopping:
                return
            async with self._lock:
                if self._stopping or self._proc is not proc or self._expected_exit:
                    continue  # a restart() replaced it meanwhile
                if time.monotonic() - self._started_at > STABLE_AFTER:
                    backoff = BACKOFF_INITIAL
                log.warning(
                    "mosquitto (pid %d) exited unexpectedly with code %s; restarting it in %.1fs",
                    proc.pid,
                    proc.returncode,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                if self._stopping:
                    return
                try:
                    self.write_files()
                    await self._launch()
                except Exception as exc:
                    log.error("restarting mosquitto failed: %s", exc)
                    continue
                self.restarts += 1
                log.warning(
                    "mosquitto restarted after an unexpected exit (pid %d)",
                    self._proc.pid if self._proc else -1,
                )
