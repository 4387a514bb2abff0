"""``mcad-cache demo run``: the main job end to end on real data, offline, ending in a powered, paired study.

Steps (each reused when its output is already complete, so a second run skips finished work):

1. import all usable Open Clip Art Library images (Debian packages ``openclipart-png``/``-svg``) into train / val /
   test shards; the test split (15 %, 1,108 images) needs no cache;
2. verify every shard (``data verify``);
3. prepare the offline teachers (``demo.prepare_teachers``): an open_clip dual-stream teacher and an
   ALBEF-architecture single-stream teacher built from pretrained towers that PyPI packages ship, tuned once;
   the premise check (single-stream ITM re-rank beats dual-stream on val RSUM) comes from their val recall;
4. ``build`` the CLIP and ALBEF caches on the first ``train_images`` train images (the product's real build path);
5. ``integrate`` (``pipelines.integrate``, ``integration``): the integration module trained once on the two caches,
   its fixed targets written to a derived cache (``caches/targets.zarr``) that the ``mcad`` preset reads;
6. ``eval`` both teachers on the test split (ALBEF: ITM-only re-rank of the ITC top-``k_test``);
7. ``study`` (``pipelines.study``, frozen towers): ``presets`` x ``seeds`` paired students from the same caches
   (``mcad``: the derived cache), each evaluated on the test split; paired Δ RSUM with t-interval, Wilcoxon p,
   Holm, MDE, plots;
8. write ``report.md``: three headline lines (teachers and premise, MCAD vs contrastive, MCAD vs the best
   single-teacher preset), the tables, plots, a val curve and the time table (wall and CPU seconds per step, load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mcad_cache.cache import open_cache
from mcad_cache.config import BuildConfig, EvalConfig, ImportConfig, config_to_dict, load_config
from mcad_cache.demo import openclipart, prepare_teachers
from mcad_cache.demo.config import DemoConfig, TeachersConfig
from mcad_cache.demo.convert import packaged_pretrained_overrides
from mcad_cache.demo.report import RECALL_KEYS, chance_recall, plot_val_curve, premise_check, teachers_line
from mcad_cache.demo.report import write_report as write_report
from mcad_cache.errors import ConfigError, DataError
from mcad_cache.hashing import json_sha256
from mcad_cache.integrate.config import IntegrateConfig
from mcad_cache.pipelines import build_cache, data_import, evaluate, integrate, study, verify
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import init_spawned_logging, logging_levels
from mcad_cache.student import CONFIG_DIR as STUDENT_CONFIG_DIR
from mcad_cache.study.report import mde_sentence

_logger = logging.getLogger(__name__)

__all__ = ["RECALL_KEYS", "chance_recall", "demo_student", "run", "write_report"]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def stage(timings: dict[str, float], cpu: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall seconds in ``timings[name + "_s"]`` and its CPU seconds in ``cpu[name + "_s"]`` (the
    fairer figure on a shared machine: wall grows with the load, CPU time much less)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    try:
        yield
    finally:
        timings[f"{name}_s"] = time.perf_counter() - t0
        cpu[f"{name}_s"] = cpu_seconds() - c0


def _shards(root: Path, split: str) -> list[str]:
    return sorted(str(p) for p in (root / split).glob("shard-*.tar"))


def _split_rule() -> dict[str, float]:
    return {"test_fraction": openclipart.TEST_FRACTION, "val_fraction": openclipart.VAL_FRACTION}


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
    index, report = out / "index.json", out / data_import.REPORT_FILE
    if report.is_file() and index.is_file():
        saved = json.loads(index.read_text()).get("config", {})
        rule = json.loads(report.read_text()).get("split_rule", {})  # importers put their extras at the top level
        same = all(saved.get(k) == v for k, v in config_to_dict(wanted).items() if k != "workers")
        same = same and all(rule.get(k) == v for k, v in _split_rule().items())
        if same and all(_shards(out, s) for s in ("train", "val", "test")):
            _logger.info("step 1: shards already imported in %s (reused)", out)
            return out
        _logger.info("step 1: shards in %s were imported with other settings: importing again", out)
    _logger.info("step 1: importing the Open Clip Art Library into %s", out)
    data_import.run(wanted, progress=progress)
    return out


def split_counts(shards_root: Path) -> dict[str, int]:
    """``num_<split>_images`` for train / val / test, from the import's ``index.json``."""
    splits = json.loads((shards_root / "index.json").read_text()).get("splits", {})
    return {f"num_{s}_images": int(splits.get(s, {}).get("num_samples", 0)) for s in ("train", "val", "test")}


def cache_shards(train: list[str], *, train_images: int, samples_per_shard: int) -> list[str]:
    """The first whole train shards holding at least ``train_images`` images (all of them for 0)."""
    if train_images <= 0:
        return list(train)
    return list(train[: max(1, math.ceil(train_images / samples_per_shard))])


def demo_student(config: DemoConfig, work: Path, *, teachers: TeachersConfig) -> str:
    """The student config the demo trains: ``config.student`` when set, else a JSON written to ``work``: the
    pretrained towers PyPI packages ship (EfficientNet-Lite0; the first ``student_text_layers`` layers of
    all-MiniLM-L6-v2, mean-pooled), frozen in the study, **at the teachers' view** (their square size, squash
    resize, bicubic, mean/std 0.5, their context length): the student sees the images the cached targets belong to.
    """
    if config.student:
        return config.student
    path = work / "student.json"
    overrides = packaged_pretrained_overrides((work / "weights").resolve())  # absolute: the JSON moves with no CWD
    spec = {
        **json.loads(Path(STUDENT_CONFIG_DIR / "minilm_efficientnet.json").read_text()),
        **overrides,
        "name": "demo_student",
        "image_size": teachers.image_size_px,
        "resize_mode": "squash",
        "interpolation": "bicubic",
        "context_length": teachers.context_length,
        "text_model_kwargs": {"num_hidden_layers": config.student_text_layers},
    }
    spec.pop("_comment", None)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return str(path)


def _eval(cfg: EvalConfig, progress: ProgressFn) -> dict[str, Any]:
    out = Path(cfg.out)
    if out.is_file():
        saved = json.loads(out.read_text())
        if saved.get("config") == config_to_dict(cfg):
            return saved
    return evaluate.run(cfg, progress=progress)


def eval_teachers(
    cfgs: dict[str, EvalConfig], progress: ProgressFn = no_progress
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Evaluate both teachers on the test split (reused when ``eval/<name>.json`` has the same config); module level so
    that it can run in a background process. Returns the results by teacher name and ``{"wall_s", "cpu_s"}`` (this
    process's own CPU seconds and those of its finished decode workers).

    Raises:
        What ``pipelines.evaluate.run`` raises.
    """
    t0, c0 = time.perf_counter(), cpu_seconds()
    results = {name: _eval(cfg, progress) for name, cfg in cfgs.items()}
    return results, {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}


class Background:
    """``fn(*args)`` in a spawned process (safe with CUDA and torch's OpenMP pool) while this one goes on.

    ``result()`` waits and returns its value or re-raises its error; ``cancel()`` terminates it (this process failed
    first, so nothing waits on a process whose result nobody reads). ``fn``, ``args`` and the value must pickle.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        args = (send, logging_levels(), fn, args)
        self._proc = ctx.Process(target=_background_main, args=args, name="mcad-background")
        self._proc.start()
        send.close()

    def result(self) -> Any:
        """The value of ``fn(*args)``. Raises: its error; RuntimeError: the process died without an answer."""
        try:
            status, value = self._recv.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"the background process died (exit code {self._proc.exitcode})") from None
        self._proc.join()
        if status == "error":
            raise value
        return value

    def cancel(self) -> None:
        """Terminate the process if it still runs."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()


def _background_main(send: Any, levels: dict[str, int], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    init_spawned_logging(levels, label="background")
    try:
        answer: tuple[str, Any] = ("ok", fn(*args))
    except Exception as err:  # noqa: BLE001 (handed to the parent, which raises it)
        answer = ("error", err)
    try:
        send.send(answer)
    except Exception as err:  # noqa: BLE001 (an error that does not pickle: its text, once)
        send.send(("error", RuntimeError(f"{type(answer[1]).__name__}: {answer[1]} ({err})")))


def study_config(config: DemoConfig, *, caches: list[str], data: list[str], val: list[str], test: list[str],
                 student: str, work: Path, targets: str = "") -> study.StudyConfig:  # fmt: skip
    """The demo's study: every choice from ``DemoConfig`` (docs/demo.md), frozen towers, in ``work/study/<sha>``
    (a folder per setting, so a changed setting never meets runs made with another); ``targets`` is the derived
    cache the fixed-target presets (``mcad``) read instead of the teacher caches."""
    cfg = study.StudyConfig(
        cache=tuple(caches), data=tuple(data), test=tuple(test), val=tuple(val), frozen_towers=True,
        presets=tuple(config.presets), seeds=config.seeds, target=config.target, baseline="contrastive",
        student=student, k=config.distill_k, batch_size=config.batch_size, steps=config.steps, lr=config.lr,
        warmup_steps=config.warmup_steps, loss=dict(config.loss), eval_batch_size=config.build_batch_size,
        workers=config.workers, threads=config.threads, log_every=config.log_every, targets=targets, jobs=config.jobs,
    )  # fmt: skip
    same_results = ("seeds", "presets", "out", "jobs", "workers", "threads")  # more seeds or arms: only new runs
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in same_results}
    return dataclasses.replace(cfg, out=str(work / "study" / json_sha256(settings)[:12]))


def run(config: DemoConfig, *, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``<work>/summary.json``) and writes ``report.md``.

    Raises:
        ConfigError: ``jobs < 1``; DataSourceError: the openclipart packages cannot be fetched; any error of the steps
        it runs.
    """
    if config.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (processes at a time), got {config.jobs}")
    t_start, c_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()
    if config.threads > 0:
        torch.set_num_threads(config.threads)  # every step runs in this process (the teachers' passes included)
    work = Path(config.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}

    with stage(timings, cpu, "import"):
        shards_root = _import(config, work, progress)
        train, val, test = (_shards(shards_root, s) for s in ("train", "val", "test"))

    with stage(timings, cpu, "verify"):
        verify_report = verify.run(train + val + test, json_out=str(work / "verify.json"))
    if not verify_report.ok:
        raise DataError(
            "verify", shard=str(shards_root), detail=f"data verify found problems: see {work / 'verify.json'}"
        )

    with stage(timings, cpu, "prepare_teachers"):
        teachers_cfg = load_config(TeachersConfig, None, **config.teachers)
        teachers = prepare_teachers.run(
            teachers_cfg, shards_root=str(shards_root), out=str(work / "teachers"), seed=config.seed, progress=progress
        )
        student = demo_student(config, work, teachers=teachers_cfg)

    eval_cfgs = {
        name: EvalConfig(
            teacher=name,
            model=teachers[name]["model"],
            pretrained=teachers[name]["pretrained"],
            data=tuple(test),
            out=str(work / "eval" / f"{name}.json"),
            batch_size=config.build_batch_size,
            workers=config.workers,
            k_test=config.k_test,
            itm_score="itm",
            threads=config.threads,
        )  # fmt: skip
        for name in ("clip", "albef")
    }
    background = Background(eval_teachers, eval_cfgs) if config.jobs > 1 else None
    if background is not None:
        _logger.info("step 6: teacher evals on the test split run in a background process beside steps 4, 5 and 7")
    try:  # steps 4, 5 and 7 (step 6 may run beside them)
        cached = cache_shards(train, train_images=config.train_images, samples_per_shard=config.samples_per_shard)
        caches: dict[str, str] = {}
        for name in ("clip", "albef"):
            spec = teachers[name]
            out = work / "caches" / f"{name}.zarr"
            with stage(timings, cpu, f"build_{name}"):
                result = build_cache.run(
                    BuildConfig(
                        teacher=name, data=tuple(cached), out=str(out), model=spec["model"],
                        pretrained=spec["pretrained"], k=config.k, batch_size=config.build_batch_size,
                        workers=config.workers, fused_dtype=config.fused_dtype, threads=config.threads,
                    ),
                    progress=progress,
                )  # fmt: skip
            _logger.info("step 4: %s cache %s (%s)", name, out, result.status)
            caches[name] = str(out)

        with stage(timings, cpu, "integrate"):
            derived = integrate.run(
                IntegrateConfig(
                    cache=(caches["clip"], caches["albef"]), out=str(work / "caches" / "targets.zarr"),
                    integration=config.integration, steps=config.integrate_steps, seed=config.seed,
                    threads=config.threads, overwrite=True,
                ),
                progress=progress,
            )  # fmt: skip
        _logger.info("step 5: derived targets %s (%s)", derived.path, derived.status)

        with stage(timings, cpu, "study"):
            scfg = study_config(
                config,
                caches=list(caches.values()),
                data=cached,
                val=val,
                test=test,
                student=student,
                work=work,
                targets=str(derived.path),
            )
            result = study.run(scfg, progress=progress)
        timings["study_runs_wall_s"] = sum(r["wall_s"] for r in result["runs"])
    except BaseException:
        if background is not None:
            background.cancel()
        raise

    t0 = time.perf_counter()
    if background is None:
        teachers_test, used = eval_teachers(eval_cfgs, progress=progress)
    else:
        teachers_test, used = background.result()  # its errors surface here, after the study
        _logger.info("step 6: background teacher evals joined (waited %.0f s)", time.perf_counter() - t0)
    timings["eval_teachers_s"], cpu["eval_teachers_s"] = used["wall_s"], used["cpu_s"]
    timings["eval_teachers_wait_s"] = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), cpu_seconds()
    example = Path(scfg.out) / "runs" / config.target / "seed-0" / "metrics.jsonl"
    val_curve = plot_val_curve(example, work / "val_curve.png")
    premise = premise_check(teachers)
    proto = teachers_test["clip"]["protocol"]
    summary: dict[str, Any] = {
        "headline": [teachers_line(teachers_test, premise, k_test=config.k_test), *result["headline"]],
        "premise": premise,
        "config": config_to_dict(config),
        "shards": str(shards_root),
        "data": {
            **split_counts(shards_root),
            "num_cache_images": int(open_cache(caches["clip"]).num_images),
        },
        "teachers": {n: {k: teachers[n][k] for k in ("model", "pretrained", "val")} for n in ("clip", "albef")},
        "teachers_test": {n: {"metrics": r["metrics"], "protocol": r["protocol"]} for n, r in teachers_test.items()},
        "caches": {**caches, "targets": str(derived.path)},
        "chance": chance_recall(proto["num_images"], proto["num_captions"]),
        "study": {
            **{k: result[k] for k in ("presets", "comparisons", "best_single", "mde", "seeds", "report")},
            "mde_sentence": mde_sentence(result),
            "out": scfg.out,
        },
        "val_curve": str(val_curve) if val_curve else None,
    }
    timings["report_s"], cpu["report_s"] = time.perf_counter() - t0, cpu_seconds() - c0
    timings["total_s"], cpu["total_s"] = time.perf_counter() - t_start, cpu_seconds() - c_start
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    summary["cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
    summary["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    summary["report"] = str(write_report(work, summary))
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for line in summary["headline"]:
        _logger.info("%s", line)
    return summary
