"""Batched inference: fetch and decode in a thread pool, overlapped with the forward pass.

The pipeline streams: items are pulled from an iterator one batch at a time, at most ``prefetch_batches``
batches are being fetched/decoded ahead of the one in the model, and results leave through a callback per
batch. Memory is bounded by ``(prefetch_batches + 1) x batch_size`` decoded images whatever the job's size.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError, ImageError
from pipeline.images import decode_image, to_model_input
from pipeline.modelfile import ModelFile
from pipeline.records import Item, ItemResult
from pipeline.runtimes import RuntimeSession, check_runtime_name, load_session

log = logging.getLogger(__name__)

TOP_K = 5


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available else cpu; ``cpu``; ``cuda`` (error when absent).

    Raises:
        ConfigError: unknown name, or ``cuda`` asked for on a machine without a usable GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("INVSORT_DEVICE=cuda but no CUDA GPU is available; use auto or cpu")
        return torch.device("cuda")
    raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda")


class Predictor:
    """A model ready for batched inference.

    Args:
        model_file: a loaded :class:`ModelFile`.
        device: ``auto``, ``cpu`` or ``cuda``.
        review_threshold: confidence (0..1) below which rows get ``needs_review``; None uses the model
            file's own threshold.
        runtime: what runs the network: ``torch``, or ``onnxruntime`` / ``openvino`` (the network exported to
            ONNX once per model version and checked against PyTorch, :mod:`pipeline.runtimes`). Those two run
            on the CPU: with them ``auto`` means ``cpu``, and ``cuda`` is refused.
        runtime_cache_dir: folder of the ONNX exports (None: ``~/.cache/invsort/onnx``).

    Raises:
        ConfigError: unknown device or runtime, ``cuda`` with a CPU runtime or without a GPU, the runtime's
            package missing (the message names the extra to install), or the runtime disagreeing with PyTorch.
    """

    def __init__(
        self,
        model_file: ModelFile,
        *,
        device: str = "auto",
        review_threshold: float | None = None,
        runtime: str = "torch",
        runtime_cache_dir: str | Path | None = None,
    ):
        self.model_file = model_file
        self.runtime = check_runtime_name(runtime)
        if runtime != "torch":
            if device == "cuda":
                raise ConfigError(
                    f"INVSORT_RUNTIME={runtime} runs on the CPU; with INVSORT_DEVICE=cuda use INVSORT_RUNTIME=torch"
                )
            device = "cpu" if device == "auto" else device
        self.device = resolve_device(device)
        self.model: torch.nn.Module | None = None
        self.session: RuntimeSession | None = None
        if runtime == "torch":
            self.model = model_file.build().to(self.device, memory_format=torch.channels_last)
        else:
            self.session = load_session(model_file, runtime, cache_dir=runtime_cache_dir)
        c = model_file.in_chans
        self.mean = torch.tensor(model_file.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(model_file.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.class_names = list(model_file.class_names)
        self.k = min(TOP_K, len(self.class_names))
        self.temperature = float(model_file.temperature) or 1.0
        self.review_threshold = (
            model_file.review_threshold if review_threshold is None else float(review_threshold)
        )
        self.is_cuda = self.device.type == "cuda"

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model_file.input_size

    def predict_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a batch, from whichever runtime this predictor uses.

        Args:
            batch: ``(N, H, W, C)`` uint8 on the CPU (pinned memory makes the GPU copy asynchronous).

        Returns:
            ``(N, num_classes)`` float32 on the CPU.
        """
        x = batch.to(self.device, non_blocking=True)
        if self.session is not None:
            with torch.inference_mode():
                inputs = to_model_input(x, self.mean, self.std).contiguous()  # ONNX graphs take plain NCHW
            return torch.from_numpy(self.session.logits(inputs.numpy()))
        assert self.model is not None
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.is_cuda else nullcontext()
        with torch.inference_mode(), autocast:
            logits = self.model(to_model_input(x, self.mean, self.std))
        return logits.float().cpu()

    def predict_probs(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a batch.

        Args:
            batch: ``(N, H, W, C)`` uint8 on the CPU (pinned memory makes the GPU copy asynchronous).

        Returns:
            ``(N, num_classes)`` float32 on the CPU, rows summing to 1 (softmax of logits / temperature).
        """
        logits = self.predict_logits(batch)
        with torch.inference_mode():
            return torch.softmax(logits / self.temperature, dim=1)

    def results(self, items: list[Item], probs: torch.Tensor, job_id: str | None) -> list[ItemResult]:
        """Rows for ``items`` (same order as ``probs``' rows)."""
        top_p, top_i = probs.topk(self.k, dim=1)
        top_p_l, top_i_l = top_p.tolist(), top_i.tolist()
        names = self.class_names
        mf = self.model_file
        out = []
        for item, ps, ix in zip(items, top_p_l, top_i_l, strict=True):
            conf = ps[0]
            out.append(
                ItemResult(
                    item_id=item.item_id,
                    image_uri=item.uri,
                    status="sorted" if conf >= self.review_threshold else "needs_review",
                    category=names[ix[0]],
                    confidence=conf,
                    topk=[[names[i], round(p, 6)] for i, p in zip(ix, ps, strict=True)],
                    model_name=mf.name,
                    model_version=mf.version,
                    job_id=job_id,
                )
            )
        return out


def failed_result(item: Item, reason: str, predictor: Predictor, job_id: str | None) -> ItemResult:
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
    """The reason stored on a ``failed`` row: what went wrong, never a traceback."""
    if isinstance(exc, ImageError):
        return str(exc)
    if isinstance(exc, FileNotFoundError | PermissionError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"[:500]


@dataclass
class Summary:
    """What a run did. ``seconds`` is wall time; ``images_per_s`` = images / seconds."""

    images: int = 0
    sorted: int = 0
    needs_review: int = 0
    failed: int = 0
    batches: int = 0
    seconds: float = 0.0

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


def run_pipeline(
    items: Iterable[Item],
    *,
    predictor: Predictor,
    reader,
    on_batch: Callable[[list[ItemResult]], None],
    batch_size: int = 64,
    decode_threads: int = 4,
    prefetch_batches: int = 2,
    max_pixels: int = 100_000_000,
    job_id: str | None = None,
) -> Summary:
    """Sort ``items``: fetch + decode (thread pool) → batched forward pass → ``on_batch(rows)``.

    Args:
        items: an iterable of :class:`Item`, consumed lazily.
        predictor: the model.
        reader: object with ``read(uri) -> bytes`` (:class:`pipeline.storage.ObjectReader`).
        on_batch: called in this thread with each batch's rows, in input order; a batch's rows hold every
            item of the batch exactly once (``failed`` rows for the ones that could not be read).
        batch_size: images per forward pass.
        decode_threads: threads fetching and decoding.
        prefetch_batches: batches fetched/decoded ahead of the one in the model (bounds memory).
        job_id: stored on every row.

    Returns:
        A :class:`Summary`.

    Raises:
        Whatever the ``items`` iterator or ``on_batch`` raises, after every batch pulled before the error
        has gone through ``on_batch`` (nothing already read is lost).
    """
    if batch_size < 1 or decode_threads < 1 or prefetch_batches < 0:
        raise ConfigError("batch_size and decode_threads must be >= 1, prefetch_batches >= 0")
    size, chans = predictor.input_size, predictor.model_file.in_chans

    def load(item: Item) -> np.ndarray | str:
        try:
            return decode_image(reader.read(item.uri), size=size, in_chans=chans, max_pixels=max_pixels)
        except Exception as exc:  # one bad image fails alone, with its reason
            return describe_error(exc)

    summary = Summary()
    start = time.perf_counter()
    source = _batches(items, batch_size)
    pending: deque[tuple[list[Item], list[Future]]] = deque()
    source_error: BaseException | None = None

    with ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="invsort-decode") as pool:

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
            pending.append((chunk, [pool.submit(load, it) for it in chunk]))
            return True

        try:
            for _ in range(prefetch_batches + 1):
                if not submit_next():
                    break
            while pending:
                chunk, futures = pending.popleft()
                submit_next()  # keep the decode threads busy while this batch is in the model
                loaded = [f.result() for f in futures]
                rows = _infer(chunk, loaded, predictor, job_id)
                on_batch(rows)
                summary.add(rows)
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
    summary.seconds = time.perf_counter() - start
    if source_error is not None:
        raise source_error
    return summary


def _infer(chunk: list[Item], loaded: list[np.ndarray | str], predictor: Predictor, job_id) -> list[ItemResult]:
    good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
    rows: list[ItemResult | None] = [None] * len(chunk)
    if good:
        arrays = [loaded[i] for i in good]
        batch = torch.from_numpy(np.stack(arrays))
        if predictor.is_cuda:
            batch = batch.pin_memory()
        probs = predictor.predict_probs(batch)
        for i, row in zip(good, predictor.results([chunk[i] for i in good], probs, job_id), strict=True):
            rows[i] = row
    for i, x in enumerate(loaded):
        if isinstance(x, str):
            rows[i] = failed_result(chunk[i], x, predictor, job_id)
    return rows  # type: ignore[return-value]
