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
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO

import torch

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
from pipeline.errors import ModelVersionError, SourceError
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.inference.streaming import Summary, run_pipeline
from pipeline.io.sources import iter_source
from pipeline.io.storage import ObjectReader, TooLargeError, local_path, make_reader
from pipeline.models.fileversion import Fingerprint, model_file_fingerprint
from pipeline.models.modelfile import load_model_file
from pipeline.records import Item, ItemResult, printable
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# (model spec, options, torch threads of the loading thread: cpu_streams=0 means one stream per thread)
_PredictorKey = tuple[str, PredictorOptions, int]
_predictors: OrderedDict[_PredictorKey, Predictor] = OrderedDict()
_predictors_lock = threading.Lock()
_fingerprints: dict[_PredictorKey, Fingerprint] = {}  # what the file looked like when each cached one was loaded
MAX_CACHED_PREDICTORS = 4


def get_predictor(settings: Settings, model_spec: str | None = None, *, reader: ObjectReader | None = None,
                  version: str | None = None) -> Predictor:
    """The process's :class:`Predictor` for a model and ``settings``, loaded once and reused by later batches
    while the file behind the spec is unchanged.

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
        ModelFileError: the file is not a usable model file (:func:`load_model_file`).
        ConfigError: ``settings`` ask for something this machine cannot do (:class:`Predictor`).
    """
    spec = model_spec or settings.model_path
    reader = reader or make_reader(settings)
    key = (spec, PredictorOptions.from_settings(settings), torch.get_num_threads())
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
            mf = load_model_file(spec, reader=reader)
            predictor = _predictors[key] = Predictor(mf, key[1])
            _fingerprints[key] = fingerprint
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

    Raises:
        SourceError, FileNotFoundError, PermissionError: the source cannot be listed (a local source that is
            missing or outside the allowed folders: before the job row is made).
        ModelFileError: the model file is not usable.
        JobEndedError: the job was cancelled or failed from outside while it ran.
    """
    reader = make_reader(settings, extra_roots=source_roots(source) if allow_source_root else ())
    predictor = get_predictor(settings, model_spec, reader=reader)
    mf = predictor.model_file
    url = settings.database_url
    items: Iterator[Item] = iter_source(source, reader)  # local checks (roots, existence) happen here
    if limit is not None:
        items = islice(items, limit)
    with session_scope(url) as session:
        job_id = create_job(session=session, source=printable(source), model_path=model_spec or settings.model_path,
                            model_name=mf.name, model_version=mf.version)
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
            items, predictor=predictor, reader=reader, on_batch=write, batch_size=settings.batch_size,
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
) -> tuple[str, int, int]:
    """Create the job row and commit it, then list ``source``, store its batches and enqueue their tasks.

    Listing streams: every :data:`SUBMIT_FLUSH_BATCHES` batches of ``settings.items_per_task`` items are stored
    (:func:`db.jobs.add_batches`, ``queued``, with their ids and URIs) and committed, then
    ``enqueue(job_id, batch_no, task_id)`` is called for each: a task names a batch the database holds, and
    a task that the queue loses is found and enqueued again by the reconciler (:mod:`pipeline.jobs`).
    ``on_job(job_id)`` is called once the job row is committed; ``allow_source_root`` as for :func:`sort_source`.
    Returns ``(job_id, total_items, total_batches)``.

    Raises:
        SourceError, FileNotFoundError, PermissionError: the source cannot be listed (a local source that is
            missing or outside the allowed folders: before the job row is made; else the job is marked failed).
        ModelFileError: the model file is not usable (checked before anything is enqueued).
        JobStateError: the job was cancelled while it was being listed (listing stops).
    """
    reader = make_reader(settings, extra_roots=source_roots(source) if allow_source_root else ())
    mf = load_model_file(model_spec, reader=reader)  # refuse a bad model before any task is queued
    items = iter_source(source, reader)  # local checks (roots, existence) happen here, S3 ones while listing
    if limit is not None:
        items = islice(items, limit)
    with session_scope(settings.database_url) as session:
        job_id = create_job(session=session, source=printable(source), model_path=model_spec, model_name=mf.name,
                            model_version=mf.version)
    del mf
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
        while chunk := list(islice(items, settings.items_per_task)):
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
    """Give torch ``cpu_count // share`` intra-op threads (at least 1); returns the count."""
    n = max(1, (os.cpu_count() or 1) // max(1, share))
    torch.set_num_threads(n)
    return n
