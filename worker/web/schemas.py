"""Request and response bodies of the HTTP API (pydantic models; FastAPI documents them at ``/docs``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from db.catalog import CatalogRow, JobStatus
from pipeline.records import ItemResult


class ApiError(BaseModel):
    """Every error answer: ``detail`` says what went wrong and, for bad input, what is valid."""

    detail: str


class ValidationIssue(BaseModel):
    """One problem of a request that does not fit the API's schema."""

    loc: list[str | int] = Field(description="where: the part (body, query, path, header) and the field")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, greater_than_equal")


class RequestError(ApiError):
    """A request the API refuses (422): ``detail`` says every problem in one line, and for a request that does not
    fit the schema ``errors`` lists them one by one (absent when a valid request was refused for what it names)."""

    errors: list[ValidationIssue] | None = Field(None, description="each problem, when the request did not fit the "
                                                 "schema")


#: The 400 of every route with a JSON body: FastAPI's answer to a body that is not JSON at all.
BAD_JSON: dict[int | str, dict[str, Any]] = {400: {"model": ApiError, "description": "the body is not JSON"}}


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="12 hex characters of a SHA-256 over the model file's content")
    classes: list[str]
    review_threshold: float = Field(description="calibrated confidence (0..1) below which a photo is needs_review")


class DatabaseHealth(BaseModel):
    reachable: bool
    dialect: str = Field(description="sqlite or postgresql")
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: ModelInfo
    database: DatabaseHealth


class Classification(BaseModel):
    """One uploaded photo's result (nothing is written to the catalog)."""

    filename: str = Field(description="the upload's file name, as sent")
    status: str = Field(description="sorted, needs_review (below the review threshold, or `error` = unknown) or "
                        "failed (`error` says why)")
    category: str | None = Field(description="top-1 category; null when failed")
    confidence: float | None = Field(description="top-1 calibrated probability, 0..1; null when failed")
    topk: list[tuple[str, float]] = Field(description="up to 5 [category, probability], best first")
    error: str | None = None

    @classmethod
    def of(cls, row: ItemResult) -> Classification:
        return cls(filename=row.item_id, status=row.status, category=row.category, confidence=row.confidence,
                   topk=[(str(c), float(p)) for c, p in row.topk], error=row.error)


class ClassifyOut(BaseModel):
    results: list[Classification] = Field(description="one per uploaded file, in upload order")


class JobIn(BaseModel):
    """A job to start on the server's model."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=4096, description=(
        "a folder or file:// URI inside INVSORT_LOCAL_ROOTS, s3://bucket/prefix, or a .csv/.jsonl manifest "
        "(columns item_id,image_uri)"), examples=["s3://catalogue/photos/"])
    # le: a count the sort can take (a larger one was a 500: islice refuses it)
    limit: int | None = Field(None, ge=1, le=2**63 - 1, description="sort at most this many images")


class JobOut(BaseModel):
    """A ``sorting_jobs`` row. Status: listing -> running -> done, failed or cancelled."""

    id: str
    source: str
    model_path: str
    model_name: str
    model_version: str
    status: str
    total_items: int | None = Field(description="known once the listing has finished")
    total_batches: int | None
    batches_done: int
    sorted_count: int
    needs_review_count: int
    failed_count: int
    processed: int = Field(description="sorted + needs_review + failed so far")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, job: JobStatus) -> JobOut:
        return cls(**{name: getattr(job, name) for name in cls.model_fields if name in JobStatus.__slots__},
                   processed=job.processed)


class JobStarted(JobOut):
    mode: Literal["embedded", "queued"] = Field(description=(
        "queued: batches on the Celery queue for `invsort worker` processes; embedded: sorted in this server's "
        "background, one job at a time"))
    mode_reason: str = Field(description="why this mode: the broker used, or why none was")


class JobList(BaseModel):
    jobs: list[JobOut] = Field(description="newest first")


class CancelOut(BaseModel):
    cancelled: bool = Field(description="true if this call cancelled the job; false if it had already ended")
    message: str
    job: JobOut


class ItemOut(BaseModel):
    """A ``catalog_items`` row. A ``reviewed`` row has the person's ``category`` (null: not a product / unknown), no
    ``confidence``, the model's prediction in ``model_category`` / ``model_confidence`` and who decided when."""

    model_config = ConfigDict(extra="allow")

    item_id: str
    image_uri: str
    status: str
    category: str | None
    confidence: float | None
    topk: list[tuple[str, float]]
    error: str | None
    model_name: str | None
    model_version: str | None
    job_id: str | None
    updated_at: datetime
    model_category: str | None = None
    model_confidence: float | None = None
    reviewed_by: str | None = None
    reviewed_at: datetime | None = None
    attributes: dict[str, str | None] = Field(default_factory=dict, description="the item's other attributes "
                                              "(what the job's models of them predicted), e.g. {\"toe\": \"open_toe\"}")

    @classmethod
    def of(cls, row: CatalogRow) -> ItemOut:
        values: dict[str, Any] = {name: getattr(row, name) for name in CatalogRow.__slots__}
        return cls(**values)


class ItemPageOut(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class ReviewIn(BaseModel):
    """A person's decision on one item: its category, or null for "not a product / unknown"."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, description="the item's whole id, as GET /v1/items gives it")
    category: str | None = Field(description="one of the server model's categories; null: not a product / unknown")
    reviewer: str = Field(min_length=1, max_length=255, description="who decided")


class ReviewEntry(BaseModel):
    """The entry the decision appended to the ``reviews`` log."""

    model_config = ConfigDict(extra="allow")

    id: int
    item_id: str
    action: str = Field(description="review")
    category: str | None
    reviewer: str
    decided_at: datetime
    model_category: str | None = Field(description="the model's top-1 the decision corrected or confirmed")
    model_confidence: float | None
    previous_status: str
    previous_category: str | None


class ReviewOut(BaseModel):
    review: ReviewEntry
    item: ItemOut = Field(description="the item's row after the decision (status reviewed)")
