"""``POST /v1/classify``: photos uploaded in one request, classified at once, nothing written to the catalog."""

from __future__ import annotations

import functools
import time
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request

from pipeline.sorting import classify_images
from worker.web.context import Ctx
from worker.web.schemas import ApiError, Classification, ClassifyOut
from worker.web.uploads import read_uploads

router = APIRouter(tags=["classify"])

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
        work = functools.partial(classify_images, [(u.filename, u.file) for u in uploads], settings=s,
                                 model_spec=ctx.model_spec)
        rows = await anyio.to_thread.run_sync(work, limiter=ctx.classify_limiter)
        ctx.metrics.classified(time.perf_counter() - started, rows)
    finally:
        for upload in uploads:
            upload.file.close()
    return ClassifyOut(results=[Classification.of(row) for row in rows])
