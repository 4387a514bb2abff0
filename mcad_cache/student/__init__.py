"""Student registry: ``create_student(name_or_json_path, **overrides)``, ``list_students()``, ``load_student(dir)``.

Architectures are JSON files in ``student/configs/`` whose file stem is the registry key (STYLE.md). A path to any
other JSON file with the same fields works too. Dispatch is by key only, never by a substring of a model name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mcad_cache.errors import UnknownModelError
from mcad_cache.student.model import DualEncoder, StudentConfig, default_tokenizer_dir
from mcad_cache.student.weights import resolve_relative_paths, tower_overrides

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_students() -> list[str]:
    """Registry keys (file stems of ``student/configs/*.json``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_student_config(
    name_or_json_path: str | Path, *, image: str = "", text: str = "", **overrides: Any
) -> StudentConfig:
    """Resolve a student config: the registered JSON (or a JSON file path), then the towers ``image`` / ``text`` by
    name or path (``student.weights.tower_overrides``: ``--student-image`` / ``--student-text``), then ``overrides``.

    Relative paths in the JSON (``image_pretrained``, ``text_model``, ``tokenizer``) are relative to the JSON file's
    folder, not the working directory (``student.weights.resolve_relative_paths``). ``None`` overrides are dropped
    (the config's own value stays). Dict-valued fields (``text_config``, ``image_model_kwargs``) are merged key by key
    into the file's dict; other fields are replaced.

    Raises:
        UnknownModelError: not a registered key and not an existing ``.json`` file; lists ``list_students()``.
        ValueError: an unknown field or a bad value.
        InputPathError: ``image`` / ``text`` names a path that does not exist (or the wrong kind of path).
    """
    spec = str(name_or_json_path)
    path = CONFIG_DIR / f"{spec}.json"
    if not path.is_file():
        candidate = Path(spec)
        if candidate.suffix == ".json" and candidate.is_file():
            path = candidate
        else:
            raise UnknownModelError(
                f"unknown student {spec!r}: not a registered config nor a JSON file; "
                f"known students: {', '.join(list_students())}"
            )
    values = resolve_relative_paths(json.loads(path.read_text()), path.resolve().parent)
    values.setdefault("name", path.stem)
    for key, value in {**tower_overrides(image, text), **overrides}.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return StudentConfig.from_dict(values)


def create_student(name_or_json_path: str | Path, *, image: str = "", text: str = "", **overrides: Any) -> DualEncoder:
    """Build a student ``DualEncoder`` from a registered config name or a JSON path, with field overrides.

    Example: ``create_student("tiny")``, ``create_student("mobilevitv2_tinybert", embed_dim=512,
    image_pretrained="mobilevitv2_050.safetensors")``, ``create_student("tiny", image="mobilevitv2_050",
    text="huawei-noah/TinyBERT_General_4L_312D")`` (towers by name or path, as ``get_student_config``). Hub names
    load from the Hugging Face cache, or from the hub when it can be reached (``student.weights.hub_guard``).

    Raises:
        UnknownModelError: unknown name (message lists ``list_students()``).
        ValueError: bad field name or value.
        FileNotFoundError: a named weights file or tokenizer folder does not exist.
        InputPathError: a tower path that does not exist, or a hub name neither cached nor reachable (one line).
    """
    return DualEncoder(get_student_config(name_or_json_path, image=image, text=text, **overrides))


def load_student(path: str | Path, *, map_location: str = "cpu") -> DualEncoder:
    """Reload a student written by ``DualEncoder.save(path)`` (safetensors weights + ``student_config.json``)."""
    return DualEncoder.load(path, map_location=map_location)


def student_config_dict(model: DualEncoder) -> dict[str, Any]:
    """The JSON-ready config of a built student (as recorded in its checkpoints)."""
    return dataclasses.asdict(model.saved_config())


__all__ = [
    "DualEncoder",
    "StudentConfig",
    "create_student",
    "default_tokenizer_dir",
    "get_student_config",
    "list_students",
    "load_student",
    "student_config_dict",
]
