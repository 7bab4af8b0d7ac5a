"""Cut a product out of its plain (catalogue) background and composite it onto a real photograph.

Shared by the robustness shifts of ``invsort evaluate`` (:mod:`pipeline.evaluation.robustness`) and the
background augmentation of ``invsort train`` (:class:`pipeline.training.transforms.PasteOnBackground`): pixels
in, pixels out, every random choice from the ``numpy.random.Generator`` the caller passes.

The cut-out: the background colour is the median of a thin border band (white for catalogue shots, black for
Fashion-MNIST); pixels within a tolerance of it are background candidates; a morphological close and open (OpenCV)
clean the mask, and only background regions connected to the image border count as background, so light parts
inside the product (a white sole, laces) stay product; the edge is feathered. A photo with no uniform background
(already a real photo) keeps most of its pixels.

Background photographs: scikit-learn's sample images (:func:`sklearn.datasets.load_sample_images`:
``china.jpg``, a temple, and ``flower.jpg``, a flower close-up, 640x427 each), shipped inside scikit-learn's
wheel, which is already a dependency, so nothing is downloaded and no package is added. Their licence is Creative
Commons Attribution 2.0 (``sklearn/datasets/images/README.txt``: china.jpg by danielbuechele, flower.jpg by
vultilion on Flickr, retrieved by Robert Layton); reports and model cards credit them (:data:`BACKGROUND_CREDIT`).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

#: A pixel whose largest channel difference from the background colour is at most this is a background candidate.
BACKGROUND_TOLERANCE = 24
BACKGROUND_CREDIT = (
    "Background photographs: scikit-learn's sample images china.jpg (danielbuechele) and flower.jpg (vultilion), "
    "Flickr, CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/)."
)


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """The median colour of a border band (3 % of the short side, at least 1 px): ``(3,)`` uint8."""
    h, w = rgb.shape[:2]
    b = max(1, round(0.03 * min(h, w)))
    band = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3), rgb[:, :b].reshape(-1, 3),
                           rgb[:, -b:].reshape(-1, 3)])
    return np.median(band, axis=0).astype(np.uint8)


def product_mask(rgb: np.ndarray, bg: np.ndarray | None = None, *, tol: int = BACKGROUND_TOLERANCE) -> np.ndarray:
    """``(h, w)`` float32 in 0..1: 1 on the product, 0 on its (near-uniform) background, feathered at the edge.

    Threshold the largest channel difference from the background colour, close (fill small gaps) and open
    (drop specks) with an elliptic kernel of ~2 % of the long side, then call background only the candidate
    regions that touch the image border.
    """
    bg = background_colour(rgb) if bg is None else bg
    diff = np.abs(rgb.astype(np.int16) - bg.astype(np.int16)).max(axis=2)
    fg = (diff > tol).astype(np.uint8)
    k = max(3, round(0.02 * max(rgb.shape[:2])) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    _, labels = cv2.connectedComponents((1 - fg).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0]) & (fg == 0)
    mask = (~background).astype(np.float32)
    return cv2.GaussianBlur(mask, (3, 3), 0)


@functools.lru_cache(maxsize=4)
def background_photos(max_side: int | None = None) -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photographs (china.jpg, flower.jpg, 640x427) as RGB uint8, read once per process;
    with ``max_side``, shrunk (area interpolation) so that their longer side is at most that many pixels."""
    from sklearn.datasets import load_sample_images

    photos = [np.ascontiguousarray(img, dtype=np.uint8) for img in load_sample_images().images]
    if max_side is not None:
        photos = [_shrink(p, max_side) for p in photos]
    return tuple(photos)


def _shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return rgb
    return cv2.resize(rgb, (max(2, round(w * s)), max(2, round(h * s))), interpolation=cv2.INTER_AREA)


def background_crop(rng: np.random.Generator, h: int, w: int, *, max_side: int | None = None) -> np.ndarray:
    """A random crop of one of :func:`background_photos` (``max_side``: of their shrunk copies, which makes the
    crop several times faster for a small frame) with aspect ``w / h`` (40-100 % of the largest such crop,
    mirrored at random), resized to ``(h, w, 3)`` uint8."""
    photos = background_photos(max_side)
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    ch, cw = (ph, ph * w / h) if pw / ph > w / h else (pw * h / w, pw)
    s = rng.uniform(0.4, 1.0)
    ch, cw = max(2, round(ch * s)), max(2, round(cw * s))
    y, x = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    crop = photo[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if ch * cw > h * w else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=interp)


def paste(canvas: np.ndarray, rgb: np.ndarray, mask: np.ndarray, y: int, x: int) -> np.ndarray:
    """``rgb`` composited onto ``canvas`` at ``(y, x)`` through ``mask`` (0..1); returns a new uint8 array.

    ``canvas`` and ``rgb`` have the same number of channels; ``rgb`` fits inside ``canvas`` at ``(y, x)``.
    """
    out = canvas.astype(np.float32)
    h, w = rgb.shape[:2]
    m = mask[:, :, None]
    out[y : y + h, x : x + w] = rgb.astype(np.float32) * m + out[y : y + h, x : x + w] * (1.0 - m)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
