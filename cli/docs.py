"""The option reference of ``docs/cli.md``, generated from the app itself (``python -m mcad_cache.cli.docs``).

Writes one section per command: its help, then a table of every option with its default and allowed values, as
``--help`` shows them. The hand-written conventions above the marker line of docs/cli.md are kept; everything
below it is regenerated. ``tests/test_cli_conventions.py`` checks that the file is current.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from mcad_cache.cli.main import app

MARKER = "<!-- generated below: python -m mcad_cache.cli.docs -->"


def _commands(group: Any, prefix: str = "mcad-cache") -> list[tuple[str, Any]]:
    out = []
    for name in sorted(group.commands):
        cmd = group.commands[name]
        path = f"{prefix} {name}"
        if hasattr(cmd, "commands"):
            out.extend(_commands(cmd, path))
        else:
            out.append((path, cmd))
    return out


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """Markdown: a section per command with an option table (names and value as ``--help`` shows them, meaning and
    default)."""
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="mcad-cache")
    lines = [MARKER, "", "## Command reference", ""]
    for path, cmd in _commands(root):
        lines += [f"### `{path}`", "", _cell((cmd.help or "").strip().split("\n\n")[0]), ""]
        lines += ["| option | meaning [default] |", "|---|---|"]
        for p in cmd.params:
            record = p.get_help_record(ctx)
            if record is None:  # an argument
                record = (f"{p.name.upper()} (argument)", getattr(p, "help", "") or "")
            lines.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
        lines.append("")
    return "\n".join(lines)


def write(path: str | Path) -> None:
    """Replace everything below :data:`MARKER` in ``path`` with :func:`reference` (append the marker if absent)."""
    path = Path(path)
    head = path.read_text().split(MARKER)[0].rstrip() + "\n\n" if path.is_file() else ""
    path.write_text(head + reference() + "\n")


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "docs/cli.md")
