"""Student towers by name or path (issue 15, item 6): what ``--student-image`` / ``--student-text`` mean, relative
paths in student JSON configs, and loading from the Hugging Face hub without ever hanging when it is unreachable.

Resolution is the libraries' own (``docs/student.md``):

- image tower (timm): a registry name, optionally with its pretrained tag (``mobilevitv2_050``,
  ``mobilevitv2_050.cvnets_in1k``) -> ``timm.create_model(name, pretrained=True)``; ``hf-hub:org/repo`` -> timm's
  hub loader; a folder (what ``timm.models.save_for_hf`` writes: ``config.json`` + ``model.safetensors``) ->
  ``timm.create_model("local-dir:FOLDER", pretrained=True)``; a weights file (``.safetensors`` / ``.pth`` / ``.bin``)
  -> ``timm.create_model(image_model, pretrained=True, pretrained_cfg_overlay={"file": FILE})`` with the architecture
  from the student config.
- text tower (transformers): a hub name (``huawei-noah/TinyBERT_General_4L_312D``) or a ``save_pretrained`` folder
  -> ``AutoModel.from_pretrained`` (and ``AutoTokenizer.from_pretrained`` for its tokenizer).

Hub names: the Hugging Face cache is always tried; the hub itself only when it can be reached. :func:`hub_guard`
checks that once (``huggingface_hub``'s offline switch ``HF_HUB_OFFLINE``, else a TCP connect to the endpoint with a
2 s timeout) and otherwise runs the load under ``huggingface_hub``'s own offline mode, so a name that is not cached
fails at once with one line (:class:`mcad_cache.errors.InputPathError`) instead of ~25 s of retries per file
(measured here, no network) or a hang.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mcad_cache.errors import InputPathError, UnknownModelError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
TIMM_SOURCES = ("hf-hub:", "local-dir:")  # timm's model-name prefixes (timm.models.parse_model_name)
PROBE_TIMEOUT_S = 2.0  # TCP connect to the hub endpoint (our choice: a reachable hub answers in well under 2 s)
PATH_FIELDS = ("image_pretrained", "text_model", "tokenizer")  # student config fields that may hold a path


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """False under ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` or when the hub endpoint (``HF_ENDPOINT``) cannot be
    connected to within ``timeout_s`` seconds; True otherwise."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_guard(what: str, name: str) -> Iterator[bool]:
    """Run a hub-name load: online when the hub is reachable, else in ``huggingface_hub``'s offline mode (the cache
    only). Yields whether the hub is used.

    Args:
        what: the option it came from, for the message (e.g. ``"--student-text"``).
        name: the hub / registry name being loaded.
    Raises:
        InputPathError: the load failed (``OSError``: not cached while offline, or the hub refused it); one line
            that says how to pass a local file or folder instead.
    """
    from huggingface_hub import constants

    online = hub_reachable()
    saved = constants.HF_HUB_OFFLINE
    if not online:
        constants.HF_HUB_OFFLINE = True  # the switch HF_HUB_OFFLINE sets; read by huggingface_hub at each request
    try:
        yield online
    except OSError as err:
        if online:
            raise InputPathError(f"{what} {name!r}: could not be loaded from the Hugging Face hub ({err})") from err
        raise InputPathError(
            f"{what} {name!r}: the weights are not local (not in the Hugging Face cache {constants.HF_HUB_CACHE}) and "
            "the hub cannot be reached; pass a local file or folder instead (timm: a .safetensors / .pth file or a "
            "save_for_hf folder; transformers: a save_pretrained folder), or run once online to fill the cache"
        ) from None
    finally:
        constants.HF_HUB_OFFLINE = saved


def _is_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(WEIGHT_SUFFIXES) or Path(spec).exists()


def image_overrides(spec: str) -> dict[str, Any]:
    """``StudentConfig`` fields for ``--student-image SPEC`` (module docstring): a weights file, a timm folder, a
    ``hf-hub:`` / ``local-dir:`` name, or a timm registry name (pretrained weights).

    Raises:
        InputPathError: a path that does not exist, or a folder without timm's ``config.json``.
        UnknownModelError: a name timm's registry does not know (names how to list them).
    """
    if spec.startswith(TIMM_SOURCES):
        return {"image_model": spec, "image_pretrained": True}
    if _is_path(spec):
        path = Path(spec).expanduser().resolve()
        if path.is_file():
            return {"image_pretrained": str(path)}  # the architecture stays the student config's image_model
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InputPathError(
                    f"--student-image {spec!r}: the folder has no config.json; a timm folder is what "
                    "timm.models.save_for_hf writes (config.json + model.safetensors), or pass the weights file"
                )
            return {"image_model": f"local-dir:{path}", "image_pretrained": True}
        raise InputPathError(f"--student-image {spec!r}: no such file or folder")
    import timm

    if "/" in spec:  # an org/repo id: timm's hub source
        return {"image_model": f"hf-hub:{spec}", "image_pretrained": True}
    if not timm.is_model(spec):
        raise UnknownModelError(
            f"--student-image {spec!r}: not a timm model name, file or folder; list names with "
            "python -c \"import timm; print(timm.list_models('*vit*', pretrained=True))\""
        )
    return {"image_model": spec, "image_pretrained": True}


def text_overrides(spec: str) -> dict[str, Any]:
    """``StudentConfig`` fields for ``--student-text SPEC``: a transformers hub name or a ``save_pretrained`` folder,
    loaded with its weights (``text_pretrained``) and used as the tokenizer source unless the config names one.

    Raises:
        InputPathError: a path-like spec that is not a folder.
    """
    if _is_path(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_dir():
            raise InputPathError(
                f"--student-text {spec!r}: not a folder; a transformers model is a save_pretrained folder "
                "(config.json + weights + tokenizer files) or a hub name"
            )
        spec = str(path)
    return {"text_model": spec, "text_pretrained": True}


def tower_overrides(image: str = "", text: str = "") -> dict[str, Any]:
    """The ``StudentConfig`` overrides of both towers ("" = keep the config's tower)."""
    return {**(image_overrides(image) if image else {}), **(text_overrides(text) if text else {})}


def resolve_relative_paths(values: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """A student JSON's path fields resolved against the JSON file's ``folder`` (never the working directory).

    ``image_pretrained`` (a string) is always a path; ``text_model`` / ``tokenizer`` are paths when they exist there
    or look like one (``./``, ``../``), else hub names; ``image_model`` with ``local-dir:`` is resolved too.
    """
    out = dict(values)
    for key in PATH_FIELDS:
        value = out.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        candidate = (folder / value).resolve()
        if key == "image_pretrained" or candidate.exists() or value.startswith("."):
            out[key] = str(candidate)
    model = out.get("image_model")
    if isinstance(model, str) and model.startswith("local-dir:") and not Path(model[10:]).is_absolute():
        out["image_model"] = f"local-dir:{(folder / model[10:]).resolve()}"
    return out


__all__ = [
    "hub_guard",
    "hub_reachable",
    "image_overrides",
    "resolve_relative_paths",
    "text_overrides",
    "tower_overrides",
]
