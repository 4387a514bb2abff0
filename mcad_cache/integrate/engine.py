"""``integrate``: the offline integration stage, from two complete parent caches to a derived target cache.

Steps: open and check both parents (complete; same keys and captions); resolve the integration's ``LossConfig``
fields; reuse a complete derived cache with the same fingerprint, refuse one made from other parents or settings
(readable diff) unless ``overwrite``; train the module (modified features only; fusion and mixture have nothing to
learn); write every row's targets into ``<out>.partial`` and rename it to ``<out>`` when complete (a crash leaves
no half-written derived cache; rerunning redoes the cheap stage); record the diagnostics in the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mcad_cache.cache import CacheReader, open_cache
from mcad_cache.cache.manifest import fingerprint_diff, format_diff, utc_now
from mcad_cache.errors import CacheMismatchError, CacheSchemaError, ConfigError, OutputPathError
from mcad_cache.integrate.config import INTEGRATION_FIELDS, IntegrateConfig
from mcad_cache.integrate.derived import (
    DERIVED_SCHEMA_VERSION,
    DerivedLayout,
    DerivedWriter,
    read_manifest,
    replace_dir,
)
from mcad_cache.integrate.diagnostics import direction_stats
from mcad_cache.integrate.parents import Parents, view_diff
from mcad_cache.integrate.train import TrainResult, train_module
from mcad_cache.losses import (
    LossConfig,
    TeacherTargets,
    itm_scores,
    masked_log_softmax,
    modified_direction,
    preset,
)
from mcad_cache.losses.integration import tau_clip
from mcad_cache.progress import ProgressFn, no_progress

_logger = logging.getLogger(__name__)


@dataclass
class IntegrateResult:
    """Outcome of one ``integrate`` call."""

    path: Path
    status: str  # "written" | "complete" (a derived cache with this fingerprint was already there)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def open_parents(paths: tuple[str, ...]) -> tuple[CacheReader, CacheReader]:
    """Open the two parents, complete, as (dual-stream, single-stream) in whatever order they were given.

    Raises:
        CacheNotFoundError, CacheIncompleteError, CacheSchemaError (not one of each kind).
    """
    readers = [open_cache(p).require(complete=True) for p in paths]
    kinds = sorted(r.kind for r in readers)
    if kinds != ["dual", "single"]:
        raise CacheSchemaError(
            f"--cache: integrate needs one dual-stream (CLIP) and one single-stream (ALBEF/BLIP) cache, got kinds "
            f"{[r.kind for r in readers]} ({', '.join(str(r.path) for r in readers)})"
        )
    clip = next(r for r in readers if r.kind == "dual")
    single = next(r for r in readers if r.kind == "single")
    return clip, single


def loss_config_of(config: IntegrateConfig) -> LossConfig:
    """The ``LossConfig`` whose integration fields the run uses (``--loss`` overrides on ``mcad-online``).

    Raises:
        ConfigError: a bad override.
    """
    try:
        return preset("mcad-online", integration=config.mode, **dict(config.loss))
    except ValueError as err:
        raise ConfigError(f"--loss: {err}") from err


def derived_fingerprint(config: IntegrateConfig, loss_config: LossConfig, parents: Parents, k: int) -> dict[str, Any]:
    """What makes two derived caches interchangeable: both parents' fingerprints, the integration settings (with
    every resolved LossConfig integration field), k, and the schema version."""
    return {
        "derived_schema_version": DERIVED_SCHEMA_VERSION,
        "parents": parents.fingerprints(),
        "integration": config.fingerprint(),
        "loss": {name: getattr(loss_config, name) for name in INTEGRATION_FIELDS},
        "k": k,
        "data": parents.clip.fingerprint.get("data"),
    }


def _check_out(out: Path, fingerprint: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a reusable complete derived cache at ``out``; None when it must be (re)written.

    Raises:
        CacheMismatchError: a derived cache made differently, without ``overwrite`` (readable diff).
        OutputPathError: ``out`` holds something else, without ``overwrite``.
    """
    if not out.exists():
        return None
    manifest = read_manifest(out)
    if manifest is None:
        if overwrite:
            return None
        raise OutputPathError(f"--out {out} exists and is not a derived cache; choose another path or --overwrite")
    lines = fingerprint_diff(manifest.get("fingerprint", {}), fingerprint)
    if not lines and manifest.get("complete"):
        return manifest
    if lines and not overwrite:
        raise CacheMismatchError(
            f"{out} was made from other parents or settings; pass --overwrite to replace it:{format_diff(lines)}"
        )
    return None


def integrate(
    config: IntegrateConfig, *, device: torch.device | str = "cpu", progress: ProgressFn = no_progress
) -> IntegrateResult:
    """Run the integration stage (see the module docstring).

    Args:
        config: the run's settings (validated here).
        device: where the module trains and the targets are computed.
        progress: ``progress(iterable, description, total)``.
    Returns:
        The :class:`IntegrateResult` (diagnostics as stored in the manifest).
    Raises:
        ConfigError: a bad setting (k above the parents' k, a bad --loss override).
        CacheNotFoundError / CacheIncompleteError / CacheSchemaError / CacheMismatchError: parents missing,
            incomplete, of the wrong kinds, or not built on the same data; an existing derived cache made differently.
        OutputPathError: ``out`` holds something that is not a derived cache.
    """
    t0 = time.perf_counter()
    config.validate()
    clip, single = open_parents(config.cache)
    parents = Parents(clip, single)
    k = config.k or parents.k
    if k > parents.k:
        raise ConfigError(f"--k {k}: the parents hold k={clip.k} (CLIP) and k={single.k} ({single.teacher})")
    loss_config = loss_config_of(config)
    out = Path(config.out)
    fingerprint = derived_fingerprint(config, loss_config, parents, k)
    existing = _check_out(out, fingerprint, overwrite=config.overwrite)
    if existing is not None:
        return IntegrateResult(out, "complete", existing.get("diagnostics", {}), time.perf_counter() - t0)
    views = parents.views()
    view_lines = view_diff(views["single"], views["clip"])
    if view_lines:
        _logger.warning("the two teachers saw different image views:%s", format_diff(view_lines))

    trained: TrainResult | None = None
    if loss_config.integration == "modified_features" and config.steps > 0:
        trained = train_module(
            parents, loss_config, k=k, steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
            batch_size=config.batch_size, holdout_fraction=config.holdout_fraction, eval_every=config.eval_every,
            patience=config.patience, seed=config.seed, device=device, progress=progress,
        )  # fmt: skip
    elif loss_config.integration == "modified_features":
        raise ConfigError("--steps 0 with --integration modified-features: the module would stay at its initial gate")

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    layout = DerivedLayout(num_images=clip.num_images, num_texts=clip.num_texts, emb_dim=parents.clip_dim, k=k)
    manifest = {
        "kind": "derived",
        "fingerprint": fingerprint,
        "parents": {"clip": str(clip.path), "single": str(single.path)},
        "logit_scale": float(clip.logit_scale),
        "view": views["clip"],
        "teacher_views": views,
        "config": dataclasses.asdict(config),
        "started_at": utc_now(),
    }
    writer = DerivedWriter.create(tmp, layout=layout, manifest=manifest)
    diagnostics = _write(writer, parents, loss_config, trained, config=config, k=k, device=device, progress=progress)
    writer.mark_complete({"diagnostics": diagnostics})
    replace_dir(tmp, out)
    return IntegrateResult(out, "written", diagnostics, time.perf_counter() - t0)


def _write(
    writer: DerivedWriter,
    parents: Parents,
    cfg: LossConfig,
    trained: TrainResult | None,
    *,
    config: IntegrateConfig,
    k: int,
    device: torch.device | str,
    progress: ProgressFn,
) -> dict[str, Any]:
    clip = parents.clip
    writer.write("image_keys", 0, np.array([str(x) for x in clip.image_keys.tolist()]))
    writer.write("text_keys", 0, np.array([str(x) for x in clip.text_keys.tolist()]))
    writer.write("captions", 0, np.array([str(x) for x in clip.captions.tolist()]))
    writer.write("txt2img", 0, clip.txt2img)
    writer.write("img2txt_offsets", 0, clip.img2txt_offsets)
    writer.write("image_valid", 0, parents.image_valid)
    writer.write("text_valid", 0, parents.text_valid)
    module = trained.module if trained is not None else None
    mode = cfg.mode
    one = dataclasses.replace(cfg, topk_temperature=1.0)
    feats = {"i2t": clip.image_emb().copy(), "t2i": clip.text_emb().copy()}
    stats_in: dict[str, dict[str, list[np.ndarray]]] = {}
    forced_total = {}
    rpc = writer.layout.rows_per_chunk
    for d, n, valid_rows in (
        ("i2t", clip.num_images, parents.image_valid),
        ("t2i", clip.num_texts, parents.text_valid),
    ):
        acc: dict[str, list[np.ndarray]] = {n_: [] for n_ in ("target", "clip", "itm", "valid", "pos")}
        forced_total[d] = 0
        starts = range(0, n, rpc)
        for start in progress(starts, f"integrate: writing {d} targets", len(starts)):
            rows = np.arange(start, min(start + rpc, n))
            part = parents.direction(d, rows, k=k, force_positive=config.force_positive, itm_score=cfg.itm_score)
            valid = part["valid"] & torch.from_numpy(valid_rows[rows])[:, None]
            query_name = "clip_image_emb" if d == "i2t" else "clip_text_emb"
            cand_name = "clip_topk_text_emb" if d == "i2t" else "clip_topk_image_emb"
            query = torch.nan_to_num(part["query_emb"])
            teacher = TeacherTargets(
                **{query_name: query, cand_name: part["cand_emb"]},
                clip_logit_scale=float(clip.logit_scale),
                ss_logit_scale=float(parents.single.logit_scale),
                **{
                    f"clip_topk_sims_{d}": torch.einsum("bd,bkd->bk", query, part["cand_emb"]),
                    f"itm_logits_{d}": part["itm_logits"],
                    f"fused_cls_{d}": part["fused"],
                    f"ss_sims_{d}": part["ss_sims"],
                    f"valid_{d}": valid,
                    f"is_positive_{d}": part["is_positive"],
                },
            ).to(device)
            tau_c = tau_clip(cfg, teacher)
            clip_lp = masked_log_softmax(getattr(teacher, f"clip_topk_sims_{d}") / tau_c, valid.to(device))
            itm_lp = masked_log_softmax(itm_scores(part["itm_logits"], kind=cfg.itm_score) / cfg.tau_itm, valid)
            with torch.no_grad():
                if module is not None:
                    mod = modified_direction(module, cfg, teacher, d)
                    target_lp = masked_log_softmax(mod["topk_sims"] / tau_c, valid.to(device))
                    anchor = mod["anchor"].cpu().numpy()
                    ok = valid_rows[rows]
                    feats[d][rows[ok]] = anchor[ok]
                elif mode.name == "none":
                    target_lp = clip_lp
                else:
                    target_lp = mode.teacher_log_probs(one, teacher, d, None)
            row_ok = valid_rows[rows][:, None]
            v = valid.numpy() & row_ok
            write = {
                "idx": np.where(v, part["cand_rows"], -1),
                "logits": np.where(v, target_lp.cpu().numpy(), np.nan),
                "clip_logits": np.where(v, clip_lp.cpu().numpy(), np.nan),
                "itm_logits": np.where(v, itm_lp.numpy(), np.nan),
                "is_positive": part["is_positive"].numpy() & v,
                "forced": part["forced"] & v,
            }
            for name, value in write.items():
                writer.write(f"{d}_{name}", start, value)
            forced_total[d] += int(write["forced"].sum())
            for name, value in (("target", write["logits"]), ("clip", write["clip_logits"]),
                                ("itm", write["itm_logits"]), ("valid", v), ("pos", write["is_positive"])):  # fmt: skip
                acc[name].append(value)
        stats_in[d] = acc
    if module is not None:
        feats["t2i"] = _share_duplicates(feats["t2i"], parents.caption_id, parents.text_valid)
    for d, name, valid_rows in (("i2t", "image_emb", parents.image_valid), ("t2i", "text_emb", parents.text_valid)):
        x = np.where(valid_rows[:, None], feats[d], np.nan).astype(np.float32)
        for start in range(0, x.shape[0], rpc):
            writer.write(name, start, x[start : start + rpc])
    diag: dict[str, Any] = {"integration": config.integration, "k": k, "force_positive": config.force_positive}
    for d, acc in stats_in.items():
        cat = {n_: np.concatenate(v) for n_, v in acc.items()}
        diag[d] = direction_stats(cat["target"], cat["clip"], cat["itm"], cat["valid"], cat["pos"])
        diag[d]["forced_positives"] = forced_total[d]
    if module is not None and trained is not None:
        g_img, g_txt = module.gates()
        diag.update(
            gate_image=float(g_img.detach()), gate_text=float(g_txt.detach()), steps_run=trained.steps_run,
            best_step=trained.best_step, best_holdout_loss=trained.best_holdout, stopped_early=trained.stopped_early,
            curve=trained.curve,
        )  # fmt: skip
        ok = parents.image_valid
        diag["feature_cos_to_clip"] = {
            "image": float((feats["i2t"][ok] * clip.image_emb()[ok]).sum(-1).mean()),
            "text": float((feats["t2i"][parents.text_valid] * clip.text_emb()[parents.text_valid]).sum(-1).mean()),
        }
    return diag


def _share_duplicates(text_feats: np.ndarray, caption_id: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows with the same caption text get one target feature (their normalised mean): the teacher then gives the
    duplicates equal in-batch probability, so KD treats them as positives of each other."""
    out = text_feats.copy()
    ids = np.where(valid, caption_id, -1)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    bounds = np.nonzero(np.diff(sorted_ids))[0] + 1
    for group in np.split(order, bounds):
        if group.size > 1 and ids[group[0]] >= 0:
            mean = torch.from_numpy(text_feats[group].mean(0))
            out[group] = F.normalize(mean, dim=-1).numpy()
    return out


__all__ = ["IntegrateResult", "derived_fingerprint", "integrate", "loss_config_of", "open_parents"]
