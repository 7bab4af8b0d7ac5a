"""Photos uploaded as ``multipart/form-data``, read as they stream in, each refused as soon as it is too large.

Starlette's form parser has no limit on a file's size; this reader (python-multipart's streaming parser, the one
Starlette uses) stops a request at the first byte over the limit, so an oversized upload is neither buffered nor
written to disk whole. Each photo is spooled: in memory up to :data:`SPOOL_BYTES`, then in a temporary file.
"""

from __future__ import annotations

from dataclasses import dataclass
from tempfile import SpooledTemporaryFile
from typing import TYPE_CHECKING

from fastapi import HTTPException, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

SPOOL_BYTES = 1 << 20  # an upload is kept in memory up to 1 MiB, then in a temporary file
_PART_OVERHEAD = 16 << 10  # boundary and part headers allowed per file when checking Content-Length


@dataclass
class Upload:
    """One uploaded file: its name as sent ("" when none was) and its bytes, spooled (read from position 0)."""

    filename: str
    file: SpooledTemporaryFile[bytes]
    size: int = 0


def too_large(what: str, limit: int) -> HTTPException:
    """The 413 answer for an upload over ``limit`` bytes."""
    return HTTPException(413, f"{what} is larger than the limit of {limit} bytes a photo (INVSORT_MAX_IMAGE_BYTES)")


class _Parts:
    """python-multipart callbacks that collect the parts named ``field`` as :class:`Upload` objects."""

    def __init__(self, field: str, max_file_bytes: int, max_files: int) -> None:
        self.field, self.max_file_bytes, self.max_files = field, max_file_bytes, max_files
        self.uploads: list[Upload] = []
        self.ended = False
        self._current: Upload | None = None
        self._header_name = self._header_value = self._disposition = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._current, self._disposition = None, b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != self.field:
            raise HTTPException(422, f"unexpected form field {name!r}: send each photo in a field named "
                                     f"{self.field!r}, e.g. curl -F {self.field}=@photo.jpg")
        if len(self.uploads) >= self.max_files:
            raise HTTPException(422, f"more than {self.max_files} photos in one request: send at most "
                                     f"{self.max_files}, or start a job (POST /v1/jobs) for many")
        spool = SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed by read_uploads' caller or close()
        self._current = Upload(options.get(b"filename", b"").decode("utf-8", "replace"), spool)
        self.uploads.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        upload = self._current
        if upload is None:  # pragma: no cover - python-multipart sends headers before data
            return
        upload.size += end - start
        if upload.size > self.max_file_bytes:
            raise too_large(f"file {upload.filename!r}", self.max_file_bytes)
        upload.file.write(data[start:end])

    def _part_end(self) -> None:
        if self._current is not None:
            self._current.file.seek(0)
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        for upload in self.uploads:
            upload.file.close()


async def read_uploads(request: Request, *, field: str, max_file_bytes: int, max_files: int) -> list[Upload]:
    """The files of a ``multipart/form-data`` request body, in the order sent; every part must be named ``field``.

    Args:
        request: the request; its body is consumed.
        field: the form field name every part must have (``file``).
        max_file_bytes: bytes one file may have; the request stops at the first byte over it.
        max_files: files one request may hold.

    Returns:
        One :class:`Upload` per part, each spooled and rewound; the caller closes their files.

    Raises:
        HTTPException: 413 when a file is over ``max_file_bytes`` (or the declared ``Content-Length`` could only be
            so); 422 when the body is not ``multipart/form-data``, is malformed or cut short, holds a part with
            another name, more than ``max_files`` files, or none. Files read so far are closed first.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        shown = content_type.decode("latin-1") or "none"
        raise HTTPException(422, f"send the photos as multipart/form-data, each in a field named {field!r} "
                                 f"(got content type {shown!r}), e.g. curl -F {field}=@photo.jpg")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_files * (max_file_bytes + _PART_OVERHEAD):
        raise too_large(f"the request ({declared} bytes for at most {max_files} photos)", max_file_bytes)
    parts = _Parts(field, max_file_bytes, max_files)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
        if not parts.ended:
            raise HTTPException(422, "the multipart/form-data body ended before its closing boundary")
        if not parts.uploads:
            raise HTTPException(422, f"no photo in the request: send one or more in fields named {field!r}, e.g. "
                                     f"curl -F {field}=@photo.jpg")
    except FormParserError as exc:
        parts.close()
        raise HTTPException(422, f"the body is not valid multipart/form-data: {exc}") from None
    except BaseException:
        parts.close()
        raise
    return parts.uploads
