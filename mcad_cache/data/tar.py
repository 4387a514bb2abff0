"""Tar-level primitives of WebDataset shards: shard patterns, tar header scanning with truncation detection, member
offsets and reads, and the grouping of members into samples by ``__key__``.

:func:`scan_shard` reads only the 512-byte tar headers of an uncompressed WebDataset shard (seeking over the
data), and finds where each member's bytes lie. It also detects truncation: a member whose data runs past the end of
the file, a corrupt header, or a missing end-of-archive block. Built on by ``webdataset.py`` (streaming),
``index.py`` (random access by key) and ``verify.py``.

Shards as WebDataset users write them (issue 15): besides local ``.tar`` files, a shard may be a **stream**, opened
with WebDataset's own URL opener ``webdataset.gopen``: ``pipe:CMD`` (the command's stdout), ``http(s)://...`` (curl),
the other ``gopen`` schemes, and gzip-compressed tars (``.tar.gz`` / ``.tgz``, local or remote). A stream cannot seek,
so :func:`scan_shard` reads it once, sequentially (``tarfile`` stream mode), keeping each member's bytes in memory
(``Member.data``) while headers are checked the same way; readers that stream (import, verify, build, distill with
``--candidates bank``, eval) then work unchanged, at the cost of one whole shard in memory per reader. Random access
by key (:class:`mcad_cache.data.index.ShardIndex`) refuses streams with one line. The identity of a stream is the
sha256 of its *uncompressed tar bytes* (:func:`shard_sha256`), so ``shard.tar``, ``pipe:cat shard.tar`` and
``shard.tar.gz`` are the same shard.

Member names follow WebDataset (``webdataset.tariterators.base_plus_ext``): the key is everything before the first
dot of the file name (directories included), the extension everything after it.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import base_plus_ext

from mcad_cache.data.captions import CAPTION_EXTENSIONS
from mcad_cache.errors import DataSourceError
from mcad_cache.hashing import file_sha256

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pnm")
KNOWN_EXTENSIONS: frozenset[str] = frozenset(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS)
_BLOCK = tarfile.BLOCKSIZE  # 512
STREAM_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz")  # gzip-compressed tars: read as streams
SHARD_SUFFIXES: tuple[str, ...] = (".tar", *STREAM_SUFFIXES)  # the files a shard folder stands for
_TAIL_BYTES = 1 << 16  # bytes of a stream's end kept to check its end-of-archive block (tar pads to 10 KiB records)
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Member:
    """One regular file inside a shard."""

    name: str  # full member name
    key: str | None  # WebDataset __key__ (None: the name has no dot)
    ext: str | None  # extension after the first dot of the file name, case kept
    offset: int  # byte offset of the member's data in the tar
    size: int  # data size in bytes
    data: bytes | None = field(default=None, repr=False, compare=False)  # the bytes, for a member read from a stream

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
    stream: bool = False  # read sequentially from a stream (is_stream); members then carry their data
    sha256: str = ""  # streams: sha256 of the uncompressed tar bytes read (shard_sha256); "" for files


def _is_meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.endswith("__")


def is_stream(spec: str) -> bool:
    """True for a shard read sequentially: a ``webdataset.gopen`` URL (``pipe:``, ``http(s)://``, ...) or a
    gzip-compressed tar (:data:`STREAM_SUFFIXES`). Plain paths (and one-letter "schemes", Windows drives) are not."""
    return _is_url(spec) or spec.lower().endswith(STREAM_SUFFIXES)


def _is_url(spec: str) -> bool:
    scheme = urlparse(spec).scheme
    return len(scheme) > 1 and scheme in gopen_schemes and scheme != "__default__"


class _TarBytes:
    """The uncompressed tar bytes of a stream: ``read`` hashes and counts them and keeps the last few KiB."""

    def __init__(self, spec: str) -> None:
        self.raw: Any = gopen(spec, "rb")
        head = self.raw.read(2)
        self._head: bytes | None = head
        self.gz: Any = gzip.GzipFile(fileobj=self._Raw(self), mode="rb") if head == b"\x1f\x8b" else None
        self.sha = hashlib.sha256()
        self.count = 0
        self.tail = bytearray()

    class _Raw:  # the raw stream with its two peeked bytes put back (what GzipFile reads)
        def __init__(self, outer: _TarBytes) -> None:
            self.outer = outer

        def read(self, n: int = -1) -> bytes:
            return self.outer._raw_read(n)

    def _raw_read(self, n: int = -1) -> bytes:
        head, self._head = self._head or b"", None
        if n is not None and 0 <= n <= len(head):
            self._head = head[n:] or None
            return head[:n]
        rest = self.raw.read(-1 if n is None or n < 0 else n - len(head))
        return head + (rest or b"")

    def read(self, n: int = -1) -> bytes:
        data = self.gz.read(n) if self.gz is not None else self._raw_read(n)
        self.sha.update(data)
        self.count += len(data)
        self.tail += data
        del self.tail[: max(0, len(self.tail) - _TAIL_BYTES)]
        return data

    def drain(self) -> None:
        while self.read(_READ_BYTES):
            pass

    def close(self) -> None:
        """Close the stream; a ``pipe:`` whose command failed raises ``OSError`` naming its exit status."""
        self.raw.close()


def open_tar_stream(spec: str) -> IO[bytes]:
    """Open a stream shard with ``webdataset.gopen``; gzip is detected by its magic bytes and decompressed.

    Returns:
        A readable object of the uncompressed tar bytes (``read(n)``, ``close()``).
    Raises:
        OSError / ValueError: as ``gopen`` raises them (a missing file, an unknown scheme).
    """
    return _TarBytes(spec)  # type: ignore[return-value]


def shard_sha256(spec: str) -> str:
    """Hex sha256 of a shard's uncompressed tar bytes: ``hashing.file_sha256`` for a ``.tar`` file; a stream is read
    once through :func:`open_tar_stream` (a ``.tar.gz`` hashes as the ``.tar`` inside it).

    Raises:
        DataSourceError: a stream that cannot be opened or read to its end (a failed ``pipe:`` command, a missing
            ``.tar.gz``, a broken download); the message names the shard.
    """
    if not is_stream(spec):
        return file_sha256(spec)
    try:
        f = _TarBytes(spec)
        try:
            f.drain()
        finally:
            f.close()
    except (OSError, ValueError, EOFError, zlib.error) as err:
        raise DataSourceError(
            f"shard {spec!r} cannot be read to its end ({type(err).__name__}: {err}); check the path, URL or command"
        ) from err
    return f.sha.hexdigest()


def _scan_stream(spec: str, keep_data: bool) -> ShardScan:
    """:func:`scan_shard` of a stream: one sequential pass (``tarfile`` mode ``r|``), the same checks."""
    scan = ShardScan(path=spec, stream=True)
    f: _TarBytes | None = None
    try:
        f = _TarBytes(spec)
        tf = tarfile.open(fileobj=f, mode="r|")  # type: ignore[call-overload]
    except (OSError, ValueError, EOFError, zlib.error, tarfile.TarError) as err:
        scan.unreadable = True
        scan.error = f"not a tar stream or cannot be opened: {type(err).__name__}: {err}"
        try:
            if f is not None:
                f.close()
        except OSError as status:  # a pipe: command that failed says why (its exit status)
            scan.error += f"; {status}"
        return scan
    try:
        for info in tf:
            if not info.isreg() or _is_meta(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            try:
                handle = tf.extractfile(info)
                data = handle.read() if handle is not None else b""
            except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
                scan.truncated, scan.cut_key = True, key
                scan.error = f"member {info.name!r} needs {info.size} bytes at {info.offset_data}, stream ended ({err})"
                break
            scan.members.append(Member(info.name, key, ext, info.offset_data, info.size, data if keep_data else None))
        else:
            f.drain()
            start = tf.offset - (f.count - len(f.tail))  # where the end-of-archive block must be, inside f.tail
            block = bytes(f.tail[start : start + _BLOCK]) if start >= 0 else b""
            if f.count - tf.offset < _BLOCK or block.count(0) != _BLOCK:
                scan.truncated = True
                what = "no end-of-archive block" if f.count - tf.offset < _BLOCK else "corrupt tar header"
                scan.error = f"{what} at byte {tf.offset} of {f.count}"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        scan.truncated = True
        scan.error = f"tar read error after {len(scan.members)} members: {type(err).__name__}: {err}"
    try:
        f.close()
    except OSError as err:  # a pipe: command that exited with an error status
        scan.truncated = scan.truncated or bool(scan.members)
        scan.unreadable = not scan.members
        scan.error = scan.error or f"stream failed: {err}"
    scan.size_bytes = f.count
    scan.sha256 = f.sha.hexdigest() if not (scan.truncated or scan.unreadable) else ""
    return scan


def scan_shard(path: str, *, keep_data: bool = True) -> ShardScan:
    """Read a shard's tar headers (not its data) and detect truncation.

    Args:
        path: an uncompressed ``.tar`` file, or a stream (:func:`is_stream`), read once sequentially.
        keep_data: streams only: keep every member's bytes in ``Member.data`` (the whole shard in memory, what a
            reader needs); False keeps headers only (keys, e.g. for the cross-shard duplicate check).
    Returns:
        A :class:`ShardScan`. A truncated shard lists the members that are complete; ``truncated`` and ``error`` say
        what was wrong, and ``cut_key`` names the sample whose member is cut when the cut falls inside a member's
        data. An unreadable file has ``unreadable`` set and no members. ``size_bytes`` of a stream counts its
        uncompressed tar bytes.
    """
    if is_stream(path):
        return _scan_stream(path, keep_data)
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
    """The data bytes of one member (seek + read; a stream's member carries its bytes)."""
    if member.data is not None:
        return member.data
    with open(path, "rb") as f:
        f.seek(member.offset)
        return f.read(member.size)


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Expand shard arguments (paths, globs, brace patterns like ``shard-{000000..000009}.tar``, folders, streams)
    to shards.

    Brace patterns are expanded with ``braceexpand`` (as WebDataset does, also inside ``pipe:`` commands and URLs);
    a ``gopen`` URL (``pipe:``, ``http(s)://``, ...) is kept as it is (it is opened when read); every other result is
    globbed; a folder stands for the ``.tar`` / ``.tar.gz`` / ``.tgz`` files directly inside it; paths that do not
    exist are ignored.

    Args:
        patterns: one pattern or several.
    Returns:
        Sorted, de-duplicated list of existing file paths and URLs.
    Raises:
        ValueError: if nothing matches (the message lists the patterns).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    patterns = [os.fspath(p) for p in patterns]
    found: set[str] = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            if _is_url(expanded):
                found.add(expanded)  # a URL: whether it exists is known when it is opened
                continue
            matches = glob.glob(expanded) if glob.has_magic(expanded) else [expanded]
            for m in matches:
                if os.path.isdir(m):  # a folder stands for the shard files directly inside it
                    found.update(os.path.join(m, f) for f in os.listdir(m) if f.lower().endswith(SHARD_SUFFIXES))
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
    "STREAM_SUFFIXES",
    "Member",
    "ShardScan",
    "expand_shards",
    "group_members",
    "is_stream",
    "open_tar_stream",
    "read_member",
    "scan_shard",
    "shard_sha256",
]
