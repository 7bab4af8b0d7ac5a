"""torchvision.transforms.v2 presets derived from a model's config: input size, mean/std and channels.

* :func:`train_preset`: one uint8 image already at the model's input size → an augmented, normalised tensor.
* :class:`PasteOnBackground`: the product cut out of its plain background and composited onto a real photograph
  (:mod:`pipeline.io.cutout`), the first step of :func:`train_preset` when ``backgrounds > 0``.
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

import cv2
import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from pipeline.errors import ConfigError
from pipeline.io.cutout import background_crop, paste, product_mask

POLICIES = ("trivialaugment", "randaugment", "none")


class PasteOnBackground:
    """With probability ``p``, the product cut out of its plain background and pasted onto a real photograph.

    The product (:func:`pipeline.io.cutout.product_mask`: border colour, threshold, morphology) is scaled to a
    random share of each side in ``scale`` and placed at a random position on a random crop (40-100 %, mirrored at
    random) of one of :func:`pipeline.io.cutout.background_photos` (shrunk to 3x the frame's longer side, once per
    process: about 1.5 ms an image at 102x136), whose brightness and per-channel colour are
    jittered (x0.6-1.4 and x0.85-1.15). An image with no plain background to cut (the mask covers more than
    97 % of it, e.g. already a real photo) is returned unchanged. Grayscale images get a grayscale background.

    Random draws come from torch's global generator (one draw seeds a ``numpy`` generator for the rest), so
    ``torch.manual_seed`` and DataLoader worker seeding make it reproducible; it pickles (a plain module-level
    class with float fields; the photos are read lazily once per process).

    Maps a uint8 ``(C, H, W)`` tensor (C = 1 or 3) to a uint8 ``(C, H, W)`` tensor.
    """

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.4, 1.0)) -> None:
        if not 0 <= p <= 1:
            raise ConfigError(f"backgrounds is a probability in [0, 1], got {p}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"background product scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.p, self.scale = float(p), (float(scale[0]), float(scale[1]))

    def __repr__(self) -> str:
        return f"PasteOnBackground(p={self.p}, scale={self.scale})"

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or float(torch.rand(())) >= self.p:
            return img
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        pixels = img.permute(1, 2, 0).numpy()
        gray = pixels.shape[2] == 1
        rgb = np.repeat(pixels, 3, axis=2) if gray else np.ascontiguousarray(pixels)
        mask = product_mask(rgb)
        if mask.mean() > 0.97:
            return img
        h, w = rgb.shape[:2]
        s = rng.uniform(*self.scale)
        ph, pw = max(2, min(h, round(h * s))), max(2, min(w, round(w * s)))
        product = cv2.resize(rgb, (pw, ph), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (pw, ph), interpolation=cv2.INTER_AREA)
        y, x = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
        gain = rng.uniform(0.6, 1.4) * rng.uniform(0.85, 1.15, size=3)
        bg = background_crop(rng, h, w, max_side=3 * max(h, w)).astype(np.float32) * gain.astype(np.float32)
        bg = np.clip(bg, 0, 255).astype(np.uint8)
        out = paste(bg, product, mask, y, x)
        if gray:
            out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def train_preset(
    input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], *, in_chans: int = 3,
    policy: str = "trivialaugment", hflip: bool = True, scale: tuple[float, float] = (0.6, 1.0),
    color_jitter: float = 0.2, random_erasing: float = 0.0, backgrounds: float = 0.0,
) -> v2.Transform:
    """The training augmentation for one image kept decoded in memory at (or near) the model's input size.

    With ``backgrounds > 0``, first :class:`PasteOnBackground` with that probability (the product cut out and
    pasted onto a real photograph at 40-100 % of each side); then RandomResizedCrop to ``(H, W)`` (area fraction
    in ``scale``, aspect ratio 3/4..4/3, bilinear), horizontal
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
        backgrounds: probability of pasting the product onto a real photograph, in ``[0, 1]`` (0 turns it off).

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
    if not 0 <= backgrounds <= 1:
        raise ConfigError(f"backgrounds is a probability in [0, 1], got {backgrounds}")
    bilinear = InterpolationMode.BILINEAR
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = [PasteOnBackground(backgrounds)] if backgrounds > 0 else []
    ops.append(v2.RandomResizedCrop(tuple(input_size), scale=tuple(scale), interpolation=bilinear, antialias=True))
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
