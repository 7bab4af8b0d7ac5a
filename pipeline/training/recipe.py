"""Training on a folder-per-category photo set, into a calibrated invsort model file with a review threshold.

One call of :func:`train` does what a catalogue team needs, in this order:

1. **Check and split** the photo set with :mod:`pipeline.training.dataprep`: bad files are excluded with their reason,
   exact and near duplicates stay inside one split, a seeded stratified train / val / test split is written as a
   manifest next to the model (``<model>.split.csv``).
2. **Decode once** with :func:`pipeline.io.folders.load_images` (the worker's own
   :func:`pipeline.io.images.decode_image`) at the model's input size (so training, evaluation and sorting see the
   same pixels), kept in memory as uint8 ``(N, H, W, C)``.
3. **Train**: the :func:`pipeline.training.transforms.train_preset` augmentation per image (DataLoader worker processes
   above 4 cores), optional mixup/cutmix, AdamW with linear warm-up then cosine decay (Loshchilov & Hutter
   2017), label smoothing (Szegedy et al. 2016), class weights or a balanced sampler for imbalanced sets,
   gradient clipping, AMP on CUDA, early stopping when validation stops improving, best (by validation
   accuracy) and last checkpoints in ``<model>.ckpt/`` (``--resume``).
4. **Calibrate**: temperature scaling on the validation split, then the review threshold for a target precision
   (:mod:`pipeline.evaluation.calibration`); both go into the model file and the worker obeys them.
5. **Open set**: the "none of my categories" score (:mod:`pipeline.models.openset`), fitted on the training split's
   features, its threshold chosen for ``open_set_tpr`` of the validation split; rows it rejects go to review.
6. **Score** the held-out test split, and write the model file and its model card (``<model>.card.md``).

:func:`train` is a short recipe over these named steps (:func:`check_and_split` or :func:`from_checkpoint`,
:func:`resolve_recipe`, :func:`load_split_images`, :func:`build_model`, :func:`fit_model`, :func:`calibrate`,
:func:`fit_open_set_step`, :func:`score_test_split`); the epoch loop, the learning-rate schedule and early stopping are
:mod:`pipeline.training.loop`, checkpoints and the files beside the model :mod:`pipeline.training.checkpoints`.

Runs are repeatable on the CPU for a given seed and thread count: the split, the sampling order, every random
augmentation and dropout are drawn from seeded generators, and a resumed run continues with the saved state.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
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

from pipeline.errors import ConfigError, ImageError, ModelFileError, SourceError
from pipeline.evaluation.calibration import choose_threshold, fit_temperature, selective_scores
from pipeline.evaluation.metrics import compute_metrics, expected_calibration_error
from pipeline.evaluation.shift_calibration import choose_shift_threshold, describe, shifted_rows
from pipeline.inference.predictor import resolve_device
from pipeline.io.files import sha256_file
from pipeline.io.folders import Arrays, load_images, read_image
from pipeline.io.images import MIN_SIDE_PX
from pipeline.models.meta import ATTRIBUTE_NAME, CATEGORY
from pipeline.models.modelcard import write_model_card
from pipeline.models.modelfile import ModelFile, save_model_file
from pipeline.models.openset import OpenSet, fit_open_set
from pipeline.models.registry import arch_spec, create_model
from pipeline.models.runtimes import export_beside
from pipeline.settings import usable_cpus
from pipeline.training.checkpoints import checkpoint_dir, load_checkpoint, model_card_path, split_manifest_path
from pipeline.training.dataprep import (
    DatasetReport,
    check_dataset,
    grouped_split,
    read_split_manifest,
    write_split_manifest,
)
from pipeline.training.loop import (
    AugmentedImages,
    FitPlan,
    FitState,
    StepRecipe,
    class_weights,
    fit,
    mixed_precision,
    param_groups,
    predict_logits,
    resume_state,
    track_validation,
)
from pipeline.training.transforms import batch_mixing, train_preset

log = logging.getLogger(__name__)

BALANCE_MODES = ("auto", "none", "weights", "sampler")

#: ``(category names, folder) -> ([(path, category, sha256)], summary)``: extra training photos, e.g.
#: :func:`pipeline.feedback.catalog_feedback` (the feedback loop).
FeedbackSource = Callable[[Sequence[str], Path], tuple[list[tuple[str, str, str]], dict[str, Any]]]


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
    backgrounds: float = 0.0  # probability of pasting the product onto a real photograph (PasteOnBackground)
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
    probe_epochs: int = 0  # LP-FT: the first epochs train the classifier only, then everything (Kumar et al. 2022)
    backbone_lr_scale: float = 1.0  # the pretrained backbone's learning rate, as a share of the classifier's
    open_set_tpr: float = 0.95  # the open-set score's threshold keeps this fraction of validation rows; 0 = no score
    shift_calibration: bool = True  # the review threshold's promise must hold on the validation photos under the
    # robustness shifts too (pooled), not only on the photos as they are (pipeline.evaluation.shift_calibration)
    init_from: str | None = None  # fine-tune from this model file's weights (path, s3:// or bundled:NAME), not
    # ImageNet's: its architecture, channels and input size; the classifier too when the categories are the same
    attribute: str = CATEGORY  # what the folder names are values of: the category, or another attribute ("toe")

    def validate(self) -> None:
        """Raises ConfigError naming the first bad value and its valid range."""
        checks = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("probe_epochs", 0 <= self.probe_epochs < max(2, self.epochs), "in [0, epochs)"),
            ("backbone_lr_scale", 0 < self.backbone_lr_scale <= 1, "in (0, 1]"),
            ("batch_size", self.batch_size >= 2, ">= 2 (BatchNorm needs two images)"),
            ("lr", self.lr > 0, "> 0"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("test_fraction", 0 <= self.test_fraction < 1, "in [0, 1)"),
            ("crop_scale", 0 < self.crop_scale <= 1, "in (0, 1]"),
            ("backgrounds", 0 <= self.backgrounds <= 1, "in [0, 1]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("patience", self.patience >= 0, ">= 0"),
            ("target_precision", 0 < self.target_precision <= 1, "in (0, 1]"),
            ("open_set_tpr", 0 <= self.open_set_tpr <= 1, "in [0, 1] (0: no open-set score)"),
            ("threshold_confidence", 0.5 <= self.threshold_confidence < 1, "in [0.5, 1)"),
            ("balance", self.balance in BALANCE_MODES, f"one of {', '.join(BALANCE_MODES)}"),
            ("in_chans", self.in_chans in (1, 3), "1 or 3"),
            ("attribute", ATTRIBUTE_NAME.fullmatch(str(self.attribute)) is not None,
             f"1..64 characters of a-z, 0-9 and _, starting with a letter ('{CATEGORY}': the item's category)"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ConfigError(f"training setting {name} must be {valid}, got {getattr(self, name)!r}")
        arch_spec(self.arch)


#: Recipes for ``invsort train DIR --out M`` with no flags. ``small``: low-resolution grayscale sets such as
#: Fashion-MNIST (the custom CNN from scratch). ``photo``: product photos (MobileNetV2 fine-tuned from ImageNet
#: weights when given, at the photos' own size; half the training photos pasted onto a real photograph, which measured
#: +3.5 points top-1 on real footwear photos and 27 -> 9 of 79 other things auto-sorted, for -1.1 on catalogue photos).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(arch="invsort_cnn", epochs=15, batch_size=128, lr=3e-3, weight_decay=0.05, warmup_epochs=1.0,
                  label_smoothing=0.1, policy="none", hflip=True, crop_scale=0.8, color_jitter=0.0, patience=4,
                  backgrounds=0.0),
    "photo": dict(arch="mobilenet_v2", epochs=8, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5,
                  label_smoothing=0.1, policy="none", hflip=True, crop_scale=0.6, color_jitter=0.2, patience=3,
                  backgrounds=0.5),
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


@dataclass
class PreparedData:
    """A run's data after the check and split, or as its checkpoint recorded them.

    Attributes:
        cfg: the full recipe.
        class_names: category names, index order.
        split: ``{"train" | "val" | "test": [(path, class)]}``.
        summary: the data summary kept in checkpoints and the model file's ``info["data"]``.
        checkpoint: ``last.pt``'s contents when resuming, else None.
    """

    cfg: TrainConfig
    class_names: list[str]
    split: dict[str, list[tuple[str, str]]]
    summary: dict[str, Any]
    checkpoint: dict | None = None


@dataclass(frozen=True)
class ModelInputs:
    """The model's input: ``size`` ``(H, W)`` px and per-channel ``mean``/``std`` in 0..1 units."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, cfg: TrainConfig) -> ModelInputs:
        """The architecture's normalisation (its first channel's for a 1-channel model) at ``cfg.image_size``."""
        spec = arch_spec(cfg.arch)
        size = tuple(cfg.image_size or spec.input_size)
        mean = spec.mean if cfg.in_chans == len(spec.mean) else (spec.mean[0],) * cfg.in_chans
        std = spec.std if cfg.in_chans == len(spec.std) else (spec.std[0],) * cfg.in_chans
        return cls((int(size[0]), int(size[1])), tuple(mean), tuple(std))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as ``(1, C, 1, 1)`` float32."""
        return (torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1),
                torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1))


def check_and_split(
    data_dir: str | Path, manifest: Path, cfg: TrainConfig | None, overrides: dict[str, Any] | None, *,
    log_fn: Callable[[str], None], progress: bool, feedback: FeedbackSource | None = None,
    feedback_dir: Path | None = None,
) -> PreparedData:
    """Step 1: check the photos (:func:`pipeline.training.dataprep.check_dataset`, the worker's minimum side),
    resolve the recipe when ``cfg`` is None, split them and write the split manifest to ``manifest``.

    With ``feedback`` (e.g. :func:`pipeline.feedback.catalog_feedback`: a catalog's human-reviewed rows), the photos
    it fetches into ``feedback_dir`` join the **training** split;
    one whose bytes equal a photo of the folder is left out (a validation or test photo would leak into the
    figures, a training photo adds nothing). The split manifest lists them, so ``--resume`` needs no database.

    Raises:
        SourceError: the folder is missing or has fewer than two categories.
        ConfigError: a bad recipe value.
        sqlalchemy.exc.OperationalError: the feedback's database did not answer.
    """
    if cfg is not None:
        cfg.validate()
    nd = {} if cfg is None or cfg.near_dup_distance is None else {"near_dup_distance": cfg.near_dup_distance}
    if cfg is None and (overrides or {}).get("near_dup_distance") is not None:
        nd = {"near_dup_distance": (overrides or {})["near_dup_distance"]}
    t0 = time.perf_counter()
    report = check_dataset(data_dir, min_side_px=MIN_SIDE_PX, progress=progress, **nd)
    if cfg is None:
        paths = [r.path for r in report.images]
        cfg = resolve_recipe(overrides or {}, [r.size for r in report.images], _is_gray(paths))
    split = grouped_split(report, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    hashes = {r.path: r.sha256 for r in report.images}
    summary_feedback = None
    if feedback is not None:
        summary_feedback = _add_feedback(feedback, report.class_names, feedback_dir or manifest.parent / "feedback",
                                         split, hashes, log_fn=log_fn)
    split_sha = write_split_manifest(split, manifest, hashes=hashes)
    log_fn(
        f"data: {len(report.images)} good images in {len(report.class_names)} classes "
        f"({', '.join(f'{k} {v}' for k, v in report.class_counts.items())}), imbalance "
        f"{report.imbalance:.2f}x; excluded {len(report.bad_files)} bad files; "
        f"{len(report.exact_duplicates)} exact and {len(report.near_duplicates)} near-duplicate groups kept "
        f"inside one split; {len(report.conflicts)} duplicate groups span categories "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    for path, reason in report.bad_files[:20]:
        log_fn(f"  excluded {path}: {reason}")
    summary = _data_summary(data_dir, report, split, manifest, split_sha)
    if summary_feedback is not None:
        summary["feedback"] = summary_feedback
    return PreparedData(cfg, list(report.class_names), split, summary)


def _add_feedback(
    feedback: FeedbackSource, class_names: Sequence[str], dest: Path, split: dict[str, list[tuple[str, str]]],
    hashes: dict[str, str], *, log_fn: Callable[[str], None],
) -> dict[str, Any]:
    """Append the feedback photos to ``split["train"]`` (and their hashes to ``hashes``), leaving out those whose
    bytes are already in the folder; returns the feedback summary for ``info["data"]``."""
    photos, summary = feedback(class_names, dest)
    known = set(hashes.values())
    added = 0
    for path, category, sha in photos:
        if sha in known:
            summary["duplicates"] = summary.get("duplicates", 0) + 1
            continue
        split["train"].append((path, category))
        hashes[path] = sha
        added += 1
    split["train"].sort()
    log_fn(f"feedback: {added} reviewed photos added to the training split")
    return {**summary, "added_to_train": added}


def _data_summary(
    data_dir: str | Path, report: DatasetReport, split: dict[str, list[tuple[str, str]]], manifest: Path,
    split_sha: str,
) -> dict[str, Any]:
    return {
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


def from_checkpoint(ckdir: Path, manifest: Path, log_fn: Callable[[str], None]) -> PreparedData:
    """Step 1 of a resumed run: the recipe, classes, data summary and split that ``ckdir/last.pt`` recorded.

    Raises:
        FileNotFoundError: no ``last.pt``.
        ModelFileError: not a training checkpoint, or the split manifest is missing or changed since.
    """
    ck = load_checkpoint(ckdir / "last.pt")
    saved = dict(ck["config"])
    saved["image_size"] = tuple(saved["image_size"])
    cfg = TrainConfig(**saved)
    summary = dict(ck["data"])
    if not manifest.is_file() or sha256_file(manifest) != summary["split_sha256"]:
        raise ModelFileError(f"{manifest} is missing or changed since the checkpoint; cannot resume")
    log_fn(f"resuming from {ckdir / 'last.pt'} after epoch {ck['epoch']}/{cfg.epochs}")
    return PreparedData(cfg, list(ck["class_names"]), read_split_manifest(manifest), summary, ck)


def load_split_images(
    data: PreparedData, size: tuple[int, int], *, log_fn: Callable[[str], None], progress: bool
) -> dict[str, Arrays]:
    """Step 3: decode each split once at ``size`` with :func:`pipeline.io.folders.load_images` (the worker's
    decoder), labels as indices into ``data.class_names``; files that fail are logged and left out."""
    t0 = time.perf_counter()
    index = {c: i for i, c in enumerate(data.class_names)}
    arrays = {s: load_images([(p, index[c]) for p, c in data.split[s]], size=size, in_chans=data.cfg.in_chans,
                             progress=progress, desc=f"decode {s}") for s in ("train", "val", "test")}
    for s, arr in arrays.items():
        for p, r in arr.failed:
            log_fn(f"  {s}: could not decode {p}: {r}")
    log_fn(f"decoded {sum(len(a.labels) for a in arrays.values())} images at {size[0]}x{size[1]} "
           f"({time.perf_counter() - t0:.0f} s)")
    return arrays


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device, *, weights: str | None,
                log_fn: Callable[[str], None] = print, class_names: Sequence[str] = ()) -> nn.Module:
    """Step 4: the network (``weights``: ImageNet weights or None; ``cfg.init_from``: a model file's weights
    instead, see :func:`_model_from_file`), classifier-only trainable with ``freeze_backbone``, on ``device`` in
    channels-last memory format. A pretrained architecture started from random weights is said loudly: on a photo
    set of thousands it costs tens of points of top-1.

    Raises:
        ConfigError: ``cfg.init_from`` is another architecture or channel count than ``cfg``'s.
        FileNotFoundError, ModelFileError: ``cfg.init_from`` is missing or not a model file.
    """
    if cfg.init_from is not None:
        model = _model_from_file(cfg, num_classes, class_names, log_fn=log_fn)
    else:
        if weights is None and cfg.arch != "invsort_cnn":
            log_fn(f"WARNING: {cfg.arch} starts from RANDOM weights; for photos pass --weights imagenet "
                   "(torchvision's download) or a local .pth / s3:// URI of ImageNet weights")
        model = create_model(cfg.arch, num_classes=num_classes, in_chans=cfg.in_chans, weights=weights)
    if cfg.freeze_backbone:
        prefixes = arch_spec(cfg.arch).classifier_prefixes
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
    return model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]


@dataclass
class Fitted:
    """What :func:`fit_model` gives: the loop's final state, the balance mode used and the training steps'
    dtype name (``float32``, ``bfloat16``, ``float16``)."""

    state: FitState
    balance: str
    step_dtype: str


def fit_model(
    model: nn.Module, data: PreparedData, train_set: Arrays, val_set: Arrays, inputs: ModelInputs, *,
    device: torch.device, ckdir: Path, meta: dict[str, Any], log_fn: Callable[[str], None], progress: bool,
) -> Fitted:
    """Step 5: AdamW, mixed precision, class balance and augmentation from the recipe, then the epoch loop
    (:func:`pipeline.training.loop.fit`), continuing from ``data.checkpoint`` when resuming."""
    cfg, k = data.cfg, len(data.class_names)
    head = arch_spec(cfg.arch).classifier_prefixes
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, head_prefixes=head,
                                         backbone_lr_scale=cfg.backbone_lr_scale), lr=cfg.lr)
    amp_dtype, scaler = mixed_precision(device, cfg.amp)
    step_dtype = "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    counts = np.bincount(train_set.labels, minlength=k)
    imbalance = counts.max() / max(1, counts.min())
    balance = cfg.balance if cfg.balance != "auto" else ("weights" if imbalance > 1.5 else "none")
    transform = train_preset(inputs.size, inputs.mean, inputs.std, in_chans=cfg.in_chans, policy=cfg.policy,
                             hflip=cfg.hflip, scale=(cfg.crop_scale, 1.0), color_jitter=cfg.color_jitter,
                             backgrounds=cfg.backgrounds)
    cpus = usable_cpus()
    workers = cfg.loader_workers if cfg.loader_workers >= 0 else (0 if cpus <= 4 else min(8, cpus // 4))
    steps_per_epoch = math.ceil(len(train_set.labels) / cfg.batch_size)
    how = StepRecipe(
        peak_lr=cfg.lr, total_steps=steps_per_epoch * cfg.epochs,
        warmup_steps=max(1, int(cfg.warmup_epochs * steps_per_epoch)), label_smoothing=cfg.label_smoothing,
        clip_grad_norm=cfg.clip_grad_norm,
        loss_weight=class_weights(train_set.labels, k).to(device) if balance == "weights" else None,
        mixing=batch_mixing(k, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha),
        amp_dtype=amp_dtype, scaler=scaler,
    )
    ckdir.mkdir(parents=True, exist_ok=True)
    ck = data.checkpoint
    state = resume_state(ck, model, opt, scaler, ckdir) if ck is not None else FitState()
    log_fn(f"training {cfg.arch} on {device.type}: {len(train_set.labels)} images, {steps_per_epoch} steps/epoch, "
           f"balance={balance}, augmentation={cfg.policy}, backgrounds={cfg.backgrounds:g}, "
           f"{workers} loader worker(s), "
           f"{step_dtype}{'' if amp_dtype is None else ' autocast'} steps")
    mean, std = inputs.tensors()
    plan = FitPlan(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, sampler=balance == "sampler",
                   patience=cfg.patience, workers=workers, mean=mean, std=std, ckdir=ckdir, meta=meta,
                   probe_epochs=0 if cfg.freeze_backbone else cfg.probe_epochs, head_prefixes=head)
    fit(model, opt, AugmentedImages(train_set.images, train_set.labels, transform), (val_set.images, val_set.labels),
        plan=plan, how=how, state=state, device=device, log_fn=log_fn, progress=progress)
    return Fitted(state, balance, step_dtype)


def calibrate(
    model: nn.Module, val_set: Arrays, inputs: ModelInputs, cfg: TrainConfig, *, device: torch.device,
    log_fn: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 6: temperature scaling on the validation split, then the review threshold for ``cfg.target_precision``
    at ``cfg.threshold_confidence`` (:mod:`pipeline.evaluation.calibration`); with ``cfg.shift_calibration`` chosen
    on the validation photos and the same photos under the robustness shifts, pooled
    (:mod:`pipeline.evaluation.shift_calibration`; ``chosen_on`` says which).

    Returns:
        ``(calibration, threshold)``: ``{"temperature", "val_ece_before", "val_ece_after", "val_nll_before",
        "val_nll_after"}`` (only the temperature 1.0 without a validation split) and
        :meth:`ThresholdChoice.to_dict` (threshold 0.0, not met, without one).
    """
    if not len(val_set.labels):
        return {"temperature": 1.0}, {"threshold": 0.0, "met": False, "reason": "no validation split"}
    logits = predict_logits(model, val_set.images, *inputs.tensors(), device=device)
    yv = torch.from_numpy(val_set.labels)
    temperature = fit_temperature(logits, yv)
    p_raw = F.softmax(logits, 1).numpy()
    p_cal = F.softmax(logits / temperature, 1).numpy()
    ok = p_cal.argmax(1) == val_set.labels
    ece_raw, _ = expected_calibration_error(p_raw.max(1), ok)
    ece_cal, _ = expected_calibration_error(p_cal.max(1), ok)
    calibration = {"temperature": temperature, "val_ece_before": ece_raw, "val_ece_after": ece_cal,
                   "val_nll_before": F.cross_entropy(logits, yv).item(),
                   "val_nll_after": F.cross_entropy(logits / temperature, yv).item()}
    choice = choose_threshold(p_cal.max(1), ok, cfg.target_precision, confidence_level=cfg.threshold_confidence)
    log_fn(f"calibration: temperature {temperature:.3f}, validation ECE {ece_raw:.4f} -> {ece_cal:.4f}")
    if choice.met:
        log_fn(f"review threshold {choice.threshold:.4f}: validation precision {choice.precision:.4f} "
               f"({cfg.threshold_confidence:g} lower bound {choice.precision_bound:.4f}) on the "
               f"{choice.coverage:.1%} of rows it sorts (target {cfg.target_precision})")
    else:
        log_fn(f"no threshold reaches precision {cfg.target_precision} on validation (lower bound at "
               f"{cfg.threshold_confidence:g}): every row goes to review unless the model improves (more data, "
               "more epochs, a larger validation split) or the target or --threshold-confidence is lowered")
    if not cfg.shift_calibration:
        return calibration, {**choice.to_dict(), "chosen_on": "validation"}
    return calibration, _shift_threshold(model, val_set, inputs, cfg, temperature, device=device, log_fn=log_fn)


SHIFT_CALIBRATION_MAX_PER_CLASS = 1000  # validation photos per class shifted for the threshold (a seeded subset)


def _shift_threshold(
    model: nn.Module, val_set: Arrays, inputs: ModelInputs, cfg: TrainConfig, temperature: float, *,
    device: torch.device, log_fn: Callable[[str], None],
) -> dict[str, Any]:
    """The review threshold chosen on the validation photos and the same photos under every robustness shift,
    pooled (:func:`pipeline.evaluation.shift_calibration.choose_shift_threshold`), with the fitted temperature."""
    t0 = time.perf_counter()

    def predict(images: np.ndarray) -> np.ndarray:
        logits = predict_logits(model, images, *inputs.tensors(), device=device)
        return F.softmax(logits / temperature, 1).numpy()

    rows = shifted_rows(list(zip(val_set.paths, val_set.labels.tolist(), strict=True)), size=inputs.size,
                        in_chans=cfg.in_chans, predict=predict, seed=cfg.seed,
                        per_class=SHIFT_CALIBRATION_MAX_PER_CLASS)
    choice = choose_shift_threshold(rows, cfg.target_precision, confidence_level=cfg.threshold_confidence)
    log_fn(f"shift-aware {describe(choice)} ({time.perf_counter() - t0:.0f} s; --no-shift-calibration keeps the "
           "validation split's own)")
    return choice


OPEN_SET_MAX_FIT = 10_000  # training images whose features fit the open-set score (a seeded sample above that)


def fit_open_set_step(
    model: nn.Module, train_set: Arrays, val_set: Arrays, inputs: ModelInputs, cfg: TrainConfig, *,
    num_classes: int, log_fn: Callable[[str], None],
) -> OpenSet | None:
    """Step 7: the open-set score (:mod:`pipeline.models.openset`, Mahalanobis on the penultimate features, Lee et
    al. 2018): class means and shared covariance of the training split's features (un-augmented; a seeded sample
    of :data:`OPEN_SET_MAX_FIT` at most), threshold keeping ``cfg.open_set_tpr`` of the validation split as known.
    None when ``cfg.open_set_tpr`` is 0 or there is no validation split (such a model rejects nothing)."""
    if not cfg.open_set_tpr or not len(val_set.labels):
        log_fn("open-set score: not fitted (" + ("open_set_tpr=0" if not cfg.open_set_tpr else "no validation split")
               + "); unknown photos are not rejected")
        return None
    idx = np.arange(len(train_set.labels))
    if len(idx) > OPEN_SET_MAX_FIT:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, OPEN_SET_MAX_FIT, replace=False))
    cpu_copy = copy.deepcopy(model).cpu().eval()
    fitted = fit_open_set(lambda: copy.deepcopy(cpu_copy), inputs.mean, inputs.std, num_classes,
                          (train_set.images[idx], train_set.labels[idx]), val_set.images, tpr=cfg.open_set_tpr)
    log_fn(f"open-set score: {fitted.method} on {fitted.n_fit} training images, threshold {fitted.threshold:.4g} "
           f"keeps {fitted.tpr:.0%} of {fitted.n_val} validation images as known")
    return fitted


def score_test_split(
    model: nn.Module, test_set: Arrays, inputs: ModelInputs, mf: ModelFile, *, device: torch.device,
    log_fn: Callable[[str], None],
) -> dict[str, Any] | None:
    """Step 8: :func:`pipeline.evaluation.report.compute_metrics` (without the reliability bins) of the held-out
    test split with ``mf``'s temperature, plus ``at_threshold`` (:func:`selective_scores` at its review
    threshold); None without a test split."""
    if not len(test_set.labels):
        return None
    logits = predict_logits(model, test_set.images, *inputs.tensors(), device=device)
    probs = F.softmax(logits / mf.temperature, 1).numpy()
    metrics = compute_metrics(test_set.labels, probs.argmax(1), probs, mf.class_names)
    metrics.pop("reliability", None)
    metrics["at_threshold"] = selective_scores(probs, test_set.labels, mf.review_threshold)
    sel = metrics["at_threshold"]
    log_fn(f"test ({metrics['n']} images never used for training or choices): top-1 {metrics['accuracy']:.4f}, "
           f"macro F1 {metrics['macro_avg']['f1']:.4f}, ECE {metrics['ece']:.4f}; at the threshold: precision "
           f"{sel['precision']:.4f} on {sel['coverage']:.1%} sorted, {sel['needs_review']} to review")
    return metrics


def _model_from_file(cfg: TrainConfig, num_classes: int, class_names: Sequence[str], *,
                     log_fn: Callable[[str], None]) -> nn.Module:
    """The network with ``cfg.init_from``'s weights: all of them when its categories are ``class_names`` in the
    same order, else all but the classifier (``arch_spec(arch).classifier_prefixes``, newly initialised)."""
    from pipeline.models.modelfile import load_model_file

    mf = load_model_file(cfg.init_from or "")
    if (mf.arch, mf.in_chans) != (cfg.arch, cfg.in_chans):
        raise ConfigError(f"init_from {cfg.init_from} is {mf.arch} with {mf.in_chans} channel(s); this run trains "
                          f"{cfg.arch} with {cfg.in_chans}: leave --arch and --grayscale/--rgb unset, or start "
                          "from ImageNet weights (--weights)")
    model = create_model(cfg.arch, num_classes=num_classes, in_chans=cfg.in_chans)
    if list(mf.class_names) == list(class_names):
        model.load_state_dict(mf.state_dict, strict=True)
        log_fn(f"fine-tuning from {cfg.init_from} (version {mf.version}): every weight, classifier included")
        return model
    head = arch_spec(cfg.arch).classifier_prefixes
    backbone = {k: v for k, v in mf.state_dict.items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith(head) for k in missing):
        raise ModelFileError(f"{cfg.init_from}: its weights do not fit {cfg.arch} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    log_fn(f"fine-tuning from {cfg.init_from} (version {mf.version}): its categories {list(mf.class_names)} are "
           f"not this run's {list(class_names)}, so the classifier starts new")
    return model


def init_from_overrides(overrides: dict[str, Any], *, log_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """The recipe values a run that fine-tunes from ``overrides["init_from"]`` takes from that model file unless
    the user set them: its architecture, channels and input size, and a 5x lower peak learning rate than the
    preset's (3e-4 for MobileNetV2's 1e-3: the weights are already trained, a full-size step would undo them).

    Raises:
        FileNotFoundError, ModelFileError: the model file is missing or not one.
    """
    spec = overrides.get("init_from")
    if not spec:
        return overrides
    from pipeline.models.fileversion import model_file_version
    from pipeline.models.modelfile import load_model_file

    mf = load_model_file(spec)
    out = {"arch": mf.arch, "in_chans": mf.in_chans, "image_size": tuple(mf.input_size), **overrides}
    if "lr" not in overrides:
        preset = "small" if out["arch"] == "invsort_cnn" else "photo"
        out["lr"] = PRESETS[preset]["lr"] / FINE_TUNE_LR_DIVISOR
    if overrides.get("weights"):
        log_fn(f"--weights {overrides['weights']} is ignored: the run starts from {spec}")
    out["weights"] = None
    log_fn(f"init from {spec} (version {model_file_version(spec)}): {mf.arch}, {mf.in_chans} channel(s), "
           f"{mf.input_size[0]}x{mf.input_size[1]} px, peak lr {out['lr']:g}")
    return out


FINE_TUNE_LR_DIVISOR = 5.0  # init_from: the preset's peak learning rate divided by this, unless --lr is given


def _seed(cfg: TrainConfig) -> None:
    """Torch threads, then torch's, Python's and NumPy's global generators from ``cfg.seed``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)


def _is_gray(paths: Sequence[str], limit: int = 32) -> bool:
    """Whether a sample of the photos has R == G == B everywhere (grayscale files or gray RGB), decoded by
    :func:`pipeline.io.folders.read_image` at their own size."""
    for p in list(paths)[:limit]:
        try:
            img = read_image(p, size=None, in_chans=3)[1]
        except ImageError:
            continue
        if not (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])):
            return False
    return True


def train(
    data_dir: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    feedback: FeedbackSource | None = None,
    export_onnx: bool = True,
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
        progress: progress display on stderr (:func:`pipeline.progress.progress`: a bar on a terminal, else a
            log line every tenth of a pass, logger ``pipeline.progress`` at INFO).
        log_fn: receives one line per step and per epoch (loss, accuracy, learning rate, images/s).
        feedback: photos that join the training split only, e.g. a catalog's human-reviewed rows (the feedback
            loop: :func:`pipeline.feedback.catalog_feedback`; fetched into ``<out>.ckpt/feedback/``). With
            ``overrides["init_from"]`` (a model file) the run fine-tunes that model (:func:`init_from_overrides`).
        export_onnx: also write the ONNX export beside ``out`` (``<stem>.onnx`` and its ``.onnx.json`` record,
            :func:`pipeline.models.runtimes.export_beside`) when the ``onnx`` extra is installed.

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
    t_start = time.perf_counter()
    out = Path(out)
    ckdir, manifest = checkpoint_dir(out), split_manifest_path(out)
    if not resume and cfg is None and overrides:
        overrides = init_from_overrides(overrides, log_fn=log_fn)
    data = (from_checkpoint(ckdir, manifest, log_fn) if resume
            else check_and_split(data_dir, manifest, cfg, overrides, log_fn=log_fn, progress=progress,
                                 feedback=feedback, feedback_dir=ckdir / "feedback"))
    cfg, split = data.cfg, data.split
    log_fn(f"split: train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])} "
           f"(manifest {manifest})")
    log_fn("recipe: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    if not split["train"]:
        raise SourceError(f"no training images left in {data_dir} after the check")
    inputs = ModelInputs.of(cfg)
    _seed(cfg)
    device = resolve_device(cfg.device)
    arrays = load_split_images(data, inputs.size, log_fn=log_fn, progress=progress)
    # a resumed run's weights come from its checkpoint, not from ImageNet's or init_from's file
    build_cfg = dataclasses.replace(cfg, init_from=None) if data.checkpoint else cfg
    model = build_model(build_cfg, len(data.class_names), device, weights=None if data.checkpoint else cfg.weights,
                        log_fn=log_fn if not data.checkpoint else lambda _: None, class_names=data.class_names)
    recipe = {**asdict(cfg), "image_size": list(inputs.size)}
    meta = {"config": recipe, "class_names": data.class_names, "data": data.summary}
    fitted = fit_model(model, data, arrays["train"], arrays["val"], inputs, device=device, ckdir=ckdir, meta=meta,
                       log_fn=log_fn, progress=progress)
    best_state = load_checkpoint(ckdir / "best.pt")["model"]
    model.load_state_dict(best_state)
    calibration, threshold = calibrate(model, arrays["val"], inputs, cfg, device=device, log_fn=log_fn)
    open_set = fit_open_set_step(model, arrays["train"], arrays["val"], inputs, cfg,
                                 num_classes=len(data.class_names), log_fn=log_fn)
    best, _, _ = track_validation(fitted.state.history)
    info: dict[str, Any] = {
        "recipe": recipe, "data": data.summary, "class_counts": data.summary["class_counts"],
        "skipped": data.summary["excluded"], "history": fitted.state.history, "best_epoch": best["epoch"],
        "best_val_acc": best.get("val_acc"), "best_val_loss": best["val_loss"],
        "stopped_early": fitted.state.stopped_early, "calibration": calibration, "threshold": threshold,
        "balance": fitted.balance, "step_dtype": fitted.step_dtype,
    }
    mf = ModelFile(arch=cfg.arch, class_names=data.class_names, in_chans=cfg.in_chans, input_size=inputs.size,
                   mean=inputs.mean, std=inputs.std, state_dict=best_state,
                   temperature=float(calibration["temperature"]), review_threshold=float(threshold["threshold"]),
                   info=info, created_at=datetime.now(UTC).isoformat(timespec="seconds"), open_set=open_set,
                   attribute=cfg.attribute)
    if (test := score_test_split(model, arrays["test"], inputs, mf, device=device, log_fn=log_fn)) is not None:
        info["test"] = test
    info["train_seconds"] = time.perf_counter() - t_start
    version = save_model_file(mf, out)
    write_model_card(mf, model_card_path(out))
    log_fn(f"saved {out} (version {version}), model card {model_card_path(out)}; "
           f"{info['train_seconds']:.0f} s in all")
    if export_onnx:  # beside the model: what INVSORT_RUNTIME=onnxruntime / openvino run, without torch
        export_beside(mf, out, log_fn)
    return mf
