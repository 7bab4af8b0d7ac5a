"""Peak memory of ``invsort sort`` with decompression bombs in its batch, against the same run without them.

Run it from the repository root (it prints the figures; nothing is timed or asserted)::

    .venv/bin/python -m pipeline.bench.bombs --photos 100 --bombs 8

It builds two folders in a scratch directory: ``PHOTOS`` real photos (the bundled examples, copied round), and the
same photos plus ``BOMBS`` small files whose headers declare 16000 x 16000 px (half real PNGs, ~750 KB of
zlib-compressed zeros that decode to 768 MB, half JPEGs whose frame header declares that size). It runs
``invsort sort`` on each, in a child process of its own (a fresh SQLite catalog each), and reads the child's peak
resident set size from ``wait4``'s resource usage. The bombs are refused from their headers
(:func:`pipeline.io.images.check_image_header`), so the two peaks should be within a few MB of each other.
``--max-pixels 2147483648`` lets the bombs through the pixel limit, to see the decode budget
(``INVSORT_DECODE_MEMORY_BYTES``) bound what their decoding holds instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

__all__ = ["jpeg_bomb", "main", "peak_rss_of_sort", "png_bomb"]

_EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"


def png_bomb(side: int = 16_000) -> bytes:
    """A valid RGB PNG of ``side`` x ``side`` black pixels: a few hundred KB that decode to ``3 * side**2`` bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)  # filter byte 0, then the row's pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_bomb(side: int = 16_000) -> bytes:
    """A small real JPEG whose frame header is rewritten to declare ``side`` x ``side`` px (libjpeg allocates the
    whole output, then fills what the data does not cover)."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".jpg", np.full((64, 64, 3), 200, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


def _build(folder: Path, photos: int, bombs: int) -> None:
    files = sorted(_EXAMPLES.rglob("*.png"))
    folder.mkdir(parents=True)
    for i in range(photos):
        shutil.copy(files[i % len(files)], folder / f"photo_{i:04d}.png")
    made = {"png": png_bomb(), "jpg": jpeg_bomb()} if bombs else {}
    for i in range(bombs):
        ext = "png" if i % 2 == 0 else "jpg"
        (folder / f"bomb_{i}.{ext}").write_bytes(made[ext])


def peak_rss_of_sort(folder: Path, db_url: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``invsort sort FOLDER --db DB_URL`` in a child process: ``(its peak RSS in bytes, its output)``."""
    invsort = Path(sys.executable).with_name("invsort")
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen([str(invsort), "sort", str(folder), "--db", db_url, "--no-progress"],
                                 stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read().decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"invsort sort exited with {child.returncode}:\n{output}")
    return usage.ru_maxrss * 1024, output  # Linux reports kilobytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=100, help="real photos in each run (default 100)")
    parser.add_argument("--bombs", type=int, default=8, help="bombs added to the second run (default 8)")
    parser.add_argument("--max-pixels", type=int, default=None, help="INVSORT_MAX_IMAGE_PIXELS for both runs")
    parser.add_argument("--decode-workers", type=int, default=8, help="INVSORT_DECODE_WORKERS (default 8)")
    args = parser.parse_args(argv)
    env = {"INVSORT_DECODE_WORKERS": str(args.decode_workers)}
    if args.max_pixels is not None:
        env["INVSORT_MAX_IMAGE_PIXELS"] = str(args.max_pixels)
    with tempfile.TemporaryDirectory(prefix="invsort-bombs-") as tmp:
        figures = {}
        for name, bombs in (("without bombs", 0), (f"with {args.bombs} bombs", args.bombs)):
            folder = Path(tmp) / name.replace(" ", "_")
            _build(folder, args.photos, bombs)
            rss, output = peak_rss_of_sort(folder, f"sqlite:///{tmp}/{folder.name}.db", env)
            figures[name] = rss
            summary = next((line for line in output.splitlines() if line.startswith("sorted ")), output[-300:])
            print(f"{name:>16}: peak RSS {rss / 2**20:7.1f} MiB   ({summary})")
        low, high = figures.values()
        print(f"{'difference':>16}: {(high - low) / 2**20:+7.1f} MiB   (env: {env})")


if __name__ == "__main__":  # pragma: no cover
    main()
