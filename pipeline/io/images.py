"""Image decoding and preprocessing shared by training, evaluation and the worker.

One path for every source: encoded bytes → ``cv2.imdecode`` → RGB (or grayscale) → resize to the model's
input size → uint8 ``(H, W, C)``. Batches are stacked and normalised in one tensor operation by
:func:`to_model_input`, so no per-image float work is done in Python.

A second decoder serves the GPU path: :func:`batch_decodable_jpeg` picks the JPEGs that torchvision's batched
decoder (nvJPEG on CUDA) can take, and :func:`decode_jpeg_batch` decodes and resizes them on the device by the
same resize rule (:func:`resize_on_device`, within one level of OpenCV). nvJPEG's pixels themselves may differ
from libjpeg-turbo's by a level or two (its IDCT and chroma upsampling); on the CPU torchvision gives OpenCV's.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Literal

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
        _check_jpeg_end(data)
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
        raise ImageError(f"image dimensions too large: {w}x{h} px exceeds {max_pixels} pixels")
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


# Frame headers (ITU T.81 table B.1) of the processes torchvision's batched decoder takes: baseline and
# progressive Huffman. Extended, lossless and arithmetic-coded JPEGs stay with OpenCV.
_SOF_BASELINE, _SOF_PROGRESSIVE = 0xC0, 0xC2
_RESIZE_CHUNK_ELEMENTS = 2**28
_SOF_ANY = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's headers say, read without decoding it. ``orientation`` is the EXIF tag (1..8; 1 when
    there is no EXIF block, 0 when the block cannot be read)."""

    sof: int
    precision: int
    height: int
    width: int
    components: int
    orientation: int


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG (and its EXIF orientation), or None when ``data`` is not a JPEG or its
    markers are damaged before the frame header. Reads only the segments before the first scan."""
    if data[:2] != _JPEG_SOI:
        return None
    pos, end, orientation = 2, len(data), 1
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        segment = data[pos + 4 : pos + 2 + length]
        if marker in _SOF_ANY:
            if len(segment) < 6:
                return None
            return JpegHeader(
                sof=marker,
                precision=segment[0],
                height=int.from_bytes(segment[1:3], "big"),
                width=int.from_bytes(segment[3:5], "big"),
                components=segment[5],
                orientation=orientation,
            )
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(segment[6:])
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 of an EXIF (TIFF) block: 1..8, 1 when absent, 0 when the block is unreadable."""
    if tiff[:2] not in (b"II", b"MM") or len(tiff) < 8:
        return 0
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 0
    for i in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return 0
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8 : entry + 10], order)  # a SHORT sits first in the value field
    return 1


def batch_decodable_jpeg(data: bytes, *, max_pixels: int = 100_000_000) -> bool:
    """Whether ``data`` goes to :func:`decode_jpeg_batch` rather than :func:`decode_image`.

    True for a complete baseline or progressive JPEG, 8 bits, 1 or 3 components, no EXIF rotation (nvJPEG
    does not rotate), within the size limits. Everything else (PNG, CMYK, 12-bit, rotated, unreadable headers)
    is left to :func:`decode_image`, which decodes it or says why not.

    Raises:
        ImageError: a JPEG that :func:`decode_image` would refuse for the same reason, with the same message:
            truncated, too small (< 8 px a side) or more than ``max_pixels`` pixels.
    """
    if not data or data[:2] != _JPEG_SOI:
        return False
    _check_jpeg_end(data)
    head = read_jpeg_header(data)
    if (
        head is None
        or head.sof not in (_SOF_BASELINE, _SOF_PROGRESSIVE)
        or head.precision != 8
        or head.components not in (1, 3)
        or head.orientation != 1
        or head.height == 0  # height given later by a DNL marker
    ):
        return False
    _check_dimensions(head.height, head.width, max_pixels)
    return True


def decode_jpeg_batch(
    encoded: list[torch.Tensor], *, size: tuple[int, int], in_chans: int, device: torch.device | str
) -> tuple[torch.Tensor, list[int]]:
    """Decode JPEGs with torchvision and resize them for a model, on ``device``.

    On CUDA the whole list is decoded in one call by nvJPEG (hardware decoder where the GPU has one); on the CPU
    by libjpeg-turbo, which gives the same pixels as OpenCV. When the batch call fails (one damaged file fails it
    all), each image is decoded alone.

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
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, img in enumerate(decoded):
        if img is not None:
            by_shape.setdefault(tuple(img.shape), []).append((i, img))
    if not by_shape:
        return torch.empty((0, *size, in_chans), dtype=torch.uint8, device=device), []
    # Same-sized images (a catalogue's usual case) are resized together, in chunks whose float32 or int32
    # working copy stays under 1 GiB (64 12-megapixel photos would need 9 GiB at once).
    parts = []
    for (c, h, w), group in by_shape.items():
        step = max(1, _RESIZE_CHUNK_ELEMENTS // (c * h * w))
        for start in range(0, len(group), step):
            parts.append(resize_on_device(torch.stack([img for _, img in group[start : start + step]]), size))
    ok = [i for group in by_shape.values() for i, _ in group]
    return torch.cat(parts) if len(parts) > 1 else parts[0], ok


def resize_on_device(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, C, h, w)`` uint8 to ``(N, H, W, C)`` uint8 (``size`` = ``(H, W)`` px) on the images' device,
    by the rule of :func:`resize_for_model`: OpenCV ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when
    enlarging, aspect ratio not kept.

    The arithmetic is OpenCV's (``cv::resize`` for 8-bit images, ``imgproc/src/resize.cpp``), so the pixels are
    those of ``cv2.resize``: bilinear in 11-bit fixed point with OpenCV's truncations, bit for bit; area averages
    in float32 with OpenCV's rounding, where a few pixels in 10^4 may differ by one level (summation order).
    Checked against OpenCV 5.0 in the tests. ``interpolate(..., antialias=True)`` was tried first and dropped:
    its triangle filter blurs more than the area filter, and on footwear photos shrunk 1.4x it changed an
    ImageNet classifier's top-1 on 16% of them.
    """
    h, w = images.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        out = images
    elif h * w > th * tw and h >= th and w >= tw:
        out = _resize_area(images, size)
    else:  # enlarging; or INTER_AREA with one side growing, which OpenCV runs bilinearly with its own offsets
        out = _resize_linear(images, size, area_offsets=h * w > th * tw)
    # channels_last then permute: a contiguous NHWC batch, like the stacked CPU one
    return out.to(torch.uint8, memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _resize_area(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = images.shape[-2:]
    th, tw = size
    if h % th == 0 and w % tw == 0:  # OpenCV's fast path: block sums (exact in float32 up to 256x256 blocks)
        kh, kw = h // th, w // tw
        sums = images.float().unflatten(3, (tw, kw)).unflatten(2, (th, kh)).sum(dim=(3, 5))
        if kh == kw == 2:  # its SIMD kernel rounds half up
            return torch.div(sums + 2, 4, rounding_mode="floor")
        return (sums * torch.tensor(1.0 / (kh * kw), dtype=torch.float32)).round_()
    wy = torch.from_numpy(_area_weights(h, th)).to(images.device)
    wx = torch.from_numpy(_area_weights(w, tw)).to(images.device)
    return torch.matmul(torch.matmul(wy, images.float()), wx.T).round_()  # (H, h) @ (N, C, h, w) @ (w, W)


def _resize_linear(images: torch.Tensor, size: tuple[int, int], *, area_offsets: bool) -> torch.Tensor:
    (xi0, xi1, xa0, xa1), (yi0, yi1, yb0, yb1) = (
        (torch.from_numpy(t).to(images.device) for t in _linear_taps(src, dst, area_offsets, vertical))
        for src, dst, vertical in ((images.shape[3], size[1], False), (images.shape[2], size[0], True))
    )
    x = images.to(torch.int32)
    rows = (x.index_select(3, xi0) * xa0 + x.index_select(3, xi1) * xa1) >> 4  # (N, C, h, W), as OpenCV packs
    out = ((rows.index_select(2, yi0) * yb0[:, None]) >> 16) + ((rows.index_select(2, yi1) * yb1[:, None]) >> 16)
    return ((out + 2) >> 2).clamp_(0, 255)


@functools.lru_cache(maxsize=256)
def _area_weights(src: int, dst: int) -> np.ndarray:
    """``(dst, src)`` float32: each output pixel averages the input pixels its cell covers, weighted by coverage
    (OpenCV's ``computeResizeAreaTab``)."""
    m = np.zeros((dst, src), np.float64)
    scale = 1.0 / (dst / src)
    for dx in range(dst):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, src - fsx1)
        sx2 = min(math.floor(fsx2), src - 1)
        sx1 = min(math.ceil(fsx1), sx2)
        if sx1 - fsx1 > 1e-3:
            m[dx, sx1 - 1] += (sx1 - fsx1) / cell
        m[dx, sx1:sx2] += 1.0 / cell
        if fsx2 - sx2 > 1e-3:
            m[dx, sx2] += min(fsx2 - sx2, 1.0, cell) / cell
    return m.astype(np.float32)


@functools.lru_cache(maxsize=256)
def _linear_taps(src: int, dst: int, area_offsets: bool, vertical: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's two taps per output pixel: indices ``(i0, i1)`` (int64) and 11-bit weights ``(a0, a1)`` (int32).

    ``area_offsets``: the offsets of ``INTER_AREA`` with a side growing. Horizontally OpenCV moves taps that fall
    off the image onto the edge pixel with weight 1; vertically it keeps the weights and repeats the edge row.
    """
    inv_scale = dst / src
    scale = 1.0 / inv_scale
    i0, i1, a0, a1 = (np.zeros(dst, np.int64) for _ in range(4))
    for d in range(dst):
        if area_offsets:
            s = math.floor(d * scale)
            f = float(np.float32((d + 1) - (s + 1) * inv_scale))
            f = 0.0 if f <= 0 else f - math.floor(f)
        else:
            f = float(np.float32((d + 0.5) * scale - 0.5))
            s = math.floor(f)
            f = float(np.float32(f - s))
        if not vertical and s < 0:
            s, f = 0, 0.0
        if not vertical and s >= src - 1:
            s, f = src - 1, 0.0
        i0[d], i1[d] = min(max(s, 0), src - 1), min(max(s + 1, 0), src - 1)
        a0[d], a1[d] = round(float(np.float32(1.0) - np.float32(f)) * 2048), round(f * 2048)
    return i0, i1, a0.astype(np.int32), a1.astype(np.int32)
