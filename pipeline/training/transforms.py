"""torchvision.transforms.v2 presets derived from a model's config: input size, mean/std and channels.

* :func:`eval_preset`: one PIL image or uint8 tensor of any size → the normalised tensor the worker would make
  from the same file (:func:`pipeline.io.images.decode_image` then :func:`pipeline.io.images.to_model_input`).
* :func:`train_preset`: one uint8 image already at the model's input size → an augmented, normalised tensor.
* :func:`batch_mixing`: MixUp / CutMix on a collated batch, turning integer labels into soft labels.

The recipe follows torchvision's ``references/classification/presets.py``
(https://github.com/pytorch/vision/blob/main/references/classification/presets.py): RandomResizedCrop,
horizontal flip, an AutoAugment-family policy, then ToDtype/Normalize and RandomErasing on the float tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from pipeline.errors import ConfigError
from pipeline.io.images import resize_for_model

POLICIES = ("trivialaugment", "randaugment", "none")


class _WorkerResize(v2.Transform):
    """Resize to ``(H, W)`` exactly as :func:`pipeline.io.images.decode_image` does: OpenCV ``INTER_AREA`` when the
    image has more pixels than the target, ``INTER_LINEAR`` otherwise; no aspect-ratio preservation.

    torchvision has no area filter for tensors. Measured on 40 footwear photos (102x136 → 51x68, ImageNet
    normalisation), its closest options differ from ``INTER_AREA`` by a mean absolute 0.049 (bilinear,
    antialias) and 0.028 (bicubic, antialias), up to 1.3 at edges, so the worker's own resize is used here.
    Enlarging with ``INTER_LINEAR`` equals torchvision's bilinear (half-pixel centres) to rounding.
    """

    _transformed_types = (torch.Tensor,)

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if tuple(inpt.shape[-2:]) == self.size:
            return inpt
        th, tw = self.size
        hwc = np.ascontiguousarray(inpt.detach().cpu().permute(1, 2, 0).numpy())
        out = resize_for_model(hwc, self.size)
        out = torch.from_numpy(out.reshape(th, tw, -1)).permute(2, 0, 1).contiguous()
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def _pil_like_worker(im: PIL.Image.Image, in_chans: int) -> PIL.Image.Image:
    """A PIL image in the mode and orientation :func:`pipeline.io.images.decode_image` gives the same file: EXIF
    orientation applied to JPEGs (OpenCV applies it when decoding to colour or grey), transparency composited
    onto white, 16-bit scaled to 8 bits, then ``"L"`` or ``"RGB"``."""
    mode = "L" if in_chans == 1 else "RGB"
    if im.format == "JPEG":
        if mode == "L":
            im.draft("L", None)  # libjpeg's own grey output, as OpenCV's IMREAD_GRAYSCALE
        im = PIL.ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        im = PIL.Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
    elif im.mode in ("I", "F"):
        im = PIL.Image.fromarray(cv2.normalize(np.asarray(im), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im if im.mode == mode else im.convert(mode)


def _channels(in_chans: int) -> v2.Transform:
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
    return v2.Grayscale(1) if in_chans == 1 else v2.RGB()


def eval_preset(
    input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], *, in_chans: int = 3,
    crop_fraction: float = 1.0,
) -> v2.Transform:
    """The evaluation transform: the worker's preprocessing for one image that is already decoded.

    Resize to ``(H / crop_fraction, W / crop_fraction)`` with the worker's rule (OpenCV ``INTER_AREA`` when
    shrinking, ``INTER_LINEAR`` when enlarging), centre-crop ``(H, W)``, scale to 0..1, normalise. The default
    ``crop_fraction=1.0`` keeps the whole photo, the worker's framing: catalogue photos are framed product shots
    whose edges (toe, heel, strap) matter, unlike ImageNet scenes where the usual 0.875 centre crop drops
    background. PIL images are first brought to the worker's mode (EXIF orientation, transparency on white,
    16-bit to 8-bit, grey or RGB). With ``in_chans=1``, a JPEG opened but not yet loaded is decoded to grey by
    libjpeg (``Image.draft``), as OpenCV does, so the caller's image object then holds grey pixels.

    Measured against the worker (``decode_image`` + ``to_model_input``) on the same files (Fashion-MNIST PNGs,
    footwear JPEGs; shrinking and enlarging; grey and RGB): identical to float32 precision.

    Args:
        input_size: ``(H, W)`` of the output in pixels.
        mean, std: per-channel normalisation in 0..1 units (``len == in_chans``).
        in_chans: 1 (grayscale) or 3 (RGB).
        crop_fraction: the centre crop's share of each side of the resized image, in (0, 1].

    Returns:
        A transform mapping a PIL image, or a uint8 ``(1 or 3, H0, W0)`` tensor, to a float32 ``(in_chans, H, W)``
        plain tensor, ``(x / 255 - mean) / std``.

    Raises:
        ConfigError: ``in_chans`` not 1 or 3, ``mean``/``std`` of another length, ``crop_fraction`` out of range.
    """
    _check_norm(mean, std, in_chans)
    if not 0 < crop_fraction <= 1:
        raise ConfigError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h, w = int(input_size[0]), int(input_size[1])
    resized = (round(h / crop_fraction), round(w / crop_fraction))
    return v2.Compose([
        v2.Lambda(functools.partial(_pil_like_worker, in_chans=in_chans), PIL.Image.Image),
        v2.ToImage(),
        _channels(in_chans),
        _WorkerResize(resized),
        v2.CenterCrop((h, w)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ])


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
