"""Where the jobs the API starts run: on the Celery queue when a broker is configured and answers, else in the
server's background (embedded), one at a time.

- **queued**: ``INVSORT_BROKER_URL`` is set (environment or ``.env``) and its Redis answers a PING within
  :data:`BROKER_PING_TIMEOUT_S`: :func:`pipeline.sorting.submit_job` lists the source in a background thread,
  storing its batches and enqueuing them (:func:`worker.tasks.enqueue_batch`) for ``invsort worker`` processes.
- **embedded**: otherwise (no broker set, or it did not answer): :func:`pipeline.sorting.sort_source` sorts it in a
  background thread of the server. A second embedded job while one runs is refused (:class:`EmbeddedJobBusy`).

Either way the request returns once the job's row is committed (:class:`Started`); errors before that (a source
outside the allowed folders, missing, or of an unknown kind) are raised to the request. Local sources must lie in
``INVSORT_LOCAL_ROOTS``: unlike ``invsort sort``, the API never allows the folder it is given by itself.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Literal

from db.catalog import fail_job
from db.session import session_scope
from pipeline.settings import Settings
from pipeline.sorting import sort_source, submit_job

log = logging.getLogger(__name__)

BROKER_PING_TIMEOUT_S = 2.0
Mode = Literal["embedded", "queued"]


def shown_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for answers and logs)."""
    return re.sub(r"^([a-z0-9+.-]+://[^:/@]*):[^@/]*@", r"\1:***@", url, flags=re.IGNORECASE)


def choose_mode(settings: Settings) -> tuple[Mode, str]:
    """``(mode, reason)``: ``queued`` when ``INVSORT_BROKER_URL`` was set and its Redis answers a PING, else
    ``embedded``; ``reason`` names the broker (password hidden) or says why none is used."""
    if "broker_url" not in settings.model_fields_set:
        return "embedded", "INVSORT_BROKER_URL is not set: the job runs in this server"
    import redis

    shown = shown_url(settings.broker_url)
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=BROKER_PING_TIMEOUT_S,
                                  socket_timeout=BROKER_PING_TIMEOUT_S)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return "embedded", f"broker {shown} did not answer ({first}): the job runs in this server"
    finally:
        client.close()
    return "queued", f"batches queued on broker {shown} for invsort worker processes"


class EmbeddedJobBusy(Exception):
    """An embedded job is still running: the server runs one at a time."""

    def __init__(self, job_id: str | None) -> None:
        self.job_id = job_id
        super().__init__(f"embedded job {job_id or '(starting)'} is still running: this server sorts one job at a "
                         "time without a broker; wait for it, cancel it, or set INVSORT_BROKER_URL and run invsort "
                         "worker processes")


@dataclass(frozen=True)
class Started:
    job_id: str
    mode: Mode
    reason: str


class JobStarter:
    """Starts the API's jobs (see the module docstring) and stops the embedded one when the server stops.

    Args:
        settings: the database, limits, local roots and broker.
        model_spec: the model every job sorts with (a queued job's workers must be able to read it).
    """

    def __init__(self, settings: Settings, model_spec: str) -> None:
        self.settings, self.model_spec = settings, model_spec
        self._lock = threading.Lock()
        self._embedded: threading.Thread | None = None
        self._embedded_job: str | None = None
        self._threads: set[threading.Thread] = set()

    def start(self, source: str, *, limit: int | None = None) -> Started:
        """Start a job on ``source`` (at most ``limit`` images) and return once its row is committed.

        Raises:
            EmbeddedJobBusy: it would run embedded and an embedded job is running.
            SourceError, PermissionError, FileNotFoundError: the source is outside the allowed folders, missing, or
                not a folder, prefix or manifest.
            ModelFileError, OSError, sqlalchemy.exc.SQLAlchemyError: the model or the database failed first.
        """
        mode, reason = choose_mode(self.settings)
        created = threading.Event()
        box: dict[str, object] = {}
        thread = threading.Thread(target=self._run, args=(source, limit, mode, created, box), daemon=True,
                                  name=f"invsort-{mode}-job")
        with self._lock:
            if mode == "embedded":
                if self._embedded is not None and self._embedded.is_alive():
                    raise EmbeddedJobBusy(self._embedded_job)
                self._embedded, self._embedded_job = thread, None
            self._threads.add(thread)
        thread.start()
        created.wait()
        job_id = box.get("job_id")
        if not isinstance(job_id, str):
            error = box.get("error")
            raise error if isinstance(error, BaseException) else RuntimeError("the job thread ended without a job")
        return Started(job_id, mode, reason)

    def _run(self, source: str, limit: int | None, mode: Mode, created: threading.Event,
             box: dict[str, object]) -> None:
        def on_job(job_id: str) -> None:
            box["job_id"] = job_id
            if mode == "embedded":
                with self._lock:
                    self._embedded_job = job_id
            created.set()

        try:
            if mode == "embedded":
                sort_source(source, settings=self.settings, model_spec=self.model_spec, limit=limit, on_job=on_job,
                            allow_source_root=False)
            else:
                submit_job(source, settings=self.settings, model_spec=self.model_spec, enqueue=self._enqueue,
                           limit=limit, on_job=on_job, allow_source_root=False)
        except BaseException as exc:  # noqa: BLE001 - a thread's end: before the row, the request raises it
            if "job_id" in box:  # the job service recorded it on the job's row
                log.warning("%s job %s stopped: %s: %s", mode, box["job_id"], type(exc).__name__, exc)
            else:
                box["error"] = exc
        finally:
            created.set()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _enqueue(self, job_id: str, batch_no: int, task_id: str) -> None:
        from worker.tasks import enqueue_batch  # the Celery app is built from INVSORT_BROKER_URL on first use

        enqueue_batch(job_id, batch_no, task_id, self.model_spec)

    def running_embedded(self) -> str | None:
        """The id of the embedded job running now, if any."""
        with self._lock:
            alive = self._embedded is not None and self._embedded.is_alive()
            return self._embedded_job if alive else None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Fail the embedded job still running (``the server stopped while it ran``; it stops after its batch in
        progress, whose rows are kept) and wait up to ``timeout_s`` seconds for the job threads. A queued job still
        being listed is left to the reconciler of the workers, which fails it after 10 minutes."""
        job_id = self.running_embedded()
        if job_id is not None:
            try:
                with session_scope(self.settings.database_url) as session:
                    fail_job(session=session, job_id=job_id, error="the server stopped while the job ran; the rows "
                             "written so far are kept: start it again to sort the rest")
            except Exception as exc:  # noqa: BLE001 - the database may be what is gone
                log.warning("embedded job %s could not be marked failed: %s", job_id, type(exc).__name__)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s / max(1, len(threads)))
