"""The main job, as plain functions that the CLI and the Celery tasks call.

- :func:`sort_source` — embedded mode: list a source, sort it in this process, write the catalog.
- :func:`sort_batch` — one image-batch task: sort a list of items and record the batch on its job.
- :func:`submit_job` — create the job row, commit, then list the source and enqueue image-batch tasks.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from db.catalog import complete_job_if_done, create_job, fail_job, finish_listing, record_batch, upsert_items
from db.session import session_scope
from pipeline.errors import SourceError
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.inference.streaming import Summary, run_pipeline
from pipeline.io.sources import iter_source
from pipeline.io.storage import ObjectReader, local_path, make_reader
from pipeline.models.modelfile import load_model_file
from pipeline.records import Item, ItemResult
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# (model spec, options, torch threads of the loading thread: cpu_streams=0 means one stream per thread)
_PredictorKey = tuple[str, PredictorOptions, int]
_predictors: OrderedDict[_PredictorKey, Predictor] = OrderedDict()
_predictors_lock = threading.Lock()
MAX_CACHED_PREDICTORS = 4


def get_predictor(settings: Settings, model_spec: str | None = None, *, reader: ObjectReader | None = None
                  ) -> Predictor:
    """The process's :class:`Predictor` for a model and ``settings``, loaded once and reused by every later batch.

    The :data:`MAX_CACHED_PREDICTORS` most recently used are kept; an older one is closed when a new one is
    loaded (a closed predictor still predicts, so a caller that holds one is not broken), and all of them at
    exit.
    """
    spec = model_spec or settings.model_path
    key = (spec, PredictorOptions.from_settings(settings), torch.get_num_threads())
    with _predictors_lock:
        if key in _predictors:
            _predictors.move_to_end(key)
            return _predictors[key]
        mf = load_model_file(spec, reader=reader or make_reader(settings))
        predictor = _predictors[key] = Predictor(mf, key[1])
        log.info("loaded model %s version %s on %s with %s, JPEG decoding with %s", mf.name, mf.version,
                 predictor.device, settings.runtime, predictor.decode_backend)
        while len(_predictors) > MAX_CACHED_PREDICTORS:
            _predictors.popitem(last=False)[1].close()
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
    path = local_path(source) if source.startswith("file://") else Path(source)
    path = Path(os.path.realpath(path))
    if path.is_dir():
        return [path]
    if path.is_file():  # a manifest: its folder holds the images it names by relative path
        return [path.parent]
    raise SourceError(f"source not found: {source}")


@dataclass
class SortOutcome:
    job_id: str
    summary: Summary


def sort_source(
    source: str,
    *,
    settings: Settings,
    model_spec: str | None = None,
    limit: int | None = None,
    on_progress: Callable[[list[ItemResult]], None] | None = None,
) -> SortOutcome:
    """Embedded mode: sort every image of ``source`` in this process into ``settings.database_url``.

    The job is recorded in ``sorting_jobs`` like a queued one, so ``invsort status`` shows it too.
    Each batch's rows and the job's counters are written in one transaction.

    Raises:
        SourceError, FileNotFoundError, PermissionError: the source cannot be listed.
        ModelFileError: the model file is not usable.
    """
    reader = make_reader(settings, extra_roots=source_roots(source))
    predictor = get_predictor(settings, model_spec, reader=reader)
    mf = predictor.model_file
    url = settings.database_url
    with session_scope(url) as session:
        job_id = create_job(session=session, source=source, model_path=model_spec or settings.model_path,
                            model_name=mf.name, model_version=mf.version)
    items: Iterator[Item] = iter_source(source, reader)
    if limit is not None:
        items = islice(items, limit)
    batch_no = 0

    def write(rows: list[ItemResult]) -> None:
        nonlocal batch_no
        with session_scope(url) as session:
            upsert_items(session=session, rows=rows)
            record_batch(session=session, job_id=job_id, batch_no=batch_no, **_counts(rows))
        batch_no += 1
        if on_progress:
            on_progress(rows)

    try:
        summary = run_pipeline(
            items, predictor=predictor, reader=reader, on_batch=write, batch_size=settings.batch_size,
            decode_threads=settings.decode_threads, max_pixels=settings.max_image_pixels, job_id=job_id,
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


def _counts(rows: Iterable[ItemResult]) -> dict[str, int]:
    c = {"sorted_count": 0, "needs_review_count": 0, "failed_count": 0}
    for r in rows:
        c[f"{r.status}_count"] += 1
    return c


def sort_batch(
    job_id: str, batch_no: int, items: list[Item], *, settings: Settings, model_spec: str
) -> dict[str, int]:
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
                 decode_threads=settings.decode_threads, max_pixels=settings.max_image_pixels, job_id=job_id)
    counts = _counts(all_rows)
    with session_scope(settings.database_url) as session:
        upsert_items(session=session, rows=all_rows)
        record_batch(session=session, job_id=job_id, batch_no=batch_no, **counts)
    with session_scope(settings.database_url) as session:
        complete_job_if_done(session=session, job_id=job_id)
    return counts


def submit_job(
    source: str,
    *,
    settings: Settings,
    model_spec: str,
    enqueue: Callable[[str, int, list[list[str]]], None],
    limit: int | None = None,
) -> tuple[str, int, int]:
    """Create the job row and commit it, then list ``source`` and ``enqueue(job_id, batch_no, [[id, uri]])``.

    Tasks carry ids and URIs only. Listing streams: batches are enqueued as they are listed.
    Returns ``(job_id, total_items, total_batches)``.

    Raises:
        SourceError, FileNotFoundError, PermissionError: the source cannot be listed (the job is marked failed).
        ModelFileError: the model file is not usable (checked before anything is enqueued).
    """
    reader = make_reader(settings, extra_roots=source_roots(source))
    mf = load_model_file(model_spec, reader=reader)  # refuse a bad model before any task is queued
    with session_scope(settings.database_url) as session:
        job_id = create_job(session=session, source=source, model_path=model_spec, model_name=mf.name,
                            model_version=mf.version)
    del mf
    total = batches = 0
    try:
        items = iter_source(source, reader)
        if limit is not None:
            items = islice(items, limit)
        while chunk := list(islice(items, settings.items_per_task)):
            enqueue(job_id, batches, [[it.item_id, it.uri] for it in chunk])
            total += len(chunk)
            batches += 1
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
