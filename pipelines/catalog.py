"""What the library offers, read from its registries: ``mcad-cache list ...`` and the CLI's allowed values.

Every list is read when it is asked for (never frozen at import), so a teacher or importer registered later (a
plugin, a test's ``fake`` teacher) is listed and accepted. The CLI validates ``--teacher``, ``--preset``,
``--precision``, ``--source`` ... against :func:`choices` at parse time.
"""

from __future__ import annotations

from collections.abc import Callable

from mcad_cache.build.fingerprint import TOPK_BACKENDS
from mcad_cache.cache.schema import EMB_DTYPES, FUSED_DTYPES
from mcad_cache.data.importers import list_importers
from mcad_cache.distill.bank import CANDIDATE_MODES
from mcad_cache.distill.ddp import IN_BATCH_MODES
from mcad_cache.distill.tracking import REPORT_TO
from mcad_cache.eval import ITM_SCORES
from mcad_cache.losses import INTEGRATIONS, PRESETS
from mcad_cache.runtime import PRECISIONS
from mcad_cache.student import StudentConfig, get_student_config, list_students
from mcad_cache.teachers import list_teachers

_CHOICES: dict[str, Callable[[], list[str]]] = {
    "teachers": list_teachers,
    "students": list_students,
    "presets": lambda: list(PRESETS),
    "integrations": lambda: list(INTEGRATIONS),
    "importers": list_importers,
    "precisions": lambda: list(PRECISIONS),
    "emb_dtypes": lambda: list(EMB_DTYPES),
    "fused_dtypes": lambda: list(FUSED_DTYPES),
    "topk_backends": lambda: list(TOPK_BACKENDS),
    "itm_scores": lambda: list(ITM_SCORES),
    "candidates": lambda: list(CANDIDATE_MODES),
    "report_to": lambda: list(REPORT_TO),
    "in_batch": lambda: list(IN_BATCH_MODES),
}
LISTABLE = ("teachers", "students", "presets", "integrations", "importers")  # what `mcad-cache list` shows


def choices(what: str) -> list[str]:
    """The allowed values of one kind of option (``"teachers"``, ``"presets"``, ``"precisions"``, ...).

    Raises:
        KeyError: ``what`` is not one of ``_CHOICES`` (a programming error, not user input).
    """
    return _CHOICES[what]()


def describe(what: str) -> list[dict[str, str]]:
    """Rows ``{"name", "description"}`` for ``mcad-cache list WHAT`` (``what`` in :data:`LISTABLE`).

    The description is the registry's own: a preset's non-default loss fields, an integration mode's docstring
    first line, a student's towers, a teacher builder's docstring first line.
    """
    if what == "teachers":
        from mcad_cache.teachers.base import list_configs

        return [{"name": n, "description": "shipped configs: " + (", ".join(list_configs(n)) or "none")}
                for n in list_teachers()]  # fmt: skip
    if what == "students":
        rows = []
        for n in list_students():
            cfg = get_student_config(n)
            rows.append(
                {"name": n, "description": f"image {cfg.image_model}, text {_text_name(cfg)}, D={cfg.embed_dim}"}
            )
        return rows
    if what == "presets":
        from mcad_cache.losses import LossConfig, preset

        default = LossConfig()
        rows = []
        for n in PRESETS:
            cfg = preset(n)
            diff = {k: v for k, v in vars(cfg).items() if getattr(default, k) != v}
            rows.append(
                {
                    "name": n,
                    "description": ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "LossConfig defaults",
                }
            )
        return rows
    if what == "integrations":
        return [{"name": n, "description": _first_line(type(m).__doc__)} for n, m in INTEGRATIONS.items()]
    if what == "importers":
        from mcad_cache.data.importers import get_importer

        return [{"name": n, "description": get_importer(n).summary} for n in list_importers()]
    raise KeyError(what)


def plot_recall_bars(rows: list[dict], out_path: str) -> str:
    """``compare --plot``: grouped bars of R@K per model (``distill.plots.plot_recall_bars``); returns the path."""
    from mcad_cache.distill.plots import plot_recall_bars as draw

    return str(draw(rows, out_path, title=f"retrieval recall: {len(rows)} models"))


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def _text_name(cfg: StudentConfig) -> str:
    if cfg.text_model:
        return cfg.text_model
    return f"{cfg.text_config.get('model_type', 'bert')} ({cfg.text_config.get('num_hidden_layers', '?')} layers)"


__all__ = ["LISTABLE", "choices", "describe", "plot_recall_bars"]
