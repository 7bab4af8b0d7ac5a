"""torchvision.transforms.v2 presets derived from a model's config: input size, mean/std and channels.

* :func:`train_preset`: one uint8 image already at the model's input size → an augmented, normalised tensor.
* :func:`batch_mixing`: MixUp / CutMix on a collated batch, turning integer labels into soft labels.

There is no evaluation preset: validation, calibration, test and :mod:`pipeline.evaluation` feed the model the
worker's own preprocessing (:func:`pipeline.io.folders.load_images` decodes with
:func:`pipeline.io.images.decode_image`, :func:`pipeline.training.loop.predict_logits` normalises with
:func:`pipeline.io.images.to_model_input`).

The recipe follows torchvision's ``references/classification/presets.py``
(https://github.com/pytorch/vision/blob/main/references/classification/presets.py): RandomResizedCrop,
horizontal flip, an AutoAugment-family policy, then ToDtype/Normalize and RandomErasing on the float tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from pipeline.errors import ConfigError

POLICIES = ("trivialaugment", "randaugment", "none")


def train_preset(
    input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], *, in_chans: int = 3,
    policy: str = "trivialaugment", hflip: bool = True, scale: tuple[float, float] = (0.6, 1.0),
    color_jitter: float = 0.2, random_erasing: float = 0.0,
) -> v2.Transform:
    """The training augmentation for one image kept decoded in memory at (or near) the model's input size.

    RandomResizedCrop to ``(H, W)`` (area fraction in ``scale``, aspect ratio 3/4..4/3, bilinear), horizontal
    flip (p=0.5), ColorJitter (brightness, contrast and, for RGB, saturation, each by a factor in
    ``[1 - color_jitter, 1 + color_jitter]``), then ``policy``: ``"trivialaugment"`` (TrivialAugmentWide, Müller &
    Hutter 2021, https://arxiv.org/abs/2103.10158), ``"randaugment"`` (RandAugment, 2 ops at magnitude 9,
    Cubuk et al. 2020, https://arxiv.org/abs/1909.13719) or ``"none"``; then scale to 0..1, normalise, and with
    ``random_erasing > 0`` erase a random rectangle to 0 (the mean) with that probability (Zhong et al. 2020,
    https://arxiv.org/abs/1708.04896). Every random draw comes from torch's global generator, so
    ``torch.manual_seed`` makes the output reproducible (DataLoader workers are seeded by torch).

    Args:
        input_size: ``(H, W)`` of the output in pixels.
        mean, std: per-channel normalisation in 0..1 units (``len == in_chans``).
        in_chans: channels of the input and output: 1 (grayscale) or 3 (RGB).
        policy: one of :data:`POLICIES`.
        hflip: whether to flip horizontally half the time (product photos are left/right symmetric in meaning).
        scale: ``(min, max)`` area fraction of the random crop, ``0 < min <= max <= 1``.
        color_jitter: strength of the brightness/contrast/saturation jitter, ``>= 0`` (0 turns it off).
        random_erasing: probability of random erasing, in ``[0, 1]``.

    Returns:
        A transform mapping a uint8 ``(in_chans, h, w)`` tensor to a float32 ``(in_chans, H, W)`` tensor.

    Raises:
        ConfigError: unknown ``policy`` (the message lists the valid ones) or an argument out of range.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown augmentation policy {policy!r}; valid: {', '.join(POLICIES)}")
    _check_norm(mean, std, in_chans)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if color_jitter < 0:
        raise ConfigError(f"color_jitter must be >= 0, got {color_jitter}")
    if not 0 <= random_erasing <= 1:
        raise ConfigError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
    bilinear = InterpolationMode.BILINEAR
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(tuple(input_size), scale=tuple(scale), interpolation=bilinear, antialias=True)
    ]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        cj = color_jitter
        # saturation is a no-op on one channel; leaving it out keeps the random draws meaningful
        ops.append(v2.ColorJitter(brightness=cj, contrast=cj) if in_chans == 1 else v2.ColorJitter(cj, cj, cj))
    if policy == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(interpolation=bilinear))
    elif policy == "randaugment":
        ops.append(v2.RandAugment(interpolation=bilinear))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(ops)


def batch_mixing(
    num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp and/or CutMix for a collated batch, or None when both are off.

    MixUp (Zhang et al. 2018, https://arxiv.org/abs/1710.09412) blends whole images, CutMix (Yun et al. 2019,
    https://arxiv.org/abs/1905.04899) pastes a rectangle; the blend weight is drawn from Beta(alpha, alpha) and
    the labels are mixed in the same proportion. With both alphas set, each batch uses one of the two at random.

    Args:
        num_classes: K, the width of the soft labels.
        mixup_alpha, cutmix_alpha: Beta parameters, ``>= 0``; 0 turns that method off.

    Returns:
        None, or a callable ``(images (N, C, H, W) float32, labels (N,) int64) -> (images (N, C, H, W) float32,
        soft labels (N, K) float32 whose rows sum to 1)``; use with a soft-target loss
        (``F.cross_entropy`` accepts class probabilities).

    Raises:
        ConfigError: a negative alpha or ``num_classes < 2``.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    ops: list[v2.Transform] = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def _check_norm(mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(f"mean and std need {in_chans} value(s) each for in_chans={in_chans}, "
                          f"got {len(mean)} and {len(std)}")
