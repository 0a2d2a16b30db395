"""The environment file format shared by the device library and the sandbox."""

from __future__ import annotations

import pytest

from iotref.protocol.environment_file import (
    EnvironmentFileError,
    format_env_file,
    parse_env_file,
)


def test_parses_keys_comments_quotes_and_export() -> None:
    text = (
        "# a comment\n\n"
        "base_url=https://cfg.example\n"
        'DIRECTORY_HOST="https://dir.example"\n'
        "export SCOPE='Org.a,Org.b'\n"
        "  DIRECTORY_OAUTH_CLIENT_ID = abc \n"
    )
    assert parse_env_file(text) == {
        "base_url": "https://cfg.example",
        "DIRECTORY_HOST": "https://dir.example",
        "SCOPE": "Org.a,Org.b",
        "DIRECTORY_OAUTH_CLIENT_ID": "abc",
    }


@pytest.mark.parametrize("line", ["no equals sign", "=value"])
def test_rejects_lines_without_a_key(line: str) -> None:
    with pytest.raises(EnvironmentFileError, match="line 2"):
        parse_env_file(f"a=b\n{line}\n")


def test_format_round_trips() -> None:
    values = {"base_url": "http://127.0.0.1:1", "SCOPE": "x,y"}
    text = format_env_file(values, comment="made by a test")
    assert text.startswith("# made by a test\n")
    assert parse_env_file(text) == values
