"""``mcad-cache demo run``: the main job end to end on real data, offline.

Steps (each reused when its output is already complete, so a second run skips finished work):

1. import the Open Clip Art Library (Debian packages ``openclipart-png``/``-svg``) into train/val/test shards;
2. verify every shard (``data verify``);
3. prepare the offline teachers (``demo.prepare_teachers``): an open_clip dual-stream teacher and an
   ALBEF-architecture single-stream teacher built from pretrained towers that PyPI packages ship, tuned once;
4. ``build`` the CLIP and ALBEF caches on the train split (the product's real build path);
5. ``distill`` an MCAD student and a contrastive-only student, same initialisation, same steps;
6. ``eval`` both teachers and both students on the test split;
7. write ``report.md`` (table, chance level, plots) in the demo folder.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mcad_cache.config import (
    BuildConfig,
    DistillConfig,
    EvalConfig,
    ImportConfig,
    config_to_dict,
    load_config,
)
from mcad_cache.demo import prepare_teachers
from mcad_cache.demo.config import DemoConfig, TeachersConfig
from mcad_cache.demo.convert import packaged_pretrained_overrides
from mcad_cache.distill import rundir
from mcad_cache.errors import DataError
from mcad_cache.pipelines import build_cache, data_import, distill, evaluate, verify
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.student import CONFIG_DIR as STUDENT_CONFIG_DIR

_logger = logging.getLogger(__name__)

RECALL_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def _shards(root: Path, split: str) -> list[str]:
    return sorted(str(p) for p in (root / split).glob("shard-*.tar"))


def _import(config: DemoConfig, work: Path, progress: ProgressFn) -> Path:
    out = work / "shards"
    wanted = ImportConfig(
        source="openclipart",
        out=str(out),
        root=config.openclipart_root,
        samples_per_shard=config.samples_per_shard,
        max_samples=config.max_samples,
        image_size_px=config.image_size_px,
        seed=config.seed,
    )
    index = out / "index.json"
    if (out / data_import.REPORT_FILE).is_file() and index.is_file():
        saved = json.loads(index.read_text()).get("config", {})
        same = all(saved.get(k) == v for k, v in config_to_dict(wanted).items() if k != "workers")
        if same and all(_shards(out, s) for s in ("train", "val", "test")):
            _logger.info("step 1: shards already imported in %s (reused)", out)
            return out
        _logger.info("step 1: shards in %s were imported with other settings: importing again", out)
    _logger.info("step 1: importing the Open Clip Art Library into %s", out)
    data_import.run(wanted, progress=progress)
    return out


def demo_student(config: DemoConfig, work: Path) -> str:
    """The student config the demo trains: ``config.student`` when set, else a JSON written to ``work`` that starts
    from the pretrained towers PyPI packages ship (EfficientNet-Lite0 image tower at ``student_image_size`` px, the
    first ``student_text_layers`` layers of all-MiniLM-L6-v2), smaller than the teachers built from the same towers.
    """
    if config.student:
        return config.student
    path = work / "student.json"
    overrides = packaged_pretrained_overrides(work / "weights")
    spec = {
        **json.loads(Path(STUDENT_CONFIG_DIR / "minilm_efficientnet.json").read_text()),
        **overrides,
        "name": "demo_student",
        "image_size": config.student_image_size,
        "text_model_kwargs": {"num_hidden_layers": config.student_text_layers},
    }
    spec.pop("_comment", None)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return str(path)


def _eval(cfg: EvalConfig, progress: Callable[..., Iterable[Any]]) -> dict[str, Any]:
    out = Path(cfg.out)
    if out.is_file():
        saved = json.loads(out.read_text())
        if saved.get("config") == config_to_dict(cfg):
            return saved
    return evaluate.run(cfg, progress=progress)


def run(config: DemoConfig, *, progress: Callable[..., Iterable[Any]] = no_progress) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``<work>/summary.json``) and writes ``report.md``.

    Raises:
        DataSourceError: the openclipart packages cannot be fetched; any error of the steps it runs.
    """
    t_start = time.perf_counter()
    work = Path(config.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    shards_root = _import(config, work, progress)
    train, test = _shards(shards_root, "train"), _shards(shards_root, "test")
    timings["import_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    verify_report = verify.run(
        _shards(shards_root, "train") + _shards(shards_root, "val") + test, json_out=str(work / "verify.json")
    )
    if not verify_report.ok:
        raise DataError(
            "verify", shard=str(shards_root), detail=f"data verify found problems: see {work / 'verify.json'}"
        )
    timings["verify_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teachers = prepare_teachers.run(
        load_config(TeachersConfig, None, **config.teachers),
        shards_root=str(shards_root),
        out=str(work / "teachers"),
        seed=config.seed,
        progress=progress,
    )
    student = demo_student(config, work)
    timings["prepare_teachers_s"] = time.perf_counter() - t0

    caches: dict[str, str] = {}
    for name in ("clip", "albef"):
        t0 = time.perf_counter()
        spec = teachers[name]
        out = work / "caches" / f"{name}.zarr"
        result = build_cache.run(
            BuildConfig(
                teacher=name,
                data=tuple(train),
                out=str(out),
                model=spec["model"],
                pretrained=spec["pretrained"],
                k=config.k,
                batch_size=config.build_batch_size,
                workers=config.workers,
                fused_dtype=config.fused_dtype,
                threads=config.threads,
            ),
            progress=progress,
        )
        _logger.info("step 4: %s cache %s (%s)", name, out, result.status)
        caches[name] = str(out)
        timings[f"build_{name}_s"] = time.perf_counter() - t0

    def train_student(preset_name: str, seed: int) -> str:
        suffix = "" if seed == config.seed else f"_seed{seed}"
        run_dir = work / "runs" / f"{preset_name}{suffix}"
        distill.run(
            DistillConfig(
                cache=(caches["clip"], caches["albef"]),
                data=tuple(train),
                out=str(run_dir),
                student=student,
                preset=preset_name,
                k=config.distill_k,
                batch_size=config.batch_size,
                steps=config.steps,
                lr=config.lr,
                warmup_steps=config.warmup_steps,
                workers=config.workers,
                threads=config.threads,
                seed=seed,
                loss=dict(config.loss),
            ),
            progress=progress,
        )
        return str(run_dir)

    runs: dict[str, str] = {}
    for preset_name in config.presets:
        t0 = time.perf_counter()
        runs[preset_name] = train_student(preset_name, config.seed)
        timings[f"distill_{preset_name}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    base = EvalConfig(
        data=tuple(test),
        workers=config.workers,
        batch_size=config.build_batch_size,
        k_test=config.k,
        threads=config.threads,
    )
    for name in ("clip", "albef"):
        spec = teachers[name]
        cfg = replace(
            base,
            teacher=name,
            model=spec["model"],
            pretrained=spec["pretrained"],
            out=str(work / "eval" / f"{name}.json"),
        )
        results[f"teacher: {name}"] = _eval(cfg, progress)
    for preset_name, run_dir in runs.items():
        cfg = replace(base, model=run_dir, out=str(Path(run_dir) / "eval.json"))
        results[f"student: {preset_name}"] = _eval(cfg, progress)
    timings["eval_s"] = time.perf_counter() - t0

    # Seed study: the same teachers and caches, students with other seeds (init of the new layers, shuffling,
    # anchor-caption choice); RSUM mean and spread per preset.
    seed_study: dict[str, dict[str, Any]] = {}
    if config.seeds:
        t0 = time.perf_counter()
        for preset_name in config.presets:
            rsums = {}
            for seed in config.seeds:
                run_dir = runs[preset_name] if seed == config.seed else train_student(preset_name, seed)
                cfg = replace(base, model=run_dir, out=str(Path(run_dir) / "eval.json"))
                rsums[seed] = _eval(cfg, progress)["metrics"]["rsum"]
            values = list(rsums.values())
            seed_study[preset_name] = {
                "rsum_by_seed": rsums,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        timings["seed_study_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    summary = {
        "config": config_to_dict(config),
        "shards": str(shards_root),
        "teachers": teachers,
        "caches": caches,
        "runs": runs,
        "results": {name: r["metrics"] for name, r in results.items()},
        "protocol": next(iter(results.values()))["protocol"],
        "seed_study": seed_study,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    summary["report"] = str(write_report(work, summary))
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def chance_recall(num_images: int, num_captions: int) -> dict[str, float]:
    """Expected R@K (percent) of a random ranking: i2t hits if any of an image's c captions is in the top K of N_t
    (approximated with the mean captions per image c = N_t / N_i, drawing without replacement); t2i: K / N_i."""
    c = num_captions / max(num_images, 1)
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        miss = 1.0
        for j in range(min(k, num_captions)):
            miss *= max(0.0, (num_captions - c - j) / (num_captions - j))
        out[f"i2t_R@{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_R@{k}"] = 100.0 * min(1.0, k / num_images)
    out["rsum"] = sum(out[key] for key in RECALL_KEYS[:-1])
    return out


def write_report(work: Path, summary: dict[str, Any]) -> Path:
    """``report.md`` with the recall table (teachers, students, chance), timings, and PNG plots beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proto = summary["protocol"]
    rows = dict(summary["results"])
    rows["chance"] = chance_recall(proto["num_images"], proto["num_captions"])

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(rows)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(6)], [rows[name][k] for k in RECALL_KEYS[:-1]], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(6)], RECALL_KEYS[:-1])
    ax.set_ylabel("recall (%)")
    ax.set_title(f"test split: {proto['num_images']} images, {proto['num_captions']} captions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "recall.png", dpi=120)
    plt.close(fig)

    lines = [
        "# mcad-cache demo report",
        "",
        f"Data: Open Clip Art Library (public domain), shards in `{summary['shards']}`. Test split: "
        f"{proto['num_images']} images, {proto['num_captions']} captions. Seed {summary['config']['seed']}.",
        "",
        "| model | " + " | ".join(RECALL_KEYS) + " |",
        "|---|" + "---:|" * len(RECALL_KEYS),
    ]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[k]:.1f}" for k in RECALL_KEYS) + " |")
    lines += ["", "Recall in percent; RSUM is the sum of the six. ", "", "![recall](recall.png)", ""]
    for preset_name, run_dir in summary["runs"].items():
        png = Path(run_dir) / rundir.CURVES_FILE
        if png.is_file():
            rel = png.resolve().relative_to(work.resolve()) if png.resolve().is_relative_to(work.resolve()) else png
            lines += [f"Loss curves, `{preset_name}` student:", "", f"![{preset_name}]({rel})", ""]
    if summary.get("seed_study"):
        lines += [
            "## Seed study (RSUM)",
            "",
            "| student | seeds | mean | std | min | max |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, st in summary["seed_study"].items():
            seeds = ", ".join(f"{s}: {v:.1f}" for s, v in st["rsum_by_seed"].items())
            lines.append(
                f"| {name} | {seeds} | {st['mean']:.1f} | {st['std']:.1f} | {st['min']:.1f} | {st['max']:.1f} |"
            )
        lines.append("")
    lines += ["## Timings", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary["timings_s"].items()]
    path = work / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
