"""Content hashes: the one home for every sha256 the project records (weights, shards, vocabularies, configs).

Every function returns a lowercase hex sha256 string.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def file_sha256(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` chunks.

    Raises:
        FileNotFoundError / IsADirectoryError / PermissionError: as ``open`` raises them.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def folder_weights_sha256(folder: str | os.PathLike[str]) -> str:
    """Hex sha256 over the weight files of a model folder (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, not
    recursive): for each file in name order, its name and its bytes' sha256.

    Raises:
        FileNotFoundError: the folder holds no weight file.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_FILE_SUFFIXES)}) in {folder}")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}|{file_sha256(p)}|".encode())
    return h.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, Any]) -> str:
    """Hex sha256 over a state dict: for each tensor key in sorted order, the key, dtype, shape and raw bytes (CPU,
    contiguous). Independent of the device the tensors live on and of dict order; non-tensor values are skipped."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vocab_sha256(vocab: Mapping[str, int]) -> str:
    """Hex sha256 of a token -> id mapping (sorted by id, then token)."""
    items = sorted((int(i), str(t)) for t, i in vocab.items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def json_sha256(value: Any) -> str:
    """Hex sha256 of ``value`` as canonical JSON (sorted keys, no spaces; tuples as lists)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
