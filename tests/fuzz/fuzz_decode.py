"""Fuzz the image header checks and the decode path with mutated real photos (atheris, coverage-guided).

Run (ten minutes; options are libFuzzer's, the defaults below apply to those not given):

    .venv/bin/python -m tests.fuzz.fuzz_decode -max_total_time=600

Each input is handed, as the worker hands a fetched file, to the public decode path:

* :func:`pipeline.io.images.decode_image` (RGB and greyscale, a ``FUZZ_MAX_PIXELS`` limit), and any public header
  check that :mod:`pipeline.io.images` has (a function whose name has ``header`` in it, called with the bytes
  and ``max_pixels``);
* :func:`pipeline.io.images.batch_decodable_jpeg` (Pillow's header read that routes JPEGs to the GPU decoder)
  and, for the JPEGs it accepts, :func:`pipeline.io.images.decode_jpeg_batch` on the CPU.

The contract: :class:`~pipeline.errors.ImageError` or a ``(size, in_chans)`` uint8 array. A finding is any other
exception or warning (warnings are errors, as under pytest), a file ``batch_decodable_jpeg`` refuses that
``decode_image`` decodes, a hang (``-timeout``), or a memory spike: the peak RSS growing by more than
``FUZZ_SPIKE_MB`` (default 512 MiB) over its value after the first input, or libFuzzer's ``-rss_limit_mb``.
libFuzzer writes the input to ``.fuzz/decode/crash-*`` (``timeout-*``, ``oom-*``); re-run one with
``python -m tests.fuzz.fuzz_decode FILE``. Every finding becomes a test in ``tests/test_fuzz_regressions.py``.

Coverage guidance comes from the Python code instrumented below (``pipeline.io`` and Pillow's decoders, which
``decode_image`` uses to say why a file failed); OpenCV's C++ decoders run uninstrumented, checked for crashes,
hangs and memory only.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings

import atheris

with atheris.instrument_imports(include=["pipeline", "PIL"]):
    import cv2
    import numpy as np
    import torch
    from PIL import Image

    import pipeline.io.headers as png_headers
    import pipeline.io.images as images
    from pipeline.errors import ImageError

    Image.init()  # imports every Pillow format plugin now, so that they are instrumented too

from tests.fuzz.common import Finding, KnownFindings, RssGuard, main  # noqa: E402
from tests.fuzz.seeds import IMAGE_TOKENS, image_seeds  # noqa: E402

SIZE = (24, 32)  # (H, W): the seeds shrink along one axis and grow along the other
MAX_PIXELS = int(os.environ.get("FUZZ_MAX_PIXELS", 4_000_000))
GUARD = RssGuard(int(os.environ.get("FUZZ_SPIKE_MB", 512)))
DEFAULTS = {"-max_len": "20000", "-timeout": "10", "-rss_limit_mb": "3072", "-print_final_stats": "1"}

# Findings reported but not yet fixed, each with its failing test in tests/test_fuzz_regressions.py, so that a long
# run goes on past them: Known(name, exception type, message pattern, our innermost function). Take one out when it
# is fixed (a recurrence then stops the run); FUZZ_STRICT=1 stops on listed ones too.
KNOWN = KnownFindings([])  # both findings of the first runs (a cut JPEG frame header, a BigTIFF offset >= 2**63)
# are fixed in pipeline/io/headers.py and have their regression tests

# A header check before decoding, if the module has one (found by name, so the harness follows the code).
HEADER_CHECKS = [
    f for name, f in inspect.getmembers(images, inspect.isfunction)
    if "header" in name.lower() and not name.startswith("_") and f.__module__ == images.__name__
]


def _expect_image(img: object, in_chans: int) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != (*SIZE, in_chans):
        raise Finding(f"decode_image returned {type(img).__name__} "
                      f"{getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}, expected uint8 {(*SIZE, in_chans)}")


def _decode(data: bytes, in_chans: int) -> bool:
    try:
        img = images.decode_image(data, size=SIZE, in_chans=in_chans, max_pixels=MAX_PIXELS)
    except ImageError as exc:
        if not str(exc):
            raise Finding("ImageError without a reason") from exc
        if str(exc).startswith(("not an image", "not a decodable image")):
            _opencv_decodes(data, str(exc))
        return False
    _expect_image(img, in_chans)
    return True


def _opencv_decodes(data: bytes, reason: str) -> None:
    """A file refused as not an image (by a header check) that OpenCV decodes within the limits: a finding.

    A PNG-signed file with a chunk longer than the file is not handed to OpenCV here: its reader allocates the
    claimed length first (finding 3 of the README; the worker refuses such files before OpenCV sees them), so the
    oracle itself would be the memory spike (a 20-byte file with a 4 GB chunk length took this harness to 3.3 GB).
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        try:
            png_headers._check_png_chunks(data)
        except ImageError:
            return
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return
    if img is None or min(img.shape[:2]) < images.MIN_SIDE_PX or img.shape[0] * img.shape[1] > MAX_PIXELS:
        return
    channels = img.shape[2] if img.ndim == 3 else 1
    raise Finding(f"refused as {reason[:60]!r}, but OpenCV decodes it: {img.shape[1]}x{img.shape[0]} px, "
                  f"{channels} x {img.dtype}")


def _header_checks(data: bytes) -> list[object]:
    """What each header check returns for ``data`` (ImageError: left out)."""
    out = []
    for check in HEADER_CHECKS:
        with contextlib.suppress(ImageError):
            out.append(check(data, max_pixels=MAX_PIXELS))
    return out


def _under_declared(data: bytes, headers: list[object]) -> None:
    """A header that declares fewer pixels than OpenCV decodes lets the decode past the pixel limit (and past a
    decode budget sized from the header): a finding."""
    declared = [h for h in headers if isinstance(getattr(h, "width", None), int)]
    if not declared:
        return
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return
    h, w = img.shape[:2]
    for header in declared:
        if h * w > header.width * header.height:  # type: ignore[attr-defined]
            raise Finding(f"header check declares {header}, OpenCV decodes {w}x{h} px")


def _gpu_route(data: bytes) -> bool | None:
    """``batch_decodable_jpeg``'s answer (None: it raised ImageError), and the CPU run of the batch decoder."""
    try:
        if not images.batch_decodable_jpeg(data, max_pixels=MAX_PIXELS):
            return False
    except ImageError:
        return None
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    for in_chans in (3, 1):
        out, ok = images.decode_jpeg_batch([encoded], size=SIZE, in_chans=in_chans, device="cpu")
        if out.shape != (len(ok), *SIZE, in_chans) or out.dtype != torch.uint8:
            raise Finding(f"decode_jpeg_batch returned {tuple(out.shape)} {out.dtype} for ok={ok}")
    return True


def test_one_input(data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            headers = _header_checks(data)
            route = _gpu_route(data)
            decoded = [_decode(data, in_chans) for in_chans in (3, 1)]
            if decoded[0]:
                _under_declared(data, headers)
    except Exception as exc:
        if KNOWN.tolerate(exc, data):
            GUARD.check(f"{len(data)} bytes starting {data[:16]!r}")
            return
        raise
    if decoded[0] != decoded[1]:
        raise Finding(f"decoded as RGB: {decoded[0]}, as greyscale: {decoded[1]}")
    if route is None and decoded[0]:
        raise Finding("batch_decodable_jpeg refused a JPEG (ImageError) that decode_image decodes")
    GUARD.check(f"{len(data)} bytes starting {data[:16]!r}")


if __name__ == "__main__":
    print(f"header checks fuzzed: {[f.__name__ for f in HEADER_CHECKS] or 'none in pipeline.io.images'}",
          file=sys.stderr)
    main("decode", test_one_input, image_seeds, IMAGE_TOKENS, DEFAULTS)
