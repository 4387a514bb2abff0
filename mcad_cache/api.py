"""The Python API: one function per CLI command, with the same fields and the same layering (STYLE.md).

``mcad_cache.build_cache(teacher="clip", data=[...], out="caches/clip")`` is ``mcad-cache build --teacher clip
--data ... --out caches/clip``: keyword arguments are the run config's fields (``BuildConfig``, ``DistillConfig``,
``EvalConfig``, ``IntegrateConfig``, ``ExportConfig``); an optional first argument is a config object or a JSON file
path whose values the keywords override (default < file < keyword, as flags do on the CLI).

This module is a facade over the pipelines, like zarr's ``api/synchronous.py`` over its core: the one module of the
package that reaches up into ``mcad_cache.pipelines``, always inside a function, so ``import mcad_cache`` stays
cheap and the library below never depends on the runs above it (``tests/test_layers.py`` checks both).

Names are verb + noun (``build_cache``, ``distill_student``, ``integrate_targets``, ``export_student``) because
``mcad_cache.build``, ``.distill``, ``.integrate`` and ``.export`` are subpackages: the import system sets a
package attribute to the subpackage when it is imported, so a function under that name would be replaced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mcad_cache.config import BuildConfig, DistillConfig, EvalConfig, load_config
from mcad_cache.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from mcad_cache.build import BuildResult
    from mcad_cache.student import DualEncoder

T = TypeVar("T")


def _config(cls: type[T], config: T | str | Path | None, fields: dict[str, Any]) -> T:
    """``cls`` from a config object or JSON path (or defaults), then ``fields`` (``None`` values = unset).

    Raises:
        ConfigError: unknown field, wrong type, or a file that is not JSON; InputPathError: a missing file.
    """
    if isinstance(config, cls):
        return dataclasses.replace(config, **{k: v for k, v in fields.items() if v is not None})
    if config is not None and not isinstance(config, (str, Path)):
        raise TypeError(f"expected a {cls.__name__} or a JSON path, got {type(config).__name__}")
    return load_config(cls, config, **fields)


def build_cache(config: BuildConfig | str | Path | None = None, /, *, progress: ProgressFn = no_progress, **fields: Any
          ) -> BuildResult:  # fmt: skip
    """Build (or resume) a teacher cache; ``mcad-cache build``. Returns the :class:`~mcad_cache.build.BuildResult`
    (``.path``, ``.status``, counts and timings).

    Raises:
        ConfigError, DataSourceError, DeviceError, UnknownModelError, CacheMismatchError, ...: as
        ``mcad_cache.pipelines.build_cache.run`` (all :class:`~mcad_cache.errors.McadError`).
    """
    from mcad_cache.pipelines import build_cache

    return build_cache.run(_config(BuildConfig, config, fields), progress=progress)


def integrate_targets(config: Any = None, /, *, progress: ProgressFn = no_progress, **fields: Any) -> Any:
    """Train the teacher-side integration module once and write a derived target cache; ``mcad-cache integrate``.

    Raises:
        McadError subclasses: as ``mcad_cache.pipelines.integrate.run``.
    """
    from mcad_cache.pipelines import integrate as pipeline

    return pipeline.run(_config(pipeline.IntegrateConfig, config, fields), progress=progress)


def distill_student(config: DistillConfig | str | Path | None = None, /, *, progress: ProgressFn = no_progress,
            **fields: Any) -> dict[str, Any]:  # fmt: skip
    """Train a student from caches; ``mcad-cache distill``. Returns the summary (``summary.json``): ``run_dir``,
    ``steps``, ``final`` losses, ``checkpoint`` (the student folder), ``best`` (with ``val_data``).

    Raises:
        McadError subclasses: as ``mcad_cache.pipelines.distill.run``.
    """
    from mcad_cache.pipelines import distill as pipeline

    return pipeline.run(_config(DistillConfig, config, fields), progress=progress)


def evaluate(config: EvalConfig | str | Path | None = None, /, *, progress: ProgressFn = no_progress,
             **fields: Any) -> dict[str, Any]:  # fmt: skip
    """Retrieval R@1/5/10 and RSUM (percent) of a run, student folder, cache or teacher; ``mcad-cache eval``.
    Returns ``{"metrics": {"i2t_R@1", ..., "rsum"}, "protocol", "out", ...}``.

    Raises:
        McadError subclasses: as ``mcad_cache.pipelines.evaluate.run``.
    """
    from mcad_cache.pipelines import evaluate as pipeline

    return pipeline.run(_config(EvalConfig, config, fields), progress=progress)


def export_student(config: Any = None, /, **fields: Any) -> dict[str, Any]:
    """Export a student as two static-shape encoders + preprocessing (ONNX, ...); ``mcad-cache export``.

    Raises:
        McadError subclasses: as ``mcad_cache.pipelines.export.run``.
    """
    from mcad_cache.pipelines import export as pipeline

    return pipeline.run(_config(pipeline.ExportConfig, config, fields))


def load_student(path: str | Path, *, map_location: str = "cpu") -> DualEncoder:
    """The student of a distill run dir (its ``final/``), a ``best/`` folder or any saved student folder, in eval
    mode. ``encode_image(images [B,3,H,W]) -> [B, D]`` and ``encode_text(**tokenize(texts)) -> [B, D]`` give
    L2-normalised float32 embeddings.

    Raises:
        RunDirError: ``path`` holds no student (no ``student_config.json`` in it or in its ``final/``).
    """
    from mcad_cache.distill.rundir import find_student
    from mcad_cache.errors import RunDirError
    from mcad_cache.student import DualEncoder

    folder = find_student(path)
    if folder is None:
        raise RunDirError(
            f"{path}: no student here (expected a run dir with final/ or a folder with student_config.json)"
        )
    return DualEncoder.load(folder, map_location=map_location).eval()


__all__ = ["build_cache", "distill_student", "evaluate", "export_student", "integrate_targets", "load_student"]
