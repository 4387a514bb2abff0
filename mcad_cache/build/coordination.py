"""Who may write a cache, and when: the build's file lock, the resume-or-recreate decision for what is at ``out``,
and the waits between ranks (``rank`` / ``world_size``) on each other's done markers.

Ranks synchronise through the cache's own done markers (polled), not through collectives; a torchrun version
(issue 16) replaces :func:`wait_done` / :func:`wait_for_layout` with barriers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mcad_cache.cache.manifest import fingerprint_diff, format_diff, utc_now
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.errors import BuildLockedError, CacheMismatchError, CacheSchemaError, McadError

_logger = logging.getLogger(__name__)

WAIT_POLL_S = 0.5  # how often a rank polls the done markers of other ranks (our choice)
WAIT_LOG_S = 60.0  # how often it logs that it is still waiting (our choice)


class BuildLock:
    """An exclusive ``fcntl.flock`` on ``<out>.lock`` (``<out>.rank<r>.lock`` with several ranks), so that two
    processes never write the same units. The kernel drops the lock when its process dies (SIGKILL included), so an
    interrupted build never leaves a stale lock. Removed when the build returns.

    Raises (on enter):
        BuildLockedError: another process holds the lock (the message names it and the lock file).
    """

    def __init__(self, out: Path, *, rank: int, world_size: int) -> None:
        name = out.name + (".lock" if world_size == 1 else f".rank{rank}.lock")
        self.path = out.parent / name
        self.fd: int | None = None

    def __enter__(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise BuildLockedError(
                f"another build is writing {self.path.with_suffix('')} ({holder or 'unknown process'}); "
                f"wait for it or stop it (lock {self.path})"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {utc_now()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def remove_path(path: Path) -> None:
    """Delete a directory tree or a file."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def open_existing(out: Path, fingerprint: dict[str, Any], *, overwrite: bool) -> CacheWriter | None:
    """Rank 0: the resumable writer at ``out``, or None when a fresh cache is to be created (deleting what is there
    when ``overwrite`` allows it, or when the cache was interrupted while being created).

    Raises:
        CacheMismatchError: ``out`` holds something else (not a cache, an unreadable cache, or a cache with another
            fingerprint: the message is a diff) and ``overwrite`` is off.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / "zarr.json").is_file():
        if overwrite:
            _logger.warning("removing %s (not a cache) because of overwrite", out)
            remove_path(out)
            return None
        raise CacheMismatchError(f"{out} exists and is not an mcad-cache cache; choose another --out or --overwrite")
    try:
        writer = CacheWriter.open(out)
    except (CacheSchemaError, McadError) as err:
        if overwrite:
            remove_path(out)
            return None
        raise CacheMismatchError(f"{out}: existing cache cannot be resumed ({err}); pass --overwrite") from err
    found = writer.manifest.get("fingerprint", {})
    lines = fingerprint_diff(found, fingerprint)
    if lines:
        if overwrite:
            _logger.warning("overwriting cache %s built with another fingerprint:%s", out, format_diff(lines))
            remove_path(out)
            return None
        raise CacheMismatchError(
            f"{out} holds a cache built differently (pass --overwrite to replace it):{format_diff(lines)}"
        )
    if not writer.done("layout").all():
        _logger.info("cache %s was interrupted while being created: recreating it", out)
        remove_path(out)
        return None
    return writer


def wait_for_layout(out: Path, fingerprint: dict[str, Any], *, overwrite: bool) -> CacheWriter:
    """Ranks > 0: wait until rank 0 has created (or validated) the cache, then open it for writing.

    Raises:
        CacheMismatchError: the cache at ``out`` has another fingerprint (and ``overwrite`` is off, so rank 0 will
            not replace it).
    """
    t0 = last = time.monotonic()
    while True:
        if (out / "zarr.json").is_file():
            try:
                writer = CacheWriter.open(out)
            except McadError:
                writer = None
            if writer is not None:
                lines = fingerprint_diff(writer.manifest.get("fingerprint", {}), fingerprint)
                if lines and not overwrite:
                    raise CacheMismatchError(f"{out} holds a cache built differently:{format_diff(lines)}")
                if not lines and writer.done("layout").all():
                    return writer
        if time.monotonic() - last > WAIT_LOG_S:
            last = time.monotonic()
            _logger.info("waiting %.0f s for rank 0 to create %s", last - t0, out)
        time.sleep(WAIT_POLL_S)


def wait_done(writer: CacheWriter, stages: tuple[str, ...]) -> None:
    """Block until every unit of ``stages`` is committed (by any rank). Returns at once for a single process."""
    t0 = last = time.monotonic()
    while True:
        missing = {s: int((~writer.done(s)).sum()) for s in stages}
        if not any(missing.values()):
            return
        if time.monotonic() - last > WAIT_LOG_S:
            last = time.monotonic()
            _logger.info("waiting %.0f s for other ranks: units not done %s", last - t0, missing)
        time.sleep(WAIT_POLL_S)


__all__ = ["WAIT_LOG_S", "WAIT_POLL_S", "BuildLock", "open_existing", "remove_path", "wait_done", "wait_for_layout"]
