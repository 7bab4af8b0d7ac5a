"""The feedback loop (pipeline/feedback.py): reviewed catalog rows join the next model's training split,
and ``init_from`` fine-tunes an existing model file. Real training runs on Fashion-MNIST (Debian package), a real
SQLite catalog written by ``invsort sort`` and decided on by :mod:`db.reviews`."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.catalog import iter_items
from db.reviews import record_review
from db.session import dispose_engines, session_scope
from pipeline.errors import ConfigError
from pipeline.feedback import catalog_feedback
from pipeline.io.fashion_mnist import DEFAULT_DIR, export_png_tree
from pipeline.io.storage import local_path
from pipeline.models.modelfile import load_model_file
from pipeline.settings import get_settings
from pipeline.training.recipe import FINE_TUNE_LR_DIVISOR, PRESETS, train
from worker.cli import main

pytestmark = pytest.mark.skipif(
    not (DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does)",
)

FAST = {"arch": "invsort_cnn", "epochs": 1, "batch_size": 32, "threads": 1, "shift_calibration": False}


def _split(manifest: Path) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    with manifest.open(newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["split"], set()).add((row["path"], row["class"]))
    return out


@pytest.fixture
def roots(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("INVSORT_LOCAL_ROOTS", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()
    dispose_engines()


def test_reviewed_rows_join_the_training_split_and_the_run_fine_tunes_the_model_file(roots):
    tmp = roots
    export_png_tree(tmp / "d", "train", every=60)  # 1,000 photos: the data folder
    export_png_tree(tmp / "pool", "test", every=200)  # 50 photos the first model never saw: sorted, then reviewed
    m0 = train(tmp / "d", tmp / "m0.pt", overrides=dict(FAST), progress=False, log_fn=lambda _: None)
    before = _split(tmp / "m0.split.csv")
    # a test photo of the data folder, sorted and reviewed too: its bytes must not reach the training split
    leak_src, leak_class = sorted(before["test"])[0]
    shutil.copy(leak_src, tmp / "pool" / leak_class / "copy_of_a_test_photo.png")

    url = f"sqlite:///{tmp}/catalog.db"
    result = CliRunner().invoke(main, ["sort", str(tmp / "pool"), "--model", str(tmp / "m0.pt"), "--db", url,
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    with session_scope(url) as session:
        rows = sorted(iter_items(session=session), key=lambda r: r.item_id)
    assert len(rows) == 51
    leak_row = next(r for r in rows if r.image_uri.endswith("copy_of_a_test_photo.png"))
    others = [r for r in rows if r is not leak_row]
    labelled = others[:6]  # reviewers decide with the photos' true folders
    with session_scope(url) as session:
        for row in labelled:
            record_review(session=session, item_id=row.item_id, category=local_path(row.image_uri).parent.name,
                          reviewer="sim")
        record_review(session=session, item_id=leak_row.item_id, category=leak_class, reviewer="sim")
        record_review(session=session, item_id=others[6].item_id, category=None, reviewer="sim")  # not a product
    gone = local_path(labelled[5].image_uri)
    gone.unlink()  # a reviewed photo that has since been deleted fails alone

    lines: list[str] = []
    m1 = train(tmp / "d", tmp / "m1.pt", overrides={"init_from": str(tmp / "m0.pt"), "epochs": 1, "threads": 1,
                                                    "shift_calibration": False},
               progress=False, log_fn=lines.append, feedback=catalog_feedback(url, log_fn=lines.append))

    fb = m1.info["data"]["feedback"]
    assert (fb["reviewed_rows"], fb["unknown"], fb["failed"], fb["added_to_train"]) == (8, 1, 1, 5)
    assert fb["duplicates"] == 1 and str(gone) in fb["failed_examples"][0][1]
    after = _split(tmp / "m1.split.csv")
    # validation and test are the data folder's, as before: the two models' figures compare on the same photos
    assert after["val"] == before["val"] and after["test"] == before["test"]
    added = after["train"] - before["train"]
    assert len(added) == 5 and before["train"] <= after["train"]
    expected = sorted(local_path(r.image_uri).parent.name for r in labelled[:5])
    assert sorted(c for _, c in added) == expected
    assert all(Path(p).is_relative_to(tmp / "m1.pt.ckpt" / "feedback") for p, _ in added)
    # fine-tuned from m0: same architecture and input, every weight (same categories), a lower learning rate
    assert (m1.arch, m1.in_chans, m1.input_size) == (m0.arch, m0.in_chans, m0.input_size)
    assert any(line.startswith(f"fine-tuning from {tmp / 'm0.pt'}") and "every weight" in line for line in lines)
    assert m1.info["recipe"]["lr"] == pytest.approx(PRESETS["small"]["lr"] / FINE_TUNE_LR_DIVISOR)
    assert m1.info["recipe"]["weights"] is None and load_model_file(str(tmp / "m1.pt")).version == m1.version


def test_init_from_a_model_of_other_categories_starts_a_new_classifier(roots):
    tmp = roots
    export_png_tree(tmp / "d", "test", every=25)  # 400 photos, 10 categories
    train(tmp / "d", tmp / "m0.pt", overrides=dict(FAST), progress=False, log_fn=lambda _: None)
    for name in ("Bag", "Coat"):
        shutil.rmtree(tmp / "d" / name)
    lines: list[str] = []
    m1 = train(tmp / "d", tmp / "m1.pt", overrides={"init_from": str(tmp / "m0.pt"), "epochs": 1, "threads": 1,
                                                    "shift_calibration": False},
               progress=False, log_fn=lines.append)
    assert len(m1.class_names) == 8
    assert any("the classifier starts new" in line for line in lines)


def test_init_from_another_architecture_is_refused(roots):
    tmp = roots
    export_png_tree(tmp / "d", "test", every=50)
    train(tmp / "d", tmp / "m0.pt", overrides=dict(FAST), progress=False, log_fn=lambda _: None)
    with pytest.raises(ConfigError, match="init_from .* is invsort_cnn"):
        train(tmp / "d", tmp / "m1.pt", overrides={"init_from": str(tmp / "m0.pt"), "arch": "mobilenet_v2",
                                                   "epochs": 1, "threads": 1},
              progress=False, log_fn=lambda _: None)


def test_cli_train_takes_init_from_and_from_catalog(roots):
    tmp = roots
    export_png_tree(tmp / "d", "test", every=50)
    r = CliRunner().invoke(main, ["train", str(tmp / "d"), "--out", str(tmp / "m0.pt"), "--arch", "invsort_cnn",
                                  "--epochs", "1", "--threads", "1", "--no-shift-calibration", "--no-progress"])
    assert r.exit_code == 0, r.output
    url = f"sqlite:///{tmp}/empty.db"
    r = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train", str(tmp / "d"), "--out", str(tmp / "m1.pt"), "--init-from",
                                  str(tmp / "m0.pt"), "--from-catalog", url, "--epochs", "1", "--threads", "1",
                                  "--no-shift-calibration", "--no-progress", "--no-onnx", "--attribute", "material"])
    assert r.exit_code == 0, r.output
    assert "feedback: 0 reviewed rows" in r.output
    assert (tmp / "m0.onnx").exists() and not (tmp / "m1.onnx").exists()  # --no-onnx: no export beside m1.pt
    assert load_model_file(str(tmp / "m1.pt")).attribute == "material"
    assert load_model_file(str(tmp / "m1.pt")).info["data"]["feedback"]["added_to_train"] == 0
