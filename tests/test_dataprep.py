"""Dataset checking on real image files: bad files, exact and near duplicates, label conflicts, leak-free splits."""

from __future__ import annotations

import logging
import random
import tarfile
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.errors import ConfigError, SourceError
from pipeline.training import dataprep
from pipeline.training.dataprep import (
    check_dataset,
    grouped_split,
    near_duplicate_pairs,
    read_split_manifest,
    thumbnails_agree,
    write_split_manifest,
)
from tests.images import BAD_IMAGES, FOOTWEAR_TAR, photo_jpeg
from worker.cli import main

CLASSES = ("Boot", "Sandal", "Shoe")


def distinct_photo(seed: int, quality: int = 90, brighten: int = 0) -> bytes:
    """A real JPEG: ``photo_jpeg(seed)`` with random shapes drawn at random places, so photos differ visually."""
    img = cv2.imdecode(np.frombuffer(photo_jpeg(seed), np.uint8), cv2.IMREAD_COLOR)
    rng = np.random.default_rng(1000 + seed)
    h, w = img.shape[:2]
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(10, 50)), y + int(rng.integers(10, 40))), color, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(6, 25)), color, -1)
    if brighten:
        img = cv2.add(img, np.full_like(img, brighten))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def build_tree(root: Path, per_class: int = 8) -> dict[str, Path]:
    """Three classes of distinct photos plus every bad file, duplicates and a label conflict; returns the plants."""
    seed = 0
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            (root / cls / f"{cls.lower()}_{i}.jpg").write_bytes(distinct_photo(seed))
            seed += 1
    for name, data in BAD_IMAGES.items():
        (root / "Shoe" / name).write_bytes(data)
    plants = {
        "exact_src": root / "Boot" / "boot_0.jpg",
        "exact_dup": root / "Boot" / "boot_0_copy.jpg",
        "near_src": root / "Boot" / "boot_1.jpg",
        "near_dup": root / "Boot" / "boot_1_recompressed.jpg",
        "conflict_src": root / "Sandal" / "sandal_2.jpg",
        "conflict_dup": root / "Shoe" / "sandal_2_misfiled.jpg",
    }
    plants["exact_dup"].write_bytes(plants["exact_src"].read_bytes())
    plants["near_dup"].write_bytes(distinct_photo(1, quality=60, brighten=12))
    plants["conflict_dup"].write_bytes(plants["conflict_src"].read_bytes())
    return plants


def test_check_dataset_finds_bad_files_duplicates_and_conflicts(tmp_path):
    plants = build_tree(tmp_path)
    assert plants["near_dup"].read_bytes() != plants["near_src"].read_bytes()
    r = check_dataset(tmp_path, threads=2)

    bad = dict(r.bad_files)
    assert set(bad) == {str(tmp_path / "Shoe" / n) for n in BAD_IMAGES}
    reasons = {Path(p).name: why for p, why in bad.items()}
    assert "empty" in reasons["zero_bytes.jpg"]
    assert "not an image" in reasons["text_renamed.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "too small" in reasons["tiny_3x3.png"] or "3x3" in reasons["tiny_3x3.png"]
    assert "too large" in reasons["huge_dimensions.png"]

    assert r.class_counts == {"Boot": 10, "Sandal": 8, "Shoe": 9}
    assert r.imbalance == pytest.approx(10 / 8)
    assert len(r.images) == 27

    s = {k: str(v) for k, v in plants.items()}
    assert sorted(r.exact_duplicates) == sorted([sorted([s["exact_src"], s["exact_dup"]]),
                                                 sorted([s["conflict_src"], s["conflict_dup"]])])
    assert r.near_duplicates == [sorted([s["near_src"], s["near_dup"]])]
    assert r.conflicts == [(["Sandal", "Shoe"], sorted([s["conflict_src"], s["conflict_dup"]]))]
    assert len(r.groups) == 3


def test_too_small_uses_min_side(tmp_path):
    build_tree(tmp_path, per_class=3)
    r = check_dataset(tmp_path, min_side_px=200)
    assert len(r.images) == 0
    assert any(why.startswith("too small: 136x102 px") for _, why in r.bad_files)


@pytest.mark.parametrize("seed", range(5))
def test_grouped_split_keeps_every_group_in_one_split(tmp_path, seed):
    build_tree(tmp_path, per_class=12)
    r = check_dataset(tmp_path)
    split = grouped_split(r, val_fraction=0.2, test_fraction=0.2, seed=seed)
    where = {p: name for name, items in split.items() for p, _ in items}
    assert len(where) == sum(len(v) for v in split.values()) == len(r.images)
    assert not set(where) & {p for p, _ in r.bad_files}
    for g in r.exact_duplicates + r.near_duplicates:
        assert len({where[p] for p in g}) == 1, g
    for name in ("val", "test"):
        assert {c for _, c in split[name]} == set(CLASSES)
    assert split == grouped_split(r, val_fraction=0.2, test_fraction=0.2, seed=seed)


def test_given_train_test_tree_keeps_test(tmp_path):
    build_tree(tmp_path / "train", per_class=10)
    for i, cls in enumerate(CLASSES):
        (tmp_path / "test" / cls).mkdir(parents=True)
        for k in range(3):
            (tmp_path / "test" / cls / f"t{k}.jpg").write_bytes(distinct_photo(500 + 10 * i + k))
    leak = tmp_path / "test" / "Boot" / "leak.jpg"
    leak.write_bytes((tmp_path / "train" / "Boot" / "boot_5.jpg").read_bytes())
    r = check_dataset(tmp_path)
    assert r.split_class_counts["test"] == {"Boot": 4, "Sandal": 3, "Shoe": 3}
    split = grouped_split(r, val_fraction=0.2, seed=1)
    test_paths = {p for p, _ in split["test"]}
    assert test_paths == {i.path for i in r.images if i.given_split == "test"}
    assert str(tmp_path / "train" / "Boot" / "boot_5.jpg") not in {p for s in split.values() for p, _ in s} - test_paths
    assert split["val"] and all("/train/" in p for p, _ in split["val"])


def test_train_test_with_different_classes_is_an_error(tmp_path):
    build_tree(tmp_path / "train", per_class=3)
    for cls in ("Boot", "Sneaker"):
        (tmp_path / "test" / cls).mkdir(parents=True)
        (tmp_path / "test" / cls / "a.jpg").write_bytes(distinct_photo(900))
    with pytest.raises(SourceError, match="Sneaker"):
        check_dataset(tmp_path)


def test_manifest_round_trips_with_a_stable_hash(tmp_path):
    build_tree(tmp_path / "d")
    r = check_dataset(tmp_path / "d")
    split = grouped_split(r, seed=3)
    h1 = write_split_manifest(split, tmp_path / "a.csv")
    h2 = write_split_manifest(split, tmp_path / "b.csv", hashes={i.path: i.sha256 for i in r.images})
    assert h1 == h2 and len(h1) == 64
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert read_split_manifest(tmp_path / "a.csv") == split
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "split,class,path,sha256" and lines[1:] == sorted(lines[1:])


def test_near_duplicate_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, 300).astype(np.uint64)
    hashes = np.concatenate([base, base[:100] ^ flips[:100]])
    got = {tuple(p) for p in near_duplicate_pairs(hashes, 4, block=64).tolist()}
    want = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 4}
    assert got == want and len(want) >= 100


def test_cli_data_check(tmp_path):
    build_tree(tmp_path / "d")
    out = tmp_path / "split.csv"
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "d"), "--manifest", str(out)])
    assert result.exit_code == 0, result.output
    assert "imbalance" in result.output and "truncated" in result.output
    assert "label conflicts (one photo under several classes): 1" in result.output
    assert out.exists() and "sha256" in result.output


@pytest.mark.shared
@pytest.mark.skipif(not FOOTWEAR_TAR.exists(), reason="../shared/data/shoe_sandal_boot_dev.tar not present")
def test_footwear_photos_check(tmp_path):
    with tarfile.open(FOOTWEAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")]
        random.Random(0).shuffle(members)
        per_class: dict[str, int] = {}
        for m in members:
            cls = Path(m.name).parent.name
            if per_class.get(cls, 0) >= 200:
                continue
            per_class[cls] = per_class.get(cls, 0) + 1
            dest = tmp_path / cls / Path(m.name).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())
    r = check_dataset(tmp_path)
    assert sum(r.class_counts.values()) + len(r.bad_files) == sum(per_class.values()) == 600
    split = grouped_split(r)
    assert sum(len(v) for v in split.values()) == len(r.images)


def boot_photo(color: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A catalogue-like shot (BGR uint8, 120x160): one boot silhouette in ``color`` with a darker sole, on white.

    Two colours of it are two colourways of one model shot the same way: a grayscale perceptual hash barely tells
    them apart."""
    img = np.full((120, 160, 3), 255, np.uint8)
    shaft = np.array([[60, 12], [100, 12], [104, 80], [140, 86], [146, 100], [52, 100], [56, 60]], np.int32)
    cv2.fillPoly(img, [shaft], color)
    cv2.rectangle(img, (50, 100), (148, 108), tuple(int(c * 0.4) for c in color), -1)
    cv2.line(img, (62, 40), (98, 40), tuple(min(255, int(c * 1.5) + 30) for c in color), 2)
    noise = np.random.default_rng(seed).normal(0, 6, img.shape)  # leather texture
    return np.clip(img + noise * (img < 250), 0, 255).astype(np.uint8)


def encode(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def edited_copy(data: bytes, *, scale: float = 0.8, brighten: int = 12, quality: int = 70) -> bytes:
    """The same photo resized, brightened and re-encoded, as a shop or a scraper would republish it."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return encode(cv2.add(img, np.full_like(img, brighten)), quality)


def phash64_distance(a: Path, b: Path) -> int:
    """Bits of the previous check's 64-bit ImageHash phash that differ: at most 2 grouped the two photos."""
    with Image.open(a) as ia, Image.open(b) as ib:
        return imagehash.phash(ia.convert("RGB")) - imagehash.phash(ib.convert("RGB"))


def test_colourways_are_not_near_duplicates_but_an_edited_copy_is(tmp_path):
    colours = {"brown": (40, 60, 140), "black": (45, 45, 45), "blue": (150, 90, 40)}  # BGR
    (tmp_path / "Boot").mkdir()
    (tmp_path / "Shoe").mkdir()
    for k, (name, bgr) in enumerate(colours.items()):
        (tmp_path / "Boot" / f"{name}.jpg").write_bytes(encode(boot_photo(bgr, seed=k)))
    brown = tmp_path / "Boot" / "brown.jpg"
    copy = tmp_path / "Boot" / "brown_republished.jpg"
    copy.write_bytes(edited_copy(brown.read_bytes()))
    for i in range(2):
        (tmp_path / "Shoe" / f"shoe_{i}.jpg").write_bytes(distinct_photo(40 + i))
    # the 64-bit hash saw the colourways as near duplicates of each other
    assert phash64_distance(brown, tmp_path / "Boot" / "black.jpg") <= 2
    assert phash64_distance(brown, tmp_path / "Boot" / "blue.jpg") <= 2

    r = check_dataset(tmp_path)
    assert r.near_duplicates == [sorted([str(brown), str(copy)])]
    assert r.conflicts == []


LOOKALIKES = [  # same model in another colour, or another model shot the same way; all at 64-bit phash distance <= 2
    ("Boot", "boot (1272).jpg", "boot (1273).jpg"),
    ("Boot", "boot (4396).jpg", "boot (4397).jpg"),
    ("Boot", "boot (3148).jpg", "boot (3802).jpg"),
    ("Boot", "boot (1028).jpg", "boot (1054).jpg"),
    ("Shoe", "Shoe (1985).jpg", "Shoe (1986).jpg"),
]


@pytest.mark.shared
@pytest.mark.skipif(not FOOTWEAR_TAR.exists(), reason="../shared/data/shoe_sandal_boot_dev.tar not present")
def test_footwear_lookalikes_are_not_grouped_but_edited_copies_are(tmp_path):
    with tarfile.open(FOOTWEAR_TAR) as tar:
        for cls, *names in LOOKALIKES:
            (tmp_path / cls).mkdir(exist_ok=True)
            for name in names:
                (tmp_path / cls / name).write_bytes(tar.extractfile(f"shoe_sandal_boot/{cls}/{name}").read())
    for cls, a, b in LOOKALIKES:
        assert phash64_distance(tmp_path / cls / a, tmp_path / cls / b) <= 2, (a, b)
    want = []
    for cls, name in (("Boot", "boot (1272).jpg"), ("Shoe", "Shoe (1985).jpg")):
        src = tmp_path / cls / name
        copy = src.with_name(f"{src.stem} republished.jpg")
        copy.write_bytes(edited_copy(src.read_bytes()))
        want.append(sorted([str(src), str(copy)]))

    r = check_dataset(tmp_path)
    assert len(r.images) == 12 and not r.bad_files
    assert r.near_duplicates == sorted(want)
    assert r.exact_duplicates == [] and r.conflicts == []
    split = grouped_split(r, val_fraction=0.2, test_fraction=0.2)
    where = {p: name for name, items in split.items() for p, _ in items}
    assert all(where[a] == where[b] for a, b in want)


def mark(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, "shop", (out.shape[1] - 44, out.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (150,) * 3, 1)
    return out


@pytest.mark.parametrize("edit", [
    lambda im: cv2.imdecode(np.frombuffer(encode(im, 40), np.uint8), cv2.IMREAD_COLOR),
    lambda im: cv2.resize(cv2.resize(im, (128, 96), interpolation=cv2.INTER_AREA), (160, 120)),
    lambda im: cv2.add(im, np.full_like(im, 20)),
    lambda im: cv2.subtract(im, np.full_like(im, 15)),
    lambda im: cv2.convertScaleAbs(im, alpha=1.1),
    mark,
], ids=["jpeg40", "resized", "brighter", "darker", "contrast", "corner_mark"])
def test_thumbnails_agree_on_edited_copies_only(edit):
    def thumb(bgr):
        return cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (24, 24), interpolation=cv2.INTER_AREA)

    brown = boot_photo((40, 60, 140))
    other = boot_photo((45, 45, 45), seed=1)  # the black colourway
    a = np.stack([thumb(brown), thumb(edit(brown)), thumb(brown)])
    b = np.stack([thumb(edit(brown)), thumb(brown), thumb(other)])
    assert thumbnails_agree(a, b).tolist() == [True, True, False]


def test_near_duplicate_pairs_of_256_bit_hashes_match_brute_force():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, (200, 4), dtype=np.uint64)
    near = base[:80].copy()
    for k in range(80):  # flip up to 12 random bits of the 256
        for bit in rng.choice(256, int(rng.integers(0, 13)), replace=False):
            near[k, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    hashes = np.concatenate([base, near])
    got = {tuple(p) for p in near_duplicate_pairs(hashes, 8, block=37).tolist()}
    ints = [int.from_bytes(h.astype(">u8").tobytes(), "big") for h in hashes]
    want = {(i, j) for i in range(len(ints)) for j in range(i + 1, len(ints)) if (ints[i] ^ ints[j]).bit_count() <= 8}
    assert got == want and len(want) >= 40


@pytest.mark.parametrize("distance", [-1, 17, 64])
def test_near_dup_distance_out_of_range_is_a_config_error(tmp_path, distance):
    build_tree(tmp_path, per_class=3)
    with pytest.raises(ConfigError, match=r"near_dup_distance must be 0\.\.16"):
        check_dataset(tmp_path, near_dup_distance=distance)


def test_a_large_near_duplicate_group_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(dataprep, "LARGE_GROUP", 3)
    build_tree(tmp_path, per_class=3)
    src = boot_photo((40, 60, 140))
    for k in range(4):  # one photo republished four times, a little brighter each time
        (tmp_path / "Boot" / f"republished_{k}.jpg").write_bytes(encode(cv2.add(src, np.full_like(src, 4 * k))))
    with caplog.at_level(logging.WARNING, logger="pipeline.training.dataprep"):
        r = check_dataset(tmp_path)
    assert [len(g) for g in r.near_duplicates if "republished_0" in g[0]] == [4]
    assert any("near-duplicate group of 4 images" in rec.getMessage() for rec in caplog.records)
