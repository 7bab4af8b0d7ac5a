"""``/v1/jobs``: start a job on a source, read one or the latest, follow one (server-sent events), cancel one."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from db.catalog import JobNotFoundError, get_job, list_jobs
from db.session import session_scope
from pipeline.errors import ModelFileError, SourceError, TransientError
from pipeline.jobs import cancel
from worker.web.context import Ctx, WebContext
from worker.web.runner import EmbeddedJobBusy
from worker.web.schemas import BAD_JSON, ApiError, CancelOut, JobIn, JobList, JobOut, JobStarted, RequestError

log = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

ENDED = ("done", "failed", "cancelled")
EVENTS_POLL_S = 0.5  # how often a stream reads its job's row
EVENTS_PING_S = 15.0  # a keep-alive comment this often (proxies close idle connections)
EVENTS_RETRY_MS = 2000  # the reconnection delay a stream tells EventSource clients

_INVALID: dict[int | str, dict[str, Any]] = {422: {"model": RequestError, "description": "a parameter that does not "
                                                    "fit the schema"}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ApiError, "description": "no such job"}, **_INVALID}


def _job(ctx: WebContext, job_id: str) -> JobOut:
    with session_scope(ctx.settings.database_url) as session:
        job = get_job(session=session, job_id=job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return JobOut.of(job)


@router.post(
    "/v1/jobs",
    response_model=JobStarted,
    status_code=status.HTTP_201_CREATED,
    summary="Start a job",
    responses={409: {"model": ApiError, "description": "an embedded job is running (one at a time)"},
               422: {"model": RequestError, "description": "a body that does not fit the schema; a source outside the "
                     "allowed folders, missing, or not a folder, prefix or manifest"},
               503: {"model": ApiError, "description": "the model or storage did not answer"}, **BAD_JSON},
)
def start_job(body: JobIn, ctx: Ctx) -> JobStarted:
    """Sort every image of `source` with the server's model into the catalog.

    The job goes to the Celery queue when INVSORT_BROKER_URL is set and its Redis answers (`mode` = `queued`, for
    `invsort worker` processes), else it runs in this server's background (`mode` = `embedded`, one at a time);
    `mode_reason` says why. Answers once the job's row exists; follow it with `GET /v1/jobs/{job_id}`.
    """
    try:
        started = ctx.jobs.start(body.source, limit=body.limit)
    except EmbeddedJobBusy as exc:
        raise HTTPException(409, str(exc)) from None
    except (SourceError, PermissionError, FileNotFoundError) as exc:
        raise HTTPException(422, f"source: {exc}") from None
    except (ModelFileError, TransientError) as exc:
        raise HTTPException(503, f"{type(exc).__name__}: {exc}") from None
    ctx.metrics.jobs_started.labels(started.mode).inc()
    job = _job(ctx, started.job_id)
    return JobStarted(**job.model_dump(), mode=started.mode, mode_reason=started.reason)


@router.get("/v1/jobs", response_model=JobList, summary="The latest jobs", responses=_INVALID)
def latest_jobs(ctx: Ctx,
                limit: int = Query(20, ge=1, le=500, description="jobs to return, newest first (1..500)")) -> JobList:
    """The `limit` most recently created jobs, newest first, whoever started them (CLI, API, workers)."""
    with session_scope(ctx.settings.database_url) as session:
        jobs = list_jobs(session=session, limit=limit)
    return JobList(jobs=[JobOut.of(job) for job in jobs])


@router.get("/v1/jobs/{job_id}", response_model=JobOut, summary="One job", responses=_NOT_FOUND)
def one_job(job_id: str, ctx: Ctx) -> JobOut:
    """A job's state and counts."""
    return _job(ctx, job_id)


_EVENTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "`text/event-stream`: one event (`id`, `retry`, `data`) each time the job's status or counts change, "
            "the first at once; `data` is the job as `GET /v1/jobs/{job_id}` gives it (JobOut). A `: ping` comment "
            f"every {EVENTS_PING_S:.0f} s keeps the connection open; the stream closes after the event whose "
            "`status` is done, failed or cancelled, and when the server stops."),
        "content": {"text/event-stream": {
            "schema": {  # one event (Open API 3.1: the schema of an event stream is that of each event)
                "type": "object",
                "required": ["id", "data"],
                "properties": {
                    "id": {"type": "string", "description": "increasing: 1, 2, ... (Last-Event-ID + 1, ... on a "
                           "reconnect)"},
                    "data": {"type": "string", "contentMediaType": "application/json",
                             "contentSchema": {"$ref": "#/components/schemas/JobOut"},
                             "description": "the job, as GET /v1/jobs/{job_id} gives it"},
                    "retry": {"type": "integer", "minimum": 0, "description": "reconnection delay, ms"},
                    "event": {"type": "string", "description": "always the default, message"},
                },
            },
            "example": ('id: 1\ndata: {"id": "4b0c…", "status": "running", "processed": 16, …}\nretry: 2000\n\n'
                        'id: 2\ndata: {"id": "4b0c…", "status": "done", "processed": 50, …}\nretry: 2000\n\n'),
        }},
    },
    **_NOT_FOUND,
}


def _first_event_id(last_event_id: str | None) -> int:
    """The id of a stream's first event: one more than the ``Last-Event-ID`` a reconnecting client sends (ids keep
    increasing across reconnects), else 1."""
    text = (last_event_id or "").strip()
    return int(text) + 1 if text.isascii() and text.isdigit() and len(text) < 18 else 1


async def _job_events(request: Request, ctx: WebContext, first: JobOut, next_id: int,
                      shutdown: anyio.Event) -> AsyncIterator[ServerSentEvent]:
    """The job's state now, then again each time it changes (read every :data:`EVENTS_POLL_S` s in a worker thread),
    until it ends, the client goes away, the server stops or the database fails."""
    job, sent = first, None
    read = functools.partial(_job, ctx, first.id)
    while True:
        data = job.model_dump_json()
        if data != sent:
            yield ServerSentEvent(data=data, id=str(next_id), retry=EVENTS_RETRY_MS)
            sent, next_id = data, next_id + 1
        if job.status in ENDED:
            return
        with anyio.move_on_after(EVENTS_POLL_S):
            await shutdown.wait()
        if shutdown.is_set() or await request.is_disconnected():
            return
        try:
            job = await anyio.to_thread.run_sync(read)
        except HTTPException:  # the row is gone
            return
        except Exception as exc:  # noqa: BLE001 - the database failed: end the stream, the client reconnects
            log.warning("events of job %s: the job could not be read (%s): stream closed", first.id,
                        type(exc).__name__)
            return


@router.get("/v1/jobs/{job_id}/events", summary="Follow a job (server-sent events)", response_class=Response,
            responses=_EVENTS_DOC)
async def job_events(job_id: str, request: Request, ctx: Ctx,
                     last_event_id: str | None = Header(None, description="the `id` of the last event received "
                                                        "(EventSource sends it when it reconnects): the stream "
                                                        "starts again from the job's state now")) -> Response:
    """Follow a job as it runs: an [EventSource](https://html.spec.whatwg.org/multipage/server-sent-events.html)
    stream of its state, the same JSON as `GET /v1/jobs/{job_id}`, sent when its status or counts change. Event ids
    increase; a reconnect (with `Last-Event-ID`) starts with the state now. The stream ends after the job has ended
    (done, failed or cancelled), with that state as its last event.
    """
    first = await anyio.to_thread.run_sync(functools.partial(_job, ctx, job_id))  # 404 before the stream starts
    shutdown = anyio.Event()  # set by sse-starlette when uvicorn starts to stop: the stream ends
    events = _job_events(request, ctx, first, _first_event_id(last_event_id), shutdown)
    return EventSourceResponse(events, ping=EVENTS_PING_S, sep="\n", shutdown_event=shutdown,
                               shutdown_grace_period=2 * EVENTS_POLL_S)


@router.post("/v1/jobs/{job_id}/cancel", response_model=CancelOut, summary="Cancel a job", responses=_NOT_FOUND)
def cancel_job(job_id: str, ctx: Ctx) -> CancelOut:
    """Cancel a job that is listing or running (`invsort jobs cancel`): its queued batches are skipped, a batch in
    progress (a worker's, or the embedded job's) finishes and keeps its rows. A job that had already ended is left
    as it is (`cancelled` false)."""
    try:
        done = cancel(ctx.settings, job_id)
    except JobNotFoundError:
        raise HTTPException(404, f"no job {job_id!r}") from None
    job = _job(ctx, job_id)
    message = f"job {job_id} cancelled" if done else f"job {job_id} had already ended ({job.status}): nothing to cancel"
    return CancelOut(cancelled=done, message=message, job=job)
