"""The GPU path of the pipeline, checked on the CPU where it can be: torchvision's batched JPEG decoder with the
on-device resize against OpenCV, failures falling back per image, the in-flight batch queue, torch.compile and
the settings. Tests that need a CUDA GPU check pinned buffers, streams and nvJPEG end to end, and are skipped
without one.
"""

import functools
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pipeline.inference.predictor as inference
import pipeline.io.images as images_module
from pipeline.errors import ConfigError, ImageError
from pipeline.inference.predictor import Predictor, run_pipeline
from pipeline.io.images import (
    batch_decodable_jpeg,
    decode_image,
    decode_jpeg_batch,
    read_jpeg_header,
    resize_for_model,
    resize_on_device,
)
from pipeline.models.modelfile import ModelFile
from pipeline.models.registry import create_model
from pipeline.records import Item
from tests.images import BAD_IMAGES, FOOTWEAR_TAR, MOBILENET_WEIGHTS, example_files, photo_jpeg
from worker.cli import main

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (pinned buffers, streams, nvJPEG)")
needs_footwear = pytest.mark.skipif(
    not FOOTWEAR_TAR.exists() or not MOBILENET_WEIGHTS.exists(),
    reason="../shared footwear photos or MobileNetV2 ImageNet weights not present (a user's clone)",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


@functools.cache
def footwear_photos(n: int) -> dict[str, bytes]:
    """The first ``n`` JPEGs of the footwear tar (136x102 catalogue shots, the three classes mixed)."""
    out = {}
    with tarfile.open(FOOTWEAR_TAR) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                out[member.name] = tar.extractfile(member).read()
                if len(out) == n:
                    break
    return out


@functools.cache
def mobilenet_file(size: tuple[int, int]) -> ModelFile:
    """MobileNetV2 with ImageNet features and a fixed-seed 3-class head, as the bundled footwear models are."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=3, weights=str(MOBILENET_WEIGHTS))
    return ModelFile(arch="mobilenet_v2", class_names=["Boot", "Sandal", "Shoe"], in_chans=3, input_size=size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, state_dict=model.state_dict())


@functools.cache
def small_rgb_file(size: tuple[int, int] = (64, 80)) -> ModelFile:
    torch.manual_seed(1)
    model = create_model("invsort_cnn", num_classes=4, in_chans=3)
    return ModelFile(arch="invsort_cnn", class_names=["a", "b", "c", "d"], in_chans=3, input_size=size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, state_dict=model.state_dict())


def assert_agree(ref: list, got: list, *, min_agreement: float = 0.99, mean_dp: float = 0.005, max_dp: float = 0.05):
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
    "area-one-side-grows": ((100, 300), (150, 120)),
    "area-other-side-grows": ((300, 100), (120, 150)),
    "linear-one-side-shrinks": ((135, 102), (102, 136)),
}


@pytest.mark.parametrize(("src", "dst"), RESIZES.values(), ids=RESIZES.keys())
@pytest.mark.parametrize("chans", [3, 1])
def test_resize_on_device_gives_opencvs_pixels(src, dst, chans):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*src, chans), dtype=np.uint8)
    ref = resize_for_model(img, dst).reshape(*dst, chans)
    got = resize_on_device(torch.from_numpy(img).permute(2, 0, 1)[None], dst)
    assert got.shape == (1, *dst, chans) and got.dtype == torch.uint8 and got.is_contiguous()
    diff = np.abs(got[0].numpy().astype(int) - ref.astype(int))
    # OpenCV sums area cells in its own order: a tie may round the other way
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"max diff {diff.max()}, {(diff > 0).mean():.2%} differ"


def test_torchvision_decode_gives_opencvs_pixels_on_photos():
    files = [photo_jpeg(seed, (102 + seed, 136 - seed)) for seed in range(6)]
    for in_chans in (3, 1):
        images, ok = decode_jpeg_batch([torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files],
                                       size=(64, 80), in_chans=in_chans, device="cpu")
        assert sorted(ok) == list(range(6)) and images.shape == (6, 64, 80, in_chans)
        for row, i in enumerate(ok):
            ref = decode_image(files[i], size=(64, 80), in_chans=in_chans)
            assert np.abs(images[row].numpy().astype(int) - ref.astype(int)).max() <= 1


def test_decode_batch_resizes_big_photos_in_chunks_with_the_same_pixels(monkeypatch):
    files = [torch.frombuffer(bytearray(photo_jpeg(seed, (300, 400))), dtype=torch.uint8) for seed in range(5)]
    whole, ok = decode_jpeg_batch(files, size=(71, 95), in_chans=3, device="cpu")
    monkeypatch.setattr(images_module, "_RESIZE_CHUNK_ELEMENTS", 2 * 3 * 300 * 400)  # two photos a chunk
    chunked, ok_chunked = decode_jpeg_batch(files, size=(71, 95), in_chans=3, device="cpu")
    assert ok == ok_chunked == [0, 1, 2, 3, 4] and torch.equal(whole, chunked)


@pytest.mark.shared
@needs_footwear
def test_torchvision_decode_gives_opencvs_pixels_on_footwear_photos():
    files = list(footwear_photos(100).values())
    images, ok = decode_jpeg_batch([torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files],
                                   size=(102, 136), in_chans=3, device="cpu")
    assert len(ok) == len(files)
    for row, i in enumerate(ok):
        ref = decode_image(files[i], size=(102, 136), in_chans=3)
        assert np.array_equal(images[row].numpy(), ref)  # both libjpeg-turbo; the photos are the model's size


# --- top-1 agreement through the whole pipeline -------------------------------------------------------------------

SIZES = {"native": (102, 136), "shrink-1.4x": (71, 95), "enlarge-1.4x": (144, 192)}


@pytest.mark.shared
@needs_footwear
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_torchvision_backend_agrees_with_opencv_on_footwear_photos(size):
    files = {**footwear_photos(200), **{f"photo-{s}": photo_jpeg(s) for s in range(20)}}
    predictor = Predictor(mobilenet_file(size), device="cpu")
    ref = sort_files(files, predictor, batch_size=32, decode_backend="opencv")
    got = sort_files(files, predictor, batch_size=32, decode_backend="torchvision", inflight_batches=2)
    assert all(r.status != "failed" for r in ref + got)
    assert_agree(ref, got)


def test_torchvision_backend_agrees_with_opencv_on_photo_jpegs():
    files = {f"photo-{s}": photo_jpeg(s, (90 + s, 120 + 2 * s)) for s in range(24)}
    predictor = Predictor(small_rgb_file(), device="cpu")
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


def test_headers_route_each_jpeg_to_the_right_decoder():
    files = mixed_batch()
    assert read_jpeg_header(files["rotated.jpg"]).orientation == 6
    assert read_jpeg_header(files["progressive.jpg"]).sof == 0xC2
    assert read_jpeg_header(files["cmyk.jpg"]).components == 4
    assert read_jpeg_header(files["example.png"]) is None
    routed = {name: batch_decodable_jpeg(files[name]) for name in
              ["good-0.jpg", "progressive.jpg", "gray.jpg", "cmyk.jpg", "rotated.jpg", "example.png"]}
    assert routed == {"good-0.jpg": True, "progressive.jpg": True, "gray.jpg": True, "cmyk.jpg": False,
                      "rotated.jpg": False, "example.png": False}
    assert batch_decodable_jpeg(jpeg_with_exif_orientation(1))
    with pytest.raises(ImageError, match="truncated JPEG"):  # the reason decode_image gives
        batch_decodable_jpeg(files["truncated.jpg"])


def test_header_reader_never_raises_on_damaged_bytes():
    data = jpeg_with_exif_orientation(6)
    rng = np.random.default_rng(0)
    for cut in range(0, 700, 7):
        read_jpeg_header(data[:cut])
    for _ in range(200):
        noisy = bytearray(data[:600])
        noisy[int(rng.integers(2, 600))] = int(rng.integers(0, 256))
        read_jpeg_header(bytes(noisy))


@pytest.mark.parametrize("inflight", [1, 2])
def test_mixed_batch_fails_the_bad_files_alone_with_the_same_reasons(inflight, monkeypatch):
    files = mixed_batch()
    batched: list[int] = []
    real = inference.decode_jpeg_batch

    def spy(encoded, **kw):
        batched.append(len(encoded))
        return real(encoded, **kw)

    monkeypatch.setattr(inference, "decode_jpeg_batch", spy)
    predictor = Predictor(small_rgb_file(), device="cpu")
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
        run_pipeline(broken(), predictor=Predictor(small_rgb_file(), device="cpu"), reader=BytesReader(files),
                     on_batch=rows.extend, batch_size=4, decode_threads=2, prefetch_batches=1,
                     decode_backend="torchvision", inflight_batches=2)
    assert [r.item_id for r in rows] == [it.item_id for it in items[:17]]


# --- refused modes (the settings themselves: tests/test_settings.py) ----------------------------------------------


def test_predictor_and_pipeline_refuse_modes_they_cannot_run():
    mf = small_rgb_file()
    with pytest.raises(ConfigError, match="valid: auto, on, off"):
        Predictor(mf, device="cpu", gpu_decode="nvjpeg")
    with pytest.raises(ConfigError, match="INVSORT_RUNTIME=torch, not onnxruntime"):
        Predictor(mf, device="cpu", runtime="onnxruntime", torch_compile=True)
    predictor = Predictor(mf, device="cpu")
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
        Predictor(small_rgb_file(), device="cpu", torch_compile=True)
    message = str(err.value)
    assert "INVSORT_COMPILE=true but torch.compile failed on cpu" in message
    assert "no working C++ compiler found" in message and "set INVSORT_COMPILE=false" in message
    assert "long traceback" not in message


@pytest.mark.slow
def test_compiled_network_gives_the_eager_results_on_the_cpu():
    mf = small_rgb_file()
    files = {f"photo-{s}.jpg": photo_jpeg(s) for s in range(30)}
    eager = sort_files(files, Predictor(mf, device="cpu"), batch_size=8)
    compiled = Predictor(mf, device="cpu", torch_compile=True, compile_batch_size=8)
    assert compiled.static_batch == 8
    got = sort_files(files, compiled, batch_size=8)  # 30 images: the last batch of 6 is padded
    assert [r.category for r in got] == [r.category for r in eager]
    assert max(abs(a.confidence - b.confidence) for a, b in zip(eager, got, strict=True)) < 1e-4
    batch = torch.from_numpy(np.stack([decode_image(f, size=(64, 80)) for f in list(files.values())[:20]]))
    assert torch.allclose(compiled.predict_probs(batch), Predictor(mf, device="cpu").predict_probs(batch), atol=1e-5)


# --- on a CUDA GPU ------------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_runner_uses_pinned_buffers_and_a_stream_per_inflight_batch():
    predictor = Predictor(small_rgb_file(), device="cuda")
    assert predictor.decode_backend == "torchvision"
    runner = inference._BatchRunner(predictor, batch_size=16, depth=2, max_pixels=10**8)
    assert len(runner.slots) == 2
    assert all(s.host_in.is_pinned() and s.host_out.is_pinned() for s in runner.slots)
    assert runner.slots[0].host_in.shape == (16, 64, 80, 3)
    assert runner.slots[0].stream != runner.slots[1].stream


@needs_cuda
@pytest.mark.parametrize("gpu_decode", ["on", "off"])
def test_cuda_pipeline_matches_the_cpu_on_a_mixed_batch(gpu_decode):
    files = {**mixed_batch(), **{f"photo-{s}.jpg": photo_jpeg(s, (90 + s, 120 + s)) for s in range(40)}}
    ref = sort_files(files, Predictor(small_rgb_file(), device="cpu"), batch_size=8)
    gpu = Predictor(small_rgb_file(), device="cuda", gpu_decode=gpu_decode)
    got = sort_files(files, gpu, batch_size=8)  # two batches in flight, each on its own stream
    assert {r.item_id: r.error for r in got} == {r.item_id: r.error for r in ref}
    # fp16 autocast and nvJPEG's own IDCT: close, not equal
    assert_agree(ref, got, min_agreement=0.97, mean_dp=0.02, max_dp=0.1)


@needs_cuda
@pytest.mark.shared
@needs_footwear
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_cuda_pipeline_agrees_with_the_cpu_on_footwear_photos(size):
    files = footwear_photos(500)
    ref = sort_files(files, Predictor(mobilenet_file(size), device="cpu"), batch_size=64)
    got = sort_files(files, Predictor(mobilenet_file(size), device="cuda"), batch_size=64)
    assert_agree(ref, got, mean_dp=0.01, max_dp=0.1)


@needs_cuda
@pytest.mark.slow
def test_compiled_network_on_cuda_matches_eager():
    files = {f"photo-{s}.jpg": photo_jpeg(s) for s in range(30)}
    eager = sort_files(files, Predictor(small_rgb_file(), device="cuda"), batch_size=8)
    compiled = sort_files(files, Predictor(small_rgb_file(), device="cuda", torch_compile=True,
                                           compile_batch_size=8), batch_size=8)
    assert_agree(eager, compiled, min_agreement=1.0, mean_dp=0.005, max_dp=0.02)
