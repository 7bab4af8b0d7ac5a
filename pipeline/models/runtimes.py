"""Faster CPU runtimes for inference: the model file's network exported to ONNX, run by ONNX Runtime or OpenVINO.

``INVSORT_RUNTIME`` picks one of :data:`RUNTIMES`; ``torch`` (the default) needs nothing from here. The others
run an ONNX export of the model, made once per model version by a process that has torch and used by processes
that need not have it (``pip install 'invsort[cpu]'``: no torch, 300 MB less per process):

- **Where an export lives.** Beside the model file: ``shoes.pt`` → ``shoes.onnx`` (local, ``s3://`` or the bundled
  model's package folder), written by ``invsort export-onnx MODEL`` or at the end of ``invsort train``; or in the
  cache folder (``INVSORT_RUNTIME_CACHE_DIR``, :func:`default_cache_dir`) as ``<version>.opset<N>.onnx``, written
  on first use by a process that has torch. Each ``.onnx`` has a record beside it, ``<file>.onnx.json``
  (:class:`ExportRecord`): the model version it was exported from and PyTorch's outputs on
  :data:`CHECK_BATCH` fixed inputs (:func:`check_inputs`).
- **Exported and checked with torch.** :func:`export_onnx` exports the network (``torch.onnx.export``), computes
  PyTorch's outputs on the check inputs into the record, and checks the installed runtime against them.
- **Loaded without torch.** :func:`load_session` reads the model file's version from its bytes
  (:func:`pipeline.models.meta.load_model_meta`), takes the export whose record names that version (an export of
  another version is stale: never used), builds the session and checks it against the recorded PyTorch outputs
  on every load (so a runtime upgrade, or a ``.onnx`` that is not the recorded network, is refused before any
  image is sorted). Without a usable export, a process that has torch installed exports one into the cache
  folder; one without torch refuses with a message that says how to make it.

The ONNX graph takes ``(N, C, H, W)`` float32 normalised inputs (a dynamic batch axis, the model file's fixed
``(H, W)``) and returns ``(N, num_classes)`` float32 logits (followed by the open-set score column when the model
file has one, :meth:`pipeline.models.modelfile.ModelFile.build_scoring`). Temperature and softmax stay in the
predictors (:mod:`pipeline.inference`), shared by all runtimes.

These runtimes run on the CPU only; CUDA inference is always PyTorch's. This module imports torch only inside
the functions that export or compute PyTorch's outputs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from pipeline.errors import ConfigError
from pipeline.io.files import atomic_path, atomic_write_text
from pipeline.models.fileversion import resolve_model_path

if TYPE_CHECKING:
    import torch

    from pipeline.io.storage import ObjectReader
    from pipeline.models.meta import ModelMeta
    from pipeline.models.modelfile import ModelFile

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
EXTRA = "onnx"  # making exports: torch's exporter (with the torch extra) and the runtimes
INSTALL_HINT = f"pip install -e '.[{EXTRA}]'"
RUNTIME_EXTRA = "cpu"  # running exports: the runtimes alone, no torch
RUNTIME_HINT = f"pip install -e '.[{RUNTIME_EXTRA}]'"
TORCH_HINT = "pip install -e '.[torch]'"
# 18 is the lowest opset torch 2.14's exporter implements (asking for 17 runs a down-conversion that fails on
# these graphs and leaves 18 anyway); tested with onnxruntime 1.32 and openvino 2026.4.
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORT_BATCH = 2  # example batch the graph is traced with; the batch axis stays dynamic
CHECK_BATCH = 5  # a different size, so the check also proves the batch axis is dynamic
# |runtime - torch| <= ATOL + RTOL * max|torch logit|: float32 kernels summing in another order differ by ~1e-6.
ATOL, RTOL = 1e-3, 1e-3
RECORD_FORMAT = "invsort-onnx/1"
RECORD_SUFFIX = ".json"  # the record of X.onnx is X.onnx.json
CHECK_INPUTS = "splitmix64-uniform-2.5/1"  # names check_inputs' rule in the record

ModelLike: TypeAlias = "ModelFile | ModelMeta"  # a loaded model file, or its fields read without torch


@dataclass(frozen=True)
class EquivalenceCheck:
    """Runtime vs PyTorch logits on ``n`` fixed normalised inputs."""

    n: int
    max_abs_diff: float
    tolerance: float
    top1_agree: int  # rows whose arg-max is the same


@dataclass
class ExportRecord:
    """The ``.onnx.json`` beside an export: what it was exported from and PyTorch's outputs to check it by.

    ``reference`` is PyTorch's ``(CHECK_BATCH, output_width)`` output on :func:`check_inputs` ``(CHECK_BATCH,
    *input_shape)``; ``checked`` maps each runtime checked at export time to its version.
    """

    model_version: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    output_width: int
    reference: list[list[float]]
    model_name: str = ""
    arch: str = ""
    opset: int = OPSET
    exported_at: str = ""
    exported_with: dict[str, str] = field(default_factory=dict)
    checked: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as JSON text: one field a line, one reference row a line."""
        body = {"format": RECORD_FORMAT, "check_inputs": CHECK_INPUTS, **dataclasses.asdict(self)}
        body["input_shape"] = list(self.input_shape)
        reference = body.pop("reference")
        head = json.dumps(body, indent=1)[: -len("\n}")]
        rows = ",\n  ".join(json.dumps(row) for row in reference)
        return f'{head},\n "reference": [\n  {rows}\n ]\n}}\n'

    @classmethod
    def from_json(cls, text: str) -> ExportRecord:
        """Raises: ValueError (JSON errors included), KeyError, TypeError: not a record this version reads."""
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT or obj.get("check_inputs") != CHECK_INPUTS:
            raise ValueError(f"not an {RECORD_FORMAT} record")
        shape = [int(x) for x in obj["input_shape"]]
        if len(shape) != 3:
            raise ValueError(f"input_shape {shape}")
        return cls(model_version=str(obj["model_version"]), input_shape=(shape[0], shape[1], shape[2]),
                   output_width=int(obj["output_width"]),
                   reference=[[float(v) for v in row] for row in obj["reference"]],
                   model_name=str(obj.get("model_name", "")), arch=str(obj.get("arch", "")),
                   opset=int(obj.get("opset", OPSET)), exported_at=str(obj.get("exported_at", "")),
                   exported_with={str(k): str(v) for k, v in dict(obj.get("exported_with", {})).items()},
                   checked={str(k): str(v) for k, v in dict(obj.get("checked", {})).items()})


class RuntimeSession:
    """A compiled network: :meth:`logits` maps ``(N, C, H, W)`` float32 to ``(N, num_classes)`` float32.

    ``exported`` is True when the load that made it wrote the ONNX file (False: an export made before);
    ``check`` is its equivalence check against PyTorch's outputs; ``record`` the export's record.
    :func:`load_session` sets them.
    """

    runtime = ""

    def __init__(self, path: Path, *, num_threads: int):
        self.onnx_path = path
        self.num_threads = num_threads
        self.exported = False
        self.check: EquivalenceCheck | None = None
        self.record: ExportRecord | None = None

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


def _version(model: ModelLike) -> str:
    """The model's version: recomputed from the weights of a :class:`ModelFile` (whose weights a caller may have
    changed since it was loaded), the one read with the fields of a :class:`ModelMeta`."""
    if hasattr(model, "state_dict"):
        from pipeline.models.modelfile import model_version

        return model_version(model)  # type: ignore[arg-type]
    return model.version


def onnx_path(model: ModelLike, cache_dir: str | Path | None = None) -> Path:
    """Where the cached export of ``model`` lives: ``<cache_dir>/<version>.opset<OPSET>.onnx``."""
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"{_version(model)}.opset{OPSET}.onnx"


def beside_path(spec: str) -> str:
    """The export beside the model file ``spec`` names: its path or ``s3://`` URI with ``.onnx`` for its suffix
    (``bundled:NAME``: beside the packaged file)."""
    path = resolve_model_path(spec)
    head, _, name = path.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    return f"{head}/{stem}.onnx" if head else f"{stem}.onnx"


def record_path(onnx: str | Path) -> str:
    """The record of the export ``onnx`` (a path or an ``s3://`` URI): ``onnx`` + ``.json``."""
    return f"{onnx}{RECORD_SUFFIX}"


def _require(module: str, runtime: str, *, extra: str = EXTRA) -> ModuleType:
    """``import module``; a :class:`ConfigError` that names the extra to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"INVSORT_RUNTIME={runtime} needs the {extra!r} extra: pip install -e '.[{extra}]' ({exc})"
        ) from None


def require_torch(what: str) -> None:
    """Raises: ConfigError naming the ``torch`` extra (and the lean alternative) when torch is not installed."""
    if not _installed("torch"):
        raise ConfigError(f"{what} needs PyTorch, which is not installed here: {TORCH_HINT}; or run the model's ONNX "
                          f"export without torch: INVSORT_RUNTIME=onnxruntime or openvino ({RUNTIME_HINT})")


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a module set to None in ``sys.modules`` cannot)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_threads: int | None = None  # set_default_threads


def set_default_threads(n: int | None) -> None:
    """Make ``n`` the inference threads of a process without torch (the worker gives each pool process its share
    of the cores: :func:`pipeline.sorting.configure_torch_threads`); None: the CPU count."""
    global _threads
    _threads = n


def default_threads() -> int:
    """Inference threads when none are given: torch's intra-op count where torch is already imported (the worker
    splits it between its processes), else :func:`set_default_threads`' count, else the CPU count."""
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        return int(torch_module.get_num_threads())
    return _threads or os.cpu_count() or 1


def check_inputs(n: int, chans: int, h: int, w: int) -> np.ndarray:
    """``(n, chans, h, w)`` float32 inputs for the equivalence check, the same on every machine without a random
    generator: splitmix64 of each element's index (integer arithmetic, exact), mapped to uniform [-2.5, 2.5),
    the range of normalised photos."""
    with np.errstate(over="ignore"):
        z = np.arange(n * chans * h * w, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return ((u - 0.5) * 5.0).astype(np.float32).reshape(n, chans, h, w)


def compare_outputs(ref: np.ndarray, got: np.ndarray, model: ModelLike, runtime: str, where: str | Path
                    ) -> EquivalenceCheck:
    """Check a runtime's outputs ``got`` against PyTorch's ``ref`` on the same inputs.

    Raises:
        ConfigError: another shape; the largest logit difference exceeds ``ATOL + RTOL * max|logit|``; the top-1
            class differs on an input where PyTorch's top two are further apart than that tolerance; or the
            open-set score column differs by more than its own tolerance.
    """
    name = model.name or model.arch
    if got.shape != ref.shape:
        raise ConfigError(
            f"INVSORT_RUNTIME={runtime}: {where} gives logits of shape {got.shape}, PyTorch {ref.shape}; "
            "delete the file or use INVSORT_RUNTIME=torch"
        )
    k = model.num_classes
    if ref.shape[1] > k:  # the open-set score column (pipeline.models.openset): its own relative tolerance
        score_diff = float(np.abs(got[:, k:] - ref[:, k:]).max())
        if not np.isfinite(score_diff) or score_diff > ATOL + RTOL * float(np.abs(ref[:, k:]).max()):
            raise ConfigError(
                f"INVSORT_RUNTIME={runtime} disagrees with PyTorch on {name}'s open-set score: max difference "
                f"{score_diff:.3g}; use INVSORT_RUNTIME=torch"
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
            f"INVSORT_RUNTIME={runtime} disagrees with PyTorch on {name}: max |logit difference| {diff:.3g} "
            f"(tolerance {tol:.3g}), same top-1 on {check.top1_agree}/{check.n} check inputs; "
            "use INVSORT_RUNTIME=torch"
        )
    return check


def _check_array(model: ModelLike) -> np.ndarray:
    h, w = model.input_size
    return check_inputs(CHECK_BATCH, model.in_chans, h, w)


def reference_outputs(network: torch.nn.Module, model: ModelLike) -> np.ndarray:
    """PyTorch's ``(CHECK_BATCH, output_width)`` float32 outputs of ``network`` on :func:`check_inputs`."""
    import torch

    with torch.inference_mode():
        return network.eval()(torch.from_numpy(_check_array(model))).float().numpy()


def check_equivalence(network: torch.nn.Module, session: RuntimeSession, model: ModelLike) -> EquivalenceCheck:
    """Compare ``session``'s outputs with the PyTorch ``network``'s on the check inputs (:func:`compare_outputs`).

    Raises:
        ConfigError: they disagree.
    """
    return compare_outputs(reference_outputs(network, model), session.logits(_check_array(model)), model,
                           session.runtime, session.onnx_path)


def _session_check(session: RuntimeSession, record: ExportRecord, model: ModelLike) -> EquivalenceCheck:
    """:func:`compare_outputs` of ``session`` on the check inputs against the PyTorch outputs in ``record``."""
    ref = np.asarray(record.reference, dtype=np.float32)
    return compare_outputs(ref, session.logits(_check_array(model)), model, session.runtime, session.onnx_path)


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


def _new_record(model_file: ModelFile, reference: np.ndarray) -> ExportRecord:
    h, w = model_file.input_size
    return ExportRecord(
        model_version=_version(model_file), input_shape=(model_file.in_chans, h, w),
        output_width=model_file.output_width, reference=reference.astype(np.float32).tolist(),
        model_name=model_file.name, arch=model_file.arch,
        exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        exported_with={p: _package_version(p) for p in ("torch", "onnx", "onnxscript")},
    )


def export_onnx(model_file: ModelFile, path: str | Path, *, runtime: str = "onnxruntime") -> Path:
    """Export ``model_file``'s network to ONNX at ``path`` with its record (``path`` + ``.json``, PyTorch's
    outputs on the check inputs), both written atomically (concurrent workers are safe); then check an installed
    runtime (``runtime`` if it is one, else ONNX Runtime or OpenVINO) against those outputs.

    Args:
        model_file: the model to export (its weights, ``in_chans`` and ``input_size`` (H, W)).
        path: the ``.onnx`` file to write; its folder is created.
        runtime: the runtime to check with first; also named in error messages.

    Returns:
        ``path``.

    Raises:
        ConfigError: ``onnx``/``onnxscript`` are not installed, the network cannot be exported, or the runtime
            disagrees with PyTorch (then neither file is left).
    """
    _require("onnx", runtime)
    _require("onnxscript", runtime)  # torch's ONNX exporter (dynamo=True) is built on it
    import torch

    network = model_file.build_scoring()  # logits, plus the open-set score column when the file has one
    h, w = model_file.input_size
    example = torch.zeros(EXPORT_BATCH, model_file.in_chans, h, w)
    batch = torch.export.Dim("batch", min=1, max=65536)
    start = time.perf_counter()
    try:
        with atomic_path(path) as tmp, _quiet_exporter_logs():
            # external_data=False: one self-contained file (ONNX's 2 GB limit is far above the registry's models)
            torch.onnx.export(
                network, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=OPSET, dynamo=True, dynamic_shapes=({0: batch},), external_data=False, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "this network does not export"
        raise ConfigError(
            f"INVSORT_RUNTIME={runtime}: cannot export {model_file.name or model_file.arch} ({model_file.arch}) "
            f"to ONNX: {type(exc).__name__}: {exc}"[:800] + "; use INVSORT_RUNTIME=torch"
        ) from None
    record = _new_record(model_file, reference_outputs(network, model_file))
    checker = next((r for r in (runtime, *_SESSIONS) if r in _SESSIONS and _installed(r)), None)
    if checker is not None:
        try:
            _session_check(_SESSIONS[checker](Path(path), num_threads=default_threads()), record, model_file)
        except Exception:
            Path(path).unlink(missing_ok=True)
            raise
        record.checked[checker] = _package_version(checker)
    atomic_write_text(record_path(path), record.to_json())
    log.info("exported %s (%s) to %s in %.1f s%s", model_file.name, model_file.arch, path,
             time.perf_counter() - start, f", checked with {checker}" if checker else "")
    return Path(path)


class OnnxRuntimeSession(RuntimeSession):
    """An ONNX Runtime CPU session: ``num_threads`` intra-op threads, every graph optimisation."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, *, num_threads: int):
        ort = _require("onnxruntime", self.runtime, extra=RUNTIME_EXTRA)
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
        ov = _require("openvino", self.runtime, extra=RUNTIME_EXTRA)
        props = _require("openvino.properties", self.runtime, extra=RUNTIME_EXTRA)
        hints = _require("openvino.properties.hint", self.runtime, extra=RUNTIME_EXTRA)
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


def _read(location: str, reader: ObjectReader | None) -> bytes:
    """The bytes of a local file or an ``s3://`` object. Raises FileNotFoundError, OSError."""
    if location.startswith("s3://"):
        if reader is None:
            from pipeline.io.storage import make_reader

            reader = make_reader()
        return reader.read(location)
    return Path(location).read_bytes()


def _usable_record(location: str, model: ModelLike, reader: ObjectReader | None) -> tuple[ExportRecord | None, str]:
    """``(record, "")`` when the export at ``location`` was made from ``model``'s version and shapes, else
    ``(None, why not)``."""
    try:
        record = ExportRecord.from_json(_read(record_path(location), reader).decode("utf-8"))
    except FileNotFoundError:
        exists = not location.startswith("s3://") and Path(location).is_file()
        return None, f"{location} has no record {record_path(location)}" if exists else f"none at {location}"
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSON errors are ValueErrors
        return None, f"{record_path(location)} is damaged ({type(exc).__name__}: {exc})"[:300]
    h, w = model.input_size
    if record.model_version != _version(model):
        return None, f"{location} is stale: exported from version {record.model_version}"
    if record.input_shape != (model.in_chans, h, w) or record.output_width != model.output_width:
        return None, f"{location} is for inputs {record.input_shape} and {record.output_width} outputs"
    return record, ""


def _local_copy(location: str, record: ExportRecord, model: ModelLike, cache_dir: str | Path | None,
                reader: ObjectReader | None) -> Path:
    """A local path of the export at ``location``: itself, or for ``s3://`` its copy in the cache folder."""
    if not location.startswith("s3://"):
        return Path(location)
    path = onnx_path(model, cache_dir)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(_read(location, reader))
    atomic_write_text(record_path(path), record.to_json())
    return path


def _recorded_session(model: ModelLike, runtime: str, threads: int, spec: str | None,
                      cache_dir: str | Path | None, reader: ObjectReader | None
                      ) -> tuple[RuntimeSession | None, list[str]]:
    """A session on the first export of ``model``'s version (the cache folder's, and the one beside the model
    file; an ``s3://`` one is copied into the cache first), checked against its record; ``(None, why not for
    each)`` when none is usable.

    Raises:
        ConfigError: the runtime disagrees with the recorded PyTorch outputs.
    """
    cached = str(onnx_path(model, cache_dir))
    beside = [beside_path(spec)] if spec is not None else []
    locations = [cached, *beside] if spec is not None and resolve_model_path(spec).startswith("s3://") else [
        *beside, cached]
    problems: list[str] = []
    for location in locations:
        record, why = _usable_record(location, model, reader)
        if record is None:
            problems.append(why)
            continue
        try:
            path = _local_copy(location, record, model, cache_dir, reader)
        except FileNotFoundError:  # a record on S3 without its .onnx
            problems.append(f"none at {location}")
            continue
        try:
            session = _SESSIONS[runtime](path, num_threads=threads)
        except Exception as exc:  # a damaged file: another export, or a new one, may do
            problems.append(f"{path} does not load ({type(exc).__name__}: {exc})"[:300])
            continue
        session.check, session.record = _session_check(session, record, model), record
        return session, problems
    return None, problems


def missing_export_message(model: ModelLike, runtime: str, spec: str | None, problems: list[str]) -> str:
    """Why ``runtime`` cannot run ``model`` without torch, and how to make the export it needs."""
    name = spec or model.name
    return (f"INVSORT_RUNTIME={runtime} runs the ONNX export of model file {name} (version {model.version}) and "
            f"finds none made from this version ({'; '.join(problems) or 'none found'}), and torch is not installed "
            f"here to make it: run 'invsort export-onnx {name}' where torch is installed ('invsort train' writes it "
            "beside the model file it saves) and put the .onnx and its .onnx.json beside the model file, or use "
            "INVSORT_RUNTIME=torch")


def load_session(
    model: ModelLike, runtime: str, *, cache_dir: str | Path | None = None, num_threads: int | None = None,
    spec: str | None = None, reader: ObjectReader | None = None,
) -> RuntimeSession:
    """A checked inference session of ``model``'s network on ``runtime``.

    Args:
        model: a loaded :class:`~pipeline.models.modelfile.ModelFile`, or the :class:`~pipeline.models.meta.ModelMeta`
            of a model file read without torch (then ``spec`` names the file).
        runtime: ``onnxruntime`` or ``openvino``.
        cache_dir: folder of the cached exports (``None``: :func:`default_cache_dir`).
        num_threads: inference threads (``None``: :func:`default_threads`).
        spec: the model file (path, ``s3://`` URI or ``bundled:NAME``): its export beside it is looked for too.
        reader: reads ``s3://`` exports (None: one for the process's settings).

    Returns:
        The session, with ``exported`` (whether this call wrote the ONNX file), ``record`` and ``check`` (against
        the recorded PyTorch outputs, on every load) set. With a usable export, torch is not imported.

    Raises:
        ConfigError: unknown runtime, its package missing (the message names the extra to install), no usable
            export and no torch to make one (the message says how), the network cannot be exported, or the
            runtime disagrees with PyTorch.
    """
    check_runtime_name(runtime)
    if runtime not in _SESSIONS:
        raise ConfigError(f"INVSORT_RUNTIME={runtime} needs no ONNX session; valid here: {', '.join(_SESSIONS)}")
    _require(runtime, runtime, extra=RUNTIME_EXTRA)  # fail on a missing package before any export
    threads = num_threads or default_threads()
    session, problems = _recorded_session(model, runtime, threads, spec, cache_dir, reader)
    if session is not None:
        log.info("%s session on %s (%d threads): max |logit diff| vs torch's recorded outputs %.2g",
                 runtime, session.onnx_path, threads, session.check.max_abs_diff if session.check else float("nan"))
        return session
    if not hasattr(model, "state_dict"):  # read without torch: make the export with torch, if it is here
        if spec is None or not _installed("torch"):
            raise ConfigError(missing_export_message(model, runtime, spec, problems))
        from pipeline.models.modelfile import load_model_file

        log.warning("no usable ONNX export of %s version %s (%s): exporting it with torch into the cache folder; "
                    "'invsort export-onnx %s' makes one beside the model file, so later starts need no torch",
                    spec, model.version, "; ".join(problems), spec)
        loaded = load_model_file(spec, reader=reader)
        if loaded.version != model.version:  # replaced since its fields were read: the caller loads it again
            raise ConfigError(f"model file {spec} changed while it was loaded (version {model.version}, now "
                              f"{loaded.version}); try again")
        model = loaded
    return _export_and_load(model, runtime, threads, cache_dir)  # type: ignore[arg-type]


def _export_and_load(model_file: ModelFile, runtime: str, threads: int, cache_dir: str | Path | None
                     ) -> RuntimeSession:
    """With torch: a session on the cached export of ``model_file``, exported (or checked against the PyTorch
    network and recorded, for a cached file without a usable record) first.

    Raises:
        ConfigError: the network cannot be exported, or the runtime disagrees with PyTorch.
    """
    cls = _SESSIONS[runtime]
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
    record, _ = _usable_record(str(path), model_file, None)
    if record is None:  # a file from before records (or copied without one): check it against torch, record it
        network = model_file.build_scoring()
        record = _new_record(model_file, reference_outputs(network, model_file))
        _session_check(session, record, model_file)
        record.checked[runtime] = _package_version(runtime)
        atomic_write_text(record_path(path), record.to_json())
    session.exported, session.record = exported, record
    session.check = check = _session_check(session, record, model_file)
    log.info("%s session on %s (%s, %d threads): max |logit diff| vs torch %.2g, top-1 %d/%d", runtime, path.name,
             "exported" if exported else "cached", threads, check.max_abs_diff, check.top1_agree, check.n)
    return session


def export_model_file(spec: str, out: str | Path | None = None, *, runtime: str = "onnxruntime",
                      reader: ObjectReader | None = None) -> tuple[Path, ExportRecord]:
    """``invsort export-onnx``: export the model file ``spec`` (needs torch) to ``out``, by default beside it (a
    local file or the bundled model; for an ``s3://`` model, ``out`` is required: upload the two files beside it).

    Returns:
        ``(the .onnx written, its record)``; the record is ``out`` + ``.json``.

    Raises:
        ConfigError: no ``out`` for an ``s3://`` model, or :func:`export_onnx`'s errors.
        FileNotFoundError, ModelFileError: the model file is missing or not usable.
    """
    from pipeline.models.modelfile import load_model_file

    if out is None and resolve_model_path(spec).startswith("s3://"):
        raise ConfigError(f"{spec} is on S3: give --out FILE.onnx, then upload FILE.onnx and FILE.onnx.json as "
                          f"{beside_path(spec)} and {record_path(beside_path(spec))}")
    model_file = load_model_file(spec, reader=reader)
    path = export_onnx(model_file, Path(out) if out is not None else Path(beside_path(spec)), runtime=runtime)
    record, why = _usable_record(str(path), model_file, None)
    if record is None:
        raise ConfigError(f"export of {spec} to {path} left no usable record: {why}")
    return path, record


def export_beside(model_file: ModelFile, out: str | Path, log_fn: Callable[[str], None] = log.info) -> Path | None:
    """At the end of ``invsort train``: export the model file just saved at ``out`` to ONNX beside it
    (:func:`export_onnx`), so that processes without torch can run it. Without the ``onnx`` extra, or when the
    network does not export, says so through ``log_fn`` (with the command that makes it later) and returns None.
    """
    target = Path(beside_path(str(out)))
    missing = [m for m in ("onnx", "onnxscript") if not _installed(m)]
    if missing:
        log_fn(f"no ONNX export written ({', '.join(missing)} not installed): for INVSORT_RUNTIME=onnxruntime or "
               f"openvino run 'invsort export-onnx {out}' where {INSTALL_HINT} is installed")
        return None
    try:
        path = export_onnx(model_file, target)
    except ConfigError as exc:
        log_fn(f"no ONNX export written: {exc}")
        return None
    log_fn(f"ONNX export {path} (for INVSORT_RUNTIME=onnxruntime / openvino, no torch needed), record {path}.json")
    return path
