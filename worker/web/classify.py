"""``POST /v1/classify``: photos uploaded in one request, classified at once, nothing written to the catalog.

Requests that arrive together share forward passes (:class:`~worker.web.batcher.ClassifyBatcher`, started and
stopped by this router's lifespan, which FastAPI runs inside the app's own).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, HTTPException, Request

from pipeline.records import ItemResult
from pipeline.sorting import classify_images
from worker.web.batcher import BatcherClosedError, BatcherOptions, ClassifyBatcher
from worker.web.context import Ctx, WebContext
from worker.web.schemas import ApiError, Classification, ClassifyOut
from worker.web.uploads import Upload, read_uploads

BATCHER_STATE = "classify_batcher"  # the app.state attribute that holds the app's ClassifyBatcher


@asynccontextmanager
async def batcher_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the app's :class:`ClassifyBatcher` (``app.state.classify_batcher``) once the app's lifespan has loaded
    the model; at the end, finish the requests it holds and stop it.

    Raises:
        ConfigError: ``INVSORT_CLASSIFY_BATCH_WAIT_MS`` or ``INVSORT_CLASSIFY_FORWARD_THREADS`` is not valid.
    """
    ctx: WebContext = app.state.invsort
    options = BatcherOptions.from_settings(ctx.settings)
    # Made and started in a worker thread, as the app's lifespan loads the model: the same torch thread count,
    # so the same cached predictor (pipeline.sorting.get_predictor).
    batcher = await anyio.to_thread.run_sync(functools.partial(
        ClassifyBatcher, ctx.settings, ctx.model_spec, options, on_batch=ctx.metrics.batched))
    try:
        await anyio.to_thread.run_sync(batcher.start)
        setattr(app.state, BATCHER_STATE, batcher)
        yield
    finally:
        if hasattr(app.state, BATCHER_STATE):
            delattr(app.state, BATCHER_STATE)
        await anyio.to_thread.run_sync(batcher.close)


router = APIRouter(tags=["classify"], lifespan=batcher_lifespan)

FIELD = "file"
MAX_FILES = 32  # photos per request; more belong in a job

_MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": [FIELD],
            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                   "description": f"one or more photos (at most {MAX_FILES}), each a field "
                                                  f"named {FIELD!r}"}},
        }}},
    }
}


@router.post(
    "/v1/classify",
    response_model=ClassifyOut,
    summary="Classify uploaded photos",
    responses={413: {"model": ApiError, "description": "a photo is over INVSORT_MAX_IMAGE_BYTES"},
               422: {"model": ApiError, "description": "not multipart/form-data, no photo, another field, too many"}},
    openapi_extra=_MULTIPART_BODY,
)
async def classify(request: Request, ctx: Ctx) -> ClassifyOut:
    """Classify one or more photos sent as `multipart/form-data` fields named `file`, as `invsort sort` would
    (same decoder, limits, model, review threshold), without writing the catalog.

    Results come in upload order. A photo that cannot be read (empty, not an image, truncated, too small, too many
    pixels) gets status `failed` with its `error`; the others are still classified. A photo over
    INVSORT_MAX_IMAGE_BYTES stops the request with 413 as soon as its bytes pass the limit.
    """
    s = ctx.settings
    uploads = await read_uploads(request, field=FIELD, max_file_bytes=s.max_image_bytes, max_files=MAX_FILES)
    try:
        started = time.perf_counter()
        rows = await _classify(request, ctx, uploads)
        ctx.metrics.classified(time.perf_counter() - started, rows)
    finally:
        for upload in uploads:
            upload.file.close()
    return ClassifyOut(results=[Classification.of(row) for row in rows])


async def _classify(request: Request, ctx: WebContext, uploads: list[Upload]) -> list[ItemResult]:
    """The uploads' rows: through the app's batcher; without one (an app whose lifespan did not run, e.g. a
    ``TestClient`` not used as a context manager), one :func:`classify_images` call for this request alone."""
    photos = [(u.filename, u.file) for u in uploads]
    batcher: ClassifyBatcher | None = getattr(request.app.state, BATCHER_STATE, None)
    if batcher is None:
        work = functools.partial(classify_images, photos, settings=ctx.settings, model_spec=ctx.model_spec)
        return await anyio.to_thread.run_sync(work, limiter=ctx.classify_limiter)
    try:
        return await batcher.classify(photos)
    except BatcherClosedError as exc:
        raise HTTPException(503, str(exc)) from None
