"""Checks of user-given paths before any work starts (STYLE.md "validate at the boundaries").

Each check raises an :class:`~mcad_cache.errors.McadError` subclass whose one-line message names the option, the
path and the fix, so the CLI prints it without a traceback. ``option`` is the flag as the user typed it
(``"--out"``); library callers pass the argument name instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from mcad_cache.errors import InputPathError, OutputPathError


def check_writable_dir(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Make sure ``path`` is (or can be created as) a folder this process can write into; creates it.

    Returns:
        ``Path(path)``, now an existing folder.
    Raises:
        OutputPathError: ``path`` or one of its parents is a file, or the folder cannot be created or written.
    """
    out = Path(path)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"{option} {out}: {parent} is a file, not a folder; choose another {option}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"{option} {out}: cannot create the folder ({err.strerror or err}); choose a writable "
                              f"{option}") from err  # fmt: skip
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {out}: the folder is not writable; choose a writable {option}")
    return out


def check_writable_file(path: str | os.PathLike[str], *, option: str) -> Path:
    """Make sure the file ``path`` can be written: its folder is writable (created if needed, as
    :func:`check_writable_dir`) and the path is not a folder nor a read-only file.

    Returns:
        ``Path(path)``.
    Raises:
        OutputPathError: names the option, the path and the fix.
    """
    p = Path(path)
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"{option} {p}: {parent} is a file, not a folder; choose another {option}")
    try:
        check_writable_dir(p.parent, option=option)
    except OutputPathError as err:
        raise OutputPathError(
            f"{option} {p}: its folder {p.parent} cannot be created or written; choose another {option}"
        ) from err
    if p.is_dir():
        raise OutputPathError(f"{option} {p}: is a folder, a file path is needed")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputPathError(f"{option} {p}: the file is not writable; choose another {option}")
    return p


def check_input_file(path: str | os.PathLike[str], *, option: str, allow_dir: bool = False) -> Path:
    """Make sure ``path`` exists and is a readable file (or, with ``allow_dir``, a folder).

    Returns:
        ``Path(path)``.
    Raises:
        InputPathError: the path does not exist, is a folder where a file is needed, or cannot be read.
    """
    p = Path(path)
    if not p.exists():
        raise InputPathError(f"{option} {p}: no such file; check the path")
    if p.is_dir() and not allow_dir:
        raise InputPathError(f"{option} {p}: is a folder, a file is needed")
    if not os.access(p, os.R_OK):
        raise InputPathError(f"{option} {p}: not readable (permissions)")
    return p


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")


def looks_like_path(value: str) -> bool:
    """True when a ``--pretrained`` / ``--model`` value is meant as a file or folder (it starts with ``/``, ``./``,
    ``../`` or ``~``, or ends in a weights/config suffix) rather than a hub tag or name such as ``openai`` or
    ``Salesforce/blip-itm-base-coco``."""
    return value.startswith(("/", "./", "../", "~")) or value.endswith(WEIGHT_SUFFIXES)


__all__ = ["WEIGHT_SUFFIXES", "check_input_file", "check_writable_dir", "check_writable_file", "looks_like_path"]
