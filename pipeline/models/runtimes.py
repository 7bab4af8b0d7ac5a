"""Faster CPU runtimes for inference: the model file's network exported to ONNX, run by ONNX Runtime or OpenVINO.

``INVSORT_RUNTIME`` picks one of :data:`RUNTIMES`; ``torch`` (the default) needs nothing from here. For the
others, :func:`load_session` exports the network once per model version to
``<cache dir>/<version>.opset<N>.onnx`` (the version is recomputed from the weights with
:func:`pipeline.models.modelfile.model_version`, so a file is never matched to another model's export), builds an
inference session on it, and checks it against the PyTorch network on a small random batch before any image
is sorted: a runtime that disagrees is refused.

The ONNX graph takes what :func:`pipeline.io.images.to_model_input` makes, as a contiguous ``(N, C, H, W)``
float32 array with a dynamic batch axis and the model file's fixed ``(H, W)``, and returns ``(N, num_classes)``
float32 logits (followed by the open-set score column when the model file has one,
:meth:`pipeline.models.modelfile.ModelFile.build_scoring`). Temperature and softmax stay in
:class:`pipeline.inference.predictor.Predictor`, shared by all runtimes.

These runtimes run on the CPU only; CUDA inference is always PyTorch's (see ``Predictor``).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.io.files import atomic_path
from pipeline.models.modelfile import ModelFile, model_version

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
EXTRA = "onnx"
INSTALL_HINT = f"pip install -e '.[{EXTRA}]'"
# 18 is the lowest opset torch 2.14's exporter implements (asking for 17 runs a down-conversion that fails on
# these graphs and leaves 18 anyway); tested with onnxruntime 1.32 and openvino 2026.4.
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORT_BATCH = 2  # example batch the graph is traced with; the batch axis stays dynamic
CHECK_BATCH = 5  # a different size, so the check also proves the batch axis is dynamic
# |runtime - torch| <= ATOL + RTOL * max|torch logit|: float32 kernels summing in another order differ by ~1e-6.
ATOL, RTOL = 1e-3, 1e-3


@dataclass(frozen=True)
class EquivalenceCheck:
    """Runtime vs PyTorch logits on ``n`` random normalised inputs."""

    n: int
    max_abs_diff: float
    tolerance: float
    top1_agree: int  # rows whose arg-max is the same


class RuntimeSession:
    """A compiled network: :meth:`logits` maps ``(N, C, H, W)`` float32 to ``(N, num_classes)`` float32.

    ``exported`` is True when the load that made it wrote the ONNX file (False: it came from the cache);
    ``check`` is its equivalence check against PyTorch. :func:`load_session` sets both.
    """

    runtime = ""

    def __init__(self, path: Path, *, num_threads: int):
        self.onnx_path = path
        self.num_threads = num_threads
        self.exported = False
        self.check: EquivalenceCheck | None = None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` float32 (normalised, any memory layout) → ``(N, num_classes)`` float32 logits."""
        raise NotImplementedError


def check_runtime_name(name: str) -> str:
    """``name`` if it is one of :data:`RUNTIMES`.

    Raises:
        ConfigError: any other name; the message lists the valid ones.
    """
    if name not in RUNTIMES:
        raise ConfigError(f"INVSORT_RUNTIME: unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}")
    return name


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/invsort/onnx``, or ``~/.cache/invsort/onnx``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "invsort" / "onnx"


def onnx_path(model_file: ModelFile, cache_dir: str | Path | None = None) -> Path:
    """Where the export of ``model_file`` lives: ``<cache_dir>/<version>.opset<OPSET>.onnx``."""
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"{model_version(model_file)}.opset{OPSET}.onnx"


def _require(module: str, runtime: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"INVSORT_RUNTIME={runtime} needs the {EXTRA!r} extra: {INSTALL_HINT} ({exc})"
        ) from None


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO: keep them out of ``invsort -v``'s output."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model_file: ModelFile, path: str | Path, *, runtime: str = "onnxruntime") -> Path:
    """Export ``model_file``'s network to ONNX at ``path`` (written atomically: concurrent workers are safe).

    Args:
        model_file: the model to export (its weights, ``in_chans`` and ``input_size`` (H, W)).
        path: the ``.onnx`` file to write; its folder is created.
        runtime: only named in error messages.

    Returns:
        ``path``.

    Raises:
        ConfigError: ``onnx``/``onnxscript`` are not installed, or the network cannot be exported.
    """
    _require("onnx", runtime)
    _require("onnxscript", runtime)  # torch's ONNX exporter (dynamo=True) is built on it
    model = model_file.build_scoring()  # logits, plus the open-set score column when the file has one
    h, w = model_file.input_size
    example = torch.zeros(EXPORT_BATCH, model_file.in_chans, h, w)
    batch = torch.export.Dim("batch", min=1, max=65536)
    start = time.perf_counter()
    try:
        with atomic_path(path) as tmp, _quiet_exporter_logs():
            # external_data=False: one self-contained file (ONNX's 2 GB limit is far above the registry's models)
            torch.onnx.export(
                model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=OPSET, dynamo=True, dynamic_shapes=({0: batch},), external_data=False, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "this network does not export"
        raise ConfigError(
            f"INVSORT_RUNTIME={runtime}: cannot export {model_file.name or model_file.arch} ({model_file.arch}) "
            f"to ONNX: {type(exc).__name__}: {exc}"[:800] + "; use INVSORT_RUNTIME=torch"
        ) from None
    log.info("exported %s (%s) to %s in %.1f s", model_file.name, model_file.arch, path, time.perf_counter() - start)
    return Path(path)


class OnnxRuntimeSession(RuntimeSession):
    """An ONNX Runtime CPU session: ``num_threads`` intra-op threads, every graph optimisation."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, *, num_threads: int):
        ort = _require("onnxruntime", self.runtime)
        so = ort.SessionOptions()
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle inference threads sleep instead of spinning: the decode threads need those cores meanwhile.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3  # errors only
        super().__init__(path, num_threads=num_threads)
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` float32 → ``(N, num_classes)`` float32 logits. Thread-safe."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


class OpenVinoSession(RuntimeSession):
    """An OpenVINO model compiled for the CPU: latency hint (one batch at a time), ``num_threads`` threads,
    float32 precision (OpenVINO would pick bfloat16 on CPUs with AMX/AVX-512 BF16, which moves logits by ~1e-2).
    """

    runtime = "openvino"

    def __init__(self, path: Path, *, num_threads: int):
        ov = _require("openvino", self.runtime)
        props = _require("openvino.properties", self.runtime)
        hints = _require("openvino.properties.hint", self.runtime)
        config = {
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: num_threads,
            hints.inference_precision: ov.Type.f32,
        }
        super().__init__(path, num_threads=num_threads)
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self._local = threading.local()  # an infer request is not thread-safe: one per thread

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` float32 → ``(N, num_classes)`` float32 logits. Thread-safe."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(result[0], dtype=np.float32, copy=True)


_SESSIONS: dict[str, type[RuntimeSession]] = {
    "onnxruntime": OnnxRuntimeSession,
    "openvino": OpenVinoSession,
}


def check_equivalence(model: torch.nn.Module, session: RuntimeSession, model_file: ModelFile) -> EquivalenceCheck:
    """Compare ``session``'s logits with the PyTorch ``model``'s on :data:`CHECK_BATCH` random normalised inputs.

    Raises:
        ConfigError: the largest logit difference exceeds ``ATOL + RTOL * max|logit|``, or the top-1 class
            differs on an input where PyTorch's top two are further apart than that tolerance.
    """
    h, w = model_file.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_BATCH, model_file.in_chans, h, w, generator=gen)
    with torch.inference_mode():
        ref = model.eval()(x).float().numpy()
    got = session.logits(x.numpy())
    if got.shape != ref.shape:
        raise ConfigError(
            f"INVSORT_RUNTIME={session.runtime}: {session.onnx_path} gives logits of shape {got.shape}, "
            f"PyTorch {ref.shape}; delete the file or use INVSORT_RUNTIME=torch"
        )
    k = model_file.num_classes
    if ref.shape[1] > k:  # the open-set score column (pipeline.models.openset): its own relative tolerance
        score_diff = float(np.abs(got[:, k:] - ref[:, k:]).max())
        if not np.isfinite(score_diff) or score_diff > ATOL + RTOL * float(np.abs(ref[:, k:]).max()):
            raise ConfigError(
                f"INVSORT_RUNTIME={session.runtime} disagrees with PyTorch on {model_file.name or model_file.arch}'s "
                f"open-set score: max difference {score_diff:.3g}; use INVSORT_RUNTIME=torch"
            )
        got, ref = got[:, :k], ref[:, :k]
    diff = float(np.abs(got - ref).max())
    tol = ATOL + RTOL * float(np.abs(ref).max())
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol  # rows whose top-1 a within-tolerance wobble cannot flip
    same = ref.argmax(axis=1) == got.argmax(axis=1)
    check = EquivalenceCheck(n=len(ref), max_abs_diff=diff, tolerance=tol, top1_agree=int(same.sum()))
    if not np.isfinite(diff) or diff > tol or not same[clear].all():
        raise ConfigError(
            f"INVSORT_RUNTIME={session.runtime} disagrees with PyTorch on {model_file.name or model_file.arch}: "
            f"max |logit difference| {diff:.3g} (tolerance {tol:.3g}), same top-1 on {check.top1_agree}/{check.n} "
            "random inputs; use INVSORT_RUNTIME=torch"
        )
    return check


def load_session(
    model_file: ModelFile, runtime: str, *, cache_dir: str | Path | None = None, num_threads: int | None = None
) -> RuntimeSession:
    """A checked inference session of ``model_file``'s network on ``runtime``, exporting it on first use.

    Args:
        model_file: the model.
        runtime: ``onnxruntime`` or ``openvino``.
        cache_dir: folder of the exported ``.onnx`` files (``None``: :func:`default_cache_dir`).
        num_threads: inference threads (``None``: ``torch.get_num_threads()``, which the worker already splits
            between its processes).

    Returns:
        The session, with ``exported`` (whether this call wrote the ONNX file) and ``check`` (the equivalence
        check against PyTorch, run on every load so a runtime upgrade is checked too) set.

    Raises:
        ConfigError: unknown runtime, its package missing (the message names the extra to install), the network
            cannot be exported, or the runtime disagrees with PyTorch.
    """
    check_runtime_name(runtime)
    if runtime not in _SESSIONS:
        raise ConfigError(f"INVSORT_RUNTIME={runtime} needs no ONNX session; valid here: {', '.join(_SESSIONS)}")
    cls = _SESSIONS[runtime]
    _require(runtime, runtime)  # fail on a missing package before minutes of export
    threads = num_threads or torch.get_num_threads()
    path = onnx_path(model_file, cache_dir)
    exported = not path.is_file()
    if exported:
        export_onnx(model_file, path, runtime=runtime)
    try:
        session = cls(path, num_threads=threads)
    except Exception as exc:  # a damaged cache file (a disk full mid-copy, a manual edit): export it again
        if exported:
            raise ConfigError(f"INVSORT_RUNTIME={runtime} cannot load {path}: {exc}"[:800]) from None
        log.warning("cached %s does not load (%s); exporting again", path, exc)
        export_onnx(model_file, path, runtime=runtime)
        exported = True
        session = cls(path, num_threads=threads)
    session.exported = exported
    session.check = check = check_equivalence(model_file.build_scoring(), session, model_file)
    log.info(
        "%s session on %s (%s, %d threads): max |logit diff| vs torch %.2g, top-1 %d/%d",
        runtime, path.name, "exported" if exported else "cached", threads, check.max_abs_diff, check.top1_agree,
        check.n,
    )
    return session
