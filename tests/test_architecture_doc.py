"""docs/architecture.md lists every module of the library, the pipelines and the CLI, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for folder in ("mcad_cache", "pipelines", "cli")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "__init__.py"
    }


def test_every_module_is_on_the_map_and_nothing_else():
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", (ROOT / "docs" / "architecture.md").read_text(), re.MULTILINE))
    assert sorted(_modules() - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - _modules()) == [], "docs/architecture.md lists modules that no longer exist"
