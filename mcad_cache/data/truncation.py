"""How many captions a text model cuts: token counts without truncation, per tokenizer, against its context length.

Captions are never truncated by the data layer; each model's tokenizer cuts them to its own context length
(``docs/data.md``). A cut caption loses words silently, and two different captions may become the same token
sequence (so the same embedding). The build records the teacher's counts in the cache manifest (``truncation``);
eval reports the evaluated model's; :func:`compare_truncation` gives the warning when teacher and student see
different amounts of text.

Tokenizers are duck-typed (this module imports no model library): a Hugging Face tokenizer (called with
``truncation=False``, special tokens included), open_clip's ``SimpleTokenizer`` (``encode`` + start/end tokens) or
open_clip's ``HFTokenizer`` (its ``.tokenizer``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BATCH = 1024  # captions per tokenizer call


def token_lengths(
    tokenizer: Any, texts: Sequence[str], *, clean: Callable[[str], str] | None = None
) -> np.ndarray | None:
    """Tokens per caption before truncation, special tokens included.

    Args:
        tokenizer: a Hugging Face tokenizer, open_clip ``SimpleTokenizer`` or ``HFTokenizer``.
        texts: N captions.
        clean: the model's own text cleaning applied before tokenizing (e.g. ALBEF's ``pre_caption``).
    Returns:
        int64 [N], or None when the tokenizer is of no known kind (then nothing is counted).
    """
    texts = [clean(t) for t in texts] if clean is not None else list(texts)
    inner = getattr(tokenizer, "tokenizer", None)
    hf = inner if inner is not None and hasattr(inner, "get_vocab") else tokenizer
    if hasattr(hf, "get_vocab") and callable(hf):
        out: list[int] = []
        for s in range(0, len(texts), BATCH):
            enc = hf(texts[s : s + BATCH], add_special_tokens=True, truncation=False, verbose=False)
            out += [len(ids) for ids in enc["input_ids"]]
        return np.asarray(out, dtype=np.int64)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "encoder"):  # open_clip SimpleTokenizer: <sot> ... <eot>
        return np.asarray([len(tokenizer.encode(t)) + 2 for t in texts], dtype=np.int64)
    return None


def truncation_stats(lengths: np.ndarray, *, context_length: int) -> dict[str, Any]:
    """Counts for one text model: captions, how many exceed ``context_length`` tokens, their share, and lengths.

    Args:
        lengths: int [N] tokens per caption before truncation (:func:`token_lengths`).
        context_length: the model's maximum tokens (special tokens included).
    Returns:
        ``{"context_length", "num_captions", "num_truncated", "share_truncated" (0..1), "max_tokens",
        "p95_tokens"}``.
    """
    n = int(lengths.size)
    cut = int((lengths > context_length).sum())
    return {
        "context_length": int(context_length),
        "num_captions": n,
        "num_truncated": cut,
        "share_truncated": round(cut / n, 4) if n else 0.0,
        "max_tokens": int(lengths.max()) if n else 0,
        "p95_tokens": int(np.percentile(lengths, 95)) if n else 0,
    }


def compare_truncation(
    teacher_lengths: np.ndarray,
    student_lengths: np.ndarray,
    *,
    teacher_context: int,
    student_context: int,
    names: tuple[str, str] = ("teacher", "student"),
) -> tuple[float, str | None]:
    """Share of captions that exactly one of two text models cuts, and a warning line when it is not zero.

    Args:
        teacher_lengths, student_lengths: int [N] token counts of the same N captions.
        teacher_context, student_context: the two context lengths.
        names: how the two models are named in the message.
    Returns:
        ``(share in [0, 1], message or None)``.
    Raises:
        ValueError: the two arrays differ in length.
    """
    if teacher_lengths.shape != student_lengths.shape:
        raise ValueError(f"lengths differ in shape: {teacher_lengths.shape} vs {student_lengths.shape}")
    t_cut, s_cut = teacher_lengths > teacher_context, student_lengths > student_context
    differ = t_cut != s_cut
    share = float(differ.mean()) if differ.size else 0.0
    if not differ.any():
        return share, None
    return share, (
        f"{share:.1%} of captions ({int(differ.sum())} of {differ.size}) are cut by only one of the two text models: "
        f"{names[0]} cuts {int(t_cut.sum())} at {teacher_context} tokens, {names[1]} cuts {int(s_cut.sum())} at "
        f"{student_context}; the {names[1]} is trained on targets computed from different text"
    )


__all__ = ["compare_truncation", "token_lengths", "truncation_stats"]
