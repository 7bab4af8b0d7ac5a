"""The training loop: learning-rate schedule, sample order, one epoch, validation, early stopping, checkpoints.

Pure functions of explicit objects in the style of torchvision's ``references/classification/train.py``
(https://github.com/pytorch/vision/blob/main/references/classification/train.py): :func:`train_one_epoch` and
:func:`evaluate` take the model, the optimizer and the data; :func:`fit` runs the epochs, writing
``best.pt``/``last.pt`` (:mod:`pipeline.training.checkpoints`) after each, and stops early when validation stops
improving. :mod:`pipeline.training.recipe` builds the objects from a recipe.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io.images import to_model_input
from pipeline.progress import progress as progress_display
from pipeline.training.checkpoints import CHECKPOINT_FORMAT, save_checkpoint

Mixing = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 (Loshchilov & Hutter 2017, SGDR,
    https://arxiv.org/abs/1608.03983). ``step`` counts optimizer steps from 0; the result is the learning rate."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (K * n_c)`` per class, the "balanced" heuristic of King & Zeng 2001 (scikit-learn's ``balanced``).

    Args:
        labels: ``(N,)`` int class indices.
        num_classes: K.

    Returns:
        ``(K,)`` float32; a class without samples gets weight 0.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


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


class AugmentedImages(torch.utils.data.Dataset):
    """In-memory uint8 ``(N, H, W, C)`` images and ``(N,)`` labels → ``(transform(image (C, H, W) uint8), label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return self.transform(img), int(self.labels[i])


def _loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)


def epoch_loader(
    dataset: torch.utils.data.Dataset, order: list[int], *, batch_size: int, workers: int, seed: int, epoch: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    """Batches of ``dataset`` in ``order``, augmented in ``workers`` processes (0: in this one), each worker
    with one torch thread; the loader's generator is seeded by ``(seed, epoch)`` (worker seeds, hence the random
    augmentation, repeat on a resumed run)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=order, num_workers=workers,
        worker_init_fn=_loader_worker_init if workers else None,
        generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
    )


@dataclass(frozen=True)
class StepRecipe:
    """How :func:`train_one_epoch` updates the model at each step.

    Attributes:
        peak_lr: AdamW's peak learning rate (:func:`lr_at`).
        total_steps, warmup_steps: the schedule's length and warm-up, in optimizer steps.
        label_smoothing: of the cross-entropy loss, in [0, 1) (Szegedy et al. 2016).
        clip_grad_norm: largest gradient L2 norm (over the trained parameters).
        loss_weight: ``(K,)`` float32 class weights on the device, or None.
        mixing: MixUp/CutMix of a batch (:func:`pipeline.training.transforms.batch_mixing`), or None.
        amp_dtype: autocast dtype of the forward pass, or None for float32.
        scaler: fp16 gradient scaler, or None.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int
    label_smoothing: float
    clip_grad_norm: float
    loss_weight: torch.Tensor | None = None
    mixing: Mixing | None = None
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None


def _keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """BatchNorm layers whose weights are frozen keep their (ImageNet) running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


def train_one_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
    step: int, how: StepRecipe, device: torch.device, desc: str, progress: bool,
) -> tuple[dict[str, float], int]:
    """One pass over ``batches`` of ``(x (N, C, H, W) float32, y (N,) int64)``; batches of one image are skipped
    (BatchNorm needs two).

    Args:
        model, opt: what is trained; ``opt``'s learning rate is set per step from ``how`` and the global ``step``.
        step: the global step the epoch starts at.
        how: the step settings.
        device: where the model is.
        desc, progress: the progress display's label, and whether to show it.

    Returns:
        ``({"train_loss", "train_acc", "lr", "images_per_s", "seconds"}, the next global step)``. Training
        accuracy is against the hard labels (with mixup/cutmix, against the dominant one).
    """
    model.train()
    _keep_frozen_batchnorm_in_eval(model)
    params = [p for p in model.parameters() if p.requires_grad]
    t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
    bar = progress_display(batches, desc=desc, unit="batch", disable=not progress)
    lr = how.peak_lr
    for x, y in bar:
        if len(y) < 2:
            continue
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        lr = lr_at(step, how.total_steps, how.warmup_steps, how.peak_lr)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        loss, logits = _step(model, opt, params, x, y, how, device)
        step += 1
        seen += len(y)
        loss_sum += loss * len(y)
        correct += int((logits.argmax(1) == y).sum().item())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.1e}")
    seconds = time.perf_counter() - t0
    return ({"train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen), "lr": lr,
             "images_per_s": seen / seconds if seconds else 0.0, "seconds": seconds}, step)


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    how: StepRecipe, device: torch.device,
) -> tuple[float, torch.Tensor]:
    """Forward, loss, backward, clip, optimizer step. Returns ``(loss, logits (N, K))``."""
    target = y
    if how.mixing is not None:
        x, target = how.mixing(x, y)
    autocast = (torch.autocast(device.type, dtype=how.amp_dtype) if how.amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), target, weight=how.loss_weight, label_smoothing=how.label_smoothing)
    opt.zero_grad(set_to_none=True)
    if how.scaler is not None:
        how.scaler.scale(loss).backward()
        how.scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(params, how.clip_grad_norm)
        how.scaler.step(opt)
        how.scaler.update()
    else:
        loss.backward()
        nn.utils.clip_grad_norm_(params, how.clip_grad_norm)
        opt.step()
    return loss.item(), logits


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


def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor, *,
    device: torch.device,
) -> dict[str, float]:
    """``{"val_loss", "val_acc"}``: unsmoothed cross-entropy (nats) and top-1 accuracy (0..1) of uint8
    ``(N, H, W, C)`` images with ``(N,)`` int64 labels (see :func:`predict_logits`); empty for ``N = 0``."""
    if not len(labels):
        return {}
    logits = predict_logits(model, images, mean, std, device=device)
    y = torch.from_numpy(labels)
    return {"val_loss": F.cross_entropy(logits, y).item(), "val_acc": (logits.argmax(1) == y).float().mean().item()}


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


def mixed_precision(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype or None, GradScaler or None)`` for training steps on ``device``: on CUDA bf16 where
    supported, else fp16 with a GradScaler; on a CPU with native bf16 (:func:`cpu_has_native_bf16`) bf16; else
    (or not ``enabled``) float32."""
    if device.type == "cuda" and enabled:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return amp_dtype, torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if device.type == "cpu" and enabled and cpu_has_native_bf16():
        return torch.bfloat16, None
    return None, None


def param_groups(model: nn.Module, weight_decay: float, *, head_prefixes: tuple[str, ...] = (),
                 backbone_lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups: weight decay on weights, none on biases and normalisation parameters (1-D).

    With ``head_prefixes`` and ``backbone_lr_scale`` != 1, the parameters outside the classifier (the pretrained
    backbone) get their own groups whose learning rate is ``backbone_lr_scale`` x the schedule's (``lr_scale``,
    applied by :func:`train_one_epoch`): discriminative fine-tuning (Howard & Ruder 2018), which moves pretrained
    features less. Groups with no parameters are left out.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            backbone = backbone_lr_scale != 1.0 and bool(head_prefixes) and not name.startswith(head_prefixes)
            groups.setdefault((backbone, p.ndim <= 1 or name.endswith(".bias")), []).append(p)
    order = [(False, False), (False, True), (True, False), (True, True)]
    return [{"params": groups[key], "weight_decay": 0.0 if key[1] else weight_decay,
             "lr_scale": backbone_lr_scale if key[0] else 1.0} for key in order if key in groups]


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


@dataclass
class FitState:
    """What the epoch loop carries from one epoch to the next, and ``last.pt`` keeps for a resumed run.

    Attributes:
        history: one row per finished epoch (``epoch``, :func:`train_one_epoch`'s figures, ``val_loss`` and
            ``val_acc`` when there is a validation split).
        step: the global optimizer step.
        stopped_early: whether early stopping ended the run.
    """

    history: list[dict] = field(default_factory=list)
    step: int = 0
    stopped_early: bool = False

    @property
    def epoch(self) -> int:
        """The last finished epoch (0 before the first)."""
        return int(self.history[-1]["epoch"]) if self.history else 0


@dataclass(frozen=True)
class FitPlan:
    """The epoch loop's settings.

    Attributes:
        epochs: the last epoch (1-based).
        batch_size: images per step.
        seed: seeds each epoch's order and loader (:func:`epoch_order`, :func:`epoch_loader`).
        sampler: class-balanced sampling with replacement instead of a permutation.
        patience: epochs without a better validation loss or accuracy before stopping; 0 = never.
        workers: augmentation processes of the loader.
        mean, std: ``(1, C, 1, 1)`` float32 normalisation for validation (0..1 units).
        ckdir: where ``last.pt`` and ``best.pt`` go.
        meta: what every ``last.pt`` also holds (``config``, ``class_names``, ``data``).
        probe_epochs: the first epochs train only the parameters whose names start with ``head_prefixes`` (a
            linear probe), then everything (LP-FT: Kumar et al. 2022, "Fine-Tuning can Distort Pretrained
            Features and Underperform Out-of-Distribution").
        head_prefixes: the classifier's parameter-name prefixes.
    """

    epochs: int
    batch_size: int
    seed: int
    sampler: bool
    patience: int
    workers: int
    mean: torch.Tensor
    std: torch.Tensor
    ckdir: Path
    meta: dict[str, Any]
    probe_epochs: int = 0
    head_prefixes: tuple[str, ...] = ()


def fit(
    model: nn.Module, opt: torch.optim.Optimizer, train_set: AugmentedImages, val: tuple[np.ndarray, np.ndarray], *,
    plan: FitPlan, how: StepRecipe, state: FitState, device: torch.device, log_fn: Callable[[str], None],
    progress: bool,
) -> FitState:
    """Train from epoch ``state.epoch + 1`` to ``plan.epochs`` (or an early stop), validating on ``val``
    (uint8 ``(N, H, W, C)`` images, ``(N,)`` labels) after each epoch.

    After each epoch, ``best.pt`` (when the epoch is the best so far, :func:`track_validation`) and then
    ``last.pt`` are written atomically, before its log line (``epoch E/N: loss ... acc ... | val loss ... acc
    ... | lr ... | img/s | s [| best]``). Returns the updated ``state`` (also changed in place).
    """
    for epoch in range(state.epoch + 1, plan.epochs + 1):
        if state.stopped_early:
            break
        if plan.probe_epochs and plan.head_prefixes:  # LP-FT: the backbone frozen for the first epochs
            for name, p in model.named_parameters():
                if not name.startswith(plan.head_prefixes):
                    p.requires_grad_(epoch > plan.probe_epochs)
        order = epoch_order(train_set.labels, sampler=plan.sampler, seed=plan.seed, epoch=epoch)
        loader = epoch_loader(train_set, order, batch_size=plan.batch_size, workers=plan.workers, seed=plan.seed,
                              epoch=epoch, pin_memory=device.type == "cuda")
        figures, state.step = train_one_epoch(model, opt, loader, step=state.step, how=how, device=device,
                                              desc=f"epoch {epoch}/{plan.epochs}", progress=progress)
        row = {"epoch": epoch, **figures, **evaluate(model, *val, plan.mean, plan.std, device=device)}
        state.history.append(row)
        best, improved, bad_epochs = track_validation(state.history)
        state.stopped_early = bool(plan.patience and bad_epochs >= plan.patience and epoch < plan.epochs)
        _save_epoch(model, opt, how.scaler, state, plan, improved)
        log_fn(
            f"epoch {epoch}/{plan.epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if "val_acc" in row else "")
            + f" | lr {row['lr']:.2e} | {row['images_per_s']:.0f} img/s | {row['seconds']:.0f} s"
            + (" | best" if improved else "")
        )
        if state.stopped_early:
            log_fn(f"early stop: neither validation loss nor accuracy improved for {bad_epochs} epochs "
                   f"(best: epoch {best['epoch']})")
    return state


def _save_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, state: FitState,
    plan: FitPlan, improved: bool,
) -> None:
    """``best.pt`` (the weights) when ``improved``, then ``last.pt`` (everything a resumed run needs)."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if improved:
        save_checkpoint({"format": CHECKPOINT_FORMAT, "epoch": state.epoch, "model": weights},
                        plan.ckdir / "best.pt")
    save_checkpoint({
        "format": CHECKPOINT_FORMAT, "epoch": state.epoch, "step": state.step, **plan.meta, "model": weights,
        "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
        "torch_rng": torch.get_rng_state(), "history": state.history, "stopped_early": state.stopped_early,
    }, plan.ckdir / "last.pt")


def resume_state(
    ck: dict, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, ckdir: Path
) -> FitState:
    """Load ``last.pt``'s contents ``ck`` into the model, optimizer, scaler and torch's global generator, and
    return the loop's state. Checkpoints of an older rule, whose ``best.pt`` is the last epoch's model, get
    ``best.pt`` rewritten from the best epoch by the current rule when that is the last one."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["torch_rng"])
    state = FitState(list(ck["history"]), int(ck["step"]), bool(ck.get("stopped_early")))
    best, _, _ = track_validation(state.history)
    if best["epoch"] == int(ck["epoch"]):
        save_checkpoint({"format": CHECKPOINT_FORMAT, "epoch": best["epoch"], "model": ck["model"]}, ckdir / "best.pt")
    return state
