"""Robustness shifts and extra folders: each shift makes a decodable image of the kind it names, on the bundled
examples (Fashion-MNIST, black background) and on footwear catalogue photos (white background) when ../shared is
there; ``invsort evaluate`` reports every shift and scores extra folders, unknown classes included."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.evaluation.extra import parse_extra
from pipeline.evaluation.report import evaluate
from pipeline.evaluation.robustness import (
    LARGE_SIDE_PX,
    SHIFTS,
    SMALL_SCALE,
    background_colour,
    encode,
    photo_pixels,
    pick_per_class,
    product_mask,
    shift_rng,
)
from pipeline.io.images import decode_image
from tests.images import EXAMPLES, FOOTWEAR_TAR, MOBILENET_WEIGHTS, example_files
from worker.cli import main

MODEL = "bundled:fashion_mnist_cnn"
BY_NAME = {s.name: s for s in SHIFTS}
NO_FOOTWEAR = "../shared/data/shoe_sandal_boot_dev.tar not present (a user's clone)"


def footwear_photos(dest: Path, per_class: int) -> Path:
    """The first ``per_class`` catalogue photos of each class, extracted from the shared tar into ``dest``."""
    with tarfile.open(FOOTWEAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        chosen = []
        for cls in ("Boot", "Sandal", "Shoe"):
            chosen += sorted((m for m in members if f"/{cls}/" in m.name), key=lambda m: m.name)[:per_class]
        tar.extractall(dest, members=chosen, filter="data")
    return dest / "shoe_sandal_boot"


@pytest.fixture(scope="module")
def footwear_photo(tmp_path_factory) -> bytes:
    if not FOOTWEAR_TAR.exists():
        pytest.skip(NO_FOOTWEAR)
    root = footwear_photos(tmp_path_factory.mktemp("fw"), 1)
    return sorted(root.rglob("*.jpg"))[0].read_bytes()


def example_photo() -> bytes:
    return next(p for p in example_files() if "Ankle_boot" in str(p)).read_bytes()


@pytest.fixture(params=["example", "footwear"])
def photo(request) -> bytes:
    return example_photo() if request.param == "example" else request.getfixturevalue("footwear_photo")


def shifted(name: str, data: bytes, index: int = 0) -> bytes:
    return BY_NAME[name].apply(data, shift_rng(0, name, index))


def border(rgb: np.ndarray, b: int = 2) -> np.ndarray:
    return np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3), rgb[:, :b].reshape(-1, 3),
                           rgb[:, -b:].reshape(-1, 3)]).astype(np.float32)


def test_every_shift_is_deterministic_and_decodes_at_model_size(photo):
    for s in SHIFTS:
        out = s.apply(photo, shift_rng(0, s.name, 3))
        assert out == s.apply(photo, shift_rng(0, s.name, 3)), s.name
        for chans in (1, 3):
            assert decode_image(out, size=(40, 30), in_chans=chans).shape == (40, 30, chans), s.name
    assert shifted("none", photo) == photo


@pytest.mark.parametrize(("name", "aspect"), [("pad_1x1", 1.0), ("pad_3x4", 3 / 4), ("pad_16x9", 16 / 9),
                                              ("crop_1x1", 1.0)])
def test_framing_shifts_give_the_stated_aspect_ratio(photo, name, aspect):
    src, out = photo_pixels(photo), photo_pixels(shifted(name, photo))
    h, w = out.shape[:2]
    assert abs(w / h - aspect) < 2 / min(h, w), (name, out.shape)
    if name.startswith("pad"):
        sh, sw = src.shape[:2]
        assert h >= sh and w >= sw
        top, left = (h - sh) // 2, (w - sw) // 2
        assert np.array_equal(out[top : top + sh, left : left + sw], src)  # the photo, centred, untouched
        padding = np.ones((h, w), bool)
        padding[top : top + sh, left : left + sw] = False
        assert np.abs(out[padding].astype(int) - background_colour(src)).max(initial=0) <= 1  # its background
    else:
        assert min(h, w) == min(src.shape[:2])


def test_small_puts_the_photo_in_a_larger_frame_of_its_background(photo):
    src, out = photo_pixels(photo), photo_pixels(shifted("small", photo))
    assert out.shape[0] == round(src.shape[0] / SMALL_SCALE) and out.shape[1] == round(src.shape[1] / SMALL_SCALE)
    assert np.abs(border(out, 1) - background_colour(src)).mean() < 8


@pytest.mark.parametrize("name", ["photo_background", "small_on_photo"])
def test_background_shifts_replace_the_background_with_a_photograph(photo, name):
    src, out = photo_pixels(photo), photo_pixels(shifted(name, photo))
    bg = background_colour(src)
    assert np.abs(border(out) - bg).mean() > 30, "the border still looks like the original background"
    assert border(out).std() > 10, "a flat colour, not a photograph"
    if name == "photo_background":  # the product stays where it was
        mask = product_mask(src) > 0.99
        assert np.abs(out[mask].astype(int) - src[mask].astype(int)).mean() < 3


def test_product_mask_separates_product_from_background(photo):
    mask = product_mask(photo_pixels(photo))
    assert mask.dtype == np.float32 and 0.05 < (mask > 0.5).mean() < 0.9
    assert mask[0, 0] == 0 and mask[-1, -1] == 0


def test_jpeg_q30_is_a_smaller_lossier_jpeg(photo):
    src = photo_pixels(photo)
    out = shifted("jpeg_q30", photo)
    assert out[:2] == b"\xff\xd8"
    assert len(out) < len(encode(src, fmt=".jpg", quality=95))
    assert np.abs(photo_pixels(out).astype(int) - src).mean() > 0.5


def test_blur_brightness_and_contrast(photo):
    src = photo_pixels(photo)
    gray = cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)
    blurred = cv2.cvtColor(photo_pixels(shifted("blur", photo)), cv2.COLOR_RGB2GRAY)
    assert cv2.Laplacian(blurred, cv2.CV_64F).var() < 0.6 * cv2.Laplacian(gray, cv2.CV_64F).var()
    dim = photo_pixels(shifted("dim", photo)).astype(np.float32)
    assert dim.mean() == pytest.approx(0.6 * src.mean(), rel=0.02)
    flat = photo_pixels(shifted("low_contrast", photo)).astype(np.float32)
    assert flat.std() == pytest.approx(0.5 * src.astype(np.float32).std(), rel=0.05)
    assert flat.mean() == pytest.approx(src.mean(), abs=1.0)


def test_rotation_changes_pixels_and_keeps_size(photo):
    src = photo_pixels(photo)
    for i in range(3):
        out = photo_pixels(shifted("rotate", photo, i))
        assert out.shape == src.shape
        assert np.abs(out.astype(int) - src).mean() > 1


def test_large_source_is_a_600_to_2000_px_jpeg(photo):
    sides = []
    for i in range(4):
        out = shifted("large_source", photo, i)
        assert out[:2] == b"\xff\xd8"
        sides.append(max(photo_pixels(out).shape[:2]))
    assert all(LARGE_SIDE_PX[0] <= s <= LARGE_SIDE_PX[1] for s in sides) and len(set(sides)) > 1


def test_pick_per_class_is_a_seeded_subset_in_order():
    samples = [(f"{c}{i}", c) for c in range(3) for i in range(10)]
    picked = pick_per_class(samples, 4, seed=1)
    assert len(picked) == 12 and picked == sorted(picked, key=samples.index)
    assert picked == pick_per_class(samples, 4, seed=1) != pick_per_class(samples, 4, seed=2)
    assert pick_per_class(samples, None, seed=1) == samples


def test_parse_extra():
    assert parse_extra(["real=/a/b", "web = c=d"]) == {"real": "/a/b", "web": "c=d"}
    for bad in (["real"], ["=dir"], ["real="], ["a=b", "a=c"]):
        with pytest.raises(ValueError):
            parse_extra(bad)


def extra_folder(tmp_path: Path) -> Path:
    """Examples with one class renamed to a class the model does not know, and a broken file."""
    extra = tmp_path / "extra"
    shutil.copytree(EXAMPLES, extra)
    (extra / "Bag").rename(extra / "not_clothing")
    (extra / "Coat" / "broken.png").write_bytes(b"not a png")
    return extra


def test_report_has_every_shift_and_the_extra_folder(tmp_path):
    out = tmp_path / "report"
    evaluate(MODEL, EXAMPLES, out, robustness=True, robustness_per_class=2, extra={"renamed": extra_folder(tmp_path)})
    for name in ("report.json", "report.md", "robustness.png", "robustness_examples.png"):
        assert (out / name).is_file(), name
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "report.json").read_text())
    rob = data["robustness"]
    assert [s["name"] for s in rob["shifts"]] == [s.name for s in SHIFTS]
    n = sum(min(2, len(list(d.iterdir()))) for d in EXAMPLES.iterdir())  # Dress has one photo
    assert rob["n_photos"] == n and all(s["n"] == n and s["failed"] == 0 for s in rob["shifts"])
    assert rob["shifts"][0]["accuracy_drop"] == 0 and "worn" in rob["not_measured"]
    assert all(0 <= s["accuracy"] <= 1 and 0 <= s["coverage"] <= 1 for s in rob["shifts"])

    x = data["extra"]["renamed"]
    assert x["images_found"] == 51 and x["images_failed"] == 1 and x["images_evaluated"] == 50
    assert x["known"]["n"] == 42 and x["target_precision"] == 0.995
    u = x["unknown"]["folders"]["not_clothing"]
    assert u["n"] == 8 and u["sorted"] == sum(u["sorted_into"].values()) and x["unknown"]["n"] == 8
    a = x["all_sorted"]
    assert a["sorted"] == x["known"]["at_threshold"]["sorted"] + u["sorted"]

    md = (out / "report.md").read_text()
    assert "## Robustness" in md and "## Extra folder: renamed" in md and "not_clothing" in md
    for s in SHIFTS:
        assert f"| {s.name} |" in md, s.name
    assert "people wearing the item" in md and "CC BY 2.0" in md


def test_cli_extra_and_no_robustness(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r"
    res = runner.invoke(main, ["evaluate", MODEL, str(EXAMPLES), "--out", str(out), "--no-robustness",
                               "--extra", f"renamed={extra_folder(tmp_path)}"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "extra renamed: 50 images" in res.output and "unknown-class photos auto-sorted" in res.output
    data = json.loads((out / "report.json").read_text())
    assert data["robustness"] is None and not (out / "robustness.png").exists()
    bad = runner.invoke(main, ["evaluate", MODEL, str(EXAMPLES), "--out", str(out), "--extra", "nodir"])
    assert bad.exit_code == 2 and "NAME=DIR" in bad.output


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not (FOOTWEAR_TAR.exists() and MOBILENET_WEIGHTS.exists()),
                    reason="../shared footwear photos or ImageNet weights not present (a user's clone)")
def test_robustness_report_on_footwear_photos(tmp_path):
    from pipeline.models.modelfile import ModelFile, save_model_file
    from pipeline.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model

    photos = footwear_photos(tmp_path / "fw", 6)
    net = create_model("mobilenet_v2", num_classes=3, weights=str(MOBILENET_WEIGHTS))
    model = tmp_path / "shoes.pt"
    save_model_file(ModelFile(arch="mobilenet_v2", class_names=["Boot", "Sandal", "Shoe"], in_chans=3,
                              input_size=(102, 136), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              state_dict=net.state_dict()), model)
    report = evaluate(str(model), photos, tmp_path / "out", robustness=True, robustness_per_class=4)
    rob = report["robustness"]
    assert rob["n_photos"] == 12 and all(s["n"] == 12 and s["failed"] == 0 for s in rob["shifts"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(f"| {s.name} |" in md for s in SHIFTS)
