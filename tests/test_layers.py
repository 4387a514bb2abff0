"""The import-direction rules of docs/architecture.md, checked on the source with ast (no imports executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_library_never_imports_pipelines_or_cli():
    bad = [
        (str(p.relative_to(ROOT)), name)
        for p in _files("mcad_cache")
        for name in _imports(p)
        if name.startswith(("mcad_cache.pipelines", "mcad_cache.cli", "pipelines", "cli"))
    ]
    assert bad == []


def test_pipelines_never_import_cli():
    bad = [
        (str(p.relative_to(ROOT)), n)
        for p in _files("pipelines")
        for n in _imports(p)
        if n.startswith(("mcad_cache.cli", "cli"))
    ]
    assert bad == []


def test_code_imports_installed_names_not_top_level_folders():
    bad = [
        (str(p.relative_to(ROOT)), n)
        for folder in ("mcad_cache", "pipelines", "cli", "tests", "benchmarks")
        for p in _files(folder)
        for n in _imports(p)
        if n.split(".")[0] in {"pipelines", "cli"}
    ]
    assert bad == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("teachers", ("mcad_cache.student",)),
        ("student", ("mcad_cache.teachers",)),
        ("cache", ("mcad_cache.teachers", "mcad_cache.student", "mcad_cache.train", "mcad_cache.eval")),
        ("data", ("mcad_cache.teachers", "mcad_cache.student", "mcad_cache.cache", "mcad_cache.train")),
    ],
)
def test_library_layers(package, forbidden):
    bad = [
        (str(p.relative_to(ROOT)), n)
        for p in _files(f"mcad_cache/{package}")
        for n in _imports(p)
        if n.startswith(forbidden)
    ]
    assert bad == []


def test_library_has_no_print_or_exit():
    bad = []
    for p in _files("mcad_cache"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"print", "exit"}:
                bad.append((str(p.relative_to(ROOT)), node.lineno))
            if (
                isinstance(node, ast.Attribute)
                and node.attr in {"exit", "environ", "getenv"}
                and isinstance(node.value, ast.Name)
                and node.value.id in {"sys", "os"}
            ):
                bad.append((str(p.relative_to(ROOT)), node.lineno))
    assert bad == []
