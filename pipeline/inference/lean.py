"""The torch-free half of inference: how a predictor runs (:class:`PredictorOptions`), the rows it makes
(:func:`score_rows`), and :class:`LeanPredictor`, which runs a model file's ONNX export on ONNX Runtime or OpenVINO
with numpy and OpenCV only (``INVSORT_RUNTIME=onnxruntime`` / ``openvino``).

A lean process (``invsort sort``, ``invsort worker`` or the HTTP API with one of those runtimes) never imports
torch: the model's fields come from :func:`pipeline.models.meta.load_model_meta`, its network from the checked
ONNX export (:func:`pipeline.models.runtimes.load_session`), decoding and resizing from OpenCV
(:mod:`pipeline.io.images`), normalisation, softmax and top-k from numpy. :class:`LeanPredictor` has the
attributes and methods of :class:`pipeline.inference.predictor.Predictor` that the streaming pipeline and the
HTTP API use, on numpy arrays. Its rows equal the torch runtime's within the runtime's tolerance
(``tests/test_lean.py``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.models.meta import UNKNOWN, ModelMeta, OpenSetMeta, load_model_meta
from pipeline.models.runtimes import RuntimeSession, check_runtime_name, default_threads, load_session
from pipeline.records import Item, ItemResult
from pipeline.settings import check_device

if TYPE_CHECKING:
    from pipeline.io.storage import ObjectReader
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

TOP_K = 5
NON_FINITE = "the model gave NaN or infinite outputs for this image"
GPU_DECODE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class PredictorOptions:
    """How a :class:`~pipeline.inference.predictor.Predictor` or a :class:`LeanPredictor` runs its model. Frozen and
    hashable: a cache of predictors can key on it.

    Attributes:
        device: ``auto``, ``cpu`` or ``cuda``.
        review_threshold: confidence (0..1) below which rows get ``needs_review``; None uses the model
            file's own threshold.
        runtime: what runs the network: ``torch``, or ``onnxruntime`` / ``openvino`` (the network exported to
            ONNX once per model version, checked against PyTorch's recorded outputs, run without torch by a
            :class:`LeanPredictor`; :mod:`pipeline.models.runtimes`). Those two run on the CPU: with them
            ``auto`` means ``cpu``, and ``cuda`` is refused.
        runtime_cache_dir: folder of the ONNX exports (None: ``~/.cache/invsort/onnx``).
        gpu_decode: ``auto``, ``on`` or ``off``: decode JPEGs on the GPU
            (:func:`pipeline.inference.predictor.resolve_decode_backend`); sets
            :attr:`Predictor.decode_backend`, which :func:`pipeline.inference.streaming.run_pipeline` uses.
        torch_compile: run the network through ``torch.compile`` (runtime ``torch`` only). It is compiled when
            the predictor is made, on a zero batch of ``compile_batch_size`` images, and later batches are
            padded or split to that size so that it compiles once.
        compile_batch_size: see ``torch_compile``; use the pipeline's batch size. On CUDA without
            ``torch_compile``, the size of the zero batch the predictor warms the GPU up with when it is made.
        cpu_streams: on the CPU, how many forward passes run side by side (threads of a pool owned by the
            predictor), each on a micro-batch of ``cpu_microbatch`` images with ``threads // cpu_streams``
            intra-op threads, where ``threads`` is the creating thread's ``torch.get_num_threads()`` (without
            torch: :func:`pipeline.models.runtimes.default_threads`). 0: one stream per thread. Measured with
            mobilenet_v2 at 102x136 (HxW) on 2 cores: 2 streams of 1 thread on micro-batches of 16 gave
            250-430 images/s where 1 stream of 2 threads on 64 gave 150-250: torch's
            intra-op parallelism splits these small feature maps badly, whole micro-batches side by side do not.
        cpu_microbatch: images per forward pass on the CPU (1..4096).
    """

    device: str = "auto"
    review_threshold: float | None = None
    runtime: str = "torch"
    runtime_cache_dir: str | Path | None = None
    gpu_decode: str = "auto"
    torch_compile: bool = False
    compile_batch_size: int = 64
    cpu_streams: int = 0
    cpu_microbatch: int = 16

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictorOptions:
        """The options ``settings`` ask for (``INVSORT_DEVICE``, ``INVSORT_RUNTIME``, ``INVSORT_GPU_DECODE``,
        ``INVSORT_COMPILE`` with ``INVSORT_BATCH_SIZE``, ``INVSORT_CPU_STREAMS``, ...)."""
        return cls(
            device=settings.device,
            review_threshold=settings.review_threshold,
            runtime=settings.runtime,
            runtime_cache_dir=settings.runtime_cache_dir,
            gpu_decode=settings.gpu_decode,
            torch_compile=settings.compile,
            compile_batch_size=settings.batch_size,
            cpu_streams=settings.cpu_streams,
            cpu_microbatch=settings.cpu_microbatch,
        )


def check_runtime_device(opts: PredictorOptions) -> str:
    """The device to resolve: ``opts.device``, with ``auto`` meaning ``cpu`` for the CPU runtimes.

    Raises:
        ConfigError: ``cuda`` or ``torch_compile`` with a runtime other than ``torch``.
    """
    if opts.runtime == "torch":
        return opts.device
    if opts.device.startswith("cuda"):  # cuda and cuda:N
        raise ConfigError(
            f"INVSORT_RUNTIME={opts.runtime} runs on the CPU; with INVSORT_DEVICE={opts.device} "
            "use INVSORT_RUNTIME=torch"
        )
    if opts.torch_compile:
        raise ConfigError(
            f"INVSORT_COMPILE=true compiles the PyTorch network; it needs INVSORT_RUNTIME=torch, not {opts.runtime}"
        )
    return "cpu" if opts.device == "auto" else opts.device


def score_rows(items: list[Item], top_p: list[list[float]], top_i: list[list[int]], unknown: list[bool],
               finite: list[bool], *, class_names: list[str], review_threshold: float, model_name: str,
               model_version: str, job_id: str | None) -> list[ItemResult]:
    """Rows for ``items`` from each one's top-k probabilities and class indices (best first), whether the open-set
    score calls it unknown, and whether its probabilities are all finite.

    A row is ``sorted`` when its confidence reaches ``review_threshold`` and it is not unknown; otherwise
    ``needs_review``, with ``error`` = ``unknown`` (:data:`pipeline.models.openset.UNKNOWN`) when the open-set score
    rejected it. A row whose probabilities are not all finite is ``failed`` with :data:`NON_FINITE`.
    """
    out = []
    for item, ps, ix, unk, ok in zip(items, top_p, top_i, unknown, finite, strict=True):
        if not ok:
            out.append(ItemResult(item_id=item.item_id, image_uri=item.uri, status="failed", error=NON_FINITE,
                                  model_name=model_name, model_version=model_version, job_id=job_id))
            continue
        conf = ps[0]
        out.append(
            ItemResult(
                item_id=item.item_id,
                image_uri=item.uri,
                status="sorted" if conf >= review_threshold and not unk else "needs_review",
                error=UNKNOWN if unk else None,
                category=class_names[ix[0]],
                confidence=conf,
                topk=[[class_names[i], round(p, 6)] for i, p in zip(ix, ps, strict=True)],
                model_name=model_name,
                model_version=model_version,
                job_id=job_id,
            )
        )
    return out


@dataclass(frozen=True)
class CpuDevice:
    """What :attr:`LeanPredictor.device` is: the CPU, named as ``torch.device("cpu")`` is."""

    type: str = "cpu"
    index: int | None = None

    def __str__(self) -> str:
        return self.type


class LeanPredictor:
    """A model file's ONNX export ready for batched inference on the CPU, with numpy only (no torch).

    Owns a thread pool when it runs several CPU streams: :meth:`close` it (or use it as a context manager) when
    done; a closed predictor still predicts, its micro-batches one after another.

    Args:
        meta: the model file's fields (:func:`pipeline.models.meta.load_model_meta`).
        options: how to run it; ``runtime`` must be ``onnxruntime`` or ``openvino``.
        spec: the model file (its export beside it is looked for too, :func:`pipeline.models.runtimes.load_session`).
        reader: reads an ``s3://`` export.

    Raises:
        ConfigError: ``torch`` as the runtime, a CUDA device, ``gpu_decode="on"``, ``torch_compile``, bad
            ``cpu_streams`` / ``cpu_microbatch``, the runtime's package missing, no usable export and no torch to
            make one, or the runtime disagreeing with the recorded PyTorch outputs.
    """

    is_cuda = False
    decode_backend = "opencv"
    static_batch: int | None = None
    model = None

    def __init__(self, meta: ModelMeta, options: PredictorOptions | None = None, *, spec: str | None = None,
                 reader: ObjectReader | None = None):
        opts = options if options is not None else PredictorOptions()
        self.model_file = meta
        self.options = opts
        self.runtime = check_runtime_name(opts.runtime)
        if self.runtime == "torch":
            raise ConfigError("INVSORT_RUNTIME=torch runs the PyTorch network (pipeline.inference.predictor)")
        check_device(check_runtime_device(opts), what="device")
        self.device = CpuDevice()
        if opts.gpu_decode not in GPU_DECODE_MODES:
            raise ConfigError(f"unknown INVSORT_GPU_DECODE {opts.gpu_decode!r}; valid: {', '.join(GPU_DECODE_MODES)}")
        if opts.gpu_decode == "on":
            raise ConfigError("INVSORT_GPU_DECODE=on decodes JPEGs on a CUDA GPU, but inference runs on cpu; "
                              "use auto or off")
        if opts.cpu_streams < 0 or not 1 <= opts.cpu_microbatch <= 4096:
            raise ConfigError(f"cpu_streams must be >= 0 and cpu_microbatch 1..4096, got {opts.cpu_streams}, "
                              f"{opts.cpu_microbatch}")
        budget = default_threads()
        self.cpu_streams = opts.cpu_streams or budget
        self.cpu_microbatch = opts.cpu_microbatch
        self.session: RuntimeSession = load_session(meta, self.runtime, cache_dir=opts.runtime_cache_dir,
                                                    num_threads=max(1, budget // self.cpu_streams), spec=spec,
                                                    reader=reader)
        c = meta.in_chans
        self.mean = np.asarray(meta.mean, dtype=np.float32).reshape(1, c, 1, 1)
        self.std = np.asarray(meta.std, dtype=np.float32).reshape(1, c, 1, 1)
        self.class_names = list(meta.class_names)
        self.k = min(TOP_K, len(self.class_names))
        self.open_set: OpenSetMeta | None = meta.open_set
        self.output_width = meta.output_width
        self.temperature = float(meta.temperature) or 1.0
        self.review_threshold = meta.review_threshold if opts.review_threshold is None else float(opts.review_threshold)
        self._pool: ThreadPoolExecutor | None = None  # last: nothing above can leave it unclosed
        if self.cpu_streams > 1:
            self._pool = ThreadPoolExecutor(self.cpu_streams, thread_name_prefix="invsort-forward")

    def close(self) -> None:
        """Shut the forward-pass threads down, after the passes already started have finished. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> LeanPredictor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model_file.input_size

    def to_model_input(self, batch: np.ndarray) -> np.ndarray:
        """``(N, H, W, C)`` uint8 → ``(N, C, H, W)`` float32 ``(x / 255 - mean) / std``, contiguous (what
        :func:`pipeline.io.images.to_model_input` computes with torch)."""
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
        x /= np.float32(255.0)
        x -= self.mean
        x /= self.std
        return x

    def predict_outputs(self, batch: Any) -> np.ndarray:
        """``(N, H, W, C)`` uint8 (a numpy array, or anything ``np.asarray`` takes) → ``(N, output_width)``
        float32: the logits, then the open-set score column when the model file has one."""
        x = np.asarray(batch)
        if x.shape[0] > self.cpu_microbatch:
            parts = [x[i : i + self.cpu_microbatch] for i in range(0, x.shape[0], self.cpu_microbatch)]
            pool = self._pool
            run = pool.map if pool is not None else map
            return np.concatenate(list(run(self._forward, parts)))
        return self._forward(x)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.logits(self.to_model_input(x)), dtype=np.float32)

    def predict_logits(self, batch: Any) -> np.ndarray:
        """``(N, num_classes)`` float32 logits of a ``(N, H, W, C)`` uint8 batch."""
        return self.predict_outputs(batch)[:, : len(self.class_names)]

    def scored(self, outputs: np.ndarray) -> np.ndarray:
        """Network outputs → softmax of the logits / temperature (float32), the open-set score column kept."""
        k = len(self.class_names)
        z = outputs[:, :k].astype(np.float32) / np.float32(self.temperature)
        with np.errstate(invalid="ignore", over="ignore"):
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            probs = e / e.sum(axis=1, keepdims=True)
        return probs if outputs.shape[1] == k else np.concatenate([probs, outputs[:, k:]], axis=1)

    def predict_scored(self, batch: Any) -> np.ndarray:
        """Class probabilities followed by the open-set score column when the model file has one: what
        :meth:`results` takes (``(N, output_width)`` float32)."""
        return self.scored(self.predict_outputs(batch))

    def predict_probs(self, batch: Any) -> np.ndarray:
        """``(N, num_classes)`` float32 class probabilities, rows summing to 1 (softmax of logits / temperature)."""
        return self.predict_scored(batch)[:, : len(self.class_names)]

    def unknown(self, scored: np.ndarray) -> list[bool]:
        """Per row of ``scored``: whether the open-set score says "none of my categories" (below the model file's
        threshold; a NaN score too). All False without an open-set score."""
        k = len(self.class_names)
        if self.open_set is None or scored.shape[1] <= k:
            return [False] * scored.shape[0]
        with np.errstate(invalid="ignore"):
            return (~(scored[:, k] >= self.open_set.threshold)).tolist()

    def results(self, items: list[Item], probs: Any, job_id: str | None) -> list[ItemResult]:
        """Rows for ``items`` (same order as ``probs``' rows, :meth:`predict_scored`'s output): as
        :meth:`pipeline.inference.predictor.Predictor.results` (:func:`score_rows`)."""
        scored = np.asarray(probs, dtype=np.float32)
        k = len(self.class_names)
        p = scored[:, :k]
        finite = [bool(v) for v in np.asarray(np.isfinite(p).all(axis=1))]
        order = np.argsort(-np.where(np.isnan(p), -np.inf, p), axis=1, kind="stable")[:, : self.k]
        top_p = np.take_along_axis(p, order, axis=1)
        mf = self.model_file
        return score_rows(items, top_p.tolist(), order.tolist(), self.unknown(scored), finite,
                          class_names=self.class_names, review_threshold=self.review_threshold,
                          model_name=mf.name, model_version=mf.version, job_id=job_id)


def load_lean_predictor(spec: str, options: PredictorOptions, *, reader: ObjectReader | None = None
                        ) -> LeanPredictor:
    """A :class:`LeanPredictor` of the model file ``spec``, read without torch.

    Raises:
        FileNotFoundError, PermissionError, OSError: the file cannot be read.
        ModelFileError: the file is not a usable model file.
        ConfigError: as :class:`LeanPredictor`.
    """
    return LeanPredictor(load_model_meta(spec, reader=reader), options, spec=spec, reader=reader)

