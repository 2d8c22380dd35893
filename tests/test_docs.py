"""Every command and Python block of README.md and docs/ runs as written.

Blocks are read from the Markdown at test time (markdown-it-py's CommonMark parser). The blocks
of one page run in order in one fresh folder, Python blocks in one namespace per page, so a page
reads like a session: a later block uses what an earlier one made. A block preceded by
``<!-- skip: reason -->`` is skipped with that reason (the internet, a GPU, a user's own files).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "shell"}
PYTHON = {"python", "py"}
SETUP = "python3 -m venv .venv && .venv/bin/pip install -e "  # the README's install (and test) commands
SKIP = re.compile(r"<!--\s*skip:\s*(.+?)\s*-->", re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    skip: str | None



def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """The runnable fenced blocks of one page (shell and Python), with their skip reasons."""
    tokens = MarkdownIt("commonmark").parse(page.read_text())
    found = []
    for i, token in enumerate(tokens):
        lang = token.info.strip().split(" ")[0] if token.type == "fence" else ""
        if lang not in SHELL | PYTHON:
            continue
        before = tokens[i - 1] if i else None
        marker = SKIP.search(before.content) if before is not None and before.type == "html_block" else None
        reason = marker.group(1) if marker else None
        if token.content.startswith(SETUP):
            reason = "sets up the project itself: .ci/run runs it literally on a clean checkout"
        found.append(Block(page, token.map[0] + 1, lang, token.content, reason))
    return found


def run_block(block: Block, folder: Path, namespace: dict) -> None:
    """Run one block as written in `folder`; raise AssertionError naming the page and line on failure."""
    where = f"{block.page.name}:{block.line}"
    if block.lang in SHELL:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.source], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{where} exited {result.returncode}:\n{block.source}\n{result.stderr[-3000:]}"
        return
    previous = Path.cwd()
    os.chdir(folder)
    try:
        exec(compile(block.source, where, "exec"), namespace)
    finally:
        os.chdir(previous)


ALL = [block for page in pages() for block in blocks(page)]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One folder and one Python namespace per page, shared by the page's blocks in order."""
    made = {}

    def session(page: Path):
        if page not in made:
            made[page] = (tmp_path_factory.mktemp(page.stem), {"__name__": "__main__"})
        return made[page]

    return session


@pytest.mark.parametrize("block", ALL, ids=[f"{b.page.relative_to(ROOT)}:{b.line}" for b in ALL])
def test_documented_block_runs_as_written(block, sessions, one_thread):
    if block.skip:
        pytest.skip(f"{block.page.relative_to(ROOT)}:{block.line}: {block.skip}")
    folder, namespace = sessions(block.page)
    run_block(block, folder, namespace)


def test_the_docs_have_blocks_to_run():
    runnable = [b for b in ALL if not b.skip]
    assert len(runnable) >= 10 and any(b.lang in SHELL for b in runnable) and any(b.lang in PYTHON for b in runnable)


def test_a_broken_command_in_a_page_fails(tmp_path):
    """The mechanism bites: a misspelt option and a misspelt name both fail, a marked block is skipped."""
    page = tmp_path / "README.md"
    page.write_text("# scratch\n\n```bash\ndynamo --help > /dev/null\n```\n\n```bash\ndynamo phases --no-such-flag x\n```\n\n"
                    "```python\nimport dynamo\ndynamo.no_such_function()\n```\n\n"
                    "<!-- skip: needs the internet -->\n```bash\ncurl https://example.com\n```\n")
    found = blocks(page)
    assert [(b.line, b.lang, b.skip) for b in found] == [
        (3, "bash", None), (7, "bash", None), (11, "python", None), (17, "bash", "needs the internet")]
    run_block(found[0], tmp_path, {})
    with pytest.raises(AssertionError, match="README.md:7 exited 2"):
        run_block(found[1], tmp_path, {})
    with pytest.raises(AttributeError, match="no_such_function"):
        run_block(found[2], tmp_path, {})


def test_the_layout_page_names_every_module():
    """docs/layout.md matches the tree: every module of the three packages is named there."""
    text = (ROOT / "docs" / "layout.md").read_text()
    modules = sorted(str(p.relative_to(ROOT)) for package in ("dynamo", "analyses", "figures")
                     for p in (ROOT / package).rglob("*.py"))
    named = {m for m in modules if m in text or (m.endswith(("/__init__.py",)) and f"{Path(m).parent}/" in text)
             or (Path(m).name in text and f"{Path(m).parent}/" in text)}
    assert sorted(set(modules) - named) == []
