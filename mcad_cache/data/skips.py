"""The fixed set of reasons a sample can be skipped, and the exception that carries one.

Every bad sample maps to exactly one reason. Readers never drop a sample silently: they yield it with ``skip`` set (or
raise :class:`mcad_cache.errors.DataError` in strict mode) so the run report can count it by reason and list its
shard and key. ``docs/data.md`` describes each reason.
"""

from __future__ import annotations

SKIP_REASONS: tuple[str, ...] = (
    "missing_image",  # no member with an image extension (jpg, jpeg, png, webp, ...)
    "multiple_images",  # more than one image member under one key: which one is meant is unknown
    "missing_caption",  # no .txt or .json member
    "caption_error",  # .json that is not valid JSON, or JSON of an unsupported shape
    "empty_caption",  # caption member(s) present, but no caption survives cleaning (empty, NUL, undecodable, ...)
    "decode_error",  # the image bytes could not be decoded (corrupt, truncated, unknown format)
    "too_many_pixels",  # width * height above DecodePolicy.max_pixels (checked from the header, before decoding)
    "extreme_aspect",  # max(w, h) / min(w, h) above DecodePolicy.max_aspect (checked from the header)
    "duplicate_key",  # the same __key__ twice in a shard (same extension repeated) or in an earlier shard
    "split_sample",  # the members of one key are not adjacent in the tar (a broken writer or a bad merge)
    "truncated_shard",  # the tar ends early; the sample at the cut (whose completeness cannot be proven) is dropped
    "unreadable_shard",  # the file is missing or is not an uncompressed tar at all
)


class SampleSkip(Exception):
    """A sample that cannot be used, with one of :data:`SKIP_REASONS` and a human-readable detail.

    Raised by the per-sample functions (``decode_image``, ``parse_captions``); the shard readers catch it and turn it
    into a skipped ``Sample``.

    Raises:
        ValueError: if ``reason`` is not one of :data:`SKIP_REASONS` (a programming error).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
