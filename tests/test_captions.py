"""Caption parsing and cleaning rules."""

from __future__ import annotations

import json

import pytest

from mcad_cache.data.captions import clean_caption, parse_captions
from mcad_cache.data.skips import SampleSkip


@pytest.mark.parametrize(
    "raw",
    ["", "   \t\n", "...", "?!—", "- * -", "a\x00b", b"\xff\xfe caption", 42, None, ["x"]],
)
def test_missing_captions(raw):
    assert clean_caption(raw) is None


def test_cleaning_normalises_whitespace_and_unicode():
    assert clean_caption("  a   dog\n on\tgrass ") == "a dog on grass"
    assert clean_caption("cafe\u0301") == "caf\u00e9"  # NFC
    assert clean_caption("7") == "7"
    assert clean_caption("日本の猫".encode()) == "日本の猫"


def test_json_list_keeps_all_in_order():
    caps = [f"caption number {j}" for j in range(7)]
    assert parse_captions(json.dumps({"captions": caps}).encode(), ext="json") == caps


def test_string_where_list_expected_is_one_caption():
    assert parse_captions(json.dumps({"captions": "a red bus"}).encode(), ext="json") == ["a red bus"]
    assert parse_captions(json.dumps({"caption": "a red bus"}).encode(), ext="json") == ["a red bus"]
    assert parse_captions(json.dumps("a red bus").encode(), ext="json") == ["a red bus"]


def test_bad_entries_dropped_good_kept():
    raw = json.dumps({"captions": ["", "ok one", "...", 3, None, "ok two", "x\u0000y"]}).encode()
    assert parse_captions(raw, ext="json") == ["ok one", "ok two"]


def test_txt_is_one_caption():
    assert parse_captions(b"a cat\non a mat\n", ext="txt") == ["a cat on a mat"]


@pytest.mark.parametrize(
    ("raw", "ext", "reason"),
    [
        (b"{not json", "json", "caption_error"),
        (b'{"title": "x"}', "json", "caption_error"),
        (b'{"captions": 5}', "json", "caption_error"),
        (b"\xff\xfe", "json", "caption_error"),
        (b'{"captions": []}', "json", "empty_caption"),
        (b'{"captions": ["", "  "]}', "json", "empty_caption"),
        (b"   ", "txt", "empty_caption"),
        (b"\xff\xfe\xfd", "txt", "empty_caption"),
        (b"!!!", "txt", "empty_caption"),
    ],
)
def test_unusable_caption_members(raw, ext, reason):
    with pytest.raises(SampleSkip) as err:
        parse_captions(raw, ext=ext)
    assert err.value.reason == reason


def test_unknown_extension_is_a_programming_error():
    with pytest.raises(ValueError):
        parse_captions(b"x", ext="cls")
