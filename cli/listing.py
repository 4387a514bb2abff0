"""``mcad-cache list teachers|students|presets|integrations|importers``: what the registries hold."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from mcad_cache.cli.app import app
from mcad_cache.cli.options import FORMAT_HELP, Format, render_rows
from mcad_cache.pipelines import catalog

Listable = Enum("Listable", {name: name for name in catalog.LISTABLE}, type=str)  # choices of `list WHAT`


@app.command("list")
def list_(
    what: Annotated[Listable, typer.Argument(help="which registry to list")],
    fmt: Annotated[Format, typer.Option("--format", help=FORMAT_HELP)] = Format.table,
) -> None:
    """List the registered teachers, student configs, loss presets, integration modes or data importers."""
    rows = catalog.describe(what.value)
    render_rows(rows, ("name", "description"), fmt, title=what.value)
