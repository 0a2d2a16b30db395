"""The application's say on desired changes: handlers per key or for the whole delta
accept, adjust or refuse a change, and each desired value is decided once until it
changes or is offered again."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from iotref.device.shadow.errors import DesiredChangeRefused
from iotref.protocol.shadow_document import json_equal

log = logging.getLogger("iotref.shadow")

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class Refuse:
    """Return from a desired-change handler to refuse the change."""

    reason: str = "refused by the application"


@dataclass(frozen=True)
class DesiredChange:
    """What a desired-change handler is asked about.

    For a key handler: ``key``, its full desired ``value``, the ``delta`` part that differs
    from reported, and the currently ``reported`` value (``None`` if absent). For a
    whole-delta handler (``key`` is ``None``): ``value`` maps every undecided key to its
    desired value, ``delta`` is the delta of those keys, ``reported`` the reported section.
    """

    key: str | None
    value: Any
    delta: Any
    reported: Any
    version: int


DesiredHandler = Callable[[DesiredChange], Any]
"""Returns ``None`` to accept, another value to adjust (that value is applied and
reported), or :class:`Refuse` / raises to refuse. May be ``async``."""


class DesiredDecisions:
    """The registered handlers and the desired values already decided (accepted, adjusted
    or refused), so that a value is offered to the handlers once."""

    __slots__ = ("_decided", "_delta_handler", "_key_handlers", "accept_unhandled")

    def __init__(self, accept_unhandled: bool = True) -> None:
        self.accept_unhandled = accept_unhandled
        """Whether keys without a handler (and no whole-delta handler) are applied."""
        self._key_handlers: dict[str, DesiredHandler] = {}
        self._delta_handler: DesiredHandler | None = None
        self._decided: JsonObject = {}

    def on_key(self, key: str, handler: DesiredHandler) -> None:
        self._key_handlers[key] = handler

    def on_delta(self, handler: DesiredHandler) -> None:
        self._delta_handler = handler

    def forget(self, keys: Iterable[str] | None = None) -> None:
        """Offer ``keys`` (or every key) to the handlers again when next seen."""
        if keys is None:
            self._decided.clear()
            return
        for key in keys:
            self._decided.pop(key, None)

    async def decide(
        self,
        delta: Mapping[str, Any],
        desired: Mapping[str, Any],
        reported: Mapping[str, Any],
        version: int,
        label: str,
    ) -> JsonObject:
        """Offer the keys of ``delta`` not decided yet at their ``desired`` value to the
        handlers; return what to apply, per top-level key (``label`` names the shadow in
        the log)."""
        undecided: JsonObject = {}
        for key in delta:
            want = desired.get(key)
            if key in self._decided and json_equal(self._decided[key], want):
                continue
            undecided[key] = want
        if not undecided:
            return {}
        applied: JsonObject = {}
        rest: JsonObject = {}
        for key, want in undecided.items():
            handler = self._key_handlers.get(key)
            if handler is None:
                rest[key] = want
                continue
            change = DesiredChange(
                key,
                copy.deepcopy(want),
                copy.deepcopy(delta[key]),
                copy.deepcopy(reported.get(key)),
                version,
            )
            outcome = await self._ask(handler, change, label)
            self._decided[key] = copy.deepcopy(want)
            if isinstance(outcome, Refuse):
                log.warning("%s: desired %s refused: %s", label, key, outcome.reason)
                continue
            applied[key] = want if outcome is None else outcome
        if rest:
            applied.update(await self._decide_rest(rest, delta, reported, version, label))
        return applied

    async def _decide_rest(
        self,
        rest: JsonObject,
        delta: Mapping[str, Any],
        reported: Mapping[str, Any],
        version: int,
        label: str,
    ) -> JsonObject:
        """The keys without a key handler: the whole-delta handler decides them, or
        :attr:`accept_unhandled`."""
        if self._delta_handler is None:
            if not self.accept_unhandled:
                return {}
            for key, want in rest.items():
                self._decided[key] = copy.deepcopy(want)
            return rest
        change = DesiredChange(
            None,
            copy.deepcopy(rest),
            {k: copy.deepcopy(delta[k]) for k in rest},
            copy.deepcopy(dict(reported)),
            version,
        )
        outcome = await self._ask(self._delta_handler, change, label)
        for key, want in rest.items():
            self._decided[key] = copy.deepcopy(want)
        if isinstance(outcome, Refuse):
            log.warning("%s: desired %s refused: %s", label, ", ".join(rest), outcome.reason)
            return {}
        if outcome is None:
            return rest
        if isinstance(outcome, Mapping):
            refused = [k for k in rest if k not in outcome]
            if refused:
                log.warning(
                    "%s: desired %s not applied (left out by the handler)",
                    label,
                    ", ".join(refused),
                )
            return dict(outcome)
        log.error(
            "%s: whole-delta handler returned %s; nothing applied", label, type(outcome).__name__
        )
        return {}

    async def _ask(self, handler: DesiredHandler, change: DesiredChange, label: str) -> Any:
        try:
            outcome = handler(change)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        except DesiredChangeRefused as exc:
            return Refuse(exc.reason)
        except Exception as exc:
            log.exception("%s: desired-change handler failed", label)
            return Refuse(f"handler failed: {type(exc).__name__}: {exc}")
        return outcome


__all__ = ["DesiredChange", "DesiredDecisions", "DesiredHandler", "Refuse"]
