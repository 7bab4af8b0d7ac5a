"""Throughput benchmark: invsort against its peers, on the same images, the same model and the same machine.

Peers (each runs in its own Python process, so one peer's memory and warm caches never reach another's):

``model_only``
    :meth:`Predictor.predict_probs` on a uint8 batch already in memory: the ceiling for this model and runtime.
``decode_only``
    read + :func:`~pipeline.io.images.decode_image` + stack + :func:`~pipeline.io.images.to_model_input`, in the
    pipeline's own thread pool (:func:`~pipeline.inference.streaming.run_pipeline` with the forward pass left out).
``naive``
    one image at a time: PIL open -> torchvision ``Resize, ToTensor, Normalize`` -> model -> argmax.
``ray``
    Ray Data: ``read_binary_files`` -> ``map_batches`` with an actor pool holding the model -> consume.
    The actor layout is tuned on a slice of the images first (:func:`ray_candidates`), unless given.
``invsort``
    :func:`pipeline.sorting.sort_source` writing rows into a fresh SQLite file, and into each ``--db-url``
    (PostgreSQL: a scratch schema, dropped afterwards).

Timing: images/s = images / seconds from the first image to the last result. Imports, model loading,
``ray.init``, actor start-up and database migration come before the first image and are reported apart
(``setup_s``); no peer gets a warm-up pass. Batch latency is the interval between consecutive batches of
results reaching the consumer (the first one counted from the first image), so for the pipelined peers it
is the steady-state time per batch, not the time one batch spends in flight.

Run it with ``invsort bench SOURCE --model M`` (see ``invsort bench run --help``). A peer process is
``python -m worker.cli bench peer`` (:data:`PEER_COMMAND`, a hidden command of the CLI that calls
:func:`serve_peer`) with its spec as JSON on standard input.

This module imports only the standard library, psutil and light invsort modules at import time; numpy, torch,
PIL, Ray and the database layer are imported by the functions that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import psutil

from pipeline.errors import ConfigError, InvsortError, SourceError
from pipeline.io.sources import iter_source
from pipeline.io.storage import local_path, make_reader
from pipeline.records import Item
from pipeline.settings import Settings

__all__ = ["PEERS", "PEER_COMMAND", "RayConfig", "format_table", "parse_ray_config", "ray_candidates", "run_bench",
           "serve_peer"]

log = logging.getLogger(__name__)

PEERS = ("model_only", "decode_only", "naive", "ray", "invsort")
TIMING = (
    "images_per_s = images / seconds, seconds from the first image to the last result; imports, model load, "
    "ray.init, actor start-up and DB migration are excluded (setup_s: the peer's time outside that window; "
    "process_s: its whole process); no warm-up pass. batch_ms = interval between consecutive batches of results "
    "at the consumer (Ray delivers in bursts: its config also gives actor_batch_ms, one batch's time in an "
    "actor). peak_rss_mib: ru_maxrss of the peer's process; "
    "for ray, the largest sampled sum over the driver and all its descendant processes (GCS, raylet, workers)."
)
PEER_TIMEOUT_S = 2 * 3600
# A peer's process: the CLI's hidden 'invsort bench peer', which calls serve_peer. Started with this interpreter
# and this checkout on PYTHONPATH, so it runs the same code as the driver, installed or not.
PEER_COMMAND = (sys.executable, "-m", "worker.cli", "bench", "peer")
_RESULT_PREFIX = "INVSORT_BENCH_RESULT "
_RSS_SAMPLE_S = 0.2
_RAY_MISSING = "ray is not installed: pip install -e '.[bench]'"


# ------------------------------------------------------------------------------------------ Ray config


@dataclass(frozen=True)
class RayConfig:
    """How the Ray Data peer is laid out.

    ``actors`` actors each reserve ``cpus`` logical CPUs and run torch with ``threads`` threads. ``decode``
    says where images are decoded: ``actor`` (in the model actor, before the forward pass) or ``tasks``
    (in separate Ray tasks of ``decode_cpus`` logical CPUs, the decoded arrays going through the object
    store). File reads are tasks of ``read_cpus``. Logical CPUs must leave room for a read task beside the
    actors, or Ray Data waits for ever.
    """

    actors: int = 1
    cpus: float = 1.0
    threads: int = 1
    decode: str = "actor"
    read_cpus: float = 0.25
    decode_cpus: float = 0.5
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.actors < 1 or self.threads < 1 or not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"Ray config needs actors >= 1, threads >= 1, batch_size 1..4096: {self}")
        if min(self.cpus, self.read_cpus, self.decode_cpus) <= 0:
            raise ConfigError(f"Ray config CPU shares must be > 0: {self}")
        if self.decode not in ("actor", "tasks"):
            raise ConfigError(f"Ray config decode must be 'actor' or 'tasks', got {self.decode!r}")

    def label(self) -> str:
        return (f"{self.actors} actor(s) x {self.cpus:g} CPU/{self.threads} thr, decode in {self.decode}, "
                f"batch {self.batch_size}")


def parse_ray_config(text: str, *, batch_size: int = 64) -> RayConfig:
    """A :class:`RayConfig` from ``key=value`` pairs separated by commas.

    Keys: ``actors``, ``cpus``, ``threads``, ``decode`` (``actor``/``tasks``), ``read_cpus``, ``decode_cpus``,
    ``batch_size`` (default: ``batch_size``). Example: ``actors=2,cpus=0.75,threads=1,decode=actor``.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a config :class:`RayConfig` refuses.
    """
    fields = {f.name: f.type for f in dataclasses.fields(RayConfig)}
    values: dict[str, Any] = {"batch_size": batch_size}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"--ray-config: expected key=value with a key among {', '.join(fields)}, got {part!r}")
        kind = {"int": int, "float": float}.get(str(fields[key]), str)
        try:
            values[key] = kind(value.strip())
        except ValueError:
            raise ConfigError(f"--ray-config: {key} must be {kind.__name__}, got {value!r}") from None
    return RayConfig(**values)


def ray_candidates(cpu_count: int, batch_size: int) -> list[RayConfig]:
    """The actor layouts tried at ``batch_size`` before the Ray peer's measured run, for ``cpu_count`` cores.

    One actor per core (one torch thread each, decoding in the actor); one actor using every core; and half
    the cores for single-thread model actors with decoding in separate tasks. Each layout leaves half a
    logical CPU for reads. The best layout is then tried at half and twice the batch size
    (:func:`run_bench`).
    """
    c = max(1, cpu_count)
    free = c - 0.5 if c > 1 else 0.75
    half = max(1, c // 2)
    layouts = [
        RayConfig(actors=c, cpus=round(free / c, 3), threads=1, decode="actor", batch_size=batch_size),
        RayConfig(actors=1, cpus=free, threads=c, decode="actor", batch_size=batch_size),
        RayConfig(actors=half, cpus=round(min(1.0, free / half / 2) if c > 1 else 0.5, 3), threads=1,
                  decode="tasks", decode_cpus=0.5 if c > 1 else 0.25, batch_size=batch_size),
    ]
    unique: list[RayConfig] = []
    for cfg in layouts:
        if cfg not in unique:
            unique.append(cfg)
    return unique


# ------------------------------------------------------------------------------------------- figures


def _percentiles_ms(values: Sequence[float]) -> tuple[float, float]:
    """The 50th and 95th percentiles (linear interpolation, :func:`numpy.percentile`) of non-empty ``values``,
    rounded to 0.01."""
    import numpy as np

    p50, p95 = np.percentile(values, [50, 95])
    return round(float(p50), 2), round(float(p95), 2)


def _figures(images: int, start: float, arrivals: Sequence[float]) -> dict[str, Any]:
    """images/s and batch-interval percentiles from a start time and the times batches of results arrived."""
    if not arrivals:
        raise InvsortError("the peer produced no results")
    seconds = arrivals[-1] - start
    gaps = [(b - a) * 1000.0 for a, b in zip([start, *arrivals[:-1]], arrivals, strict=True)]
    p50, p95 = _percentiles_ms(gaps)
    return {
        "images": images,
        "seconds": round(seconds, 4),
        "images_per_s": round(images / seconds, 2) if seconds > 0 else None,
        "batches": len(arrivals),
        "batch_ms_p50": p50,
        "batch_ms_p95": p95,
    }


def _maxrss_mib() -> float:
    """Peak resident set of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class _TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of this process and all its descendants (psutil).

    For the Ray peer, whose work happens in processes that the driver starts (GCS, raylet, workers): the
    sum counts pages shared between processes (libraries, the object store) once per process for RSS and
    proportionally for PSS (PSS where the platform has it, Linux; else 0).
    """

    def __init__(self, interval_s: float = _RSS_SAMPLE_S):
        super().__init__(name="invsort-bench-rss", daemon=True)
        self.interval_s = interval_s
        self.peak_rss = 0  # bytes
        self.peak_pss = 0  # bytes
        self.max_processes = 0
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        processes = [me]
        tick = 0
        while not self._done.is_set():
            if tick % 5 == 0:  # the process tree changes slowly; listing it costs more than sampling it
                with contextlib.suppress(psutil.Error):
                    processes = [me, *me.children(recursive=True)]
            tick += 1
            rss = pss = 0
            for process in processes:
                try:
                    memory = process.memory_full_info()
                except psutil.Error:  # it exited, or it is not ours to read
                    continue
                rss += memory.rss
                pss += getattr(memory, "pss", 0)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.max_processes = max(self.max_processes, len(processes))
            self._done.wait(self.interval_s)

    def stop(self) -> dict[str, Any]:
        """Stop sampling: ``{"peak_rss_mib", "peak_pss_mib", "processes"}`` (MiB, and the most processes seen)."""
        self._done.set()
        self.join()
        return {"peak_rss_mib": round(self.peak_rss / 2**20, 1), "peak_pss_mib": round(self.peak_pss / 2**20, 1),
                "processes": self.max_processes}


# --------------------------------------------------------------------------------------------- peers


def _set_threads(threads: int) -> int:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _items(spec: dict[str, Any]) -> list[Item]:
    reader = make_reader(extra_roots=[Path(os.path.realpath(spec["source"]))])
    return list(islice(iter_source(spec["source"], reader), spec["images"]))


def _peer_settings(spec: dict[str, Any], **overrides: Any) -> Settings:
    from pipeline.settings import build_settings

    return build_settings(batch_size=spec["batch_size"], device=spec.get("device", "cpu"), **overrides)


def _model_info(mf: Any) -> dict[str, Any]:
    return {"spec": mf.name, "arch": mf.arch, "version": mf.version, "input_size": list(mf.input_size),
            "in_chans": mf.in_chans, "classes": mf.num_classes}


def peer_model_only(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward passes of ``spec["images"]`` images in batches, from one random uint8 batch in host memory (on a
    GPU each batch is copied from pinned memory, as the pipeline's are)."""
    import torch

    from pipeline.inference.predictor import Predictor, PredictorOptions
    from pipeline.models.modelfile import load_model_file

    settings = _peer_settings(spec)
    threads = _set_threads(spec["threads"])
    mf = load_model_file(spec["model"])
    options = PredictorOptions(device=settings.device, runtime=settings.runtime,
                               runtime_cache_dir=settings.runtime_cache_dir, cpu_streams=settings.cpu_streams,
                               cpu_microbatch=settings.cpu_microbatch)
    predictor = Predictor(mf, options)
    n, b = spec["images"], spec["batch_size"]
    h, w = mf.input_size
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (b, h, w, mf.in_chans), dtype=torch.uint8, generator=gen)
    on_gpu = predictor.device.type == "cuda"
    if on_gpu:
        batch = batch.pin_memory()
    arrivals: list[float] = []
    start = time.perf_counter()
    for first in range(0, n, b):
        predictor.predict_probs(batch[: min(b, n - first)])
        arrivals.append(time.perf_counter())
    predictor.close()
    return {**_figures(n, start, arrivals), "model": _model_info(mf),
            "config": {"runtime": settings.runtime, "device": str(predictor.device), "torch_threads": threads,
                       "batch_size": b, "cpu_streams": predictor.cpu_streams,
                       "cpu_microbatch": predictor.cpu_microbatch,
                       "input": f"random uint8 ({b}, {h}, {w}, {mf.in_chans}) batch in "
                                f"{'pinned host memory' if on_gpu else 'memory'}, channels_last"}}


def peer_decode_only(spec: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's fetch + decode + normalise, threaded as in production, without the forward pass."""
    import torch

    from pipeline.inference.predictor import Predictor, PredictorOptions
    from pipeline.inference.streaming import run_pipeline
    from pipeline.io.images import to_model_input
    from pipeline.models.modelfile import load_model_file

    class NormaliseOnly(Predictor):
        """A predictor whose "model" only normalises the batch: what is left is reading and decoding. (It replaces
        ``predict_outputs``, what the pipeline calls; before 2026-11-30 it replaced ``predict_logits``, which the
        pipeline no longer called, so the peer ran the model too.)"""

        def predict_outputs(self, batch: torch.Tensor | Any) -> torch.Tensor:
            batch = torch.as_tensor(batch)
            with torch.inference_mode():
                x = to_model_input(batch, self.mean, self.std)
            return torch.zeros(x.shape[0], self.output_width)

    settings = _peer_settings(spec)
    mf = load_model_file(spec["model"])
    predictor = NormaliseOnly(mf, PredictorOptions(device="cpu"))
    items = _items(spec)
    reader = make_reader(settings, extra_roots=[Path(os.path.realpath(spec["source"]))])
    arrivals: list[float] = []
    failed = 0

    def on_batch(rows: list[Any]) -> None:
        nonlocal failed
        arrivals.append(time.perf_counter())
        failed += sum(r.status == "failed" for r in rows)

    start = time.perf_counter()
    summary = run_pipeline(items, predictor=predictor, reader=reader, on_batch=on_batch,
                           batch_size=spec["batch_size"], decode_threads=settings.decode_threads,
                           max_pixels=settings.max_image_pixels)
    predictor.close()
    return {**_figures(summary.images, start, arrivals), "failed": failed, "model": _model_info(mf),
            "config": {"decode_threads": settings.decode_threads, "batch_size": spec["batch_size"],
                       "decoder": "OpenCV (pipeline.io.images.decode_image) + to_model_input, run_pipeline's pool"}}


def peer_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """One image at a time: PIL open -> torchvision Resize/ToTensor/Normalize -> model -> argmax."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from pipeline.inference.predictor import resolve_device
    from pipeline.models.modelfile import load_model_file

    threads = _set_threads(spec["threads"])
    mf = load_model_file(spec["model"])
    device = resolve_device(spec.get("device", "cpu"))
    model = mf.build().to(device)
    transform = transforms.Compose([
        transforms.Resize(tuple(mf.input_size)),
        transforms.ToTensor(),
        transforms.Normalize(mf.mean, mf.std),
    ])
    mode = "RGB" if mf.in_chans == 3 else "L"
    paths = [local_path(item.uri) for item in _items(spec)]
    b = spec["batch_size"]
    arrivals: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        for i, path in enumerate(paths, 1):
            with Image.open(path) as im:
                image = im.convert(mode)
            model(transform(image).unsqueeze(0).to(device)).argmax(dim=1).item()
            if i % b == 0 or i == len(paths):  # one "batch" = batch_size images, for comparable intervals
                arrivals.append(time.perf_counter())
    return {**_figures(len(paths), start, arrivals), "model": _model_info(mf),
            "config": {"batch_size": 1, "reported_per": b, "torch_threads": threads, "device": str(device),
                       "decoder": "PIL + torchvision.transforms (Resize, ToTensor, Normalize)", "grad": "no_grad"}}


class _RayClassifier:
    """Ray Data actor: loads the model once, then (optionally decodes and) classifies each batch."""

    def __init__(self, model_spec: str, threads: int, decode: bool, runtime: str):
        import torch

        from pipeline.inference.predictor import Predictor, PredictorOptions
        from pipeline.models.modelfile import load_model_file

        torch.set_num_threads(threads)
        self.predictor = Predictor(load_model_file(model_spec), PredictorOptions(device="cpu", runtime=runtime))
        self.decode = decode

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        t0 = time.time()
        if self.decode:
            mf = self.predictor.model_file
            batch = _ray_decode(batch, size=mf.input_size, in_chans=mf.in_chans)
        ok = batch["ok"]
        classes = np.full(len(ok), -1, dtype=np.int64)
        if ok.any():
            probs = self.predictor.predict_probs(torch.from_numpy(np.ascontiguousarray(batch["image"][ok])))
            classes[ok] = probs.argmax(dim=1).numpy()
        udf_ms = (time.time() - t0) * 1000.0
        return {"path": batch["path"], "class_index": classes, "t_first": batch["t_first"],
                "udf_ms": np.full(len(ok), udf_ms)}


def _ray_decode(batch: dict[str, Any], *, size: tuple[int, int], in_chans: int) -> dict[str, Any]:
    """Decode a Ray batch of file bytes with the pipeline's decoder; undecodable images get ``ok`` False."""
    import numpy as np

    from pipeline.errors import ImageError
    from pipeline.io.images import decode_image

    t0 = time.time()
    raw = batch["bytes"]
    images = np.zeros((len(raw), size[0], size[1], in_chans), dtype=np.uint8)
    ok = np.zeros(len(raw), dtype=bool)
    for i, data in enumerate(raw):
        try:
            images[i] = decode_image(bytes(data), size=size, in_chans=in_chans)
            ok[i] = True
        except ImageError:
            pass
    t_first = batch["t_first"] if "t_first" in batch else np.full(len(raw), t0)
    return {"path": batch["path"], "image": images, "ok": ok, "t_first": t_first}


def peer_ray(spec: dict[str, Any]) -> dict[str, Any]:
    """Ray Data: read_binary_files -> map_batches (actor pool holding the model) -> iter_batches, on a local
    Ray started here with ``num_cpus = os.cpu_count()``, bound to 127.0.0.1, without the dashboard."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray workers inherit the environment: make sure they import this checkout's pipeline package.
    root = str(Path(__file__).resolve().parents[2])  # the checkout: pipeline/bench/peers.py -> ./
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    import ray
    import ray.data

    from pipeline.models.modelfile import load_model_file

    cfg = RayConfig(**spec["ray"])
    settings = _peer_settings(spec)
    mf = load_model_file(spec["model"])
    paths = [str(local_path(item.uri)) for item in _items(spec)]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=cfg.read_cpus)
        if cfg.decode == "tasks":
            ds = ds.map_batches(_ray_decode, batch_size=cfg.batch_size, num_cpus=cfg.decode_cpus,
                                fn_kwargs={"size": tuple(mf.input_size), "in_chans": mf.in_chans})
        ds = ds.map_batches(
            _RayClassifier, batch_size=cfg.batch_size, num_cpus=cfg.cpus,
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            fn_constructor_args=(spec["model"], cfg.threads, cfg.decode == "actor", settings.runtime),
        )
        arrivals: list[float] = []
        firsts: list[float] = []
        udf_ms: list[float] = []
        images = failed = 0
        executed = time.time()
        for out in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
            arrivals.append(time.time())
            images += len(out["class_index"])
            failed += int((out["class_index"] < 0).sum())
            firsts.append(float(out["t_first"].min()))
            udf_ms.extend(set(out["udf_ms"].tolist()))  # one value per actor batch in this output batch
    finally:
        ray.shutdown()
    start = min(firsts) if firsts else executed
    result = _figures(images, start, arrivals)
    result["setup_s_in_execution"] = round(start - executed, 3)
    actor_p50, actor_p95 = _percentiles_ms(udf_ms) if udf_ms else (None, None)
    return {**result, "failed": failed, "model": _model_info(mf),
            "config": {**dataclasses.asdict(cfg), "label": cfg.label(), "ray": ray.__version__,
                       "num_cpus": os.cpu_count(), "runtime": settings.runtime,
                       "actor_batch_ms_p50": actor_p50, "actor_batch_ms_p95": actor_p95}}


@contextlib.contextmanager
def _scratch_database(url: str | None) -> Iterator[tuple[str, str]]:
    """``(scratch URL, description)``: a migrated empty catalog next to ``url``'s, removed on exit (see
    :func:`pipeline.bench.catalog.scratch_database`); None: a fresh SQLite file in a temporary directory."""
    from sqlalchemy.engine import make_url

    from db.session import safe_url
    from pipeline.bench.catalog import scratch_database

    if url is None:
        with tempfile.TemporaryDirectory(prefix="invsort-bench-") as tmp, \
                scratch_database(f"sqlite:///{Path(tmp) / 'catalog.db'}") as scratch:
            yield scratch, "sqlite (fresh file in a temporary directory)"
        return
    with scratch_database(url) as scratch:
        options = str(make_url(scratch).query.get("options") or "")
        schema = options.rpartition("search_path=")[2].split()[0] if "search_path=" in options else ""
        yield scratch, f"{safe_url(url)} ({f'scratch schema {schema}' if schema else 'scratch file'})"


def peer_invsort(spec: dict[str, Any]) -> dict[str, Any]:
    """The real embedded pipeline, :func:`~pipeline.sorting.sort_source`, into a fresh catalog."""
    from sqlalchemy import func, select

    from db.models import CatalogItem
    from db.session import session_scope
    from pipeline.sorting import get_predictor, sort_source

    threads = _set_threads(spec["threads"])
    with _scratch_database(spec.get("database_url")) as (url, where):
        settings = _peer_settings(spec, database_url=url, gpu_decode=spec.get("gpu_decode", "auto"))
        arrivals: list[float] = []
        outcome = sort_source(spec["source"], settings=settings, model_spec=spec["model"], limit=spec["images"],
                              on_progress=lambda rows: arrivals.append(time.perf_counter()))
        with session_scope(url) as session:
            written = session.scalar(
                select(func.count()).select_from(CatalogItem).where(CatalogItem.job_id == outcome.job_id)
            )
    s = outcome.summary
    if written != s.images:
        raise InvsortError(f"invsort wrote {written} catalog rows for {s.images} images")
    # run_pipeline's clock starts before the first image is fetched and stops after the last batch's rows
    # are committed: take its span, ending at the last batch's arrival.
    result = _figures(s.images, arrivals[-1] - s.seconds if arrivals else 0.0, arrivals)
    predictor = get_predictor(settings, spec["model"])  # the one sort_source loaded and cached
    mf = predictor.model_file
    return {**result, "failed": s.failed, "rows_written": written, "model": _model_info(mf),
            "config": {"database": where, "batch_size": settings.batch_size, "decode_threads": settings.decode_threads,
                       "torch_threads": threads, "runtime": settings.runtime,
                       "device": str(getattr(predictor, "device", "cpu")),
                       "decoder": getattr(predictor, "decode_backend", "opencv"), "cpu_streams": predictor.cpu_streams,
                       "cpu_microbatch": settings.cpu_microbatch, "job_id": outcome.job_id}}


_PEER_FUNCS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "model_only": peer_model_only,
    "decode_only": peer_decode_only,
    "naive": peer_naive,
    "ray": peer_ray,
    "invsort": peer_invsort,
}


def run_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one peer in this process and return its figures (the body of a peer subprocess).

    ``spec``: ``peer`` (a name of :data:`PEERS`), ``source``, ``model``, ``images`` (how many of the source's
    first images), ``batch_size``, ``threads`` (torch threads, 0 = torch's default); ``ray`` (a
    :class:`RayConfig` as a dict) for ``ray``; ``database_url`` (None = a temporary SQLite file) for
    ``invsort``.

    Returns:
        ``{"status": "ok", "images", "seconds", "images_per_s", "batches", "batch_ms_p50", "batch_ms_p95",
        "setup_s", "peak_rss_mib", "rss_method", "model", "config", ...}``; ``setup_s`` is the time spent
        outside the measured window (imports, model load, Ray start and stop, migration).
    """
    began = time.perf_counter()
    monitor = _TreeMemory() if spec["peer"] == "ray" else None
    if monitor:
        monitor.start()
    fn = _PEER_FUNCS[spec["peer"]]
    try:
        result = fn(spec)
    finally:
        tree = monitor.stop() if monitor else None
    total = time.perf_counter() - began
    result["setup_s"] = round(total - result["seconds"], 3)
    if tree:
        result.update(peak_rss_mib=tree["peak_rss_mib"], peak_pss_mib=tree["peak_pss_mib"],
                      processes=tree["processes"], driver_rss_mib=_maxrss_mib(),
                      rss_method=f"sum over the driver and its descendants, sampled every {_RSS_SAMPLE_S} s")
    else:
        result.update(peak_rss_mib=_maxrss_mib(), rss_method="ru_maxrss of the peer process")
    return {"status": "ok", **result}


# -------------------------------------------------------------------------------------------- driver


def _list_source(source: str, limit: int | None) -> tuple[list[Item], int]:
    """The first ``limit`` images of a local folder, in :func:`iter_source`'s stable order, and their bytes.

    Every file is read once here so that all peers start from the same warm page cache.

    Raises:
        SourceError: the source is not a local folder, or it holds no image.
    """
    if "://" in source and not source.startswith("file://"):
        raise SourceError(f"bench SOURCE must be a local folder, got {source!r}")
    path = local_path(source)
    if not path.is_dir():
        raise SourceError(f"bench SOURCE must be a local folder of images: {path} is not a directory")
    reader = make_reader(extra_roots=[Path(os.path.realpath(path))])
    items = list(islice(iter_source(str(path), reader), limit))
    if not items:
        raise SourceError(f"no images in {path} (suffixes: see pipeline.io.storage.IMAGE_SUFFIXES)")
    size = sum(len(reader.read(item.uri)) for item in items)
    return items, size


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_peer` in a fresh interpreter; a failure becomes ``{"status": "error", "reason"}``."""
    root = str(Path(__file__).resolve().parents[2])  # the checkout: pipeline/bench/peers.py -> ./
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    began = time.perf_counter()
    try:
        proc = subprocess.run(PEER_COMMAND, input=json.dumps(spec),
                              capture_output=True, text=True, env=env, timeout=PEER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {PEER_TIMEOUT_S} s"}
    wall = round(time.perf_counter() - began, 2)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            result = json.loads(line[len(_RESULT_PREFIX) :])
            result["process_s"] = wall
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"status": "error", "reason": f"peer process exited with {proc.returncode}:\n{tail}"}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not a.get("images_per_s") or not b.get("images_per_s"):
        return None
    return round(a["images_per_s"] / b["images_per_s"], 3)


def _backend(url: str | None) -> str:
    """``sqlite`` or ``postgresql`` (None is the temporary SQLite file)."""
    if url is None:
        return "sqlite"
    from sqlalchemy.engine import make_url

    return make_url(url).get_backend_name()


def _unique(name: str, taken: Sequence[str]) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name}_{n}", n + 1
    return out


def run_bench(
    source: str,
    *,
    model_spec: str,
    limit: int | None = None,
    batch_size: int = 64,
    peers: Sequence[str] | None = None,
    db_urls: Sequence[str] = (),
    threads: int = 0,
    ray_config: RayConfig | None = None,
    ray_tune_images: int = 512,
    upsert_rows: int = 0,
    device: str = "cpu",
    gpu_decodes: Sequence[str] = ("auto",),
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the chosen peers one after the other, each in its own process, on the first ``limit`` images.

    Args:
        source: a local folder, walked recursively (:func:`pipeline.io.sources.iter_source`'s order).
        model_spec: a model file path or ``bundled:NAME``.
        limit: how many images (None: all).
        batch_size: images per batch for every batched peer (1..4096).
        peers: names from :data:`PEERS` (None: all).
        db_urls: databases for extra ``invsort`` runs besides the temporary SQLite file.
        threads: torch threads in the model-only, naive and invsort peers (0: torch's default).
        ray_config: the Ray layout; None tunes it on ``ray_tune_images`` images first.
        upsert_rows: when > 0, also :func:`pipeline.bench.catalog.bench_upserts` with this many rows on each
            database (rows/s of catalog writes alone).
        device: where the model_only, naive and invsort peers run the network: ``auto``, ``cpu``, ``cuda`` or
            ``cuda:N`` (``auto`` is resolved here and the report names the device). decode_only and Ray run on
            the CPU.
        gpu_decodes: ``INVSORT_GPU_DECODE`` modes (``auto``, ``on``, ``off``): one invsort run per mode and
            database; with more than one, each run's name ends in ``_gpu_decode_<mode>``.
        on_event: called with a line of progress text.

    Returns:
        The JSON-ready report: ``source``, ``images``, ``source_bytes``, ``batch_size``, ``model``, ``machine``,
        ``timing`` (how the figures are taken), ``peers`` (name -> figures, or ``status`` ``skipped``/
        ``error`` with a ``reason``), ``ray_tuning`` (each layout tried), ``ratios`` and ``catalog_upserts``.

    Raises:
        ConfigError: unknown peer name, bad batch size, a device that is not here, or a GPU-decode mode that is
            unknown or ``on`` without CUDA.
        SourceError: ``source`` is not a local folder of images.
        FileNotFoundError, ModelFileError: the model cannot be loaded.
    """
    from pipeline.models.modelfile import load_model_file

    peers = PEERS if peers is None else tuple(peers)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ConfigError(f"unknown peer(s) {', '.join(unknown)}; valid: {', '.join(PEERS)}")
    if not 1 <= batch_size <= 4096:
        raise ConfigError(f"batch size must be between 1 and 4096, got {batch_size}")
    from pipeline.inference.predictor import resolve_decode_backend, resolve_device

    resolved = resolve_device(device)
    for mode in gpu_decodes:
        resolve_decode_backend(mode, resolved)
    device = str(resolved)
    say = on_event or (lambda line: log.info("%s", line))
    mf = load_model_file(model_spec)
    items, size = _list_source(source, limit)
    n = len(items)
    say(f"{n} images ({size / 2**20:.1f} MiB) from {source}; model {mf.name} {mf.version}")
    base = {"source": source, "model": model_spec, "images": n, "batch_size": batch_size, "threads": threads,
            "device": device}
    report: dict[str, Any] = {
        "invsort_bench": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source,
        "images": n,
        "source_bytes": size,
        "batch_size": batch_size,
        "device": device,
        "model": _model_info(mf),
        "machine": _machine(),
        "timing": TIMING,
        "peers": {},
        "ray_tuning": [],
        "ratios": {},
    }
    results: dict[str, dict[str, Any]] = report["peers"]

    def run(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        say(f"running {name} ...")
        result = _spawn({**spec, "peer": spec.get("peer", name)})
        say(f"  {name}: " + (f"{result['images_per_s']} images/s, batch p50 {result['batch_ms_p50']} ms, "
                             f"setup {result.get('setup_s')} s, {json.dumps(result.get('config', {}))}"
                             if result.get("status") == "ok"
                             else f"{result['status']}: {result.get('reason', '')}"))
        return result

    for peer in ("model_only", "decode_only", "naive"):
        if peer in peers:
            results[peer] = run(peer, base)
    if "ray" in peers:
        if find_spec("ray") is None:
            results["ray"] = {"status": "skipped", "reason": _RAY_MISSING}
        else:
            cpu = {**base, "device": "cpu"}
            results["ray"] = _run_ray(cpu, ray_config, ray_tune_images, report["ray_tuning"], run)
    if "invsort" in peers:
        for url in (None, *db_urls):
            for mode in dict.fromkeys(gpu_decodes):
                suffix = f"_gpu_decode_{mode}" if len(set(gpu_decodes)) > 1 else ""
                name = _unique(f"invsort_{_backend(url)}{suffix}", list(results))
                results[name] = run(name, {**base, "peer": "invsort", "database_url": url, "gpu_decode": mode})
    for name, r in results.items():
        if name.startswith("invsort"):
            report["ratios"][name] = {
                "over_model_only": _ratio(r, results.get("model_only")),
                "over_naive": _ratio(r, results.get("naive")),
                "over_ray": _ratio(r, results.get("ray")),
            }
    if upsert_rows > 0:
        report["catalog_upserts"] = _bench_upserts(db_urls, upsert_rows, batch_size, say)
    return report


def _run_ray(base: dict[str, Any], config: RayConfig | None, tune_images: int, tuning: list[dict[str, Any]],
             run: Callable[[str, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The Ray peer: ``config`` as given, or the fastest layout on ``tune_images`` images, re-run on all."""
    if config is not None:
        return run("ray", {**base, "ray": dataclasses.asdict(config)})
    n = base["images"]
    tune = {**base, "images": min(n, tune_images)}

    def attempt(cfg: RayConfig) -> dict[str, Any]:
        r = run(f"ray tuning [{cfg.label()}]", {**tune, "peer": "ray", "ray": dataclasses.asdict(cfg)})
        tuning.append({"config": dataclasses.asdict(cfg), "images": tune["images"],
                       **{k: r.get(k) for k in ("status", "reason", "images_per_s", "batch_ms_p50", "batch_ms_p95",
                                                "peak_rss_mib", "setup_s") if k in r}})
        return r

    def speed(r: dict[str, Any]) -> float:
        return r.get("images_per_s") or 0.0 if r.get("status") == "ok" else -1.0

    tried = [(cfg, attempt(cfg)) for cfg in ray_candidates(os.cpu_count() or 1, base["batch_size"])]
    best_cfg, best = max(tried, key=lambda t: speed(t[1]))
    if speed(best) < 0:
        return {**best, "reason": f"every Ray layout failed; last: {best.get('reason', '')}"}
    for b in sorted({max(1, base["batch_size"] // 2), min(4096, base["batch_size"] * 2)} - {base["batch_size"]}):
        if b > tune["images"]:
            continue
        cfg = dataclasses.replace(best_cfg, batch_size=b)
        r = attempt(cfg)
        if speed(r) > speed(best):
            best_cfg, best = cfg, r
    if tune["images"] == n:
        best = {**best, "chosen_from_tuning": True}
        return best
    return run("ray", {**base, "ray": dataclasses.asdict(best_cfg)})


def _bench_upserts(db_urls: Sequence[str], rows: int, batch_size: int,
                   say: Callable[[str], None]) -> dict[str, Any]:
    try:
        from pipeline.bench.catalog import bench_upserts
    except ImportError as exc:
        return {"status": "skipped", "reason": f"pipeline.bench.catalog is not available: {exc}"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="invsort-bench-") as tmp:
        for url in (f"sqlite:///{Path(tmp) / 'catalog.db'}", *db_urls):
            name = _unique(_backend(url), list(out))
            say(f"catalog upserts on {name}: {rows} rows ...")
            out[name] = bench_upserts(url, rows=rows, batch_size=batch_size)
    return out


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    if find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for module in ("torch", "torchvision", "cv2", "ray"):
        if find_spec(module) is None:
            info[module] = None
            continue
        try:
            from importlib.metadata import version

            info[module] = version({"cv2": "opencv-python"}.get(module, module))
        except Exception:  # a module without distribution metadata: its version is only informative
            info[module] = "unknown"
    with contextlib.suppress(OSError, ValueError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


# --------------------------------------------------------------------------------------------- table


_COLUMNS = (("peer", 30, "<"), ("images", 7, ">"), ("images/s", 10, ">"), ("p50 ms", 9, ">"), ("p95 ms", 9, ">"),
            ("peak RSS MiB", 13, ">"), ("setup s", 8, ">"))


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table, with the ratios and each peer's configuration below it."""

    def cell(v: Any, digits: int = 1) -> str:
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    head = "  ".join(f"{name:{align}{width}}" for name, width, align in _COLUMNS)
    lines = [head, "-" * len(head)]
    notes = []
    for name, r in report["peers"].items():
        if r.get("status") != "ok":
            reason = (r.get("reason") or "").strip().splitlines() or [""]
            lines.append(f"{name:<{_COLUMNS[0][1]}}  {r.get('status')}: {reason[-1][:100]}")
            continue
        values = (name, r["images"], cell(r["images_per_s"]), cell(r["batch_ms_p50"]), cell(r["batch_ms_p95"]),
                  cell(r["peak_rss_mib"]), cell(r.get("setup_s")))
        lines.append("  ".join(f"{v:{align}{width}}" for v, (_, width, align) in zip(values, _COLUMNS, strict=True)))
        cfg = r.get("config", {})
        notes.append(f"  {name}: {cfg.get('label') or _describe(cfg)}")
    for name, ratio in report.get("ratios", {}).items():
        parts = [f"{k.removeprefix('over_').replace('_', '-')} {'-' if v is None else f'{v:.2f}x'}"
                 for k, v in ratio.items()]
        lines.append(f"{name} speed vs: " + ", ".join(parts))
    lines.append("config:")
    lines.extend(notes)
    for name, u in (report.get("catalog_upserts") or {}).items():
        if isinstance(u, dict) and "fresh_rows_per_s" in u:
            lines.append(f"catalog upserts {name}: {u['fresh_rows_per_s']} rows/s fresh, "
                         f"{u['reupsert_rows_per_s']} rows/s re-upsert ({u['rows']} rows, batch {u['batch_size']})")
    lines.append(f"model {report['model']['spec']} ({report['model']['arch']}, input "
                 f"{'x'.join(map(str, report['model']['input_size']))}), batch size {report['batch_size']}, "
                 f"device {report.get('device', 'cpu')}, {report['machine']['cpu_count']} CPUs"
                 + "".join(f", {g}" for g in report["machine"].get("gpus", []))
                 + "; images/s from the first image to the last result, setup (imports, model load, Ray start) "
                 "excluded")
    return "\n".join(lines)


def _describe(cfg: dict[str, Any]) -> str:
    keys = ("database", "runtime", "device", "torch_threads", "cpu_streams", "cpu_microbatch", "decode_threads",
            "batch_size", "decoder")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


# ---------------------------------------------------------------------------------------------- main


def serve_peer(stdin: TextIO, stdout: TextIO) -> None:
    """The body of a peer process (``invsort bench peer``): read a spec (JSON, see :func:`run_peer`) from
    ``stdin``, run the peer, write its result to ``stdout`` as one line after a marker, flushed. Returns None.

    Raises:
        json.JSONDecodeError: ``stdin`` is not JSON.
        KeyError: the spec lacks a field or names an unknown peer.
        Exception: whatever the peer raised (the driver reports the traceback's tail as the peer's error).
    """
    result = run_peer(json.load(stdin))
    stdout.write(_RESULT_PREFIX + json.dumps(result) + "\n")
    stdout.flush()
