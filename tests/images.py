"""Real image files for tests: the bundled examples, encoded photos, and each kind of bad file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
SHARED = ROOT.parent / "shared"
FOOTWEAR_TAR = SHARED / "data" / "shoe_sandal_boot_dev.tar"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"


def example_files() -> list[Path]:
    return sorted(EXAMPLES.rglob("*.png"))


def photo_jpeg(seed: int = 0, size: tuple[int, int] = (102, 136)) -> bytes:
    """A real JPEG (a shaded ellipse on white, like a catalogue shot)."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    color = tuple(int(c) for c in rng.integers(0, 200, 3))
    cv2.ellipse(img, (w // 2, h // 2), (w // 3, h // 4), int(rng.integers(0, 180)), 0, 360, color, -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def truncated_jpeg() -> bytes:
    data = photo_jpeg(1, (300, 400))
    return data[: len(data) // 2]


def tiny_png() -> bytes:
    ok, buf = cv2.imencode(".png", np.zeros((3, 3, 3), np.uint8))
    assert ok
    return buf.tobytes()


def huge_png(side: int = 200_000) -> bytes:
    """A PNG whose header claims ``side`` x ``side`` pixels (a decompression bomb's shape), a few bytes long."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD_IMAGES: dict[str, bytes] = {
    "zero_bytes.jpg": b"",
    "text_renamed.jpg": b"this is a text file, not a photo\n",
    "truncated.jpg": truncated_jpeg(),
    "tiny_3x3.png": tiny_png(),
    "huge_dimensions.png": huge_png(),
}
