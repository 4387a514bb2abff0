"""The progress-reporting convention shared by library loops and pipelines (STYLE.md, "Logging and progress").

A long loop takes ``progress: ProgressFn = no_progress`` and iterates ``progress(iterable, description, total)``.
The CLI passes a rich progress bar; library code never draws one itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

ProgressFn = Callable[..., Iterable[Any]]


def no_progress(iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
    """The default ``progress``: the iterable itself, unchanged."""
    return iterable
