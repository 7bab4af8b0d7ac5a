"""Short real training runs: Fashion-MNIST always (Debian package), footwear photos when ../shared is present."""

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.session import session_scope
from pipeline.errors import ConfigError, SourceError
from pipeline.io.fashion_mnist import DEFAULT_DIR, export_png_tree
from pipeline.io.folders import scan_folder
from pipeline.models.modelfile import load_model_file
from pipeline.training.loop import cpu_has_native_bf16
from pipeline.training.recipe import TrainConfig, resolve_recipe, train
from tests.images import BAD_IMAGES
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


def _quiet(_: str) -> None:
    pass


@pytest.mark.slow
@needs_fmnist
def test_custom_cnn_on_fashion_mnist_subset_beats_chance_and_obeys_its_threshold(tmp_path):
    export_png_tree(tmp_path / "data" / "train", "train", every=30)  # 2,000 images
    export_png_tree(tmp_path / "data" / "test", "test", every=20)  # 500 images: the given test split
    for name, data in BAD_IMAGES.items():  # bad files in a training set are excluded with their reason
        (tmp_path / "data" / "train" / "Bag" / name).write_bytes(data)
    out = tmp_path / "m.pt"
    mf = train(tmp_path / "data", out, overrides={"epochs": 3, "threads": 2}, progress=False, log_fn=_quiet)

    # the preset for small grayscale images: the custom CNN, 1 channel, 28x28
    assert (mf.arch, mf.in_chans, mf.input_size) == ("invsort_cnn", 1, (28, 28))
    data = mf.info["data"]
    assert data["excluded_count"] == len(BAD_IMAGES)
    assert {Path(p).name for p, _ in data["excluded"]} == set(BAD_IMAGES)
    assert sum(data["split_class_counts"]["test"].values()) == 500  # the given test/ folder is the test split
    assert [h["epoch"] for h in mf.info["history"]] == [1, 2, 3]
    assert mf.info["test"]["accuracy"] > 0.5  # chance is 0.1
    # temperature scaling lowers the validation NLL it is fitted on (that it lowers the ECE of an over- or
    # under-confident model is tests/test_calibration.py's; 15-bin ECE on 200 images is too noisy to assert here)
    cal = mf.info["calibration"]
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9 and 0 <= cal["val_ece_after"] < 1
    assert mf.temperature == pytest.approx(cal["temperature"]) and mf.temperature != 1.0
    assert mf.review_threshold == mf.info["threshold"]["threshold"] > 0
    # split manifest, model card and checkpoints are written next to the model
    assert (tmp_path / "m.split.csv").is_file() and (tmp_path / "m.pt.ckpt" / "last.pt").is_file()
    card = (tmp_path / "m.card.md").read_text()
    assert mf.version in card and "Confusion matrix" in card and data["split_sha256"] in card

    loaded = load_model_file(str(out))
    assert loaded.class_names == sorted(p.name for p in (tmp_path / "data" / "train").iterdir())
    assert (loaded.temperature, loaded.review_threshold, loaded.version) == (mf.temperature, mf.review_threshold,
                                                                              mf.version)
    url = f"sqlite:///{tmp_path}/c.db"
    result = CliRunner().invoke(main, ["sort", str(tmp_path / "data" / "test"), "--model", str(out),
                                       "--db", url, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert accuracy_of_sort(url) > 0.5
    with session_scope(url) as session:
        from db.catalog import iter_items

        rows = list(iter_items(session=session))
    review = [r for r in rows if r.status == "needs_review"]
    assert review and all(r.confidence < mf.review_threshold and len(r.topk) == 5 for r in review)
    assert all(r.confidence >= mf.review_threshold for r in rows if r.status == "sorted")


class _Interrupt(Exception):
    pass


@pytest.mark.slow  # two training runs with calibration on the shifted validation photos: ~4-5 s
@needs_fmnist
def test_resume_continues_where_an_interrupted_run_stopped(tmp_path):
    export_png_tree(tmp_path / "d", "test", every=25)  # 400 images
    cfg = TrainConfig(arch="invsort_cnn", epochs=3, batch_size=32, image_size=(28, 28), in_chans=1, threads=1,
                      patience=0, policy="none", color_jitter=0.0, test_fraction=0.0)
    whole = train(tmp_path / "d", tmp_path / "whole.pt", cfg, progress=False, log_fn=_quiet)

    def stop_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise _Interrupt  # the checkpoint of epoch 2 is written before this line
    with pytest.raises(_Interrupt):
        train(tmp_path / "d", tmp_path / "cut.pt", cfg, progress=False, log_fn=stop_after_epoch_2)
    assert not (tmp_path / "cut.pt").exists()
    lines: list[str] = []
    resumed = train(tmp_path / "d", tmp_path / "cut.pt", resume=True, progress=False, log_fn=lines.append)
    assert any(line.startswith("resuming from") and "after epoch 2/3" in line for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 3/3"]
    assert [h["epoch"] for h in resumed.info["history"]] == [1, 2, 3]
    # same seed, same threads: the resumed run ends with exactly the uninterrupted run's model
    assert resumed.version == whole.version


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="train once without --resume"):
        train(tmp_path, tmp_path / "m.pt", resume=True, progress=False, log_fn=_quiet)


def test_training_is_repeatable_on_cpu(tmp_path):
    if not (DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    export_png_tree(tmp_path / "d", "test", every=50)
    cfg = TrainConfig(arch="invsort_cnn", epochs=1, batch_size=32, image_size=(28, 28), in_chans=1, threads=1)
    lines: list[str] = []
    a = train(tmp_path / "d", tmp_path / "a.pt", cfg, progress=False, log_fn=lines.append)
    b = train(tmp_path / "d", tmp_path / "b.pt", cfg, progress=False, log_fn=_quiet)
    assert a.version == b.version
    # the review threshold's promise holds on the validation photos under the robustness shifts too (pooled)
    assert a.info["threshold"]["chosen_on"] == "validation+shifts" and len(a.info["threshold"]["shifts"]) == 14
    assert a.review_threshold >= a.info["threshold"]["clean"]["threshold"]
    assert any(line.startswith("shift-aware ") for line in lines)
    # training steps use bf16 autocast on a CPU with native bf16, float32 elsewhere and with amp off
    steps = "bfloat16 autocast steps" if cpu_has_native_bf16() else "float32 steps"
    assert any(line.startswith("training invsort_cnn on cpu") and line.endswith(steps) for line in lines)
    lines.clear()
    train(tmp_path / "d", tmp_path / "c.pt", replace(cfg, amp=False), progress=False, log_fn=lines.append)
    assert any(line.startswith("training invsort_cnn on cpu") and line.endswith("float32 steps") for line in lines)


@needs_fmnist
def test_training_progress_off_a_terminal_is_a_few_log_lines_not_bar_frames(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    export_png_tree(tmp_path / "d", "test", every=50)  # 200 images
    cfg = TrainConfig(arch="invsort_cnn", epochs=2, batch_size=16, image_size=(28, 28), in_chans=1, threads=1)
    train(tmp_path / "d", tmp_path / "m.pt", cfg, progress=True, log_fn=_quiet)  # stderr is captured: no tty
    assert "\r" not in capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    # check, decode train/val/test, two epochs: at least the last line of each, at most 11 each
    for desc in ("check", "decode train", "decode val", "decode test", "epoch 1/2", "epoch 2/2"):
        ours = [line for line in lines if line.startswith(desc + ": ")]
        assert 1 <= len(ours) <= 11, (desc, lines)
    assert any(line.startswith("epoch 2/2: 10/10 batch (") for line in lines)


def test_training_folder_needs_two_categories(tmp_path):
    (tmp_path / "only").mkdir()
    shutil.copy(next(Path("examples/images").rglob("*.png")), tmp_path / "only" / "a.png")
    with pytest.raises(SourceError, match="one sub-folder per category"):
        scan_folder(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        scan_folder(tmp_path / "missing")


def test_bad_recipe_values_are_refused_with_the_valid_range(tmp_path):
    with pytest.raises(ConfigError, match="balance must be one of auto, none, weights, sampler"):
        TrainConfig(balance="oversample").validate()
    with pytest.raises(ConfigError, match="unknown architecture 'vgg99'; known: .*mobilenet_v2"):
        TrainConfig(arch="vgg99").validate()
    with pytest.raises(ConfigError, match="unknown training setting"):
        resolve_recipe({"epoch": 3}, [(28, 28)], gray=True)


def test_presets_follow_the_photos():
    small = resolve_recipe({}, [(28, 28)] * 5, gray=True)
    assert (small.arch, small.in_chans, small.image_size, small.backgrounds) == ("invsort_cnn", 1, (28, 28), 0.0)
    photo = resolve_recipe({}, [(136, 102)] * 5, gray=False)  # (width, height): the footwear photos
    assert (photo.arch, photo.in_chans, photo.image_size) == ("mobilenet_v2", 3, (102, 136))
    assert photo.backgrounds == 0.5  # pasted onto real photographs: measured to help on real photos (README)
    assert resolve_recipe({"backgrounds": 0.0}, [(136, 102)], gray=False).backgrounds == 0.0
    with pytest.raises(ConfigError, match="backgrounds must be in"):
        TrainConfig(backgrounds=1.5).validate()
    big = resolve_recipe({"epochs": 2}, [(1200, 900)] * 5, gray=False)
    assert big.image_size == (224, 298) and big.epochs == 2
    assert resolve_recipe({"arch": "inception_v3"}, [(136, 102)], gray=False).image_size == (299, 299)


@pytest.mark.slow
@pytest.mark.shared
def test_footwear_transfer_learning_sorts_unseen_photos(footwear_probe, tmp_path):
    """mobilenet_v2 from the ImageNet weights, classifier-only for speed, on 150 photos a class (the session's
    footwear probe, tests/fixtures/footwear.py), sorts 100 unseen photos a class."""
    url = f"sqlite:///{tmp_path}/shoes.db"
    result = CliRunner().invoke(main, ["sort", str(footwear_probe.holdout), "--model", str(footwear_probe.model),
                                       "--db", url, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "sorted 300 images" in result.output
    assert accuracy_of_sort(url) >= 0.85


def test_a_photo_network_started_from_random_weights_is_said_loudly():
    import torch

    from pipeline.training.recipe import build_model

    said: list[str] = []
    build_model(TrainConfig(arch="mobilenet_v2"), 3, torch.device("cpu"), weights=None, log_fn=said.append)
    assert len(said) == 1 and said[0].startswith("WARNING: mobilenet_v2 starts from RANDOM weights")
    assert "--weights imagenet" in said[0]
    said.clear()
    build_model(TrainConfig(arch="invsort_cnn", in_chans=1), 3, torch.device("cpu"), weights=None, log_fn=said.append)
    assert said == []  # the custom CNN has no pretrained weights to miss


@needs_fmnist
def test_lp_ft_leaves_the_backbone_untouched_while_probing_and_scales_its_learning_rate(tmp_path):
    """--probe-epochs 1: after epoch 1 the backbone is where a linear probe (--freeze-backbone, same seed, so the
    same starting weights) leaves it, i.e. untouched; after epoch 2 it has moved. --backbone-lr-scale puts the
    backbone in its own AdamW groups at that share of the schedule's rate."""
    import torch

    from pipeline.models.registry import arch_spec, create_model
    from pipeline.training.loop import param_groups

    export_png_tree(tmp_path / "d", "test", every=50)  # 200 images
    base = dict(arch="invsort_cnn", batch_size=32, image_size=(28, 28), in_chans=1, threads=1, patience=0,
                policy="none", color_jitter=0.0, test_fraction=0.0, open_set_tpr=0, shift_calibration=False)
    head = arch_spec("invsort_cnn").classifier_prefixes
    snapshots: dict[str, list[dict]] = {"lpft": [], "probe": []}

    def keep(name: str):
        def log(line: str) -> None:
            if line.startswith("epoch "):
                ck = torch.load(tmp_path / f"{name}.pt.ckpt" / "last.pt", map_location="cpu", weights_only=True)
                snapshots[name].append(ck["model"])
        return log

    train(tmp_path / "d", tmp_path / "lpft.pt", TrainConfig(**base, epochs=2, probe_epochs=1, backbone_lr_scale=0.1),
          progress=False, log_fn=keep("lpft"))
    train(tmp_path / "d", tmp_path / "probe.pt", TrainConfig(**base, epochs=1, freeze_backbone=True),
          progress=False, log_fn=keep("probe"))

    def backbone(sd: dict) -> dict:
        return {k: v for k, v in sd.items() if not k.startswith(head) and v.dtype.is_floating_point
                and "running" not in k}

    (lp1, lp2), (probe1,) = snapshots["lpft"], snapshots["probe"]
    assert backbone(lp1).keys() and all(torch.equal(v, backbone(probe1)[k]) for k, v in backbone(lp1).items())
    assert any(not torch.equal(v, backbone(lp2)[k]) for k, v in backbone(lp1).items())  # epoch 2 trained it
    model = create_model("invsort_cnn", num_classes=10, in_chans=1)
    groups = param_groups(model, 0.05, head_prefixes=head, backbone_lr_scale=0.1)
    assert {g["lr_scale"] for g in groups} == {1.0, 0.1}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(p.ndim > 1 for g in groups if g["weight_decay"] for p in g["params"])
    with pytest.raises(ConfigError, match="probe_epochs must be in"):
        TrainConfig(epochs=2, probe_epochs=2).validate()
