"""The main job, as plain functions that the CLI and the Celery tasks call.

- :func:`sort_source` — embedded mode: list a source, sort it in this process, write the catalog.
- :func:`sort_batch` — sort a list of items and record them as one batch of a job (a task from before batches
  were stored; stored batches run through :func:`pipeline.jobs.run_batch`).
- :func:`submit_job` — create the job row, commit, then list the source, store its batches and enqueue them.
- :func:`classify_images` — classify photos given as bytes, writing nothing (``invsort classify``, the HTTP API's
  ``POST /v1/classify``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeAlias, cast

from db.catalog import (
    JobStateError,
    StatusCounts,
    complete_job_if_done,
    create_job,
    fail_job,
    finish_listing,
    get_job,
    record_batch,
    upsert_items,
)
from db.jobs import add_batches, task_id_for
from db.models import TERMINAL_JOB_STATUSES
from db.session import session_scope
from pipeline.attributes import AttributeModel, job_models
from pipeline.errors import ConfigError, ModelVersionError, SourceError
from pipeline.inference.lean import PredictorOptions, load_lean_predictor
from pipeline.inference.streaming import Summary, run_pipeline
from pipeline.io.sources import iter_source
from pipeline.io.storage import ObjectReader, TooLargeError, local_path, make_reader
from pipeline.models.fileversion import Fingerprint, model_file_fingerprint
from pipeline.models.meta import CATEGORY
from pipeline.models.runtimes import default_threads, require_torch, set_default_threads
from pipeline.records import Item, ItemResult, printable
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.inference.lean import LeanPredictor
    from pipeline.inference.predictor import Predictor

log = logging.getLogger(__name__)

# INVSORT_RUNTIME=torch: the PyTorch network; onnxruntime / openvino: the model's ONNX export, without torch.
AnyPredictor: TypeAlias = "Predictor | LeanPredictor"
# (model spec, options, inference threads of the loading thread: cpu_streams=0 means one stream per thread)
_PredictorKey = tuple[str, PredictorOptions, int]
_predictors: OrderedDict[_PredictorKey, AnyPredictor] = OrderedDict()
_predictors_lock = threading.Lock()
_fingerprints: dict[_PredictorKey, Fingerprint] = {}  # what the file looked like when each cached one was loaded
MAX_CACHED_PREDICTORS = 4


def get_predictor(settings: Settings, model_spec: str | None = None, *, reader: ObjectReader | None = None,
                  version: str | None = None) -> AnyPredictor:
    """The process's predictor for a model and ``settings``, loaded once and reused by later batches while the
    file behind the spec is unchanged: a :class:`~pipeline.inference.predictor.Predictor` for
    ``INVSORT_RUNTIME=torch``, else a :class:`~pipeline.inference.lean.LeanPredictor`, which runs the model's ONNX
    export and never imports torch (:func:`_load_predictor`).

    Each call checks the file once (:func:`pipeline.models.fileversion.model_file_fingerprint`: ``os.stat`` of a
    local file, one S3 ``HeadObject`` for ``s3://``); a file replaced or rewritten since is loaded again and the
    old predictor dropped. The :data:`MAX_CACHED_PREDICTORS` most recently used are kept; an older one is closed
    when a new one is loaded (a closed predictor still predicts, so a caller that holds one is not broken), and
    all of them at exit.

    Args:
        settings: the model path (when ``model_spec`` is None) and the :class:`PredictorOptions`.
        model_spec: a local path, an ``s3://`` URI or ``bundled:NAME``.
        reader: reads and HEADs ``s3://`` model files (None: a new one for ``settings``; pass one per process or
            task, it holds the S3 client).
        version: the version a job pinned (12 hex chars, :func:`pipeline.models.fileversion.model_file_version`
            at submit); None: any.

    Raises:
        ModelVersionError: ``version`` is given and the file's version, computed from its content as loaded, is
            another; the message names the spec, the pinned version and the file's version now.
        FileNotFoundError, PermissionError, OSError: the file cannot be stat'ed, HEAD'ed or read.
        ModelFileError: the file is not a usable model file.
        ConfigError: ``settings`` ask for something this machine cannot do, or (a CPU runtime) the model has no
            usable ONNX export and torch is not installed to make one.
    """
    spec = model_spec or settings.model_path
    reader = reader or make_reader(settings)
    options = PredictorOptions.from_settings(settings)
    if options.runtime == "torch":
        require_torch("INVSORT_RUNTIME=torch (the default)")
        import torch  # noqa: F401 (before default_threads: its count is torch's once torch is here)
    key = (spec, options, default_threads())
    fingerprint = model_file_fingerprint(spec, reader=reader)  # before the read: a later change reloads again
    with _predictors_lock:
        predictor = _predictors.get(key)
        if predictor is not None and _fingerprints.get(key) == fingerprint:
            _predictors.move_to_end(key)
        else:
            if predictor is not None:
                log.info("model file %s changed since version %s was loaded; loading it again", spec,
                         predictor.model_file.version)
                del _predictors[key]
                predictor.close()
            predictor = _predictors[key] = _load_predictor(spec, options, reader)
            _fingerprints[key] = fingerprint
            mf = predictor.model_file
            log.info("loaded model %s version %s on %s with %s, JPEG decoding with %s", mf.name, mf.version,
                     predictor.device, settings.runtime, predictor.decode_backend)
            while len(_predictors) > MAX_CACHED_PREDICTORS:
                old_key, old = _predictors.popitem(last=False)
                _fingerprints.pop(old_key, None)
                old.close()
    if version is not None and predictor.model_file.version != version:
        raise ModelVersionError(f"model file {spec} has changed since the job was submitted: the job pinned version "
                                f"{version}, the file now has version {predictor.model_file.version}")
    return predictor


def job_predictor(settings: Settings, model_spec: str | None, attribute_models: Sequence[AttributeModel] = (), *,
                  reader: ObjectReader | None = None, version: str | None = None) -> AnyPredictor:
    """The predictor of a job: :func:`get_predictor` of its category model, and with models of other attributes
    (:mod:`pipeline.attributes`) one :class:`~pipeline.inference.attributes.WithAttributes` that runs them all on
    each batch, each model pinned to its version. ``INVSORT_REVIEW_THRESHOLD`` applies to the category model only:
    each attribute model keeps its own calibrated threshold.

    Raises:
        ConfigError: the model ``model_spec`` names predicts another attribute than the category.
        What :func:`get_predictor` raises, for any of the models.
    """
    reader = reader or make_reader(settings)
    primary = get_predictor(settings, model_spec, reader=reader, version=version)
    if primary.model_file.attribute != CATEGORY:
        raise ConfigError(f"no model predicts the category ({model_spec or settings.model_path} predicts "
                          f"'{primary.model_file.attribute}'): a job writes each item's category, so name a model "
                          f"that predicts '{CATEGORY}' too (--model shoes.pt --model toe.pt)")
    if not attribute_models:
        return primary
    from pipeline.inference.attributes import WithAttributes

    own = settings.model_copy(update={"review_threshold": None})
    return cast("AnyPredictor", WithAttributes(primary, [
        (m.attribute, get_predictor(own, m.path, reader=reader, version=m.version)) for m in attribute_models]))


def _load_predictor(spec: str, options: PredictorOptions, reader: ObjectReader) -> AnyPredictor:
    """A new predictor of the model file ``spec``: the PyTorch network for ``options.runtime == "torch"``, else
    its ONNX export run without torch (:func:`pipeline.inference.lean.load_lean_predictor`)."""
    if options.runtime != "torch":
        return load_lean_predictor(spec, options, reader=reader)
    from pipeline.inference.predictor import Predictor
    from pipeline.models.modelfile import load_model_file

    return Predictor(load_model_file(spec, reader=reader), options)


@atexit.register
def close_predictors() -> None:
    """Close and forget every cached predictor (at exit; tests)."""
    with _predictors_lock:
        while _predictors:
            _predictors.popitem()[1].close()


def source_roots(source: str) -> list[Path]:
    """The local directory a command-line source names (it becomes an allowed local root), if any.

    Raises:
        SourceError: a local source that does not exist.
    """
    if "://" in source and not source.startswith("file://"):
        return []  # s3:// (or a scheme iter_source will refuse with the list of valid ones)
    if "\x00" in source:
        raise SourceError(f"source not found: {printable(source)} (a path cannot contain a NUL character)")
    path = local_path(source) if source.startswith("file://") else Path(source)
    path = Path(os.path.realpath(path))
    if path.is_dir():
        return [path]
    if path.is_file():  # a manifest: its folder holds the images it names by relative path
        return [path.parent]
    raise SourceError(f"source not found: {printable(source)}")


@dataclass
class SortOutcome:
    job_id: str
    summary: Summary


class JobEndedError(JobStateError):
    """An embedded job was ended from outside while it ran (``invsort jobs cancel``, the HTTP API's cancel, or a
    server that stopped): it stopped after the batch in progress, whose rows are kept."""


def sort_source(
    source: str,
    *,
    settings: Settings,
    model_spec: str | None = None,
    limit: int | None = None,
    on_progress: Callable[[list[ItemResult]], None] | None = None,
    on_job: Callable[[str], None] | None = None,
    allow_source_root: bool = True,
    items: Iterable[Item] | None = None,
    reader: ObjectReader | None = None,
    more_models: Sequence[str] = (),
) -> SortOutcome:
    """Embedded mode: sort every image of ``source`` in this process into ``settings.database_url``.

    The job is recorded in ``sorting_jobs`` like a queued one, so ``invsort status`` shows it too.
    Each batch's rows and the job's counters are written in one transaction. After each batch the job's status is
    read again: a job cancelled (or failed) meanwhile stops there.

    Args:
        source: a local folder, ``file://DIR``, ``s3://bucket/prefix`` or a manifest.
        on_progress: called with each batch's rows after they are committed.
        on_job: called with the job's id once its row is committed (before any image is read).
        allow_source_root: the local folder ``source`` names (a manifest's folder) may be read even when it is not
            in ``INVSORT_LOCAL_ROOTS`` (the command line); False: only the configured roots (the HTTP API).
        items: the items to sort, listed by the caller (a re-categorisation's catalog rows,
            :mod:`pipeline.recategorize`); ``source`` is then only the job's label and names no folder.
        reader: reads the photos (None: a reader for ``settings``, plus the source's folder).
        more_models: model files of other attributes (or the category model, ``model_spec`` then being one of
            another attribute): each item gets every model's prediction (:mod:`pipeline.attributes`).

    Raises:
        SourceError, FileNotFoundError, PermissionError: the source cannot be listed (a local source that is
            missing or outside the allowed folders: before the job row is made).
        ModelFileError: the model file is not usable.
        ConfigError: the models do not make a job (:func:`pipeline.attributes.job_models`).
        JobEndedError: the job was cancelled or failed from outside while it ran.
    """
    if reader is None:
        roots = source_roots(source) if allow_source_root and items is None else ()
        reader = make_reader(settings, extra_roots=roots)
    attribute_models: list[AttributeModel] = []
    if more_models or settings.attribute_models:
        models = job_models([model_spec or settings.model_path, *more_models], default=settings.model_path,
                            configured=settings.attribute_models, reader=reader)
        model_spec, attribute_models = models.category_spec, models.attributes
    predictor = job_predictor(settings, model_spec, attribute_models, reader=reader)
    mf = predictor.model_file
    url = settings.database_url
    # local checks (roots, existence) happen here
    listed: Iterator[Item] = iter_source(source, reader) if items is None else iter(items)
    if limit is not None:
        listed = islice(listed, limit)
    with session_scope(url) as session:
        job_id = create_job(session=session, source=printable(source), model_path=model_spec or settings.model_path,
                            model_name=mf.name, model_version=mf.version,
                            attribute_models=[m.to_json() for m in attribute_models])
    if on_job:
        on_job(job_id)
    batch_no = 0

    def write(rows: list[ItemResult]) -> None:
        nonlocal batch_no
        with session_scope(url) as session:
            upsert_items(session=session, rows=rows)
            record_batch(session=session, job_id=job_id, batch_no=batch_no, **count_statuses(rows))
            job = get_job(session=session, job_id=job_id)
        batch_no += 1
        if on_progress:
            on_progress(rows)
        if job is not None and job.status in TERMINAL_JOB_STATUSES:
            raise JobEndedError(f"job {job_id} was {job.status} while it ran: it stopped after {job.processed} "
                                "images, whose rows are kept")

    try:
        summary = run_pipeline(
            listed, predictor=predictor, reader=reader, on_batch=write, batch_size=settings.batch_size,
            decode_threads=settings.decode_threads, max_pixels=settings.max_image_pixels, job_id=job_id,
            decode_memory_bytes=settings.decode_memory_bytes,
        )
    except BaseException as exc:
        with session_scope(url) as session:
            fail_job(session=session, job_id=job_id, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    with session_scope(url) as session:
        finish_listing(session=session, job_id=job_id, total_items=summary.images, total_batches=batch_no)
    with session_scope(url) as session:
        complete_job_if_done(session=session, job_id=job_id)
    return SortOutcome(job_id, summary)


def count_statuses(rows: Iterable[ItemResult]) -> StatusCounts:
    """``{"sorted_count": n, "needs_review_count": n, "failed_count": n}`` of ``rows``."""
    c = Counter(r.status for r in rows)
    return StatusCounts(sorted_count=c["sorted"], needs_review_count=c["needs_review"], failed_count=c["failed"])


_HELD = "held:"  # the URIs classify_images gives the photos it holds: held:0, held:1, ...


class _HeldImages:
    """The reader :func:`classify_images` gives :func:`run_pipeline`: photo ``i`` of ``images`` is ``held:i``."""

    def __init__(self, images: Sequence[tuple[str, bytes | IO[bytes]]], max_bytes: int) -> None:
        self.images, self.max_bytes = images, max_bytes

    def read(self, uri: str) -> bytes:
        """The photo's bytes. Raises TooLargeError: more than ``max_bytes`` (``INVSORT_MAX_IMAGE_BYTES``)."""
        data = self.images[int(uri.removeprefix(_HELD))][1]
        if not isinstance(data, bytes):
            data.seek(0)
            data = data.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise TooLargeError(f"file is more than the limit of {self.max_bytes} bytes (INVSORT_MAX_IMAGE_BYTES)")
        return data


def classify_images(
    images: Sequence[tuple[str, bytes | IO[bytes]]],
    *,
    settings: Settings,
    model_spec: str | None = None,
) -> list[ItemResult]:
    """Classify photos the caller holds, in order, writing nothing: ``invsort classify`` and ``POST /v1/classify``.

    Every photo takes the path a sorted one takes (:func:`run_pipeline`): refused above ``settings.max_image_bytes``,
    its header checked against ``settings.max_image_pixels`` before anything is decoded, decoded, resized to the
    model's input, scored in batches of ``settings.batch_size`` by the process's predictor (:func:`get_predictor`,
    the one ``invsort sort`` uses) with the model's review threshold and open-set score. So a photo gets the
    category, confidence and status that ``invsort sort`` gives the same file.

    Args:
        images: ``(name, data)`` pairs; ``data`` is the encoded file: bytes, or a binary file open for reading
            (read from its start, at most ``settings.max_image_bytes + 1`` bytes, in a decode thread).
        settings: the model path (when ``model_spec`` is None), limits, batch size and decode threads.
        model_spec: a local path, an ``s3://`` URI or ``bundled:NAME``.

    Returns:
        One :class:`ItemResult` per photo, in the order given: ``item_id`` and ``image_uri`` are its name;
        ``status`` ``sorted`` or ``needs_review`` with ``category``, ``confidence`` (0..1) and ``topk`` (up to 5
        ``[category, probability]``, best first), or ``failed`` with the reason in ``error`` (an empty file, not an
        image, truncated, too small, too many pixels, too many bytes): a bad photo fails alone. ``job_id`` is None.

    Raises:
        ModelFileError, FileNotFoundError, PermissionError, OSError: the model file is not usable or readable.
        ConfigError: ``settings`` ask for something this machine cannot do.
    """
    if not images:
        return []
    predictor = get_predictor(settings, model_spec)
    items = [Item(item_id=name, uri=f"{_HELD}{i}") for i, (name, _) in enumerate(images)]
    rows: list[ItemResult] = []
    run_pipeline(items, predictor=predictor, reader=_HeldImages(images, settings.max_image_bytes),
                 on_batch=rows.extend, batch_size=settings.batch_size,
                 decode_threads=min(settings.decode_threads, len(images)), max_pixels=settings.max_image_pixels,
                 decode_memory_bytes=settings.decode_memory_bytes)
    for row, item in zip(rows, items, strict=True):
        row.image_uri = item.item_id
    return rows


def sort_batch(
    job_id: str, batch_no: int, items: list[Item], *, settings: Settings, model_spec: str
) -> StatusCounts:
    """One image-batch task: sort ``items``, upsert their rows and record the batch, in one transaction.

    Safe to run twice (a redelivered task): rows are upserted and the batch's counts replace its earlier ones.
    Returns the batch's counts by status.
    """
    reader = make_reader(settings)
    predictor = get_predictor(settings, model_spec, reader=reader)
    all_rows: list[ItemResult] = []

    def collect(rows: list[ItemResult]) -> None:
        all_rows.extend(rows)

    run_pipeline(items, predictor=predictor, reader=reader, on_batch=collect, batch_size=settings.batch_size,
                 decode_threads=settings.decode_threads, max_pixels=settings.max_image_pixels, job_id=job_id,
                 decode_memory_bytes=settings.decode_memory_bytes)
    with session_scope(settings.database_url) as session:
        upsert_items(session=session, rows=all_rows)  # a row the database refuses becomes failed in all_rows
        counts = count_statuses(all_rows)
        record_batch(session=session, job_id=job_id, batch_no=batch_no, **counts)
    with session_scope(settings.database_url) as session:
        complete_job_if_done(session=session, job_id=job_id)
    return counts


#: Batches stored per transaction by :func:`submit_job` before their tasks are enqueued.
SUBMIT_FLUSH_BATCHES = 32


def submit_job(
    source: str,
    *,
    settings: Settings,
    model_spec: str,
    enqueue: Callable[[str, int, str], None],
    limit: int | None = None,
    on_job: Callable[[str], None] | None = None,
    allow_source_root: bool = True,
    items: Iterable[Item] | None = None,
    more_models: Sequence[str] = (),
) -> tuple[str, int, int]:
    """Create the job row and commit it, then list ``source``, store its batches and enqueue their tasks.

    Listing streams: every :data:`SUBMIT_FLUSH_BATCHES` batches of ``settings.items_per_task`` items are stored
    (:func:`db.jobs.add_batches`, ``queued``, with their ids and URIs) and committed, then
    ``enqueue(job_id, batch_no, task_id)`` is called for each: a task names a batch the database holds, and
    a task that the queue loses is found and enqueued again by the reconciler (:mod:`pipeline.jobs`).
    ``on_job(job_id)`` is called once the job row is committed; ``allow_source_root``, ``items`` (the caller's
    own listing, ``source`` then only the job's label) and ``more_models`` as for :func:`sort_source`.
    Returns ``(job_id, total_items, total_batches)``.

    Raises:
        SourceError, FileNotFoundError, PermissionError: the source cannot be listed (a local source that is
            missing or outside the allowed folders: before the job row is made; else the job is marked failed).
        ModelFileError: the model file is not usable (checked before anything is enqueued).
        ConfigError: the models do not make a job (:func:`pipeline.attributes.job_models`).
        JobStateError: the job was cancelled while it was being listed (listing stops).
    """
    roots = source_roots(source) if allow_source_root and items is None else ()
    reader = make_reader(settings, extra_roots=roots)
    # refuse a bad model before any task is queued; its fields and version are read without torch
    models = job_models([model_spec, *more_models], default=model_spec, configured=settings.attribute_models,
                        reader=reader)
    model_spec, mf = models.category_spec, models.category
    # local checks (roots, existence) happen here, S3 ones while listing
    listed = iter_source(source, reader) if items is None else iter(items)
    if limit is not None:
        listed = islice(listed, limit)
    with session_scope(settings.database_url) as session:
        job_id = create_job(session=session, source=printable(source), model_path=model_spec, model_name=mf.name,
                            model_version=mf.version, attribute_models=[m.to_json() for m in models.attributes])
    del mf, models
    if on_job:
        on_job(job_id)
    total = batches = 0
    pending: list[tuple[int, list[list[str]]]] = []

    def flush() -> None:
        with session_scope(settings.database_url) as session:
            job = get_job(session=session, job_id=job_id)
            if job is not None and job.status != "listing":
                raise JobStateError(f"job {job_id} was {job.status} while its source was listed: "
                                    f"{total - sum(len(b) for _, b in pending)} items were queued")
            add_batches(session=session, job_id=job_id, batches=pending)
        for batch_no, _ in pending:
            enqueue(job_id, batch_no, task_id_for(job_id, batch_no))
        pending.clear()

    try:
        while chunk := list(islice(listed, settings.items_per_task)):
            pending.append((batches, [[it.item_id, it.uri] for it in chunk]))
            total += len(chunk)
            batches += 1
            if len(pending) >= SUBMIT_FLUSH_BATCHES:
                flush()
        flush()
    except JobStateError:
        raise
    except BaseException as exc:
        with session_scope(settings.database_url) as session:
            fail_job(session=session, job_id=job_id, error=f"listing failed after {total} items: {exc}"[:2000])
        raise
    with session_scope(settings.database_url) as session:
        finish_listing(session=session, job_id=job_id, total_items=total, total_batches=batches)
    with session_scope(settings.database_url) as session:
        complete_job_if_done(session=session, job_id=job_id)
    return job_id, total, batches


def configure_torch_threads(share: int = 1) -> int:
    """Give inference ``cpu_count // share`` threads (at least 1): torch's intra-op threads when torch is imported
    or the runtime is ``torch`` (``INVSORT_RUNTIME``), and :func:`pipeline.models.runtimes.default_threads` for
    the ONNX runtimes, without importing torch. Returns the count."""
    n = max(1, (os.cpu_count() or 1) // max(1, share))
    set_default_threads(n)
    if "torch" in sys.modules or _runtime_is_torch():
        import torch

        torch.set_num_threads(n)
    return n


def _runtime_is_torch() -> bool:
    """Whether the process's settings run the PyTorch network (True when they cannot be read: as before)."""
    from pipeline.settings import get_settings

    try:
        return get_settings().runtime == "torch"
    except Exception:  # invalid settings are reported where they are used
        return True
