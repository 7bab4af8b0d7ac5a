"""Micro-batching for ``POST /v1/classify``: photos of requests that arrive together share one forward pass.

A request's photos are decoded in the batcher's decode threads (:func:`pipeline.io.images.decode_image`, or left
encoded for nvJPEG where the predictor decodes JPEGs on the GPU, exactly as :func:`pipeline.inference.streaming.
run_pipeline` does), then queued. A forward thread takes the oldest queued request and every other request queued
behind it for the same model, up to :attr:`BatcherOptions.max_batch` photos, and runs them through the pipeline's
own batch runner (the one ``invsort sort`` uses: same stacking, normalisation, device copy, softmax, review
threshold and open-set score), then hands each request its own rows, in upload order.

When to wait: never when only one request is in the server. A forward thread that has taken a request waits for
more (at most :attr:`BatcherOptions.max_wait_s` after that request was queued, and only until ``max_batch`` photos)
only while another request is still being decoded, i.e. is known to be on its way; otherwise it runs at once.
Under load batches form by themselves: requests that arrive while the forward threads are busy queue up and go
through together in the next pass.

A photo that cannot be read fails alone (its row is ``failed`` with the reason, as in ``invsort sort``); an error
of the forward pass itself fails every request of that pass.

Configuration: ``INVSORT_CLASSIFY_BATCH_WAIT_MS`` (0..1000 ms, default 2) and ``INVSORT_CLASSIFY_FORWARD_THREADS``
(0..64, default 0: one per CPU stream of the predictor, :attr:`~pipeline.inference.predictor.Predictor.cpu_streams`,
each with ``torch threads / forward threads`` intra-op threads; one on a GPU); the largest batch is
``INVSORT_BATCH_SIZE``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from pipeline.errors import ConfigError
from pipeline.inference.streaming import (
    Loaded,
    _BatchRunner,
    _Jpeg,
    describe_error,
    failed_result,
)
from pipeline.io.images import DecodeBudget, batch_decodable_jpeg, decode_image
from pipeline.io.storage import TooLargeError
from pipeline.models.runtimes import default_threads, require_torch
from pipeline.records import Item, ItemResult
from pipeline.settings import Settings
from pipeline.sorting import AnyPredictor, get_predictor

log = logging.getLogger(__name__)

WAIT_ENV = "INVSORT_CLASSIFY_BATCH_WAIT_MS"
THREADS_ENV = "INVSORT_CLASSIFY_FORWARD_THREADS"
#: A batch waits at most this long for requests still being decoded. Long enough for a second request's decode
#: (a footwear JPEG decodes in well under a millisecond), short beside one forward pass (several ms).
DEFAULT_WAIT_MS = 2.0
MAX_WAIT_MS = 1000.0
MAX_FORWARD_THREADS = 64


def pin_torch_threads(count: int) -> None:
    """Give the calling thread ``count`` torch intra-op threads, for good; nothing in a process without torch (a
    CPU runtime: ``INVSORT_RUNTIME=onnxruntime`` or ``openvino`` never imports it, and its sessions have their
    threads from when they were made).

    torch sets a thread's count lazily, at its first call into ATen, to the count last set by *any* thread; a
    ``set_num_threads`` before that first call would be overwritten by another thread's later one. The
    ``get_num_threads`` call makes that first call first.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.get_num_threads()
    torch.set_num_threads(count)


class BatcherClosedError(RuntimeError):
    """The batcher is closed (the server is stopping): no request is taken any more."""


@dataclass(frozen=True)
class BatcherOptions:
    """How :class:`ClassifyBatcher` groups requests.

    Attributes:
        max_batch: photos per forward pass (>= 1); a request with more photos is run in several passes.
        max_wait_s: how long a batch may wait for requests still being decoded, counted from when its oldest
            request was queued (seconds, >= 0; 0: never wait).
        forward_threads: threads running forward passes side by side (0: one per CPU stream of the predictor,
            one on a GPU).
    """

    max_batch: int = 64
    max_wait_s: float = DEFAULT_WAIT_MS / 1000
    forward_threads: int = 0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_s < 0 or self.forward_threads < 0:
            raise ConfigError(f"batcher options out of range: {self}")

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> BatcherOptions:
        """``max_batch`` from ``INVSORT_BATCH_SIZE``; the wait and the thread count from
        ``INVSORT_CLASSIFY_BATCH_WAIT_MS`` and ``INVSORT_CLASSIFY_FORWARD_THREADS`` in ``environ`` (None: the
        process's environment).

        Raises:
            ConfigError: a value that is not a number or is out of range (the message names the variable).
        """
        env = os.environ if environ is None else environ
        wait_ms = _number(env, WAIT_ENV, float, DEFAULT_WAIT_MS, 0.0, MAX_WAIT_MS, "ms")
        threads = _number(env, THREADS_ENV, int, 0, 0, MAX_FORWARD_THREADS, "")
        return cls(max_batch=settings.batch_size, max_wait_s=wait_ms / 1000, forward_threads=int(threads))


def _number(env: Mapping[str, str], name: str, kind: type[float] | type[int], default: float, low: float,
            high: float, unit: str) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {'whole ' if kind is int else ''}number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}{f' {unit}' if unit else ''}, got {raw}")
    return value


@dataclass(eq=False)
class _Request:
    """One request's photos, decoded, waiting for a forward pass; ``future`` receives its rows."""

    predictor: AnyPredictor
    items: list[Item]
    loaded: list[Loaded]
    queued_at: float = field(default_factory=time.monotonic)
    future: Future[list[ItemResult]] = field(default_factory=Future)


class ClassifyBatcher:
    """Decode threads, a queue and forward threads that run requests arriving together as one batch.

    Use: :meth:`start` (in a worker thread of the app's lifespan, as the app loads its model), :meth:`classify` per
    request (in the event loop), :meth:`close` at the end. Thread-safe.

    Args:
        settings: the model options, decode threads (``INVSORT_DECODE_WORKERS``), the decoded-pixel budget
            (``INVSORT_DECODE_MEMORY_BYTES``), the byte and pixel limits of a photo.
        model_spec: the model every request uses (:func:`pipeline.sorting.get_predictor`, looked up per request
            so that a model file replaced on disk is loaded again, as for ``invsort sort``).
        options: batch size, wait and forward threads (:class:`BatcherOptions`).
        on_batch: called after each forward pass with ``(photos, requests)`` it held (metrics), in a forward
            thread.
    """

    def __init__(self, settings: Settings, model_spec: str, options: BatcherOptions,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        self.settings, self.model_spec, self.options, self.on_batch = settings, model_spec, options, on_batch
        if settings.runtime == "torch":
            require_torch("INVSORT_RUNTIME=torch (the default)")
            import torch  # noqa: F401 - before default_threads: its count is torch's once torch is here
        self._torch_threads = default_threads()
        # get_predictor's cache key holds the calling thread's torch thread count: the decode threads, which look
        # the predictor up, keep the count of the thread that made the batcher (the one that loaded the model).
        self._decode = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="invsort-classify-decode",
                                          initializer=pin_torch_threads, initargs=(self._torch_threads,))
        self._budget = DecodeBudget(settings.decode_memory_bytes)
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._decoding = 0  # requests being decoded: on their way to the queue
        self._closed = False
        self._threads: list[threading.Thread] = []

    @property
    def queued_requests(self) -> int:
        """Requests decoded and waiting for a forward thread now."""
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the model (or take the cached one) and start the forward threads: as many as
        :attr:`BatcherOptions.forward_threads` or, when 0, one per CPU stream of the predictor (one on a GPU),
        each with the torch intra-op threads of the thread that made the batcher divided among them, as the
        predictor's own CPU streams have.

        Raises:
            ModelFileError, FileNotFoundError, ConfigError: the model cannot be loaded (:func:`get_predictor`).
        """
        pin_torch_threads(self._torch_threads)
        predictor = get_predictor(self.settings, self.model_spec)
        count = self.options.forward_threads or (predictor.cpu_streams if predictor.device.type == "cpu" else 1)
        per_thread = max(1, self._torch_threads // count)
        ready = threading.Barrier(count + 1)
        for i in range(count):
            thread = threading.Thread(target=self._work, args=(per_thread, ready),
                                      name=f"invsort-classify-forward-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        ready.wait()
        # A thread's torch.set_num_threads also becomes the count of the threads started after it: put it back, so
        # that the server's later threads (and their get_predictor cache keys) are not changed by the batcher's.
        pin_torch_threads(self._torch_threads)
        log.info("classify batcher: up to %d photos a forward pass, %d forward thread(s) of %d torch thread(s), "
                 "waiting at most %.1f ms for requests being decoded", self.options.max_batch, count, per_thread,
                 self.options.max_wait_s * 1000)

    def close(self) -> None:
        """Take no more requests, finish the queued ones, stop the threads. Idempotent; blocks until done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._decode.shutdown(wait=True)

    # -------------------------------------------------------------------------------------------- requests

    async def classify(self, photos: Sequence[tuple[str, bytes | IO[bytes]]]) -> list[ItemResult]:
        """Classify one request's photos: look the model up and decode them in the decode threads, then wait for
        the forward pass that takes them (shared with the requests that arrive together for the same model).

        Args:
            photos: ``(name, data)`` pairs; ``data`` is the encoded file: bytes, or a binary file read from its
                start (at most ``INVSORT_MAX_IMAGE_BYTES + 1`` bytes) in a decode thread.

        Returns:
            One :class:`ItemResult` per photo, in the order given, as :func:`pipeline.sorting.classify_images`
            gives them: ``item_id`` and ``image_uri`` are the name; ``failed`` rows say why.

        Raises:
            BatcherClosedError: the batcher is closed.
            ModelFileError, FileNotFoundError, OSError: the model file cannot be loaded any more.
            Exception: whatever the forward pass raised (every request of that pass gets it).
        """
        if not photos:
            return []
        items = [Item(item_id=name, uri=name) for name, _ in photos]
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the classify batcher is closed: the server is stopping")
            self._decoding += 1
        queued = False
        try:
            predictor, first = await asyncio.wrap_future(self._decode.submit(self._prepare, photos[0][1]))
            rest = await asyncio.gather(*(asyncio.wrap_future(self._decode.submit(self._load, predictor, data))
                                          for _, data in photos[1:]))
            loaded = [first, *rest]
            if not any(isinstance(x, np.ndarray | _Jpeg) for x in loaded):  # nothing for the model
                return [failed_result(item, str(x), predictor, None) for item, x in zip(items, loaded, strict=True)]
            request = _Request(predictor, items, loaded)
            self._enqueue(request)
            queued = True
        finally:
            if not queued:
                with self._cond:
                    self._decoding -= 1
                    self._cond.notify_all()
        return await asyncio.wrap_future(request.future)

    def _prepare(self, data: bytes | IO[bytes]) -> tuple[AnyPredictor, Loaded]:
        """The predictor (cached; loaded again when its file changed) and the first photo decoded, in one decode
        thread's turn: a one-photo request costs one hand-over to the decode threads."""
        predictor = get_predictor(self.settings, self.model_spec)
        return predictor, self._load(predictor, data)

    def _load(self, predictor: AnyPredictor, data: bytes | IO[bytes]) -> Loaded:
        """What :func:`~pipeline.inference.streaming.run_pipeline`'s decode threads make of one photo: a
        ``(H, W, C)`` uint8 image, a JPEG left for the GPU decoder, or the reason it failed."""
        s = self.settings
        try:
            if not isinstance(data, bytes):
                data.seek(0)
                data = data.read(s.max_image_bytes + 1)
            if len(data) > s.max_image_bytes:
                raise TooLargeError(f"file is more than the limit of {s.max_image_bytes} bytes "
                                    "(INVSORT_MAX_IMAGE_BYTES)")
            if predictor.decode_backend == "torchvision" and batch_decodable_jpeg(data, max_pixels=s.max_image_pixels):
                return _Jpeg(data)
            return decode_image(data, size=predictor.input_size, in_chans=predictor.model_file.in_chans,
                                max_pixels=s.max_image_pixels, budget=self._budget)
        except Exception as exc:  # one bad photo fails alone, with its reason
            return describe_error(exc)

    def _enqueue(self, request: _Request) -> None:
        with self._cond:
            self._decoding -= 1
            if self._closed:
                self._cond.notify_all()
                raise BatcherClosedError("the classify batcher is closed: the server is stopping")
            self._queue.append(request)
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------------- forward threads

    def _take(self) -> list[_Request] | None:
        """The next batch: the oldest queued request and the ones behind it for the same predictor, up to
        ``max_batch`` photos, after waiting (see the module's docstring) for requests still being decoded.
        None once closed and drained."""
        limit = self.options.max_batch
        with self._cond:
            first = None
            while first is None:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None
                candidate = self._queue.popleft()
                if candidate.future.set_running_or_notify_cancel():  # False: its request went away
                    first = candidate
            taken, photos = [first], len(first.items)
            deadline = first.queued_at + self.options.max_wait_s
            while True:
                photos = self._take_queued(first.predictor, taken, photos)
                remaining = deadline - time.monotonic()
                if photos >= limit or not self._decoding or self._closed or remaining <= 0:
                    return taken
                self._cond.wait(remaining)

    def _take_queued(self, predictor: AnyPredictor, taken: list[_Request], photos: int) -> int:
        """Move queued requests of ``predictor`` into ``taken`` while it holds fewer than ``max_batch`` photos
        (the lock held); returns the photos it holds."""
        kept: deque[_Request] = deque()
        while self._queue:
            request = self._queue.popleft()
            if photos >= self.options.max_batch or request.predictor is not predictor:
                kept.append(request)
            elif request.future.set_running_or_notify_cancel():
                taken.append(request)
                photos += len(request.items)
        self._queue = kept
        return photos

    def _work(self, torch_threads: int, ready: threading.Barrier) -> None:
        pin_torch_threads(torch_threads)  # per thread, as the predictor's CPU streams do
        ready.wait()
        runner: _BatchRunner | None = None
        while (taken := self._take()) is not None:
            predictor = taken[0].predictor
            if runner is None or runner.predictor is not predictor:
                runner = _BatchRunner(predictor, batch_size=self.options.max_batch, depth=1,
                                      max_pixels=self.settings.max_image_pixels, budget=self._budget)
            try:
                rows = self._forward(runner, taken)
            except Exception as exc:  # the pass itself failed: every request in it gets the error
                log.exception("classify batch of %d request(s) failed", len(taken))
                for request in taken:
                    request.future.set_exception(exc)
                continue
            start = 0
            for request in taken:
                request.future.set_result(rows[start:start + len(request.items)])
                start += len(request.items)

    def _forward(self, runner: _BatchRunner, taken: list[_Request]) -> list[ItemResult]:
        """Every photo of ``taken`` through the model in passes of at most ``max_batch``: their rows in order."""
        items = [item for request in taken for item in request.items]
        loaded = [x for request in taken for x in request.loaded]
        step = self.options.max_batch
        rows: list[ItemResult] = []
        for start in range(0, len(items), step):
            batch = runner.launch(items[start:start + step], loaded[start:start + step])
            rows.extend(runner.finish(batch, None))
        if self.on_batch is not None:
            self.on_batch(len(items), len(taken))
        return rows
