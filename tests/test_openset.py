"""Open-set rejection: the score, the model file fields, the worker's status, ``invsort evaluate --ood``."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from db.catalog import iter_items
from db.session import session_scope
from pipeline.evaluation.openset import auroc_fpr
from pipeline.evaluation.report import evaluate
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.io.folders import load_images
from pipeline.models.modelfile import load_model_file, model_version, save_model_file
from pipeline.models.openset import UNKNOWN, fit_open_set
from tests.images import EXAMPLES, SHARED, example_files
from worker.cli import main

MODEL = "bundled:fashion_mnist_cnn"
REAL_TAR = SHARED / "data" / "real_photos_dev.tar"


def _examples(mf):
    names = list(mf.class_names)
    samples = [(str(p), names.index(p.parent.name)) for p in example_files()]
    return load_images(samples, size=mf.input_size, in_chans=mf.in_chans)


def _noise_dir(tmp_path: Path, n: int = 12) -> Path:
    """Real PNG files of uniform noise and of flat gray: clearly none of Fashion-MNIST's classes."""
    out = tmp_path / "ood"
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, (28, 28), dtype=np.uint8) if i % 2 == 0 else np.full((28, 28), 40 + 15 * i, np.uint8)
        assert cv2.imwrite(str(out / f"noise_{i:02d}.png"), img)
    return out


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory):
    """The bundled model with the open-set score fitted on the bundled examples, saved to a file."""
    mf = load_model_file(MODEL)
    data = _examples(mf)
    mf.open_set = fit_open_set(mf.build, mf.mean, mf.std, mf.num_classes, (data.images, data.labels), data.images,
                               tpr=0.95)
    path = tmp_path_factory.mktemp("openset") / "fmnist_ood.pt"
    save_model_file(mf, path)
    return path


def test_the_score_separates_noise_from_fashion_mnist_photos(fitted_model, tmp_path):
    mf = load_model_file(str(fitted_model))
    data = _examples(mf)
    noise = load_images([(str(p), 0) for p in sorted(_noise_dir(tmp_path).iterdir())], size=mf.input_size,
                        in_chans=mf.in_chans)
    with Predictor(mf, PredictorOptions(device="cpu")) as p:
        id_scores = p.predict_scored(torch.from_numpy(data.images))[:, -1].numpy()
        ood_scores = p.predict_scored(torch.from_numpy(noise.images))[:, -1].numpy()
        assert p.predict_probs(torch.from_numpy(data.images[:2])).shape == (2, 10)  # probabilities unchanged
    auroc, fpr95 = auroc_fpr(id_scores, ood_scores)
    assert auroc >= 0.95 and fpr95 <= 0.2, (auroc, fpr95)
    assert (id_scores >= mf.open_set.threshold).mean() >= 0.9  # ~95 % of in-distribution kept as known


def test_the_model_file_round_trips_the_open_set_fields_and_old_files_reject_nothing(fitted_model, tmp_path):
    mf = load_model_file(str(fitted_model))
    old = load_model_file(MODEL)
    assert old.open_set is None and mf.open_set is not None
    assert mf.open_set.method == "mahalanobis" and mf.open_set.tpr == 0.95
    assert mf.version == model_version(mf) != old.version  # the score changes predictions, so the version
    again = tmp_path / "again.pt"
    save_model_file(mf, again)
    back = load_model_file(str(again))
    assert back.version == mf.version and back.open_set.threshold == mf.open_set.threshold
    torch.testing.assert_close(back.open_set.whiten, mf.open_set.whiten)
    old_path = tmp_path / "old.pt"
    save_model_file(old, old_path)
    assert load_model_file(str(old_path)).version == old.version  # a file without the fields keeps its version
    noise = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    with Predictor(old, PredictorOptions(device="cpu")) as p:
        assert p.unknown(p.predict_scored(torch.from_numpy(noise))) == [False] * 4
    out = CliRunner().invoke(main, ["model-info", str(fitted_model)])
    assert out.exit_code == 0 and "open set: mahalanobis" in out.output and "TPR 0.95" in out.output


def test_rows_scored_unknown_go_to_review_with_reason_unknown_and_are_never_sorted(fitted_model, tmp_path,
                                                                                     sqlite_url):
    src = tmp_path / "mixed"
    src.mkdir()
    for p in example_files()[:20]:
        (src / p.name).write_bytes(p.read_bytes())
    for p in _noise_dir(tmp_path).iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    result = CliRunner().invoke(main, ["sort", str(src), "--model", str(fitted_model), "--db", sqlite_url,
                                       "--no-progress"], env={"INVSORT_REVIEW_THRESHOLD": "0.0"})
    assert result.exit_code == 0, result.output
    with session_scope(sqlite_url) as session:
        rows = list(iter_items(session=session))
    noise = [r for r in rows if Path(r.image_uri).name.startswith("noise_")]
    assert len(noise) == 12 and len(rows) == 32
    unknown = [r for r in rows if r.error == UNKNOWN]
    assert all(r.status == "needs_review" for r in unknown)  # review threshold 0: only the score holds them back
    assert sum(r.error == UNKNOWN for r in noise) >= 11, [(r.status, r.error) for r in noise]
    assert not any(r.status == "sorted" for r in noise if r.error == UNKNOWN)
    assert sum(r.status == "sorted" for r in rows if not Path(r.image_uri).name.startswith("noise_")) >= 15


def test_evaluate_ood_writes_auroc_fpr95_and_the_histogram(fitted_model, tmp_path):
    out = tmp_path / "report"
    r = evaluate(str(fitted_model), EXAMPLES, out, robustness=False, ood=_noise_dir(tmp_path))
    o = r["open_set"]
    assert o["method"] == "mahalanobis" and o["n_ood"] == 12 and o["auroc"] >= 0.95 and o["fpr_at_95_tpr"] <= 0.2
    assert (out / "openset_hist.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["open_set"]["auroc"] == o["auroc"]
    md = (out / "report.md").read_text()
    assert "## Open-set rejection" in md and "openset_hist.png" in md


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not REAL_TAR.exists(), reason="../shared/data/real_photos_dev.tar not present (a user's clone)")
def test_a_trained_footwear_model_refuses_real_photos_of_other_things(footwear_probe, tmp_path):
    """`invsort train` fits the score (its open-set step) and the worker keeps not_footwear photos from `sorted`.

    The session's footwear probe (tests/fixtures/footwear.py: a linear probe on 150 catalogue photos a class), then
    the 79 real photos of no footwear sorted through `invsort sort`: at most 1 in 25 may be auto-sorted.
    """
    with tarfile.open(REAL_TAR) as tar:
        tar.extractall(tmp_path / "real", filter="data")
    ood = next((tmp_path / "real").rglob("not_footwear"))
    model = footwear_probe.model
    mf = load_model_file(str(model))
    assert mf.open_set is not None and mf.open_set.method == "mahalanobis"
    url = f"sqlite:///{tmp_path}/ood.db"
    result = CliRunner().invoke(main, ["sort", str(ood), "--model", str(model), "--db", url, "--no-progress"])
    assert result.exit_code == 0, result.output
    with session_scope(url) as session:
        rows = list(iter_items(session=session))
    assert len(rows) == len([p for p in ood.iterdir() if p.is_file()])
    auto = sum(r.status == "sorted" for r in rows)
    assert auto <= len(rows) / 25, f"{auto} of {len(rows)} not_footwear photos auto-sorted"
    assert sum(r.error == UNKNOWN for r in rows) >= len(rows) / 2


def _item(i: int):
    from pipeline.records import Item

    return Item(str(i), str(i))


def test_the_model_card_says_which_open_set_score_and_threshold(fitted_model):
    from pipeline.models.modelcard import model_card

    fitted = load_model_file(str(fitted_model))
    section = model_card(fitted).split('## Open-set rejection ("none of my categories")', 1)[1].split("\n## ", 1)[0]
    assert "mahalanobis score" in section and f"threshold {fitted.open_set.threshold:.6g}" in section
    assert f"keep {fitted.open_set.tpr:.0%} of {fitted.open_set.n_val} validation images" in section
    bare = model_card(load_model_file(MODEL)).split("## Open-set rejection", 1)[1].split("\n## ", 1)[0]
    assert "Not fitted" in bare
