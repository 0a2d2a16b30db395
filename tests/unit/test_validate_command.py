"""``iotref validate``: documents, arrays, JSON lines, stdin; output lines, summary,
--quiet, --json, --strict; exit status 0/1/2 without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from iotref.cli.main import cli, main
from iotref.device.telemetry.messages import Asset, Sender, StatusV1, StatusV2, build_message

DEVICEINFO = "$.payload.signalstatus.deviceinfo"


def good(version: int = 2) -> dict[str, Any]:
    payload = StatusV2("Production", 100, 1000) if version == 2 else StatusV1(status="Running")
    return build_message(Sender("press", "gw", "1"), Asset("a1", "SN1", "Cutter"), payload)


def bogus() -> dict[str, Any]:
    message = good()
    message["payload"]["signalstatus"]["deviceinfo"]["status"] = "Bogus"
    return message


def run(*args: str, stdin: str | bytes | None = None) -> Any:
    result = CliRunner().invoke(cli, ["validate", *args], input=stdin)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    made = {
        "one.json": json.dumps(good(), indent=2),
        "v1.json": json.dumps(good(1)),
        "array.json": json.dumps([good(), bogus(), good(1), 5], indent=2),
        "lines.jsonl": "\n".join([json.dumps(good()), "", json.dumps(bogus()), "{broken"]) + "\n",
        "broken.json": '{\n  "a": 1,\n  "b": \n}\n',
        "empty.json": "",
        "emptyarray.json": "[]",
        "unknown.json": json.dumps(dict(good(), payloadversion=9)),
    }
    out = {}
    for name, text in made.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        out[name] = path
    bad_utf8 = tmp_path / "latin1.json"
    bad_utf8.write_bytes(b'{"assetname":\n"Dr\xfcck"}')
    out["latin1.json"] = bad_utf8
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(good()).encode())
    out["bom.json"] = bom
    return out


def test_all_valid(files: dict[str, Path]) -> None:
    result = run(str(files["one.json"]), str(files["v1.json"]), str(files["bom.json"]))
    assert result.exit_code == 0
    assert result.output == "3 valid, 0 invalid\n"


def test_array_reports_the_line_of_each_element(files: dict[str, Path]) -> None:
    path = files["array.json"]
    lines = path.read_text().splitlines()
    result = run(str(path))
    assert result.exit_code == 1
    out = result.output.splitlines()
    assert out[-1] == "2 valid, 2 invalid"
    bogus_line = int(out[0].split(":")[1])
    assert lines[bogus_line - 1].strip() == "{"
    assert out[0] == (
        f"{path}:{bogus_line}: {DEVICEINFO}.status: "
        '"Bogus" is not one of "Idle", "NonPoductive", "Offline", "Production", "Stopped"'
    )
    assert lines[int(out[1].split(":")[1]) - 1].strip() == "5"
    assert out[1].endswith(": $: a message must be a JSON object, got number")


def test_json_lines(files: dict[str, Path]) -> None:
    path = files["lines.jsonl"]
    result = run(str(path))
    assert result.exit_code == 1
    out = result.output.splitlines()
    assert out[0].startswith(f"{path}:3: {DEVICEINFO}.status: ")
    assert out[1].startswith(f"{path}:4: $: invalid JSON: ")
    assert out[2] == "1 valid, 2 invalid"


def test_malformed_document_names_the_error_line(files: dict[str, Path]) -> None:
    result = run(str(files["broken.json"]))
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{files['broken.json']}:4: $: invalid JSON: Expecting value: line 4 column 1 (char 20)",
        "0 valid, 1 invalid",
    ]


def test_not_utf8_is_invalid_json_at_its_line(files: dict[str, Path]) -> None:
    result = run(str(files["latin1.json"]))
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith(
        f"{files['latin1.json']}:2: $: invalid JSON: not UTF-8"
    )


def test_unknown_payload_version(files: dict[str, Path]) -> None:
    result = run(str(files["unknown.json"]))
    assert result.exit_code == 1
    assert (
        f"{files['unknown.json']}:1: $.payloadversion: unknown payload version 9 "
        "for generic.signal/Status" in result.output
    )


def test_more_issues_are_counted(tmp_path: Path) -> None:
    message = bogus()
    del message["assetid"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(message))
    result = run(str(path))
    assert (
        f"{path}:1: $.assetid: required property is missing (+1 more; --all shows them)"
        in result.output
    )


def test_all_prints_every_issue_of_every_message(tmp_path: Path) -> None:
    """The text mode hid the second issue behind "(+1 more)" with no way to see it but
    --json; --all prints one line per issue, the same issues --json lists."""
    message = bogus()
    del message["assetid"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps([message, bogus()]))
    result = run("--all", str(path))
    assert result.exit_code == 1
    lines = result.output.splitlines()
    report = json.loads(run("--json", str(path)).output)
    expected = [
        f"{path}:{entry['line']}: {issue['path']}: {issue['message']}"
        for entry in report["messages"]
        for issue in entry["issues"]
    ]
    assert len(expected) == 3
    assert lines == [*expected, "0 valid, 2 invalid"]
    assert "more" not in result.output


def test_global_quiet_prints_only_the_summary(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([bogus(), good()]))
    result = CliRunner().invoke(cli, ["--quiet", "validate", str(path)])
    assert result.exit_code == 1
    assert result.output == "1 valid, 1 invalid\n"


def test_empty_inputs_have_no_messages(files: dict[str, Path]) -> None:
    result = run(str(files["empty.json"]), str(files["emptyarray.json"]))
    assert result.exit_code == 0
    assert result.output == "0 valid, 0 invalid\n"


def test_stdin(files: dict[str, Path]) -> None:
    result = run("-", stdin=files["lines.jsonl"].read_bytes())
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith(f"<stdin>:3: {DEVICEINFO}.status: ")


def test_unreadable_files_exit_2_with_one_line_each(tmp_path: Path, files: dict[str, Path]) -> None:
    missing = tmp_path / "nope.json"
    result = CliRunner().invoke(
        cli, ["validate", str(missing), str(tmp_path), str(files["array.json"])]
    )
    assert result.exit_code == 2
    assert f"iotref validate: cannot read {missing}: No such file or directory" in result.output
    assert f"iotref validate: cannot read {tmp_path}: Is a directory" in result.output
    assert "Traceback" not in result.output
    assert result.output.splitlines()[-1] == "2 valid, 2 invalid, 2 unreadable"


def test_quiet_prints_nothing(files: dict[str, Path]) -> None:
    assert run("--quiet", str(files["array.json"])).output == ""
    assert run("-q", str(files["array.json"])).exit_code == 1
    assert run("-q", str(files["one.json"])).exit_code == 0


def test_json_report(tmp_path: Path, files: dict[str, Path]) -> None:
    missing = tmp_path / "nope.json"
    result = CliRunner().invoke(
        cli, ["validate", "--json", str(files["lines.jsonl"]), str(missing)]
    )
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["valid"] == 1
    assert report["invalid"] == 2
    assert report["unreadable"] == 1
    assert report["errors"] == [{"file": str(missing), "error": "No such file or directory"}]
    first = report["messages"][0]
    assert first["file"] == str(files["lines.jsonl"])
    assert first["line"] == 3
    assert first["index"] == 1
    assert first["issues"][0]["path"] == f"{DEVICEINFO}.status"
    assert "Bogus" in first["issues"][0]["message"]


def test_strict_option(tmp_path: Path) -> None:
    message = good()
    message["sendertimestamp"] = "2026-11-25T10:00:00Z"
    path = tmp_path / "m.json"
    path.write_text(json.dumps(message))
    assert run(str(path)).exit_code == 0
    strict = run("--strict", str(path))
    assert strict.exit_code == 1
    assert f"{path}:1: $.sendertimestamp: timestamp must be ISO-8601 with milliseconds" in (
        strict.output
    )


def test_no_files_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["validate"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_main_returns_the_exit_status(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(files["one.json"])]) == 0
    assert main(["validate", str(files["array.json"])]) == 1
    assert main(["validate", str(files["one.json"]) + ".missing"]) == 2
    captured = capsys.readouterr()
    assert "cannot read" in captured.err
