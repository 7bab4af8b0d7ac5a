"""Image decoding and preprocessing shared by training, evaluation and the worker.

One path for every source: encoded bytes → ``cv2.imdecode`` → RGB (or grayscale) → resize to the model's
input size → uint8 ``(H, W, C)``. Batches are stacked and normalised in one tensor operation by
:func:`to_model_input`, so no per-image float work is done in Python.
"""

from __future__ import annotations

import io
import os

# OpenCV's own guard against decompression bombs; read once when cv2 is imported.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**28))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.errors import ImageError  # noqa: E402

cv2.setNumThreads(1)  # decode threads run in our own pool; OpenCV's pool would oversubscribe the cores

MIN_SIDE_PX = 8
_JPEG_SOI = b"\xff\xd8"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _why_undecodable(data: bytes) -> str:
    """A specific reason for bytes OpenCV could not decode (failure path only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = im.format
            try:
                im.load()
            except Exception as exc:
                return f"corrupt or truncated {fmt} image ({w}x{h} px): {exc}"[:300]
            return f"{fmt} image ({w}x{h} px, mode {im.mode}) that OpenCV cannot decode"
    except UnidentifiedImageError:
        return f"not an image (unrecognised format, {len(data)} bytes starting {data[:8]!r})"
    except Image.DecompressionBombError as exc:
        return f"image dimensions too large: {exc}"[:300]
    except Exception as exc:
        return f"not a decodable image: {exc}"[:300]


def decode_image(
    data: bytes, *, size: tuple[int, int], in_chans: int = 3, max_pixels: int = 100_000_000
) -> np.ndarray:
    """Decode encoded image bytes and resize them for a model.

    Args:
        data: the encoded file (JPEG, PNG, WebP, BMP, TIFF).
        size: ``(H, W)`` of the output in pixels.
        in_chans: 3 for RGB output, 1 for grayscale.
        max_pixels: images whose decoded width x height exceeds this fail.

    Returns:
        ``(H, W, in_chans)`` uint8, RGB channel order. Transparent pixels are composited onto white
        (catalogue photos' background); 16-bit images are scaled to 8 bits; JPEG EXIF orientation is applied.

    Raises:
        ImageError: empty, not an image, truncated, too small (< 8 px a side) or too large; the message is
            the reason stored on the item's ``failed`` row.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    buf = np.frombuffer(data, dtype=np.uint8)
    is_jpeg = data[:2] == _JPEG_SOI
    if is_jpeg:
        # libjpeg fills a truncated JPEG with grey and only warns: check for the end-of-image marker.
        if b"\xff\xd9" not in data[-4096:]:
            raise ImageError(f"truncated JPEG (no end-of-image marker, {len(data)} bytes)")
        flag = cv2.IMREAD_COLOR if in_chans == 3 else cv2.IMREAD_GRAYSCALE
    else:
        flag = cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise ImageError(f"image dimensions too large: {_why_undecodable(data)}"[:300]) from None
        raise ImageError(_why_undecodable(data)) from None
    if img is None or img.size == 0:
        raise ImageError(_why_undecodable(data))
    h, w = img.shape[:2]
    if h * w > max_pixels:
        raise ImageError(f"image dimensions too large: {w}x{h} px exceeds {max_pixels} pixels")
    if min(h, w) < MIN_SIDE_PX:
        raise ImageError(f"image too small: {w}x{h} px, need at least {MIN_SIDE_PX} px a side")
    if not is_jpeg:
        img = _to_8bit_rgb_or_gray(img, in_chans)
    elif in_chans == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = resize_for_model(img, size)
    if img.ndim == 2:
        img = img[:, :, None]
    return img


def resize_for_model(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(h, w[, C])`` uint8 to ``size`` ``(H, W)`` px, aspect ratio not kept: OpenCV ``INTER_AREA`` when
    shrinking (no aliasing), ``INTER_LINEAR`` when enlarging. The one resize rule of the worker, training and the
    evaluation preset. A 3-D single-channel input comes back 2-D (OpenCV drops the channel axis)."""
    h, w = img.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return img
    interp = cv2.INTER_AREA if h * w > th * tw else cv2.INTER_LINEAR
    return cv2.resize(img, (tw, th), interpolation=interp)


def _to_8bit_rgb_or_gray(img: np.ndarray, in_chans: int) -> np.ndarray:
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return img if in_chans == 1 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    elif channels == 1:
        img = img[:, :, 0]
        return img if in_chans == 1 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if in_chans == 1 else cv2.COLOR_BGR2RGB)


def to_model_input(
    batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalise a stacked batch for the model.

    Args:
        batch: ``(N, H, W, C)`` uint8, on any device.
        mean, std: ``(1, C, 1, 1)`` float32 on the same device, in 0..1 units.

    Returns:
        ``(N, C, H, W)`` float (``dtype``), in channels_last memory format (a permute of NHWC is exactly that),
        ``(x / 255 - mean) / std``.
    """
    x = batch.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    return x.sub_(mean.to(dtype)).div_(std.to(dtype))
