"""Image decoding and preprocessing shared by training, evaluation and the worker.

One path for every source: encoded bytes → ``cv2.imdecode`` → RGB (or grayscale) → resize to the model's
input size → uint8 ``(H, W, C)``. Batches are stacked and normalised in one tensor operation by
:func:`to_model_input`, so no per-image float work is done in Python.

A second decoder serves the GPU path: :func:`batch_decodable_jpeg` picks the JPEGs that torchvision's batched
decoder (nvJPEG on CUDA) can take, and :func:`decode_jpeg_batch` decodes them on the device and resizes them there
by the same rule (:func:`resize_on_device`, within a level or two of OpenCV, not bit-exact). nvJPEG's pixels
may differ from libjpeg-turbo's by a level or two (its IDCT and chroma upsampling); on the CPU torchvision gives
OpenCV's. What counts is that the model's top-1 agrees with the OpenCV path's (tests/test_gpu_path.py).
"""

from __future__ import annotations

import functools
import io
import os
import warnings

# OpenCV's own guard against decompression bombs; read once when cv2 is imported.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**28))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.errors import ImageError  # noqa: E402

cv2.setNumThreads(1)  # decode threads run in our own pool; OpenCV's pool would oversubscribe the cores

MIN_SIDE_PX = 8
_JPEG_SOI = b"\xff\xd8"
_EXIF_ORIENTATION = 0x0112  # the EXIF tag
_TOO_LARGE = "image dimensions too large"


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
        return f"{_TOO_LARGE}: {exc}"[:300]
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
        _check_jpeg_end(data)
        flag = cv2.IMREAD_COLOR if in_chans == 3 else cv2.IMREAD_GRAYSCALE
    else:
        flag = cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error as exc:
        reason = _why_undecodable(data)
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc) and not reason.startswith(_TOO_LARGE):
            reason = f"{_TOO_LARGE}: {reason}"[:300]
        raise ImageError(reason) from None
    if img is None or img.size == 0:
        raise ImageError(_why_undecodable(data))
    h, w = img.shape[:2]
    _check_dimensions(h, w, max_pixels)
    if not is_jpeg:
        img = _to_8bit_rgb_or_gray(img, in_chans)
    elif in_chans == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = resize_for_model(img, size)
    if img.ndim == 2:
        img = img[:, :, None]
    return img


def _check_jpeg_end(data: bytes) -> None:
    # libjpeg fills a truncated JPEG with grey and only warns: check for the end-of-image marker.
    if b"\xff\xd9" not in data[-4096:]:
        raise ImageError(f"truncated JPEG (no end-of-image marker, {len(data)} bytes)")


def _check_dimensions(h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise ImageError(f"{_TOO_LARGE}: {w}x{h} px exceeds {max_pixels} pixels")
    if min(h, w) < MIN_SIDE_PX:
        raise ImageError(f"image too small: {w}x{h} px, need at least {MIN_SIDE_PX} px a side")


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
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)  # type: ignore[call-overload]  # stubs lack dst=None
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


def batch_decodable_jpeg(data: bytes, *, max_pixels: int = 100_000_000) -> bool:
    """Whether ``data`` goes to :func:`decode_jpeg_batch` rather than :func:`decode_image`.

    Pillow reads the headers (not the pixels): True for a complete JPEG that Pillow opens as 8-bit RGB or
    grayscale, with no EXIF rotation (torchvision's CUDA decoder does not apply it), within the size limits.
    Everything else (PNG, CMYK, 12-bit, rotated, headers Pillow cannot read) is left to :func:`decode_image`, which
    decodes it or says why not.

    Raises:
        ImageError: a JPEG that :func:`decode_image` would refuse for the same reason, with the same message:
            truncated, too small (< 8 px a side) or more than ``max_pixels`` pixels.
    """
    from PIL import Image

    if data[:2] != _JPEG_SOI:
        return False
    _check_jpeg_end(data)
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            (w, h), mode, orientation = im.size, im.mode, im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # unreadable headers, a decompression bomb: decode_image says why
        return False
    if mode not in ("RGB", "L") or orientation != 1:
        return False
    _check_dimensions(h, w, max_pixels)
    return True



def decode_jpeg_batch(
    encoded: list[torch.Tensor], *, size: tuple[int, int], in_chans: int, device: torch.device | str
) -> tuple[torch.Tensor, list[int]]:
    """Decode JPEGs with torchvision and resize them for a model, on ``device``.

    On CUDA the whole list is decoded in one call by nvJPEG; on the CPU by libjpeg-turbo (OpenCV's decoder, so
    the pixels are OpenCV's). When the batch call fails (one damaged file fails it all), each image is decoded
    alone. Pick the files with :func:`batch_decodable_jpeg`: EXIF orientation is not applied.

    Args:
        encoded: the files, each a 1-D uint8 tensor on the CPU.
        size: ``(H, W)`` of the output in pixels.
        in_chans: 3 for RGB, 1 for grayscale.
        device: where the images are decoded and resized.

    Returns:
        ``(images, ok)``: ``images`` is ``(len(ok), H, W, in_chans)`` uint8 (contiguous) on ``device``, RGB
        order, resized by :func:`resize_on_device`; ``ok`` holds the index in ``encoded`` of each of its rows.
        Files that could not be decoded are missing from ``ok``: :func:`decode_image` decodes them or says why.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work.
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=mode, device=device))
        except RuntimeError:
            decoded = []
            for one in encoded:
                try:
                    decoded.append(decode_jpeg(one, mode=mode, device=device))
                except RuntimeError:
                    decoded.append(None)
    ok = [i for i, img in enumerate(decoded) if img is not None]
    if not ok:
        return torch.empty((0, *size, in_chans), dtype=torch.uint8, device=device), []
    # one image at a time: a float copy of one photo, never of the whole batch, is in memory
    images = torch.stack([resize_on_device(img, size) for img in decoded if img is not None])
    return images.permute(0, 2, 3, 1).contiguous(), ok


def resize_on_device(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(C, h, w)`` uint8 to ``(C, H, W)`` uint8 (``size`` = ``(H, W)`` px) on the image's device, by
    the rule of :func:`resize_for_model`, aspect ratio not kept: when the image shrinks (``H * W < h * w``), an
    area average along each axis that shrinks (each output pixel the coverage-weighted mean of the input pixels
    its cell covers); otherwise, and along an axis that grows, bilinear with half-pixel centres. Within a level
    of OpenCV's ``INTER_AREA`` / ``INTER_LINEAR``, not bit-exact, except where the image shrinks but one side
    grows: there OpenCV samples both axes with two taps, and this rule averages the shrinking one.

    Two float32 matrix products, ``(H, h) @ (C, h, w) @ (w, W)``. ``interpolate(..., antialias=True)`` was tried
    and dropped: its triangle filter blurs more than the area filter. With a 3-class MobileNetV2 footwear probe,
    shrinking to 71x95 px, it changed the top-1 against the OpenCV path on 1% of catalogue photos and 10% of real
    photos (177-4500 px); this rule on none of either.
    """
    h, w = image.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return image
    area = h * w > th * tw
    rows = _axis_weights(h, th, area, image.device)
    cols = _axis_weights(w, tw, area, image.device)
    out = torch.matmul(torch.matmul(rows, image.float()), cols.T)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=256)
def _axis_weights(src: int, dst: int, area: bool, device: torch.device) -> torch.Tensor:
    """``(dst, src)`` float32 resampling weights along one axis (area when ``area`` and it shrinks, else
    bilinear); each row sums to 1."""
    i = torch.arange(dst, dtype=torch.float64)[:, None]
    j = torch.arange(src, dtype=torch.float64)[None, :]
    if area and dst < src:  # the overlap of input pixel [j, j + 1) with output cell [i * s, (i + 1) * s)
        s = src / dst
        weights = (torch.minimum(j + 1, (i + 1) * s) - torch.maximum(j, i * s)).clamp_(min=0) / s
    else:  # the two input pixels either side of the output pixel's centre, edges repeated
        x = ((i + 0.5) * (src / dst) - 0.5).clamp(0, src - 1)
        x0 = x.floor()
        frac = x - x0
        weights = (1 - frac) * (j == x0) + frac * (j == (x0 + 1).clamp(max=src - 1))
    return weights.to(device=device, dtype=torch.float32)
