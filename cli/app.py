"""The typer application object and the helpers every command module shares."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mcad_cache.errors import McadError

T = TypeVar("T")

app = typer.Typer(
    name="mcad-cache",
    help="Run MCAD teachers once into a Zarr v3 cache; distill and evaluate small dual-encoder students from it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: one line per option, [default: ...] beside it
)
data_app = typer.Typer(help="Import captioned images into WebDataset shards and verify shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True)  # logs, progress and notices; results go to stdout (cli.options.stdout)


def _version(value: bool) -> None:
    if value:
        try:
            v = dist_version("mcad-cache")
        except PackageNotFoundError:  # a source tree without an install
            v = "unknown (not installed)"
        typer.echo(f"mcad-cache {v}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """Run MCAD teachers once into a Zarr v3 cache; distill and evaluate small dual-encoder students from it."""


def setup_logging(verbose: bool = False) -> None:
    """Route library logging through rich on stderr (the library itself never configures handlers)."""
    # Our own loggers at INFO (DEBUG with -v); other libraries (open_clip logs to the root logger) at WARNING.
    logging.getLogger("mcad_cache").setLevel(logging.DEBUG if verbose else logging.INFO)
    # transformers reports unused checkpoint weights (e.g. MiniLM layers a student drops on purpose) through its own
    # handler; errors only unless --verbose.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_debug() if verbose else hf_logging.set_verbosity_error()
    if not verbose:  # its "Loading weights" bar, once per student created (50 times in a study)
        hf_logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def progress(iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
    """Rich progress bar over an iterable; pipelines call it as ``progress(it, description, total)``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not console.is_terminal:  # a file or pipe: a rich bar would only appear at the end
        yield from _progress_lines(iterable, description, total)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[postfix]}"),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, postfix="")
        for item in iterable:
            yield item
            postfix = getattr(iterable, "postfix", "")
            bar.update(task, advance=1, postfix=postfix)


PROGRESS_LINE_EVERY_S = 10.0  # seconds between progress lines when stderr is not a terminal (our choice)


def _progress_lines(iterable: Iterable[T], description: str, total: int | None) -> Iterable[T]:
    """Plain progress lines on stderr (``description n/total, s elapsed``): the first item, then every
    ``PROGRESS_LINE_EVERY_S`` seconds, then the last; for logs written to a file."""
    t0 = last = time.perf_counter()
    n = 0
    of = f"/{total}" if total else ""
    for item in iterable:
        yield item
        n += 1
        now = time.perf_counter()
        if n == 1 or now - last >= PROGRESS_LINE_EVERY_S:
            postfix = getattr(iterable, "postfix", "")
            console.print(f"{description} {n}{of} ({now - t0:.0f} s) {postfix}".rstrip(), highlight=False)
            last = now
    console.print(f"{description} {n}{of} done ({time.perf_counter() - t0:.0f} s)", highlight=False)


def user_error(err: Exception) -> typer.Exit:
    """Print ``err`` as a one-line message on stderr; return the exit (code 1) for the caller to raise."""
    # escape: a message may hold "[...]" (paths, gloo's "[/pytorch/.../pair.cc:561]") that rich would parse as markup
    console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def call_pipeline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call one pipeline function; an McadError becomes a one-line message on stderr and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except McadError as err:
        raise user_error(err) from err
