"""The shift-aware review threshold: chosen on validation photos and the same photos under the robustness shifts,
on the bundled model with the bundled examples (fast), its CLI round trip and the evaluate report's promise table."""

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.evaluation.calibration import precision_interval
from pipeline.evaluation.report import promise_markdown, promise_rows
from pipeline.evaluation.shift_calibration import ShiftRows, choose_shift_threshold, shifted_rows
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.io.folders import scan_folder
from pipeline.models.modelfile import load_model_file
from worker.cli import main

MODEL = "bundled:fashion_mnist_cnn"
EXAMPLES = "examples/images"


@pytest.fixture(scope="module")
def rows():
    mf = load_model_file(MODEL)
    folders, found = scan_folder(EXAMPLES)
    samples = [(p, mf.class_names.index(folders[y])) for p, y in found]
    with Predictor(mf, PredictorOptions(device="cpu")) as predictor:
        return shifted_rows(samples, size=mf.input_size, in_chans=mf.in_chans,
                            predict=lambda x: predictor.predict_probs(torch.from_numpy(x)).numpy())


def test_the_shift_aware_threshold_is_above_the_clean_one_and_keeps_its_promise_on_the_shifts(rows):
    target = 0.8
    assert rows[0].name == "none" and len(rows) == 14 and all(len(r.confidence) == 50 for r in rows)
    choice = choose_shift_threshold(rows, target)
    clean = choice["clean"]
    assert choice["met"] and clean["met"]
    assert choice["threshold"] >= clean["threshold"]
    pooled = choice["per_shift"][-1]
    assert pooled["name"] == "pooled" and pooled["n"] == 700
    assert pooled["precision_bound"] >= target  # the promise holds on the shifted validation rows, pooled
    # ... where the clean split's own threshold breaks it
    conf = np.concatenate([r.confidence for r in rows])
    ok = np.concatenate([r.correct for r in rows])
    assert ok[conf >= clean["threshold"]].mean() < target


def test_no_threshold_is_met_when_a_row_set_cannot_reach_the_target():
    rows = [ShiftRows("none", np.linspace(0.5, 1, 100), np.ones(100, bool)),
            ShiftRows("bad", np.linspace(0.5, 1, 100), np.zeros(100, bool))]
    choice = choose_shift_threshold(rows, 0.95)
    assert not choice["met"] and choice["threshold"] == 1.0 and choice["clean"]["met"]


def test_calibrate_cli_round_trip(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.pt"
    result = runner.invoke(main, ["calibrate", MODEL, EXAMPLES, "--out", str(out), "--target-precision", "0.9",
                                  "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "small_on_photo" in result.output and "chosen on the validation split plus 13 shifts" in result.output
    mf = load_model_file(str(out))
    info = mf.info["threshold"]
    assert info["chosen_on"] == "validation+shifts" and info["data_dir"] == EXAMPLES
    assert mf.review_threshold == info["threshold"] >= info["clean"]["threshold"]
    assert math.isclose(info["previous_threshold"], load_model_file(MODEL).review_threshold)
    assert "(chosen on validation+shifts)" in runner.invoke(main, ["model-info", str(out)]).output
    plain = tmp_path / "plain.pt"
    result = runner.invoke(main, ["calibrate", str(out), EXAMPLES, "--out", str(plain), "--no-shifts", "--no-progress"])
    assert result.exit_code == 0, result.output
    again = load_model_file(str(plain))
    assert again.info["threshold"]["chosen_on"] == "validation"
    assert again.info["threshold"]["target_precision"] == 0.9  # the file's own target is kept
    assert again.review_threshold == info["clean"]["threshold"]
    refused = runner.invoke(main, ["calibrate", MODEL, EXAMPLES])
    assert refused.exit_code != 0 and "give --out" in refused.output


def test_the_report_puts_promised_and_measured_precision_side_by_side():
    report = {"data_dir": "holdout", "images_evaluated": 600, "at_threshold": {"sorted": 500, "errors_sorted": 1},
              "model": {"review_threshold": 0.99},
              "robustness": {"shifts": [{"name": "none", "n": 300, "sorted": 250, "errors_sorted": 0},
                                        {"name": "small", "n": 300, "sorted": 60, "errors_sorted": 20}]},
              "extra": {"real": {"known": {"n": 144, "at_threshold": {"sorted": 7, "errors_sorted": 1}},
                                 "unknown": {"n": 79}, "all_sorted": {"n": 223, "sorted": 9, "errors_sorted": 3}}}}
    p = promise_rows(report, {"target_precision": 0.995, "confidence_level": 0.9, "chosen_on": "validation+shifts"})
    verdicts = {r["rows"]: r["verdict"] for r in p["rows"]}
    assert verdicts == {"holdout": "kept", "robustness: none": "kept", "robustness: small": "missed",
                        "robustness: all shifts pooled": "missed", "real: the model's classes": "below, within noise",
                        "real: all, unknown classes counted wrong": "missed"}
    lo, hi = precision_interval(6, 7)
    assert lo < 6 / 7 < hi < 0.995 + 0.01
    md = promise_markdown(p)
    assert "## Promised and measured precision" in md and "| real: the model's classes | off | 144 | 7 (4.9%) |" in md
