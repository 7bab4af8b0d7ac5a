"""Training augmentation and batch mixing; training evaluates with the worker's own preprocessing."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.io.folders import load_images, scan_folder
from pipeline.io.images import decode_image
from pipeline.models.modelfile import load_model_file
from pipeline.models.registry import IMAGENET_MEAN, IMAGENET_STD
from pipeline.training.loop import predict_logits
from pipeline.training.transforms import POLICIES, batch_mixing, train_preset
from tests.images import EXAMPLES, example_files, photo_jpeg

GRAY = ((0.5,), (0.5,))
RGB = (IMAGENET_MEAN, IMAGENET_STD)


def test_training_evaluates_with_the_workers_preprocessing():
    """Validation, calibration and test in training (and ``invsort evaluate``) see what the worker's model sees:
    the same decoded pixels (pipeline.io.folders.load_images) and the same normalisation and logits
    (pipeline.training.loop.predict_logits vs. the worker's Predictor on decode_image of the same bytes)."""
    mf = load_model_file("bundled:fashion_mnist_cnn")
    _, samples = scan_folder(EXAMPLES)
    arrays = load_images(samples, size=mf.input_size, in_chans=mf.in_chans)
    assert not arrays.failed and arrays.paths == [p for p, _ in samples]
    worker_pixels = np.stack([decode_image(Path(p).read_bytes(), size=mf.input_size, in_chans=mf.in_chans)
                              for p in arrays.paths])
    assert np.array_equal(arrays.images, worker_pixels)
    c = mf.in_chans
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, c, 1, 1) for v in (mf.mean, mf.std))
    ours = predict_logits(mf.build(), arrays.images, mean, std, batch_size=16)
    worker = Predictor(mf, PredictorOptions(device="cpu")).predict_logits(torch.from_numpy(worker_pixels))
    assert ours.shape == worker.shape == (50, mf.num_classes)
    assert torch.allclose(ours, worker, atol=1e-4)


def _uint8_chw(data: bytes, size, in_chans) -> torch.Tensor:
    """As the training code holds images: decoded at the input size, HWC uint8 viewed as CHW."""
    return torch.from_numpy(decode_image(data, size=size, in_chans=in_chans)).permute(2, 0, 1)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("in_chans,norm", [(1, GRAY), (3, RGB)], ids=["gray", "rgb"])
def test_train_preset_output_shape_dtype_and_range(policy, in_chans, norm):
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in norm)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    tr = train_preset((96, 72), *norm, in_chans=in_chans, policy=policy, random_erasing=0.5)
    torch.manual_seed(0)
    for seed in range(6):
        x = tr(_uint8_chw(photo_jpeg(seed), (102, 136), in_chans))
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (in_chans, 96, 72)
        assert torch.isfinite(x).all()
        assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()


@pytest.mark.parametrize("in_chans", [1, 3])
def test_train_preset_is_reproducible_under_a_seed(in_chans):
    norm = GRAY if in_chans == 1 else RGB
    img = _uint8_chw(example_files()[0].read_bytes(), (28, 28), in_chans)
    tr = train_preset((28, 28), *norm, in_chans=in_chans, random_erasing=0.25)
    torch.manual_seed(7)
    first = [tr(img) for _ in range(5)]
    torch.manual_seed(7)
    again = [tr(img) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # it does augment


def test_presets_pickle_for_dataloader_worker_processes():
    img = _uint8_chw(photo_jpeg(1), (102, 136), 3)
    tr = train_preset((102, 136), *RGB)
    clone = pickle.loads(pickle.dumps(tr))  # noqa: S301 - bytes this test just made
    torch.manual_seed(3)
    a = tr(img)
    torch.manual_seed(3)
    assert torch.equal(clone(img), a)


def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'autoaugment'; valid: trivialaugment, randaugment, none"):
        train_preset((28, 28), *GRAY, in_chans=1, policy="autoaugment")


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": (0.0, 1.0)}, "crop scale"),
    ({"color_jitter": -0.1}, "color_jitter"),
    ({"random_erasing": 1.5}, "random_erasing"),
    ({"in_chans": 3}, "3 value"),  # grayscale mean/std for an RGB model
])
def test_train_preset_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        train_preset((28, 28), *GRAY, **{"in_chans": 1, **kwargs})


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)], ids=["mixup", "cutmix", "both"])
def test_batch_mixing_gives_soft_labels_that_sum_to_one(mixup, cutmix):
    mix = batch_mixing(5, mixup_alpha=mixup, cutmix_alpha=cutmix)
    assert mix is not None
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 24)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for _ in range(4):
        out, soft = mix(images, labels)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert soft.shape == (8, 5) and soft.dtype == torch.float32
        assert torch.allclose(soft.sum(dim=1), torch.ones(8)) and (soft >= 0).all()


def test_batch_mixing_off_and_bad_alphas():
    assert batch_mixing(5) is None
    with pytest.raises(ConfigError, match="mixup_alpha"):
        batch_mixing(5, mixup_alpha=-1.0)
