"""Shared helpers of the benchmark scripts: machine description, interleaved timing, peak memory, rich tables,
JSON output, synthetic shards and a cheap synthetic teacher at real output sizes.

Not part of the library: benchmark scripts import this file by path (``benchmarks/`` is not a package).
Timing uses ``time.perf_counter``; peak memory uses the kernel's ``VmHWM`` (reset through ``/proc/self/clear_refs``)
or, where that is unavailable, ``resource.getrusage``.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad_cache.runtime import resolve_device  # the one device rule; benchmarks call C.resolve_device

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / ".work" / "benchmarks"

# ----------------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on: CPU count and model, torch version and threads, load average."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15": load,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that perf_counter brackets it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, measured with ``time.perf_counter``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleave(fns: Mapping[str, Callable[[], Any]], *, reps: int) -> dict[str, list[float]]:
    """Run every function ``reps`` times, interleaved (A B C, then B C A, ...), so slow drifts of a shared machine
    hit all of them alike. Returns the seconds of each call, per name, in repetition order."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            seconds, _ = timed(fns[name])
            out[name].append(seconds)
    return out


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Per-repetition ratios num[i] / den[i] and their median (the figure reported), min and max."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "per_rep": ratios,
    }


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def fit_growth_exponent(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(size): the empirical growth order (1 = linear, 2 = quadratic).
    None when fewer than two positive points."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values, strict=True) if s > 0 and v > 0]
    if len(pts) < 2:
        return None
    xs, ys = zip(*pts, strict=True)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


# ----------------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
if _LIBC is not None:
    # A fixed mmap threshold (glibc M_MMAP_THRESHOLD = -3): blocks of 128 KiB or more are mmapped and returned to the
    # OS when freed. glibc's default raises the threshold after large frees and then keeps freed blocks in its heap,
    # so a later operation could reuse them without raising the resident set: its peak would read as ~0.
    _LIBC.mallopt(-3, 128 * 1024)


class PeakMemory:
    """Peak resident memory of the process while the ``with`` block runs.

    Freed heap memory is returned to the OS on entry (glibc ``malloc_trim``; large blocks are always mmapped, see
    ``_LIBC``), so memory the block allocates shows in the resident set. ``VmHWM`` (the kernel's RSS high-water
    mark) is reset on entry through ``/proc/self/clear_refs`` (Linux); where
    that is not possible, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is used (a high-water mark since the process
    started, so ``increase_bytes`` is then an upper bound only when the block sets a new peak).

    Attributes (after the block): ``rss_before_bytes``, ``peak_bytes``, ``increase_bytes`` (peak - before),
    ``method``.
    """

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # return freed heap memory, so that what the block allocates shows in the RSS
        self.method = "VmHWM reset via /proc/self/clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "resource.getrusage ru_maxrss"
        self.rss_before_bytes = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("VmHWM"):
            self.peak_bytes = (_status_kib("VmHWM") or 0) * 1024
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.increase_bytes = max(0, self.peak_bytes - self.rss_before_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rss_before_bytes": self.rss_before_bytes,
            "peak_bytes": self.peak_bytes,
            "increase_bytes": self.increase_bytes,
            "method": self.method,
        }


# ----------------------------------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    """Compact cell text for a table."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** (-digits)):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a rich table to stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    Console(width=160).print(table)


def print_machine(info: Mapping[str, Any]) -> None:
    print(
        f"machine: {info['nproc']} CPU(s), {info['cpu_model']}, torch {info['torch_version']}, "
        f"{info['torch_threads']} thread(s), cuda={info['cuda']}, load average {info['load_average_1_5_15']}"
    )


def write_json(name: str, payload: Mapping[str, Any], *, out_dir: str | Path | None = None) -> Path:
    """Write ``payload`` to ``<out_dir>/<name>.json`` (default ``.work/benchmarks/``) and return the path."""
    folder = Path(out_dir) if out_dir else OUT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-able: {type(obj).__name__}")


def add_common_args(parser: Any) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test (seconds)")
    parser.add_argument("--out", default="", help="output folder for the JSON (default .work/benchmarks)")
    parser.add_argument("--work", default="", help="scratch folder (default .work/benchmarks/scratch/<name>)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0 = torch's default). Default 1: on a shared machine, more threads than free "
        "cores make OpenMP threads spin against each other (5-20x slower, erratic steps were seen on 2 shared cores)",
    )
    parser.add_argument("--seed", type=int, default=0)


def scratch_dir(args: Any, name: str) -> Path:
    path = Path(args.work) if args.work else OUT_DIR / "scratch" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup_run(args: Any) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


# ----------------------------------------------------------------------------------------------------- data

WORDS = (
    "a an the man woman child dog cat horse bird car bus train bike boat plane street beach park field kitchen "
    "table plate pizza cake sandwich red blue green white black small large young old two three sitting standing "
    "walking running riding eating holding looking next to on in near with under over playing grass snow water "
    "city building window door room bed couch television computer phone umbrella kite ball frisbee skateboard"
).split()


def caption_for(rng: np.random.Generator) -> str:
    """A COCO-length caption (8 to 14 words)."""
    return " ".join(rng.choice(WORDS, size=int(rng.integers(8, 15))).tolist())


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] with smooth structure and texture (compresses like a photo, not like a flat
    colour): upsampled low-resolution noise plus fine noise."""
    w, h = size
    low = rng.random((max(2, h // 24), max(2, w // 24), 3)) * 255
    coarse = torch.from_numpy(low).permute(2, 0, 1)[None].float()
    up = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(up + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def make_shards(
    folder: str | Path,
    *,
    num_samples: int,
    per_shard: int = 1000,
    image_size: tuple[int, int] = (320, 240),
    captions_per_sample: int = 1,
    fmt_ext: str = "jpg",
    seed: int = 0,
    prefix: str = "bench",
) -> list[str]:
    """Write WebDataset shards of photo-like images (``fmt_ext`` "jpg" quality 90 or "png") with
    ``captions_per_sample`` captions each (``{"captions": [...]}`` JSON). Reuses shards already written with the same
    arguments (a ``.done`` marker names them). Returns the shard paths."""
    import webdataset as wds
    from PIL import Image

    folder = Path(folder)
    tag = f"{num_samples}-{per_shard}-{image_size[0]}x{image_size[1]}-{captions_per_sample}-{fmt_ext}-{seed}-{prefix}"
    marker = folder / f".done-{tag}"
    paths = [str(folder / f"{prefix}-{i:05d}.tar") for i in range((num_samples + per_shard - 1) // per_shard)]
    if marker.is_file() and all(Path(p).is_file() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s, path in enumerate(paths):
        with wds.TarWriter(path, encoder=False, mtime=0) as writer:
            for i in range(s * per_shard, min((s + 1) * per_shard, num_samples)):
                buf = io.BytesIO()
                im = Image.fromarray(photo_like(rng, image_size))
                if fmt_ext == "jpg":
                    im.save(buf, "JPEG", quality=90)
                else:
                    im.save(buf, "PNG")
                caps = [caption_for(rng) for _ in range(captions_per_sample)]
                writer.write(
                    {
                        "__key__": f"{prefix}{i:08d}",
                        fmt_ext: buf.getvalue(),
                        "json": json.dumps({"captions": caps}).encode(),
                    }
                )
    marker.write_text(json.dumps(paths))
    return paths


# ----------------------------------------------------------------------------------------------------- teachers

# Output sizes of the real teachers (open_clip ViT-B-16: embed_dim 512; ALBEF-base: embed_dim 256, BERT-base fused
# [CLS] 768) and their own preprocessing (open_clip: 224 px, shortest-side resize + centre crop, CLIP mean/std;
# ALBEF: 384 px squash resize, ALBEF mean/std).
SYNTHETIC_SPECS: dict[str, dict[str, Any]] = {
    "clip-vit-b-16": {"kind": "dual", "emb_dim": 512, "fused_dim": 0, "image_size": 224, "resize_mode": "shortest"},
    "albef-base": {"kind": "single", "emb_dim": 256, "fused_dim": 768, "image_size": 384, "resize_mode": "squash"},
    "small-dual": {"kind": "dual", "emb_dim": 256, "fused_dim": 0, "image_size": 32, "resize_mode": "squash"},
    "small-single": {"kind": "single", "emb_dim": 256, "fused_dim": 768, "image_size": 32, "resize_mode": "squash"},
}
_TOKENS = 16  # image tokens of the synthetic teacher (a 4 x 4 grid)
_WIDTH = 64  # its token width
_VOCAB = 4096
_CONTEXT = 32


class _SyntheticNet(nn.Module):
    def __init__(self, emb_dim: int, fused_dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch = nn.Parameter(torch.randn(3, _WIDTH, generator=g))
        self.pos = nn.Parameter(torch.randn(_TOKENS, _WIDTH, generator=g))
        self.img_proj = nn.Parameter(torch.randn(_WIDTH, emb_dim, generator=g) / _WIDTH**0.5)
        self.tok = nn.Parameter(torch.randn(_VOCAB, _WIDTH, generator=g))
        self.txt_proj = nn.Parameter(torch.randn(_WIDTH, emb_dim, generator=g) / _WIDTH**0.5)
        c = max(fused_dim, 1)
        self.fuse = nn.Parameter(torch.randn(2 * _WIDTH, c, generator=g) / (2 * _WIDTH) ** 0.5)
        # a few large-magnitude channels, as in BERT hidden states (matters for int8 storage error)
        self.outlier = nn.Parameter(torch.ones(c))
        self.outlier.data[torch.randperm(c, generator=g)[: max(1, c // 128)]] = 12.0
        self.itm = nn.Parameter(torch.randn(c, 2, generator=g) / c**0.5)


def _synthetic_teacher_class() -> type:
    from mcad_cache.constants import ALBEF_MEAN, ALBEF_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from mcad_cache.teachers.base import BaseTeacher

    class SyntheticTeacher(BaseTeacher):
        """A cheap deterministic teacher with a real teacher's output sizes and preprocessing (for cache sizes,
        distillation and scaling, where the model's cost is not what is measured). Not a model of anything.

        image_tokens [B, 16, 64] = tanh(4x4 average-pooled pixels @ W + pos); image_emb = normalize(mean(tokens) @ P)
        [B, D]; text_emb = normalize(mean of hashed-word embeddings @ P) [B, D]; fused_cls [B, C] = LayerNorm-like
        tanh features with a few large channels; itm_logits [B, 2] = fused_cls @ W.
        """

        def __init__(self, spec_name: str, *, seed: int = 0, device: str | torch.device = "cpu") -> None:
            spec = SYNTHETIC_SPECS[spec_name]
            self.name = f"synthetic-{spec_name}"
            self.kind = spec["kind"]
            self.model = _SyntheticNet(spec["emb_dim"], spec["fused_dim"], seed).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.architecture = {"family": "benchmark-synthetic", "spec": spec_name, **spec}
            clip_like = spec["resize_mode"] == "shortest"
            self.preprocess_cfg = {
                "image_size": spec["image_size"],
                "resize_mode": spec["resize_mode"],
                "crop": "center" if clip_like else None,
                "interpolation": "bicubic",
                "mean": list(OPENAI_CLIP_MEAN if clip_like else ALBEF_MEAN),
                "std": list(OPENAI_CLIP_STD if clip_like else ALBEF_STD),
            }
            self.tokenizer_cfg = {"name": "synthetic-hashed-words", "context_length": _CONTEXT, "vocab_sha256": "0"}
            self.logit_scale = 100.0 if self.kind == "dual" else 1 / 0.07
            self.model.to(resolve_device(str(device)))

        def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
            ids = torch.zeros(len(texts), _CONTEXT, dtype=torch.long)
            for i, t in enumerate(texts):
                words = t.lower().split()[:_CONTEXT]
                ids[i, : len(words)] = torch.tensor([zlib.crc32(w.encode()) % (_VOCAB - 1) + 1 for w in words])
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

        @torch.no_grad()
        def image_tokens(self, images: Tensor) -> Tensor:
            x = F.adaptive_avg_pool2d(self._inputs(images).float(), 4).flatten(2).transpose(1, 2)
            return torch.tanh(x @ self.model.patch + self.model.pos)

        @torch.no_grad()
        def encode_image_from_tokens(self, image_tokens: Tensor) -> Tensor:
            return F.normalize(image_tokens.mean(1) @ self.model.img_proj, dim=-1)

        @torch.no_grad()
        def encode_image(self, images: Tensor) -> Tensor:
            return self.encode_image_from_tokens(self.image_tokens(images))

        def _pooled_text(self, tokens: Mapping[str, Tensor]) -> Tensor:
            ids, mask = self._tokens(tokens)
            emb = self.model.tok[ids] * mask[..., None]
            return emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

        @torch.no_grad()
        def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
            return F.normalize(self._pooled_text(tokens) @ self.model.txt_proj, dim=-1)

        @torch.no_grad()
        def itm_from_tokens(self, image_tokens: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            both = torch.cat([image_tokens.mean(1), self._pooled_text(tokens)], dim=1)
            h = both @ self.model.fuse
            fused = (h - h.mean(1, keepdim=True)) / h.std(1, keepdim=True).clamp(min=1e-6) * self.model.outlier
            return (fused @ self.model.itm).float(), fused.float()

    return SyntheticTeacher


_INSTANCES: dict[str, Any] = {}
_REGISTERED = False


def register_instance(key: str, teacher: Any) -> str:
    """Make a prebuilt teacher (or a timing proxy of one) reachable through ``create_teacher("bench-instance",
    model=key)``, so that ``pipelines.build_cache.run`` uses it without building it again. Returns the registry
    name to put in ``BuildConfig.teacher``."""
    global _REGISTERED
    from mcad_cache.teachers import register_teacher

    _INSTANCES[key] = teacher
    if not _REGISTERED:

        @register_teacher("bench-instance")
        def _builder(*, model: str, **_: Any) -> Any:
            return _INSTANCES[model]

        @register_teacher("bench-synthetic")
        def _synthetic(*, model: str, device: str = "cpu", **_: Any) -> Any:
            return _synthetic_teacher_class()(model, device=device)

        _REGISTERED = True
    return "bench-instance"


def create_synthetic_teacher(spec_name: str, *, device: str | torch.device = "cpu", seed: int = 0) -> Any:
    """A synthetic teacher (see ``SYNTHETIC_SPECS``); also registers ``bench-synthetic`` for ``BuildConfig``."""
    register_instance("_unused", None)
    return _synthetic_teacher_class()(spec_name, device=device, seed=seed)


TIMED_METHODS = (
    "tokenize",
    "encode_image",
    "encode_text",
    "image_tokens",
    "text_tokens",
    "encode_image_from_tokens",
    "encode_text_from_tokens",
    "itm_from_tokens",
    "itm_from_text_tokens",
)


class TimingProxy:
    """Wraps a teacher and adds up the wall time spent in each of its model calls (``TIMED_METHODS``); every other
    attribute is the wrapped teacher's. ``seconds[name]`` and ``calls[name]`` per method; ``items[name]`` counts the
    rows processed (batch sizes)."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self._inner = inner
        self._device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.items: dict[str, int] = {}
        for name in TIMED_METHODS:
            if hasattr(inner, name):
                setattr(self, name, self._wrap(name, getattr(inner, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self._device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1
            first = args[0] if args else None
            if isinstance(first, Mapping) and "input_ids" in first:
                n = int(first["input_ids"].shape[0])
            else:
                n = len(first) if isinstance(first, (list, Tensor)) else 0
            self.items[name] = self.items.get(name, 0) + n
            return out

        return call

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.items.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (sizes, as ``du --apparent-size``)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def random_unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """[n, d] float32 rows on the unit sphere."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ----------------------------------------------------------------------------------------------------- distill


def build_synthetic_caches(
    shards: list[str], work: Path, *, k: int, device: torch.device, workers: int, specs: Sequence[str]
) -> list[str]:
    """Build one cache per synthetic teacher spec (e.g. ``("clip-vit-b-16", "albef-base")``) over ``shards`` with the
    real build pipeline; a complete cache with the same fingerprint is reused. Returns the cache paths."""
    from mcad_cache.config import BuildConfig
    from mcad_cache.pipelines.build_cache import run as build_run

    create_synthetic_teacher(specs[0])  # registers bench-synthetic
    paths = []
    for spec in specs:
        out = work / f"cache-{spec}-k{k}"
        cfg = BuildConfig(teacher="bench-synthetic", model=spec, data=tuple(shards), out=str(out), k=k,
                          batch_size=64, workers=workers, device=str(device), overwrite=True)  # fmt: skip
        build_run(cfg)
        paths.append(str(out))
    return paths


class TimedCall:
    """Wraps a callable (e.g. ``targets.CandidateImages``) and adds up the seconds spent in it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.items = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.items += len(args[0]) if args and isinstance(args[0], list) else 0
        return out


class DistillSetup:
    """A distillation run wired by ``mcad_cache.distill.create_distill`` (the pipeline's own factory), plus a second,
    contrastive loss module and optimiser on the same student for the comparison steps."""

    def __init__(
        self,
        *,
        shards: list[str],
        cache_paths: Sequence[str],
        student: str,
        batch_size: int,
        k: int,
        workers: int,
        device: torch.device,
        seed: int = 0,
        preset_name: str = "",
        candidates: str = "online",
    ) -> None:
        from mcad_cache.config import DistillConfig
        from mcad_cache.distill import create_distill, create_loss_module, create_optimizer
        from mcad_cache.losses import preset
        from mcad_cache.schedules import create_warmup_cosine

        self.device, self.batch_size, self.k, self.seed = device, batch_size, k, seed
        self.candidates = candidates
        config = DistillConfig(
            cache=tuple(cache_paths), data=tuple(shards), student=student, preset=preset_name or mcad_preset(), k=k,
            batch_size=batch_size, steps=10_000, lr=1e-5, weight_decay=0.05, warmup_steps=0, workers=workers,
            device=str(device), seed=seed, shuffle_buffer=256, candidates=candidates,
            threads=torch.get_num_threads(),  # keep the benchmark's --threads (the factory would pick its own)
        )  # fmt: skip
        self.run = create_distill(config, wrap_candidate_images=TimedCall)
        self.clip, self.single, self.model = self.run.clip, self.run.single, self.run.model
        self.num_params = int(sum(p.numel() for p in self.model.parameters()))
        self.mcad_config = self.run.loss_config
        self.mcad_loss, self.opt_mcad, self.sched_mcad = self.run.loss_module, self.run.optimizer, self.run.scheduler
        self.con_loss = create_loss_module(preset("contrastive"), model=self.model, clip=self.clip, single=self.single)
        self.opt_con = create_optimizer([self.model, self.con_loss], lr=1e-5, weight_decay=0.05)
        self.sched_con = create_warmup_cosine(self.opt_con, warmup_steps=0, total_steps=10_000)
        self.candidate_images = self.run.joiner.candidate_images
        self.joiner, self.stream = self.run.joiner, self.run.stream

    def raw_batches(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` collated stream batches of epoch 0 (``n`` <= batches per epoch)."""
        out = []
        for raw in self.stream(0):
            out.append(raw)
            if len(out) == n:
                break
        if len(out) < n:
            raise ValueError(f"the data gives only {len(out)} batch(es) of {self.batch_size}; need {n}")
        return out

    def join(self, raw: Mapping[str, Any], step: int) -> Any:
        return self.run.join(dict(raw), step)

    def step(self, batch: Any, *, which: str, step: int) -> dict[str, float]:
        """One optimiser step with the MCAD (``which="mcad"``) or contrastive loss module on a ``DistillBatch``."""
        from mcad_cache.distill import train_step

        loss, opt, sched = (
            (self.mcad_loss, self.opt_mcad, self.sched_mcad)
            if which == "mcad"
            else (self.con_loss, self.opt_con, self.sched_con)
        )
        out = train_step(self.model, loss, batch, forward=self.run.forward, optimizer=opt, scheduler=sched, step=step,
                         keys=batch.keys, grad_clip=1.0, device=self.device, precision="auto")  # fmt: skip
        sync(self.device)
        return out


def mcad_preset() -> str:
    """The full MCAD preset that trains from the teacher caches themselves: ``mcad-online`` where the ``mcad`` preset
    reads fixed targets from a derived cache (issue 10), else ``mcad``. Its step costs what the derived preset's does
    or more (it also trains the integration module)."""
    from mcad_cache.losses import PRESETS

    return "mcad-online" if "mcad-online" in PRESETS else "mcad"


def anchors_only(batch: Any) -> Any:
    """The same anchors (B images, B captions) without candidates or teacher targets: a plain contrastive batch."""
    from mcad_cache.distill import DistillBatch
    from mcad_cache.losses import TeacherTargets

    b = batch.num_pairs
    return DistillBatch(keys=batch.keys, images=batch.images, texts=batch.texts[:b], extra_images=None,
                        topk_text_index=None, topk_image_index=None, targets=TeacherTargets())  # fmt: skip


def batch_counts(batch: Any, *, candidates: str = "online") -> dict[str, int]:
    """Sizes of a ``DistillBatch``: anchors, distinct images / captions the step involves (what an online teacher
    encodes: anchors and candidates), those the student encodes (``candidates="bank"``: the anchors only), valid
    top-k pairs."""
    t = batch.targets
    b = batch.num_pairs
    extra = 0 if batch.extra_images is None else int(batch.extra_images.shape[0])
    if batch.topk_image_rows is not None:
        rows = batch.topk_image_rows[batch.topk_image_rows >= 0].tolist()
        involved_images = b + len(set(rows) - set(batch.anchor_image_rows.tolist()))
    else:
        involved_images = b + extra
    pairs_i2t = int(t.valid_i2t.sum()) if t.valid_i2t is not None else 0
    pairs_t2i = int(t.valid_t2i.sum()) if t.valid_t2i is not None else 0
    bank = candidates == "bank"
    return {
        "anchors": b,
        "images": involved_images,
        "texts": len(batch.texts),
        "student_images": b if bank else b + extra,
        "student_texts": b if bank else len(batch.texts),
        "candidate_images_fetched": extra,
        "pairs_i2t": pairs_i2t,
        "pairs_t2i": pairs_t2i,
    }
