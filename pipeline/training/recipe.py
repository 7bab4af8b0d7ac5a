"""Training on a folder-per-category photo set, into a calibrated invsort model file with a review threshold.

One call of :func:`train` does what a catalogue team needs, in this order:

1. **Check and split** the photo set with :mod:`pipeline.training.dataprep`: bad files are excluded with their reason,
   exact and near duplicates stay inside one split, a seeded stratified train / val / test split is written as a
   manifest next to the model (``<model>.split.csv``).
2. **Decode once** with the worker's own :func:`pipeline.io.images.decode_image` at the model's input size (so
   training, evaluation and sorting see the same pixels), kept in memory as uint8 ``(N, H, W, C)``.
3. **Train**: the :func:`pipeline.training.transforms.train_preset` augmentation per image (DataLoader worker processes
   above 4 cores), optional mixup/cutmix, AdamW with linear warm-up then cosine decay (Loshchilov & Hutter
   2017), label smoothing (Szegedy et al. 2016), class weights or a balanced sampler for imbalanced sets,
   gradient clipping, AMP on CUDA, early stopping when validation stops improving, best (by validation
   accuracy) and last checkpoints in ``<model>.ckpt/`` (``--resume``).
4. **Calibrate**: temperature scaling on the validation split, then the review threshold for a target precision
   (:mod:`pipeline.evaluation.calibration`); both go into the model file and the worker obeys them.
5. **Score** the held-out test split, and write the model file and its model card (``<model>.card.md``).

Runs are repeatable on the CPU for a given seed and thread count: the split, the sampling order, every random
augmentation and dropout are drawn from seeded generators, and a resumed run continues with the saved state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.errors import ConfigError, ModelFileError, SourceError
from pipeline.io.files import atomic_path, sha256_file
from pipeline.io.folders import load_images
from pipeline.io.images import MIN_SIDE_PX, to_model_input
from pipeline.models.modelfile import ModelFile, save_model_file
from pipeline.models.registry import arch_spec, create_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "invsort-checkpoint/1"
BALANCE_MODES = ("auto", "none", "weights", "sampler")


@dataclass
class TrainConfig:
    """A training recipe. Sizes in pixels ``(H, W)``; ``lr`` is AdamW's peak learning rate.

    ``None`` for ``image_size`` means the architecture's default input size. The presets of :data:`PRESETS`
    fill in everything a user does not set (see :func:`resolve_recipe`).
    """

    arch: str = "mobilenet_v2"
    weights: str | None = None  # ImageNet weights: local .pth or s3:// URI
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    image_size: tuple[int, int] | None = None
    in_chans: int = 3
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # ignored when the tree has its own test/ folder
    seed: int = 0
    policy: str = "none"  # trivialaugment | randaugment | none (automatic augmentation on top of crop/flip/jitter)
    hflip: bool = True
    crop_scale: float = 0.6  # RandomResizedCrop's smallest area fraction
    color_jitter: float = 0.2
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    balance: str = "auto"  # auto | none | weights | sampler
    patience: int = 3  # early stopping: epochs without a better validation loss; 0 = off
    clip_grad_norm: float = 2.0
    target_precision: float = 0.995
    threshold_confidence: float = 0.9  # the review threshold's precision bound holds at this level (calibration)
    near_dup_distance: int | None = None  # None: pipeline.training.dataprep's default
    threads: int = 0  # torch intra-op threads; 0 = all cores
    loader_workers: int = -1  # augmentation processes; -1 = none up to 4 cores (measured: on 2 cores one worker
    # process next to torch's 2 threads made training 5x slower), else cores // 4
    device: str = "auto"
    amp: bool = True  # mixed precision for the training steps: on CUDA bf16 where supported, else fp16 + GradScaler;
    # on a CPU with native bf16 (cpu_has_native_bf16) bf16 autocast. Validation, calibration and test stay float32.
    freeze_backbone: bool = False  # train the classifier only (a linear probe)

    def validate(self) -> None:
        """Raises ConfigError naming the first bad value and its valid range."""
        checks = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 2, ">= 2 (BatchNorm needs two images)"),
            ("lr", self.lr > 0, "> 0"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("test_fraction", 0 <= self.test_fraction < 1, "in [0, 1)"),
            ("crop_scale", 0 < self.crop_scale <= 1, "in (0, 1]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("patience", self.patience >= 0, ">= 0"),
            ("target_precision", 0 < self.target_precision <= 1, "in (0, 1]"),
            ("threshold_confidence", 0.5 <= self.threshold_confidence < 1, "in [0.5, 1)"),
            ("balance", self.balance in BALANCE_MODES, f"one of {', '.join(BALANCE_MODES)}"),
            ("in_chans", self.in_chans in (1, 3), "1 or 3"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ConfigError(f"training setting {name} must be {valid}, got {getattr(self, name)!r}")
        arch_spec(self.arch)


#: Recipes for ``invsort train DIR --out M`` with no flags. ``small``: low-resolution grayscale sets such as
#: Fashion-MNIST (the custom CNN from scratch). ``photo``: product photos (MobileNetV2 fine-tuned from ImageNet
#: weights when given, at the photos' own size).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(arch="invsort_cnn", epochs=15, batch_size=128, lr=3e-3, weight_decay=0.05, warmup_epochs=1.0,
                  label_smoothing=0.1, policy="none", hflip=True, crop_scale=0.8, color_jitter=0.0, patience=4),
    "photo": dict(arch="mobilenet_v2", epochs=8, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5,
                  label_smoothing=0.1, policy="none", hflip=True, crop_scale=0.6, color_jitter=0.2, patience=3),
}


def choose_preset(sizes: Sequence[tuple[int, int]]) -> str:
    """``"small"`` when the median photo's longer side is at most 64 px, else ``"photo"``.

    Args:
        sizes: ``(width, height)`` in px of the good images (from the data check).
    """
    if not sizes:
        return "photo"
    longer = np.median([max(w, h) for w, h in sizes])
    return "small" if longer <= 64 else "photo"


def photo_input_size(sizes: Sequence[tuple[int, int]], arch: str) -> tuple[int, int]:
    """Input ``(H, W)`` for a photo set: the median photo size, its shorter side brought into [96, 224] px.

    Catalogue photo sets are usually one size; training at that size (rather than 224x224) keeps the aspect
    ratio and costs a fraction of the compute. Architectures whose default is not 224 (inception_v3: 299) keep
    their default.
    """
    default = arch_spec(arch).input_size
    if not sizes or default != (224, 224):
        return default
    w = float(np.median([s[0] for s in sizes]))
    h = float(np.median([s[1] for s in sizes]))
    short = min(h, w)
    scale = min(max(short, 96.0), 224.0) / short
    return int(round(h * scale / 2) * 2), int(round(w * scale / 2) * 2)


def resolve_recipe(cfg_overrides: dict[str, Any], sizes: Sequence[tuple[int, int]], gray: bool) -> TrainConfig:
    """The recipe for a data set: the preset its photos call for, then the user's ``cfg_overrides`` on top.

    Args:
        cfg_overrides: TrainConfig field → value, only for what the user set.
        sizes: ``(width, height)`` px of the photos.
        gray: whether the photos are grayscale (used by the ``small`` preset: 1-channel input).

    Raises:
        ConfigError: an unknown field or a bad value.
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(cfg_overrides) - known)
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    preset = choose_preset(sizes)
    if "arch" in cfg_overrides:  # an explicit architecture picks the preset of its kind
        preset = "small" if cfg_overrides["arch"] == "invsort_cnn" else "photo"
    values: dict[str, Any] = {**PRESETS[preset], "in_chans": 1 if preset == "small" and gray else 3}
    values.update(cfg_overrides)
    if values.get("image_size") is None:
        values["image_size"] = (
            photo_input_size(sizes, values["arch"]) if preset == "photo" else arch_spec(values["arch"]).input_size
        )
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 (Loshchilov & Hutter, SGDR)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (K * n_c)`` per class, the "balanced" heuristic of King & Zeng 2001 (scikit-learn's ``balanced``).

    Returns ``(K,)`` float32; a class without samples gets weight 0.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, *, batch_size: int = 256,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits ``(N, num_classes)`` float32 on the CPU for uint8 ``(N, H, W, C)`` images (model put in eval mode).

    ``mean`` and ``std`` are ``(1, C, 1, 1)`` float32 in 0..1 units; the normalisation is the worker's
    :func:`pipeline.io.images.to_model_input`.
    """
    device = device or torch.device("cpu")
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[i : i + batch_size]).to(device)
        x = to_model_input(batch, mean.to(device), std.to(device))
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class _Augmented(torch.utils.data.Dataset):
    """In-memory uint8 ``(N, H, W, C)`` images → ``(train_preset(image), label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return self.transform(img), int(self.labels[i])


def _loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)


def epoch_order(labels: np.ndarray, *, sampler: bool, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a seeded permutation, or with ``sampler`` a class-balanced draw with
    replacement (every class equally likely, ``N`` draws). Depends only on ``(seed, epoch)``, so a resumed run
    sees the same order."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if not sampler:
        return torch.randperm(len(labels), generator=gen).tolist()
    counts = np.bincount(labels)
    w = torch.tensor(1.0 / counts[labels], dtype=torch.float64)
    return torch.multinomial(w, len(labels), replacement=True, generator=gen).tolist()


def train_one_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, batches, *, step: int, total_steps: int, warmup_steps: int,
    cfg: TrainConfig, loss_weight: torch.Tensor | None, mixing: Callable | None, device: torch.device,
    scaler: torch.amp.GradScaler | None, amp_dtype: torch.dtype | None, desc: str, progress: bool,
) -> tuple[dict[str, float], int]:
    """One pass over ``batches`` of ``(x (N, C, H, W) float32, y (N,) int64)``.

    Returns ``({"train_loss", "train_acc", "lr", "images_per_s", "seconds"}, the next global step)``.
    Training accuracy is against the hard labels (with mixup/cutmix, against the dominant one).
    """
    model.train()
    if cfg.freeze_backbone:  # frozen BatchNorm layers keep their ImageNet statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad:
                m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    lr = cfg.lr
    for x, y in bar:
        if len(y) < 2:
            continue  # BatchNorm needs two samples
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        target = y
        if mixing is not None:
            x, target = mixing(x, y)
        lr = lr_at(step, total_steps, warmup_steps, cfg.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), target, weight=loss_weight, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            opt.step()
        step += 1
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.1e}")
    seconds = time.perf_counter() - t0
    return ({"train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen), "lr": lr,
             "images_per_s": seen / seconds if seconds else 0.0, "seconds": seconds}, step)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``).

    Read from ``/proc/cpuinfo`` (Linux); False elsewhere. Without it oneDNN emulates bf16 and autocast is
    slower than float32, so training uses bf16 autocast on the CPU only when this is True. Measured on a
    2-core AMD EPYC (Zen 4, ``avx512_bf16``), a training step (forward + backward + AdamW) ran at 1.8-2.2x
    the float32 speed for the custom CNN at 28x28 (batch 128) and 1.4x for mobilenet_v2 at 136x102 (batch 64).
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.partition(":")[2].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def track_validation(history: Sequence[dict]) -> tuple[dict[str, Any], bool, int]:
    """The best epoch, whether the last epoch is it, and the epochs since validation last improved.

    Best: highest validation accuracy, ties broken by lower validation loss (training figures when there is no
    validation split). Early stopping counts the epochs in which *neither* the validation loss nor the accuracy
    reached a new best: with label smoothing, the unsmoothed validation loss can rise for an epoch or two while
    the accuracy still climbs (measured on footwear, mobilenet_v2, epochs 3-4).
    """
    best: dict[str, Any] = {"epoch": 0, "val_acc": -math.inf, "val_loss": math.inf}
    low_loss, high_acc, bad = math.inf, -math.inf, 0
    improved = False
    for row in history:
        acc = row.get("val_acc", row.get("train_acc", 0.0))
        loss = row.get("val_loss", row.get("train_loss", math.inf))
        improved = (acc, -loss) > (best["val_acc"], -best["val_loss"])
        if improved:
            best = {"epoch": row["epoch"], "val_acc": acc, "val_loss": loss}
        bad = 0 if (loss < low_loss or acc > high_acc) else bad + 1
        low_loss, high_acc = min(low_loss, loss), max(high_acc, acc)
    return best, improved, bad


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def checkpoint_dir(out: str | Path) -> Path:
    """Where :func:`train` keeps ``last.pt`` and ``best.pt`` for the model file ``out``: ``<out>.ckpt/``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def split_manifest_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".split.csv")


def model_card_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".card.md")


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: no checkpoint there.
        ModelFileError: the file is not an invsort training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} (train once without --resume first)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a training checkpoint ({type(exc).__name__}: {exc})"[:400]) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path} is not an invsort training checkpoint")
    return ck


def _device(name: str) -> torch.device:
    from pipeline.inference.predictor import resolve_device

    return resolve_device(name)


def _is_gray(paths: Sequence[str], limit: int = 32) -> bool:
    """Whether a sample of the photos has R == G == B everywhere (grayscale files or gray RGB)."""
    import cv2

    for p in list(paths)[:limit]:
        img = cv2.imread(p, cv2.IMREAD_UNCHANGED)
        if img is None:
            continue
        color = img.ndim == 3 and img.shape[2] >= 3
        if color and not (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])):
            return False
    return True


def _sha256_file(path: Path) -> str:
    return sha256_file(path)


def train(
    data_dir: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
) -> ModelFile:
    """Check, split, train, calibrate and score a model on ``data_dir``; write the model file ``out``.

    Args:
        data_dir: one sub-folder per category (``DIR/<Class>/*.jpg``), or ``DIR/train/<Class>`` +
            ``DIR/test/<Class>`` (the given test split is kept as the test split).
        out: the model file to write. Next to it: ``<stem>.split.csv`` (the split manifest),
            ``<stem>.card.md`` (the model card) and ``<out>.ckpt/{last,best}.pt`` (checkpoints).
        cfg: a full recipe. When None, the recipe is :func:`resolve_recipe` of the data with ``overrides``.
        overrides: TrainConfig fields the user set (only used when ``cfg`` is None).
        resume: continue from ``<out>.ckpt/last.pt`` with its recipe and split (the other arguments must
            name the same data and model file).
        progress: progress bars on stderr.
        log_fn: receives one line per step and per epoch (loss, accuracy, learning rate, images/s).

    Returns:
        The saved :class:`ModelFile`. ``info`` holds the recipe, the data summary (class counts, excluded
        files and why, duplicate groups, split manifest and its SHA-256), the per-epoch history, calibration
        (temperature, validation ECE before and after), the review threshold with its validation precision and
        coverage, and the test split's metrics.

    Raises:
        SourceError: the folder is missing or has fewer than two categories.
        ConfigError: a bad recipe value (the message names it and its valid range).
        FileNotFoundError, ModelFileError: ``resume`` without a usable checkpoint.
    """
    from pipeline.evaluation.calibration import choose_threshold, fit_temperature, selective_scores
    from pipeline.evaluation.report import compute_metrics, expected_calibration_error
    from pipeline.training.dataprep import check_dataset, grouped_split, read_split_manifest, write_split_manifest
    from pipeline.training.transforms import batch_mixing, train_preset

    t_start = time.perf_counter()
    out = Path(out)
    ckdir = checkpoint_dir(out)
    manifest = split_manifest_path(out)
    ck: dict | None = None
    if resume:
        ck = load_checkpoint(ckdir / "last.pt")
        saved = dict(ck["config"])
        saved["image_size"] = tuple(saved["image_size"])
        cfg = TrainConfig(**saved)
        data_summary = dict(ck["data"])
        if not manifest.is_file() or _sha256_file(manifest) != data_summary["split_sha256"]:
            raise ModelFileError(f"{manifest} is missing or changed since the checkpoint; cannot resume")
        split = read_split_manifest(manifest)
        class_names = list(ck["class_names"])
        log_fn(f"resuming from {ckdir / 'last.pt'} after epoch {ck['epoch']}/{cfg.epochs}")
    else:
        if cfg is not None:
            cfg.validate()
        nd = {} if cfg is None or cfg.near_dup_distance is None else {"near_dup_distance": cfg.near_dup_distance}
        if cfg is None and (overrides or {}).get("near_dup_distance") is not None:
            nd = {"near_dup_distance": overrides["near_dup_distance"]}
        t0 = time.perf_counter()
        report = check_dataset(data_dir, min_side_px=MIN_SIDE_PX, **nd)  # the worker's own minimum
        class_names = list(report.class_names)
        if cfg is None:
            cfg = resolve_recipe(overrides or {}, [r.size for r in report.images],
                                 _is_gray([r.path for r in report.images]))
        split = grouped_split(report, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                              seed=cfg.seed)
        split_sha = write_split_manifest(split, manifest, hashes={r.path: r.sha256 for r in report.images})
        log_fn(
            f"data: {len(report.images)} good images in {len(class_names)} classes "
            f"({', '.join(f'{k} {v}' for k, v in report.class_counts.items())}), imbalance "
            f"{report.imbalance:.2f}x; excluded {len(report.bad_files)} bad files; "
            f"{len(report.exact_duplicates)} exact and {len(report.near_duplicates)} near-duplicate groups kept "
            f"inside one split; {len(report.conflicts)} duplicate groups span categories "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        for path, reason in report.bad_files[:20]:
            log_fn(f"  excluded {path}: {reason}")
        data_summary = {
            "root": str(data_dir),
            "class_counts": dict(report.class_counts),
            "split_class_counts": {s: dict(Counter(c for _, c in v)) for s, v in split.items()},
            "imbalance": report.imbalance if math.isfinite(report.imbalance) else None,
            "excluded": [[p, r] for p, r in report.bad_files[:1000]],
            "excluded_count": len(report.bad_files),
            "exact_duplicate_groups": len(report.exact_duplicates),
            "near_duplicate_groups": len(report.near_duplicates),
            "conflict_groups": len(report.conflicts),
            "split_manifest": manifest.name,
            "split_sha256": split_sha,
        }
    assert cfg is not None
    log_fn(f"split: train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])} "
           f"(manifest {manifest})")
    log_fn("recipe: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    if not split["train"]:
        raise SourceError(f"no training images left in {data_dir} after the check")

    spec = arch_spec(cfg.arch)
    size = tuple(cfg.image_size or spec.input_size)
    mean_t = spec.mean if cfg.in_chans == len(spec.mean) else (spec.mean[0],) * cfg.in_chans
    std_t = spec.std if cfg.in_chans == len(spec.std) else (spec.std[0],) * cfg.in_chans
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = _device(cfg.device)

    t0 = time.perf_counter()
    index = {c: i for i, c in enumerate(class_names)}
    data = {s: load_images([(p, index[c]) for p, c in split[s]], size=size, in_chans=cfg.in_chans,
                           progress=progress, desc=f"decode {s}") for s in ("train", "val", "test")}
    for s, arr in data.items():
        for p, r in arr.failed:
            log_fn(f"  {s}: could not decode {p}: {r}")
    log_fn(f"decoded {sum(len(a.labels) for a in data.values())} images at {size[0]}x{size[1]} "
           f"({time.perf_counter() - t0:.0f} s)")
    tr, va, te = data["train"], data["val"], data["test"]

    model = create_model(cfg.arch, num_classes=len(class_names), in_chans=cfg.in_chans,
                         weights=None if ck else cfg.weights)
    if cfg.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(spec.classifier_prefixes))
    model = model.to(device, memory_format=torch.channels_last)
    mean = torch.tensor(mean_t, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std_t, dtype=torch.float32).view(1, -1, 1, 1)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    amp_dtype = None
    scaler = None
    if device.type == "cuda" and cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    elif device.type == "cpu" and cfg.amp and cpu_has_native_bf16():
        amp_dtype = torch.bfloat16
    step_dtype = "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")

    counts = np.bincount(tr.labels, minlength=len(class_names))
    imbalance = counts.max() / max(1, counts.min())
    balance = cfg.balance if cfg.balance != "auto" else ("weights" if imbalance > 1.5 else "none")
    loss_weight = class_weights(tr.labels, len(class_names)).to(device) if balance == "weights" else None
    transform = train_preset(size, mean_t, std_t, in_chans=cfg.in_chans, policy=cfg.policy, hflip=cfg.hflip,
                             scale=(cfg.crop_scale, 1.0), color_jitter=cfg.color_jitter)
    mixing = batch_mixing(len(class_names), mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha)
    dataset = _Augmented(tr.images, tr.labels, transform)
    cpus = os.cpu_count() or 1
    workers = cfg.loader_workers if cfg.loader_workers >= 0 else (0 if cpus <= 4 else min(8, cpus // 4))

    steps_per_epoch = math.ceil(len(tr.labels) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    history: list[dict] = []
    best: dict[str, Any] = {"val_loss": math.inf, "epoch": 0}
    bad_epochs, step, first_epoch = 0, 0, 1
    ckdir.mkdir(parents=True, exist_ok=True)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["torch_rng"])
        history, step = list(ck["history"]), int(ck["step"])
        best, _, bad_epochs = track_validation(history)
        if best["epoch"] == int(ck["epoch"]):  # checkpoints of an older rule: the best is the last epoch's model
            _save_atomic({"format": CHECKPOINT_FORMAT, "epoch": best["epoch"], "model": ck["model"]}, ckdir / "best.pt")
        first_epoch = int(ck["epoch"]) + 1
    cfg_dict = asdict(cfg)
    cfg_dict["image_size"] = list(size)
    log_fn(f"training {cfg.arch} on {device.type}: {len(tr.labels)} images, {steps_per_epoch} steps/epoch, "
           f"balance={balance}, augmentation={cfg.policy}, {workers} loader worker(s), "
           f"{step_dtype}{'' if amp_dtype is None else ' autocast'} steps")

    stopped_early = bool(ck and ck.get("stopped_early"))
    for epoch in range(first_epoch, cfg.epochs + 1):
        if stopped_early:
            break
        order = epoch_order(tr.labels, sampler=balance == "sampler", seed=cfg.seed, epoch=epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=order, num_workers=workers,
            worker_init_fn=_loader_worker_init if workers else None,
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        )
        row, step = train_one_epoch(
            model, opt, loader, step=step, total_steps=total_steps, warmup_steps=warmup_steps, cfg=cfg,
            loss_weight=loss_weight, mixing=mixing, device=device, scaler=scaler, amp_dtype=amp_dtype,
            desc=f"epoch {epoch}/{cfg.epochs}", progress=progress,
        )
        row = {"epoch": epoch, **row}
        if len(va.labels):
            logits = predict_logits(model, va.images, mean, std, device=device)
            yv = torch.from_numpy(va.labels)
            row["val_loss"] = F.cross_entropy(logits, yv).item()
            row["val_acc"] = (logits.argmax(1) == yv).float().mean().item()
        history.append(row)
        best, improved, bad_epochs = track_validation(history)
        stopped_early = bool(cfg.patience and bad_epochs >= cfg.patience and epoch < cfg.epochs)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ckpt = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "config": cfg_dict, "class_names": class_names,
            "data": data_summary, "model": state, "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "torch_rng": torch.get_rng_state(),
            "history": history, "stopped_early": stopped_early,
        }
        if improved:
            _save_atomic({"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": state}, ckdir / "best.pt")
        _save_atomic(ckpt, ckdir / "last.pt")
        log_fn(
            f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if "val_acc" in row else "")
            + f" | lr {row['lr']:.2e} | {row['images_per_s']:.0f} img/s | {row['seconds']:.0f} s"
            + (" | best" if improved else "")
        )
        if stopped_early:
            log_fn(f"early stop: neither validation loss nor accuracy improved for {bad_epochs} epochs "
                   f"(best: epoch {best['epoch']})")

    best_state = load_checkpoint(ckdir / "best.pt")["model"]
    model.load_state_dict(best_state)

    # calibration and the review threshold, on the validation split
    calibration: dict[str, Any] = {"temperature": 1.0}
    threshold_info: dict[str, Any] = {"threshold": 0.0, "met": False, "reason": "no validation split"}
    if len(va.labels):
        logits = predict_logits(model, va.images, mean, std, device=device)
        yv = torch.from_numpy(va.labels)
        temperature = fit_temperature(logits, yv)
        p_raw = F.softmax(logits, 1).numpy()
        p_cal = F.softmax(logits / temperature, 1).numpy()
        ok = p_cal.argmax(1) == va.labels
        ece_raw, _ = expected_calibration_error(p_raw.max(1), ok)
        ece_cal, _ = expected_calibration_error(p_cal.max(1), ok)
        calibration = {"temperature": temperature, "val_ece_before": ece_raw, "val_ece_after": ece_cal,
                       "val_nll_before": F.cross_entropy(logits, yv).item(),
                       "val_nll_after": F.cross_entropy(logits / temperature, yv).item()}
        choice = choose_threshold(p_cal.max(1), ok, cfg.target_precision, confidence_level=cfg.threshold_confidence)
        threshold_info = choice.to_dict()
        log_fn(f"calibration: temperature {temperature:.3f}, validation ECE {ece_raw:.4f} -> {ece_cal:.4f}")
        if choice.met:
            log_fn(f"review threshold {choice.threshold:.4f}: validation precision {choice.precision:.4f} "
                   f"({cfg.threshold_confidence:g} lower bound {choice.precision_bound:.4f}) on the "
                   f"{choice.coverage:.1%} of rows it sorts (target {cfg.target_precision})")
        else:
            log_fn(f"no threshold reaches precision {cfg.target_precision} on validation (lower bound at "
                   f"{cfg.threshold_confidence:g}): every row goes to review unless the model improves (more data, "
                   "more epochs, a larger validation split) or the target or --threshold-confidence is lowered")

    info: dict[str, Any] = {
        "recipe": cfg_dict, "data": data_summary, "class_counts": data_summary["class_counts"],
        "skipped": data_summary["excluded"], "history": history, "best_epoch": best["epoch"],
        "best_val_acc": best.get("val_acc"), "best_val_loss": best["val_loss"], "stopped_early": stopped_early,
        "calibration": calibration, "threshold": threshold_info, "balance": balance,
        "step_dtype": step_dtype,
    }
    mf = ModelFile(arch=cfg.arch, class_names=class_names, in_chans=cfg.in_chans,
                   input_size=size,  # type: ignore[arg-type]
                   mean=tuple(mean_t), std=tuple(std_t), state_dict=best_state,
                   temperature=float(calibration["temperature"]),
                   review_threshold=float(threshold_info["threshold"]), info=info,
                   created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    if len(te.labels):
        probs = F.softmax(predict_logits(model, te.images, mean, std, device=device) / mf.temperature, 1).numpy()
        metrics = compute_metrics(te.labels, probs.argmax(1), probs, class_names)
        metrics.pop("reliability", None)
        metrics["at_threshold"] = selective_scores(probs, te.labels, mf.review_threshold)
        info["test"] = metrics
        sel = metrics["at_threshold"]
        log_fn(f"test ({metrics['n']} images never used for training or choices): top-1 {metrics['accuracy']:.4f}, "
               f"macro F1 {metrics['macro_avg']['f1']:.4f}, ECE {metrics['ece']:.4f}; at the threshold: precision "
               f"{sel['precision']:.4f} on {sel['coverage']:.1%} sorted, {sel['needs_review']} to review")
    info["train_seconds"] = time.perf_counter() - t_start
    version = save_model_file(mf, out)
    from pipeline.models.modelcard import write_model_card

    write_model_card(mf, model_card_path(out))
    log_fn(f"saved {out} (version {version}), model card {model_card_path(out)}; "
           f"{info['train_seconds']:.0f} s in all")
    return mf
