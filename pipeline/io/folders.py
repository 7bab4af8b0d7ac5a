"""Labelled photo folders: one sub-folder per category, listed and decoded the way the worker decodes.

:func:`scan_folder` lists a folder-per-category tree; :func:`load_images` decodes its files in a thread pool
with the worker's decoder (:func:`pipeline.io.images.decode_image`). Training, evaluation and data checks
read photos through these two functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.errors import SourceError
from pipeline.io.images import decode_image
from pipeline.io.storage import IMAGE_SUFFIXES


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and ``(path, label)`` pairs of a folder-per-category tree.

    Raises:
        SourceError: missing folder, or fewer than two category folders with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"training data folder not found: {root}")
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*") if f.is_file()):
            classes.append(d.name)
    if len(classes) < 2:
        raise SourceError(
            f"{root} needs one sub-folder per category with images in each (found {len(classes)}): "
            "e.g. DIR/Boot/*.jpg, DIR/Sandal/*.jpg"
        )
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                    samples.append((os.path.join(dirpath, f), label))
    return classes, samples


@dataclass
class Arrays:
    """Decoded images ``(N, H, W, C)`` uint8, labels ``(N,)`` int64, paths, and files that failed with why."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    failed: list[tuple[str, str]]


def load_images(
    samples: Sequence[tuple[str, int]], *, size: tuple[int, int], in_chans: int, threads: int | None = None,
    progress: bool = False, desc: str = "decode",
) -> Arrays:
    """Decode ``(path, label)`` samples at ``size`` with the worker's decoder, in a thread pool.

    A file that cannot be read or decoded is left out and listed in ``failed`` with its reason.
    """
    threads = threads or min(8, os.cpu_count() or 1)

    def load(path: str) -> np.ndarray | str:
        try:
            with open(path, "rb") as fh:
                return decode_image(fh.read(), size=size, in_chans=in_chans)
        except Exception as exc:
            return str(exc)

    with ThreadPoolExecutor(threads) as pool:
        results = list(tqdm(pool.map(load, [p for p, _ in samples], chunksize=64), total=len(samples), desc=desc,
                            unit="img", disable=not progress, leave=False))
    failed = [(p, r) for (p, _), r in zip(samples, results, strict=True) if isinstance(r, str)]
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    images = np.stack([results[i] for i in keep]) if keep else np.zeros((0, *size, in_chans), np.uint8)
    labels = np.array([samples[i][1] for i in keep], dtype=np.int64)
    return Arrays(images, labels, [samples[i][0] for i in keep], failed)
