import cv2
import numpy as np
import pytest
import torch

from pipeline.errors import ImageError
from pipeline.io.images import decode_image, to_model_input
from tests.images import BAD_IMAGES, example_files, photo_jpeg


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
    assert "40000000000 pixels" in reason  # Pillow's own words follow: "Image size (N pixels) exceeds limit ..."
    with pytest.raises(ImageError) as err:
        decode_image(photo_jpeg(0, (300, 400)), size=(28, 28), max_pixels=100_000)
    assert str(err.value) == "image dimensions too large: 400x300 px exceeds 100000 pixels"
