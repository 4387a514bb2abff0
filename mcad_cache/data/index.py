"""Random access to samples by key: :class:`ShardIndex` maps every ``__key__`` to its tar members (from
:func:`mcad_cache.data.tar.scan_shard`'s headers) so that training can fetch a candidate image by id.

Random access needs seekable files: a stream shard (``pipe:``, ``http(s)://``, ``.tar.gz``; ``data.tar.is_stream``)
is refused with one line, unless the index is built for its keys only (``keys_only=True``: which keys the shards hold,
e.g. to check a cache against them), when streams are read once, headers only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from mcad_cache.data.captions import CAPTION_EXTENSIONS, parse_captions
from mcad_cache.data.tar import IMAGE_EXTENSIONS, Member, ShardScan, expand_shards, is_stream, scan_shard
from mcad_cache.errors import ConfigError

_logger = logging.getLogger(__name__)


def stream_refusal(shard: str, count: int) -> str:
    """The one line that says random access cannot read a stream shard, and what to do instead."""
    more = f" (and {count - 1} more)" if count > 1 else ""
    return (
        f"shard {shard!r}{more} is a stream (pipe:, http(s):// or .tar.gz); reading samples by key (distill "
        "--candidates online, search serve) needs seekable local uncompressed .tar shards: use distill --candidates "
        "bank, or unpack the shards to .tar files"
    )


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
        shards: shard paths, globs or brace patterns (see :func:`mcad_cache.data.tar.expand_shards`).
        keys_only: the index answers ``in`` / ``keys()`` only; stream shards are allowed (read once, headers only)
            and reading a member raises ``ConfigError``.
    Raises:
        ValueError: no shard matches the patterns.
        ConfigError: a stream shard without ``keys_only`` (random access needs local uncompressed ``.tar`` files).
    """

    def __init__(self, shards: str | Iterable[str], *, keys_only: bool = False) -> None:
        self.shards: list[str] = expand_shards(shards)
        streams = [s for s in self.shards if is_stream(s)]
        if streams and not keys_only:
            raise ConfigError(stream_refusal(streams[0], len(streams)))
        self.keys_only = keys_only
        self._entries: dict[str, IndexEntry] = {}
        self.duplicates: list[tuple[str, str]] = []  # (key, shard) of ignored later occurrences
        self.scans: dict[str, ShardScan] = {}
        for shard in self.shards:
            scan = scan_shard(shard, keep_data=False)
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
        if is_stream(shard):
            raise ConfigError(stream_refusal(shard, 1))
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
