"""``mcad-cache data verify``: stream shards once and report what is wrong (see mcad_cache.data.verify)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.skips import SKIP_REASONS
from mcad_cache.data.verify import VerifyReport, verify_shards
from mcad_cache.data.webdataset import expand_shards
from mcad_cache.errors import InputPathError
from mcad_cache.preflight import check_writable_file
from mcad_cache.progress import no_progress

__all__ = ["SKIP_REASONS", "run"]  # SKIP_REASONS: the rows of the CLI's report table


def run(
    shards: Sequence[str], *, json_out: str | None = None, progress: Callable[..., Iterable[Any]] = no_progress
) -> VerifyReport:
    """Verify ``shards`` with the default decode policy; write the report to ``json_out`` when given.

    Raises:
        InputPathError: no shard matches.
        OutputPathError: ``json_out`` cannot be written (checked before any shard is read).
    """
    try:
        paths = expand_shards(list(shards))
    except ValueError as err:  # expand_shards' only error: nothing matches (a user path mistake)
        raise InputPathError(f"data verify: {err}; check the shard paths") from err
    if json_out:  # before reading any shard
        check_writable_file(json_out, option="--json")
    report = verify_shards(paths, policy=DecodePolicy(), progress=progress)
    if json_out:
        path = Path(json_out)
        path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report
