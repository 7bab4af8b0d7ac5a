"""Training on a folder-per-category photo set, into an invsort model file.

The images are decoded once with the worker's own :func:`pipeline.images.decode_image` (so training and
sorting see the same pixels), kept in memory as uint8 ``(N, H, W, C)``, and augmented per batch on tensors.
Recipe: AdamW, linear warm-up then cosine decay, label smoothing 0.1, random flip + random shift/scale crop,
best epoch by validation accuracy.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.errors import ConfigError, SourceError
from pipeline.images import decode_image, to_model_input
from pipeline.modelfile import ModelFile, save_model_file
from pipeline.models import arch_spec, create_model
from pipeline.storage import IMAGE_SUFFIXES

log = logging.getLogger(__name__)



@dataclass
class TrainConfig:
    """A training recipe. Sizes in pixels; ``lr`` is AdamW's peak learning rate."""

    arch: str = "mobilenet_v2"
    weights: str | None = None
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    image_size: tuple[int, int] | None = None  # None: the architecture's default
    in_chans: int = 3
    val_fraction: float = 0.1
    seed: int = 0
    hflip: bool = True
    max_shift: float = 0.08  # random translation, fraction of the side
    threads: int = 0  # torch intra-op threads; 0 = all cores
    freeze_backbone: bool = False  # train the classifier only (fast on a CPU; a linear probe)
    extra: dict = field(default_factory=dict)


@dataclass
class Dataset:
    """Decoded images ``(N, H, W, C)`` uint8, labels ``(N,)`` int64, and what was skipped and why."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str]
    skipped: list[tuple[str, str]]


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and ``(path, label)`` pairs of a folder-per-category tree.

    Raises:
        SourceError: missing folder, or fewer than two category folders with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"training data folder not found: {root}")
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*") if f.is_file()):
            classes.append(d.name)
    if len(classes) < 2:
        raise SourceError(
            f"{root} needs one sub-folder per category with images in each (found {len(classes)}): "
            "e.g. DIR/Boot/*.jpg, DIR/Sandal/*.jpg"
        )
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                    samples.append((os.path.join(dirpath, f), label))
    return classes, samples


def load_dataset(
    root: str | Path, *, size: tuple[int, int], in_chans: int, threads: int | None = None, progress: bool = True
) -> Dataset:
    """Decode every image of a folder-per-category tree; bad images are skipped with their reason."""
    classes, samples = scan_folder(root)
    threads = threads or min(8, os.cpu_count() or 1)

    def load(path: str) -> np.ndarray | str:
        try:
            with open(path, "rb") as fh:
                return decode_image(fh.read(), size=size, in_chans=in_chans)
        except Exception as exc:
            return str(exc)

    with ThreadPoolExecutor(threads) as pool:
        results = list(
            tqdm(pool.map(load, [p for p, _ in samples], chunksize=64), total=len(samples),
                 desc="decode", unit="img", disable=not progress, leave=False)
        )
    skipped = [(p, r) for (p, _), r in zip(samples, results, strict=True) if isinstance(r, str)]
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    images = np.stack([results[i] for i in keep]) if keep else np.zeros((0, *size, in_chans), np.uint8)
    labels = np.array([samples[i][1] for i in keep], dtype=np.int64)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return Dataset(images, labels, classes, [samples[i][0] for i in keep], skipped)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` with ``fraction`` of each class (at least one when it has two) in val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            n_val = max(1, n_val)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def augment(x: torch.Tensor, *, hflip: bool, max_shift: float, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random shift + scale (±``max_shift``) of a ``(N, C, H, W)`` float batch.

    Out-of-frame pixels are filled with the border (catalogue photos have plain backgrounds).
    """
    n = x.shape[0]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if max_shift > 0:
        scale = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * max_shift
        shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift * 2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = scale
        theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 (Loshchilov & Hutter, SGDR)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


@torch.inference_mode()
def evaluate_arrays(
    model: nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Logits ``(N, num_classes)`` float32 for uint8 ``(N, H, W, C)`` images (model put in eval mode)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(torch.from_numpy(images[i : i + batch_size]), mean, std)
        out.append(model(x).float())
    return torch.cat(out) if out else torch.zeros(0)


def train(
    data_dir: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
) -> ModelFile:
    """Train ``cfg.arch`` on ``data_dir`` (one sub-folder per category) and write the model file ``out``.

    Returns:
        The saved :class:`ModelFile`; ``info`` holds the recipe, class counts, skipped files, the split and
        per-epoch history (loss, accuracy, learning rate, images/s).

    Raises:
        SourceError: the folder is missing or has fewer than two categories.
        ConfigError: a bad recipe value (unknown architecture, epochs < 1, ...).
    """
    spec = arch_spec(cfg.arch)
    if cfg.epochs < 1 or cfg.batch_size < 1 or not 0 <= cfg.val_fraction < 1:
        raise ConfigError("epochs and batch size must be >= 1 and val fraction in [0, 1)")
    size = tuple(cfg.image_size or spec.input_size)
    mean_t = spec.mean if cfg.in_chans == len(spec.mean) else (spec.mean[0],) * cfg.in_chans
    std_t = spec.std if cfg.in_chans == len(spec.std) else (spec.std[0],) * cfg.in_chans
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    t0 = time.perf_counter()
    ds = load_dataset(data_dir, size=size, in_chans=cfg.in_chans, progress=progress)
    counts = Counter(ds.class_names[i] for i in ds.labels.tolist())
    log_fn(
        f"data: {len(ds.labels)} images in {len(ds.class_names)} classes "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); skipped {len(ds.skipped)} bad files; "
        f"decoded in {time.perf_counter() - t0:.1f} s"
    )
    tr_idx, va_idx = stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
    model = create_model(cfg.arch, num_classes=len(ds.class_names), in_chans=cfg.in_chans, weights=cfg.weights)
    model = model.to(memory_format=torch.channels_last)
    if cfg.freeze_backbone:
        head = spec.classifier_prefixes
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head))
    mean = torch.tensor(mean_t, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std_t, dtype=torch.float32).view(1, -1, 1, 1)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    steps_per_epoch = math.ceil(len(tr_idx) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    images_t = torch.from_numpy(ds.images)
    labels_t = torch.from_numpy(ds.labels)
    history: list[dict] = []
    best_acc, best_state, step = -1.0, None, 0

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if cfg.freeze_backbone:  # frozen BatchNorm layers keep their ImageNet statistics
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad:
                    m.eval()
        perm = torch.from_numpy(tr_idx)[torch.randperm(len(tr_idx), generator=gen)]
        t_ep, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for b in bar:
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            x = augment(to_model_input(images_t[idx], mean, std), hflip=cfg.hflip, max_shift=cfg.max_shift,
                        gen=gen)
            y = labels_t[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, cfg.lr)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 2.0)
            opt.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        ep_s = time.perf_counter() - t_ep
        row = {"epoch": epoch, "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
               "lr": opt.param_groups[0]["lr"], "images_per_s": seen / ep_s, "seconds": ep_s}
        if len(va_idx):
            logits = evaluate_arrays(model, ds.images[va_idx], mean, std)
            yv = labels_t[va_idx]
            row["val_loss"] = F.cross_entropy(logits, yv).item()
            row["val_acc"] = (logits.argmax(1) == yv).float().mean().item()
        history.append(row)
        log_fn(
            f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if "val_acc" in row else "")
            + f" | lr {row['lr']:.2e} | {row['images_per_s']:.0f} img/s"
        )
        score = row.get("val_acc", row["train_acc"])
        if score >= best_acc:
            best_acc = score
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    assert best_state is not None
    cfg_dict = asdict(cfg)
    cfg_dict["image_size"] = list(size)
    mf = ModelFile(
        arch=cfg.arch,
        class_names=ds.class_names,
        in_chans=cfg.in_chans,
        input_size=size,  # type: ignore[arg-type]
        mean=tuple(mean_t),
        std=tuple(std_t),
        state_dict=best_state,
        info={
            "recipe": cfg_dict,
            "data_dir": str(data_dir),
            "class_counts": dict(counts),
            "skipped": [[p, r] for p, r in ds.skipped[:1000]],
            "val_items": [ds.paths[i] for i in va_idx.tolist()][:100000],
            "history": history,
            "best_val_acc": best_acc,
            "train_seconds": time.perf_counter() - t0,
        },
    )
    version = save_model_file(mf, out)
    log_fn(f"saved {out} (version {version}, best val acc {best_acc:.4f}, {time.perf_counter() - t0:.0f} s)")
    return mf
