"""Labelled photo folders: one sub-folder per category, listed, read and decoded the way the worker decodes.

:func:`scan_folder` lists a folder-per-category tree; :func:`read_image` reads one file and decodes it with the
worker's decoder (:func:`pipeline.io.images.decode_image`), giving the bytes too (for hashing);
:func:`load_images` decodes many files with it in a thread pool. Training, evaluation and the data check read
photos through these functions only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, ImageError, SourceError
from pipeline.io.images import decode_image
from pipeline.io.storage import IMAGE_SUFFIXES
from pipeline.progress import progress as progress_display
from pipeline.settings import usable_cpus

#: Decoded size for a file whose header PIL cannot read (``size=None``): only the decoder's reason matters then.
_PROBE_SIZE = (8, 8)


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and ``(path, label)`` pairs of a folder-per-category tree.

    Hidden files and folders (a leading ``.``) and files without an image suffix are skipped; sub-folders of a
    category folder belong to it. Paths are sorted within each category.

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


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` in px from an encoded image's header (PIL, no pixel decoding), or None when PIL cannot
    identify the file."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # the decoder gives the reason
        return None


def read_image(path: str | Path, *, size: tuple[int, int] | None, in_chans: int = 3) -> tuple[bytes, np.ndarray]:
    """Read one image file and decode it with the worker's :func:`pipeline.io.images.decode_image`.

    Args:
        path: the file.
        size: ``(H, W)`` in px to decode to; None for the size its header gives (the photo's own size; the
            pixels are resized to it, as for any size).
        in_chans: 3 (RGB) or 1 (grayscale).

    Returns:
        ``(the file's bytes, pixels (H, W, in_chans) uint8)``.

    Raises:
        ImageError: the reason the file is unusable: ``unreadable: ...`` (``OSError``), the decoder's reason
            (empty, not an image, truncated, too small or too large), ``not a decodable image: ...`` (any
            other decoder failure), or with ``size=None`` ``image header unreadable ...`` (PIL cannot identify
            a file OpenCV decodes).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageError(f"unreadable: {exc}") from None
    native = header_size(data) if size is None else None
    target = size or ((native[1], native[0]) if native else _PROBE_SIZE)
    try:
        pixels = decode_image(data, size=target, in_chans=in_chans)
    except ImageError:
        raise
    except Exception as exc:  # any other decoder failure is a bad file too, never a crash
        raise ImageError(f"not a decodable image: {exc}"[:300]) from None
    if size is None and native is None:
        raise ImageError("image header unreadable (PIL cannot identify it)")
    return data, pixels



def samples_for_classes(root: str | Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label)`` pairs of a folder-per-category tree whose folders are classes of a model; ``label`` is the
    index in ``class_names`` (a model's order, not the folders' sorted order).

    Raises:
        ConfigError: a folder that is not one of ``class_names`` (the message lists them).
        SourceError: ``root`` missing or with fewer than two category folders (:func:`scan_folder`).
    """
    folders, samples = scan_folder(root)
    unknown = [f for f in folders if f not in class_names]
    if unknown:
        raise ConfigError(
            f"folder(s) {', '.join(repr(u) for u in unknown)} in {root} are not classes of the model; "
            f"the model's classes: {', '.join(class_names)}"
        )
    to_model = [list(class_names).index(f) for f in folders]
    return [(p, to_model[y]) for p, y in samples]

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
    """Decode ``(path, label)`` samples at ``size`` (``(H, W)`` px) with :func:`read_image`, in a thread pool.

    A file that cannot be read or decoded is left out and listed in ``failed`` with its reason (the
    ``ImageError`` message). Order is kept. ``threads`` defaults to the CPU count, at most 8; ``progress`` shows
    :func:`pipeline.progress.progress` (a bar on a terminal, log lines elsewhere) labelled ``desc``.
    """
    threads = threads or min(8, usable_cpus())

    def load(path: str) -> np.ndarray | str:
        try:
            return read_image(path, size=size, in_chans=in_chans)[1]
        except ImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(threads) as pool:
        results = list(progress_display(pool.map(load, [p for p, _ in samples], chunksize=64), total=len(samples),
                                        desc=desc, unit="img", disable=not progress))
    failed = [(p, r) for (p, _), r in zip(samples, results, strict=True) if isinstance(r, str)]
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    images = np.stack([results[i] for i in keep]) if keep else np.zeros((0, *size, in_chans), np.uint8)
    labels = np.array([samples[i][1] for i in keep], dtype=np.int64)
    return Arrays(images, labels, [samples[i][0] for i in keep], failed)
