"""Short real training runs: Fashion-MNIST always (Debian package), footwear photos when ../shared is present."""

import random
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.session import session_scope
from pipeline.errors import SourceError
from pipeline.fashion_mnist import DEFAULT_DIR, export_png_tree
from pipeline.modelfile import load_model_file
from pipeline.training import TrainConfig, scan_folder, stratified_split, train
from tests.images import BAD_IMAGES, FOOTWEAR_TAR, MOBILENET_WEIGHTS
from worker.cli import main

needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does)",
)


def accuracy_of_sort(url: str) -> float:
    from db.catalog import iter_items

    with session_scope(url) as session:
        rows = list(iter_items(session=session))
    good = [r for r in rows if r.status != "failed"]
    return sum(Path(r.image_uri).parent.name == r.category for r in good) / len(good)


@needs_fmnist
def test_custom_cnn_on_fashion_mnist_subset_beats_chance(tmp_path):
    export_png_tree(tmp_path / "train", "train", every=30)  # 2,000 images
    export_png_tree(tmp_path / "test", "test", every=20)  # 500 images
    for name, data in BAD_IMAGES.items():  # bad files in a training set are skipped with their reason
        (tmp_path / "train" / "Bag" / name).write_bytes(data)
    cfg = TrainConfig(arch="invsort_cnn", epochs=3, batch_size=64, lr=3e-3, image_size=(28, 28), in_chans=1)
    mf = train(tmp_path / "train", tmp_path / "m.pt", cfg, progress=False, log_fn=lambda s: None)
    assert len(mf.info["skipped"]) == len(BAD_IMAGES)
    assert [h["epoch"] for h in mf.info["history"]] == [1, 2, 3]

    loaded = load_model_file(str(tmp_path / "m.pt"))
    assert loaded.class_names == sorted(p.name for p in (tmp_path / "train").iterdir())
    url = f"sqlite:///{tmp_path}/c.db"
    result = CliRunner().invoke(main, ["sort", str(tmp_path / "test"), "--model", str(tmp_path / "m.pt"),
                                       "--db", url, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert accuracy_of_sort(url) > 0.5  # chance is 0.1


def test_training_is_repeatable_on_cpu(tmp_path):
    export = tmp_path / "d"
    if not (DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    export_png_tree(export, "test", every=50)
    cfg = TrainConfig(arch="invsort_cnn", epochs=1, batch_size=32, image_size=(28, 28), in_chans=1, threads=1)
    a = train(export, tmp_path / "a.pt", cfg, progress=False, log_fn=lambda s: None)
    b = train(export, tmp_path / "b.pt", cfg, progress=False, log_fn=lambda s: None)
    assert a.version == b.version


def test_training_folder_needs_two_categories(tmp_path):
    (tmp_path / "only").mkdir()
    shutil.copy(next(Path("examples/images").rglob("*.png")), tmp_path / "only" / "a.png")
    with pytest.raises(SourceError, match="one sub-folder per category"):
        scan_folder(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        scan_folder(tmp_path / "missing")


def test_stratified_split_keeps_every_class_in_both_parts():
    import numpy as np

    labels = np.array([0] * 50 + [1] * 10 + [2] * 2)
    tr, va = stratified_split(labels, 0.2, seed=1)
    assert set(labels[va]) == {0, 1, 2} and set(labels[tr]) == {0, 1, 2}
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(labels)


@pytest.mark.shared
@pytest.mark.skipif(not FOOTWEAR_TAR.exists() or not MOBILENET_WEIGHTS.exists(),
                    reason="../shared footwear photos or ImageNet weights not present (a user's clone)")
def test_footwear_transfer_learning_sorts_unseen_photos(tmp_path):
    """mobilenet_v2 from the ImageNet weights, classifier-only for speed, on 150 photos a class."""
    with tarfile.open(FOOTWEAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")]
        rng = random.Random(0)
        rng.shuffle(members)
        per_class: dict[str, list] = {}
        for m in members:
            per_class.setdefault(Path(m.name).parent.name, []).append(m)
        for cls, ms in per_class.items():
            for i, m in enumerate(ms[:250]):
                split = "train" if i < 150 else "holdout"
                dest = tmp_path / split / cls / Path(m.name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())
    model = tmp_path / "shoes.pt"
    result = CliRunner().invoke(main, [
        "train", str(tmp_path / "train"), "--out", str(model), "--arch", "mobilenet_v2",
        "--weights", str(MOBILENET_WEIGHTS), "--image-size", "102x136", "--epochs", "3", "--lr", "3e-3",
        "--freeze-backbone", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    url = f"sqlite:///{tmp_path}/shoes.db"
    result = CliRunner().invoke(main, ["sort", str(tmp_path / "holdout"), "--model", str(model), "--db", url,
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "sorted 300 images" in result.output
    assert accuracy_of_sort(url) >= 0.85
