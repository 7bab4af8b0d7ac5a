"""Checking a photo set before training: bad files, exact and near duplicates, label conflicts, and a leak-free split.

Every image is read once (:func:`pipeline.io.folders.read_image`, the loader training and evaluation use): its bytes
are hashed with SHA-256 (exact duplicates), decoded with the worker's own :func:`pipeline.io.images.decode_image` at
its native size (bad files are excluded with their reason), and reduced to two small fingerprints:

- a 256-bit perceptual hash, ImageHash's ``phash`` with ``hash_size=16`` (a DCT-based hash: 64x64 grayscale, the
  top-left 16x16 DCT coefficients compared with their median; Zauner 2010, "Implementation and Benchmarking of
  Perceptual Image Hash Functions");
- a 24x24 RGB thumbnail (area-averaged).

Near duplicates are the same photo re-encoded, resized, slightly brightened or darkened, or with a small mark on it.
A pair is a candidate when its hashes differ in at most ``near_dup_distance`` 64ths of their bits, found by an
all-pairs XOR + popcount over the packed ``uint64`` words in blocks (numpy, no Python loop over pairs); it is
confirmed when the thumbnails agree in colour pixel by pixel (:func:`thumbnails_agree`). The hash alone is not
enough on catalogue photos: on the footwear set (11,946 white-background shots) the 64-bit hash put different
products at distance 0-2, and even at 10-20 of 256 bits the pairs are the same model in another colour, which a
grayscale hash cannot see; the thumbnail check rejects them. Confirmed pairs (and byte-identical files) are grouped
as the connected components of the graph they form (:func:`connected_groups`, SciPy's ``connected_components``)
and :func:`grouped_split` keeps every group inside one split, so no pair of near duplicates spans two splits and
no copy of a training image ends up in validation or test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.errors import ConfigError, ImageError, SourceError
from pipeline.io.files import atomic_write_bytes, sha256_file
from pipeline.io.folders import read_image, scan_folder
from pipeline.progress import progress as progress_display
from pipeline.settings import usable_cpus

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

PHASH_SIZE = 16  # ImageHash phash(hash_size=16): 16x16 DCT coefficients, 256 bits, 4 uint64 words
PHASH_BITS = PHASH_SIZE * PHASH_SIZE
MAX_NEAR_DUP_DISTANCE = 16  # 64ths: a quarter of the bits; unrelated photos' 256-bit hashes differ in ~half

# Thumbnail check of a candidate pair (see thumbnails_agree); figures measured on the footwear set (11,946
# photos, 136x102 px): 200 photos each re-encoded (JPEG 40, 70), resized (0.5x, 0.8x, 1.5x, 3x), brightened or
# darkened by 15-30 levels, contrast x1.1, or with a text mark, vs. every pair of different photos with hashes
# within 64 of 256 bits (120,227 pairs). Copies: at most 7 pixels off by more than 24 levels (0.5x resizes: up to
# 28 pixels), or a mark's off pixels inside a box of at most 64 pixels; residual of the other pixels at most 6% of the
# variance. Different photos within 32 bits: at least 8 pixels off, spread over a box of at least 100 pixels; within
# 64 bits, three pairs of white or cream shoes on white pass that but have residuals of 17-23%.
THUMB_PX = 24  # thumbnail side (px): 576 pixels
THUMB_TOLERANCE = 24  # levels (0..255, largest over R, G, B) a pixel may be off by
THUMB_OUTLIERS = 7  # pixels (of 576, 1.2%) that may be off by more anywhere: JPEG ringing
THUMB_MARK_PX = 72  # or: the off pixels fit in a box of at most this many pixels (1/8): a mark in one place
THUMB_RESIDUAL = 0.10  # largest residual energy of the other pixels, as a fraction of the thumbnail's variance
MAX_BRIGHTNESS_SHIFT = 24  # levels: a global brightness change up to this is compensated before comparing
LARGE_GROUP = 20  # near-duplicate groups larger than this are logged: look at them


@dataclass
class ImageRecord:
    """One readable image: path, category, given split (``"train"``/``"test"``, or None for a plain tree),
    SHA-256 of the file (hex), size ``(width, height)`` in px, and its 256-bit perceptual hash (ImageHash
    ``phash(hash_size=16)``, row-major bits, first bit most significant) as an int."""

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
        near_duplicates: groups (sorted paths) of files joined by confirmed near-duplicate pairs (perceptual hashes
            within the threshold and thumbnails that agree, see :func:`thumbnails_agree`), holding at least two
            different files (byte-identical copies of a member are included).
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


def connected_groups(n: int, pairs: np.ndarray) -> list[list[int]]:
    """The connected components with two or more nodes of the undirected graph on nodes ``0..n-1``.

    Args:
        n: number of nodes.
        pairs: ``(P, 2)`` int edges (any order, repeats allowed).

    Returns:
        Each component's nodes in ascending order; components ordered by their smallest node.
        Computed with :func:`scipy.sparse.csgraph.connected_components`.
    """
    if n == 0:
        return []
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")  # nodes by component, ascending within each
    parts = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
    return sorted((p.tolist() for p in parts if len(p) > 1), key=lambda g: g[0])


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
        samples: list[tuple[str, str, str | None]] = [(p, train_classes[y], "train") for p, y in train_samples]
        samples += [(p, test_classes[y], "test") for p, y in test_samples]
        return train_classes, samples
    classes, pairs = scan_folder(root)
    return classes, [(p, classes[y], None) for p, y in pairs]


def _check_one(path: str, min_side_px: int) -> tuple[str, tuple[int, int], bytes, np.ndarray] | str:
    """``(sha256, (w, h), phash bytes, thumbnail)`` of one file, or the reason it is bad.

    The file is read and decoded at its own size by :func:`pipeline.io.folders.read_image` (the loader
    training and evaluation use), RGB."""
    import cv2
    import imagehash
    from PIL import Image

    try:
        data, pixels = read_image(path, size=None, in_chans=3)
    except ImageError as exc:
        return str(exc)
    h, w = pixels.shape[:2]
    if min(w, h) < min_side_px:
        return f"too small: {w}x{h} px (need at least {min_side_px} px a side)"
    ph = imagehash.phash(Image.fromarray(pixels), hash_size=PHASH_SIZE)
    bits = np.asarray(ph.hash, dtype=bool).ravel()
    thumb = cv2.resize(pixels, (THUMB_PX, THUMB_PX), interpolation=cv2.INTER_AREA)
    return hashlib.sha256(data).hexdigest(), (w, h), np.packbits(bits).tobytes(), thumb


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int, block: int = 512) -> np.ndarray:
    """All pairs ``(i, j)``, ``i < j``, of hashes differing in at most ``max_distance`` bits.

    Args:
        hashes: ``(N,)`` uint64 (64-bit hashes) or ``(N, W)`` uint64 (``64 * W``-bit hashes, one word a column).
        max_distance: Hamming distance threshold in bits.
        block: rows compared at a time (memory is about ``12 * block * N`` bytes).

    Returns:
        ``(P, 2)`` int64 array of index pairs, sorted by ``i`` then ``j``.
    """
    words = np.asarray(hashes, dtype=np.uint64)
    if words.ndim == 1:
        words = words[:, None]
    cols = np.ascontiguousarray(words.T)  # (W, N): each word's column is contiguous for the broadcast XOR
    n = words.shape[0]
    out = [np.zeros((0, 2), np.int64)]
    for start in range(0, n, block):
        stop = min(start + block, n)
        # compare with the columns from ``start`` on only (pairs before it were seen in earlier blocks)
        dist = np.zeros((stop - start, n - start), np.uint16)
        for w in cols:
            dist += np.bitwise_count(w[start:stop, None] ^ w[None, start:])
        i, j = np.nonzero(dist <= max_distance)
        keep = i < j
        out.append(np.stack([i[keep] + start, j[keep] + start], axis=1).astype(np.int64))
    return np.concatenate(out)


def thumbnails_agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each pair of thumbnails shows the same photo, up to re-encoding, resizing, a small brightness change
    and a mark in one place (text, a logo).

    The darker thumbnail of a pair is brightened by the pair's brightness shift (the median difference of the pixels
    that are neither near-white nor near-black in both, at most :data:`MAX_BRIGHTNESS_SHIFT` levels) and clipped to
    0..255, as a brightened photo's whites are. A pixel is off when it then differs by more than
    :data:`THUMB_TOLERANCE` levels in some channel. The pair agrees when

    - at most :data:`THUMB_OUTLIERS` pixels are off, or all of them fit in a box of at most :data:`THUMB_MARK_PX`
      pixels (two colourways of one shoe, shot the same way, are off all over the shoe), and
    - the squared residual of the other pixels is at most :data:`THUMB_RESIDUAL` of the lighter thumbnail's
      variance (two different white shoes on white are within the tolerance everywhere).

    Args:
        a, b: ``(P, S, S, 3)`` uint8 RGB thumbnails, pair ``k`` being ``(a[k], b[k])``.

    Returns:
        ``(P,)`` bool.
    """
    x = a.astype(np.int16)
    y = b.astype(np.int16)
    p = len(x)
    luma_x = x.sum(-1).reshape(p, -1)
    luma_y = y.sum(-1).reshape(p, -1)
    mid = (np.minimum(luma_x, luma_y) > 3 * 5) & (np.maximum(luma_x, luma_y) < 3 * 250)
    diff = np.where(mid, luma_y - luma_x, np.iinfo(np.int16).max)  # masked pixels sort last
    diff.sort(axis=1)
    n_mid = mid.sum(1)
    rows = np.arange(p)
    median = (diff[rows, np.maximum(n_mid - 1, 0) // 2] + diff[rows, n_mid // 2]) / 6  # / 2, and / 3 channels
    shift = np.where(n_mid > 0, np.clip(np.round(median), -MAX_BRIGHTNESS_SHIFT, MAX_BRIGHTNESS_SHIFT), 0)
    shift = shift.astype(np.int16)[:, None, None, None]
    darker, lighter = np.where(shift >= 0, x, y), np.where(shift >= 0, y, x)
    err = lighter - np.clip(darker + np.abs(shift), 0, 255)

    off = np.abs(err).max(-1) > THUMB_TOLERANCE  # (P, S, S)
    few = off.reshape(p, -1).sum(1) <= THUMB_OUTLIERS
    off_rows, off_cols = off.any(2), off.any(1)
    height = np.where(off_rows.any(1), off.shape[1] - np.argmax(off_rows[:, ::-1], 1) - np.argmax(off_rows, 1), 0)
    width = np.where(off_cols.any(1), off.shape[2] - np.argmax(off_cols[:, ::-1], 1) - np.argmax(off_cols, 1), 0)
    compact = height * width <= THUMB_MARK_PX

    energy = np.square(np.where(off[..., None], 0, err), dtype=np.float32).reshape(p, -1).sum(1)
    flat = lighter.reshape(p, -1).astype(np.float32)
    variance = np.square(flat - flat.mean(1, keepdims=True)).sum(1)
    return (few | compact) & (energy <= THUMB_RESIDUAL * variance)


def _confirmed_pairs(words: np.ndarray, thumbs: np.ndarray, max_distance: int, chunk: int = 8192) -> np.ndarray:
    """Candidate pairs by hash distance, kept where :func:`thumbnails_agree`; ``(P, 2)`` int64."""
    pairs = near_duplicate_pairs(words, max_distance)
    keep = np.zeros(len(pairs), bool)
    for s in range(0, len(pairs), chunk):
        c = pairs[s:s + chunk]
        keep[s:s + chunk] = thumbnails_agree(thumbs[c[:, 0]], thumbs[c[:, 1]])
    log.debug("near duplicates: %d candidate pairs by hash, %d confirmed", len(pairs), int(keep.sum()))
    return pairs[keep]


def check_dataset(
    root: str | Path, *, min_side_px: int = 32, near_dup_distance: int = 8, threads: int | None = None,
    progress: bool = False,
) -> DatasetReport:
    """Check every image of a photo set.

    Args:
        root: a folder-per-category tree (``root/<Class>/*.jpg``), or a tree with ``train/`` and ``test/``, each
            folder-per-category with the same categories.
        min_side_px: images with a side shorter than this (px) are reported as bad ("too small: WxH px").
        near_dup_distance: how far apart two images' perceptual hashes may be for the pair to be checked as near
            duplicates, in 64ths of the hash's bits: the 256-bit hashes (ImageHash ``phash(hash_size=16)``,
            DCT-based, Zauner 2010) may differ in ``4 * near_dup_distance`` bits (8: 32 bits, 12.5%). A candidate is
            a near duplicate only when its thumbnails agree too (:func:`thumbnails_agree`); 0 checks only images
            with identical hashes. Near-duplicate groups of more than :data:`LARGE_GROUP` images are logged as a
            warning (and kept whole).
        threads: reader/decoder threads [default: the CPU count, at most 8].
        progress: show progress (:func:`pipeline.progress.progress`: a bar on a terminal, log lines elsewhere).

    Returns:
        A :class:`DatasetReport`.

    Raises:
        SourceError: missing folder, fewer than two categories, or ``train/`` and ``test/`` with different
            categories (the message names them).
        ConfigError: ``near_dup_distance`` outside 0..16 or ``min_side_px`` < 1.
    """
    if not 0 <= near_dup_distance <= MAX_NEAR_DUP_DISTANCE:
        raise ConfigError(
            f"near_dup_distance must be 0..{MAX_NEAR_DUP_DISTANCE} (64ths of the perceptual hash's bits; beyond a "
            f"quarter of them unrelated photos match), got {near_dup_distance}"
        )
    if min_side_px < 1:
        raise ConfigError(f"min_side_px must be at least 1, got {min_side_px}")
    root = Path(root)
    classes, samples = _scan(root)
    images, bad, phashes, thumbs = _read_all(samples, min_side_px, threads, progress)
    exact, near, groups = _duplicate_groups(images, phashes, thumbs, near_dup_distance * PHASH_BITS // 64)
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


def _read_all(
    samples: list[tuple[str, str, str | None]], min_side_px: int, threads: int | None, progress: bool
) -> tuple[list[ImageRecord], list[tuple[str, str]], list[bytes], list[np.ndarray]]:
    """:func:`_check_one` of every ``(path, class, given split)`` in a thread pool: the good images' records,
    ``(path, reason)`` of the bad files, and the good images' packed perceptual hashes and thumbnails."""
    threads = threads or min(8, usable_cpus())
    with ThreadPoolExecutor(threads) as pool:
        checked = pool.map(lambda s: _check_one(s[0], min_side_px), samples, chunksize=32)
        results = list(progress_display(checked, total=len(samples), desc="check", unit="img", disable=not progress))
    bad: list[tuple[str, str]] = []
    images: list[ImageRecord] = []
    phashes: list[bytes] = []
    thumbs: list[np.ndarray] = []
    for (path, cls, split), res in zip(samples, results, strict=True):
        if isinstance(res, str):
            bad.append((path, res))
        else:
            images.append(ImageRecord(path, cls, split, res[0], res[1], int.from_bytes(res[2], "big")))
            phashes.append(res[2])
            thumbs.append(res[3])
    return images, bad, phashes, thumbs


def _duplicate_groups(
    images: list[ImageRecord], phashes: list[bytes], thumbs: list[np.ndarray], max_bits: int
) -> tuple[list[list[int]], list[list[str]], list[list[int]]]:
    """``(exact, near, groups)``: byte-identical index groups, near-duplicate path groups (each sorted, with the
    byte-identical copies of their members) and every duplicate group (exact and near merged, indices sorted,
    ordered by smallest index). Near duplicates are looked for among distinct contents (one representative per
    SHA-256): hashes within ``max_bits`` bits and thumbnails that agree (:func:`_confirmed_pairs`)."""
    by_sha: dict[str, list[int]] = {}
    for i, r in enumerate(images):
        by_sha.setdefault(r.sha256, []).append(i)
    exact = [idx for idx in by_sha.values() if len(idx) > 1]
    reps = [idx[0] for idx in by_sha.values()]
    near_pairs = np.zeros((0, 2), np.int64)
    if reps:
        words = np.frombuffer(b"".join(phashes[i] for i in reps), dtype=">u8").reshape(len(reps), -1)
        near_pairs = _confirmed_pairs(words.astype(np.uint64), np.stack([thumbs[i] for i in reps]), max_bits)
    near: list[list[str]] = []
    for comp in connected_groups(len(reps), near_pairs):
        members = [i for c in comp for i in by_sha[images[reps[c]].sha256]]
        near.append(sorted(images[i].path for i in members))
        if len(members) > LARGE_GROUP:
            # pairs chain into groups; a group this large is rarely one photo, but splitting it could put a
            # confirmed pair in two splits, so it is kept whole and reported
            log.warning("near-duplicate group of %d images (kept in one split; look at it): %s, ...",
                        len(members), ", ".join(near[-1][:5]))
    rep_index = np.asarray(reps, dtype=np.int64)
    edges = [np.asarray([(idx[0], k) for idx in exact for k in idx[1:]], np.int64).reshape(-1, 2),
             rep_index[near_pairs]]
    return exact, near, connected_groups(len(images), np.concatenate(edges))


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
                digest = sha256_file(p)
            rows.append((s, cls, p, digest))
    rows.sort()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "class", "path", "sha256"])
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    atomic_write_bytes(path, data)
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
