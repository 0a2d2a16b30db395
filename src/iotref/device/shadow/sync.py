"""Keeps a device's local state in step with one shadow (contract section 7).

On start and after every reconnect: subscribe, ``get``, take ``state.desired`` into the
local state and report it back as ``state.reported``. Between syncs: deltas applied as they
come (one older than the version applied is ignored), the reported state published after
every applied or local change, a way to await a value, and the ``sendTelemetryData``
permission with a change callback. The application decides desired changes through
:mod:`iotref.device.shadow.desired`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, overload

from iotref.device import stdlib_compat
from iotref.device.backoff import Backoff
from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import MqttError, PublishFailed
from iotref.device.shadow.desired import DesiredDecisions, DesiredHandler
from iotref.device.shadow.errors import ShadowError, ShadowRejected, ShadowTimeout
from iotref.device.shadow.requests import DEFAULT_TIMEOUT_S, ShadowClient
from iotref.device.shadow.waiters import ANY, SECTIONS, ValueWaiters, matcher
from iotref.protocol.shadow_document import (
    compute_delta,
    json_equal,
    merge_section,
    section_patch,
)

log = logging.getLogger("iotref.shadow")

JsonObject = dict[str, Any]
SEND_TELEMETRY_KEY = "sendTelemetryData"
RETRYABLE_CODES = frozenset({429, 500, 503})
"""Rejections worth retrying after a pause (throttled, internal error)."""
TelemetryCallback = Callable[[bool], Awaitable[None] | None]


class ShadowSync:
    """Keeps local state and one shadow in step. ``async with ShadowSync(conn, thing)``.

    ``desired`` mirrors the shadow's desired section as last seen; ``reported`` is the
    device's local state (what it reports); ``version`` is the shadow version whose desired
    state was applied last. A desired value is decided (accepted, adjusted or refused) once;
    it is offered to the handlers again only when it changes, after a restart, or on
    :meth:`reconcile`.
    """

    def __init__(
        self,
        connection: Connection,
        thing_name: str,
        shadow_name: str | None = None,
        *,
        initial_reported: Mapping[str, Any] | None = None,
        accept_unhandled: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        first_sync_timeout_s: float | None = None,
        client: ShadowClient | None = None,
    ) -> None:
        self.connection = connection
        self.client = client or ShadowClient(
            connection, thing_name, shadow_name, timeout_s=timeout_s
        )
        self._decisions = DesiredDecisions(accept_unhandled)
        self.first_sync_timeout_s = (
            timeout_s if first_sync_timeout_s is None else first_sync_timeout_s
        )
        self._desired: JsonObject = {}
        self._reported: JsonObject = copy.deepcopy(dict(initial_reported or {}))
        self._cloud_reported: JsonObject | None = None  # None: not synced yet
        self._version = -1
        self._telemetry_callbacks: list[TelemetryCallback] = []
        self._telemetry_allowed = False
        self._waiters = ValueWaiters()
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._lock = asyncio.Lock()
        self._report_needed = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._reporter_task: asyncio.Task[None] | None = None
        self._refused_patch: JsonObject = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._synced = asyncio.Event()
        self._sync_error: ShadowError | None = None
        self._started = False
        self.syncs = 0
        """Completed get-and-apply rounds (one per start and reconnect)."""
        self.reports = 0
        """Accepted reported updates."""
        self.last_error: str | None = None

    # ------------------------------------------------------------------ views

    @property
    def thing_name(self) -> str:
        return self.client.thing_name

    @property
    def shadow_name(self) -> str | None:
        return self.client.shadow_name

    @property
    def desired(self) -> JsonObject:
        return copy.deepcopy(self._desired)

    @property
    def reported(self) -> JsonObject:
        return copy.deepcopy(self._reported)

    @property
    def version(self) -> int:
        """The shadow version whose desired state was applied last (-1: none yet)."""
        return self._version

    @property
    def synced(self) -> bool:
        """Whether a get-and-apply round completed since the last (re)connect."""
        return self._synced.is_set()

    @property
    def send_telemetry_allowed(self) -> bool:
        """The ``sendTelemetryData`` permission: the desired value when the shadow has one,
        else the reported one; ``False`` while unknown."""
        return self._telemetry_allowed

    @property
    def accept_unhandled(self) -> bool:
        """Whether desired keys without a handler are applied as they come."""
        return self._decisions.accept_unhandled

    @accept_unhandled.setter
    def accept_unhandled(self, value: bool) -> None:
        self._decisions.accept_unhandled = value

    # ------------------------------------------------------------------ registration

    @overload
    def on_desired(self, key: str, handler: DesiredHandler) -> None: ...

    @overload
    def on_desired(self, key: DesiredHandler, handler: None = None) -> None: ...

    def on_desired(self, key: str | DesiredHandler, handler: DesiredHandler | None = None) -> None:
        """``on_desired("speed", h)`` decides changes of one top-level key;
        ``on_desired(h)`` decides every key that has no key handler (whole delta: return
        ``None`` to accept all, a dict of the changes to apply instead, or refuse)."""
        if isinstance(key, str):
            if handler is None:
                raise TypeError("on_desired(key, handler) needs a handler")
            self._decisions.on_key(key, handler)
        else:
            self._decisions.on_delta(key)

    def on_send_telemetry_changed(self, callback: TelemetryCallback) -> None:
        """``callback(allowed)`` whenever :attr:`send_telemetry_allowed` changes."""
        self._telemetry_callbacks.append(callback)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ShadowSync:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, *, wait: bool = True) -> None:
        """Subscribe, sync now if connected and after every reconnect. With ``wait``, wait
        for the first sync up to ``first_sync_timeout_s``: a rejection that retrying cannot
        fix (e.g. 403) raises :class:`ShadowRejected`; a timeout only logs (the sync goes on
        in the background)."""
        if self._started:
            return
        self._started = True
        self.client.add_listener(self._on_shadow_message)
        self.connection.add_connected_callback(self._on_connected)
        self._reporter_task = asyncio.get_running_loop().create_task(self._reporter())
        if self.connection.connected:
            self._start_sync()
        if wait:
            try:
                await self.wait_synced(self.first_sync_timeout_s)
            except TimeoutError:
                log.warning(
                    "%s: first sync not done within %g s; continuing in the background",
                    self.client.label,
                    self.first_sync_timeout_s,
                )

    async def stop(self) -> None:
        """Stop syncing (subscriptions are removed; the connection stays up)."""
        if not self._started:
            return
        self._started = False
        self.connection.remove_connected_callback(self._on_connected)
        self.client.remove_listener(self._on_shadow_message)
        for task in [self._sync_task, self._reporter_task, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._sync_task, self._reporter_task, *self._tasks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._tasks.clear()
        await self.client.close()
        self._waiters.cancel()
        for fut in self._flush_waiters:
            fut.cancel()

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait for a completed sync since the last (re)connect; raises the sync's error
        if it failed for good, :class:`TimeoutError` after ``timeout``."""
        if self._sync_error is not None:
            raise self._sync_error
        async with stdlib_compat.timeout(timeout):
            await self._synced.wait()
        if self._sync_error is not None:
            raise self._sync_error

    # ------------------------------------------------------------------ local state

    def set_reported(self, key: str, value: Any) -> None:
        """Set one local value (``None`` removes it) and report it."""
        self.update_local({key: value})

    def update_local(self, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into the local state (``None`` removes) and report them."""
        merge_section(self._reported, changes)
        self._after_local_change()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the shadow's reported section has every local change."""
        if self._report_pending() is False:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._report_needed.set()
        try:
            async with stdlib_compat.timeout(timeout):
                await fut
        finally:
            if fut in self._flush_waiters:
                self._flush_waiters.remove(fut)

    async def wait_for(
        self,
        key: str,
        value: Any = ANY,
        *,
        section: str = "reported",
        predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Wait until ``section`` (``"reported"``: applied locally, or ``"desired"``) has
        ``key`` equal to ``value`` (any value if omitted, or matching ``predicate``);
        return the value."""
        if section not in SECTIONS:
            raise ValueError("section is 'reported' or 'desired'")
        matches = matcher(value, predicate)
        current = self._reported if section == "reported" else self._desired
        if key in current and matches(current[key]):
            return copy.deepcopy(current[key])
        return await self._waiters.wait(section, key, matches, timeout)

    async def reconcile(self, keys: list[str] | None = None) -> None:
        """Offer the outstanding desired changes (of ``keys``, or all) to the handlers
        again, e.g. after a refusal whose cause went away."""
        async with self._lock:
            self._decisions.forget(keys)
            delta = compute_delta(self._desired, self._reported)
            if keys is not None:
                delta = {k: v for k, v in delta.items() if k in keys}
            await self._apply_delta(delta, self._version)

    # ------------------------------------------------------------------ sync internals

    def _on_connected(self, session_present: bool) -> None:
        self._start_sync()

    def _start_sync(self) -> None:
        if not self._started:
            return
        self._synced.clear()
        self._sync_error = None
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_task.cancel()
        self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while self._started:
            try:
                await self.client.subscribe()
                try:
                    doc: JsonObject | None = await self.client.get()
                except ShadowRejected as exc:
                    if exc.code != 404:
                        raise
                    doc = None
                async with self._lock:
                    await self._apply_document(doc)
                self.syncs += 1
                self._synced.set()
                self._report_needed.set()
                log.info(
                    "%s: synced at version %d%s",
                    self.client.label,
                    self._version,
                    "" if doc is not None else " (no shadow yet)",
                )
                return
            except ShadowRejected as exc:
                self.last_error = str(exc)
                if exc.code not in RETRYABLE_CODES:
                    log.error("%s: sync failed: %s", self.client.label, exc)
                    self._sync_error = exc
                    self._synced.set()  # wake waiters; wait_synced raises
                    return
                log.warning("%s: sync: %s; retrying", self.client.label, exc)
            except (ShadowTimeout, PublishFailed, MqttError) as exc:
                self.last_error = str(exc)
                if not self.connection.connected:
                    log.info(
                        "%s: sync interrupted (%s); again on reconnect", self.client.label, exc
                    )
                    return
                log.warning("%s: sync: %s; retrying", self.client.label, exc)
            await asyncio.sleep(backoff.next_delay())

    async def _apply_document(self, doc: JsonObject | None) -> None:
        """A fresh get: take desired, reconcile reported, apply the delta."""
        if doc is None:
            self._desired = {}
            self._cloud_reported = {}
            self._after_desired_change()
            return
        version = _version(doc)
        cloud_reported = _section(doc, "reported")
        if self._cloud_reported is None:
            # First sync of this process: the shadow's reported state is the starting
            # point; local values set before it win.
            local = self._reported
            self._reported = copy.deepcopy(cloud_reported)
            merge_section(self._reported, local)
        self._cloud_reported = cloud_reported
        if version is not None and version < self._version:
            # The get answer is the shadow as it is now, and versions only grow (a delete
            # resets them through delete/accepted): the version applied before cannot have
            # come from this shadow (a forged or corrupted message). Take the shadow's.
            log.warning(
                "%s: the shadow is at version %d, but version %d was applied; taking the "
                "shadow's document",
                self.client.label,
                version,
                self._version,
            )
            self._decisions.forget()
        self._desired = _section(doc, "desired")
        applied_version = version if version is not None else self._version
        self._after_desired_change()
        await self._apply_delta(compute_delta(self._desired, self._reported), applied_version)
        self._version = applied_version

    def _on_shadow_message(self, suffix: str, doc: JsonObject, own: bool) -> None:
        if suffix == "update/delta":
            self._spawn(self._on_delta(doc))
        elif suffix == "update/accepted":
            version = _version(doc)
            if version is not None and version < self._version and self._synced.is_set():
                # The service numbers its updates in order; an accepted update older than
                # the version applied means that version was not the service's: resync.
                log.warning(
                    "%s: update accepted at version %d below the applied %d; syncing again",
                    self.client.label,
                    version,
                    self._version,
                )
                self._start_sync()
            elif not own:
                self._on_foreign_update(doc)
        elif suffix == "delete/accepted":
            self._on_deleted(doc)

    async def _on_delta(self, doc: JsonObject) -> None:
        version = _version(doc)
        async with self._lock:
            if self._cloud_reported is None:
                return  # not synced yet; the sync's get covers it
            if version is not None and version <= self._version:
                log.debug(
                    "%s: ignoring delta version %d (applied %d)",
                    self.client.label,
                    version,
                    self._version,
                )
                return
            raw = doc.get("state")
            state: JsonObject = copy.deepcopy(raw) if isinstance(raw, dict) else {}
            merge_section(self._desired, state)
            self._after_desired_change()
            relevant = {
                k: v for k, v in compute_delta(self._desired, self._reported).items() if k in state
            }
            await self._apply_delta(relevant, version if version is not None else self._version)
            if version is not None:
                self._version = version

    def _on_foreign_update(self, doc: JsonObject) -> None:
        """Someone else's accepted update: track removals from desired (deltas only carry
        values, not removals)."""
        version = _version(doc)
        if version is not None and version < self._version:
            return
        state = doc.get("state")
        if not isinstance(state, dict) or "desired" not in state:
            return
        desired = state["desired"]
        if desired is None:
            self._desired = {}
        elif isinstance(desired, dict):
            removals = _removals(desired)
            if not removals:
                return
            merge_section(self._desired, removals)
        else:
            return
        self._after_desired_change()

    def _on_deleted(self, doc: JsonObject) -> None:
        log.info("%s: the shadow was deleted", self.client.label)
        self._desired = {}
        self._cloud_reported = {} if self._cloud_reported is not None else None
        self._version = -1
        self._decisions.forget()
        self._after_desired_change()

    async def _apply_delta(self, delta: JsonObject, version: int) -> None:
        """Offer ``delta`` (desired keys that differ from local) to the handlers and apply
        what they accept. Called with the lock held."""
        applied = await self._decisions.decide(
            delta, self._desired, self._reported, version, self.client.label
        )
        if not applied:
            return
        for key, value in applied.items():
            if isinstance(value, dict) and isinstance(self._reported.get(key), dict):
                merge_section(self._reported[key], value)
            elif value is None:
                self._reported.pop(key, None)
            else:
                self._reported[key] = copy.deepcopy(value)
        log.info(
            "%s: applied desired %s (version %d)",
            self.client.label,
            ", ".join(sorted(applied)),
            version,
        )
        self._after_local_change()

    # ------------------------------------------------------------------ reporting

    def _report_pending(self) -> bool | None:
        """Whether local state differs from the shadow's reported (``None``: unknown)."""
        if self._cloud_reported is None:
            return None
        return bool(section_patch(self._cloud_reported, self._reported))

    def _after_local_change(self) -> None:
        self._report_needed.set()
        self._waiters.check(self._reported, self._desired)
        self._check_telemetry()

    def _after_desired_change(self) -> None:
        self._waiters.check(self._reported, self._desired)
        self._check_telemetry()

    async def _reporter(self) -> None:
        """Publishes ``state.reported`` whenever local state differs from the shadow's:
        one update in flight at a time, changes made meanwhile coalesced."""
        backoff = Backoff(0.2, 10.0)
        while True:
            await self._report_needed.wait()
            self._report_needed.clear()
            if self._cloud_reported is None or not self.connection.connected:
                continue  # the next sync sets _report_needed again
            patch = section_patch(self._cloud_reported, self._reported)
            if self._refused_patch:
                patch = _without_refused(patch, self._refused_patch)
            if not patch:
                self._resolve_flush()
                continue
            try:
                await self.client.update({"reported": patch})
            except ShadowRejected as exc:
                self.last_error = str(exc)
                if exc.code in RETRYABLE_CODES:
                    log.warning("%s: report: %s; retrying", self.client.label, exc)
                    await asyncio.sleep(backoff.next_delay())
                    self._report_needed.set()
                else:
                    log.error("%s: reported state refused: %s", self.client.label, exc)
                    self._fail_flush(exc)
                    # Retrying the same patch would be refused again, and every later
                    # report would carry it. Report the refused keys no more (they stay in
                    # local state) until they change again.
                    self._refused_patch = patch
                continue
            except (ShadowTimeout, MqttError) as exc:
                self.last_error = str(exc)
                log.warning("%s: report not confirmed: %s", self.client.label, exc)
                if self.connection.connected:
                    await asyncio.sleep(backoff.next_delay())
                    self._report_needed.set()
                continue
            backoff.reset()
            self.reports += 1
            if self._cloud_reported is not None:
                merge_section(self._cloud_reported, patch)
            if section_patch(self._cloud_reported or {}, self._reported):
                self._report_needed.set()
            else:
                self._resolve_flush()

    def _resolve_flush(self) -> None:
        for fut in self._flush_waiters:
            if not fut.done():
                fut.set_result(None)
        self._flush_waiters.clear()

    def _fail_flush(self, exc: BaseException) -> None:
        for fut in self._flush_waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._flush_waiters.clear()

    # ------------------------------------------------------------------ notifications

    def _check_telemetry(self) -> None:
        source = self._desired if SEND_TELEMETRY_KEY in self._desired else self._reported
        allowed = source.get(SEND_TELEMETRY_KEY) is True
        if allowed == self._telemetry_allowed:
            return
        self._telemetry_allowed = allowed
        log.info("%s: %s is now %s", self.client.label, SEND_TELEMETRY_KEY, str(allowed).lower())
        for callback in list(self._telemetry_callbacks):
            try:
                result = callback(allowed)
            except Exception:
                log.exception("sendTelemetryData callback failed")
                continue
            if inspect.isawaitable(result):
                self._spawn(result)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _removals(desired: Mapping[str, Any]) -> JsonObject:
    """Only the ``None`` leaves of an update's desired section (with their parents)."""
    out: JsonObject = {}
    for key, value in desired.items():
        if value is None:
            out[key] = None
        elif isinstance(value, dict):
            sub = _removals(value)
            if sub:
                out[key] = sub
    return out


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("shadow task failed", exc_info=task.exception())


def _section(doc: Mapping[str, Any], name: str) -> JsonObject:
    state = doc.get("state")
    if not isinstance(state, dict):
        return {}
    value = state.get(name)
    return copy.deepcopy(value) if isinstance(value, dict) else {}


def _version(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("version")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _without_refused(patch: JsonObject, refused: Mapping[str, Any]) -> JsonObject:
    """``patch`` less the leaves that were refused with the very same value (a leaf that
    changed since is reported again)."""
    out: JsonObject = {}
    for key, value in patch.items():
        if key not in refused:
            out[key] = value
        elif isinstance(value, dict) and isinstance(refused[key], dict):
            rest = _without_refused(value, refused[key])
            if rest:
                out[key] = rest
        elif not json_equal(value, refused[key]):
            out[key] = value
    return out


__all__ = ["SEND_TELEMETRY_KEY", "ShadowSync", "TelemetryCallback"]
