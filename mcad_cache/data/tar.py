"""Tar-level primitives of WebDataset shards: shard patterns, tar header scanning with truncation detection, member
offsets and reads, and the grouping of members into samples by ``__key__``.

:func:`scan_shard` reads only the 512-byte tar headers of an uncompressed WebDataset shard (seeking over the
data), and finds where each member's bytes lie. It also detects truncation: a member whose data runs past the end of
the file, a corrupt header, or a missing end-of-archive block. Built on by ``webdataset.py`` (streaming),
``index.py`` (random access by key) and ``verify.py``.

Member names follow WebDataset (``webdataset.tariterators.base_plus_ext``): the key is everything before the first
dot of the file name (directories included), the extension everything after it.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import braceexpand
from webdataset.tariterators import base_plus_ext

from mcad_cache.data.captions import CAPTION_EXTENSIONS

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pnm")
KNOWN_EXTENSIONS: frozenset[str] = frozenset(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS)
_BLOCK = tarfile.BLOCKSIZE  # 512


@dataclass(frozen=True)
class Member:
    """One regular file inside a shard."""

    name: str  # full member name
    key: str | None  # WebDataset __key__ (None: the name has no dot)
    ext: str | None  # extension after the first dot of the file name, case kept
    offset: int  # byte offset of the member's data in the tar
    size: int  # data size in bytes

    @property
    def recognised(self) -> bool:
        """True if the extension is one this project reads (exact, lower-case; ``docs/data.md``)."""
        return self.ext is not None and self.ext in KNOWN_EXTENSIONS


@dataclass
class ShardScan:
    """The headers of one shard. ``members`` holds only complete members (their data lies inside the file)."""

    path: str
    members: list[Member] = field(default_factory=list)
    size_bytes: int = 0
    truncated: bool = False  # the file ends early or has a corrupt header: the tail is lost
    error: str = ""  # why the shard is truncated or unreadable
    cut_key: str | None = None  # key of the member whose data runs past the end of the file (None: not known)
    unreadable: bool = False  # not a tar at all / cannot be opened


def _is_meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.endswith("__")


def scan_shard(path: str) -> ShardScan:
    """Read a shard's tar headers (not its data) and detect truncation.

    Args:
        path: an uncompressed ``.tar`` file.
    Returns:
        A :class:`ShardScan`. A truncated shard lists the members that are complete; ``truncated`` and ``error`` say
        what was wrong, and ``cut_key`` names the sample whose member is cut when the cut falls inside a member's
        data. An unreadable file has ``unreadable`` set and no members.
    """
    scan = ShardScan(path=path)
    try:
        scan.size_bytes = os.path.getsize(path)
        tf = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as err:
        scan.unreadable = True
        scan.error = f"not an uncompressed tar or cannot be opened: {type(err).__name__}: {err}"
        return scan
    with tf:
        try:
            for info in tf:
                if info.offset_data + info.size > scan.size_bytes:
                    scan.truncated = True
                    if info.isreg() and not _is_meta(info.name):
                        scan.cut_key = base_plus_ext(info.name)[0]
                    scan.error = (
                        f"member {info.name!r} needs {info.size} bytes at {info.offset_data}, file has "
                        f"{scan.size_bytes}"
                    )
                    break
                if not info.isreg() or _is_meta(info.name):
                    continue
                key, ext = base_plus_ext(info.name)
                scan.members.append(Member(info.name, key, ext, info.offset_data, info.size))
        except (tarfile.TarError, EOFError, OSError) as err:
            scan.truncated = True
            scan.error = f"tar read error after {len(scan.members)} members: {type(err).__name__}: {err}"
        if not scan.truncated:
            # A complete tar ends with zero blocks where tarfile stopped; a cut at a member boundary or a corrupt
            # header leaves no zero block there (tarfile itself stops silently in both cases).
            tf.fileobj.seek(tf.offset)
            block = tf.fileobj.read(_BLOCK)
            if len(block) < _BLOCK or block.count(0) != _BLOCK:
                scan.truncated = True
                what = "no end-of-archive block" if len(block) < _BLOCK else "corrupt tar header"
                scan.error = f"{what} at byte {tf.offset} of {scan.size_bytes}"
    return scan


def read_member(path: str, member: Member) -> bytes:
    """The data bytes of one member (seek + read)."""
    with open(path, "rb") as f:
        f.seek(member.offset)
        return f.read(member.size)


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Expand shard arguments (paths, globs, brace patterns like ``shard-{000000..000009}.tar``, folders) to paths.

    Brace patterns are expanded with ``braceexpand`` (as WebDataset does), then each result is globbed; a folder
    stands for the ``*.tar`` files directly inside it; paths that do not exist are ignored.

    Args:
        patterns: one pattern or several.
    Returns:
        Sorted, de-duplicated list of existing file paths.
    Raises:
        ValueError: if nothing matches (the message lists the patterns).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    patterns = [os.fspath(p) for p in patterns]
    found: set[str] = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            matches = glob.glob(expanded) if glob.has_magic(expanded) else [expanded]
            for m in matches:
                if os.path.isdir(m):  # a folder stands for the .tar files directly inside it
                    found.update(os.path.join(m, f) for f in os.listdir(m) if f.endswith(".tar"))
                elif os.path.isfile(m):
                    found.add(m)
    if not found:
        raise ValueError(f"no shard files match {patterns}")
    return sorted(found)


def group_members(scan: ShardScan) -> tuple[list[str], dict[str, list[list[Member]]], list[Member]]:
    """Keys in order of first appearance, the runs (adjacent member groups) of each key, unrecognised members."""
    order: list[str] = []
    runs: dict[str, list[list[Member]]] = {}
    unrecognised: list[Member] = []
    previous: str | None = None
    for m in scan.members:
        if m.key is None:
            unrecognised.append(m)
            continue
        if not m.recognised:
            unrecognised.append(m)
        if m.key not in runs:
            order.append(m.key)
            runs[m.key] = [[m]]
        elif m.key == previous:
            runs[m.key][-1].append(m)
        else:
            runs[m.key].append([m])
        previous = m.key
    return order, runs, unrecognised


__all__ = [
    "IMAGE_EXTENSIONS",
    "KNOWN_EXTENSIONS",
    "Member",
    "ShardScan",
    "expand_shards",
    "group_members",
    "read_member",
    "scan_shard",
]
