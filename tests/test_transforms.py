"""The v2 presets: evaluation matches the worker's preprocessing; training augmentation and batch mixing."""

import functools
import io
import pickle
import tarfile

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.io.images import decode_image, to_model_input
from pipeline.models.registry import IMAGENET_MEAN, IMAGENET_STD
from pipeline.training.transforms import POLICIES, batch_mixing, eval_preset, train_preset
from tests.images import FOOTWEAR_TAR, example_files, photo_jpeg

GRAY = ((0.5,), (0.5,))
RGB = (IMAGENET_MEAN, IMAGENET_STD)


def worker_tensor(data: bytes, size, in_chans, mean, std) -> torch.Tensor:
    """What the worker feeds the model for one file: decode_image, then to_model_input on a batch of one."""
    img = torch.from_numpy(decode_image(data, size=size, in_chans=in_chans))[None]
    c = len(mean)
    return to_model_input(img, torch.tensor(mean).view(1, c, 1, 1), torch.tensor(std).view(1, c, 1, 1))[0]


def eval_tensor(data: bytes, size, in_chans, mean, std) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return eval_preset(size, mean, std, in_chans=in_chans)(im)


def assert_same_as_worker(files: list[bytes], size, in_chans, norm, *, exact: bool = False) -> None:
    diffs = []
    for data in files:
        w, e = worker_tensor(data, size, in_chans, *norm), eval_tensor(data, size, in_chans, *norm)
        assert type(e) is torch.Tensor and e.dtype == w.dtype == torch.float32
        assert e.shape == w.shape == (in_chans, *size)
        diffs.append((w - e).abs())
    mean_abs = torch.stack([d.mean() for d in diffs]).mean().item()
    assert mean_abs < 0.02, f"mean |worker - eval| = {mean_abs:.4f}"
    if exact:  # lossless files: both paths use the same decoded pixels and the same resize
        assert max(d.max().item() for d in diffs) < 1e-6


@functools.cache
def footwear_photos(n: int) -> list[bytes]:
    out = []
    with tarfile.open(FOOTWEAR_TAR) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                out.append(tar.extractfile(member).read())
                if len(out) == n:
                    return out
    return out


# Fashion-MNIST PNGs are 28x28: (20, 20) shrinks (OpenCV INTER_AREA, non-integer factor), (64, 48) enlarges.
@pytest.mark.parametrize("size", [(20, 20), (14, 14), (64, 48)], ids=["shrink-1.4x", "shrink-2x", "enlarge"])
@pytest.mark.parametrize("in_chans,norm", [(1, GRAY), (3, RGB)], ids=["gray", "rgb"])
def test_eval_preset_matches_the_worker_on_fashion_mnist_pngs(size, in_chans, norm):
    files = [p.read_bytes() for p in example_files()]
    assert files, "examples/images is empty"
    assert_same_as_worker(files, size, in_chans, norm, exact=True)


@pytest.mark.parametrize("size", [(51, 68), (71, 95), (224, 224)], ids=["shrink-2x", "shrink-1.4x", "enlarge"])
def test_eval_preset_matches_the_worker_on_jpeg_photos(size):
    assert_same_as_worker([photo_jpeg(seed) for seed in range(8)], size, 3, RGB)


@pytest.mark.shared
@pytest.mark.skipif(not FOOTWEAR_TAR.exists(), reason="../shared/data footwear photos not present (a user's clone)")
@pytest.mark.parametrize("size", [(51, 68), (71, 95), (224, 224)], ids=["shrink-2x", "shrink-1.4x", "enlarge"])
@pytest.mark.parametrize("in_chans,norm", [(1, GRAY), (3, RGB)], ids=["gray", "rgb"])
def test_eval_preset_matches_the_worker_on_footwear_photos(size, in_chans, norm):
    assert_same_as_worker(footwear_photos(20), size, in_chans, norm)


def _rgba_png() -> bytes:
    bgra = np.full((60, 90, 4), 255, np.uint8)
    cv2.rectangle(bgra, (5, 5), (40, 30), (10, 30, 200, 255), -1)
    bgra[:, :, 3] = np.linspace(0, 255, 90, dtype=np.uint8)[None, :]  # fades from transparent to opaque
    ok, buf = cv2.imencode(".png", bgra)
    assert ok
    return buf.tobytes()


def _rotated_jpeg() -> bytes:
    rgb = np.full((60, 90, 3), 255, np.uint8)
    cv2.rectangle(rgb, (5, 5), (40, 30), (200, 30, 10), -1)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def _gray16_png() -> bytes:
    ok, buf = cv2.imencode(".png", (np.arange(60 * 90).reshape(60, 90) * 12).astype(np.uint16))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("make", [_rgba_png, _rotated_jpeg, _gray16_png], ids=["rgba-png", "exif-jpeg", "16bit-png"])
@pytest.mark.parametrize("in_chans,norm", [(1, GRAY), (3, RGB)], ids=["gray", "rgb"])
def test_eval_preset_brings_pil_images_to_the_workers_mode(make, in_chans, norm):
    # transparency onto white, EXIF orientation, 16 -> 8 bits: as decode_image does
    assert_same_as_worker([make()], (40, 30), in_chans, norm)


def test_eval_preset_takes_uint8_tensors_and_crops_the_centre():
    data = photo_jpeg(3)
    full = torch.from_numpy(decode_image(data, size=(102, 136))).permute(2, 0, 1)  # (3, 102, 136) uint8
    from_pil = eval_tensor(data, (51, 68), 3, *RGB)
    assert torch.equal(eval_preset((51, 68), *RGB)(full), from_pil)

    cropped = eval_preset((56, 56), *RGB, crop_fraction=0.875)(full)  # resize to 64x64, keep the centre 56x56
    assert torch.equal(cropped, eval_preset((64, 64), *RGB)(full)[:, 4:60, 4:60])
    with pytest.raises(ConfigError, match="crop_fraction"):
        eval_preset((56, 56), *RGB, crop_fraction=0.0)


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
    for tr in (train_preset((102, 136), *RGB), eval_preset((102, 136), *RGB)):
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
