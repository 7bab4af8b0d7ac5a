"""Re-categorisation: the catalog's rows sorted again by another model (``invsort recategorize``, and ``invsort
beat`` on ``INVSORT_RECATEGORIZE_SCHEDULE``), its report, its dry run, and the rollback of a job.

A re-categorisation is a sort whose items come from the catalog itself: every row whose ``model_version`` is not
the model's (or is null), never a ``reviewed`` one, narrowed by filters (:class:`db.catalog.ResortSelection`).
:class:`CatalogListing` lists them in keyset pages (flat memory, no transaction held between pages) and the job
goes through the machinery of every job: embedded (:func:`pipeline.sorting.sort_source`) or queued for the
workers (:func:`pipeline.sorting.submit_job`): a job row whose ``source`` is ``catalog:?not_model_version=...``,
batches, progress, a photo that cannot be read failing alone, upserts that never overwrite a reviewed row.

One at a time: a run holds the ``recategorize`` lease (:func:`db.jobs.acquire_lease`, in the database) from
before it looks for re-categorisation jobs still listing or running until its own job row is committed, and does
not start while one is (:class:`AlreadyRunningError`). So two runs at once (two beat processes, a person and the
schedule) never list the same rows twice, and a run that comes while an earlier one's items are still queued
leaves them to it. A run that finds nothing to re-sort makes no job.

Which photos a run reads: S3 photos, and local ones inside ``INVSORT_LOCAL_ROOTS`` (and ``extra_roots``, the
command's ``--local-root``); embedded, also the local photo of a row that is not ``failed``, wherever it is (an
earlier sort read it under its own roots). A photo the run may not read is not re-sorted, its row stays as it
is, and it is counted in :attr:`Outcome.skipped`: it never becomes a ``failed`` row for want of a root. Queued,
the submitting process checks against its own ``INVSORT_LOCAL_ROOTS``, which the workers must share.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from db.catalog import (
    JobNotFoundError,
    JobStateError,
    ResortItem,
    ResortSelection,
    active_resorts,
    count_resort,
    get_job,
    resort_page,
)
from db.history import JobWrite, RollbackCounts, category_pairs, previous_entries, restore_previous
from db.jobs import acquire_lease, release_lease
from db.models import TERMINAL_JOB_STATUSES
from db.session import session_scope
from pipeline.attributes import AttributeModel, job_models
from pipeline.errors import SourceError
from pipeline.inference.streaming import Summary
from pipeline.io.files import atomic_path
from pipeline.io.storage import LocalStorage, ObjectReader, local_path, make_reader, uri_scheme
from pipeline.jobs import worker_id
from pipeline.models.fileversion import model_file_version
from pipeline.records import Item, ItemResult
from pipeline.settings import Settings
from pipeline.sorting import AnyPredictor, job_predictor, sort_source, submit_job

__all__ = [
    "LEASE",
    "REPORT_HEADER",
    "AlreadyRunningError",
    "CatalogListing",
    "Outcome",
    "Plan",
    "plan",
    "probe_speed",
    "recategorize",
    "report_pairs",
    "rollback",
    "write_report",
]

log = logging.getLogger(__name__)

#: The lease a run holds while it checks that no other re-categorisation is active and makes its job row.
LEASE = "recategorize"
#: How long that lease lasts if its holder dies before giving it back (it is given back as soon as the job exists).
LEASE_TTL_S = 300.0
#: Catalog rows a listing reads per statement.
PAGE_ROWS = 1000
#: The report's columns.
REPORT_HEADER = ("from_category", "to_category", "items")

#: ``enqueue(job_id, batch_no, task_id)``: put a stored batch's task on the queue (the Celery app supplies it).
Enqueue = Callable[[str, int, str], None]


class AlreadyRunningError(JobStateError):
    """Another re-categorisation is starting or still running: this one did not start (nothing was written)."""


class _Grants:
    """Local photos outside the roots that an embedded run may read, each as often as it was listed (the decode
    threads take them; thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left: Counter[str] = Counter()

    def add(self, uri: str) -> None:
        with self._lock:
            self._left[uri] += 1

    def take(self, uri: str) -> bool:
        with self._lock:
            left = self._left[uri]
            if left <= 0:
                return False
            if left == 1:
                del self._left[uri]
            else:
                self._left[uri] = left - 1
            return True


class _CatalogReader(ObjectReader):
    """The reader of an embedded run: what ``base`` reads, and each photo granted by the listing (a row an earlier
    sort read) as a file of its own, whatever the roots say."""

    def __init__(self, base: ObjectReader, grants: _Grants, max_bytes: int) -> None:
        super().__init__(base.local, s3_factory=lambda: base.s3)
        self.grants, self.max_bytes = grants, max_bytes

    def read(self, uri: str) -> bytes:
        if self.grants.take(uri):
            return LocalStorage([local_path(uri)], max_bytes=self.max_bytes).read(uri)
        return super().read(uri)


class CatalogListing:
    """The items a re-categorisation re-sorts, streamed from the catalog: ``selection``'s rows in key order, read
    :data:`PAGE_ROWS` at a time by keyset pages, each in a short transaction of its own (so rows written meanwhile,
    by this job too, never make the listing repeat or skip a row it has not reached).

    A local photo outside ``roots`` is left out and counted (:attr:`skipped`, the first in :attr:`first_skipped`),
    unless ``grants`` is given (embedded) and the row is not ``failed``: then it is granted to the run's reader.
    """

    def __init__(self, url: str, selection: ResortSelection, *, roots: LocalStorage, grants: _Grants | None = None,
                 page_rows: int = PAGE_ROWS) -> None:
        self.url, self.selection, self.roots, self.grants, self.page_rows = url, selection, roots, grants, page_rows
        self.skipped = 0
        self.first_skipped: str | None = None

    def __iter__(self) -> Iterator[Item]:
        after: str | None = None
        while True:
            with session_scope(self.url) as session:
                page = resort_page(session=session, selection=self.selection, after=after, limit=self.page_rows)
            for row in page:
                if self._may_read(row):
                    yield Item(item_id=row.item_id, uri=row.image_uri)
            if len(page) < self.page_rows:
                return
            after = page[-1].key

    def _may_read(self, row: ResortItem) -> bool:
        if uri_scheme(row.image_uri) not in (None, "file"):
            return True  # S3 (or a URI the sort fails, as it failed before)
        try:
            self.roots.check(local_path(row.image_uri))
        except PermissionError:
            if self.grants is not None and row.status != "failed":
                self.grants.add(row.image_uri)
                return True
            self.skipped += 1
            self.first_skipped = self.first_skipped or row.image_uri
            return False
        except SourceError:
            return True  # a path no file can have: it fails as it did before
        return True


@dataclass
class Outcome:
    """What :func:`recategorize` did. ``job_id`` is None when there was nothing to re-sort (no job was made).
    ``items``: images sorted (embedded, ``summary`` has the rest) or queued (``batches`` tasks); ``skipped``:
    rows left as they are because their photo is outside the local roots (``first_skipped``: one of them)."""

    selection: ResortSelection
    job_id: str | None = None
    items: int = 0
    batches: int = 0
    skipped: int = 0
    first_skipped: str | None = None
    summary: Summary | None = None


def _with_roots(settings: Settings, extra_roots: Sequence[Path | str]) -> Settings:
    if not extra_roots:
        return settings
    roots = [*settings.local_roots, *(Path(os.path.realpath(Path(r).expanduser())) for r in extra_roots)]
    return settings.model_copy(update={"local_roots": roots})


def _selection(version: str, categories: Sequence[str], statuses: Sequence[str], job_ids: Sequence[str],
               before: datetime | None, attributes: Sequence[AttributeModel] = ()) -> ResortSelection:
    return ResortSelection(version=version, categories=tuple(categories), statuses=tuple(statuses),
                           job_ids=tuple(job_ids), before=before,
                           attributes=tuple((m.attribute, m.version) for m in attributes))


def _models(settings: Settings, model_spec: str | None, more_models: Sequence[str],
            reader: ObjectReader) -> tuple[str, list[AttributeModel]]:
    """The category model's spec and the models of other attributes (:func:`pipeline.attributes.job_models`),
    checked before anything is listed or queued: a model of another attribute alone is refused here, not by every
    worker's batch."""
    spec = model_spec or settings.model_path
    models = job_models([spec, *more_models], default=spec, configured=settings.attribute_models, reader=reader)
    return models.category_spec, models.attributes


@contextmanager
def _one_at_a_time(url: str) -> Iterator[Callable[[], None]]:
    """Hold the :data:`LEASE` and make sure no re-categorisation job is listing or running; yields the function
    that gives the lease back (call it once the new job's row is committed; it is given back on leaving too).

    Raises:
        AlreadyRunningError: another run holds the lease, or a re-categorisation job is still active.
    """
    holder = f"{worker_id()}:{uuid.uuid4().hex[:8]}"
    with session_scope(url) as session:
        if not acquire_lease(session=session, name=LEASE, holder=holder, ttl_s=LEASE_TTL_S):
            raise AlreadyRunningError("another re-categorisation is starting at this moment (it holds the "
                                      f"{LEASE!r} lease): nothing to do until it has")
    held = True

    def release() -> None:
        nonlocal held
        if not held:
            return
        held = False
        try:
            with session_scope(url) as session:
                release_lease(session=session, name=LEASE, holder=holder)
        except Exception as exc:  # noqa: BLE001 - it runs out by itself after LEASE_TTL_S
            log.warning("could not give the %s lease back (it expires within %.0f s): %s", LEASE, LEASE_TTL_S, exc)

    try:
        with session_scope(url) as session:
            active = active_resorts(session=session)
        if active:
            job = active[0]
            raise AlreadyRunningError(
                f"job {job.id}, a re-categorisation to model version {job.model_version}, is still {job.status}: "
                f"one runs at a time (wait for it to end, or cancel it: invsort jobs cancel {job.id})")
        yield release
    finally:
        release()


def recategorize(
    settings: Settings,
    *,
    model_spec: str | None = None,
    categories: Sequence[str] = (),
    statuses: Sequence[str] = (),
    job_ids: Sequence[str] = (),
    before: datetime | None = None,
    extra_roots: Sequence[Path | str] = (),
    enqueue: Enqueue | None = None,
    on_job: Callable[[str], None] | None = None,
    on_progress: Callable[[list[ItemResult]], None] | None = None,
    more_models: Sequence[str] = (),
) -> Outcome:
    """Re-sort, with the model ``model_spec`` (None: ``settings.model_path``), every catalog row whose model
    version is not that model's, never a reviewed one, narrowed by the filters (:class:`ResortSelection`).
    ``more_models``: models of other attributes (:mod:`pipeline.attributes`); a row that is not ``failed`` and has
    no value of one of them by that model's version is re-sorted too, and every row re-sorted gets each of them.

    Embedded when ``enqueue`` is None (in this process, like ``invsort sort``), else queued for the workers like
    ``invsort submit`` (``enqueue`` puts each stored batch's task on the queue). ``on_job(job_id)`` is called once
    the job's row is committed (before any photo is read), ``on_progress(rows)`` after each embedded batch.

    Raises:
        AlreadyRunningError: another re-categorisation is starting or active; nothing was done.
        ValueError: a status filter of ``reviewed`` (or unknown), a naive ``before``.
        ModelFileError, FileNotFoundError, PermissionError: the model file is not usable.
        ConfigError: the models do not make a job (:func:`pipeline.attributes.job_models`: none of the category,
            two of one attribute, ...); nothing was done.
        JobEndedError, JobStateError, TransientError: as :func:`sort_source` / :func:`submit_job` raise them, once
            the job exists (``on_job`` has its id).
    """
    settings = _with_roots(settings, extra_roots)
    reader = make_reader(settings)
    spec, attributes = _models(settings, model_spec, more_models, reader)
    more = [m.path for m in attributes]
    if enqueue is None:  # loaded before the lease is taken: the same predictors sort_source uses
        version = job_predictor(settings, spec, attributes, reader=reader).model_file.version
    else:
        version = model_file_version(spec, reader=reader)
    selection = _selection(version, categories, statuses, job_ids, before, attributes)
    grants = _Grants()
    listing = CatalogListing(settings.database_url, selection, roots=reader.local,
                             grants=grants if enqueue is None else None)
    outcome = Outcome(selection)
    with _one_at_a_time(settings.database_url) as release:
        items = iter(listing)
        first = next(items, None)
        if first is not None:
            def started(job_id: str) -> None:
                release()  # the job's row is committed: from here on it keeps the next runs out
                outcome.job_id = job_id
                if on_job is not None:
                    on_job(job_id)

            listed = itertools.chain([first], items)
            if enqueue is not None:
                _, outcome.items, outcome.batches = submit_job(
                    selection.source, settings=settings, model_spec=spec, enqueue=enqueue, items=listed,
                    on_job=started, more_models=more)
            else:
                done = sort_source(selection.source, settings=settings, model_spec=spec, items=listed,
                                   reader=_CatalogReader(reader, grants, settings.max_image_bytes),
                                   on_job=started, on_progress=on_progress, more_models=more)
                outcome.items, outcome.summary = done.summary.images, done.summary
    outcome.skipped, outcome.first_skipped = listing.skipped, listing.first_skipped
    if outcome.skipped:
        log.warning("%d catalog rows not re-sorted: their photos are outside the local roots (e.g. %s); add their "
                    "folders to INVSORT_LOCAL_ROOTS", outcome.skipped, outcome.first_skipped)
    return outcome


# --- the dry run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What :func:`recategorize` would re-sort now: ``items`` rows of ``selection`` with model ``model_name``,
    and the forward pass's speed measured here (``images_per_s`` on ``probe_images`` blank images at the model's
    input size on ``device``; None when there is nothing to re-sort). Reading and decoding the photos add to it,
    and rows whose photos are outside the local roots are counted though a run would leave them out."""

    selection: ResortSelection
    model_name: str
    items: int
    images_per_s: float | None
    probe_images: int
    device: str

    @property
    def seconds(self) -> float | None:
        """The estimated time of the forward passes, seconds."""
        return None if not self.images_per_s else self.items / self.images_per_s


def probe_speed(predictor: AnyPredictor, images: int, *, min_seconds: float = 0.3,
                max_runs: int = 20) -> float:
    """Images a second ``predictor`` scores on this machine: a batch of ``images`` blank images at the model's
    input size, once to warm up, then timed at least twice and until ``min_seconds`` have passed (at most
    ``max_runs`` times)."""
    h, w = predictor.input_size
    batch = np.zeros((images, h, w, predictor.model_file.in_chans), dtype=np.uint8)  # both runtimes take numpy
    predictor.predict_scored(batch)
    runs, start = 0, time.perf_counter()
    while runs < 2 or (time.perf_counter() - start < min_seconds and runs < max_runs):
        predictor.predict_scored(batch)
        runs += 1
    return runs * images / (time.perf_counter() - start)


def plan(
    settings: Settings,
    *,
    model_spec: str | None = None,
    categories: Sequence[str] = (),
    statuses: Sequence[str] = (),
    job_ids: Sequence[str] = (),
    before: datetime | None = None,
    more_models: Sequence[str] = (),
) -> Plan:
    """The dry run: how many rows a re-categorisation with these arguments would re-sort now (one ``COUNT``) and
    how long the model would take over them here (:func:`probe_speed`). Writes nothing.

    Raises:
        ValueError, ModelFileError, FileNotFoundError, PermissionError: as :func:`recategorize`.
    """
    reader = make_reader(settings)
    spec, attributes = _models(settings, model_spec, more_models, reader)
    predictor = job_predictor(settings, spec, attributes, reader=reader)
    mf = predictor.model_file
    selection = _selection(mf.version, categories, statuses, job_ids, before, attributes)
    with session_scope(settings.database_url) as session:
        items = count_resort(session=session, selection=selection)
    images = settings.batch_size
    speed = probe_speed(predictor, images) if items else None
    return Plan(selection, mf.name, items, speed, images, str(predictor.device))


# --- the report and the rollback -------------------------------------------------------------------------------


def report_pairs(settings: Settings, job_id: str) -> Counter[tuple[str, str]]:
    """``{(from_category, to_category): items}`` of what job ``job_id`` re-sorted, read from the history once the
    job has written (:func:`db.history.category_pairs`: unchanged pairs included, ``""`` for no category)."""
    with session_scope(settings.database_url) as session:
        return category_pairs(session=session, job_id=job_id)


def write_report(path: str | Path, pairs: Counter[tuple[str, str]]) -> int:
    """Write the report CSV (:data:`REPORT_HEADER`, then one line per pair, most items first) atomically; just the
    header when ``pairs`` is empty. Returns the items it sums to."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(REPORT_HEADER)
        for (before, after), n in sorted(pairs.items(), key=lambda p: (-p[1], p[0])):
            writer.writerow((before, after, n))
    return sum(pairs.values())


def _restore(url: str, job_id: str, writes: list[JobWrite]) -> RollbackCounts:
    with session_scope(url) as session:
        return restore_previous(session=session, job_id=job_id, writes=writes)


def rollback(settings: Settings, job_id: str, *, chunk: int = 500) -> RollbackCounts:
    """Take job ``job_id``'s sort back: each item it wrote gets the state it had before the job again, from the
    history (:func:`db.history.restore_previous`, ``chunk`` items a transaction, under their rows' locks), unless
    something changed it since or a person decided on it (left alone), or the job created it (left in place: the
    catalog's readers have seen it). Every restored row gets a ``rollback`` history entry naming the job, so a
    second rollback of the same job finds everything changed since and does nothing.

    Raises:
        JobStateError: the job is still listing or running (cancel it, or let it end, first).
        JobNotFoundError: neither a job nor a history entry has that id.
    """
    url = settings.database_url
    with session_scope(url) as session:
        job = get_job(session=session, job_id=job_id)
    if job is not None and job.status not in TERMINAL_JOB_STATUSES:
        raise JobStateError(f"job {job_id} is still {job.status}: cancel it (invsort jobs cancel {job_id}) or let "
                            "it end, then roll it back")
    total, seen, pending = RollbackCounts(), 0, []
    with session_scope(url) as reading:
        for write in previous_entries(session=reading, job_id=job_id):
            seen += 1
            pending.append(write)  # checked under its row's lock, latest or not: a reviewed row is told apart
            if len(pending) >= chunk:
                total += _restore(url, job_id, pending)
                pending = []
    if pending:
        total += _restore(url, job_id, pending)
    if job is None and not seen:
        raise JobNotFoundError(f"no sorting job {job_id!r}, and no history entry of one")
    return total
