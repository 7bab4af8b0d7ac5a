"""Seed inputs for the fuzz harnesses: real files, small enough for libFuzzer to mutate quickly.

Images: the bundled example photos (Fashion-MNIST PNGs), and one grey and one colour photo encoded every way
the worker meets them (PNG 1/8/16-bit, grey, alpha, palette; JPEG baseline, progressive, grey, CMYK, EXIF-rotated;
WebP lossy and lossless; BMP; TIFF uncompressed, LZW, deflate, 16-bit, float; GIF; PPM), plus each kind of bad
file of ``tests/images.py``. Manifests: CSV and JSON Lines as people write them (relative, absolute, ``file://``
and ``s3://`` URIs, quoting, BOMs, CRLF, blank lines, extra columns, integer ids, non-ASCII) and the malformed ones
the parser must refuse. Both: what the harnesses found (``tests/data/fuzz/``), replayed on every run.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tests.images import BAD_IMAGES, example_files, photo_jpeg, tiny_png

FOUND = Path(__file__).resolve().parents[1] / "data" / "fuzz"  # what the harnesses found: replayed on every run

# ------------------------------------------------------------------------------------------------ images


def _colour_photo(h: int = 24, w: int = 32) -> np.ndarray:
    """BGR: the shaded ellipse on white of ``tests.images.photo_jpeg``, small."""
    return cv2.imdecode(np.frombuffer(photo_jpeg(3, (h, w)), np.uint8), cv2.IMREAD_COLOR)


def _cv(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def _pil(img: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(w: int, h: int, depth: int = 8, colour: int = 2) -> bytes:
    """A few-byte PNG whose header claims ``w`` x ``h`` px (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def image_seeds() -> Iterator[tuple[str, bytes]]:
    for path in example_files():
        yield f"example_{path.parent.name}_{path.stem}.png", path.read_bytes()
    grey = cv2.imread(str(example_files()[0]), cv2.IMREAD_GRAYSCALE)
    bgr = _colour_photo()
    bgra = np.dstack([bgr, np.linspace(0, 255, bgr.shape[0] * bgr.shape[1]).reshape(bgr.shape[:2]).astype(np.uint8)])
    yield "cv_rgb.png", _cv(".png", bgr)
    yield "cv_rgba.png", _cv(".png", bgra)
    yield "cv_16bit.png", _cv(".png", bgr.astype(np.uint16) * 257)
    yield "cv_grey.png", _cv(".png", grey)
    yield "cv_q90.jpg", _cv(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    yield "cv_progressive.jpg", _cv(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    yield "cv_grey.jpg", _cv(".jpg", grey)
    yield "cv_lossy.webp", _cv(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 80])
    yield "cv_lossless_alpha.webp", _cv(".webp", bgra, [cv2.IMWRITE_WEBP_QUALITY, 101])
    yield "cv_rgb.bmp", _cv(".bmp", bgr)
    yield "cv_grey.bmp", _cv(".bmp", grey)
    yield "cv_lzw.tif", _cv(".tif", bgr)
    yield "cv_16bit.tif", _cv(".tif", bgr.astype(np.uint16) * 257)
    yield "cv_float.tif", _cv(".tif", bgr.astype(np.float32) / 255)
    yield "cv_rgb.ppm", _cv(".ppm", bgr)

    rgb = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    yield "pil_palette_trns.png", _pil(rgb.convert("P"), "PNG", transparency=0)
    yield "pil_1bit.png", _pil(rgb.convert("1"), "PNG")
    yield "pil_la.png", _pil(rgb.convert("LA"), "PNG")
    yield "pil_cmyk.jpg", _pil(rgb.convert("CMYK"), "JPEG", quality=85)
    exif = Image.Exif()
    exif[0x0112] = 6
    yield "pil_exif_rot90.jpg", _pil(rgb, "JPEG", exif=exif.tobytes())
    yield "pil_deflate.tif", _pil(rgb, "TIFF", compression="tiff_adobe_deflate")
    yield "pil_raw.tif", _pil(rgb, "TIFF")
    yield "pil_packbits_grey.tif", _pil(rgb.convert("L"), "TIFF", compression="packbits")
    yield "pil_palette.bmp", _pil(rgb.convert("P"), "BMP")
    yield "pil.gif", _pil(rgb, "GIF")

    for name, data in BAD_IMAGES.items():
        if name == "huge_dimensions.png" or len(data) > 16_384:
            continue
        yield f"bad_{name}", data
    yield "bad_tiny.png", tiny_png()
    yield "bad_truncated_small.jpg", photo_jpeg(4, (24, 32))[:300]
    yield "bomb_100k_square.png", _png_claiming(100_000, 100_000)
    yield "bomb_2k_square.png", _png_claiming(2_000, 2_000)
    for path in sorted(FOUND.glob("decode_*")):
        yield f"found_{path.name}", path.read_bytes()


IMAGE_TOKENS: list[bytes] = [
    b"\x89PNG\r\n\x1a\n", b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"gAMA", b"iCCP", b"eXIf", b"acTL", b"fcTL",
    b"\xff\xd8", b"\xff\xd9", b"\xff\xe0", b"\xff\xe1", b"\xff\xdb", b"\xff\xc0", b"\xff\xc2", b"\xff\xc4",
    b"\xff\xda", b"\xff\xdd", b"Exif\x00\x00", b"JFIF\x00", b"Adobe",
    b"RIFF", b"WEBP", b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF",
    b"BM", b"II*\x00", b"MM\x00*", b"GIF89a", b"P6\n", b"P5\n", b"\x00\x00\x00\x0cjP  ",
    b"\xff\xff\xff\x7f", b"\x00\x00\x40\x00", b"\x7f\xff",
]

# --------------------------------------------------------------------------------------------- manifests


def _jsonl(rows: list[object]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def manifest_seeds() -> Iterator[tuple[str, bytes]]:
    yield "plain.csv", b"item_id,image_uri\nsku-1,photos/a.jpg\nsku-2,photos/b.png\n"
    yield "bom_crlf.csv", b"\xef\xbb\xbfitem_id,image_uri\r\nsku-1,a.jpg\r\n\r\nsku-2,./sub/../b.jpg\r\n"
    yield "quoted.csv", (
        b'sku,item_id,note,image_uri\n1,"id, with comma","say ""hi""","dir with space/x y.jpg"\n'
        b'2,"multi\nline id",,"s3://bucket/k e y?#%.jpg"\n3,  padded  ,x,  file:///abs/p%20q.png  \n'
    )
    yield "uris.csv", (
        "item_id,image_uri\nabs,/srv/photos/a.jpg\nfile,file:///srv/photos/%C3%BC.jpg\n"
        "local,file://localhost/srv/b.jpg\ns3,s3://catalogue/photos/c.jpg\nup,../../x.jpg\n"
        "ünï,фото/снимок 1.jpg\nemoji,📷/🥾.webp\n"
    ).encode()
    yield "cr_only.csv", b"image_uri,item_id\ra.jpg,1\rb.jpg,2\r"
    yield "extra_cols.csv", b"item_id,image_uri,category\nx,x.jpg,Boot\ny,y.jpg\nz,z.jpg,Shoe,extra\n"
    rows = "".join(f"sku-{i:04d},photos/{i % 7}/img_{i:04d}.jpg\n" for i in range(200))
    yield "many.csv", ("item_id,image_uri\n" + rows).encode()
    yield "bad_missing_column.csv", b"id,image_uri\n1,a.jpg\n"
    yield "bad_duplicate.csv", b"item_id,image_uri\n1,a.jpg\n1,b.jpg\n"
    yield "bad_empty_field.csv", b"item_id,image_uri\n1,\n"
    yield "bad_quote.csv", b'item_id,image_uri\n"unterminated,a.jpg\n'
    yield "bad_scheme.csv", b"item_id,image_uri\n1,http://example.com/a.jpg\n"
    yield "bad_utf8.csv", b"item_id,image_uri\n\xff\xfe,a.jpg\n"
    yield "bad_s3_no_key.csv", b"item_id,image_uri\n1,s3://bucket\n2,s3:///key\n"
    yield "bad_file_host.csv", b"item_id,image_uri\n1,file://host/a.jpg\n"

    yield "plain.jsonl", _jsonl([{"item_id": "sku-1", "image_uri": "a.jpg"}, {"item_id": 2, "image_uri": "b/c.png"}])
    yield "unicode.jsonl", _jsonl([
        {"item_id": "ünïcödé 𝒳", "image_uri": "фото/1.jpg"},
        {"item_id": "tab\tid", "image_uri": "s3://bucket/a b/c.jpg", "extra": [1, {"x": None}]},
        {"item_id": " padded ", "image_uri": " /abs/path.jpg "},
    ])
    yield "escapes.jsonl", (
        b'{"item_id": "\\u00fc\\ud83d\\udc62", "image_uri": "file:///x/%F0%9F%91%A2.jpg"}\r\n\r\n'
        b'\xef\xbb\xbf{"image_uri": "../up.jpg", "item_id": -12}\n'
    )
    yield "bom.jsonl", b'\xef\xbb\xbf{"item_id": "a", "image_uri": "a.jpg"}\n{"item_id": "b", "image_uri": "b.jpg"}'
    yield "many.ndjson", _jsonl([{"item_id": f"sku-{i}", "image_uri": f"p/{i}.jpg"} for i in range(100)])
    yield "bad_json.jsonl", b'{"item_id": "a", "image_uri": "a.jpg"\n'
    yield "bad_types.jsonl", _jsonl([{"item_id": True, "image_uri": "a.jpg"}, {"item_id": 1.5, "image_uri": 3}])
    yield "bad_not_object.jsonl", b'["a", "a.jpg"]\n"x"\nnull\n'
    yield "bad_nan.jsonl", b'{"item_id": NaN, "image_uri": Infinity}\n'
    yield "bad_duplicate.jsonl", _jsonl([{"item_id": 7, "image_uri": "a.jpg"}, {"item_id": "7", "image_uri": "b"}])
    for path in sorted(FOUND.glob("manifest_*")):
        yield f"found_{path.name}", path.read_bytes()


MANIFEST_TOKENS: list[bytes] = [
    b"item_id", b"image_uri", b"item_id,image_uri\n", b'"item_id": ', b'"image_uri": ', b"\xef\xbb\xbf",
    b"\r\n", b"\r", b'""', b'"', b",", b"{", b"}", b"[", b"]", b"null", b"true", b"1e999", b"NaN", b"-0",
    b"\\u0000", b"\\ud800", b"\\udcff", b"\\\\", b"s3://", b"s3://b/", b"file://", b"file:///", b"file:/",
    b"file://localhost/", b"../", b"./", b"/", b"//", b"%00", b"%ff", b"%2F", b"\x00", b"\xc3\xbc", b"\xf0\x9f\x91\xa2",
    b"http://", b"C:\\", b"~",
]
