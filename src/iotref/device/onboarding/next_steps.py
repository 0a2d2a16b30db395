"""Next steps that are ``iotref`` commands, printed so that they run as shown: a
:class:`NextStep` (a sentence with ``{}`` where commands go) rendered with a
:class:`Selection`, the ``--env``/``--env-file`` and ``--store`` the person chose.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from iotref.device.onboarding.environment_variables import ENV_FILE_VAR, ENV_VAR

if TYPE_CHECKING:
    from iotref.device.onboarding.environment import Environment

#: The commands that take ``--env``/``--env-file``, and those that also take ``--store``.
_TAKES_ENV = frozenset({"login", "logout", "provision", "status", "run", "fleet"})
_TAKES_STORE = frozenset({"provision", "status", "run"})
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def shell_word(text: str) -> str:
    """``text`` as one word of a POSIX shell command line: as is when it is plain, else in
    double quotes (so that it can stand inside a hint's single quotes)."""
    if _PLAIN_WORD.fullmatch(text):
        return text
    escaped = re.sub(r'(["\\$`])', r"\\\1", text)
    return f'"{escaped}"'


@dataclass(frozen=True)
class Selection:
    """How the person picked the environment and the store: ``env`` is the option and its
    value (``("--env", "test")`` or ``("--env-file", "staging.env")``; empty: the default),
    ``store`` the ``--store`` folder as given (None: the environment's default store)."""

    env: tuple[str, ...] = ()
    store: Path | None = None

    @classmethod
    def of(cls, env: Environment | None = None, store: Path | None = None) -> Selection:
        """The selection that picks ``env`` (by name if built in, else by its file)."""
        if env is None:
            return cls((), store)
        if env.source == "built-in":
            return cls(("--env", env.name), store)
        return cls(("--env-file", env.source), store)

    @classmethod
    def from_options(
        cls,
        env_name: str | None,
        env_file: Path | str | None,
        store: Path | None,
        environ: Mapping[str, str] | None = None,
    ) -> Selection:
        """The selection from a command's options, else from ``IOTREF_ENV_FILE`` or
        ``IOTREF_ENV`` (named in the hint, so that it also runs where they are not set)."""
        environ = os.environ if environ is None else environ
        if env_file:
            return cls(("--env-file", str(env_file)), store)
        if env_name:
            return cls(("--env", env_name), store)
        from_file = environ.get(ENV_FILE_VAR, "").strip()
        from_name = environ.get(ENV_VAR, "").strip()
        if from_file and not from_name:
            return cls(("--env-file", from_file), store)
        if from_name and not from_file:
            return cls(("--env", from_name), store)
        return cls((), store)

    def command(self, subcommand: str, *args: str) -> str:
        """``iotref SUBCOMMAND`` with this selection's options (those the subcommand takes)
        and ``args``, quoted for the shell."""
        words = ["iotref", *subcommand.split()]
        if subcommand in _TAKES_ENV:
            words += self.env
        if subcommand in _TAKES_STORE and self.store is not None:
            words += ["--store", str(self.store)]
        words += args
        return " ".join(shell_word(word) for word in words)

    def render(self, step: NextStep | str | None) -> str | None:
        """A next step as text: a :class:`NextStep` rendered with this selection."""
        if step is None or isinstance(step, str):
            return step
        return step.render(self)


@dataclass(frozen=True)
class NextStep:
    """A next step naming ``iotref`` commands: ``text`` with one ``{}`` per command, each
    command a subcommand and its own arguments (``("provision", "--renew")``). ``selection``
    is what the library knew (e.g. the environment) when it made the step."""

    text: str
    commands: tuple[tuple[str, ...], ...]
    selection: Selection | None = None

    def render(self, selection: Selection | None = None) -> str:
        """The text with the commands, rendered with ``selection`` (the person's own
        options, from the command line) or else the one the step was made with."""
        if selection is None:
            selection = self.selection or Selection()
        shown = [f"'{selection.command(*command)}'" for command in self.commands]
        return self.text.format(*shown)

    def within(self, selection: Selection) -> NextStep:
        """This step, rendered with ``selection`` unless a caller gives another."""
        return NextStep(self.text, self.commands, selection)

    def __str__(self) -> str:
        return self.render()


#: What ``iotref provision`` needs for a new machine; the person puts in the values.
NEW_MACHINE_ARGS = ("--name", "NAME", "--manufacturer", "MANUFACTURER", "--serial-number", "SERIAL")


def run(subcommand: str, *args: str, then: str = "", before: str = "") -> NextStep:
    """``run 'iotref SUBCOMMAND ARGS'``, after ``before`` and followed by ``then`` (plain
    text, braces included)."""
    text = " ".join(part for part in (_literal(before), "run {}", _literal(then)) if part)
    return NextStep(text, ((subcommand, *args),))


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def provision_new_machine() -> NextStep:
    """``run 'iotref provision ... --name NAME ...'`` for a store that has no machine yet."""
    return run("provision", *NEW_MACHINE_ARGS, then="(with the machine's values)")


def steps(text: str, *commands: tuple[str, ...]) -> NextStep:
    """A sentence with ``{}`` for each of ``commands``."""
    return NextStep(text, tuple(commands))
