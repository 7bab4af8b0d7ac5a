"""Robustness: a labelled folder scored under the shifts real photos show, as the worker would see them.

Catalogue photos are product shots on white at one aspect ratio; photos sent to the worker are not. Each shift
here is a deterministic (seeded) transform of a photo's *encoded bytes* into new encoded bytes, which are then
decoded by the worker's own decoder (:func:`pipeline.io.images.decode_image`, resize included), so what is
measured is what the worker would see. :func:`robustness_report` scores every shift on the same photos (a seeded
subset of at most ``per_class`` photos per class) and gives top-1 accuracy, the share the model sorts
automatically at its review threshold and the precision of what it sorts.

The shifts (:data:`SHIFTS`): the photo as it is (the baseline); padded (with its own background colour) to 1:1,
3:4 and 16:9 framing and centre-cropped to 1:1; the product small (40 % of each side) in a larger frame; the
product cut out of its background and composited onto a real photograph, at full size and small; JPEG quality
30; Gaussian blur; dim light (brightness x0.6); low contrast (x0.5); rotation by 5-15 degrees either way; and a
600-2000 px source (upscaled, JPEG quality 90), which the worker decodes and shrinks.

The cut-out and the composite are :mod:`pipeline.io.cutout` (shared with the training augmentation
:class:`pipeline.training.transforms.PasteOnBackground`): the product is cut out of its border-coloured background
(threshold + morphology) and pasted onto a random crop of scikit-learn's two bundled sample photographs (CC BY 2.0;
the report credits them, :data:`pipeline.io.cutout.BACKGROUND_CREDIT`). Models trained with ``--backgrounds`` have
seen crops of these same two photographs, so their ``photo_background`` and ``small_on_photo`` rows are optimistic;
a folder of real photos (``--extra``) is the honest figure.

scikit-image's ``skimage.data`` has more photographs (BSD) but is not installed here and would add a
dependency of tens of MB for two more textures; a random crop (40-100 % of the photo's side, mirrored at
random) of two real photographs already gives textured, non-white, varied backgrounds.

Not measured: people wearing the item. Synthesising a foot or a body in a shoe offline would need a generative
model or a library of people photos with a licence, neither of which is here; pasting a product onto a photo of a
person is not what a worn shoe looks like. The report says so (:data:`NOT_MEASURED`); a folder of real photos
scored with ``invsort evaluate ... --extra NAME=DIR`` (:mod:`pipeline.evaluation.extra`) measures it honestly.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.errors import ImageError
from pipeline.evaluation.calibration import selective_scores
from pipeline.io.cutout import BACKGROUND_CREDIT, background_colour, background_crop, paste, product_mask
from pipeline.io.files import atomic_path
from pipeline.io.folders import header_size
from pipeline.io.images import decode_image
from pipeline.progress import progress as progress_display
from pipeline.settings import usable_cpus

log = logging.getLogger(__name__)

#: Photos per class scored under each shift by default (a seeded subset; 0 or None: all).
DEFAULT_PER_CLASS = 100
SMALL_SCALE = 0.4  # the product's share of each side of the frame in the "small" shifts
BLUR_SIGMA = 0.01  # Gaussian sigma as a share of the long side (1.4 px on a 136 px catalogue photo)
BRIGHTNESS = 0.6
CONTRAST = 0.5
ROTATION_DEG = (5.0, 15.0)
LARGE_SIDE_PX = (600, 2000)
NOT_MEASURED = {
    "worn": "people wearing the item: no honest offline way to synthesise it (it needs a generative model or "
            "licensed photos of people); score a folder of real photos with --extra NAME=DIR instead",
}

Transform = Callable[[bytes, np.random.Generator], bytes]


@dataclass(frozen=True)
class Shift:
    """A named, seeded transform of encoded photo bytes into encoded photo bytes."""

    name: str
    description: str
    apply: Transform


# --- pixels in, pixels out --------------------------------------------------------------------------------------


def photo_pixels(data: bytes) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB at the photo's own size, decoded by the worker's decoder (EXIF orientation,
    transparency on white, 16-bit scaled).

    Raises:
        ImageError: bytes the worker could not decode, or a header PIL cannot read.
    """
    size = header_size(data)
    if size is None:
        raise ImageError("image header unreadable (PIL cannot identify it)")
    w, h = size
    return decode_image(data, size=(h, w), in_chans=3)


def encode(rgb: np.ndarray, *, fmt: str = ".png", quality: int = 95) -> bytes:
    """RGB uint8 pixels as PNG (lossless, the default) or JPEG at ``quality``."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == ".jpg" else []
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB
        raise ImageError(f"could not encode a {rgb.shape} image as {fmt}")
    return buf.tobytes()


# --- the shifts -------------------------------------------------------------------------------------------------


def _identity(data: bytes, rng: np.random.Generator) -> bytes:
    return data


def _framed(rgb: np.ndarray, height: int, width: int, top: int, left: int) -> np.ndarray:
    """``rgb`` ``(h, w, 3)`` uint8 at ``(top, left)`` of a ``(height, width, 3)`` frame of its background colour."""
    h, w = rgb.shape[:2]
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = background_colour(rgb)
    canvas[top : top + h, left : left + w] = rgb
    return canvas


def _pad_to(aspect: float) -> Transform:
    """Pad with the photo's background colour to width / height = ``aspect`` (centred)."""

    def pad(data: bytes, rng: np.random.Generator) -> bytes:
        rgb = photo_pixels(data)
        h, w = rgb.shape[:2]
        th, tw = (h, max(w, round(h * aspect))) if w / h < aspect else (max(h, round(w / aspect)), w)
        return encode(_framed(rgb, th, tw, (th - h) // 2, (tw - w) // 2))

    return pad


def _crop_square(data: bytes, rng: np.random.Generator) -> bytes:
    rgb = photo_pixels(data)
    h, w = rgb.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return encode(np.ascontiguousarray(rgb[y : y + s, x : x + s]))


def _small(on_photo: bool) -> Transform:
    """The photo at :data:`SMALL_SCALE` of each side of a larger frame, at a random place; the frame is the photo's
    background colour, or (``on_photo``) a real photograph with the product cut out onto it."""

    def small(data: bytes, rng: np.random.Generator) -> bytes:
        rgb = photo_pixels(data)
        h, w = rgb.shape[:2]
        fh, fw = round(h / SMALL_SCALE), round(w / SMALL_SCALE)
        y, x = int(rng.integers(fh - h + 1)), int(rng.integers(fw - w + 1))
        if on_photo:
            return encode(paste(background_crop(rng, fh, fw), rgb, product_mask(rgb), y, x))
        return encode(_framed(rgb, fh, fw, y, x))

    return small


def _on_photo(data: bytes, rng: np.random.Generator) -> bytes:
    rgb = photo_pixels(data)
    h, w = rgb.shape[:2]
    return encode(paste(background_crop(rng, h, w), rgb, product_mask(rgb), 0, 0))


def _jpeg(quality: int) -> Transform:
    def jpeg(data: bytes, rng: np.random.Generator) -> bytes:
        return encode(photo_pixels(data), fmt=".jpg", quality=quality)

    return jpeg


def _blur(data: bytes, rng: np.random.Generator) -> bytes:
    rgb = photo_pixels(data)
    sigma = max(0.8, BLUR_SIGMA * max(rgb.shape[:2]))
    return encode(cv2.GaussianBlur(rgb, (0, 0), sigma))


def _levels(gain: float, *, contrast: bool) -> Transform:
    """Brightness: ``x * gain``; contrast: ``mean + (x - mean) * gain`` (the photo's mean grey level)."""

    def levels(data: bytes, rng: np.random.Generator) -> bytes:
        x = photo_pixels(data).astype(np.float32)
        y = x.mean() + (x - x.mean()) * gain if contrast else x * gain
        return encode(np.clip(y + 0.5, 0, 255).astype(np.uint8))

    return levels


def _rotate(data: bytes, rng: np.random.Generator) -> bytes:
    rgb = photo_pixels(data)
    h, w = rgb.shape[:2]
    angle = float(rng.uniform(*ROTATION_DEG)) * (1 if rng.random() < 0.5 else -1)
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    fill = tuple(int(c) for c in background_colour(rgb))
    return encode(cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                 borderValue=fill))


def _large(data: bytes, rng: np.random.Generator) -> bytes:
    rgb = photo_pixels(data)
    h, w = rgb.shape[:2]
    side = int(rng.integers(LARGE_SIDE_PX[0], LARGE_SIDE_PX[1] + 1))
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA
    return encode(cv2.resize(rgb, size, interpolation=interp), fmt=".jpg", quality=90)


SHIFTS: tuple[Shift, ...] = (
    Shift("none", "the photo as it is (baseline)", _identity),
    Shift("pad_1x1", "padded with its background colour to 1:1", _pad_to(1.0)),
    Shift("pad_3x4", "padded to 3:4 (portrait)", _pad_to(3 / 4)),
    Shift("pad_16x9", "padded to 16:9 (wide)", _pad_to(16 / 9)),
    Shift("crop_1x1", "centre-cropped to 1:1", _crop_square),
    Shift("small", f"product at {SMALL_SCALE:.0%} of each side of a larger frame", _small(on_photo=False)),
    Shift("photo_background", "cut out onto a real photograph", _on_photo),
    Shift("small_on_photo", f"at {SMALL_SCALE:.0%} of each side, on a real photograph", _small(on_photo=True)),
    Shift("jpeg_q30", "re-encoded as JPEG quality 30", _jpeg(30)),
    Shift("blur", f"Gaussian blur, sigma {BLUR_SIGMA:.1%} of the long side", _blur),
    Shift("dim", f"brightness x{BRIGHTNESS}", _levels(BRIGHTNESS, contrast=False)),
    Shift("low_contrast", f"contrast x{CONTRAST}", _levels(CONTRAST, contrast=True)),
    Shift("rotate", f"rotated {ROTATION_DEG[0]:.0f}-{ROTATION_DEG[1]:.0f} degrees either way", _rotate),
    Shift("large_source", f"upscaled to a {LARGE_SIDE_PX[0]}-{LARGE_SIDE_PX[1]} px JPEG (quality 90)", _large),
)


def shift_rng(seed: int, shift: str, index: int) -> np.random.Generator:
    """The generator for photo ``index`` under ``shift``: the same whatever order or subset is scored."""
    return np.random.default_rng([seed, zlib.crc32(shift.encode()), index])


# --- scoring ----------------------------------------------------------------------------------------------------


def pick_per_class(samples: Sequence[tuple[str, int]], per_class: int | None, seed: int) -> list[tuple[str, int]]:
    """At most ``per_class`` samples of each label, a seeded choice, in the input's order (all when falsy)."""
    if not per_class:
        return list(samples)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    labels = np.array([y for _, y in samples])
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        keep += idx[np.sort(rng.permutation(len(idx))[:per_class])].tolist() if len(idx) > per_class else idx.tolist()
    return [samples[i] for i in sorted(keep)]


def robustness_report(
    samples: Sequence[tuple[str, int]], *, size: tuple[int, int], in_chans: int,
    predict: Callable[[np.ndarray], np.ndarray], threshold: float, per_class: int | None = DEFAULT_PER_CLASS,
    seed: int = 0, shifts: Sequence[Shift] = SHIFTS, progress: bool = False,
) -> dict[str, Any]:
    """Score ``(path, label)`` samples under every shift.

    Args:
        samples: photo paths and their class indices (photos the worker can decode).
        size, in_chans: the model's input (``(H, W)`` px, 1 or 3 channels).
        predict: ``(N, H, W, C)`` uint8 -> ``(N, K)`` calibrated probabilities.
        threshold: the model's review threshold (rows with top-1 probability ``>=`` it are sorted).
        per_class: photos per class (:func:`pick_per_class`); 0 or None: all.
        seed: seeds the subset and every random choice of the shifts.

    Returns:
        ``{"seed", "per_class", "n_photos", "shifts": [{"name", "description", "n", "failed", "accuracy",
        "accuracy_drop", "coverage", "precision", "sorted", "errors_sorted", "failure_examples"}, ...],
        "not_measured", "backgrounds"}``; ``accuracy_drop`` is against the first shift (the baseline).
        A photo a shift cannot make, or whose result cannot be decoded, is counted in ``failed``.
    """
    chosen = pick_per_class(samples, per_class, seed)
    files = [Path(p).read_bytes() for p, _ in chosen]
    labels = np.array([y for _, y in chosen], dtype=np.int64)
    rows: list[dict[str, Any]] = []
    for shift in progress_display(shifts, desc="robustness", unit="shift", disable=not progress):
        images, ok, failures = _shifted(files, shift, size=size, in_chans=in_chans, seed=seed)
        probs = predict(images) if len(images) else np.zeros((0, 1), np.float32)
        y = labels[ok]
        acc = float((probs.argmax(1) == y).mean()) if len(y) else math.nan
        sel = selective_scores(probs, y, threshold)
        rows.append({"name": shift.name, "description": shift.description, "n": int(len(y)),
                     "failed": len(failures), "accuracy": acc, "coverage": sel["coverage"],
                     "precision": sel["precision"], "sorted": sel["sorted"], "errors_sorted": sel["errors_sorted"],
                     "failure_examples": failures[:5]})
    base = rows[0]["accuracy"] if rows else math.nan
    for r in rows:
        r["accuracy_drop"] = base - r["accuracy"]
    return {"seed": seed, "per_class": per_class or None, "n_photos": len(chosen), "threshold": float(threshold),
            "shifts": rows, "not_measured": dict(NOT_MEASURED), "backgrounds": BACKGROUND_CREDIT}


def _shifted(
    files: Sequence[bytes], shift: Shift, *, size: tuple[int, int], in_chans: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every file under ``shift``, decoded by the worker's decoder: ``(images, indices kept, failure reasons)``."""

    def one(i: int) -> np.ndarray | str:
        try:
            return decode_image(shift.apply(files[i], shift_rng(seed, shift.name, i)), size=size, in_chans=in_chans)
        except Exception as exc:  # a photo this shift cannot make is counted, never fatal
            return f"{type(exc).__name__}: {exc}"[:200]

    with ThreadPoolExecutor(min(8, usable_cpus())) as pool:
        results = list(pool.map(one, range(len(files))))
    ok = np.array([i for i, r in enumerate(results) if not isinstance(r, str)], dtype=np.int64)
    images = (np.stack([results[i] for i in ok]) if len(ok) else np.zeros((0, *size, in_chans), np.uint8))
    return images, ok, [r for r in results if isinstance(r, str)]


def shift_examples(data: bytes, *, size: tuple[int, int], in_chans: int, seed: int = 0,
                   shifts: Sequence[Shift] = SHIFTS) -> list[tuple[str, np.ndarray]]:
    """One photo under every shift as the model receives it: ``(name, (H, W, C) uint8)``; shifts that fail on it
    are left out."""
    out = []
    for s in shifts:
        try:
            out.append((s.name, decode_image(s.apply(data, shift_rng(seed, s.name, 0)), size=size,
                                             in_chans=in_chans)))
        except Exception as exc:  # shown only when it works
            log.debug("shift %s fails on the example photo: %s", s.name, exc)
    return out


# --- report output ----------------------------------------------------------------------------------------------


def plot_robustness(result: dict[str, Any], path: Path, *, target_precision: float | None = None) -> None:
    """A grouped bar plot per shift: top-1 accuracy, the share sorted automatically and their precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["shifts"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(rows) + 4), 4.8))
    series = (("accuracy", "top-1 accuracy"), ("coverage", "sorted automatically"),
              ("precision", "precision of the sorted"))
    for k, (key, label) in enumerate(series):
        vals = [0.0 if r[key] != r[key] else r[key] for r in rows]  # NaN (nothing sorted): no bar
        ax.bar(x + (k - 1) * 0.27, vals, width=0.27, label=label)
    if target_precision is not None:
        ax.axhline(target_precision, color="red", linestyle="--", linewidth=1,
                   label=f"promised precision {target_precision}")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=35, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="share",
           title=f"Robustness: {result['n_photos']} photos under each shift (threshold {result['threshold']:.3f})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_examples(examples: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One photo under every shift, as the model receives it, in a grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 7
    rows = max(1, math.ceil(len(examples) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, img) in zip(axes.flat, examples, strict=False):
        gray = img.shape[2] == 1
        ax.imshow(img[:, :, 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255)
        ax.set_title(name, fontsize=9)
    fig.suptitle("One photo under each shift, as the model receives it")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _f(v: float, fmt: str = ".3f") -> str:
    return "n/a" if v != v else format(v, fmt)


def robustness_markdown(result: dict[str, Any], *, target_precision: float | None = None) -> str:
    """The report.md section: one table row per shift, then what was not measured and the photo credit."""
    promised = f"; promised precision {target_precision}" if target_precision is not None else ""
    lines = [
        "", "## Robustness", "",
        f"The same {result['n_photos']} photos (at most {result['per_class'] or 'all'} per class, seed "
        f"{result['seed']}) under each shift, each shifted photo's bytes decoded by the worker's decoder. "
        f"Sorted automatically and precision are at the review threshold {result['threshold']:.4f}{promised}.",
        "",
        "| shift | what | n | top-1 | drop | sorted automatically | precision of the sorted | errors sorted | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["shifts"]:
        lines.append(f"| {r['name']} | {r['description']} | {r['n']} | {_f(r['accuracy'])} | "
                     f"{_f(r['accuracy_drop'], '+.3f')} | {_f(r['coverage'])} | {_f(r['precision'])} | "
                     f"{r['errors_sorted']} | {r['failed']} |")
    lines += ["", "Not measured:", ""]
    lines += [f"- {name}: {why}" for name, why in result["not_measured"].items()]
    lines += ["", result["backgrounds"], "", "![robustness](robustness.png)", "",
              "![robustness examples](robustness_examples.png)"]
    return "\n".join(lines) + "\n"
