"""Fashion-MNIST (Xiao et al. 2017, MIT licence) as a folder-per-category tree of PNG files.

Reads the idx files of Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``)
or any folder holding ``{train,t10k}-{images,labels}-idx{3,1}-ubyte[.gz]``; no download is attempted.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import SourceError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def _open(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    raise SourceError(
        f"Fashion-MNIST file {path.name}[.gz] not found in {path.parent}: "
        "install it with 'apt-get install dataset-fashion-mnist' or pass --idx-dir"
    )


def load_split(split: str, idx_dir: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8 of ``split`` ('train' 60,000 or 'test' 10,000).

    Raises:
        SourceError: the idx files are missing or malformed.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    img = _open(Path(idx_dir) / f"{prefix}-images-idx3-ubyte")
    lab = _open(Path(idx_dir) / f"{prefix}-labels-idx1-ubyte")
    magic, n, rows, cols = struct.unpack(">IIII", img[:16])
    magic_l, n_l = struct.unpack(">II", lab[:8])
    if magic != 2051 or magic_l != 2049 or n != n_l:
        raise SourceError(f"malformed Fashion-MNIST idx files in {idx_dir}")
    images = np.frombuffer(img, np.uint8, offset=16).reshape(n, rows, cols)
    labels = np.frombuffer(lab, np.uint8, offset=8)
    return images, labels


def export_png_tree(out: str | Path, split: str, *, idx_dir: Path = DEFAULT_DIR, limit: int | None = None,
                    every: int = 1) -> int:
    """Write ``out/<Class>/<split>_<index>.png`` for the split's images; returns how many were written.

    ``every`` keeps one image in ``every`` (in index order), ``limit`` caps the count.
    """
    images, labels = load_split(split, idx_dir)
    out = Path(out)
    for c in CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(0, len(images), every):
        if limit is not None and written >= limit:
            break
        ok, buf = cv2.imencode(".png", images[i])
        if not ok:  # pragma: no cover - cv2 encodes any uint8 array
            raise RuntimeError("PNG encode failed")
        (out / CLASSES[labels[i]] / f"{split}_{i:05d}.png").write_bytes(buf.tobytes())
        written += 1
    return written
