"""Streaming inference: fetch and decode in thread pools, overlapped with a :class:`Predictor`'s forward pass.

The pipeline streams: items are pulled from an iterator one batch at a time, at most ``prefetch_batches``
batches are being fetched/decoded ahead of the one in the model, and results leave through a callback per
batch. Memory is bounded by ``(prefetch_batches + 1 + inflight_batches) x batch_size`` decoded images whatever
the job's size; while they decode, the threads' full-size pixels are bounded together by ``decode_memory_bytes``
(each image's need read from its header, and an image over ``max_pixels`` refused before it is decoded).

Fetching is I/O and decoding is CPU, so they have threads of their own (:class:`_Pools`). A local file is read
and decoded by one of ``decode_threads`` threads, as before: a read from the page cache is cheaper than a hand-off
between threads. An object fetched over the network (``s3://``) is read by one of ``fetch_concurrency`` fetch
threads, which then decodes it once one of the ``decode_threads`` decode slots is free: up to
``fetch_concurrency`` GETs wait on the network at once (the latency of each is hidden behind the others) while no
more than ``decode_threads`` images decode at once (one per core). Fetched bytes not yet decoded are held only by
the fetch threads, so they are bounded by ``fetch_concurrency`` objects (each at most ``INVSORT_MAX_IMAGE_BYTES``).

On the CPU a batch is decoded by OpenCV in the threads, stacked and run through the model, one at a time. On a
CUDA GPU (:class:`_BatchRunner`):

- each batch is stacked into a reusable pinned host buffer and copied with ``non_blocking=True``; it is
  normalised on the GPU (:func:`pipeline.io.images.to_model_input`) and run under fp16 autocast;
- two batches are in flight, each on its own CUDA stream with its own pinned buffers: batch i+1 is gathered,
  decoded and queued while batch i computes; probabilities come back by a ``non_blocking`` copy into pinned
  memory and are read after the batch's CUDA event has fired;
- JPEGs are decoded on the GPU by nvJPEG a batch at a time and resized there (``INVSORT_GPU_DECODE``,
  :func:`pipeline.io.images.decode_jpeg_batch`); the threads then only fetch the bytes and read the JPEG headers,
  and decode with OpenCV what nvJPEG is not given (PNG, CMYK, EXIF-rotated) and, one image at a time, what it
  fails on; a file that OpenCV cannot decode either fails alone, with OpenCV's reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias, cast

import numpy as np

from pipeline.errors import ConfigError, ImageError, TransientError
from pipeline.io.images import (
    DEFAULT_DECODE_MEMORY_BYTES,
    DecodeBudget,
    batch_decodable_jpeg,
    decode_image,
    decode_jpeg_batch,
)
from pipeline.io.storage import uri_scheme
from pipeline.records import Item, ItemResult, printable

if TYPE_CHECKING:
    import torch

    from pipeline.inference.lean import LeanPredictor
    from pipeline.inference.predictor import Predictor

log = logging.getLogger(__name__)

# The torch runtime's Predictor, or the LeanPredictor of an ONNX export (numpy only): this module imports torch
# only on the CUDA and torchvision paths, which a LeanPredictor never takes.
AnyPredictor: TypeAlias = "Predictor | LeanPredictor"

DECODE_BACKENDS = ("opencv", "torchvision")
CUDA_INFLIGHT_BATCHES = 2


class Reader(Protocol):
    """Where the pipeline gets an item's bytes (:class:`pipeline.io.storage.ObjectReader` is one). A reader may also
    have an attribute ``fetch_concurrency`` (int or None): the reads over the network it serves at once, which
    :func:`run_pipeline` uses when it is not given one."""

    def read(self, uri: str) -> bytes: ...


def is_remote(uri: str) -> bool:
    """True when reading ``uri`` waits on the network (any scheme but ``file://`` and plain paths)."""
    return uri_scheme(uri) not in (None, "file")


def failed_result(item: Item, reason: str, predictor: AnyPredictor, job_id: str | None) -> ItemResult:
    """The ``failed`` row for an item that could not be read or decoded."""
    return ItemResult(
        item_id=item.item_id,
        image_uri=item.uri,
        status="failed",
        error=reason,
        model_name=predictor.model_file.name,
        model_version=predictor.model_file.version,
        job_id=job_id,
    )


def describe_error(exc: BaseException) -> str:
    """The reason stored on a ``failed`` row: what went wrong, never a traceback; text a database can store
    (:func:`pipeline.records.printable`: a non-UTF-8 byte of a file name shows as ``\\xNN``)."""
    if isinstance(exc, ImageError):
        return printable(str(exc))
    if isinstance(exc, FileNotFoundError | PermissionError):
        return printable(str(exc) or type(exc).__name__)
    return printable(f"{type(exc).__name__}: {exc}"[:500])


@dataclass
class Summary:
    """What a run did. ``seconds`` is wall time; ``images_per_s`` = images / seconds.

    Where the time went, by stage: ``fetch_s`` and ``decode_s`` are the seconds the threads spent reading the
    images and decoding them (waits for the decode memory budget included, waits for a free decode slot not),
    summed over the threads (with many fetches in flight ``fetch_s`` is far more than the wall time);
    ``forward_s`` is the time this thread spent launching batches on the model and waiting for their rows.
    """

    images: int = 0
    sorted: int = 0
    needs_review: int = 0
    failed: int = 0
    batches: int = 0
    seconds: float = 0.0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    forward_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def add(self, rows: list[ItemResult]) -> None:
        self.batches += 1
        self.images += len(rows)
        for r in rows:
            if r.status == "sorted":
                self.sorted += 1
            elif r.status == "needs_review":
                self.needs_review += 1
            else:
                self.failed += 1


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Chunks of ``size`` items; when ``items`` raises, the partial chunk is yielded first, then the error."""
    it = iter(items)
    chunk: list[Item] = []
    while True:
        try:
            item = next(it)
        except StopIteration:
            break
        except Exception:
            if chunk:
                yield chunk
            raise
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _checked_options(
    predictor: AnyPredictor,
    batch_size: int,
    decode_threads: int,
    prefetch_batches: int,
    decode_backend: str | None,
    inflight_batches: int | None,
    decode_memory_bytes: int,
    fetch_concurrency: int,
) -> tuple[str, int]:
    """:func:`run_pipeline`'s ``(decode backend, inflight depth)``, its options checked.

    Raises:
        ConfigError: a bad size, count, memory budget, fetch concurrency or decode backend.
    """
    if batch_size < 1 or decode_threads < 1 or prefetch_batches < 0:
        raise ConfigError("batch_size and decode_threads must be >= 1, prefetch_batches >= 0")
    if fetch_concurrency < 1:
        raise ConfigError(f"fetch_concurrency must be >= 1, got {fetch_concurrency}")
    backend = predictor.decode_backend if decode_backend is None else decode_backend
    if backend not in DECODE_BACKENDS:
        raise ConfigError(f"unknown decode backend {backend!r}; valid: {', '.join(DECODE_BACKENDS)}")
    depth = inflight_batches if inflight_batches is not None else CUDA_INFLIGHT_BATCHES if predictor.is_cuda else 1
    if depth < 1:
        raise ConfigError(f"inflight_batches must be >= 1, got {depth}")
    if decode_memory_bytes < 1:
        raise ConfigError(f"decode_memory_bytes must be >= 1, got {decode_memory_bytes}")
    return backend, depth


def run_pipeline(
    items: Iterable[Item],
    *,
    predictor: AnyPredictor,
    reader: Reader,
    on_batch: Callable[[list[ItemResult]], None],
    batch_size: int = 64,
    decode_threads: int = 4,
    prefetch_batches: int = 2,
    max_pixels: int = 100_000_000,
    job_id: str | None = None,
    decode_backend: str | None = None,
    inflight_batches: int | None = None,
    decode_memory_bytes: int = DEFAULT_DECODE_MEMORY_BYTES,
    fetch_concurrency: int | None = None,
) -> Summary:
    """Sort ``items``: fetch + decode (thread pools) → batched forward pass → ``on_batch(rows)``.

    Args:
        items: an iterable of :class:`Item`, consumed lazily.
        predictor: the model.
        reader: object with ``read(uri) -> bytes`` (:class:`pipeline.io.storage.ObjectReader`).
        on_batch: called in this thread with each batch's rows, in input order; a batch's rows hold every
            item of the batch exactly once (``failed`` rows for the ones that could not be read).
        batch_size: images per forward pass.
        decode_threads: images decoded at once (threads that read and decode local files, and decode slots).
        prefetch_batches: batches fetched/decoded ahead of the one in the model (bounds memory).
        job_id: stored on every row.
        decode_backend: ``opencv`` (each image in the threads) or ``torchvision`` (JPEGs a batch at a time on
            the predictor's device, :func:`pipeline.io.images.decode_jpeg_batch`; other files with OpenCV). None:
            the predictor's :attr:`~Predictor.decode_backend`. ``torchvision`` on the CPU serves tests: it decodes
            in this thread, so it is slower there than ``opencv``.
        inflight_batches: batches queued on the device before the oldest one's rows are read. None: 2 on CUDA
            (one computes while the next is decoded and copied), 1 elsewhere (nothing runs asynchronously).
        max_pixels: images whose header declares more pixels fail before anything is decoded.
        decode_memory_bytes: the decoded pixels (bytes) that this call's decode threads may hold together
            (:class:`pipeline.io.images.DecodeBudget`, each image's estimate read from its header); an image
            that needs more waits for the others and decodes alone.
        fetch_concurrency: objects fetched over the network (``s3://``) at once, each by a thread that then waits
            for a decode slot; it bounds the fetched bytes not yet decoded to this many objects. None: the reader's
            ``fetch_concurrency`` (:func:`~pipeline.io.storage.make_reader`'s: the setting), else ``decode_threads``.

    Returns:
        A :class:`Summary`.

    Raises:
        ConfigError: a bad size, count, memory budget, fetch concurrency or decode backend.
        TransientError: from ``reader.read`` (storage unavailable after its retries); its batch gets no rows.
        Whatever the ``items`` iterator or ``on_batch`` raises, after every batch pulled before the error
        has gone through ``on_batch`` (nothing already read is lost).
    """
    if fetch_concurrency is None:  # the reader's connection pool is sized for its own
        fetch_concurrency = getattr(reader, "fetch_concurrency", None) or decode_threads
    backend, depth = _checked_options(predictor, batch_size, decode_threads, prefetch_batches, decode_backend,
                                      inflight_batches, decode_memory_bytes, fetch_concurrency)
    budget = DecodeBudget(decode_memory_bytes)
    summary = Summary()
    start = time.perf_counter()
    source = _batches(items, batch_size)
    pending: deque[tuple[list[Item], list[Future]]] = deque()
    launched: deque[_Launched] = deque()
    source_error: BaseException | None = None
    runner = _BatchRunner(predictor, batch_size=batch_size, depth=depth, max_pixels=max_pixels, budget=budget)

    def emit(batch: _Launched) -> None:
        began = time.perf_counter()
        rows = runner.finish(batch, job_id)
        summary.forward_s += time.perf_counter() - began
        on_batch(rows)
        summary.add(rows)

    with _decode_pool(decode_threads, fetch_concurrency) as pools:
        load = _loader(reader, predictor, gpu_jpegs=backend == "torchvision", max_pixels=max_pixels, budget=budget,
                       slots=pools.slots)

        def submit_next() -> bool:
            nonlocal source_error
            if source_error is not None:
                return False
            try:
                chunk = next(source)
            except StopIteration:
                return False
            except Exception as exc:
                source_error = exc
                return False
            pending.append((chunk, [pools.submit(load, it) for it in chunk]))
            return True

        try:
            for _ in range(prefetch_batches + 1):
                if not submit_next():
                    break
            while pending:
                chunk, futures = pending.popleft()
                submit_next()  # keep the decode threads busy while this batch is in the model
                try:
                    loads = [f.result() for f in futures]
                    summary.fetch_s += sum(x.fetch_s for x in loads)
                    summary.decode_s += sum(x.decode_s for x in loads)
                    began = time.perf_counter()
                    launched.append(runner.launch(chunk, [x.loaded for x in loads]))
                    summary.forward_s += time.perf_counter() - began
                except BaseException:
                    while launched:  # batches already on the device are not lost
                        emit(launched.popleft())
                    raise
                if len(launched) >= depth:
                    emit(launched.popleft())
            while launched:
                emit(launched.popleft())
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
    summary.seconds = time.perf_counter() - start
    if source_error is not None:
        raise source_error
    return summary


class _Pools:
    """The threads of one :func:`run_pipeline` call: ``decode_threads`` threads that read local files and decode
    them, ``fetch_concurrency`` threads (started on the first remote item) that fetch objects over the network and
    then decode them, and ``slots``, the ``decode_threads`` decodes allowed at once across both."""

    def __init__(self, decode_threads: int, fetch_concurrency: int) -> None:
        self.decode = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="invsort-decode")
        self.fetch_concurrency = fetch_concurrency
        self.fetch: ThreadPoolExecutor | None = None
        self.slots = threading.BoundedSemaphore(decode_threads)

    def submit(self, load: Callable[[Item], _Load], item: Item) -> Future[_Load]:
        """Run ``load(item)`` on the fetch threads when ``item`` is remote, else on the decode threads."""
        if not is_remote(item.uri):
            return self.decode.submit(load, item)
        if self.fetch is None:
            self.fetch = ThreadPoolExecutor(max_workers=self.fetch_concurrency, thread_name_prefix="invsort-fetch")
        return self.fetch.submit(load, item)

    def shutdown(self, *, wait: bool) -> None:
        for pool in (self.fetch, self.decode):
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=not wait)


@contextmanager
def _decode_pool(decode_threads: int, fetch_concurrency: int) -> Iterator[_Pools]:
    """The fetch and decode threads of one :func:`run_pipeline` call. When the call ends in an error (a task's time
    limit among them) the pools are shut down without waiting: a decode thread stuck in a native decoder, or a
    fetch thread waiting on the network, must not hold the error up (it would hang the caller until a hard kill)."""
    pools = _Pools(decode_threads, fetch_concurrency)
    try:
        yield pools
    except BaseException:
        pools.shutdown(wait=False)
        raise
    pools.shutdown(wait=True)


@dataclass(frozen=True, slots=True)
class _Jpeg:
    """A JPEG left encoded by the decode threads, for :func:`pipeline.io.images.decode_jpeg_batch`."""

    data: bytes

    def tensor(self) -> torch.Tensor:
        import torch

        # A writable copy: torch warns about tensors over read-only buffers such as bytes.
        return torch.from_numpy(np.frombuffer(bytearray(self.data), dtype=np.uint8))


Loaded = np.ndarray | str | _Jpeg  # what a decode thread hands back: image, failure reason, or JPEG bytes


class _Load(NamedTuple):
    """What a decode thread made of an item, and the seconds it spent reading and decoding it."""

    loaded: Loaded
    fetch_s: float
    decode_s: float


def _loader(reader: Reader, predictor: AnyPredictor, *, gpu_jpegs: bool, max_pixels: int,
            budget: DecodeBudget, slots: threading.BoundedSemaphore) -> Callable[[Item], _Load]:
    """A thread's work on one item: read it, then decode it in one of the decode ``slots`` (a JPEG for the GPU is
    only checked and left encoded)."""
    size, chans = predictor.input_size, predictor.model_file.in_chans

    def load(item: Item) -> _Load:
        began, fetched, decoding = time.perf_counter(), None, None  # when the read ended, when the decode began
        try:
            data = reader.read(item.uri)
            fetched = time.perf_counter()
            with slots:
                decoding = time.perf_counter()
                if gpu_jpegs and batch_decodable_jpeg(data, max_pixels=max_pixels):
                    loaded: Loaded = _Jpeg(data)
                else:
                    loaded = decode_image(data, size=size, in_chans=chans, max_pixels=max_pixels, budget=budget)
        except TransientError:  # the storage, not the image: the job or task is retried, no item fails
            raise
        except Exception as exc:  # one bad image fails alone, with its reason
            loaded = describe_error(exc)
        done = time.perf_counter()
        fetched = done if fetched is None else fetched  # a read that failed: all of its time was fetching
        return _Load(loaded, fetched - began, done - (decoding or fetched))

    return load


@dataclass
class _Slot:
    """The CUDA resources of one in-flight batch, reused batch after batch."""

    host_in: torch.Tensor  # (batch_size, H, W, C) uint8, pinned
    host_out: torch.Tensor  # (batch_size, num_classes) float32, pinned
    stream: torch.cuda.Stream
    done: torch.cuda.Event


@dataclass
class _Launched:
    """A batch handed to the model. ``probs`` row k belongs to ``chunk[order[k]]``; on CUDA it is a view of a
    pinned buffer that holds the result once ``done`` has fired."""

    chunk: list[Item]
    reasons: list[str | None]  # per item: why it failed, None when it went through the model
    order: list[int]
    probs: torch.Tensor | np.ndarray | None
    done: torch.cuda.Event | None = None


class _BatchRunner:
    """Runs decoded batches through a predictor: synchronously on the CPU; on CUDA asynchronously, ``depth``
    batches at most in flight, each in a slot of its own (stream, pinned input and output buffers, event).

    The caller :meth:`finish`-es batches in launch order and launches at most ``depth`` before finishing the
    oldest, so a slot is never refilled while its batch is still being copied or computed.
    """

    def __init__(
        self, predictor: AnyPredictor, *, batch_size: int, depth: int, max_pixels: int, budget: DecodeBudget | None
    ):
        self.predictor = predictor
        self.max_pixels = max_pixels
        self.budget = budget
        self.slots: list[_Slot] = []
        self.turn = 0
        if predictor.is_cuda:
            import torch

            predictor = cast("Predictor", predictor)
            h, w = predictor.input_size
            shape = (batch_size, h, w, predictor.model_file.in_chans)
            for _ in range(depth):
                slot = _Slot(
                    host_in=torch.empty(shape, dtype=torch.uint8, pin_memory=True),
                    host_out=torch.empty((batch_size, predictor.output_width), pin_memory=True),
                    stream=torch.cuda.Stream(device=predictor.device),
                    done=torch.cuda.Event(),
                )
                slot.stream.wait_stream(torch.cuda.current_stream(predictor.device))  # weights, mean, std
                self.slots.append(slot)

    def launch(self, chunk: list[Item], loaded: list[Loaded]) -> _Launched:
        """Queue one batch; ``loaded[i]`` is what the decode threads made of ``chunk[i]``."""
        p = self.predictor
        reasons = [x if isinstance(x, str) else None for x in loaded]
        arrays = [(i, x) for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
        jpegs = [(i, x) for i, x in enumerate(loaded) if isinstance(x, _Jpeg)]
        if not arrays and not jpegs:
            return _Launched(chunk, reasons, [], None)
        if not self.slots and not jpegs:  # the CPU path: one synchronous forward pass
            batch = np.stack([a for _, a in arrays])
            return _Launched(chunk, reasons, [i for i, _ in arrays], p.predict_scored(batch))
        return self._launch_torch(chunk, reasons, arrays, jpegs)

    def _launch_torch(self, chunk: list[Item], reasons: list[str | None], arrays: list[tuple[int, np.ndarray]],
                      jpegs: list[tuple[int, _Jpeg]]) -> _Launched:
        """:meth:`launch` on CUDA, or with JPEGs for torchvision: the torch runtime's paths."""
        import torch

        p = cast("Predictor", self.predictor)
        slot = self.slots[self.turn % len(self.slots)] if self.slots else None
        self.turn += 1
        if slot is not None:
            slot.done.synchronize()  # free already (see the class docstring); cheap insurance for the buffers
        stream_ctx = torch.cuda.stream(slot.stream) if slot is not None else nullcontext()
        with stream_ctx:
            images, order = self._decode_jpegs(jpegs, arrays, reasons) if jpegs else (None, [])
            order += [i for i, _ in arrays]
            parts = [] if images is None or not len(images) else [images]
            if arrays:
                h, w = p.input_size
                shape = (len(arrays), h, w, p.model_file.in_chans)
                host = slot.host_in[: len(arrays)] if slot is not None else torch.empty(shape, dtype=torch.uint8)
                np.stack([a for _, a in arrays], out=host.numpy())
                parts.append(host.to(p.device, non_blocking=True))
            if not parts:
                return _Launched(chunk, reasons, [], None)
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
            if slot is None:
                return _Launched(chunk, reasons, order, p.predict_scored(x))
            out = slot.host_out[: len(order)]
            out.copy_(p.scored_on_device(x), non_blocking=True)
            slot.done.record(slot.stream)
        return _Launched(chunk, reasons, order, out, slot.done)

    def _decode_jpegs(
        self, jpegs: list[tuple[int, _Jpeg]], arrays: list[tuple[int, np.ndarray]], reasons: list[str | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """Decode ``jpegs`` on the device: ``(images, chunk index of each row)``. The ones torchvision could not
        decode go to OpenCV: appended to ``arrays`` when it can, their reason into ``reasons`` when not."""
        p = cast("Predictor", self.predictor)
        images, ok = decode_jpeg_batch(
            [j.tensor() for _, j in jpegs], size=p.input_size, in_chans=p.model_file.in_chans, device=p.device
        )
        for k in sorted(set(range(len(jpegs))) - set(ok)):
            i, jpeg = jpegs[k]
            try:
                img = decode_image(jpeg.data, size=p.input_size, in_chans=p.model_file.in_chans,
                                   max_pixels=self.max_pixels, budget=self.budget)
            except Exception as exc:
                reasons[i] = describe_error(exc)
                continue
            log.debug("torchvision could not decode item %d of its batch; OpenCV did", i)
            arrays.append((i, img))
        return images, [jpegs[k][0] for k in ok]

    def finish(self, batch: _Launched, job_id: str | None) -> list[ItemResult]:
        """The batch's rows in input order, once its results are in (waits for them on CUDA)."""
        if batch.done is not None:
            batch.done.synchronize()
        p = self.predictor
        rows: list[ItemResult | None] = [None] * len(batch.chunk)
        if batch.order:
            assert batch.probs is not None
            done = p.results([batch.chunk[i] for i in batch.order], batch.probs, job_id)
            for i, row in zip(batch.order, done, strict=True):
                rows[i] = row
        for i, reason in enumerate(batch.reasons):
            if reason is not None:
                rows[i] = failed_result(batch.chunk[i], reason, p, job_id)
        return rows  # type: ignore[return-value]
