"""Every code block of docs/migration.md runs, in order (setup first, then one namespace per section)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "migration.md"


def sections():
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)
    blocks = lambda s: re.findall(r"```python\n(.*?)```", s, flags=re.S)  # noqa: E731
    setup = "\n".join(blocks(parts[0]))
    return setup, {p.splitlines()[0]: "\n".join(blocks(p)) for p in parts[1:]}


SETUP, SECTIONS = sections()


def test_the_page_has_the_four_migrations():
    assert len(SECTIONS) == 4 and all(SECTIONS.values()) and SETUP


@pytest.mark.parametrize("title", list(SECTIONS))
def test_snippets_run(title):
    namespace: dict = {}
    exec(compile(SETUP, f"{DOC.name}:setup", "exec"), namespace)
    exec(compile(SECTIONS[title], f"{DOC.name}:{title}", "exec"), namespace)
