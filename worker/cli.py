"""The ``invsort`` command line: one entry point, a subcommand per job (click)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.errors import ConfigError, InvsortError

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger("invsort")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _unavailable_service(exc: BaseException) -> str | None:
    """One line for a database or Redis broker that did not answer, else None.

    Only the exception types of modules already imported are checked (an exception cannot come from a module
    that was never imported), so nothing is imported here.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return f"database unavailable: {_first_line(exc.orig or exc)} (check INVSORT_DATABASE_URL or --db)"
    kinds: list[type[BaseException]] = []
    for module, names in (("kombu.exceptions", ("OperationalError",)),
                          ("redis.exceptions", ("ConnectionError", "TimeoutError"))):
        found = sys.modules.get(module)
        kinds += [getattr(found, name) for name in names if found is not None and hasattr(found, name)]
    if kinds and isinstance(exc, tuple(kinds)):
        return f"Redis broker unavailable: {_first_line(exc)} (check INVSORT_BROKER_URL)"
    return None


def _error_line(exc: Exception) -> str | None:
    """The message a known error is shown with (``Error: ...``), None for an unexpected one (a bug)."""
    if isinstance(exc, InvsortError | FileNotFoundError | PermissionError):
        return str(exc)  # may be several lines on purpose: every bad setting is listed
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "torchvision"):  # an install without torch
        return ("this command needs PyTorch, which is not installed here: pip install 'invsort[torch]' "
                "(sort, submit and worker run without it with INVSORT_RUNTIME=onnxruntime: 'invsort[cpu]')")
    service = _unavailable_service(exc)
    if service is not None:
        return service
    if isinstance(exc, OSError):  # a connection refused or reset, a full disk: the environment, not a bug
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known errors become one clear line and exit status 1, never a traceback: invsort's own errors, missing
    files and refused access, OS errors, and a database or Redis broker that does not answer (an S3 endpoint
    that does not answer is a :class:`~pipeline.errors.TransientError`). With ``-v`` the traceback is printed
    before the line. Anything else (a bug) keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            message = _error_line(exc)
            if message is None or isinstance(exc, click.ClickException):
                raise
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().params.get("verbose"):
                traceback.print_exception(exc, file=sys.stderr)
            raise click.ClickException(message) from None

    return wrapper


def _settings(**overrides: Any) -> Settings:
    from pipeline.logs import set_log_format
    from pipeline.settings import build_settings

    settings = build_settings(**overrides)
    set_log_format(settings.log_format)  # INVSORT_LOG_FORMAT from a .env file too
    return settings


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.lower().replace("x", " ").split()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(8 <= p <= 2048 for p in parts):
        raise ConfigError(f"--image-size must be N or HxW with sides between 8 and 2048 px, got {value!r}")
    return parts[0], parts[1]


_DEVICE_HELP = "Where the network runs: auto, cpu, cuda or cuda:N (GPU N, 0 first)"


def _check_extra(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    from pipeline.evaluation.extra import parse_extra

    try:
        return parse_extra(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Every --device option accepts the same names as INVSORT_DEVICE (:func:`pipeline.settings.check_device`)."""
    from pipeline.settings import check_device

    if value is None:
        return None
    try:
        return check_device(value, what="device")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _safe_url(url: str) -> str:
    from db.session import safe_url

    return safe_url(url)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True,
              help="More log output (-v info, -vv debug); with -v an error shows its traceback too.")
def main(verbose: int) -> None:
    """invsort: sort product photos into catalogue categories with a CNN.

    \b
    Example, on one machine (SQLite, local files):
      invsort sort examples/images
    At scale (Redis + Celery workers + PostgreSQL + S3):
      invsort worker &
      invsort submit s3://bucket/photos/ --model s3://bucket/models/shoes.pt --wait
    """
    from pipeline.logs import configure_logging

    level = logging.WARNING - 10 * min(verbose, 2)
    configure_logging(level, os.environ.get("INVSORT_LOG_FORMAT"))  # text or json lines (pipeline/logs.py)
    # Off a terminal, progress bars become a few INFO lines (pipeline.progress): shown without -v too.
    logging.getLogger("pipeline.progress").setLevel(min(level, logging.INFO))


@main.command()
@click.argument("source")
@click.option("--model", "models", multiple=True, help="Model file: path, s3:// URI or bundled:NAME; again for "
              "models of other attributes (one per attribute, one of them the category's) "
              "[default: INVSORT_MODEL_PATH, else the bundled Fashion-MNIST model].")
@click.option("--db", "database_url", default=None, help="Catalog database URL [default: INVSORT_DATABASE_URL, "
              "else sqlite:///./invsort.db].")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 64].")
@click.option("--device", default=None, callback=_check_device, metavar="DEVICE",
              help=f"{_DEVICE_HELP} [default: INVSORT_DEVICE, else auto].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Sort at most this many images.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_handle_errors
def sort(source: str, models: tuple[str, ...], database_url: str | None, batch_size: int | None,
         device: str | None, limit: int | None, no_progress: bool) -> None:
    """Sort every image of SOURCE in this process (no Redis) and write the catalog.

    SOURCE is a local folder (walked recursively), file://DIR, s3://bucket/prefix, or a manifest
    (.csv or .jsonl with item_id,image_uri columns). The folder named here may be read even when it is not
    in INVSORT_LOCAL_ROOTS. The database is migrated to the latest schema first.

    \b
    Example:
      invsort sort examples/images
      invsort sort ./photos --model shoes.pt --db postgresql://user@host/catalog
      invsort sort ./photos --model shoes.pt --model toe.pt   # toe.pt: 'invsort train --attribute toe'
    """
    from db.migrate import upgrade
    from pipeline.progress import progress
    from pipeline.sorting import sort_source

    settings = _settings(database_url=database_url, batch_size=batch_size, device=device)
    upgrade(settings.database_url)
    bar = progress(desc="sorting", unit="img", disable=no_progress, total=limit)  # log lines when not a terminal
    outcome = sort_source(source, settings=settings, model_spec=models[0] if models else None, limit=limit,
                          on_progress=lambda rows: bar.update(len(rows)), more_models=models[1:])
    bar.close()
    s = outcome.summary
    click.echo(
        f"sorted {s.images} images in {s.seconds:.1f} s ({s.images_per_s:.1f} images/s): "
        f"{s.sorted} sorted, {s.needs_review} needs_review, {s.failed} failed"
    )
    click.echo(f"job {outcome.job_id}; results in table catalog_items of {_safe_url(settings.database_url)}")
    if settings.database_url.startswith("sqlite:///"):
        db_file = settings.database_url.removeprefix("sqlite:///")
        click.echo(f"  look: invsort results --db sqlite:///{db_file} --job {outcome.job_id}")


WAIT_EXIT_CODES = {"done": 0, "failed": 1, "cancelled": 3}  # exit status of 'submit --wait' by final job state
WAIT_MAX_POLL_S = 5.0  # while the database does not answer, polls back off to one every this many seconds


@main.command()
@click.argument("source")
@click.option("--model", "models", multiple=True, help="Model file every worker can read: s3:// URI, a path on "
              "the workers, or bundled:NAME; again for models of other attributes [default: INVSORT_MODEL_PATH].")
@click.option("--wait", is_flag=True, help="Show a progress bar until the job ends; exit status 0 done, 1 failed, "
              "3 cancelled.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Submit at most this many images.")
@click.option("--items-per-task", type=int, default=None, help="Images per queued task [default: 256].")
@_handle_errors
def submit(source: str, models: tuple[str, ...], wait: bool, limit: int | None, items_per_task: int | None) -> None:
    """Queue SOURCE for the Celery workers: create the job, list the source, enqueue image-batch tasks.

    With --wait it polls the job until it ends and exits with 0 when the job is done, 1 when it failed (or
    submitting failed), 3 when it was cancelled (2 is a usage error). A database that stops answering while it
    waits is waited out: one line says so, and the bar goes on when it answers again (the workers carry on
    meanwhile).

    \b
    Example:
      invsort submit s3://catalogue/photos/ --model s3://catalogue/models/shoes.pt --wait
    """
    from db.migrate import ensure_at_head
    from pipeline.sorting import submit_job
    from worker.tasks import enqueue_batch

    settings = _settings(items_per_task=items_per_task)
    ensure_at_head(settings.database_url)
    model_spec = models[0] if models else settings.model_path

    def enqueue(job_id: str, batch_no: int, task_id: str) -> None:
        enqueue_batch(job_id, batch_no, task_id, model_spec)

    job_id, total, batches = submit_job(source, settings=settings, model_spec=model_spec, enqueue=enqueue,
                                        limit=limit, more_models=models[1:])
    click.echo(f"job {job_id}: {total} images in {batches} tasks queued")
    if wait:
        sys.exit(_wait(job_id, settings.database_url, total))


def _wait(job_id: str, url: str, total: int, poll_s: float = 0.5) -> int:
    """Poll job ``job_id`` every ``poll_s`` seconds until it ends; print its line and return its exit status
    (:data:`WAIT_EXIT_CODES`; 1 for any other final state).

    While the database does not answer (connection refused, reset, timed out), one line on stderr says so and polls
    back off to one every :data:`WAIT_MAX_POLL_S` seconds until it answers again; nothing else is printed.

    Raises:
        click.ClickException: the job's row is gone.
    """
    from sqlalchemy.exc import InterfaceError, OperationalError
    from tqdm import tqdm

    from db.catalog import get_job
    from db.models import TERMINAL_JOB_STATUSES
    from db.session import session_scope
    from pipeline.progress import progress

    bar = progress(total=total, desc="sorting", unit="img")
    delay, unavailable = poll_s, False
    while True:
        try:
            with session_scope(url) as session:
                job = get_job(session=session, job_id=job_id)
        except (OperationalError, InterfaceError) as exc:
            if not unavailable:
                tqdm.write(f"database unavailable ({_first_line(exc.orig or exc)}); retrying until it answers, "
                           f"job {job_id} goes on meanwhile (Ctrl-C stops waiting, not the job)", file=sys.stderr)
            unavailable, delay = True, min(delay * 2, WAIT_MAX_POLL_S)
            time.sleep(delay)
            continue
        unavailable, delay = False, poll_s
        if job is None:
            bar.close()
            raise click.ClickException(f"job {job_id} is no longer in {_safe_url(url)}")
        bar.update(job.processed - bar.n)
        if job.status in WAIT_EXIT_CODES or job.status in TERMINAL_JOB_STATUSES:
            bar.close()
            click.echo(_job_line(job))
            return WAIT_EXIT_CODES.get(job.status, 1)
        time.sleep(poll_s)


def _job_line(job: Any) -> str:
    span = ""
    if job.started_at and job.finished_at:
        secs = (job.finished_at - job.created_at).total_seconds()
        span = f", {secs:.1f} s, {job.processed / secs:.1f} images/s" if secs > 0 else ""
    total = "?" if job.total_items is None else job.total_items
    line = (f"job {job.id} {job.status}: {job.processed}/{total} images; {job.sorted_count} sorted, "
            f"{job.needs_review_count} needs_review, {job.failed_count} failed{span}")
    if job.error:
        line += f"\n  error: {job.error}"
    return line


@main.command()
@click.argument("job_id", required=False)
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_handle_errors
def status(job_id: str | None, database_url: str | None, as_json: bool) -> None:
    """Show a job's state and counts (or the latest jobs without JOB_ID).

    \b
    Example:
      invsort status 3f1c...e9
    """
    from db.catalog import get_job, list_jobs
    from db.migrate import ensure_at_head
    from db.session import session_scope

    settings = _settings(database_url=database_url)
    ensure_at_head(settings.database_url)
    with session_scope(settings.database_url) as session:
        if job_id:
            one = get_job(session=session, job_id=job_id)
            if one is None:
                raise click.ClickException(f"no job {job_id} in {_safe_url(settings.database_url)}")
            jobs = [one]
        else:
            jobs = list_jobs(session=session, limit=20)
    for job in jobs:
        if as_json:
            record = {**dataclasses.asdict(job), "processed": job.processed}
            click.echo(json.dumps(record, default=lambda v: v.isoformat()))  # datetimes: ISO 8601, UTC
        else:
            click.echo(_job_line(job))


@main.command()
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@click.option("--job", "job_id", default=None, help="Only this job's rows.")
@click.option("--limit", type=int, default=20, show_default=True, help="Rows to show (0 = all).")
@click.option("--csv", "as_csv", is_flag=True, help="Write CSV to stdout.")
@_handle_errors
def results(database_url: str | None, job_id: str | None, limit: int, as_csv: bool) -> None:
    """Show rows of the catalog table (item, category, confidence, status, error), and the items' other
    attributes (toe=open_toe; with --csv a column each).

    \b
    Example:
      invsort results --job 3f1c...e9 --csv > sorted.csv
    """
    import csv
    from itertools import islice

    from db.attributes import attribute_names, attributes_of
    from db.catalog import catalog_key, iter_items
    from db.migrate import ensure_at_head
    from db.session import session_scope

    settings = _settings(database_url=database_url)
    ensure_at_head(settings.database_url)
    with session_scope(settings.database_url) as session:
        names = attribute_names(session=session)  # a column each (CSV), name=value after the category (text)
        rows = iter_items(session=session, job_id=job_id)
        if limit:
            rows = islice(rows, limit)
        w = csv.writer(sys.stdout) if as_csv else None
        if w is not None:
            w.writerow(["item_id", "category", "confidence", "status", "error", "model_version", *names])
        while page := list(islice(rows, 500)):
            keys = [catalog_key(r.item_id) for r in page]
            found = attributes_of(session=session, keys=keys) if names else {}
            for r, key in zip(page, keys, strict=True):
                values = found.get(key, {})
                if w is not None:
                    w.writerow([r.item_id, r.category, r.confidence, r.status, r.error, r.model_version,
                                *(values.get(n) for n in names)])
                    continue
                conf = "" if r.confidence is None else f"{r.confidence:.3f}"
                what = (r.category or "-") if r.status != "failed" else f"FAILED: {r.error}"
                more = "".join(f" {n}={values[n] or '-'}" for n in names if n in values)
                click.echo(f"{r.status:<12} {conf:>5}  {what:<24} {r.item_id}{more}")


def _change_line(change: Any) -> str:
    before = "new" if change.previous_status is None else f"{change.previous_status} {change.previous_category or '-'}"
    who = change.changed_by or change.job_id or ""
    return (f"{change.cursor:>10}  {change.changed_at:%Y-%m-%d %H:%M:%S}  {change.source:<8} {before} -> "
            f"{change.status} {change.category or '-'}  {change.item_id}" + (f"  ({who})" if who else ""))


@main.command()
@click.option("--since", type=click.IntRange(min=0), default=0, show_default=True, metavar="CURSOR",
              help="Print the changes after this cursor (0: from the start).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Print at most N changes.")
@click.option("--follow", is_flag=True, help="After the last change, wait for new ones (Ctrl-C stops).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True, metavar="SECONDS",
              help="With --follow: seconds between two looks at the database.")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per change, as GET /v1/changes.")
@_handle_errors
def changes(since: int, limit: int | None, follow: bool, interval: float, database_url: str | None,
            as_json: bool) -> None:
    """Print the change feed: each change of an item's category or status (or a new item), oldest first.

    Ends with the next cursor on standard error ('next cursor: N'): pass it as --since to read on from there;
    every change is printed exactly once across such runs.

    \b
    Example:
      invsort changes --since 0 --json > changes.jsonl
      invsort changes --since 1234 --follow
    """
    from db.history import MAX_CHANGES_PAGE, read_changes
    from db.migrate import ensure_at_head
    from db.session import session_scope

    settings = _settings(database_url=database_url)
    ensure_at_head(settings.database_url)
    cursor, printed = since, 0
    try:
        while limit is None or printed < limit:
            size = MAX_CHANGES_PAGE if limit is None else min(MAX_CHANGES_PAGE, limit - printed)
            with session_scope(settings.database_url) as session:
                page = read_changes(session=session, since=cursor, limit=size)
            for change in page.changes:
                click.echo(json.dumps(change.to_json()) if as_json else _change_line(change))
            cursor, printed = page.next, printed + len(page.changes)
            if len(page.changes) < size:
                if not follow:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo(f"next cursor: {cursor}", err=True)


CLASSIFY_CHUNK = 256  # photos open at once in 'invsort classify'


@main.command()
@click.argument("photos", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--model", "model", default=None, help="Model file: path, s3:// URI or bundled:NAME "
              "[default: INVSORT_MODEL_PATH, else the bundled Fashion-MNIST model].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a photo, as POST /v1/classify answers.")
@_handle_errors
def classify(photos: tuple[str, ...], model: str | None, as_json: bool) -> None:
    """Classify PHOTOS in this process and print each one's status, confidence and category; nothing is written
    to the catalog (the function behind POST /v1/classify). A photo that cannot be read is FAILED with why.

    \b
    Example:
      invsort classify examples/images/Bag/test_02000.png --json
    """
    from contextlib import ExitStack

    from pipeline.sorting import classify_images

    settings = _settings()
    for start in range(0, len(photos), CLASSIFY_CHUNK):
        with ExitStack() as stack:
            files = [(path, stack.enter_context(open(path, "rb"))) for path in photos[start:start + CLASSIFY_CHUNK]]
            rows = classify_images(files, settings=settings, model_spec=model)
        for r in rows:
            if as_json:
                click.echo(json.dumps({"filename": r.item_id, "status": r.status, "category": r.category,
                                       "confidence": r.confidence, "topk": r.topk, "error": r.error}))
                continue
            conf = "" if r.confidence is None else f"{r.confidence:.3f}"
            what = (r.category or "-") if r.status != "failed" else f"FAILED: {r.error}"
            click.echo(f"{r.status:<12} {conf:>5}  {what:<24} {r.item_id}")


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (a --host value) is a loopback address: 127.0.0.0/8, ::1 (or an IPv4-mapped 127.x) or
    ``localhost``; 0.0.0.0, ::, any other address and any other name are not."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any but a loopback one (127.0.0.0/8, ::1, localhost; 0.0.0.0 is every "
              "interface) needs INVSORT_API_TOKEN: requests then need the token, the pages ask for it once.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--model", "model", default=None, help="Model file for every request and job: path, s3:// URI or "
              "bundled:NAME [default: INVSORT_MODEL_PATH, else the bundled Fashion-MNIST model].")
@click.option("--db", "database_url", default=None, help="Catalog database URL [default: INVSORT_DATABASE_URL, "
              "else sqlite:///./invsort.db].")
@_handle_errors
def serve(host: str, port: int, model: str | None, database_url: str | None) -> None:
    """Serve the HTTP API (FastAPI on uvicorn): classify uploads, start and follow jobs, read the catalog.

    The database is migrated to the latest schema first and the model loaded before the port opens. Jobs go to
    the Celery queue when INVSORT_BROKER_URL is set and its Redis answers, else they run in this server, one at a
    time. Local job sources must be inside INVSORT_LOCAL_ROOTS. OpenAPI pages at /docs.

    With INVSORT_API_TOKEN set, every request but /healthz needs "Authorization: Bearer TOKEN" and the web pages
    ask for the token once (a session cookie). Without it there is no authentication, so only a loopback --host
    is accepted.

    \b
    Example:
      invsort serve --port 8000
      curl -F file=@photo.jpg http://127.0.0.1:8000/v1/classify
    """
    import uvicorn

    from db.migrate import upgrade
    from pipeline.sorting import get_predictor
    from worker.web.app import create_app

    settings = _settings(database_url=database_url)
    if settings.api_token is None and not _is_loopback(host):  # before anything is migrated, loaded or opened
        raise ConfigError(f"refusing to listen on {host} without authentication: set INVSORT_API_TOKEN (at least "
                          "16 characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), or "
                          "use --host 127.0.0.1")
    upgrade(settings.database_url)
    mf = get_predictor(settings, model).model_file  # a bad model file is one Error: line, before the port opens
    app = create_app(settings, model_spec=model)
    shown_host = f"[{host}]" if ":" in host else host
    click.echo(f"invsort API on http://{shown_host}:{port} (OpenAPI at /docs); model {mf.name} version {mf.version}; "
               f"catalog {_safe_url(settings.database_url)}", err=True)
    verbose = click.get_current_context().find_root().params.get("verbose") or 0
    uvicorn.run(app, host=host, port=port, log_level="debug" if verbose > 1 else "info", server_header=False)


@main.command()
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (one model each; torch threads are split between them).")
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option("-n", "--hostname", default=None, help="Node name, %h = host name (default: celery@HOST).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Port of the Prometheus metrics, GET /metrics (default: INVSORT_METRICS_PORT, 9808); 0: none.")
@_handle_errors
def worker(concurrency: int, loglevel: str, hostname: str | None, metrics_port: int | None) -> None:
    """Start a Celery worker that pulls image-batch tasks from INVSORT_BROKER_URL.

    Its Prometheus metrics, every pool process counted, are on
    http://INVSORT_METRICS_ADDR:INVSORT_METRICS_PORT/metrics (127.0.0.1:9808 by default).

    \b
    Example:
      INVSORT_DATABASE_URL=postgresql://u@db/catalog INVSORT_BROKER_URL=redis://redis:6379/0 invsort worker
    """
    from db.migrate import ensure_at_head
    from pipeline.logs import set_log_format
    from pipeline.settings import get_settings
    from worker.metrics import prepare, serve  # imports no prometheus_client: prepare() must run first

    settings = get_settings()
    set_log_format(settings.log_format)
    level = logging.getLevelName(loglevel.upper())
    if isinstance(level, int):  # what Celery sets once it starts: the lines before it show at that level too
        logging.getLogger().setLevel(level)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    ensure_at_head(settings.database_url)
    metrics_dir = prepare(settings)  # PROMETHEUS_MULTIPROC_DIR, before the app and its tasks are imported
    from worker.app import app

    queue = "invsort"
    if metrics_dir is not None:
        serve(settings, metrics_dir, [queue])
    argv = ["worker", f"--concurrency={concurrency}", f"--loglevel={loglevel}", "--pool=prefork",
            "-Q", queue, "--without-gossip", "--without-mingle"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if settings.log_format == "json":  # no banner: stdout and stderr carry JSON lines only
        argv.insert(0, "--quiet")
        log.info("worker starting: %d process(es), queue %s, broker %s, catalog %s", concurrency, queue,
                 _safe_url(settings.broker_url), _safe_url(settings.database_url))
    app.worker_main(argv)


@main.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option("--arch", default=None, help="Architecture (see 'invsort models') [default: from the data].")
@click.option("--weights", default=None, help="ImageNet weights to start from: 'imagenet' (torchvision's published "
              "weights, downloaded once into torch's cache), a local .pth or an s3:// URI [default: random weights].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Most epochs [preset: 8 photo, 15 small].")
@click.option("--batch-size", type=click.IntRange(min=2), default=None)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak AdamW learning rate.")
@click.option("--image-size", default=None, help="Input size N or HxW in px [default: the photos' own size].")
@click.option("--grayscale/--rgb", default=None, help="1- or 3-channel input [default: from the photos].")
@click.option("--augment", "policy", type=click.Choice(["trivialaugment", "randaugment", "none"]), default=None,
              help="Automatic augmentation policy on top of crop/flip/colour jitter.")
@click.option("--backgrounds", type=click.FloatRange(0, 1), default=None, metavar="P",
              help="Probability of pasting the product, cut out of its plain background, onto a real photograph "
                   "(0 = off) [preset: 0.5 photo, 0 small].")
@click.option("--mixup", "mixup_alpha", type=click.FloatRange(min=0), default=None, help="Mixup alpha (0 = off).")
@click.option("--cutmix", "cutmix_alpha", type=click.FloatRange(min=0), default=None, help="CutMix alpha (0 = off).")
@click.option("--balance", type=click.Choice(["auto", "none", "weights", "sampler"]), default=None,
              help="Imbalanced classes: loss weights or a balanced sampler [auto: weights above 1.5x].")
@click.option("--patience", type=click.IntRange(min=0), default=None,
              help="Early stopping: epochs without a better validation loss (0 = off).")
@click.option("--freeze-backbone", is_flag=True, default=None, help="Train the classifier only (a linear probe).")
@click.option("--probe-epochs", type=click.IntRange(min=0), default=None,
              help="LP-FT: the first N epochs train the classifier only, then everything (0 = off).")
@click.option("--backbone-lr-scale", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="The pretrained backbone's learning rate as a share of the classifier's [1].")
@click.option("--val-fraction", type=float, default=None, help="Share of each class for validation [0.1].")
@click.option("--test-fraction", type=float, default=None,
              help="Share of each class held out for the test figures [0.1; a test/ folder wins].")
@click.option("--target-precision", type=float, default=None,
              help="Precision the review threshold must give on validation [0.995].")
@click.option("--threshold-confidence", type=click.FloatRange(0.5, 1, max_open=True), default=None,
              help="Confidence level of that precision's lower bound (Clopper-Pearson) [0.9].")
@click.option("--shift-calibration/--no-shift-calibration", default=None,
              help="The threshold's precision must hold on the validation photos under the robustness shifts too "
                   "(pooled), not only as they are [on].")
@click.option("--device", default=None, callback=_check_device, metavar="DEVICE", help=f"{_DEVICE_HELP} [auto].")
@click.option("--threads", type=click.IntRange(min=0), default=None, help="Torch threads [0 = all cores].")
@click.option("--amp/--no-amp", default=None,
              help="Mixed-precision training steps: CUDA, or a CPU with native bf16 (AVX512_BF16/AMX) [on].")
@click.option("--seed", type=int, default=None, help="Seed of the split, sampling and augmentation [0].")
@click.option("--init-from", default=None, metavar="MODEL",
              help="Fine-tune this model file (path, s3:// URI or bundled:NAME) instead of starting from ImageNet "
                   "weights: its architecture and input size, a 5x lower peak learning rate unless --lr is given.")
@click.option("--from-catalog", "from_catalog", default=None, metavar="DB_URL",
              help="Add the photos of this catalog's human-reviewed rows to the training split (the feedback loop; "
                   "validation and test stay DATA_DIR's).")
@click.option("--attribute", default=None, metavar="NAME",
              help="What DATA_DIR's folder names are values of: 'category' (the item's category), or another "
                   "attribute such as toe or material, which a sort writes beside the category [category].")
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt/last.pt with its recipe and split.")
@click.option("--no-onnx", is_flag=True, help="Do not write the ONNX export beside OUT (what INVSORT_RUNTIME="
              "onnxruntime/openvino run; 'invsort export-onnx OUT' makes it later).")
@click.option("--no-progress", is_flag=True)
@_handle_errors
def train(data_dir: str, out: str, image_size: str | None, grayscale: bool | None, resume: bool, no_progress: bool,
          from_catalog: str | None, no_onnx: bool, **options: Any) -> None:
    """Check, split, train, calibrate and score a model on DATA_DIR; write the model file and its model card.

    DATA_DIR has one sub-folder per category, or train/ and test/ folders of them. With no options the
    recipe comes from the photos: small grayscale images (Fashion-MNIST) train the custom CNN from scratch,
    product photos fine-tune MobileNetV2 (pass --weights for ImageNet weights) at the photos' own size.
    Next to OUT: OUT's name with .split.csv (split manifest), .card.md (model card) and OUT.ckpt/ (checkpoints).

    \b
    Examples:
      invsort train photos/ --out shoes.pt --weights ../shared/weights/mobilenet_v2_imagenet.pth
      invsort train fashion-mnist/ --out fm.pt
      invsort train photos/ --out shoes.pt --resume
      invsort train photos/ --out shoes-v2.pt --init-from shoes.pt --from-catalog sqlite:///invsort.db --epochs 3
      invsort train toe-photos/ --out toe.pt --attribute toe   # folders open_toe/ and closed/
    """
    from pipeline.training.recipe import train as run_train

    overrides = {k: v for k, v in options.items() if v is not None}
    if image_size is not None:
        overrides["image_size"] = _parse_size(image_size)
    if grayscale is not None:
        overrides["in_chans"] = 1 if grayscale else 3
    def log_line(line: str) -> None:  # flushed: a long run's log is read while it is written (tail -f)
        click.echo(line)
        sys.stdout.flush()

    feedback = None
    if from_catalog is not None:
        from pipeline.feedback import catalog_feedback

        feedback = catalog_feedback(from_catalog, log_fn=log_line)
    run_train(data_dir, out, None, overrides=overrides, resume=resume, progress=not no_progress, log_fn=log_line,
              feedback=feedback, export_onnx=not no_onnx)


@main.command("calibrate-ood")
@click.argument("model")
@click.argument("data_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Model file to write (default: overwrite MODEL).")
@click.option("--tpr", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Fraction of in-distribution photos the threshold keeps as known.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fit/threshold split of DATA_DIR.")
@_handle_errors
def calibrate_ood(model: str, data_dir: str, out: str | None, tpr: float, seed: int) -> None:
    """Fit the open-set score ("none of my categories") onto MODEL without retraining.

    DATA_DIR holds the model's classes (one sub-folder each; its training photos or photos like them): a seeded
    70% fits the score (Mahalanobis on the penultimate features), the other 30% sets the threshold for --tpr.

    \b
    Example:
      invsort calibrate-ood shoes.pt train/ --out shoes.ood.pt
    """
    from pipeline.evaluation.openset import calibrate_ood as run_calibrate

    if out is None and model.startswith("bundled:"):
        raise click.UsageError("a bundled model cannot be overwritten; give --out")
    mf = run_calibrate(model, data_dir, out or model, tpr=tpr, seed=seed)
    assert mf.open_set is not None
    click.echo(f"open set: {mf.open_set.method} on {mf.open_set.n_fit} images, threshold "
               f"{mf.open_set.threshold:.6g} for TPR {tpr:.2f} on {mf.open_set.n_val}; wrote {out or model} "
               f"(version {mf.version})")


@main.command("calibrate")
@click.argument("model")
@click.argument("val_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Model file to write (default: overwrite MODEL).")
@click.option("--shifts/--no-shifts", default=True, show_default=True,
              help="Choose on VAL_DIR's photos and the same photos under the robustness shifts, pooled (else on the "
                   "photos alone).")
@click.option("--target-precision", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Precision the threshold promises [the model file's own, else 0.995].")
@click.option("--threshold-confidence", type=click.FloatRange(0.5, 1, max_open=True), default=None,
              help="Confidence level of that precision's Clopper-Pearson lower bound [the file's own, else 0.9].")
@click.option("--per-class", type=click.IntRange(min=0), default=0, show_default=True,
              help="At most this many photos per class (seeded; 0 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset and the shifts.")
@click.option("--no-progress", is_flag=True)
@_handle_errors
def calibrate(model: str, val_dir: str, out: str | None, shifts: bool, target_precision: float | None,
              threshold_confidence: float | None, per_class: int, seed: int, no_progress: bool) -> None:
    """Re-choose MODEL's review threshold on VAL_DIR without retraining (the temperature is kept).

    VAL_DIR holds the model's classes (one sub-folder each) in photos it was not trained on, e.g. its
    validation split. With --shifts (the default) the threshold's precision promise must hold on those photos
    and on them under the shifts of 'invsort evaluate's robustness report, pooled; the file's info records
    what it was chosen on. Prints the precision and coverage per shift at the new threshold.

    \b
    Example:
      invsort calibrate shoes.pt val/ --out shoes.shiftcal.pt
    """
    from pipeline.evaluation.shift_calibration import describe, recalibrate

    if out is None and model.startswith("bundled:"):
        raise click.UsageError("a bundled model cannot be overwritten; give --out")
    mf, choice = recalibrate(model, val_dir, out or model, shifts=shifts, target_precision=target_precision,
                             confidence_level=threshold_confidence, per_class=per_class or None, seed=seed,
                             progress=not no_progress)
    for row in choice.get("per_shift", []):
        prec = "n/a" if row["precision"] != row["precision"] else f"{row['precision']:.4f}"
        click.echo(f"  {row['name']:<18} n {row['n']:>5}  sorted {row['coverage']:6.1%}  precision {prec}  "
                   f"errors sorted {row['errors_sorted']}")
    click.echo(f"{describe(choice)}; was {choice['previous_threshold']:.4f}; wrote {out or model} "
               f"(version {mf.version})")


@main.command("models")
def models_cmd() -> None:
    """List the architectures that --arch accepts, with their default input size."""
    from pipeline.models.registry import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        click.echo(f"{name:<20} {spec.input_size[0]}x{spec.input_size[1]}")


@main.command("model-info")
@click.argument("model")
@_handle_errors
def model_info(model: str) -> None:
    """Show what a model file holds (architecture, classes, input, version, validation accuracy)."""
    from pipeline.models.modelfile import load_model_file

    mf = load_model_file(model)
    click.echo(f"{mf.name}  version {mf.version}  arch {mf.arch}  created {mf.created_at}")
    click.echo(f"input {mf.input_size[0]}x{mf.input_size[1]}x{mf.in_chans}  mean {mf.mean}  std {mf.std}")
    click.echo(f"classes ({mf.num_classes}): {', '.join(mf.class_names)}")
    chosen_on = (mf.info.get("threshold") or {}).get("chosen_on")
    click.echo(f"temperature {mf.temperature:.3f}  review threshold {mf.review_threshold:.4f}"
               + (f" (chosen on {chosen_on})" if chosen_on else ""))
    if mf.open_set is None:
        click.echo("open set: none (photos of other things are not rejected; fit one with 'invsort calibrate-ood')")
    else:
        click.echo(f"open set: {mf.open_set.method}  threshold {mf.open_set.threshold:.6g}  "
                   f"TPR {mf.open_set.tpr:.2f} (of {mf.open_set.n_val} validation images kept as known)")
    if mf.info.get("best_val_acc") is not None:
        click.echo(f"validation top-1 accuracy {mf.info['best_val_acc']:.4f} (epoch {mf.info.get('best_epoch')})")
    test = mf.info.get("test")
    if test:
        sel = test.get("at_threshold", {})
        click.echo(f"test top-1 accuracy {test['accuracy']:.4f} on {test['n']} images; at the threshold precision "
                   f"{sel.get('precision', float('nan')):.4f}, coverage {sel.get('coverage', 0):.3f}")
    from pipeline.models.modelcard import evaluation_lines

    for line in evaluation_lines(mf.info.get("evaluations") or []):
        if line and not line.startswith("Recorded by"):
            click.echo(line.removeprefix("## ").removeprefix("### "))


@main.command("export-onnx")
@click.argument("model")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="The .onnx file to write [default: beside MODEL, e.g. shoes.pt -> shoes.onnx].")
@_handle_errors
def export_onnx(model: str, out: str | None) -> None:
    """Export MODEL's network to ONNX for INVSORT_RUNTIME=onnxruntime / openvino (needs torch and the 'onnx' extra).

    Writes FILE.onnx and its record FILE.onnx.json (the model version it was made from, and PyTorch's outputs that
    every load is checked against), checked with the installed runtime. Processes without torch ('invsort[cpu]')
    use the export beside the model file, or in INVSORT_RUNTIME_CACHE_DIR, only for the version it was made from.
    'invsort train' writes it too. For an s3:// model give --out, then upload both files beside the model.
    """
    from pipeline.models.runtimes import export_model_file

    path, record = export_model_file(model, out)
    checked = ", ".join(f"{name} {version}" for name, version in record.checked.items()) or "no runtime installed"
    click.echo(f"exported {model} (version {record.model_version}) to {path} and {path}.json; checked with {checked}")


class _DefaultGroup(click.Group):
    """A group that runs its ``default`` command when the first argument names none of its commands, so that
    ``invsort bench SOURCE ...`` means ``invsort bench run SOURCE ...``."""

    def __init__(self, *args: Any, default: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@main.group(cls=_DefaultGroup, default="run")
def bench() -> None:
    """Benchmarks: invsort against its peers (run, the default), catalog writes alone (catalog), the HTTP API
    (api), fetching from S3 across a round trip (s3).

    \b
    Examples:
      invsort bench examples/images --model bundled:fashion_mnist_cnn --json bench.json
      invsort bench catalog postgresql://postgres@127.0.0.1/test --rows 100000 --batch-size 64 --batch-size 256
      invsort bench s3 photos/ --model shoes.pt --rtt-ms 0 --rtt-ms 20 --broker redis://127.0.0.1:6379/7
    """


@bench.command("run")
@click.argument("source")
@click.option("--model", "model", default=None, help="Model file: path or bundled:NAME [default: INVSORT_MODEL_PATH, "
              "else the bundled Fashion-MNIST model].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N images (stable order).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Images per batch in every batched peer.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@click.option("--db-url", "db_urls", multiple=True, help="Also run invsort into this database (PostgreSQL: in a "
              "scratch schema, dropped afterwards); repeatable. A temporary SQLite file is always used.")
@click.option("--peer", "peers", multiple=True, help="Run only these peers (repeatable): model_only, decode_only, "
              "naive, ray, invsort [default: all].")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Torch threads in the model_only, naive and invsort peers (0: torch's default).")
@click.option("--ray-config", default=None, help="Fixed Ray layout instead of tuning, e.g. "
              "'actors=2,cpus=0.75,threads=1,decode=actor' (keys: actors, cpus, threads, decode, read_cpus, "
              "decode_cpus, batch_size).")
@click.option("--ray-tune-images", type=click.IntRange(min=1), default=512, show_default=True,
              help="Images per Ray layout tried before the measured Ray run.")
@click.option("--upserts", "upsert_rows", type=click.IntRange(min=0), default=0,
              help="Also time catalog upserts alone with this many rows on each database (0: no).")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, metavar="DEVICE",
              help="Where model_only, naive and invsort run the network: auto, cpu, cuda or cuda:N "
              "(decode_only and ray run on the CPU).")
@click.option("--gpu-decode", "gpu_decodes", type=click.Choice(["auto", "on", "off"]), multiple=True,
              help="INVSORT_GPU_DECODE for the invsort peer; repeat it for one run per mode "
              "(e.g. --gpu-decode on --gpu-decode off) [default: auto].")
@_handle_errors
def bench_run(source: str, model: str | None, limit: int | None, batch_size: int, json_path: str | None,
              db_urls: tuple[str, ...], peers: tuple[str, ...], threads: int, ray_config: str | None,
              ray_tune_images: int, upsert_rows: int, device: str, gpu_decodes: tuple[str, ...]) -> None:
    """Measure invsort against its peers on the same images, model and machine; print a table.

    Peers, each in its own process: model_only (forward passes on a batch in memory: the ceiling),
    decode_only (read + OpenCV decode + normalise, threaded), naive (PIL + torchvision, one image at a time),
    ray (Ray Data with an actor pool, layout tuned first; needs pip install -e '.[bench]') and invsort
    (the embedded pipeline writing a fresh catalog). images/s counts from the first image to the last
    result; imports, model load and Ray start-up are reported apart as setup. 'invsort bench SOURCE' is
    short for 'invsort bench run SOURCE'.

    \b
    Example:
      invsort bench examples/images --model bundled:fashion_mnist_cnn --json bench.json
      invsort bench photos/ --model shoes.pt --limit 2000 --db-url postgresql://postgres@127.0.0.1/catalog
      invsort bench photos/ --model shoes.pt --device cuda --batch-size 256 --gpu-decode on --gpu-decode off
    """
    from pipeline.bench.peers import format_table, parse_ray_config, run_bench

    report = run_bench(
        source, model_spec=model or _settings().model_path, limit=limit, batch_size=batch_size,
        peers=peers or None, db_urls=db_urls, threads=threads,
        ray_config=parse_ray_config(ray_config, batch_size=batch_size) if ray_config else None,
        ray_tune_images=ray_tune_images, upsert_rows=upsert_rows, device=device, gpu_decodes=gpu_decodes or ("auto",),
        on_event=lambda line: click.echo(line, err=True),
    )
    click.echo(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"report written to {json_path}")
    failed = [name for name, r in report["peers"].items() if r.get("status") == "error"]
    if failed:
        raise click.ClickException(f"peer(s) failed: {', '.join(failed)} (reasons in the table above)")


@bench.command("catalog")
@click.argument("url")
@click.option("--rows", type=click.IntRange(min=1), default=100_000, show_default=True, help="Rows per pass.")
@click.option("--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True,
              help="Rows per upsert call, one committed transaction each; repeatable [default: 256].")
@_handle_errors
def bench_catalog(url: str, rows: int, batch_sizes: tuple[int, ...]) -> None:
    """Measure catalog upserts alone (rows/s) on the database at URL; print one JSON line per batch size.

    Works in a scratch schema (PostgreSQL) or a scratch file next to it (SQLite), removed afterwards: the
    tables at URL are never read or written.

    \b
    Example:
      invsort bench catalog postgresql://postgres@127.0.0.1/test --rows 100000 --batch-size 64 --batch-size 256
    """
    from pipeline.bench.catalog import bench_upserts

    for batch_size in batch_sizes or (256,):
        click.echo(json.dumps(bench_upserts(url, rows=rows, batch_size=batch_size)))


@bench.command("api")
@click.argument("source", required=False, default=None)
@click.option("--model", "model", default=None, help="Model file: path or bundled:NAME [default: INVSORT_MODEL_PATH, "
              "else the bundled Fashion-MNIST model].")
@click.option("--requests", type=click.IntRange(min=1), default=500, show_default=True,
              help="Timed requests per phase, one photo each (cycling through the photos).")
@click.option("--clients", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests in flight in the concurrent phase.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True,
              help="Requests before each phase, not timed.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N photos (stable order).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@_handle_errors
def bench_api(source: str | None, model: str | None, requests: int, clients: int, warmup: int, limit: int | None,
              json_path: str | None) -> None:
    """Measure POST /v1/classify over HTTP, one photo a request: latency (p50/p95/p99 ms) one request at a time,
    images/s with --clients requests in flight, and the embedded pipeline's images/s on the same photos.

    Starts 'invsort serve' on a free 127.0.0.1 port with a temporary SQLite catalog and the model (on the CPU, like
    the embedded pipeline, which runs after the server has stopped), and prints a table with the goal lines
    (p95 <= 150 ms; clients >= 0.8x embedded). The client shares the machine with the server. SOURCE: a folder of
    photos [default: the bundled examples, examples/images].

    \b
    Example:
      invsort bench api /data/shoes/holdout --model shoes.pt --requests 1000 --clients 8 --json api.json
    """
    from pipeline.bench.api import format_api_table, run_api_bench

    settings = _settings()
    report = run_api_bench(
        source or str(Path(__file__).resolve().parents[1] / "examples" / "images"),
        model_spec=model or settings.model_path, requests=requests, clients=clients, warmup=warmup, limit=limit,
        batch_size=settings.batch_size, on_event=lambda line: click.echo(line, err=True),
    )
    click.echo(format_api_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"report written to {json_path}")
    errors = report["sequential"]["errors"] + report["concurrent"]["errors"]
    if errors or report["embedded"].get("status") != "ok":
        raise click.ClickException(f"{errors} request(s) failed ({report['sequential']['first_error'] or ''}"
                                   f"{report['concurrent']['first_error'] or ''}); embedded: "
                                   f"{report['embedded'].get('status')}")


@bench.command("s3")
@click.argument("source")
@click.option("--model", "model", default=None, help="Model file: path or bundled:NAME [default: INVSORT_MODEL_PATH, "
              "else the bundled Fashion-MNIST model].")
@click.option("--rtt-ms", "rtts_ms", type=click.FloatRange(min=0), multiple=True,
              help="Round trip to S3, ms (0: no relay); repeatable [default: 0 and 20].")
@click.option("--fetch-concurrency", "fetch_concurrencies", type=click.IntRange(1, 1024), multiple=True,
              help="INVSORT_FETCH_CONCURRENCY of the S3 peers; repeatable [default: the setting's].")
@click.option("--mode", type=click.Choice(["queued", "embedded"]), default="queued", show_default=True,
              help="queued: an invsort worker and invsort submit --wait; embedded: invsort sort.")
@click.option("-c", "--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="The worker's pool processes (queued).")
@click.option("--broker", default=None, help="A Redis database of the benchmark's own, empty (queued), "
              "e.g. redis://127.0.0.1:6379/7.")
@click.option("--db-url", default=None, help="Catalog for the jobs [default: a fresh SQLite file per run].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N photos (stable order).")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of the whole list of peers, in turn.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@_handle_errors
def bench_s3(source: str, model: str | None, rtts_ms: tuple[float, ...], fetch_concurrencies: tuple[int, ...],
             mode: str, processes: int, broker: str | None, db_url: str | None, limit: int | None, repeat: int,
             json_path: str | None) -> None:
    """Measure sorting SOURCE's photos from S3 across a network round trip against reading them from local files.

    Starts an S3 API on 127.0.0.1 (moto's, under uvicorn; needs moto[server]), uploads the photos, puts a relay
    that delays every packet by half the round trip in front of it, and runs the queued path (an invsort worker
    against --broker, then invsort submit --wait) or the embedded one (invsort sort) on local files and on S3 at
    each --rtt-ms and --fetch-concurrency. Prints images/s per run, the median and the ratio to local files (goal:
    >= 0.9x at 20 ms), the worker's CPU ms per image and the CPU seconds the S3 server took from the same cores.

    \b
    Example:
      invsort bench s3 photos/ --model shoes.pt --rtt-ms 0 --rtt-ms 20 --broker redis://127.0.0.1:6379/7
    """
    from pipeline.bench.s3 import format_s3_table, run_s3_bench

    settings = _settings()
    report = run_s3_bench(
        source, model_spec=model or settings.model_path, rtts_ms=rtts_ms or (0.0, 20.0),
        fetch_concurrencies=fetch_concurrencies or (settings.fetch_concurrency,), mode=mode, processes=processes,
        broker=broker, db_url=db_url, limit=limit, repeat=repeat, on_event=lambda line: click.echo(line, err=True),
    )
    click.echo(format_s3_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"report written to {json_path}")


@bench.command("peer", hidden=True)
def bench_peer() -> None:
    """One benchmark peer in this process (started by 'invsort bench run'): its spec as JSON on standard input,
    its result as one line on standard output."""
    from pipeline.bench.peers import serve_peer

    serve_peer(sys.stdin, sys.stdout)


@main.group()
def db() -> None:
    """Catalog database: its schema (Alembic migrations) and the history's retention."""


@db.command("upgrade")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@_handle_errors
def db_upgrade(database_url: str | None) -> None:
    """Migrate the catalog database to the latest schema (creates the tables on an empty one)."""
    from db.migrate import current_revision, upgrade

    settings = _settings(database_url=database_url)
    upgrade(settings.database_url)
    click.echo(f"{_safe_url(settings.database_url)} at revision {current_revision(settings.database_url)}")


@db.command("current")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@_handle_errors
def db_current(database_url: str | None) -> None:
    """Print the database's schema revision and the latest one."""
    from db.migrate import current_revision, head_revision

    settings = _settings(database_url=database_url)
    click.echo(f"current {current_revision(settings.database_url)}, head {head_revision()}")


@db.command("prune-history")
@click.option("--days", type=click.IntRange(min=1), default=None,
              help="Delete entries older than this [default: INVSORT_HISTORY_RETENTION_DAYS].")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@_handle_errors
def db_prune_history(days: int | None, database_url: str | None) -> None:
    """Delete catalog_history entries older than the retention, except each item's latest entry.

    Without --days and INVSORT_HISTORY_RETENTION_DAYS the history is kept whole and nothing is deleted. `invsort
    beat` prunes daily (03:17 UTC) when INVSORT_HISTORY_RETENTION_DAYS is set; without beat, run this from cron.
    """
    from db.history import prune_history, retention_cutoff
    from db.migrate import ensure_at_head
    from db.session import session_scope

    settings = _settings(database_url=database_url, history_retention_days=days)
    if settings.history_retention_days is None:
        click.echo("no retention set (INVSORT_HISTORY_RETENTION_DAYS or --days): the history is kept whole")
        return
    ensure_at_head(settings.database_url)
    cutoff = retention_cutoff(settings.history_retention_days)
    with session_scope(settings.database_url) as session:
        deleted = prune_history(session=session, older_than=cutoff)
    click.echo(f"{deleted} history entr{'y' if deleted == 1 else 'ies'} older than {cutoff:%Y-%m-%d %H:%M} UTC "
               "deleted (each item's latest entry kept)")


@main.group()
def data() -> None:
    """Photo sets: export Fashion-MNIST as folders of PNG files."""


@data.command("fashion-mnist")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--idx-dir", type=click.Path(file_okay=False), default="/usr/share/datasets/fashion-mnist",
              show_default=True, help="Folder of the idx(.gz) files (Debian: dataset-fashion-mnist).")
@click.option("--limit", type=int, default=None, help="Write at most this many images.")
@click.option("--every", type=click.IntRange(min=1), default=1, help="Keep one image in N.")
@_handle_errors
def data_fashion_mnist(out: str, split: str, idx_dir: str, limit: int | None, every: int) -> None:
    """Write Fashion-MNIST's SPLIT as OUT/<Class>/<split>_<index>.png (folder per category).

    \b
    Example:
      invsort data fashion-mnist /tmp/fmnist/train --split train
    """
    from pipeline.io.fashion_mnist import export_png_tree

    n = export_png_tree(out, split, idx_dir=Path(idx_dir), limit=limit, every=every)
    click.echo(f"wrote {n} images to {out}")


@data.command("check")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="Write the leak-free train/val/test split here (CSV split,class,path,sha256).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Held out per class.")
@click.option("--test-fraction", type=float, default=0.1, show_default=True,
              help="Held out per class (ignored when DATA_DIR has its own test/).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--near-dup-distance", type=click.IntRange(0, 16), default=8, show_default=True,
              help="Perceptual-hash distance of a near-duplicate candidate, in 64ths of the hash's bits; "
                   "the thumbnails must agree too.")
@click.option("--min-side", type=click.IntRange(min=1), default=32, show_default=True, help="Smallest side, px.")
@_handle_errors
def data_check(data_dir: str, manifest: str | None, val_fraction: float, test_fraction: float, seed: int,
               near_dup_distance: int, min_side: int) -> None:
    """Check DATA_DIR (folder per category, or train/ + test/ of them): class balance, bad files, exact and
    near-duplicate photos, label conflicts; optionally write a split that keeps duplicates together.

    \b
    Example:
      invsort data check photos/ --manifest photos_split.csv
    """
    from pipeline.training.dataprep import check_dataset, grouped_split, write_split_manifest

    t0 = time.perf_counter()
    r = check_dataset(data_dir, min_side_px=min_side, near_dup_distance=near_dup_distance)
    good = len(r.images)
    click.echo(f"{good + len(r.bad_files)} files, {good} good images, {len(r.class_names)} classes "
               f"({time.perf_counter() - t0:.1f} s)")
    for split_name, counts in (r.split_class_counts or {"all": r.class_counts}).items():
        click.echo(f"  {split_name}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    click.echo(f"imbalance (largest/smallest class): {r.imbalance:.2f}")
    click.echo(f"bad files: {len(r.bad_files)}")
    for path, reason in r.bad_files:
        click.echo(f"  {path}: {reason}")
    for title, groups in (("exact duplicate", r.exact_duplicates), ("near-duplicate", r.near_duplicates)):
        n_files = sum(len(g) for g in groups)
        click.echo(f"{title} groups: {len(groups)} ({n_files} files)")
        for g in groups[:5]:
            click.echo("  " + " | ".join(g))
    click.echo(f"label conflicts (one photo under several classes): {len(r.conflicts)}")
    for names, paths in r.conflicts[:10]:
        click.echo(f"  {'/'.join(names)}: " + " | ".join(paths))
    if manifest:
        split = grouped_split(r, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        digest = write_split_manifest(split, manifest, hashes={i.path: i.sha256 for i in r.images})
        sizes = ", ".join(f"{s} {len(v)}" for s, v in split.items())
        click.echo(f"split manifest ({sizes}) written to {manifest}  sha256 {digest}")


@main.command()
@click.argument("model")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per forward pass.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, metavar="DEVICE",
              help=f"{_DEVICE_HELP}.")
@click.option("--robustness/--no-robustness", default=True, show_default=True,
              help="Also score DATA_DIR's photos under the shifts real photos show (framing, small product, photo "
              "backgrounds, JPEG 30, blur, light, rotation, large sources).")
@click.option("--robustness-per-class", type=click.IntRange(min=0), default=100, show_default=True,
              help="Photos per class scored under each shift (a seeded subset; 0: all).")
@click.option("--extra", "extra", multiple=True, metavar="NAME=DIR", callback=_check_extra,
              help="A further labelled folder (e.g. real photos) scored beside DATA_DIR; repeatable. Folders of "
              "classes the model does not know are reported as such (how many it sorts automatically).")
@click.option("--ood", "ood_dir", type=click.Path(file_okay=False), default=None, metavar="OOD_DIR",
              help="A folder of photos of none of the model's classes: report the open-set score's AUROC and FPR at "
              "95% TPR against DATA_DIR, and a histogram of the two score distributions.")
@click.option("--record", is_flag=True, help="Also store these figures in MODEL (a local file) and its model card, "
              "where 'invsort model-info' shows them; its version does not change.")
@_handle_errors
def evaluate(model: str, data_dir: str, out_dir: str, batch_size: int, device: str, robustness: bool,
             robustness_per_class: int, extra: dict[str, str], ood_dir: str | None, record: bool) -> None:
    """Evaluate MODEL on DATA_DIR (one sub-folder per category, named as the model's classes).

    Writes report.json, report.md and plots (confusion matrix, reliability diagram with ECE, training
    curves, most confident errors, robustness per shift) into the --out folder.

    \b
    Example:
      invsort evaluate bundled:fashion_mnist_cnn examples/images --out report/
      invsort evaluate shoes.pt holdout/ --out report/ --extra real=real_photos/
    """
    from pipeline.evaluation.report import evaluate as run_evaluate

    r = run_evaluate(model, data_dir, out_dir, batch_size=batch_size, device=device, robustness=robustness,
                     robustness_per_class=robustness_per_class or None, extra=extra, ood=ood_dir)
    click.echo(f"{r['images_evaluated']} images evaluated ({r['images_failed']} failed to decode)")
    click.echo(f"top-1 accuracy {r['accuracy']:.4f}  macro F1 {r['macro_avg']['f1']:.4f}  ECE {r['ece']:.4f}")
    if r.get("robustness"):
        worst = max(r["robustness"]["shifts"], key=lambda s: s["accuracy_drop"] if s["n"] else -1.0)
        click.echo(f"robustness: {len(r['robustness']['shifts'])} shifts; worst {worst['name']} (top-1 "
                   f"{worst['accuracy']:.4f}, {worst['accuracy_drop']:+.4f} below the photos as they are)")
    for name, x in (r.get("extra") or {}).items():
        known = f"top-1 {x['known']['accuracy']:.4f}" if x["known"] else "no photo of the model's classes"
        unknown = f", {x['unknown']['sorted']} of {x['unknown']['n']} unknown-class photos auto-sorted" \
            if x["unknown"] else ""
        click.echo(f"extra {name}: {x['images_evaluated']} images, {known}{unknown}")
    if (o := r.get("open_set")) is not None:
        click.echo(f"open set ({o['method']}): AUROC {o['auroc']:.4f}  FPR at 95% TPR {o['fpr_at_95_tpr']:.4f}  "
                   f"{o['ood_auto_sorted']} of {o['n_ood']} OOD photos auto-sorted")
    click.echo(f"report: {Path(out_dir) / 'report.md'} (and report.json, *.png)")
    if record:
        from pipeline.evaluation.report import record_evaluation

        click.echo(f"recorded in {model} and its model card {record_evaluation(model, r)}")


@main.group()
def jobs() -> None:
    """Cancel or retry queued jobs (see also 'invsort status')."""


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@_handle_errors
def jobs_cancel(job_id: str, database_url: str | None) -> None:
    """Cancel JOB_ID: its queued batches are skipped; a batch a worker is running finishes and keeps its rows.

    \b
    Example:
      invsort jobs cancel 3f1c...e9
    """
    from pipeline.jobs import cancel

    settings = _settings(database_url=database_url)
    if cancel(settings, job_id):
        click.echo(f"job {job_id} cancelled")
    else:
        click.echo(f"job {job_id} had already ended: nothing to cancel")


@jobs.command("retry")
@click.argument("job_id")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@_handle_errors
def jobs_retry(job_id: str, database_url: str | None) -> None:
    """Queue JOB_ID's failed, cancelled and lost batches again (a job that has ended, queued by 'submit').

    \b
    Example:
      invsort jobs retry 3f1c...e9 && invsort status 3f1c...e9
    """
    from pipeline.jobs import retry
    from worker.tasks import enqueue_batch

    settings = _settings(database_url=database_url)
    n = retry(settings, job_id, enqueue_batch)
    click.echo(f"job {job_id}: {n} batch(es) queued again" if n else f"job {job_id}: nothing to retry")


# ------------------------------------------------------------------------------------- exports, webhooks

_EXPORT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@main.command("export")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None,
              help="csv (topk as JSON text), jsonl (one object a row) or parquet (typed columns; needs "
              "'pip install invsort[parquet]') [default: from --out's suffix].")
@click.option("--out", default="-", show_default=True, metavar="FILE",
              help="File to write (replaced when the export is complete), or - for standard output.")
@click.option("--status", type=click.Choice(["sorted", "needs_review", "failed", "reviewed"]), default=None,
              help="Only rows with this status.")
@click.option("--category", default=None, help="Only rows of this category.")
@click.option("--job", "job_id", default=None, help="Only rows last written by this job.")
@click.option("--model-version", default=None, help="Only rows sorted by this model version.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None, help="Only rows at least this confident.")
@click.option("--max-confidence", type=click.FloatRange(0, 1), default=None, help="Only rows at most this confident.")
@click.option("--row-group-rows", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Parquet: rows per row group (what is held in memory at most).")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@_handle_errors
def export(fmt: str | None, out: str, status: str | None, category: str | None, job_id: str | None,
           model_version: str | None, min_confidence: float | None, max_confidence: float | None,
           row_group_rows: int, database_url: str | None) -> None:
    """Export the catalog's rows (all, or those the filters keep), streamed in key order: memory stays flat.

    The columns are those of the catalog page's export: item_id, image_uri, status, category, confidence, topk,
    error, model_name, model_version, job_id, updated_at, model_category, model_confidence, reviewed_by,
    reviewed_at. The confidence bounds are inclusive and leave out rows without a confidence.

    \b
    Example:
      invsort export --format csv --status needs_review > review.csv
      invsort export --out catalog.parquet --min-confidence 0.9
    """
    from db.export import parquet_schema, walk_items, write_export
    from db.migrate import ensure_at_head
    from db.queries import ItemFilters
    from pipeline.io.files import atomic_path

    if fmt is None:
        fmt = _EXPORT_SUFFIXES.get(Path(out).suffix.lower()) if out != "-" else None
        if fmt is None:
            raise click.UsageError("give --format csv, jsonl or parquet (or an --out file ending in one of them)")
    if min_confidence is not None and max_confidence is not None and min_confidence > max_confidence:
        raise click.BadParameter(f"--min-confidence {min_confidence} is above --max-confidence {max_confidence}")
    if fmt == "parquet":
        if out == "-" and sys.stdout.isatty():
            raise click.UsageError("Parquet is binary: give --out FILE, or redirect standard output")
        parquet_schema()  # pyarrow is there (else: what to install), before anything is written
    settings = _settings(database_url=database_url)
    ensure_at_head(settings.database_url)
    filters = ItemFilters(status=status, category=category, min_confidence=min_confidence,
                          max_confidence=max_confidence, model_version=model_version, job_id=job_id)
    rows = walk_items(settings.database_url, filters)
    if out == "-":
        sys.stdout.flush()
        n = write_export(rows, fmt, sys.stdout.buffer, row_group_rows=row_group_rows)
        sys.stdout.buffer.flush()
    else:
        with atomic_path(out) as tmp, tmp.open("wb") as sink:
            n = write_export(rows, fmt, sink, row_group_rows=row_group_rows)
    click.echo(f"{n} row{'' if n == 1 else 's'} exported as {fmt}" + ("" if out == "-" else f" to {out}"), err=True)


@main.group()
def webhooks() -> None:
    """Webhooks: a signed POST to INVSORT_WEBHOOK_URL for each change of an item and each job that ends.

    Every 'invsort worker' delivers them (one at a time); without workers (embedded sorts) run 'invsort webhooks
    run', or 'invsort webhooks run --once' from cron.
    """


def _webhook_settings(database_url: str | None) -> Settings:
    from db.migrate import ensure_at_head

    settings = _settings(database_url=database_url)
    ensure_at_head(settings.database_url)
    return settings


@webhooks.command("run")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit (exit status 1 when an attempt "
              "failed: the event is retried next time); without it, run until Ctrl-C.")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@_handle_errors
def webhooks_run(once: bool, database_url: str | None) -> None:
    """Produce and deliver webhook events (INVSORT_WEBHOOK_URL, INVSORT_WEBHOOK_SECRET), as the workers do.

    \b
    Example:
      invsort webhooks run --once   # from cron, after embedded sorts
    """
    import contextlib
    import threading

    from pipeline.webhooks import Dispatcher, safe_webhook_url

    settings = _webhook_settings(database_url)
    if settings.webhook_url is None:
        raise ConfigError("INVSORT_WEBHOOK_URL is not set: there is nowhere to deliver webhooks to")
    dispatcher = Dispatcher(settings)
    if not once:
        click.echo(f"delivering webhooks to {safe_webhook_url(settings.webhook_url)} (Ctrl-C stops)", err=True)
        with contextlib.suppress(KeyboardInterrupt):
            dispatcher.run_forever(threading.Event())
        return
    totals = {"produced": 0, "delivered": 0, "failed": 0}
    errors: list[str] = []
    try:
        while True:
            report = dispatcher.run_once()
            if not report.leader:
                click.echo("another process delivers the webhooks now (it holds the lease): nothing done", err=True)
                return
            for name in totals:
                totals[name] += getattr(report, name)
            errors += report.errors
            if not report.more:
                break
    finally:
        dispatcher.close()
    click.echo(", ".join(f"{n} {name}" for name, n in totals.items()))
    if errors:
        click.echo(f"last failure: {errors[-1]}", err=True)
        sys.exit(1)


@webhooks.command("status")
@click.option("--db", "database_url", default=None, help="Catalog database URL.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_handle_errors
def webhooks_status(database_url: str | None, as_json: bool) -> None:
    """Show the webhooks' outbox: pending and delivered events, the oldest pending, the last error."""
    from datetime import UTC, datetime

    from pipeline.webhooks import webhooks_status as read_status

    settings = _webhook_settings(database_url)
    st = read_status(settings)
    if as_json:
        click.echo(json.dumps(st.to_json()))
        return
    o = st.outbox
    click.echo(f"url: {st.url or 'unset (INVSORT_WEBHOOK_URL): nothing is produced'}; events: {', '.join(st.events)}")
    click.echo(f"delivered by: {st.holder or 'nobody now'}")
    age = "" if o.oldest_pending is None else \
        f", the oldest produced {(datetime.now(UTC) - o.oldest_pending).total_seconds():.0f} s ago"
    click.echo(f"pending: {o.pending} ({o.due} due now{age}); delivered and kept: {o.delivered}")
    if o.pending:
        click.echo(f"most attempts of a pending event: {o.most_attempts}")
    if o.last_error:
        click.echo(f"last error: {o.last_failed_event}: {o.last_error}")
    cursor = "never ran" if o.feed_cursor is None else f"{o.feed_cursor} of {o.feed_end}"
    click.echo(f"change feed read up to: {cursor}")


# --- re-categorisation and the scheduler ------------------------------------------------------------------------


def _parse_before(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"must be an ISO 8601 date or time, e.g. 2026-11-30 or 2026-11-30T12:00:00+01:00 "
                                 f"(UTC when it has no offset), got {value!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


_FILTER_FLAGS = {"categories": "--category", "statuses": "--status", "job_ids": "--job", "before": "--before"}


def _recategorize_rollback(settings: Settings, job_id: str) -> None:
    from pipeline.recategorize import rollback

    counts = rollback(settings, job_id)
    click.echo(f"job {job_id} rolled back: {counts.restored} items got their previous prediction back; left as they "
               f"are: {counts.changed_since} changed since the job, {counts.reviewed} reviewed by a person since, "
               f"{counts.created} created by the job (kept: nothing to go back to)")


def _recategorize_dry_run(settings: Settings, model: str | None, filters: dict[str, Any]) -> None:
    from pipeline.recategorize import plan

    p = plan(settings, model_spec=model, **filters)
    where = f"with model {p.model_name} version {p.selection.version} in {_safe_url(settings.database_url)}"
    if not p.items:
        click.echo(f"dry run: nothing to re-sort {where}")
        return
    click.echo(f"dry run: {p.items} items would be re-sorted {where}")
    seconds = p.seconds or 0.0
    took = f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"
    click.echo(f"estimated time: {took} (the forward pass at {p.images_per_s:.1f} images/s on {p.device}, "
               f"measured here on {p.probe_images} blank images; reading and decoding the photos add to it)")


def _recategorize_report(settings: Settings, path: str | None, job_id: str | None) -> Any:
    """The job's from/to pairs (empty without a job), written to ``path`` when given."""
    from collections import Counter

    from pipeline.recategorize import report_pairs, write_report

    pairs = report_pairs(settings, job_id) if job_id is not None else Counter()
    if path is not None:
        items = write_report(path, pairs)
        click.echo(f"report: {path} ({items} items in {len(pairs)} from/to pairs)")
    return pairs


def _recategorize_run(settings: Settings, model: str | None, filters: dict[str, Any], local_roots: tuple[str, ...],
                      report: str | None, queue: bool, wait: bool, no_progress: bool) -> None:
    from pipeline.progress import progress
    from pipeline.recategorize import recategorize

    started: list[str] = []
    bar = None if queue else progress(desc="re-sorting", unit="img", disable=no_progress)
    enqueue = None
    if queue:
        from worker.tasks import enqueue_batch

        model_spec = model or settings.model_path

        def enqueue(job_id: str, batch_no: int, task_id: str) -> None:
            enqueue_batch(job_id, batch_no, task_id, model_spec)

    try:
        outcome = recategorize(settings, model_spec=model, extra_roots=local_roots, enqueue=enqueue,
                               on_job=started.append, on_progress=None if bar is None else
                               lambda rows: bar.update(len(rows)), **filters)
    except BaseException:
        if bar is not None:
            bar.close()
        if report is not None:  # what this run did: nothing, or the rows its job wrote before it stopped
            _recategorize_report(settings, report, started[0] if started else None)
        raise
    if bar is not None:
        bar.close()
    version = outcome.selection.version
    if outcome.skipped:
        click.echo(f"{outcome.skipped} items not re-sorted: their photos are outside the local roots (e.g. "
                   f"{outcome.first_skipped}); add their folders to INVSORT_LOCAL_ROOTS or pass --local-root")
    if outcome.job_id is None:
        click.echo(f"nothing to re-sort: every row of {_safe_url(settings.database_url)} that is not reviewed and "
                   f"matches the filters is on model version {version} already")
        _recategorize_report(settings, report, None)
        return
    if queue:
        click.echo(f"job {outcome.job_id}: {outcome.items} images in {outcome.batches} tasks queued "
                   f"(re-categorisation to model version {version})")
        if wait or report is not None:
            code = _wait(outcome.job_id, settings.database_url, outcome.items)
            _recategorize_report(settings, report, outcome.job_id)
            sys.exit(code)
        return
    s = outcome.summary
    assert s is not None
    pairs = _recategorize_report(settings, report, outcome.job_id)
    moved = sum(n for (before, after), n in pairs.items() if before != after)
    click.echo(f"re-sorted {s.images} items in {s.seconds:.1f} s ({s.images_per_s:.1f} images/s): {s.sorted} sorted, "
               f"{s.needs_review} needs_review, {s.failed} failed; {moved} changed category")
    click.echo(f"job {outcome.job_id} (model version {version}); roll it back with: invsort recategorize --rollback "
               f"{outcome.job_id}")


@main.command()
@click.option("--model", "models", multiple=True, help="Model file to re-sort with: path, s3:// URI or bundled:NAME; "
              "again for models of other attributes (items lacking their version's values are re-sorted too) "
              "[default: INVSORT_MODEL_PATH, else the bundled Fashion-MNIST model].")
@click.option("--db", "database_url", default=None, help="Catalog database URL [default: INVSORT_DATABASE_URL].")
@click.option("--dry-run", is_flag=True, help="Print how many items would be re-sorted and an estimate of the "
              "time; write nothing.")
@click.option("--report", default=None, type=click.Path(dir_okay=False), metavar="FILE.csv",
              help="Write from_category,to_category,items: one line per pair (unchanged ones too), summing to the "
              "items re-sorted; a header alone when none were. With --queue it waits for the job.")
@click.option("--queue", is_flag=True, help="Queue the job for the Celery workers (INVSORT_BROKER_URL) instead of "
              "sorting in this process.")
@click.option("--wait", is_flag=True, help="With --queue: show progress until the job ends; exit status 0 done, "
              "1 failed, 3 cancelled.")
@click.option("--category", "categories", multiple=True, metavar="CATEGORY",
              help="Only rows of this category (repeatable).")
@click.option("--status", "statuses", multiple=True, type=click.Choice(["sorted", "needs_review", "failed"]),
              help="Only rows of this status (repeatable; reviewed rows are never re-sorted).")
@click.option("--job", "job_ids", multiple=True, metavar="JOB", help="Only rows last written by this job "
              "(repeatable).")
@click.option("--before", callback=_parse_before, metavar="TIME",
              help="Only rows last written before TIME (ISO 8601; UTC when it has no offset).")
@click.option("--local-root", "local_roots", multiple=True, type=click.Path(file_okay=False, exists=True),
              metavar="DIR", help="Local photos in DIR may be read too (repeatable; embedded).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per forward pass [64].")
@click.option("--device", default=None, callback=_check_device, metavar="DEVICE",
              help=f"{_DEVICE_HELP} [default: INVSORT_DEVICE, else auto].")
@click.option("--rollback", "rollback_job", default=None, metavar="JOB",
              help="Instead: put back the prediction each item had before JOB (any sort's job), from the history.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_handle_errors
def recategorize(models: tuple[str, ...], database_url: str | None, dry_run: bool, report: str | None, queue: bool,
                 wait: bool, categories: tuple[str, ...], statuses: tuple[str, ...], job_ids: tuple[str, ...],
                 before: Any, local_roots: tuple[str, ...], batch_size: int | None, device: str | None,
                 rollback_job: str | None, no_progress: bool) -> None:
    """Re-sort every catalog row whose model version is not MODEL's, never a reviewed one.

    Embedded (in this process) by default; --queue makes it a job for the workers. Filters narrow the rows. Local
    photos are read inside INVSORT_LOCAL_ROOTS and --local-root folders, and (embedded) wherever an earlier sort
    read them; a row whose photo is outside is left as it is and counted. One re-categorisation runs at a time.

    \b
    Examples:
      invsort recategorize --model shoes.pt --dry-run
      invsort recategorize --model shoes.pt --report changes.csv
      invsort recategorize --model shoes.pt --category Boot --before 2026-11-01 --queue --wait
      invsort recategorize --model shoes.pt --model toe.pt   # every item gets toe.pt's toe too
      invsort recategorize --rollback 3f1c...e9
    """
    from db.migrate import ensure_at_head, upgrade

    filters = dict(categories=categories, statuses=statuses, job_ids=job_ids, before=before)
    model = models[0] if models else None
    filters_and_models: dict[str, Any] = {**filters, "more_models": models[1:]}
    others = [name for name, on in (("--model", model), ("--dry-run", dry_run), ("--report", report),
                                    ("--queue", queue), ("--wait", wait), ("--local-root", local_roots))
              if on] + [flag for name, flag in _FILTER_FLAGS.items() if filters[name]]
    if rollback_job is not None and others:
        raise click.UsageError(f"--rollback JOB takes no {', '.join(others)}: it puts back what JOB replaced")
    if dry_run and report is not None:
        raise click.UsageError("--dry-run writes nothing: leave --report out")
    if wait and not queue:
        raise click.UsageError("--wait is for --queue (an embedded run always waits)")
    if queue and local_roots:
        raise click.UsageError("--local-root is for an embedded run: the workers read what their own "
                               "INVSORT_LOCAL_ROOTS allow")
    settings = _settings(database_url=database_url, batch_size=batch_size, device=device)
    if rollback_job is not None or dry_run or queue:
        ensure_at_head(settings.database_url)
    else:
        upgrade(settings.database_url)
    if rollback_job is not None:
        _recategorize_rollback(settings, rollback_job)
    elif dry_run:
        _recategorize_dry_run(settings, model, filters_and_models)
    else:
        _recategorize_run(settings, model, filters_and_models, local_roots, report, queue, wait, no_progress)


@main.command()
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option("--every", "every_s", type=click.FloatRange(min=1), default=None, hidden=True,
              help="For tests: send the re-categorisation every SECONDS instead of on INVSORT_RECATEGORIZE_SCHEDULE.")
@_handle_errors
def beat(loglevel: str, every_s: float | None) -> None:
    """Send the scheduled tasks to the workers (Celery beat): a re-categorisation on INVSORT_RECATEGORIZE_SCHEDULE,
    the history's pruning daily when INVSORT_HISTORY_RETENTION_DAYS is set.

    Safe to start more than once: one beat at a time sends (it holds a lease in the database); the others stand by
    and one takes over within 30 s when it stops. A run that finds nothing to re-sort ends at once.

    \b
    Example:
      INVSORT_RECATEGORIZE_SCHEDULE='0 3 * * *' invsort beat
    """
    from db.migrate import ensure_at_head
    from pipeline.logs import set_log_format
    from pipeline.settings import get_settings

    settings = get_settings()
    set_log_format(settings.log_format)
    level = logging.getLevelName(loglevel.upper())
    if isinstance(level, int):  # Celery leaves the root logger alone (worker_hijack_root_logger=False)
        logging.getLogger().setLevel(level)
    ensure_at_head(settings.database_url)
    from worker.app import RECATEGORIZE_TASK, app

    schedule = app.conf.beat_schedule
    if every_s is not None:
        schedule["invsort-recategorize"] = {"task": RECATEGORIZE_TASK, "schedule": every_s}
    if not schedule:
        log.warning("beat: nothing is scheduled: set INVSORT_RECATEGORIZE_SCHEDULE or INVSORT_HISTORY_RETENTION_DAYS")
    for name, entry in schedule.items():
        click.echo(f"invsort beat: {entry['task']} ({name}) on {entry['schedule']}", err=True)
    app.Beat(scheduler="worker.beat:LeaderScheduler", loglevel=loglevel, quiet=settings.log_format == "json").run()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
