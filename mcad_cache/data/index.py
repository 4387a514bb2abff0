"""Tar header scanning and random access to samples by key.

:func:`scan_shard` reads only the 512-byte tar headers of an uncompressed WebDataset shard (seeking over the
data), and finds where each member's bytes lie. It also detects truncation: a member whose data runs past the end of
the file, a corrupt header, or a missing end-of-archive block. :class:`ShardIndex` builds on it to map every
``__key__`` to its members so that training can fetch a candidate image by id.

Member names follow WebDataset (``webdataset.tariterators.base_plus_ext``): the key is everything before the first
dot of the file name (directories included), the extension everything after it.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext

from mcad_cache.data.captions import CAPTION_EXTENSIONS, parse_captions

_logger = logging.getLogger(__name__)

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
        what was wrong. An unreadable file has ``unreadable`` set and no members.
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


@dataclass(frozen=True)
class IndexEntry:
    """Where one sample lies: its shard and its members by extension."""

    shard: str
    members: dict[str, Member]


class ShardIndex:
    """Random access to samples by ``__key__`` through tar member offsets (headers read once, at construction).

    The first occurrence of a key (in the given shard order) wins; later occurrences are listed in
    ``duplicates``. Members of truncated shards that are complete are indexed. Open file handles are cached per
    process (safe to use from DataLoader workers after fork).

    Args:
        shards: shard paths, globs or brace patterns (see :func:`mcad_cache.data.webdataset.expand_shards`).
    Raises:
        ValueError: no shard matches the patterns.
    """

    def __init__(self, shards: str | Iterable[str]) -> None:
        from mcad_cache.data.webdataset import expand_shards  # local: webdataset.py imports this module

        self.shards: list[str] = expand_shards(shards)
        self._entries: dict[str, IndexEntry] = {}
        self.duplicates: list[tuple[str, str]] = []  # (key, shard) of ignored later occurrences
        self.scans: dict[str, ShardScan] = {}
        for shard in self.shards:
            scan = scan_shard(shard)
            self.scans[shard] = scan
            local: dict[str, dict[str, Member]] = {}
            for m in scan.members:
                if m.key is not None and m.recognised:
                    local.setdefault(m.key, {}).setdefault(m.ext, m)
            for key, members in local.items():
                if key in self._entries:
                    self.duplicates.append((key, shard))
                else:
                    self._entries[key] = IndexEntry(shard, members)
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """All indexed keys, in shard order then tar order."""
        return list(self._entries)

    def entry(self, key: str) -> IndexEntry:
        """The shard and members of ``key``. Raises KeyError naming the key if it is not indexed."""
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"sample key {key!r} is not in the {len(self.shards)} indexed shard(s)") from None

    def _read(self, shard: str, member: Member) -> bytes:
        if os.getpid() != self._pid:  # forked worker: do not share file offsets with the parent
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = open(shard, "rb")  # noqa: SIM115 (kept open for repeated reads)
        f.seek(member.offset)
        return f.read(member.size)

    def read_bytes(self, key: str, ext: str) -> bytes:
        """The raw bytes of member ``KEY.<ext>`` (e.g. ``"json"`` for the sample's metadata).

        Raises:
            KeyError: unknown key or no such member.
        """
        entry = self.entry(key)
        if ext not in entry.members:
            raise KeyError(f"sample {key!r} in {entry.shard} has no .{ext} member (has {sorted(entry.members)})")
        return self._read(entry.shard, entry.members[ext])

    def read_image_bytes(self, key: str) -> bytes:
        """The encoded image file of ``key`` (decode it with :func:`mcad_cache.data.decode.decode_image`).

        Raises:
            KeyError: unknown key, or the sample has no image member.
        """
        entry = self.entry(key)
        for ext in IMAGE_EXTENSIONS:
            if ext in entry.members:
                return self._read(entry.shard, entry.members[ext])
        raise KeyError(f"sample {key!r} in {entry.shard} has no image member")

    def read_captions(self, key: str) -> list[str]:
        """The cleaned captions of ``key`` (same rules as the streaming reader).

        Raises:
            KeyError: unknown key, or the sample has no caption member.
            SampleSkip: the caption member is unusable (``caption_error``, ``empty_caption``).
        """
        entry = self.entry(key)
        for ext in CAPTION_EXTENSIONS:
            if ext in entry.members:
                return parse_captions(self._read(entry.shard, entry.members[ext]), ext=ext)
        raise KeyError(f"sample {key!r} in {entry.shard} has no caption member")

    def close(self) -> None:
        """Close cached file handles."""
        for f in self._handles.values():
            f.close()  # type: ignore[attr-defined]
        self._handles = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
