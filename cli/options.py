"""Option helpers every command shares: layered config from explicit flags, registry choices checked at parse time,
output formats on stdout.

Layering (STYLE.md "Configuration"): an option's default is the config dataclass's own default, so ``--help`` shows
it; a ``--config`` file sits under the flags because only the flags the user actually typed are passed on as
overrides (click's ``Context.get_parameter_source``), never the defaults. Flag > file > default.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mcad_cache.pipelines import catalog

stdout = Console(soft_wrap=True)  # results (tables, JSON, CSV, Markdown); logs and progress go to stderr

_EXPLICIT = ("COMMANDLINE", "ENVIRONMENT")  # click ParameterSource names (typer vendors its own click)
NOT_CONFIG = ("config", "verbose", "fmt", "plot")  # parameters that are no config field


def explicit_flags(ctx: typer.Context, *, rename: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The parameters of ``ctx`` the user typed (command line or environment), as config-field overrides.

    Defaults (shown in ``--help``) are left out, so a ``--config`` file's values win over them. Lists become tuples
    (the configs' sequence type); ``rename`` maps a parameter name to its config field (``{"fmt": "format"}``).
    """
    rename = rename or {}
    out: dict[str, Any] = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if name in NOT_CONFIG or source is None or source.name not in _EXPLICIT:
            continue
        out[rename.get(name, name)] = tuple(value) if isinstance(value, list) else value
    return out


class RegistryChoice:
    """A validated callback for an option whose allowed values are read from a registry when the command line is
    parsed (``catalog.choices``), so plugins and test teachers registered after import are accepted too. A wrong
    value is refused by click with the allowed list (exit code 2). ``metavar`` shows the values in ``--help``.

    Use: ``choice(TEACHER, help)`` = ``typer.Option(callback=TEACHER.check, metavar=TEACHER.metavar, help=help)``.
    """

    def __init__(self, what: str, *, extra: Callable[[str], bool] | None = None, extra_help: str = "") -> None:
        self.what = what
        self.extra = extra  # also accept values this predicate allows (e.g. a JSON path for --student)
        self.extra_help = extra_help

    def allowed(self) -> list[str]:
        return catalog.choices(self.what)

    @property
    def metavar(self) -> str:
        return "[" + "|".join(self.allowed()) + (f"|{self.extra_help}" if self.extra_help else "") + "]"

    def check(self, value: str | None) -> str | None:
        if value is None:
            return value
        allowed = self.allowed()
        if value in allowed or (self.extra is not None and self.extra(value)):
            return value
        also = f" or {self.extra_help}" if self.extra_help else ""
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, allowed))}{also}.")


def _is_json_path(value: str) -> bool:
    return value.endswith(".json")


TEACHER = RegistryChoice("teachers")
STUDENT = RegistryChoice("students", extra=_is_json_path, extra_help="PATH.json")
PRESET = RegistryChoice("presets")
IMPORTER = RegistryChoice("importers")
PRECISION = RegistryChoice("precisions")
EMB_DTYPE = RegistryChoice("emb_dtypes")
FUSED_DTYPE = RegistryChoice("fused_dtypes")
TOPK_BACKEND = RegistryChoice("topk_backends")
ITM_SCORE = RegistryChoice("itm_scores")
CANDIDATES = RegistryChoice("candidates")
REPORT_TO = RegistryChoice("report_to")
IN_BATCH = RegistryChoice("in_batch")

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_METAVAR = "[auto|cpu|cuda|cuda:N|mps]"


def check_device(value: str | None) -> str | None:
    """Callback of ``--device``: ``auto | cpu | mps | cuda | cuda:N`` at parse time (whether CUDA exists is checked
    by the run, ``runtime.resolve_device``)."""
    if value is None or _DEVICE.match(value):
        return value
    raise typer.BadParameter(f"{value!r} is not a device; use one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'.")


def choice(registry: RegistryChoice, help: str) -> Any:
    """``typer.Option`` validated against ``registry`` with its values in the help."""
    return typer.Option(callback=registry.check, metavar=registry.metavar, help=help)


def device_option(help: str = "where the model runs") -> Any:
    """``typer.Option`` for ``--device``, validated at parse time."""
    return typer.Option(callback=check_device, metavar=DEVICE_METAVAR, help=help)


class Format(str, Enum):
    """``--format`` of result commands: a rich table (default), JSON, CSV or GitHub Markdown, all on stdout."""

    table = "table"
    json = "json"
    csv = "csv"
    md = "md"


FORMAT_HELP = "result format on stdout: table | json | csv | md (logs stay on stderr)"


def render_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: Format, *, title: str = "") -> None:
    """Print ``rows`` (dicts with ``columns``) on stdout as CSV or Markdown (``tabulate``, GitHub style) or a rich
    table; JSON callers print their own full object with :func:`print_json`."""
    if fmt is Format.csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
    elif fmt is Format.md:
        from tabulate import tabulate

        typer.echo(tabulate([[r.get(c, "") for c in columns] for r in rows], headers=list(columns), tablefmt="github"))
    elif fmt is Format.json:
        print_json(list(rows))
    else:
        table = Table(title=title or None)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*(str(r.get(c, "")) for c in columns))
        stdout.print(table)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (plain text: no colour codes, parseable by ``json.loads``)."""
    typer.echo(json.dumps(value, indent=2, default=str))


def as_list(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """A repeatable option's values as a tuple, or None when none were given."""
    values = tuple(values or ())
    return values or None


__all__ = [
    "CANDIDATES",
    "EMB_DTYPE",
    "FORMAT_HELP",
    "FUSED_DTYPE",
    "IMPORTER",
    "IN_BATCH",
    "ITM_SCORE",
    "PRECISION",
    "PRESET",
    "REPORT_TO",
    "STUDENT",
    "TEACHER",
    "TOPK_BACKEND",
    "check_device",
    "choice",
    "device_option",
    "Format",
    "RegistryChoice",
    "explicit_flags",
    "print_json",
    "render_rows",
    "stdout",
]
