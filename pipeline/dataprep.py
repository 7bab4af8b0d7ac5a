"""Checking a photo set before training: bad files, exact and near duplicates, label conflicts, and a leak-free split.

Every image is read once: its bytes are hashed with SHA-256 (exact duplicates), decoded with the worker's own
:func:`pipeline.images.decode_image` at its native size (bad files are excluded with their reason), and given a
64-bit perceptual hash, ImageHash's ``phash`` (a DCT-based hash: 32x32 grayscale, top-left 8x8 DCT coefficients
compared with their median; Zauner 2010, "Implementation and Benchmarking of Perceptual Image Hash Functions").
Near duplicates are pairs whose hashes differ in at most ``near_dup_distance`` bits, found by an all-pairs
XOR + popcount over the packed ``uint64`` hashes in blocks (numpy, no Python loop over pairs). Duplicates are
grouped with union-find; :func:`grouped_split` keeps every group inside one split, so no copy of a training
image ends up in validation or test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, ImageError, SourceError
from pipeline.images import decode_image
from pipeline.training import scan_folder

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One readable image: path, category, given split (``"train"``/``"test"``, or None for a plain tree),
    SHA-256 of the file (hex), size ``(width, height)`` in px, and its 64-bit perceptual hash."""

    path: str
    cls: str
    given_split: str | None
    sha256: str
    size: tuple[int, int]
    phash: int


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found.

    Attributes:
        root: the folder checked.
        class_names: sorted category names.
        images: the good images (bad files excluded).
        class_counts: good images per category (all given splits together).
        split_class_counts: per given split (``"train"``, ``"test"``) when the tree had them, else empty.
        imbalance: largest / smallest category count (``inf`` when a category has no good image).
        bad_files: ``(path, reason)`` of files that were excluded.
        exact_duplicates: groups (sorted paths) of byte-identical files, two or more each.
        near_duplicates: groups (sorted paths) joined by perceptual-hash distance <= the threshold and holding at
            least two different files (byte-identical copies of a member are included).
        conflicts: duplicate groups (exact or near) whose images are filed under more than one category, as
            ``(sorted class names, sorted paths)``.
        groups: every duplicate group (exact and near merged), as lists of indices into ``images``; what
            :func:`grouped_split` keeps together.
    """

    root: str
    class_names: list[str]
    images: list[ImageRecord]
    class_counts: dict[str, int]
    split_class_counts: dict[str, dict[str, int]]
    imbalance: float
    bad_files: list[tuple[str, str]]
    exact_duplicates: list[list[str]]
    near_duplicates: list[list[str]]
    conflicts: list[tuple[list[str], list[str]]]
    groups: list[list[int]] = field(default_factory=list)

    @property
    def has_given_test(self) -> bool:
        return any(r.given_split == "test" for r in self.images)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return list(out.values())


def _scan(root: Path) -> tuple[list[str], list[tuple[str, str, str | None]]]:
    """``(class_names, [(path, class, given_split)])`` of a plain or a ``train/`` + ``test/`` tree."""
    tr, te = root / "train", root / "test"
    if tr.is_dir() and te.is_dir():
        train_classes, train_samples = scan_folder(tr)
        test_classes, test_samples = scan_folder(te)
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise SourceError(
                f"{root}: train/ and test/ have different categories: only in train/ {only_train}, "
                f"only in test/ {only_test}"
            )
        samples = [(p, train_classes[y], "train") for p, y in train_samples]
        samples += [(p, test_classes[y], "test") for p, y in test_samples]
        return train_classes, samples
    classes, pairs = scan_folder(root)
    return classes, [(p, classes[y], None) for p, y in pairs]


def _header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header (PIL, no pixel decoding), or None when PIL cannot tell."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # decode_image gives the reason
        return None


def _check_one(path: str, min_side_px: int) -> tuple[str, tuple[int, int], int] | str:
    """``(sha256, (w, h), phash)`` of one file, or the reason it is bad."""
    import imagehash
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return f"unreadable: {exc}"
    digest = hashlib.sha256(data).hexdigest()
    size = _header_size(data)
    try:
        h_w = (size[1], size[0]) if size else (max(min_side_px, 8), max(min_side_px, 8))
        pixels = decode_image(data, size=h_w, in_chans=3)
    except ImageError as exc:
        return str(exc)
    except Exception as exc:  # any other decoder failure is a bad file too, never a crash
        return f"not a decodable image: {exc}"[:300]
    if size is None:
        return "image header unreadable (PIL cannot identify it)"
    w, h = size
    if min(w, h) < min_side_px:
        return f"too small: {w}x{h} px (need at least {min_side_px} px a side)"
    ph = imagehash.phash(Image.fromarray(pixels))
    bits = np.asarray(ph.hash, dtype=bool).ravel()
    return digest, (w, h), int.from_bytes(np.packbits(bits).tobytes(), "big")


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048) -> np.ndarray:
    """All pairs ``(i, j)``, ``i < j``, of 64-bit hashes differing in at most ``max_distance`` bits.

    Args:
        hashes: ``(N,)`` uint64.
        max_distance: Hamming distance threshold in bits.
        block: rows compared at a time (memory is ``block * N`` bytes).

    Returns:
        ``(P, 2)`` int64 array of index pairs.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    out = []
    for start in range(0, n, block):
        rows = hashes[start:start + block]
        # compare with the columns from ``start`` on only (pairs before it were seen in earlier blocks)
        dist = np.bitwise_count(rows[:, None] ^ hashes[None, start:])
        i, j = np.nonzero(dist <= max_distance)
        j = j + start
        i = i + start
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def check_dataset(
    root: str | Path, *, min_side_px: int = 32, near_dup_distance: int = 2, threads: int | None = None
) -> DatasetReport:
    """Check every image of a photo set.

    Args:
        root: a folder-per-category tree (``root/<Class>/*.jpg``), or a tree with ``train/`` and ``test/``, each
            folder-per-category with the same categories.
        min_side_px: images with a side shorter than this (px) are reported as bad ("too small: WxH px").
        near_dup_distance: perceptual hashes differing in at most this many of their 64 bits are near duplicates
            (ImageHash ``phash``, DCT-based, Zauner 2010); 0 finds only visually identical images.
        threads: reader/decoder threads [default: the CPU count, at most 8].

    Returns:
        A :class:`DatasetReport`.

    Raises:
        SourceError: missing folder, fewer than two categories, or ``train/`` and ``test/`` with different
            categories (the message names them).
        ConfigError: ``near_dup_distance`` outside 0..64 or ``min_side_px`` < 1.
    """
    if not 0 <= near_dup_distance <= 64:
        raise ConfigError(f"near_dup_distance must be 0..64 bits, got {near_dup_distance}")
    if min_side_px < 1:
        raise ConfigError(f"min_side_px must be at least 1, got {min_side_px}")
    root = Path(root)
    classes, samples = _scan(root)
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda s: _check_one(s[0], min_side_px), samples, chunksize=32))

    bad: list[tuple[str, str]] = []
    images: list[ImageRecord] = []
    for (path, cls, split), res in zip(samples, results, strict=True):
        if isinstance(res, str):
            bad.append((path, res))
        else:
            images.append(ImageRecord(path, cls, split, res[0], res[1], res[2]))

    n = len(images)
    uf = _UnionFind(n)
    by_sha: dict[str, list[int]] = {}
    for i, r in enumerate(images):
        by_sha.setdefault(r.sha256, []).append(i)
    exact = [idx for idx in by_sha.values() if len(idx) > 1]
    for idx in exact:
        for k in idx[1:]:
            uf.union(idx[0], k)

    # near duplicates among distinct contents (one representative per SHA-256)
    reps = [idx[0] for idx in by_sha.values()]
    near_uf = _UnionFind(len(reps))
    if reps:
        hashes = np.array([images[i].phash for i in reps], dtype=np.uint64)
        for a, b in near_duplicate_pairs(hashes, near_dup_distance):
            near_uf.union(int(a), int(b))
            uf.union(reps[a], reps[b])
    near: list[list[str]] = []
    for comp in near_uf.components():
        if len(comp) > 1:
            members = [i for c in comp for i in by_sha[images[reps[c]].sha256]]
            near.append(sorted(images[i].path for i in members))

    groups = [sorted(c) for c in uf.components() if len(c) > 1]
    conflicts = []
    for g in groups:
        names = sorted({images[i].cls for i in g})
        if len(names) > 1:
            conflicts.append((names, sorted(images[i].path for i in g)))

    counts = Counter(r.cls for r in images)
    class_counts = {c: counts.get(c, 0) for c in classes}
    split_counts: dict[str, dict[str, int]] = {}
    for s in ("train", "test"):
        if any(r.given_split == s for r in images):
            sc = Counter(r.cls for r in images if r.given_split == s)
            split_counts[s] = {c: sc.get(c, 0) for c in classes}
    lo, hi = min(class_counts.values()), max(class_counts.values())
    imbalance = hi / lo if lo else float("inf")
    for path, reason in bad:
        log.warning("bad file %s: %s", path, reason)
    return DatasetReport(
        root=str(root), class_names=classes, images=images, class_counts=class_counts,
        split_class_counts=split_counts, imbalance=imbalance, bad_files=bad,
        exact_duplicates=sorted(sorted(images[i].path for i in idx) for idx in exact),
        near_duplicates=sorted(near), conflicts=sorted(conflicts), groups=groups,
    )


def grouped_split(
    report: DatasetReport, *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[tuple[str, str]]]:
    """Split the good images into train / val / test, keeping every duplicate group inside one split.

    Units are duplicate groups (exact and near merged) and single images; each unit is stratified by its
    majority category, shuffled with ``seed``, and filled into test, then val, until each holds its fraction of
    the category's images (at least one image when the fraction is > 0 and the category has three or more).
    When the tree had ``train/`` and ``test/``, test is kept as given (``test_fraction`` is ignored) and val is
    taken from train; train images that duplicate a given test image are left out of every split (they would
    leak), with a warning.

    Returns:
        ``{"train": [(path, class)], "val": [...], "test": [...]}``, each sorted by path.

    Raises:
        ConfigError: fractions outside [0, 1) or summing to 1 or more.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {f}")
    given_test = report.has_given_test
    if not given_test and val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    images = report.images
    in_group = {i for g in report.groups for i in g}
    units = [list(g) for g in report.groups] + [[i] for i in range(len(images)) if i not in in_group]
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}

    if given_test:
        pool = []
        for u in units:
            if any(images[i].given_split == "test" for i in u):
                leaked = [images[i].path for i in u if images[i].given_split != "test"]
                if leaked:
                    log.warning("left out of train (duplicates of test images): %s", ", ".join(leaked))
                out["test"].extend((images[i].path, images[i].cls) for i in u if images[i].given_split == "test")
            else:
                pool.append(u)
        fractions = {"test": 0.0, "val": val_fraction}
    else:
        pool = units
        fractions = {"test": test_fraction, "val": val_fraction}

    rng = np.random.default_rng(seed)
    by_class: dict[str, list[list[int]]] = {}
    for u in pool:
        majority = Counter(images[i].cls for i in u).most_common()
        top = min(c for c, k in majority if k == majority[0][1])  # ties: the first name, so it is seeded only
        by_class.setdefault(top, []).append(u)
    for cls in sorted(by_class):
        cls_units = by_class[cls]
        order = rng.permutation(len(cls_units))
        total = sum(len(u) for u in cls_units)
        targets = {}
        for s, f in fractions.items():
            t = int(round(total * f))
            if f > 0 and total >= 3:
                t = max(1, t)
            targets[s] = t
        filled = {"test": 0, "val": 0}
        for k in order:
            u = cls_units[int(k)]
            dest = "train"
            for s in ("test", "val"):
                if filled[s] < targets[s]:
                    dest = s
                    break
            if dest != "train":
                filled[dest] += len(u)
            out[dest].extend((images[i].path, images[i].cls) for i in u)
    return {s: sorted(v) for s, v in out.items()}


def write_split_manifest(
    split: dict[str, list[tuple[str, str]]], path: str | Path, *, hashes: dict[str, str] | None = None
) -> str:
    """Write a split as CSV ``split,class,path,sha256`` (header, rows sorted) and return the manifest's SHA-256.

    Args:
        split: what :func:`grouped_split` returns.
        path: the CSV file to write.
        hashes: SHA-256 (hex) per image path, e.g. from a report's images; files not in it are read and hashed.

    Returns:
        SHA-256 (hex) of the written file's bytes: the same split always gives the same hash, for the model card.
    """
    hashes = hashes or {}
    rows = []
    for s, items in split.items():
        for p, cls in items:
            digest = hashes.get(p)
            if digest is None:
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            rows.append((s, cls, p, digest))
    rows.sort()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "class", "path", "sha256"])
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_split_manifest(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Read a manifest written by :func:`write_split_manifest` back into ``{split: [(path, class)]}``.

    Raises:
        SourceError: the file does not have the ``split,class,path,sha256`` header.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["split", "class", "path", "sha256"]:
            raise SourceError(f"{path}: not a split manifest (header {header})")
        out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
        for s, cls, p, _ in reader:
            out.setdefault(s, []).append((p, cls))
    return {s: sorted(v) for s, v in out.items()}
