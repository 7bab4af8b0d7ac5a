"""Training augmentation and batch mixing; training evaluates with the worker's own preprocessing."""

import pickle
import tarfile
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
from pipeline.training.transforms import POLICIES, PasteOnBackground, batch_mixing, train_preset
from tests.images import EXAMPLES, FOOTWEAR_TAR, example_files, photo_jpeg

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


@pytest.mark.parametrize("backgrounds", [0.0, 1.0])
def test_presets_pickle_for_dataloader_worker_processes(backgrounds):
    img = _uint8_chw(photo_jpeg(1), (102, 136), 3)
    tr = train_preset((102, 136), *RGB, backgrounds=backgrounds)
    clone = pickle.loads(pickle.dumps(tr))  # noqa: S301 - bytes this test just made
    torch.manual_seed(3)
    a = tr(img)
    torch.manual_seed(3)
    assert torch.equal(clone(img), a)


@pytest.fixture(scope="module")
def catalogue_photo() -> tuple[bytes, tuple[int, int]]:
    """A real footwear catalogue photo (136x102 on white) when ../shared is present, else a bundled example."""
    if FOOTWEAR_TAR.exists():
        with tarfile.open(FOOTWEAR_TAR) as tar:
            for m in tar:  # the first photo: no need to list the whole archive
                if m.isfile() and m.name.endswith(".jpg"):
                    f = tar.extractfile(m)
                    assert f is not None
                    return f.read(), (102, 136)
    return next(p for p in example_files() if "Ankle_boot" in str(p)).read_bytes(), (28, 28)


def _border(x: torch.Tensor, b: int = 2) -> torch.Tensor:
    return torch.cat([x[:, :b].flatten(1), x[:, -b:].flatten(1), x[:, :, :b].flatten(1), x[:, :, -b:].flatten(1)], 1)


def test_paste_on_background_puts_the_product_on_a_photograph(catalogue_photo):
    data, size = catalogue_photo
    img = _uint8_chw(data, size, 3)
    plain = _border(img).float().mean(1)  # white for a catalogue shot, black for Fashion-MNIST
    paste = PasteOnBackground(1.0)
    torch.manual_seed(0)
    for _ in range(8):
        out = paste(img)
        assert out.dtype == torch.uint8 and out.shape == img.shape
        edge = _border(out).float()
        assert (edge.mean(1) - plain).abs().max() > 20 or edge.std() > 20  # the border is a photograph now
    gray = _uint8_chw(data, size, 1)
    out = paste(gray)
    assert out.dtype == torch.uint8 and out.shape == gray.shape


def test_paste_on_background_is_reproducible_and_leaves_what_it_cannot_cut(catalogue_photo):
    img = _uint8_chw(catalogue_photo[0], catalogue_photo[1], 3)
    paste = PasteOnBackground(0.5)
    torch.manual_seed(11)
    first = [paste(img) for _ in range(8)]
    torch.manual_seed(11)
    assert all(torch.equal(a, b) for a, b in zip(first, [paste(img) for _ in range(8)], strict=True))
    assert any(torch.equal(a, img) for a in first) and not all(torch.equal(a, img) for a in first)  # p = 0.5
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8))
    assert torch.equal(PasteOnBackground(1.0)(noise), noise)  # no plain background: nothing to cut out


def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'autoaugment'; valid: trivialaugment, randaugment, none"):
        train_preset((28, 28), *GRAY, in_chans=1, policy="autoaugment")


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": (0.0, 1.0)}, "crop scale"),
    ({"color_jitter": -0.1}, "color_jitter"),
    ({"random_erasing": 1.5}, "random_erasing"),
    ({"backgrounds": 1.5}, "backgrounds"),
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
