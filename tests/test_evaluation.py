"""Evaluation: metrics against hand-computed values, ECE on synthetic data, and the full report end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluation.metrics import compute_metrics, expected_calibration_error
from pipeline.evaluation.report import evaluate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
MODEL = "bundled:fashion_mnist_cnn"


def test_compute_metrics_matches_hand_computed_values():
    names = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 2])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), y_pred] = 0.8
    m = compute_metrics(y_true, y_pred, probs, names)

    # Confusion matrix by hand (rows true, cols predicted):
    # a: 2 right, 1 → b, 1 → c;  b: 1 → a, 2 right;  c: 3 right.
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    # precision = TP / column sum, recall = TP / row sum, F1 = 2PR / (P + R)
    expected = {
        "a": (2 / 3, 2 / 4, 4),
        "b": (2 / 3, 2 / 3, 3),
        "c": (3 / 4, 3 / 3, 3),
    }
    for name, (p, r, support) in expected.items():
        c = m["per_class"][name]
        assert c["precision"] == pytest.approx(p)
        assert c["recall"] == pytest.approx(r)
        assert c["accuracy"] == pytest.approx(r)
        assert c["f1"] == pytest.approx(2 * p * r / (p + r))
        assert c["support"] == support
    f1s = {n: 2 * p * r / (p + r) for n, (p, r, _) in expected.items()}
    assert m["macro_avg"]["f1"] == pytest.approx(sum(f1s.values()) / 3)
    assert m["macro_avg"]["precision"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert m["weighted_avg"]["f1"] == pytest.approx((4 * f1s["a"] + 3 * f1s["b"] + 3 * f1s["c"]) / 10)
    assert m["weighted_avg"]["recall"] == pytest.approx(0.7)  # weighted recall is the accuracy
    # All confidences are 0.8 (one bin), accuracy 0.7 → ECE = |0.7 - 0.8| = 0.1.
    assert m["ece"] == pytest.approx(0.1)
    assert sum(b["count"] for b in m["reliability"]) == 10
    json.dumps(m)  # JSON-serialisable


def test_class_without_samples_gets_zeros_not_a_warning():
    m = compute_metrics(np.array([0, 1]), np.array([0, 1]), np.eye(3)[[0, 1]], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "accuracy": 0.0}
    assert m["accuracy"] == 1.0


def test_ece_near_zero_for_calibrated_and_large_for_overconfident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.0, 1.0, 200_000)
    calibrated = rng.uniform(0.0, 1.0, conf.size) < conf  # right with probability = confidence
    ece, bins = expected_calibration_error(conf, calibrated)
    assert ece < 0.01
    assert len(bins) == 15

    overconf = np.full(10_000, 0.99)
    right = rng.uniform(0.0, 1.0, overconf.size) < 0.6  # 99 % sure, 60 % right
    ece_over, _ = expected_calibration_error(overconf, right)
    assert ece_over > 0.1
    assert ece_over == pytest.approx(0.39, abs=0.02)


def test_evaluate_bundled_model_on_examples(tmp_path):
    out = tmp_path / "report"
    report = evaluate(MODEL, EXAMPLES, out, batch_size=16)
    for name in ("report.json", "report.md", "confusion_matrix.png", "reliability.png",
                 "training_curves.png", "most_confident_errors.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG", png
    data = json.loads((out / "report.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["accuracy"] >= 0.8
    assert sum(map(sum, data["confusion_matrix"])) == 50
    assert data["images_evaluated"] == 50 and data["images_failed"] == 0
    assert data["model"]["version"]
    md = (out / "report.md").read_text()
    assert "## Confusion matrix" in md and "(reliability.png)" in md


def test_bad_image_is_listed_not_fatal(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    bad = data / "Bag" / "broken.png"
    bad.write_bytes(b"this is not a png")
    report = evaluate(MODEL, data, tmp_path / "out")
    assert report["images_failed"] == 1
    assert report["failed_images"][0]["path"] == str(bad)
    assert report["failed_images"][0]["reason"]
    assert report["images_evaluated"] == 50
    assert "broken.png" in (tmp_path / "out" / "report.md").read_text()


def test_unknown_folder_is_a_config_error(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    (data / "Bag").rename(data / "Handbag")
    with pytest.raises(ConfigError, match="Handbag") as exc:
        evaluate(MODEL, data, tmp_path / "out")
    assert "Ankle_boot" in str(exc.value)  # names the model's classes


def test_evaluate_record_stores_the_figures_in_the_model_file_its_card_and_model_info(tmp_path):
    import shutil

    from click.testing import CliRunner

    import pipeline.assets
    from pipeline.models.modelfile import load_model_file
    from worker.cli import main

    model = tmp_path / "fm.pt"
    shutil.copy(Path(pipeline.assets.__file__).parent / "fashion_mnist_cnn.pt", model)
    before = load_model_file(str(model)).version
    extra = tmp_path / "extra"
    shutil.copytree(EXAMPLES / "Sandal", extra / "Sandal")
    shutil.copytree(EXAMPLES / "Bag", extra / "not_a_class")
    result = CliRunner().invoke(main, ["evaluate", str(model), str(EXAMPLES), "--out", str(tmp_path / "r"),
                                       "--robustness-per-class", "2", "--extra", f"real={extra}", "--record"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    mf = load_model_file(str(model))
    assert mf.version == before  # info is not part of the version
    (e,) = mf.info["evaluations"]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (e["n"], e["accuracy"], e["model_version"]) == (50, report["accuracy"], before)
    assert [r["name"] for r in e["robustness"]] == [r["name"] for r in report["robustness"]["shifts"]]
    n_sandal, n_bag = len(list((EXAMPLES / "Sandal").iterdir())), len(list((EXAMPLES / "Bag").iterdir()))
    assert e["extra"]["real"]["n"] == n_sandal and e["extra"]["real"]["unknown_n"] == n_bag
    card = (tmp_path / "fm.card.md").read_text()
    assert "## Measured off the training distribution" in card and "| shift | photos | top-1 |" in card
    assert f"`real`: {n_sandal} photos of the model's classes" in card
    info = CliRunner().invoke(main, ["model-info", str(model)], catch_exceptions=False).output
    assert "Measured off the training distribution" in info and f"`real`: {n_sandal} photos" in info
    # recording the same folder again replaces its entry
    CliRunner().invoke(main, ["evaluate", str(model), str(EXAMPLES), "--out", str(tmp_path / "r2"),
                              "--no-robustness", "--record"], catch_exceptions=False)
    assert len(load_model_file(str(model)).info["evaluations"]) == 1
    bundled = CliRunner().invoke(main, ["evaluate", MODEL, str(EXAMPLES), "--out", str(tmp_path / "r3"),
                                        "--no-robustness", "--record"])
    assert bundled.exit_code == 1 and "not a local file" in bundled.output
