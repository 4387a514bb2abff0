"""Open Clip Art Library importer: the Debian packages ``openclipart-png`` + ``openclipart-svg`` to shards.

The data (public domain, 8,121 images) is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` when it is
not already there (:func:`fetch_openclipart`). Each PNG ``png/<folder>/<name>.png`` is paired with the SVG
``svg/<folder>/<name>.svg`` whose RDF metadata its author wrote. Captions (:func:`build_captions`, in this order,
duplicates removed case-insensitively):

1. the ``dc:title`` of the work, unless it is a *collection name* (the same title on at least
   ``collection_min_count`` = 15 images, e.g. "gramastar", "Part of the Flat Icon Collection (...)", "Lemon SVG
   theme") or junk; a "Clipart by NAME - " prefix is removed;
   "Clipart by NAME - x" titles shared by two or more images are collection names too;
2. the ``dc:description``, unless it is boilerplate (the same text on >= 15 images) or junk;
3. the file name's words (camelCase and ``_ - .`` split, numbers and the author's name removed);
   captions equal to an earlier one up to case and punctuation, or a prefix of it, are dropped;
4. the keywords (``dc:subject`` ``rdf:li``), generic ones ("hash", "icons", "theme", ...) removed, at most 8.

A field is junk when it holds an e-mail address, a URL or a Perl ``HASH(0x...)`` string: the whole field is dropped,
so no address or URL can reach a caption. A caption is *informative* when it has a word of three or more letters
that is not generic. Images with no informative caption are dropped and counted. Creator names are never used.

Splits: ``split_of(first caption)`` with ``test_fraction`` 0.15 (1,108 of the 8,071 images) and ``val_fraction`` 0.06;
images whose first caption is the same (e.g. 13 "Bullet Hole" drawings) share a split, so no test image has a
train twin with the same title. Titles are not unique, and near-identical drawings with different titles can still
fall in different splits (documented limitation).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mcad_cache.data.captions import clean_caption
from mcad_cache.data.importers import ImportItem, ImportReport, make_key, register_importer, split_of
from mcad_cache.errors import DataSourceError

_logger = logging.getLogger(__name__)

PACKAGES = ("openclipart-png", "openclipart-svg")
COLLECTION_MIN_COUNT = 15  # a title or description on at least this many images is a collection name / boilerplate
TEST_FRACTION = 0.15  # 1,108 of the 8,071 usable images (issue 12: a test split of at least 1,000)
VAL_FRACTION = 0.06  # 397 images: early stopping and the teachers' checks
MAX_KEYWORDS = 8

_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"(?:[a-z][a-z0-9+.-]*://|www\.)\S+|\b[\w-]+\.(?:com|org|net|edu|gov|info|de|fr|it|es|uk)\b", re.I)
_HASH = re.compile(r"HASH\(0x[0-9a-f]+\)", re.I)
_CLIPART_BY = re.compile(r"^\s*clip\s*art\s+by\s+[^-]+-\s*", re.I)
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_ALNUM_BOUNDARY = re.compile(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])")
_WORD = re.compile(r"[^\W\d_]{3,}")
GENERIC_WORDS = frozenset(
    "svg png icon icons clipart cliparts clip art image images picture theme themes collection set hash magick "
    "unsorted special misc various untitled drawing new test the and for with from lemon mapsym".split()
)


@dataclass
class ClipartMeta:
    """The parts of one SVG's RDF metadata the importer uses (creator only to remove it from file names)."""

    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    creator: str = ""
    parse_error: str = ""


def _text(el: ET.Element | None) -> str:
    return "".join(el.itertext()).strip() if el is not None else ""


def read_svg_meta(path: str | Path) -> ClipartMeta:
    """Title, description, keywords and creator of the ``cc:Work`` in an SVG's metadata (empty when absent)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        return ClipartMeta(parse_error=f"{type(err).__name__}: {err}")
    work = next((el for el in root.iter() if isinstance(el.tag, str) and el.tag.endswith("}Work")), None)
    if work is None:
        return ClipartMeta()
    return ClipartMeta(
        title=_text(work.find("dc:title", _NS)),
        description=_text(work.find("dc:description", _NS)),
        keywords=[_text(li) for li in work.findall("dc:subject//rdf:li", _NS)],
        creator=_text(work.find("dc:creator//dc:title", _NS)),
    )


def is_junk(text: str) -> bool:
    """True when a field holds an e-mail address, a URL or a Perl ``HASH(0x...)`` string."""
    return bool(_EMAIL.search(text) or _URL.search(text) or _HASH.search(text))


def is_informative(text: str | None) -> bool:
    """True when the text has a word of 3+ letters outside :data:`GENERIC_WORDS`."""
    return bool(text) and any(w.lower() not in GENERIC_WORDS for w in _WORD.findall(text))


def _field_caption(text: str) -> str | None:
    cleaned = clean_caption(_CLIPART_BY.sub("", text).replace("_", " "))
    return cleaned if is_informative(cleaned) else None


def name_words(stem: str, *, creator: str = "") -> str:
    """The words of a file name: camelCase and ``_ - .`` split, digits and the creator's name (or its prefixes of
    3+ letters, as the Debian file names truncate it) removed, lower-cased."""
    tokens = []
    for part in re.split(r"[_\-\s.]+", _CAMEL.sub(" ", stem)):
        tokens += [t for t in _ALNUM_BOUNDARY.sub(" ", part).split() if t]
    creator_words = [w.lower() for w in _WORD.findall(_EMAIL.sub(" ", creator))]
    kept = []
    after_creator = False
    for t in tokens:
        low = t.lower()
        if low.isdigit():
            continue
        # The creator's words, their prefixes of 3+ letters, or any prefix right after one (a truncated surname).
        if any(c == low or ((len(low) >= 3 or after_creator) and c.startswith(low)) for c in creator_words):
            after_creator = True
            continue
        after_creator = False
        kept.append(low)
    while kept and len(kept[-1]) == 1 and len(kept) > 1:  # a dangling initial left by a truncated name
        kept.pop()
    return " ".join(kept)


def build_captions(
    meta: ClipartMeta, stem: str, *, frequent_titles: set[str], frequent_descriptions: set[str], stats: Counter[str]
) -> list[str]:
    """The captions of one image, informative parts only (module docstring); counts field decisions in ``stats``.

    Args:
        meta: the SVG metadata.
        stem: the file name without extension.
        frequent_titles: cleaned titles that are collection names (lower-case).
        frequent_descriptions: cleaned descriptions that are boilerplate (lower-case).
        stats: counter updated with ``title_collection``, ``title_junk``, ``description_junk``, ...
    Returns:
        0..4 cleaned, case-insensitively unique captions.
    """
    captions: list[str] = []
    if meta.title:
        if is_junk(meta.title):
            stats["title_junk"] += 1
        else:
            title = _field_caption(meta.title)
            if title is None:
                stats["title_uninformative"] += 1
            elif title.lower() in frequent_titles:
                stats["title_collection"] += 1
            else:
                captions.append(title)
    else:
        stats["title_empty"] += 1
    if meta.description:
        if is_junk(meta.description):
            stats["description_junk"] += 1
        else:
            desc = _field_caption(meta.description)
            if desc is None:
                stats["description_uninformative"] += 1
            elif desc.lower() in frequent_descriptions:
                stats["description_boilerplate"] += 1
            else:
                captions.append(desc)
    name = clean_caption(name_words(stem, creator=meta.creator))
    if is_informative(name):
        captions.append(name)
    else:
        stats["name_uninformative"] += 1
    keywords = []
    for kw in meta.keywords:
        cleaned = clean_caption(kw.replace("_", " ")) if not is_junk(kw) else None
        if cleaned and is_informative(cleaned) and cleaned.lower() not in (k.lower() for k in keywords):
            keywords.append(cleaned)
    if keywords:
        captions.append(", ".join(keywords[:MAX_KEYWORDS]))
    unique: list[str] = []
    for c in captions:
        if not any(_same_words(c, u) for u in unique):
            unique.append(c)
    return unique


def _same_words(a: str, b: str) -> bool:
    """Case- and punctuation-insensitive equality, or a prefix of 12+ characters (the Debian file names truncate
    titles at 24 characters, e.g. "hotel icon in room phon")."""
    wa, wb = " ".join(re.findall(r"\w+", a.lower())), " ".join(re.findall(r"\w+", b.lower()))
    short, long = sorted((wa, wb), key=len)
    return wa == wb or (len(short) >= 12 and long.startswith(short))


def frequent_values(values: list[str], *, min_count: int = COLLECTION_MIN_COUNT) -> set[str]:
    """Cleaned, lower-cased values that occur on at least ``min_count`` images.

    A "Clipart by NAME - x" title names one file (x is a file name), so its x counts as a collection name as soon
    as two images share it (the metadata was copied across a batch of drawings).
    """
    counts: Counter[str] = Counter()
    prefixed: Counter[str] = Counter()
    for v in values:
        c = _field_caption(v) if v and not is_junk(v) else None
        if c:
            counts[c.lower()] += 1
            prefixed[c.lower()] += bool(_CLIPART_BY.match(v))
    return {v for v, n in counts.items() if n >= min_count or prefixed[v] >= 2}


def find_data_dir(root: str | Path) -> Path | None:
    """The folder holding ``png/`` and ``svg/`` under ``root`` (itself, or ``extracted/usr/share/openclipart``)."""
    root = Path(root)
    for candidate in (root, root / "extracted" / "usr" / "share" / "openclipart", root / "usr/share/openclipart"):
        if (candidate / "png").is_dir() and (candidate / "svg").is_dir():
            return candidate
    return None


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    _logger.info("running %s in %s", " ".join(cmd), cwd)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def fetch_openclipart(root: str | Path) -> Path:
    """Return the openclipart data folder under ``root``, downloading and unpacking the Debian packages if absent.

    Runs ``apt-get download openclipart-png openclipart-svg`` in ``root/debs`` (``apt-get update`` first if that
    fails) and ``dpkg -x FILE root/extracted`` for each package. Reuses existing ``.deb`` files and an existing
    extraction.

    Raises:
        DataSourceError: apt-get or dpkg is missing or fails (the message has their stderr).
    """
    root = Path(root)
    found = find_data_dir(root)
    if found is not None:
        return found
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise DataSourceError(
                f"openclipart: {tool} not found; install the Debian packages {PACKAGES} or pass "
                f"--root to a folder with png/ and svg/"
            )
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        result = _run(["apt-get", "download", *missing], debs)
        if result.returncode != 0:
            update = _run(["apt-get", "update"], debs)
            result = _run(["apt-get", "download", *missing], debs)
            if result.returncode != 0:
                raise DataSourceError(
                    f"openclipart: apt-get download {' '.join(missing)} failed: {result.stderr.strip()[-500:]} "
                    f"(apt-get update: {update.stderr.strip()[-300:]})"
                )
    extracted = root / "extracted"
    for package in PACKAGES:
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        result = _run(["dpkg", "-x", str(deb.resolve()), str(extracted.resolve())], root)
        if result.returncode != 0:
            raise DataSourceError(f"openclipart: dpkg -x {deb} failed: {result.stderr.strip()[-500:]}")
    found = find_data_dir(root)
    if found is None:
        raise DataSourceError(f"openclipart: no png/ and svg/ under {extracted} after unpacking {PACKAGES}")
    return found


@dataclass
class ClipartItem:
    """One image to import: its key, PNG path, SVG-relative name and captions."""

    key: str
    png: Path
    name: str  # "<folder>/<name>" without extension
    captions: list[str]
    split: str


def list_items(
    data_dir: Path,
    *,
    seed: int,
    stats: Counter[str],
    drops: list[tuple[str, str, str]],
    collection_min_count: int = COLLECTION_MIN_COUNT,
) -> list[ClipartItem]:
    """Read every SVG's metadata, build captions and splits. Dropped images go to ``drops`` as (reason, key, detail).

    Returns:
        Kept items in a deterministic order: sorted by ``sha256(seed:key)`` (a fixed shuffle, so any prefix taken
        by ``max_samples`` spans all folders).
    """
    svgs = sorted((data_dir / "svg").rglob("*.svg"))
    metas = [read_svg_meta(p) for p in svgs]
    stats["svg_parse_error"] += sum(1 for m in metas if m.parse_error)
    stats["emails_in_metadata"] += sum(
        1 for m in metas if any(_EMAIL.search(t) for t in (m.title, m.description, m.creator, *m.keywords))
    )
    frequent_titles = frequent_values([m.title for m in metas], min_count=collection_min_count)
    frequent_desc = frequent_values([m.description for m in metas], min_count=collection_min_count)
    stats["collection_titles"] = len(frequent_titles)
    items: list[ClipartItem] = []
    used_keys: set[str] = set()
    for svg, meta in zip(svgs, metas, strict=True):
        rel = svg.relative_to(data_dir / "svg").with_suffix("")
        key = make_key(str(rel).replace("/", "__"))
        if key in used_keys:  # two names that differ only in characters make_key replaces ("viewmag+", "viewmag-")
            key = f"{key}_{hashlib.sha256(str(rel).encode()).hexdigest()[:8]}"
        used_keys.add(key)
        png = data_dir / "png" / f"{rel}.png"  # not with_suffix: names may contain dots
        if not png.is_file():
            drops.append(("missing_image", key, f"no {png.relative_to(data_dir)}"))
            continue
        captions = build_captions(
            meta, rel.name, frequent_titles=frequent_titles, frequent_descriptions=frequent_desc, stats=stats
        )
        if not captions:
            drops.append(("no_informative_caption", key, f"title {meta.title!r}, file {rel.name!r}"))
            continue
        split = split_of(captions[0].lower(), seed=seed, test_fraction=TEST_FRACTION, val_fraction=VAL_FRACTION)
        items.append(ClipartItem(key, png, str(rel), captions, split))
    items.sort(key=lambda it: hashlib.sha256(f"{seed}:{it.key}".encode()).hexdigest())
    return items


def load_openclipart(
    root: str | Path, *, seed: int, report: ImportReport, collection_min_count: int = COLLECTION_MIN_COUNT
) -> list[ImportItem]:
    """Fetch (if needed) and read the Open Clip Art Library into import items, in a fixed hash order.

    Drops (``no_informative_caption``, ``missing_image``) and field statistics go into ``report``.

    Raises:
        DataSourceError: the Debian packages cannot be fetched or unpacked.
    """
    data_dir = fetch_openclipart(root)
    stats: Counter[str] = Counter()
    drops: list[tuple[str, str, str]] = []
    clip_items = list_items(data_dir, seed=seed, stats=stats, drops=drops, collection_min_count=collection_min_count)
    report.num_candidates += len(clip_items) + len(drops)
    for reason, key, detail in drops:
        report.drop(reason, key, detail)
    report.extra["metadata_fields"] = dict(sorted(stats.items()))
    report.extra["split_rule"] = {
        "group": "first caption, lower-case",
        "test_fraction": TEST_FRACTION,
        "val_fraction": VAL_FRACTION,
        "seed": seed,
    }
    report.extra["collection_min_count"] = collection_min_count
    report.extra["data_dir"] = str(data_dir)
    return [
        ImportItem(
            key=it.key,
            split=it.split,
            captions=it.captions,
            image_path=it.png,
            meta={"source": "openclipart", "name": it.name},
        )
        for it in clip_items
    ]


DEFAULT_ROOT = ".work/openclipart"  # where the Debian packages are unpacked when --root is not given


@register_importer("openclipart", summary="Open Clip Art Library via apt-get (the demo's data; --root optional)")
def import_openclipart(*, root: str, annotations: str, seed: int, report: ImportReport) -> list[ImportItem]:
    """Registry entry: :func:`load_openclipart` into ``root`` (default ``.work/openclipart``); ``annotations`` unused.

    Raises:
        DataSourceError: the packages cannot be fetched or unpacked.
    """
    return load_openclipart(root or DEFAULT_ROOT, seed=seed, report=report)
