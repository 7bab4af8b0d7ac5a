"""The GPU path of the pipeline, checked on the CPU where it can be: torchvision's JPEG decoder with the on-device
resize against OpenCV (what matters: the model's top-1 agrees), failures falling back per image with the same
reasons, the in-flight batch queue, torch.compile and the settings. Tests that need a CUDA GPU check pinned
buffers, streams and nvJPEG end to end, and are skipped without one.
"""

import contextlib
import functools
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pipeline.inference.streaming as streaming
from pipeline.errors import ConfigError, ImageError
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.inference.streaming import run_pipeline
from pipeline.io.images import (
    batch_decodable_jpeg,
    decode_image,
    decode_jpeg_batch,
    resize_for_model,
    resize_on_device,
    to_model_input,
)
from pipeline.models.modelfile import ModelFile, load_model_file
from pipeline.models.registry import create_model
from pipeline.records import Item
from tests.images import BAD_IMAGES, FOOTWEAR_TAR, MOBILENET_WEIGHTS, SHARED, example_files, photo_jpeg
from worker.cli import main

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (pinned buffers, streams, nvJPEG); this machine has none"
)
needs_footwear = pytest.mark.skipif(
    not FOOTWEAR_TAR.exists() or not MOBILENET_WEIGHTS.exists(),
    reason="../shared footwear photos or MobileNetV2 ImageNet weights not present (a user's clone)",
)
REAL_PHOTOS_TAR = SHARED / "data" / "real_photos_dev.tar"
needs_real_photos = pytest.mark.skipif(
    not REAL_PHOTOS_TAR.exists() or not MOBILENET_WEIGHTS.exists(),
    reason="../shared real photos or MobileNetV2 ImageNet weights not present (a user's clone)",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = PredictorOptions(device="cpu")
# The top-1 of the torchvision path must agree with the OpenCV path's on at least this share of real photos.
MIN_TOP1_AGREEMENT = 0.99


class BytesReader:
    """The pipeline's reader over an in-memory ``{uri: bytes}``."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def read(self, uri: str) -> bytes:
        return self.files[uri]


def sort_files(files: dict[str, bytes], predictor: Predictor, **kw) -> list:
    rows: list = []
    run_pipeline([Item(k, k) for k in files], predictor=predictor, reader=BytesReader(files), on_batch=rows.extend,
                 decode_threads=2, **kw)
    assert [r.item_id for r in rows] == list(files)  # every item once, in input order
    return rows


def photos_in(tar_path: Path) -> dict[str, bytes]:
    """Every image file of a tar, by name, in sorted order."""
    out = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")):
                out[member.name] = tar.extractfile(member).read()
    return dict(sorted(out.items()))


@functools.cache
def footwear_split() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """600 footwear photos to fit a probe on and 300 others to test it on (136x102 catalogue shots, the three
    classes mixed)."""
    photos = photos_in(FOOTWEAR_TAR)
    names = list(photos)
    pick = np.random.default_rng(0).permutation(len(names))[:900]
    chosen = {names[i]: photos[names[i]] for i in pick}
    keys = list(chosen)
    return {k: chosen[k] for k in keys[:600]}, {k: chosen[k] for k in keys[600:]}


@functools.cache
def footwear_probe_state() -> dict[str, torch.Tensor]:
    """MobileNetV2 (ImageNet features) with its 3-class head fitted, by logistic regression, on the features of
    600 footwear photos decoded by OpenCV at 102x136 px: a classifier with real margins (about 0.94 top-1 on
    unseen catalogue photos), as a fine-tuned footwear model has; a random head would flip on noise."""
    train, _ = footwear_split()
    model = create_model("mobilenet_v2", num_classes=3, weights=str(MOBILENET_WEIGHTS)).eval()
    x = torch.from_numpy(np.stack([decode_image(d, size=(102, 136)) for d in train.values()]))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = torch.cat([model.features(to_model_input(x[i : i + 100], mean, std)).mean((2, 3))
                           for i in range(0, len(x), 100)])
    y = torch.tensor([["Boot", "Sandal", "Shoe"].index(Path(k).parent.name) for k in train])
    head = torch.nn.Linear(feats.shape[1], 3)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(head(feats), y) + 1e-3 * head.weight.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    state = model.state_dict()
    state["classifier.1.weight"], state["classifier.1.bias"] = head.weight.detach(), head.bias.detach()
    return state


def footwear_probe(size: tuple[int, int]) -> ModelFile:
    return ModelFile(arch="mobilenet_v2", class_names=["Boot", "Sandal", "Shoe"], in_chans=3, input_size=size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, state_dict=footwear_probe_state())


@functools.cache
def small_rgb_file(size: tuple[int, int] = (64, 80)) -> ModelFile:
    torch.manual_seed(1)
    model = create_model("invsort_cnn", num_classes=4, in_chans=3)
    return ModelFile(arch="invsort_cnn", class_names=["a", "b", "c", "d"], in_chans=3, input_size=size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, state_dict=model.state_dict())


def assert_agree(ref: list, got: list, *, min_agreement: float = MIN_TOP1_AGREEMENT, mean_dp: float = 0.005,
                 max_dp: float = 0.05):
    assert [r.status for r in ref if r.status == "failed"] == [r.status for r in got if r.status == "failed"]
    pairs = [(a, b) for a, b in zip(ref, got, strict=True) if a.status != "failed"]
    agreement = sum(a.category == b.category for a, b in pairs) / len(pairs)
    dp = [abs(a.confidence - b.confidence) for a, b in pairs]
    assert agreement >= min_agreement, f"top-1 agreement {agreement:.3f}"
    assert sum(dp) / len(dp) < mean_dp and max(dp) < max_dp, f"mean |dp| {sum(dp) / len(dp):.4f}, max {max(dp):.4f}"


# --- the decoder and the resize, pixel by pixel -------------------------------------------------------------------

RESIZES = {
    "area-1.4x": ((102, 136), (71, 95)),
    "area-2x": ((102, 136), (51, 68)),
    "area-4x3x": ((120, 150), (30, 50)),
    "area-photo": ((1000, 750), (224, 224)),
    "area-one-side": ((102, 137), (102, 136)),
    "linear-1.4x": ((102, 136), (144, 192)),
    "linear-28x": ((8, 8), (224, 224)),
    "linear-one-side-shrinks": ((135, 102), (102, 136)),
}


@pytest.mark.parametrize(("src", "dst"), RESIZES.values(), ids=RESIZES.keys())
@pytest.mark.parametrize("chans", [3, 1])
def test_resize_on_device_is_within_a_level_of_opencv(src, dst, chans):
    img = np.random.default_rng(0).integers(0, 256, (*src, chans), dtype=np.uint8)  # noise: the worst case
    ref = resize_for_model(img, dst).reshape(*dst, chans)
    got = resize_on_device(torch.from_numpy(img).permute(2, 0, 1), dst)
    assert got.shape == (chans, *dst) and got.dtype == torch.uint8
    diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.15, f"max diff {diff.max()}, mean {diff.mean():.3f}"


def test_resize_where_the_image_shrinks_but_one_side_grows_stays_close_on_photos():
    # OpenCV's INTER_AREA samples both axes with two taps here; the device rule averages the shrinking one
    for src, dst in (((100, 300), (150, 120)), ((300, 100), (120, 150))):
        img = decode_image(photo_jpeg(3, src), size=src)
        ref = resize_for_model(img, dst)
        got = resize_on_device(torch.from_numpy(img).permute(2, 0, 1), dst).permute(1, 2, 0).numpy()
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.mean() < 1.0 and (diff > 1).mean() < 0.05, (diff.mean(), (diff > 1).mean())


def test_torchvision_decode_gives_opencvs_pixels_on_photos():
    files = [photo_jpeg(seed, (102 + seed, 136 - seed)) for seed in range(6)]
    for in_chans in (3, 1):
        images, ok = decode_jpeg_batch([torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files],
                                       size=(64, 80), in_chans=in_chans, device="cpu")
        assert ok == list(range(6)) and images.shape == (6, 64, 80, in_chans) and images.is_contiguous()
        for row, i in enumerate(ok):
            ref = decode_image(files[i], size=(64, 80), in_chans=in_chans)
            assert np.abs(images[row].numpy().astype(int) - ref.astype(int)).max() <= 1


def test_a_file_torchvision_cannot_decode_is_left_out_of_the_batch():
    good = [photo_jpeg(s, (60, 80)) for s in range(3)]
    broken = corrupt_huffman_table(photo_jpeg(9, (300, 400)))
    encoded = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in (good[0], broken, good[1], good[2])]
    images, ok = decode_jpeg_batch(encoded, size=(30, 40), in_chans=3, device="cpu")
    assert ok == [0, 2, 3] and images.shape == (3, 30, 40, 3)
    for row, f in enumerate(good):
        assert np.abs(images[row].numpy().astype(int) - decode_image(f, size=(30, 40)).astype(int)).max() <= 1


@pytest.mark.shared
@needs_footwear
def test_torchvision_decode_gives_opencvs_pixels_on_footwear_photos():
    files = list(footwear_split()[1].values())[:100]
    images, ok = decode_jpeg_batch([torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files],
                                   size=(102, 136), in_chans=3, device="cpu")
    assert len(ok) == len(files)
    for row, i in enumerate(ok):
        ref = decode_image(files[i], size=(102, 136), in_chans=3)
        if ref.shape[:2] == Image.open(io.BytesIO(files[i])).size[::-1]:  # the photo is the model's size
            assert np.array_equal(images[row].numpy(), ref)  # both libjpeg-turbo


# --- top-1 agreement through the whole pipeline -------------------------------------------------------------------

SIZES = {"native": (102, 136), "shrink-1.4x": (71, 95), "enlarge-1.4x": (144, 192)}
# ~3-4 s each; the quick loop keeps 71x95 (area shrink) and the resizes are checked pixel by pixel above
SLOW_SIZES = {"enlarge-1.4x", "native"}


@pytest.mark.shared
@needs_footwear
@pytest.mark.parametrize("size", [pytest.param(size, id=name, marks=[pytest.mark.slow] if name in SLOW_SIZES else [])
                                  for name, size in SIZES.items()])
def test_torchvision_backend_agrees_with_opencv_on_footwear_photos(size):
    files = footwear_split()[1]
    with Predictor(footwear_probe(size), CPU) as predictor:
        ref = sort_files(files, predictor, batch_size=32, decode_backend="opencv")
        got = sort_files(files, predictor, batch_size=32, decode_backend="torchvision", inflight_batches=2)
    assert all(r.status != "failed" for r in ref + got)
    assert_agree(ref, got)


@pytest.mark.slow
@pytest.mark.shared
@needs_real_photos
@pytest.mark.parametrize("size", [(102, 136), (71, 95), (224, 224)], ids=str)
def test_torchvision_backend_agrees_with_opencv_on_real_photos(size):
    files = photos_in(REAL_PHOTOS_TAR)  # 223 photos, 177 to 4500 px, any aspect ratio: every one is resized
    with Predictor(footwear_probe(size), CPU) as predictor:
        ref = sort_files(files, predictor, batch_size=16, decode_backend="opencv")
        got = sort_files(files, predictor, batch_size=16, decode_backend="torchvision")
    assert_agree(ref, got, mean_dp=0.01, max_dp=0.1)


@pytest.mark.shared
@needs_real_photos
def test_torchvision_backend_agrees_with_opencv_on_a_sixth_of_the_real_photos():
    """The quick variant of the test above: every 6th photo (38), at the probe's own size."""
    files = dict(list(photos_in(REAL_PHOTOS_TAR).items())[::6])
    with Predictor(footwear_probe((102, 136)), CPU) as predictor:
        ref = sort_files(files, predictor, batch_size=16, decode_backend="opencv")
        got = sort_files(files, predictor, batch_size=16, decode_backend="torchvision")
    assert len(files) == 38 and len({Path(k).parent.name for k in files}) == 4  # the four folders
    assert_agree(ref, got, mean_dp=0.01, max_dp=0.1)


def test_torchvision_backend_agrees_with_opencv_on_the_examples_as_jpegs():
    # the bundled Fashion-MNIST model on its examples, saved as 70x70 grayscale JPEGs: shrunk 2.5x on both paths
    files = {}
    for path in example_files():
        img = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (70, 70), interpolation=cv2.INTER_CUBIC)
        files[path.name] = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    with Predictor(load_model_file("bundled:fashion_mnist_cnn"), CPU) as predictor:
        ref = sort_files(files, predictor, batch_size=16, decode_backend="opencv")
        got = sort_files(files, predictor, batch_size=16, decode_backend="torchvision")
    assert_agree(ref, got, min_agreement=1.0, mean_dp=0.01, max_dp=0.05)


def test_torchvision_backend_agrees_with_opencv_on_photo_jpegs():
    files = {f"photo-{s}": photo_jpeg(s, (90 + s, 120 + 2 * s)) for s in range(24)}
    predictor = Predictor(small_rgb_file(), CPU)
    ref = sort_files(files, predictor, batch_size=8, decode_backend="opencv")
    got = sort_files(files, predictor, batch_size=8, decode_backend="torchvision")
    assert_agree(ref, got, min_agreement=1.0)


# --- a batch of good and bad files ----------------------------------------------------------------------------------


def jpeg_with_exif_orientation(orientation: int) -> bytes:
    img = Image.new("RGB", (120, 80), "white")
    img.paste((200, 30, 30), (0, 0, 60, 80))  # left half red: a rotation moves it
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


def pil_jpeg(mode: str, **save) -> bytes:
    img = Image.new(mode, (120, 90), "white" if mode != "CMYK" else (0, 0, 0, 0))
    img.paste((40, 120, 200) if mode == "RGB" else 60 if mode == "L" else (80, 20, 0, 10), (20, 10, 90, 70))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def corrupt_scan(data: bytes, at: int, patch: bytes) -> bytes:
    sos = data.index(b"\xff\xda")
    return data[: sos + at] + patch + data[sos + at + len(patch) :]


def corrupt_huffman_table(data: bytes) -> bytes:
    i = data.index(b"\xff\xc4")
    return data[: i + 4] + b"\x55" + data[i + 5 :]


def mixed_batch() -> dict[str, bytes]:
    big = photo_jpeg(3, (300, 400))
    return {
        **{f"good-{s}.jpg": photo_jpeg(s) for s in range(5)},
        "example.png": example_files()[0].read_bytes(),
        "progressive.jpg": pil_jpeg("RGB", progressive=True),
        "gray.jpg": pil_jpeg("L"),
        "cmyk.jpg": pil_jpeg("CMYK"),
        "rotated.jpg": jpeg_with_exif_orientation(6),
        "torchvision-refuses.jpg": corrupt_scan(big, 100, b"\xff\xc4"),  # libjpeg-turbo in OpenCV reads past it
        "both-refuse.jpg": corrupt_huffman_table(big),
        "tiny.jpg": photo_jpeg(0, (5, 6)),
        **BAD_IMAGES,
    }


EXPECTED_FAILURES = {
    "both-refuse.jpg": "corrupt or truncated JPEG",
    "tiny.jpg": "image too small: 6x5 px",
    "zero_bytes.jpg": "empty file",
    "text_renamed.jpg": "not an image",
    "truncated.jpg": "truncated JPEG",
    "tiny_3x3.png": "image too small",
    "huge_dimensions.png": "image dimensions too large",
}


def test_pillow_reads_the_headers_that_route_each_jpeg_to_the_right_decoder():
    files = mixed_batch()
    routed = {name: batch_decodable_jpeg(files[name]) for name in
              ["good-0.jpg", "progressive.jpg", "gray.jpg", "cmyk.jpg", "rotated.jpg", "example.png"]}
    # nvJPEG does not apply EXIF orientation (torchvision ignores apply_exif_orientation on CUDA): OpenCV does
    assert routed == {"good-0.jpg": True, "progressive.jpg": True, "gray.jpg": True, "cmyk.jpg": False,
                      "rotated.jpg": False, "example.png": False}
    assert batch_decodable_jpeg(jpeg_with_exif_orientation(1))
    for name, reason in [("truncated.jpg", "truncated JPEG"), ("tiny.jpg", "image too small: 6x5 px")]:
        with pytest.raises(ImageError, match=reason):  # the reason decode_image gives
            batch_decodable_jpeg(files[name])
        with pytest.raises(ImageError, match=reason):
            decode_image(files[name], size=(64, 80))
    with pytest.raises(ImageError, match="image dimensions too large: 400x300 px exceeds 100000 pixels"):
        batch_decodable_jpeg(photo_jpeg(0, (300, 400)), max_pixels=100_000)


def test_routing_never_raises_but_image_errors_on_damaged_bytes():
    data = jpeg_with_exif_orientation(6)
    rng = np.random.default_rng(0)
    samples = [data[:cut] + b"\xff\xd9" for cut in range(0, 700, 7)]
    for _ in range(200):
        noisy = bytearray(data)
        noisy[int(rng.integers(2, 600))] = int(rng.integers(0, 256))
        samples.append(bytes(noisy))
    for sample in samples:
        with contextlib.suppress(ImageError):
            batch_decodable_jpeg(sample)


@pytest.mark.parametrize("inflight", [1, 2])
def test_mixed_batch_fails_the_bad_files_alone_with_the_same_reasons(inflight, monkeypatch):
    files = mixed_batch()
    batched: list[int] = []
    real = streaming.decode_jpeg_batch

    def spy(encoded, **kw):
        batched.append(len(encoded))
        return real(encoded, **kw)

    monkeypatch.setattr(streaming, "decode_jpeg_batch", spy)
    predictor = Predictor(small_rgb_file(), CPU)
    ref = sort_files(files, predictor, batch_size=5, decode_backend="opencv")
    assert batched == []
    got = sort_files(files, predictor, batch_size=5, decode_backend="torchvision", inflight_batches=inflight)
    # 5 good + progressive + gray + the two damaged ones that pass the header checks
    assert sum(batched) == 9

    for rows in (ref, got):
        failed = {r.item_id: r.error for r in rows if r.status == "failed"}
        assert set(failed) == set(EXPECTED_FAILURES), failed
        for name, reason in EXPECTED_FAILURES.items():
            assert reason in failed[name], (name, failed[name])
        assert all(r.category and 0 <= r.confidence <= 1 for r in rows if r.status != "failed")
    assert {r.item_id: r.error for r in ref} == {r.item_id: r.error for r in got}
    assert_agree(ref, got, min_agreement=1.0, mean_dp=0.01, max_dp=0.05)
    for name in ("rotated.jpg", "cmyk.jpg", "example.png", "torchvision-refuses.jpg"):  # OpenCV in both runs
        a, b = (next(r for r in rows if r.item_id == name) for rows in (ref, got))
        assert a.category == b.category and a.confidence == pytest.approx(b.confidence, abs=1e-5)


def test_rotated_jpeg_is_decoded_upright():
    img = decode_image(jpeg_with_exif_orientation(6), size=(120, 80))  # 6: turn 90 degrees clockwise to view
    top, bottom = img[:20].mean(axis=(0, 1)), img[-20:].mean(axis=(0, 1))
    assert top[0] > 150 and top[1] < 100 and bottom.min() > 200, (top, bottom)  # the red half is on top


def test_inflight_queue_keeps_rows_read_before_a_listing_error():
    files = {f"good-{s}.jpg": photo_jpeg(s) for s in range(23)}
    items = [Item(k, k) for k in files]

    def broken():
        yield from items[:17]
        raise OSError("listing broke midway")

    rows: list = []
    with pytest.raises(OSError, match="listing broke midway"):
        run_pipeline(broken(), predictor=Predictor(small_rgb_file(), CPU), reader=BytesReader(files),
                     on_batch=rows.extend, batch_size=4, decode_threads=2, prefetch_batches=1,
                     decode_backend="torchvision", inflight_batches=2)
    assert [r.item_id for r in rows] == [it.item_id for it in items[:17]]


# --- refused modes (the settings themselves: tests/test_settings.py) ----------------------------------------------


def test_predictor_and_pipeline_refuse_modes_they_cannot_run():
    mf = small_rgb_file()
    with pytest.raises(ConfigError, match="valid: auto, on, off"):
        Predictor(mf, PredictorOptions(device="cpu", gpu_decode="nvjpeg"))
    with pytest.raises(ConfigError, match="INVSORT_RUNTIME=torch, not onnxruntime"):
        Predictor(mf, PredictorOptions(device="cpu", runtime="onnxruntime", torch_compile=True))
    predictor = Predictor(mf, CPU)
    assert predictor.decode_backend == "opencv"  # auto decodes on the GPU only where inference runs on CUDA
    with pytest.raises(ConfigError, match="valid: opencv, torchvision"):
        run_pipeline([], predictor=predictor, reader=BytesReader({}), on_batch=print, decode_backend="nvjpeg")
    with pytest.raises(ConfigError, match="inflight_batches must be >= 1"):
        run_pipeline([], predictor=predictor, reader=BytesReader({}), on_batch=print, inflight_batches=0)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_gpu_decode_on_without_a_gpu_is_refused_by_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    env = {"INVSORT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db", "INVSORT_GPU_DECODE": "on"}
    result = CliRunner().invoke(main, ["sort", "examples/images", "--no-progress"], env=env)
    assert result.exit_code != 0
    assert "INVSORT_GPU_DECODE=on decodes JPEGs on a CUDA GPU, but inference runs on cpu" in result.output
    assert "Traceback" not in result.output


# --- torch.compile ------------------------------------------------------------------------------------------------


def test_a_failing_torch_compile_is_refused_at_start_up(monkeypatch):
    def broken_compile(model, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found\n(long traceback)")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(ConfigError) as err:
        Predictor(small_rgb_file(), PredictorOptions(device="cpu", torch_compile=True))
    message = str(err.value)
    assert "INVSORT_COMPILE=true but torch.compile failed on cpu" in message
    assert "no working C++ compiler found" in message and "set INVSORT_COMPILE=false" in message
    assert "long traceback" not in message


@pytest.mark.slow
def test_compiled_network_gives_the_eager_results_on_the_cpu():
    mf = small_rgb_file()
    files = {f"photo-{s}.jpg": photo_jpeg(s) for s in range(30)}
    eager = sort_files(files, Predictor(mf, CPU), batch_size=8)
    compiled = Predictor(mf, PredictorOptions(device="cpu", torch_compile=True, compile_batch_size=8))
    assert compiled.static_batch == 8
    got = sort_files(files, compiled, batch_size=8)  # 30 images: the last batch of 6 is padded
    assert [r.category for r in got] == [r.category for r in eager]
    assert max(abs(a.confidence - b.confidence) for a, b in zip(eager, got, strict=True)) < 1e-4
    batch = torch.from_numpy(np.stack([decode_image(f, size=(64, 80)) for f in list(files.values())[:20]]))
    assert torch.allclose(compiled.predict_probs(batch), Predictor(mf, CPU).predict_probs(batch), atol=1e-5)


# --- on a CUDA GPU ------------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_runner_uses_pinned_buffers_and_a_stream_per_inflight_batch():
    predictor = Predictor(small_rgb_file(), PredictorOptions(device="cuda"))
    assert predictor.decode_backend == "torchvision"
    runner = streaming._BatchRunner(predictor, batch_size=16, depth=2, max_pixels=10**8, budget=None)
    assert len(runner.slots) == 2
    assert all(s.host_in.is_pinned() and s.host_out.is_pinned() for s in runner.slots)
    assert runner.slots[0].host_in.shape == (16, 64, 80, 3)
    assert runner.slots[0].stream != runner.slots[1].stream


@needs_cuda
@pytest.mark.parametrize("gpu_decode", ["on", "off"])
def test_cuda_pipeline_matches_the_cpu_on_a_mixed_batch(gpu_decode):
    files = {**mixed_batch(), **{f"photo-{s}.jpg": photo_jpeg(s, (90 + s, 120 + s)) for s in range(40)}}
    ref = sort_files(files, Predictor(small_rgb_file(), CPU), batch_size=8)
    gpu = Predictor(small_rgb_file(), PredictorOptions(device="cuda", gpu_decode=gpu_decode))
    got = sort_files(files, gpu, batch_size=8)  # two batches in flight, each on its own stream
    assert {r.item_id: r.error for r in got} == {r.item_id: r.error for r in ref}
    # fp16 autocast and nvJPEG's own IDCT: close, not equal
    assert_agree(ref, got, min_agreement=0.97, mean_dp=0.02, max_dp=0.1)


@needs_cuda
@pytest.mark.shared
@needs_footwear
@needs_real_photos
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_cuda_pipeline_agrees_with_the_cpu_on_footwear_and_real_photos(size):
    files = {**footwear_split()[1], **photos_in(REAL_PHOTOS_TAR)}
    ref = sort_files(files, Predictor(footwear_probe(size), CPU), batch_size=64)
    got = sort_files(files, Predictor(footwear_probe(size), PredictorOptions(device="cuda")), batch_size=64)
    assert_agree(ref, got, mean_dp=0.01, max_dp=0.1)


@needs_cuda
@pytest.mark.slow
def test_compiled_network_on_cuda_matches_eager():
    files = {f"photo-{s}.jpg": photo_jpeg(s) for s in range(30)}
    eager = sort_files(files, Predictor(small_rgb_file(), PredictorOptions(device="cuda")), batch_size=8)
    options = PredictorOptions(device="cuda", torch_compile=True, compile_batch_size=8)
    compiled = sort_files(files, Predictor(small_rgb_file(), options), batch_size=8)
    assert_agree(eager, compiled, min_agreement=1.0, mean_dp=0.005, max_dp=0.02)
