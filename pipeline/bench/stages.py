"""Where the time of a sort goes, stage by stage, each timed alone in this process: importing torch, making the
predictor (on CUDA its warm-up included), the forward pass with the batch already on the device, the model from
host memory (copy, forward, probabilities back), OpenCV decode + resize in one thread and in the pipeline's decode
threads, and (on CUDA) nvJPEG batch decode. Compare them with ``invsort bench``'s end-to-end figures to see which
stage binds. Nothing is asserted; it prints one line per stage (README, Performance → GPU).

Run it from the repository root::

    .venv/bin/python -m pipeline.bench.stages PHOTOS_DIR --model MODEL.pt [--device cuda] [--batch-size 256]

``PHOTOS_DIR`` is walked for JPEGs (the first ``--photos`` of them, sorted, are used); ``--model`` is any model
file (``bundled:NAME`` too). Forward passes run on one random uint8 batch of ``--batch-size`` images, three
times unmeasured and then ``--repeats`` times measured, with the device synchronised around the measured ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["main", "stage_figures"]


def _rate(images: int, fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """``images`` / the seconds ``fn`` takes, the device synchronised before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return images / (time.perf_counter() - start)


def stage_figures(photos: Sequence[bytes], *, model: str, device: str = "auto", batch_size: int = 256,
                  repeats: int = 20, decode_threads: int = 8) -> dict[str, float]:
    """The figures :func:`main` prints, by name: ``import_torch_s``, ``predictor_s`` (seconds); ``forward_on_device``,
    ``model_from_host``, ``opencv_decode_threads``, ``nvjpeg_decode`` (images/s; the last on CUDA only);
    ``opencv_decode_ms`` (ms an image, one thread).

    Args:
        photos: JPEG files' bytes (at least one).
        model: a model file spec (path, ``s3://`` URI or ``bundled:NAME``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass and per nvJPEG call.
        repeats: measured forward passes.
        decode_threads: threads of the threaded OpenCV figure.

    Raises:
        ConfigError: a device that is not here. FileNotFoundError, ModelFileError: the model cannot be loaded.
        ValueError: no photos.
    """
    if not photos:
        raise ValueError("no photos to decode")
    began = time.perf_counter()
    import torch

    out = {"import_torch_s": time.perf_counter() - began}
    from pipeline.inference.predictor import Predictor, PredictorOptions
    from pipeline.io.images import decode_image, decode_jpeg_batch
    from pipeline.models.modelfile import load_model_file

    mf = load_model_file(model)
    began = time.perf_counter()
    predictor = Predictor(mf, PredictorOptions(device=device, compile_batch_size=batch_size))
    out["predictor_s"] = time.perf_counter() - began
    cuda = predictor.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(predictor.device)

    shape = (batch_size, *mf.input_size, mf.in_chans)
    on_device = torch.randint(0, 256, shape, dtype=torch.uint8, device=predictor.device)
    host = torch.randint(0, 256, shape, dtype=torch.uint8)
    host = host.pin_memory() if cuda else host
    for _ in range(3):
        predictor.scored_on_device(on_device)
    out["forward_on_device"] = _rate(batch_size * repeats,
                                     lambda: [predictor.scored_on_device(on_device) for _ in range(repeats)], sync)
    out["model_from_host"] = _rate(batch_size * repeats,
                                   lambda: [predictor.predict_scored(host) for _ in range(repeats)], sync)
    predictor.close()
    few = list(photos[:batch_size])

    def decode(data: bytes) -> object:
        return decode_image(data, size=mf.input_size, in_chans=mf.in_chans)

    out["opencv_decode_ms"] = 1000.0 / _rate(len(few), lambda: [decode(d) for d in few], sync)
    with ThreadPoolExecutor(decode_threads) as pool:
        out["opencv_decode_threads"] = _rate(len(photos), lambda: list(pool.map(decode, photos)), sync)
    if cuda:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in few]

        def nvjpeg(times: int) -> None:
            for _ in range(times):
                decode_jpeg_batch(tensors, size=mf.input_size, in_chans=mf.in_chans, device=predictor.device)

        nvjpeg(1)  # nvJPEG's own start-up
        out["nvjpeg_decode"] = _rate(4 * len(few), lambda: nvjpeg(4), sync)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("photos_dir", type=Path, help="a folder of JPEG photos (walked recursively)")
    parser.add_argument("--model", required=True, help="model file: path, s3:// URI or bundled:NAME")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass [256]")
    parser.add_argument("--photos", type=int, default=1024, help="photos decoded by the threaded figure [1024]")
    parser.add_argument("--repeats", type=int, default=20, help="measured forward passes [20]")
    parser.add_argument("--decode-threads", type=int, default=8, help="threads of the threaded decode [8]")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.photos_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[: args.photos]
    if not files:
        parser.error(f"no JPEG photos under {args.photos_dir}")
    f = stage_figures([p.read_bytes() for p in files], model=args.model, device=args.device,
                      batch_size=args.batch_size, repeats=args.repeats, decode_threads=args.decode_threads)
    print(f"import torch {f['import_torch_s']:.2f} s; predictor made (warm-up included on CUDA) "
          f"{f['predictor_s']:.2f} s")
    print(f"forward pass, batch of {args.batch_size} on the device: {f['forward_on_device']:,.0f} images/s")
    print(f"model from host memory (copy, forward, probabilities back): {f['model_from_host']:,.0f} images/s")
    print(f"OpenCV decode + resize: {f['opencv_decode_ms']:.2f} ms an image in one thread, "
          f"{f['opencv_decode_threads']:,.0f} images/s in {args.decode_threads} threads ({len(files)} photos)")
    if "nvjpeg_decode" in f:
        print(f"nvJPEG batch decode + resize: {f['nvjpeg_decode']:,.0f} images/s")


if __name__ == "__main__":
    main()
