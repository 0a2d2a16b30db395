"""Every ```mermaid block of README.md and docs/ parses and renders with the real Mermaid
(the version pinned in tests/mermaid/package.json, installed by scripts/setup.sh --browser)
running in Chromium: what GitHub would draw, not a look-alike parser. A failure names the
file, the block's line and Mermaid's own message."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import chromium

ROOT = Path(__file__).resolve().parents[2]
MERMAID_DIR = ROOT / "tests" / "mermaid"
MERMAID_JS = MERMAID_DIR / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
ARTIFACTS = ROOT / "test-artifacts" / "mermaid"
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class MermaidBlock:
    path: str
    line: int
    """1-based line of the opening fence."""
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def mermaid_blocks(markdown: str, path: str) -> list[MermaidBlock]:
    """The fenced ``mermaid`` blocks of a CommonMark document, in order."""
    blocks: list[MermaidBlock] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[j])
            j += 1
        if opening["info"].lower() == "mermaid":
            blocks.append(MermaidBlock(path, i + 1, "\n".join(body)))
        i = j + 1
    return blocks


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def all_blocks() -> list[MermaidBlock]:
    found: list[MermaidBlock] = []
    for doc in documents():
        found += mermaid_blocks(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))
    return found


BLOCKS = all_blocks()


def test_the_block_finder_sees_fences_as_commonmark_does() -> None:
    text = "\n".join(
        [
            "# t",
            "```mermaid",
            "flowchart LR",
            "  A --> B",
            "```",
            "````markdown",
            "```mermaid",
            "not a block: inside a longer fence",
            "```",
            "````",
            "~~~ Mermaid",
            "sequenceDiagram",
            "~~~",
            "```python",
            "x = 1",
            "```",
        ]
    )
    found = mermaid_blocks(text, "x.md")
    assert [(b.line, b.text) for b in found] == [
        (2, "flowchart LR\n  A --> B"),
        (11, "sequenceDiagram"),
    ]


def test_the_docs_have_diagrams() -> None:
    # architecture.md draws the parts, onboarding, state sync and telemetry.
    assert len([b for b in BLOCKS if b.path == "docs/architecture.md"]) >= 4, BLOCKS


@pytest.fixture(scope="module")
def mermaid_page() -> Iterator[Any]:
    if not MERMAID_JS.exists():
        pytest.skip(f"{MERMAID_JS.relative_to(ROOT)} is missing (scripts/setup.sh --browser)")
    pinned = json.loads((MERMAID_DIR / "package.json").read_text())["dependencies"]["mermaid"]
    installed = json.loads((MERMAID_JS.parents[1] / "package.json").read_text())["version"]
    assert installed == pinned, f"mermaid {installed} installed, {pinned} pinned: run npm ci"
    with chromium() as browser:
        context = browser.new_context()
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_content("<!doctype html><html><body></body></html>")
        page.add_script_tag(path=str(MERMAID_JS))
        page.evaluate("mermaid.initialize({startOnLoad: false, securityLevel: 'strict'})")
        try:
            yield page
        finally:
            context.close()
        assert not errors, errors


CHECK = """
async ([id, text]) => {
  try {
    await mermaid.parse(text);
  } catch (e) {
    return {stage: "parse", message: String((e && e.message) || e)};
  }
  try {
    const {svg} = await mermaid.render(id, text);
    return {stage: "ok", svg};
  } catch (e) {
    return {stage: "render", message: String((e && e.message) || e)};
  }
}
"""


def explain(block: MermaidBlock, stage: str, message: str) -> str:
    where = block.where
    inner = re.search(r"on line (\d+)", message)
    if inner:  # Mermaid counts from the block's first line, after the fence
        where += f" (diagram line {inner[1]} = file line {block.line + int(inner[1])})"
    return f"{where}: Mermaid {stage} error:\n{message}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_diagram_parses_and_renders(mermaid_page: Any, block: MermaidBlock) -> None:
    diagram_id = "d_" + re.sub(r"\W", "_", block.where)
    result = mermaid_page.evaluate(CHECK, [diagram_id, block.text])
    assert result["stage"] == "ok", explain(block, result["stage"], result["message"])
    svg: str = result["svg"]
    assert svg.startswith("<svg"), svg[:200]
    # Mermaid draws a syntax-error picture instead of throwing in some versions.
    assert "Syntax error in text" not in svg, f"{block.where}: rendered as a syntax error"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{diagram_id}.svg").write_text(svg, encoding="utf-8")


def test_state_sync_diagram_subscribes_to_what_shadow_sync_subscribes_to() -> None:
    from iotref.device.shadow.requests import RESPONSE_SUFFIXES

    state_sync = [b for b in BLOCKS if "participant S as ShadowSync" in b.text]
    assert len(state_sync) == 1, [b.where for b in BLOCKS]
    line = next(x for x in state_sync[0].text.splitlines() if "SUBSCRIBE" in x)
    drawn: set[str] = set()
    for group in line.split("SUBSCRIBE", 1)[1].split(","):  # "update/accepted|rejected"
        operation, answers = group.strip().split("/", 1)
        drawn |= {f"{operation}/{answer}" for answer in answers.split("|")}
    assert drawn == set(RESPONSE_SUFFIXES), (state_sync[0].where, line)
