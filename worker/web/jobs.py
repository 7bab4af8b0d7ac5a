"""``/v1/jobs``: start a job on a source, read one or the latest, cancel one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, status

from db.catalog import JobNotFoundError, get_job, list_jobs
from db.session import session_scope
from pipeline.errors import ModelFileError, SourceError, TransientError
from pipeline.jobs import cancel
from worker.web.context import Ctx, WebContext
from worker.web.runner import EmbeddedJobBusy
from worker.web.schemas import ApiError, CancelOut, JobIn, JobList, JobOut, JobStarted

router = APIRouter(tags=["jobs"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ApiError, "description": "no such job"}}


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
               422: {"model": ApiError, "description": "the source is outside the allowed folders, missing, or "
                     "not a folder, prefix or manifest"},
               503: {"model": ApiError, "description": "the model or storage did not answer"}},
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


@router.get("/v1/jobs", response_model=JobList, summary="The latest jobs")
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
