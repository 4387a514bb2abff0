"""The import-direction and size rules of docs/architecture.md and docs/style.md, checked on the source with ast (no
imports executed).

Layers: ``cli -> {pipelines, demo app} -> library``. The library is ``mcad_cache/`` minus ``mcad_cache/demo/``; the
demo app (``mcad_cache/demo/``) is an app: it may import pipelines, and nothing in the library or the pipelines
imports it. Installed names: ``pipelines/x.py`` is ``mcad_cache.pipelines.x``, ``cli/x.py`` is ``mcad_cache.cli.x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package prefix of each top-level source folder (pyproject.toml package-dir).
FOLDERS = {"mcad_cache": "mcad_cache", "pipelines": "mcad_cache.pipelines", "cli": "mcad_cache.cli"}
MAX_LIBRARY_LINES = 600
MAX_PIPELINE_LINES = 250
# Modules allowed over the size limits; each must be named in docs/style.md with its reason.
SIZE_EXCEPTIONS: dict[str, int] = {}


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """Absolute module of a ``from ... import`` (relative imports resolved against ``path``'s package)."""
    if node.level == 0:
        return node.module or ""
    package = _module_name(path).split(".")
    if not _is_package(path):
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports. ``from pkg import name`` counts as ``pkg.name`` when that is one of our modules (a
    submodule), else as ``pkg``. ``module_level_only``: statements run at import time (not in functions, not under
    ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes: list[ast.AST] = []
    if module_level_only:
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                todo.extend(node.orelse)
                continue
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    todo.extend(getattr(node, field, []))
            if isinstance(node, ast.ExceptHandler):
                todo.extend(node.body)
    else:
        nodes = list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(path, node)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                names.add(sub if sub in ALL_MODULES else module)
    return names


ALL_MODULES = {_module_name(p) for folder in FOLDERS for p in _files(folder)}


API_FACADE = ROOT / "mcad_cache" / "api.py"  # the Python API: calls pipelines, only inside its functions


def _library_files() -> list[Path]:
    return [
        p
        for p in _files("mcad_cache")
        if "demo" not in p.relative_to(ROOT / "mcad_cache").parts[:1] and p != API_FACADE
    ]


def test_api_facade_imports_pipelines_only_inside_functions_and_nothing_imports_it():
    """mcad_cache/api.py (the Python API, like zarr's api/synchronous.py over its core) may call pipelines, never
    at import time; no library module imports the facade (mcad_cache/__init__.py reaches it lazily by name)."""
    assert not any(n.startswith("mcad_cache.pipelines") for n in _imports(API_FACADE, module_level_only=True))
    assert any(n.startswith("mcad_cache.pipelines") for n in _imports(API_FACADE))
    assert _bad(_library_files(), ("mcad_cache.api",)) == []


def _bad(files: list[Path], forbidden: tuple[str, ...], *, allowed: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return sorted(
        (str(p.relative_to(ROOT)), n)
        for p in files
        for n in _imports(p)
        if (n + ".").startswith(tuple(f + "." for f in forbidden))
        and not (n + ".").startswith(tuple(a + "." for a in allowed))
    )


def test_module_names_resolve():
    """The helpers above: a relative import and a submodule import resolve to our module names."""
    assert _module_name(ROOT / "pipelines" / "distill.py") == "mcad_cache.pipelines.distill"
    assert _module_name(ROOT / "mcad_cache" / "teachers" / "__init__.py") == "mcad_cache.teachers"
    assert "mcad_cache.demo.offline" in _imports(ROOT / "mcad_cache" / "demo" / "prepare_teachers.py")
    assert "mcad_cache.teachers.base" in _imports(ROOT / "mcad_cache" / "teachers" / "text_states.py")


def test_library_never_imports_pipelines_cli_or_demo():
    """The library (mcad_cache minus the demo app) never imports pipelines, cli or the demo app, not even lazily."""
    assert (
        _bad(_library_files(), ("mcad_cache.pipelines", "mcad_cache.cli", "mcad_cache.demo", "pipelines", "cli")) == []
    )


def test_demo_app_may_import_pipelines_but_not_cli():
    demo = _files("mcad_cache/demo")
    assert demo, "the demo app lives in mcad_cache/demo/"
    assert _bad(demo, ("mcad_cache.cli", "cli")) == []
    assert any(n.startswith("mcad_cache.pipelines") for p in demo for n in _imports(p))  # it is an app


def test_pipelines_never_import_cli_demo_or_each_other():
    assert _bad(_files("pipelines"), ("mcad_cache.cli", "cli", "mcad_cache.demo")) == []
    assert _bad(_files("pipelines"), ("mcad_cache.pipelines",)) == []


def test_cli_imports_only_pipelines_config_errors_and_the_demo_app():
    """cli: typer/rich and other third-party, its own modules, pipelines (and the demo app, an app like them), the
    run configs and the error classes. Everything else goes through a pipeline."""
    allowed = ("mcad_cache.cli", "mcad_cache.pipelines", "mcad_cache.demo", "mcad_cache.config", "mcad_cache.errors")
    assert _bad(_files("cli"), ("mcad_cache",), allowed=allowed) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a self-import (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # recursive: the import graph is shallow
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": {"a"}, "f": set()}
    assert _cycles(graph) == [["a", "b", "c"], ["d"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_module_level_reader(tmp_path):
    """Import-time statements count (also under ``if``/``try``); function bodies and TYPE_CHECKING blocks do not."""
    f = tmp_path / "m.py"
    f.write_text(
        "import a\nif True:\n    import b\ntry:\n    import e\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    import d\ndef g():\n    import c\n"
    )
    assert _imports(f, module_level_only=True) == {"a", "b", "e"}
    assert _imports(f) == {"a", "b", "c", "d", "e"}


def test_no_import_cycle_inside_mcad_cache():
    """The module-level import graph of mcad_cache/ (library and demo app) has no cycle."""
    graph = {
        _module_name(p): {n for n in _imports(p, module_level_only=True) if n in ALL_MODULES}
        for p in _files("mcad_cache")
    }
    assert _cycles(graph) == []


def test_size_limits():
    """No module under mcad_cache/ over 600 lines, no pipeline over 250, except those named in docs/style.md."""
    style = (ROOT / "docs" / "style.md").read_text()
    assert [p for p in SIZE_EXCEPTIONS if p not in style] == []
    over = [
        (str(p.relative_to(ROOT)), n)
        for folder, limit in (("mcad_cache", MAX_LIBRARY_LINES), ("pipelines", MAX_PIPELINE_LINES))
        for p in _files(folder)
        if (n := len(p.read_text().splitlines())) > SIZE_EXCEPTIONS.get(str(p.relative_to(ROOT)), limit)
    ]
    assert over == []


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
    assert _bad(_files(f"mcad_cache/{package}"), forbidden) == []


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
