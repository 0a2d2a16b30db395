"""Next steps that name ``iotref`` commands carry the person's own environment and store
options, quoted so that they run as printed; the library's errors and store checks make
them that way (every "run 'iotref ..." in the source goes through the helper)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from iotref.device.errors import StoreError
from iotref.device.onboarding.certificate_store import CertificateStore
from iotref.device.onboarding.environment import load_environment, load_environment_file
from iotref.device.onboarding.next_steps import NextStep, Selection, run, shell_word, steps
from iotref.device.onboarding.store_checks import check_store

SRC = Path(__file__).resolve().parents[2] / "src" / "iotref"
HINT = re.compile(r"""'(iotref (?:[^'"]|"(?:\\.|[^"\\])*")*)'""")


def commands_in(text: str) -> list[list[str]]:
    """The ``'iotref ...'`` commands in a message, split as the shell would."""
    return [shlex.split(found) for found in HINT.findall(text)]


@pytest.mark.parametrize(
    ("word", "shown"),
    [
        ("plain/path-1.env", "plain/path-1.env"),
        ("my store", '"my store"'),
        ('a"b', '"a\\"b"'),
        ("$HOME", '"\\$HOME"'),
        ("it's", '"it\'s"'),
    ],
)
def test_shell_word_round_trips(word: str, shown: str) -> None:
    assert shell_word(word) == shown
    echoed = subprocess.run(
        ["/bin/sh", "-c", f"printf '%s' {shown}"], capture_output=True, text=True, check=True
    )
    assert echoed.stdout == word


def test_selection_renders_only_the_options_a_command_takes(tmp_path: Path) -> None:
    selection = Selection(("--env-file", "st aging.env"), Path("my store"))
    assert selection.command("provision", "--renew") == (
        'iotref provision --env-file "st aging.env" --store "my store" --renew'
    )
    assert selection.command("login") == 'iotref login --env-file "st aging.env"'
    assert selection.command("sandbox up") == "iotref sandbox up"
    assert Selection().command("provision") == "iotref provision"


def test_selection_from_options_and_variables() -> None:
    assert Selection.from_options(None, None, None, {}).env == ()
    assert Selection.from_options("test", None, None, {}).env == ("--env", "test")
    assert Selection.from_options(None, Path("e.env"), None, {}).env == ("--env-file", "e.env")
    named = Selection.from_options(None, None, None, {"IOTREF_ENV": "live"})
    assert named.env == ("--env", "live")
    filed = Selection.from_options(None, None, None, {"IOTREF_ENV_FILE": "/x/env.local"})
    assert filed.env == ("--env-file", "/x/env.local")
    # an explicit option wins over the variable, as in resolve_environment
    assert Selection.from_options("test", None, None, {"IOTREF_ENV": "live"}).env == (
        "--env",
        "test",
    )


def test_selection_of_an_environment(tmp_path: Path) -> None:
    assert Selection.of(load_environment("test")).env == ("--env", "test")
    env_file = tmp_path / "env.staging"
    env_file.write_text(
        "base_url=https://cfg.example.com\nDIRECTORY_HOST=https://dir.example.com\n"
        "DIRECTORY_OAUTH_CLIENT_ID=abc\nSCOPE=Org.x\n"
    )
    assert Selection.of(load_environment_file(env_file)).env == ("--env-file", str(env_file))


def test_next_step_text_and_commands() -> None:
    step = run("provision", "--renew", before="check {this}, then", then="for a new key")
    selection = Selection(("--env", "test"), Path("/srv/s 1"))
    text = step.render(selection)
    assert text == (
        "check {this}, then run 'iotref provision --env test --store \"/srv/s 1\" --renew' "
        "for a new key"
    )
    assert commands_in(text) == [
        ["iotref", "provision", "--env", "test", "--store", "/srv/s 1", "--renew"]
    ]
    both = steps("run {} and {} again", ("logout",), ("login",)).render(selection)
    assert commands_in(both) == [
        ["iotref", "logout", "--env", "test"],
        ["iotref", "login", "--env", "test"],
    ]
    # the library's own selection is used unless a command line gives one
    within = run("login").within(Selection(("--env", "live")))
    assert str(within) == "run 'iotref login --env live'"
    assert within.render(selection) == "run 'iotref login --env test'"


def test_errors_render_their_hint_with_the_callers_selection(tmp_path: Path) -> None:
    error = StoreError("broken", run("provision", "--renew"))
    assert error.next_step == "run 'iotref provision --renew'"
    mine = Selection(("--env-file", "e.env"), Path("st"))
    assert error.one_line(mine) == (
        "broken (next: run 'iotref provision --env-file e.env --store st --renew')"
    )
    plain = StoreError("broken", "do something")
    assert plain.one_line(mine) == "broken (next: do something)"


def test_store_errors_name_the_store_they_are_about(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "a store")
    with pytest.raises(StoreError) as info:
        store.load()
    assert commands_in(info.value.one_line()) == [
        ["iotref", "provision", "--store", str(tmp_path / "a store")]
    ]
    selected = CertificateStore(
        tmp_path / "s", selection=Selection(("--env", "test"), Path("rel/s"))
    )
    report = check_store(selected)
    assert [p.code for p in report.problems] == ["absent"]
    problem = report.problems[0]
    assert isinstance(problem.hint, NextStep)
    assert problem.next_step == (
        "run 'iotref provision --env test --store rel/s --name NAME --manufacturer "
        "MANUFACTURER --serial-number SERIAL' (with the machine's values)"
    )


def test_no_hint_in_the_source_bypasses_the_helper() -> None:
    """Every "run 'iotref ..." and "'iotref ...'" next step is made by
    iotref.device.onboarding.next_steps, so that it carries the person's options. Hard-coded command
    texts dropped --env/--env-file/--store (issue: hints that do not run as printed)."""
    pattern = re.compile(r"""["'][^"'\n]*'iotref (login|logout|provision|status|run)\b""")
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "next_steps.py" or "sandbox" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line) and '"""' not in line:
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []
