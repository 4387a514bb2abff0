"""Caption parsing and cleaning. A sample carries any number of captions; bad ones are treated as missing.

Formats (``docs/data.md``):

* ``KEY.json``: ``{"captions": [...]}`` (preferred), ``{"caption": "..."}``, ``{"captions": "..."}`` or a bare
  JSON list / string. A string where a list is expected is **one** caption, never split into characters.
* ``KEY.txt``: one caption (UTF-8; line breaks count as spaces).
* If both are present, ``.json`` wins.

Cleaning (:func:`clean_caption`): a caption that is not a string, not valid UTF-8, contains a NUL character, or is
empty, whitespace-only or punctuation/symbol-only (no letter or digit) is *missing*. Kept captions are NFC-normalised
with runs of whitespace collapsed to one space. Captions are not truncated here: each tokenizer counts its own
truncation later.
"""

from __future__ import annotations

import json
import unicodedata

from mcad_cache.data.skips import SampleSkip

CAPTION_EXTENSIONS: tuple[str, ...] = ("json", "txt")  # in order of preference


def clean_caption(text: object) -> str | None:
    """One caption cleaned, or ``None`` if it counts as missing (see the module docstring).

    Args:
        text: a decoded ``str`` or raw ``bytes`` (decoded as strict UTF-8); anything else is missing.
    Returns:
        The cleaned caption (NFC, single spaces, stripped) or ``None``.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(text, str) or "\x00" in text:
        return None
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not any(unicodedata.category(ch)[0] in "LN" for ch in text):
        return None  # empty, whitespace-only, or punctuation/symbols only
    return text


def _json_captions(raw: bytes) -> list[object]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleSkip("caption_error", f"invalid JSON: {err}") from err
    if isinstance(value, dict):
        for field in ("captions", "caption", "text"):
            if field in value:
                value = value[field]
                break
        else:
            raise SampleSkip("caption_error", f"JSON object without 'captions'/'caption'/'text': keys {sorted(value)}")
    if isinstance(value, str):
        return [value]  # a string where a list is expected: one caption, never its characters
    if isinstance(value, list):
        return value
    raise SampleSkip("caption_error", f"captions must be a list of strings or a string, got {type(value).__name__}")


def parse_captions(raw: bytes, *, ext: str) -> list[str]:
    """All usable captions of one caption member, cleaned, in their stored order.

    Args:
        raw: the member's bytes.
        ext: ``"json"`` or ``"txt"``.
    Returns:
        One or more cleaned captions.
    Raises:
        SampleSkip: ``caption_error`` (bad JSON or shape) or ``empty_caption`` (nothing survives cleaning).
        ValueError: if ``ext`` is not a caption extension.
    """
    if ext == "json":
        values = _json_captions(raw)
    elif ext == "txt":
        values = [raw]
    else:
        raise ValueError(f"not a caption extension: {ext!r}; expected one of {CAPTION_EXTENSIONS}")
    captions = [c for c in (clean_caption(v) for v in values) if c is not None]
    if not captions:
        raise SampleSkip("empty_caption", f".{ext} with {len(values)} value(s), none usable after cleaning")
    return captions
