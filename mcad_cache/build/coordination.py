"""Who may write a cache, and when: the build's file lock, the resume-or-recreate decision for what is at ``out``,
and the meetings of ranks (``rank`` / ``world_size``) between passes (:class:`RankSync`).

Two ways to run several ranks (``docs/cache-format.md``):

- **torchrun** (``torch.distributed`` initialised with this world size): passes are separated by barriers of a gloo
  group (gloo on CPU; a gloo side group beside NCCL on GPUs), ``monitored_barrier`` with ``timeout_s``. A rank that
  dies closes its sockets, so the others fail at once (gloo); one that hangs makes them fail after ``timeout_s``.
  Either way the message names the ranks and the units they have not committed (read from the done markers).
- **hand-started** (``--rank`` / ``--world-size``, no process group): ranks poll the cache's done markers. Each rank
  holds ``<out>.rank<r>.lock`` (its content names the rank and world size): a rank that finds another running with
  another world size refuses, and a wait fails once the ranks owning the missing units have held no lock for
  ``timeout_s``.

Done markers stay in both modes: they are what a rerun resumes from.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from mcad_cache.cache.manifest import fingerprint_diff, format_diff, utc_now
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.errors import BuildLockedError, BuildRankError, CacheMismatchError, CacheSchemaError, McadError

_logger = logging.getLogger(__name__)

WAIT_POLL_S = 0.5  # how often a rank polls the done markers of other ranks (our choice)
WAIT_LOG_S = 60.0  # how often it logs that it is still waiting (our choice)
LOCK_RETRIES = 5  # tries to take the build lock, 0.2 s apart (another rank may be probing it for a moment)
_LOCK_TEXT = re.compile(r"rank (\d+) of (\d+)")


class BuildLock:
    """An exclusive ``fcntl.flock`` on ``<out>.lock`` (``<out>.rank<r>.lock`` with several ranks), so that two
    processes never write the same units. The kernel drops the lock when its process dies (SIGKILL included), so an
    interrupted build never leaves a stale lock. Removed when the build returns.

    Raises (on enter):
        BuildLockedError: another process holds the lock (the message names it and the lock file).
    """

    def __init__(self, out: Path, *, rank: int, world_size: int) -> None:
        self.path = lock_path(out, rank=rank, world_size=world_size)
        self.out, self.rank, self.world_size = out, rank, world_size
        self.fd: int | None = None

    def __enter__(self) -> BuildLock:
        """Take the lock, then refuse if another rank of this cache runs with another world size.

        Raises:
            BuildLockedError: another process holds this lock.
            BuildRankError: a running rank of ``out`` has another world size (names it and its lock file).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(LOCK_RETRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as err:
                if attempt + 1 < LOCK_RETRIES:
                    time.sleep(0.2)
                    continue
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise BuildLockedError(
                    f"another build is writing {self.out} ({holder or 'unknown process'}); "
                    f"wait for it or stop it (lock {self.path})"
                ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} rank {self.rank} of {self.world_size} since {utc_now()}".encode(), 0)
        self.fd = fd
        try:
            check_world_size(self.out, rank=self.rank, world_size=self.world_size)
        except BuildRankError:
            self.__exit__()
            raise
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


def lock_path(out: Path, *, rank: int, world_size: int) -> Path:
    """``<out>.lock`` for one process, ``<out>.rank<r>.lock`` for rank r of several."""
    return out.parent / (out.name + (".lock" if world_size == 1 else f".rank{rank}.lock"))


def running_ranks(out: Path) -> dict[Path, tuple[int, int] | None]:
    """The build locks of ``out`` held right now by a live process: lock file -> (rank, world size) from its text
    (None when unreadable). A lock file nobody holds (a finished or killed rank) is not listed."""
    found: dict[Path, tuple[int, int] | None] = {}
    for path in sorted(out.parent.glob(out.name + ".lock")) + sorted(out.parent.glob(out.name + ".rank*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live rank
                match = _LOCK_TEXT.search(os.pread(fd, 200, 0).decode(errors="replace"))
                found[path] = (int(match[1]), int(match[2])) if match else None
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return found


def check_world_size(out: Path, *, rank: int, world_size: int) -> None:
    """Refuse when a running rank of ``out`` (by its held lock) has another world size than this one's.

    Raises:
        BuildRankError: names the other rank, its world size and its lock file.
    """
    mine = lock_path(out, rank=rank, world_size=world_size)
    for path, info in running_ranks(out).items():
        if path == mine or info is None or info[1] == world_size:
            continue
        raise BuildRankError(
            f"rank {info[0]} of --world-size {info[1]} is building {out} (lock {path}), but this is rank {rank} of "
            f"--world-size {world_size}; start every rank with the same --world-size"
        )


def missing_units(writer: CacheWriter, stages: tuple[str, ...], *, world_size: int) -> dict[int, dict[str, list[int]]]:
    """Units of ``stages`` not committed yet, by the rank that owns them (unit u belongs to rank u % world_size):
    ``{rank: {stage: [unit, ...]}}``, empty when every unit is done."""
    out: dict[int, dict[str, list[int]]] = {}
    for stage in stages:
        for unit in np.nonzero(~writer.done(stage))[0]:
            out.setdefault(int(unit) % world_size, {}).setdefault(stage, []).append(int(unit))
    return out


def describe_missing(missing: dict[int, dict[str, list[int]]], *, world_size: int) -> str:
    """``rank 1 of 2: image_emb units [1, 3]; rank 2 ...`` (at most 8 units per stage shown)."""
    parts = []
    for rank in sorted(missing):
        stages = "; ".join(
            f"{stage} units {units[:8]}{' ...' if len(units) > 8 else ''} ({len(units)})"
            for stage, units in missing[rank].items()
        )
        parts.append(f"rank {rank} of {world_size}: {stages}")
    return " | ".join(parts)


@functools.cache
def _gloo_group(world_size: int) -> Any:
    """The group the build's barriers use: the default group when it is gloo, else a gloo side group (NCCL
    barriers would need a GPU stream and cannot name a missing rank). Created by every rank at its first barrier."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


class RankSync:
    """Where ranks of one build meet: after pass 0 (layout), after each pass, and before rank 0 finalises.

    Collective mode when ``torch.distributed`` is initialised with ``world_size`` ranks (torchrun), file mode (done
    markers polled, build locks as liveness) otherwise; a single process never waits. See the module docstring.

    Args:
        out: the cache path (its lock files are the file-mode liveness signal).
        rank, world_size: this process and the number of build processes.
        timeout_s: how long a wait may last without the missing ranks (collective: ``monitored_barrier`` timeout;
            file mode: time without their locks held) before it fails (``BuildConfig.wait_timeout_s``).
    """

    def __init__(self, out: Path, *, rank: int, world_size: int, timeout_s: float) -> None:
        self.out, self.rank, self.world_size, self.timeout_s = out, rank, world_size, float(timeout_s)
        self.collective = (
            world_size > 1
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() == world_size
            and dist.get_rank() == rank
        )

    def _barrier(self, what: str, *, missing: Callable[[], str] = str) -> None:
        """A monitored gloo barrier. Raises BuildRankError (``what``, then ``missing()``: who has not committed what)
        when a rank is gone or later than ``timeout_s``."""
        try:
            dist.monitored_barrier(
                group=_gloo_group(self.world_size),
                timeout=datetime.timedelta(seconds=self.timeout_s),
                wait_all_ranks=True,
            )
        except RuntimeError as err:
            reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise BuildRankError(
                f"rank {self.rank} of {self.world_size}: the ranks did not meet after {what} within "
                f"{self.timeout_s:.0f} s, or one stopped ({reason}){missing()}; rerun the same command to resume "
                "from the committed units"
            ) from err

    def layout_ready(self) -> None:
        """Rank 0, once the cache at ``out`` is created or validated: let the other ranks open it (collective mode;
        the file mode's ranks poll for it)."""
        if self.collective and self.rank == 0:
            self._barrier("pass 0 (cache layout)")

    def wait_for_layout(self, fingerprint: dict[str, Any], *, overwrite: bool) -> CacheWriter:
        """Ranks > 0: wait until rank 0 has created (or validated) the cache, then open it for writing.

        Raises:
            CacheMismatchError: the cache at ``out`` has another fingerprint (and ``overwrite`` is off, so rank 0 will
                not replace it).
            BuildRankError: rank 0 is gone (see the class docstring).
        """
        if self.collective:
            self._barrier("pass 0 (cache layout)", missing=lambda: "; rank 0 creates the cache")
        t0 = last = absent_since = time.monotonic()
        while True:
            writer = _open_ready(self.out, fingerprint, overwrite=overwrite)
            if writer is not None:
                return writer
            if self.collective:  # rank 0 passed the barrier, so the cache must be there
                raise BuildRankError(f"rank 0 passed pass 0 but {self.out} is not a created cache; rerun the build")
            check_world_size(self.out, rank=self.rank, world_size=self.world_size)
            now = time.monotonic()
            if lock_path(self.out, rank=0, world_size=self.world_size) in running_ranks(self.out):
                absent_since = now
            elif now - absent_since > self.timeout_s:
                raise BuildRankError(
                    f"rank {self.rank} of {self.world_size}: rank 0 has not created {self.out} and has not run for "
                    f"{self.timeout_s:.0f} s (no lock {lock_path(self.out, rank=0, world_size=self.world_size)}); "
                    "start rank 0 with the same --out and --world-size"
                )
            if now - last > WAIT_LOG_S:
                last = now
                _logger.info("rank %d: waiting %.0f s for rank 0 to create %s", self.rank, now - t0, self.out)
            time.sleep(WAIT_POLL_S)

    def wait(self, writer: CacheWriter, stages: tuple[str, ...], *, after: str) -> None:
        """Block until every unit of ``stages`` is committed (by any rank). Returns at once for one process.

        Args:
            writer: the cache; stages: done-marker stages (``cache.writer.STAGES``); after: the pass just run (for
                messages).
        Raises:
            BuildRankError: a rank owning missing units died, stopped or runs with another world size; the message
                names the ranks and their units.
        """
        if self.world_size <= 1:
            return
        _logger.info("rank %d of %d: %s done; waiting for the other ranks", self.rank, self.world_size, after)
        if self.collective:

            def not_committed() -> str:
                left = missing_units(writer, stages, world_size=self.world_size)
                return f"; not committed: {describe_missing(left, world_size=self.world_size)}" if left else ""

            self._barrier(after, missing=not_committed)
            missing = missing_units(writer, stages, world_size=self.world_size)
            if missing:  # every rank has run the pass: a unit still missing was not written by its owner
                raise BuildRankError(
                    f"after {after} every rank met, but units are not committed: "
                    f"{describe_missing(missing, world_size=self.world_size)}; rerun the same command to resume"
                )
            return
        self._poll(writer, stages, after=after)

    def _poll(self, writer: CacheWriter, stages: tuple[str, ...], *, after: str) -> None:
        t0 = last = absent_since = time.monotonic()
        while True:
            missing = missing_units(writer, stages, world_size=self.world_size)
            if not missing:
                return
            check_world_size(self.out, rank=self.rank, world_size=self.world_size)
            now = time.monotonic()
            running = running_ranks(self.out)
            if any(lock_path(self.out, rank=r, world_size=self.world_size) in running for r in missing):
                absent_since = now
            elif now - absent_since > self.timeout_s:
                raise BuildRankError(
                    f"rank {self.rank} of {self.world_size}: after {after}, rank(s) {sorted(missing)} have not run "
                    f"for {self.timeout_s:.0f} s (no lock held) and have not committed: "
                    f"{describe_missing(missing, world_size=self.world_size)}; start them with the same --out and "
                    "--world-size, or rerun with --world-size 1 to finish the cache alone"
                )
            if now - last > WAIT_LOG_S:
                last = now
                _logger.info(
                    "rank %d: waiting %.0f s for %s",
                    self.rank,
                    now - t0,
                    describe_missing(missing, world_size=self.world_size),
                )
            time.sleep(WAIT_POLL_S)

    def stage_seconds(self, seconds: dict[str, float]) -> dict[str, float]:
        """The build summary's pass times: this rank's ``seconds`` ({stage: s}); in collective mode every rank's, in
        rank order, as ``{"rank r: stage": s}`` (all ranks call it; rank 0 reports it)."""
        if not self.collective:
            return dict(seconds)
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, dict(seconds), group=_gloo_group(self.world_size))
        return {f"rank {r}: {stage}": s for r, per_rank in enumerate(values) for stage, s in per_rank.items()}


def _open_ready(out: Path, fingerprint: dict[str, Any], *, overwrite: bool) -> CacheWriter | None:
    """The writer of the cache at ``out`` once its layout is committed with this fingerprint, else None.

    Raises:
        CacheMismatchError: another fingerprint and ``overwrite`` off.
    """
    if not (out / "zarr.json").is_file():
        return None
    try:
        writer = CacheWriter.open(out)
    except McadError:
        return None
    lines = fingerprint_diff(writer.manifest.get("fingerprint", {}), fingerprint)
    if lines and not overwrite:
        raise CacheMismatchError(f"{out} holds a cache built differently:{format_diff(lines)}")
    if not lines and writer.done("layout").all():
        return writer
    return None


__all__ = [
    "WAIT_LOG_S",
    "WAIT_POLL_S",
    "BuildLock",
    "RankSync",
    "check_world_size",
    "describe_missing",
    "lock_path",
    "missing_units",
    "open_existing",
    "remove_path",
    "running_ranks",
]
