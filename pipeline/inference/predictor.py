"""The model side of inference: a :class:`Predictor` holds a network (or an exported runtime session) on its
device and turns ``(N, H, W, C)`` uint8 batches into class probabilities and catalogue rows. How it is run is
one :class:`PredictorOptions`. The streaming decode -> batch -> forward pipeline is
:mod:`pipeline.inference.streaming`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from types import TracebackType
from typing import cast

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.inference.lean import (
    GPU_DECODE_MODES,
    NON_FINITE,
    TOP_K,
    PredictorOptions,
    check_runtime_device,
    score_rows,
)
from pipeline.io.images import to_model_input
from pipeline.models.modelfile import ModelFile
from pipeline.models.runtimes import RuntimeSession, check_runtime_name, load_session
from pipeline.records import Item, ItemResult
from pipeline.settings import check_device

__all__ = ["NON_FINITE", "TOP_K", "Predictor", "PredictorOptions", "resolve_decode_backend", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available else cpu; ``cpu``; ``cuda`` or ``cuda:N`` (GPU N, 0 first), refused when absent.

    Raises:
        ConfigError: a name :func:`pipeline.settings.check_device` refuses, or ``cuda``/``cuda:N`` asked for where
            there is no usable GPU, or no GPU N (the message says how many there are).
    """
    check_device(name, what="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but no CUDA GPU is available here; use auto or cpu")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"device {name} asked for, but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}"
        )
    return device


def resolve_decode_backend(gpu_decode: str, device: torch.device) -> str:
    """Which decoder reads JPEGs: ``torchvision`` (a batch at a time on ``device``, nvJPEG on CUDA) or
    ``opencv`` (one image at a time in the decode threads).

    ``auto``: torchvision on CUDA, opencv elsewhere; ``on``: torchvision, CUDA only; ``off``: opencv.

    Raises:
        ConfigError: unknown mode, or ``on`` where inference does not run on CUDA.
    """
    if gpu_decode not in GPU_DECODE_MODES:
        raise ConfigError(f"unknown INVSORT_GPU_DECODE {gpu_decode!r}; valid: {', '.join(GPU_DECODE_MODES)}")
    if gpu_decode == "on" and device.type != "cuda":
        raise ConfigError(
            f"INVSORT_GPU_DECODE=on decodes JPEGs on a CUDA GPU, but inference runs on {device.type}; "
            "use auto or off"
        )
    return "torchvision" if gpu_decode != "off" and device.type == "cuda" else "opencv"


class Predictor:
    """A model ready for batched inference.

    Owns a thread pool when it runs several CPU streams: :meth:`close` it (or use it as a context manager)
    when done. A closed predictor still predicts, its micro-batches one after another in the calling thread.

    Args:
        model_file: a loaded :class:`ModelFile`.
        options: how to run it (:class:`PredictorOptions`; None: the defaults).

    Raises:
        ConfigError: unknown device, runtime or decode mode, ``cuda`` with a CPU runtime or without a GPU,
            ``gpu_decode="on"`` off CUDA, ``torch_compile`` with another runtime or failing on this machine, the
            runtime's package missing (the message names the extra to install), the runtime disagreeing
            with PyTorch, or ``cpu_streams`` / ``cpu_microbatch`` out of range.
    """

    def __init__(self, model_file: ModelFile, options: PredictorOptions | None = None):
        opts = options if options is not None else PredictorOptions()
        self.model_file = model_file
        self.options = opts
        self.runtime = check_runtime_name(opts.runtime)
        device = check_runtime_device(opts)
        self.device = resolve_device(device)
        self.is_cuda = self.device.type == "cuda"
        self.decode_backend = resolve_decode_backend(opts.gpu_decode, self.device)
        self.model: torch.nn.Module | None = None
        self.session: RuntimeSession | None = None
        if opts.cpu_streams < 0 or not 1 <= opts.cpu_microbatch <= 4096:
            raise ConfigError(f"cpu_streams must be >= 0 and cpu_microbatch 1..4096, got {opts.cpu_streams}, "
                              f"{opts.cpu_microbatch}")
        budget = torch.get_num_threads()
        self.cpu_streams = 1 if self.device.type != "cpu" or opts.torch_compile else (opts.cpu_streams or budget)
        self.cpu_microbatch = opts.cpu_microbatch
        stream_threads = max(1, budget // self.cpu_streams)
        if self.runtime == "torch":
            self.model = model_file.build_scoring().to(self.device).to(memory_format=torch.channels_last)
        else:
            self.session = load_session(model_file, self.runtime, cache_dir=opts.runtime_cache_dir,
                                        num_threads=stream_threads)
        c = model_file.in_chans
        self.mean = torch.tensor(model_file.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(model_file.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.class_names = list(model_file.class_names)
        self.k = min(TOP_K, len(self.class_names))
        self.open_set = model_file.open_set
        self.output_width = model_file.output_width  # the classes, then the open-set score column if any
        self.temperature = float(model_file.temperature) or 1.0
        self.review_threshold = (
            model_file.review_threshold if opts.review_threshold is None else float(opts.review_threshold)
        )
        self.static_batch: int | None = None  # set by torch_compile: every forward pass has this many images
        if opts.torch_compile:
            self._compile(opts.compile_batch_size)
        elif self.is_cuda and self.model is not None:
            self._warm_up(opts.compile_batch_size)
        self._pool: ThreadPoolExecutor | None = None  # last: nothing above can leave it unclosed
        if self.cpu_streams > 1:  # each stream thread gets its share of the cores (a per-thread torch setting)
            self._pool = ThreadPoolExecutor(self.cpu_streams, thread_name_prefix="invsort-forward",
                                            initializer=torch.set_num_threads, initargs=(stream_threads,))

    def close(self) -> None:
        """Shut the forward-pass threads down, after the passes already started have finished. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _compile(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"compile_batch_size must be >= 1, got {batch_size}")
        assert self.model is not None
        self.model = cast(torch.nn.Module, torch.compile(self.model))  # an OptimizedModule for a Module
        try:
            self._warm_up(batch_size)  # compiles it
        except Exception as exc:  # inductor needs a C++ compiler (CPU) or Triton (GPU); say so at start-up
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ConfigError(
                f"INVSORT_COMPILE=true but torch.compile failed on {self.device.type} "
                f"({type(exc).__name__}: {first}); set INVSORT_COMPILE=false"
            ) from exc
        self.static_batch = batch_size
        log.info("compiled %s with torch.compile for batches of %d on %s", self.model_file.arch, batch_size,
                 self.device)

    def _warm_up(self, batch_size: int) -> None:
        """One forward pass of a zero ``(batch_size, H, W, C)`` uint8 batch on the device, waited for: on CUDA,
        the context, cuBLAS/cuDNN handles and the kernels (loaded lazily, on first use) are made here, with the
        model, rather than in a job's first batch, which they would otherwise hold up for seconds; under
        ``torch_compile``, this pass compiles the network."""
        h, w = self.input_size
        zeros = torch.zeros((max(1, batch_size), h, w, self.model_file.in_chans), dtype=torch.uint8,
                            device=self.device)
        started = time.perf_counter()
        with torch.inference_mode():
            self._logits(zeros)
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        log.info("warmed %s up on %s in %.2f s", self.model_file.arch, self.device, time.perf_counter() - started)

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
        return self.predict_outputs(batch)[:, : len(self.class_names)]

    def predict_outputs(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """:meth:`predict_logits`, followed by the open-set score column when the model file has one
        (``(N, output_width)`` float32 on the CPU). ``batch`` may be a numpy array too."""
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        x = batch.to(self.device, non_blocking=True)
        if self.device.type == "cpu" and x.shape[0] > self.cpu_microbatch:
            parts = list(torch.split(x, self.cpu_microbatch))
            pool = self._pool
            run = pool.map if pool is not None else map
            return torch.cat(list(run(self._forward, parts)))
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass (in the calling thread): ``(N, H, W, C)`` uint8 on the device → float32 outputs
        (logits, then the open-set score if any) on the CPU. Inference mode is per thread, so it is entered
        here, in the stream thread."""
        if self.session is not None:
            with torch.inference_mode():
                inputs = to_model_input(x, self.mean, self.std).contiguous()  # ONNX graphs take plain NCHW
            return torch.from_numpy(self.session.logits(inputs.numpy()))
        with torch.inference_mode():
            logits = self._logits(x)
        return logits.float().cpu()

    def probs_on_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities, computed where the batch is (runtime ``torch`` only).

        Args:
            batch: ``(N, H, W, C)`` uint8 on :attr:`device`.

        Returns:
            ``(N, num_classes)`` float32 on :attr:`device` (softmax of float32 logits / temperature); on CUDA
            the work is queued on the current stream, not waited for.
        """
        return self.scored_on_device(batch)[:, : len(self.class_names)]

    def scored_on_device(self, batch: torch.Tensor) -> torch.Tensor:
        """:meth:`probs_on_device`, followed by the open-set score column when the model file has one: what
        :meth:`results` takes."""
        with torch.inference_mode():
            return self._scored(self._logits(batch).float())

    def _scored(self, outputs: torch.Tensor) -> torch.Tensor:
        """Network outputs → softmax of the logits / temperature, the open-set score column (if any) kept."""
        k = len(self.class_names)
        probs = torch.softmax(outputs[:, :k] / self.temperature, dim=1)
        return probs if outputs.shape[1] == k else torch.cat([probs, outputs[:, k:]], dim=1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, C)`` uint8 on the device → ``(N, output_width)`` logits (and score) there (fp16 under CUDA
        autocast).
        A compiled network sees only ``static_batch``-image batches: others are split and zero-padded."""
        assert self.model is not None
        step = self.static_batch
        if step is not None and x.shape[0] != step:
            parts = []
            for start in range(0, x.shape[0], step):
                part = x[start : start + step]
                n = part.shape[0]
                if n < step:
                    part = torch.cat([part, part.new_zeros((step - n, *part.shape[1:]))])
                parts.append(self._logits(part)[:n])
            return torch.cat(parts)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.is_cuda else nullcontext()
        with autocast:
            return self.model(to_model_input(x, self.mean, self.std))

    def predict_probs(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a batch.

        Args:
            batch: ``(N, H, W, C)`` uint8 on the CPU (pinned memory makes the GPU copy asynchronous).

        Returns:
            ``(N, num_classes)`` float32 on the CPU, rows summing to 1 (softmax of logits / temperature).
        """
        return self.predict_scored(batch)[:, : len(self.class_names)]

    def predict_scored(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """:meth:`predict_probs`, followed by the open-set score column when the model file has one: what
        :meth:`results` takes (``(N, output_width)`` float32 on the CPU)."""
        outputs = self.predict_outputs(batch)
        with torch.inference_mode():
            return self._scored(outputs)

    def unknown(self, scored: torch.Tensor) -> list[bool]:
        """Per row of ``scored`` (:meth:`predict_scored`'s output): whether the open-set score says "none of my
        categories" (below the model file's threshold; a NaN score too). All False without an open-set score."""
        k = len(self.class_names)
        if self.open_set is None or scored.shape[1] <= k:
            return [False] * scored.shape[0]
        return (~(scored[:, k] >= self.open_set.threshold)).tolist()

    def results(self, items: list[Item], probs: torch.Tensor | np.ndarray, job_id: str | None) -> list[ItemResult]:
        """Rows for ``items`` (same order as ``probs``' rows).

        ``probs`` is :meth:`predict_scored`'s output (or plain probabilities). A row is ``sorted`` when its
        confidence reaches the review threshold and the open-set score does not call it unknown; otherwise
        ``needs_review``, with ``error`` = ``unknown`` (:data:`pipeline.models.openset.UNKNOWN`) when the open-set
        score rejected it, so such a row is never auto-sorted whatever its confidence. A row whose probabilities
        are not all finite (e.g. an fp16 overflow on one image) is ``failed`` with :data:`NON_FINITE` as its
        ``error``: NaN is no confidence, and JSON cannot store it (:func:`pipeline.inference.lean.score_rows`).
        """
        if isinstance(probs, np.ndarray):
            probs = torch.from_numpy(probs)
        unknown = self.unknown(probs)
        finite = torch.isfinite(probs[:, : len(self.class_names)]).all(dim=1).tolist()
        top_p, top_i = probs[:, : len(self.class_names)].topk(self.k, dim=1)
        mf = self.model_file
        return score_rows(items, top_p.tolist(), top_i.tolist(), unknown, finite, class_names=self.class_names,
                          review_threshold=self.review_threshold, model_name=mf.name, model_version=mf.version,
                          job_id=job_id)


