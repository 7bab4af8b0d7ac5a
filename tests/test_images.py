import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch

from pipeline.errors import ImageError
from pipeline.io.images import DecodeBudget, batch_decodable_jpeg, check_image_header, decode_image, to_model_input
from tests.images import BAD_IMAGES, example_files, huge_png, photo_jpeg


def test_decodes_example_png_to_model_size_grayscale():
    data = example_files()[0].read_bytes()
    img = decode_image(data, size=(28, 28), in_chans=1)
    assert img.shape == (28, 28, 1) and img.dtype == np.uint8
    assert img.max() > 100  # a real garment, not an empty frame


def test_decodes_jpeg_to_rgb_and_resizes():
    img = decode_image(photo_jpeg(), size=(64, 80), in_chans=3)
    assert img.shape == (64, 80, 3) and img.dtype == np.uint8
    # catalogue background stays white in every channel after the BGR->RGB swap
    assert (img[0, 0] > 240).all()


def test_rgb_channel_order():
    bgr = np.zeros((32, 32, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR order
    ok, buf = cv2.imencode(".png", bgr)
    img = decode_image(buf.tobytes(), size=(32, 32))
    assert img[..., 0].min() == 255 and img[..., 2].max() == 0


def test_transparent_png_is_composited_on_white():
    bgra = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    ok, buf = cv2.imencode(".png", bgra)
    img = decode_image(buf.tobytes(), size=(16, 16))
    assert (img == 255).all()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero_bytes.jpg", "empty file"),
        ("text_renamed.jpg", "not an image"),
        ("truncated.jpg", "truncated JPEG"),
        ("tiny_3x3.png", "too small"),
        ("huge_dimensions.png", "too large"),
    ],
)
def test_bad_images_raise_image_error_with_reason(name, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(BAD_IMAGES[name], size=(28, 28))


def test_to_model_input_normalises_in_channels_last():
    batch = torch.full((2, 4, 5, 3), 255, dtype=torch.uint8)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)
    x = to_model_input(batch, mean, std)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_too_large_image_says_so_once():
    with pytest.raises(ImageError) as err:
        decode_image(BAD_IMAGES["huge_dimensions.png"], size=(28, 28))  # a header claiming 200000 x 200000 px
    reason = str(err.value)
    assert reason.startswith("image dimensions too large: ") and reason.count("too large") == 1, reason
    assert reason == "image dimensions too large: 200000x200000 px exceeds 100000000 pixels"  # from the header
    with pytest.raises(ImageError) as err:
        decode_image(photo_jpeg(0, (300, 400)), size=(28, 28), max_pixels=100_000)
    assert str(err.value) == "image dimensions too large: 400x300 px exceeds 100000 pixels"


# --- headers before decoding, the decode budget -------------------------------------------------------------------


def _encoded(ext: str, img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _header_cases() -> dict[str, tuple[bytes, int, int]]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cases = {
        "jpeg": _encoded(".jpg", rgb),
        "jpeg progressive": _encoded(".jpg", rgb, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "jpeg grey": _encoded(".jpg", rgb[:, :, 0]),
        "png rgb": _encoded(".png", rgb),
        "png rgba": _encoded(".png", np.dstack([rgb, rgb[:, :, :1]])),
        "png grey 16-bit": _encoded(".png", rgb[:, :, 0].astype(np.uint16) * 257),
        "webp lossy": _encoded(".webp", rgb, cv2.IMWRITE_WEBP_QUALITY, 80),
        "webp lossless": _encoded(".webp", rgb, cv2.IMWRITE_WEBP_QUALITY, 101),
        "bmp": _encoded(".bmp", rgb),
        "tiff": _encoded(".tiff", rgb),
        "tiff float32": _encoded(".tiff", rgb.astype(np.float32)),
        "ppm": _encoded(".ppm", rgb),
        "pgm 16-bit": _encoded(".pgm", rgb[:, :, 0].astype(np.uint16) * 257),
        "pbm": _encoded(".pbm", rgb[:, :, 0]),
        "pam": _encoded(".pam", rgb),
        "pfm": _encoded(".pfm", rgb.astype(np.float32) / 255),
        "radiance hdr": _encoded(".hdr", rgb.astype(np.float32) / 255),
        "sun raster (Pillow reads its header)": _encoded(".sr", rgb),
        "jpeg 2000 (Pillow reads its header)": _encoded(".jp2", rgb),
    }
    return {name: (data, 53, 37) for name, data in cases.items()}


@pytest.mark.parametrize("name", list(_header_cases()))
def test_header_dimensions_are_the_decoded_ones(name):
    data, w, h = _header_cases()[name]
    header = check_image_header(data)
    assert (header.width, header.height) == (w, h)
    assert header.decode_bytes >= w * h * 3
    assert decode_image(data, size=(16, 16)).shape == (16, 16, 3)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is rewritten to declare ``width`` x ``height`` (a bomb's shape)."""
    data = bytearray(photo_jpeg(0, (64, 64)))
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _webp_declaring(width: int, height: int) -> bytes:
    data = bytearray(_encoded(".webp", np.zeros((16, 16, 3), np.uint8), cv2.IMWRITE_WEBP_QUALITY, 101))
    bits = (width - 1) | ((height - 1) << 14) | (int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1))
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


BOMBS = {
    "png 16000x16000": (lambda: huge_png(16_000), "16000x16000"),
    "jpeg 16000x16000": (lambda: _jpeg_declaring(16_000, 16_000), "16000x16000"),
    "jpeg 65000x65000": (lambda: _jpeg_declaring(65_000, 65_000), "65000x65000"),
    "webp 16384x16384": (lambda: _webp_declaring(16_384, 16_384), "16384x16384"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_bomb_is_refused_from_its_header_before_any_pixel_buffer_exists(name):
    make, dims = BOMBS[name]
    data = make()
    tracemalloc.start()  # numpy's buffers, and OpenCV's output arrays (numpy's allocator), are traced
    try:
        with pytest.raises(ImageError) as err:
            decode_image(data, size=(28, 28))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value) == f"image dimensions too large: {dims} px exceeds 100000000 pixels"
    assert peak < 2 * len(data) + 1_000_000, f"{peak} bytes allocated for a {len(data)}-byte file"
    with pytest.raises(ImageError, match=dims):
        check_image_header(data)


def test_the_gpu_route_refuses_a_jpeg_bomb_with_the_same_reason():
    data = _jpeg_declaring(16_000, 16_000)
    with pytest.raises(ImageError) as err:
        batch_decodable_jpeg(data)
    assert str(err.value) == "image dimensions too large: 16000x16000 px exceeds 100000000 pixels"


def test_headers_that_cannot_be_read_say_not_an_image():
    for data in (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, b"GIF89a not really", b"\xff\xd8" + b"\x00" * 50 + b"\xff\xd9"):
        with pytest.raises(ImageError, match="not an image|not a decodable image"):
            check_image_header(data)


def test_transparency_and_16_bit_are_converted_as_before():
    rng = np.random.default_rng(1)
    bgra = rng.integers(0, 256, (300, 400, 4), dtype=np.uint8)  # composited in several row chunks
    img = decode_image(_encoded(".png", bgra), size=(300, 400))
    alpha = bgra[:, :, 3:4].astype(np.float32) / 255.0
    expected = (bgra[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    assert np.array_equal(img, cv2.cvtColor(expected, cv2.COLOR_BGR2RGB))
    deep = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    img = decode_image(_encoded(".png", deep), size=(20, 30))
    assert np.array_equal(img, cv2.cvtColor((deep >> 8).astype(np.uint8), cv2.COLOR_BGR2RGB))


def test_decode_budget_holds_no_more_than_its_total_across_threads():
    budget = DecodeBudget(1000)
    held, peak, lock = [0], [0], threading.Lock()
    start = threading.Barrier(8)

    def work(i: int) -> None:
        start.wait()
        for k in range(50):
            need = (i * 37 + k * 101) % 700 + 1
            with budget.hold(need):
                with lock:
                    held[0] += need
                    peak[0] = max(peak[0], held[0])
                    assert budget.held_bytes <= 1000
                with lock:
                    held[0] -= need

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert 0 < peak[0] <= 1000 and budget.held_bytes == 0
    with budget.hold(10**9):  # more than the whole budget: held alone, as the whole budget
        assert budget.held_bytes == 1000
    with pytest.raises(ValueError):
        DecodeBudget(0)


def test_decode_image_holds_its_header_estimate_of_the_budget_while_decoding():
    data = photo_jpeg(0, (300, 400))
    budget = DecodeBudget(10**9)
    assert decode_image(data, size=(28, 28), budget=budget).shape == (28, 28, 3)
    assert budget.held_bytes == 0
    with pytest.raises(ImageError):
        decode_image(BAD_IMAGES["truncated.jpg"], size=(28, 28), budget=budget)
    assert budget.held_bytes == 0
