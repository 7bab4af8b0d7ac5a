"""Where image bytes come from: local files under configured roots, and S3 objects.

URIs
    Local files are ``file:///abs/path`` URIs as written by :meth:`pathlib.Path.as_uri`: the path's raw bytes
    percent-encoded (a name that is not UTF-8 included, e.g. byte 0xFF as ``%FF``; a literal ``%`` as ``%25``, so
    every URI names one path), read back to the same bytes by :func:`local_path`. S3 objects are
    ``s3://bucket/key`` with the key raw, not percent-encoded, as the AWS CLI writes them (a key may contain
    spaces, ``?``, ``#`` or ``%``).

Storages
    :class:`LocalStorage` and :class:`S3Storage` read, list and stream the lines of objects;
    :class:`ObjectReader` dispatches on the URI scheme and creates the S3 client only on first S3 use,
    so local-only runs never look for AWS credentials. Build one with :func:`make_reader`. Job sources
    (directories, prefixes, manifests) are listed through an :class:`ObjectReader` by :mod:`pipeline.io.sources`.

Errors raised here are builtin ``OSError`` subclasses (``FileNotFoundError``, ``PermissionError``,
``OSError``), :class:`~pipeline.errors.SourceError`, :class:`TooLargeError`, or
:class:`~pipeline.errors.TransientError`; no botocore exception type leaves this module.

S3 retries
    Transient S3 failures (5xx answers, throttling such as ``SlowDown``, connect and read timeouts, connection
    resets) are retried with backoff by botocore's retry mode (``standard`` or ``adaptive``,
    ``INVSORT_S3_MAX_ATTEMPTS`` attempts), and a body that breaks off mid-read is asked for again; when they
    still fail, :class:`~pipeline.errors.TransientError` is raised, which the pipeline lets through (the job or
    task is retried, no item fails). Only 4xx answers (``NoSuchKey``, ``AccessDenied``...) fail an item.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote_to_bytes

from pipeline.errors import ConfigError, ImageError, SourceError, TransientError
from pipeline.records import printable

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = [
    "DEFAULT_MAX_BYTES",
    "IMAGE_SUFFIXES",
    "LeftOut",
    "LocalStorage",
    "ObjectReader",
    "S3Storage",
    "TooLargeError",
    "is_image_name",
    "local_path",
    "make_reader",
    "parse_s3_uri",
    "uri_scheme",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: The file name suffixes a folder or S3 prefix is listed by (any case): the formats the decoder reads
#: (:func:`pipeline.io.images.decode_image`: OpenCV, with Pillow reading the header). A manifest may name any file.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".avif",
    ".jp2", ".j2k", ".pbm", ".pgm", ".ppm", ".pnm",
})
ROOTS_SETTING = "INVSORT_LOCAL_ROOTS"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class TooLargeError(ImageError):
    """An object is larger than the configured limit (``INVSORT_MAX_IMAGE_BYTES``).

    A :class:`~pipeline.errors.ImageError` (so a ``ValueError`` and an ``InvsortError``): the item fails,
    with this message as the reason.
    """


# --------------------------------------------------------------------------------------------- URIs


def uri_scheme(uri: str) -> str | None:
    """The lower-cased scheme of ``scheme://...`` (or ``file:/...``), None for a plain path."""
    m = _SCHEME_RE.match(uri)
    if m:
        return m.group(1).lower()
    if uri[:6].lower() == "file:/":
        return "file"
    return None


def _shown(path: str | os.PathLike[str]) -> str:
    """A path as error messages show it: a byte of a name that is not UTF-8 as ``\\xNN`` (storable text; the
    item's URI is the lossless form)."""
    return printable(os.fspath(path))


def _unsupported_scheme(uri: str, scheme: str) -> SourceError:
    return SourceError(f"unsupported URI scheme {scheme!r} in {uri!r}: use file:// paths or s3://bucket/key")


def is_image_name(name: str) -> bool:
    """True when ``name`` (a file name or S3 key) ends in an image suffix, case-insensitively."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


class LeftOut:
    """What a listing left out, told once it ends: files whose names are not photos (by suffix) and hidden ones.

    A folder of ``.heic`` photos, or photos saved without a suffix, would otherwise sort nothing without a word.
    """

    EXAMPLES = 3

    def __init__(self, where: str) -> None:
        self.where = where
        self.by_suffix: Counter[str] = Counter()
        self.hidden = 0
        self.examples: list[str] = []

    def not_a_photo(self, name: str) -> None:
        self.by_suffix[os.path.splitext(name)[1].lower() or "no suffix"] += 1
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(printable(name))

    def tell(self) -> None:
        """Log one WARNING when anything was left out (names shown with :func:`printable`)."""
        names = sum(self.by_suffix.values())
        if names:
            kinds = ", ".join(f"{suffix} {n}" for suffix, n in self.by_suffix.most_common(5))
            more = ", ..." if len(self.by_suffix) > 5 else ""
            log.warning("%s: left out %d file(s) whose names are not photos (%s%s; e.g. %s); photos are listed "
                        "by suffix: %s. A manifest may name any file.", self.where, names, kinds, more,
                        ", ".join(self.examples), " ".join(sorted(IMAGE_SUFFIXES)))
        if self.hidden:
            log.info("%s: left out %d hidden name(s) (starting with '.')", self.where, self.hidden)


def local_path(uri: str) -> Path:
    """The absolute local path of a ``file://`` URI, or of a plain (relative or absolute) path.

    Percent-escapes are decoded to bytes and then to a path with the file system encoding, so every name
    written by :meth:`Path.as_uri` (spaces, parentheses, unicode, even non-UTF-8 bytes) round-trips.
    Plain paths are made absolute with :func:`os.path.abspath` (symlinks are not resolved).

    Raises:
        SourceError: ``uri`` has another scheme, or a ``file://`` URI names a host other than localhost.
    """
    scheme = uri_scheme(uri)
    if scheme is None:
        return Path(os.path.abspath(uri))
    if scheme != "file":
        raise _unsupported_scheme(uri, scheme)
    rest = uri[len("file:") :]
    if rest.startswith("//"):
        host, sep, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise SourceError(f"file URI {uri!r} names host {host!r}: only local files can be read")
        rest = sep + path
    if not rest.startswith("/"):
        raise SourceError(f"file URI {uri!r} has no absolute path")
    return Path(os.path.abspath(os.fsdecode(unquote_to_bytes(rest))))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; the key is raw (no percent-decoding) and may be empty.

    Raises:
        SourceError: not an ``s3://`` URI, or no bucket name.
    """
    if uri_scheme(uri) != "s3":
        raise SourceError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise SourceError(f"S3 URI {uri!r} has no bucket: use s3://bucket/key")
    return bucket, key


# --------------------------------------------------------------------------------------------- local


# LocalStorage._resolved: open with O_PATH and read the real path back from /proc/self/fd (Linux); None elsewhere
_O_PATH_CLOEXEC = getattr(os, "O_PATH", 0) | getattr(os, "O_CLOEXEC", 0)
_FD_LINKS = "/proc/self/fd/" if hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd") else None


class LocalStorage:
    """Local files, confined to a set of root directories.

    Every path is resolved with :func:`os.path.realpath` (symlinks and ``..`` included) before it is
    checked against the roots, so a symlink that points out of a root is refused like any other path
    outside. With no roots every local access is refused.
    """

    def __init__(self, roots: Sequence[Path | str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.roots: tuple[str, ...] = tuple(dict.fromkeys(os.path.realpath(r) for r in roots))
        self._prefixes = tuple(r if r.endswith("/") else r + "/" for r in self.roots)  # for _inside
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"LocalStorage(roots={list(self.roots)!r}, max_bytes={self.max_bytes})"

    def check(self, path: Path | str) -> str:
        """The real path of ``path`` when it lies inside one of the roots (the file need not exist).

        Raises:
            PermissionError: it is outside every root (the message names the path, the roots and the
                setting ``INVSORT_LOCAL_ROOTS``).
            SourceError: the path has a NUL byte (a ``%00`` in a URI): no file can have that name.
        """
        path = os.fspath(path)
        if "\x00" in path:
            raise SourceError(f"local path {_shown(path)} has a NUL byte: no file can have that name")
        real = os.path.realpath(path)
        if self._inside(real):
            return real
        shown = _shown(path) if real == path else f"{_shown(path)} (resolves to {_shown(real)})"
        if not self.roots:
            raise PermissionError(
                f"local file access refused for {shown}: no local roots are configured; "
                f"set {ROOTS_SETTING} to the directories images may be read from"
            )
        raise PermissionError(
            f"local file access refused for {shown}: it is outside the local roots "
            f"({_shown(', '.join(self.roots))}); add its directory to {ROOTS_SETTING}"
        )

    def _inside(self, real: str) -> bool:
        """Whether the resolved, absolute path ``real`` is a root or lies under one."""
        return real in self.roots or real.startswith(self._prefixes)

    def _resolved(self, path: str) -> str:
        """:meth:`check` for a path about to be read, resolved by the kernel where it can be: the path is opened
        with ``O_PATH`` (nothing is read and nothing blocks) and its real path read back from
        ``/proc/self/fd``, which names what was opened. That is three system calls where ``os.path.realpath``
        walks each component in Python (25 µs a photo on this project's 2-core VM, under the lock that the
        decode threads share). Anything unusual (no ``O_PATH``, no ``/proc``, a missing file, a path outside
        the roots) goes to :meth:`check`, which says why. Raises what :meth:`check` raises."""
        if _FD_LINKS and "\x00" not in path:
            try:
                fd = os.open(path, _O_PATH_CLOEXEC)
            except OSError:
                return self.check(path)
            try:
                real = os.readlink(f"{_FD_LINKS}{fd}")
            except OSError:
                real = ""
            finally:
                os.close(fd)
            if real.startswith("/") and self._inside(real):
                return real
        return self.check(path)

    def read(self, uri: str) -> bytes:
        """The bytes of the file at ``uri`` (a ``file://`` URI or a plain path).

        Raises:
            PermissionError: the file is outside the roots (checked before anything is read).
            FileNotFoundError: ``no such file: PATH``.
            IsADirectoryError: the path is a directory.
            TooLargeError: the file is larger than ``max_bytes`` (checked with fstat before reading).
            SourceError: ``uri`` is not a local URI, or its path has a NUL byte.
        """
        path = os.fspath(local_path(uri))
        real = self._resolved(path)
        try:
            # O_NONBLOCK: a FIFO is opened without waiting for a writer (and then read as empty), not hung on;
            # it changes nothing for a regular file
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {_shown(path)}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"is a directory, not a file: {_shown(path)}") from None
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(f"is a directory, not a file: {_shown(path)}")
            if st.st_size > self.max_bytes:
                raise TooLargeError(
                    f"file is {st.st_size} bytes, more than the limit of {self.max_bytes}: {_shown(path)}"
                )
            try:
                data = f.read(self.max_bytes + 1) or b""  # None: a non-blocking FIFO with nothing written yet
            except BlockingIOError:  # the same, as BufferedReader may also report it
                data = b""
        if len(data) > self.max_bytes:  # grew after the fstat
            raise TooLargeError(f"file is more than the limit of {self.max_bytes} bytes: {_shown(path)}")
        return data

    def kind(self, uri: str) -> Literal["directory", "file"] | None:
        """What is at ``uri`` (a ``file://`` URI or a plain path): ``directory``, ``file`` (anything else that
        exists) or None (nothing).

        Raises:
            PermissionError: outside the roots.
            SourceError: ``uri`` is not a local URI, or its path has a NUL byte.
        """
        real = self.check(local_path(uri))
        if not os.path.exists(real):
            return None
        return "directory" if os.path.isdir(real) else "file"

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        """Stream the lines of the file at ``uri``, endings kept; no size limit. Lines end at ``\\n``,
        ``\\r\\n`` or ``\\r`` (as :meth:`S3Storage.iter_lines` splits them).

        The roots are checked when this is called; the file is opened on the first ``next()`` and closed
        when the iterator is exhausted or closed.

        Raises:
            PermissionError: outside the roots (at call time).
            FileNotFoundError: ``no such file: PATH``.
            IsADirectoryError: the path is a directory.
        """
        path = local_path(uri)
        return self._lines(self.check(path), path)

    @staticmethod
    def _lines(real: str, path: Path) -> Iterator[bytes]:
        try:
            f = open(real, "rb")  # noqa: SIM115 (closed below, when the generator ends)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {_shown(path)}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"is a directory, not a file: {_shown(path)}") from None
        with f:
            yield from _split_lines(iter(partial(f.read, 64 * 1024), b""))

    def list(self, prefix_uri: str) -> Iterator[str]:
        """Stream the ``file://`` URIs of the image files under a directory, recursively.

        Depth first; at each level the files (sorted by name) come before the subdirectories (sorted by
        name); only one directory level is held in memory at a time. Only names with an image suffix
        (:data:`IMAGE_SUFFIXES`, any case) are yielded; names starting with ``.`` (files and directories)
        are skipped; symlinked directories are not followed. When the walk ends, one WARNING says how many
        files were left out because their names are not photos (:class:`LeftOut`). URIs are built from the
        directory as given (made absolute, symlinks not resolved); :meth:`read` checks each file again.

        The directory is checked when this is called, not on the first ``next()``.

        Raises:
            PermissionError: the directory is outside the roots.
            FileNotFoundError: ``no such directory: PATH``.
            SourceError: the path is a file, not a directory.
            OSError: a subdirectory cannot be read while walking.
        """
        top = local_path(prefix_uri)
        real = self.check(top)
        if not os.path.exists(real):
            raise FileNotFoundError(f"no such directory: {_shown(top)}")
        if not os.path.isdir(real):
            raise SourceError(f"not a directory: {_shown(top)}")
        return self._walk(str(top))

    @staticmethod
    def _walk(top: str) -> Iterator[str]:
        def _raise(exc: OSError) -> None:
            raise exc

        left_out = LeftOut(_shown(top))
        for dirpath, dirnames, filenames in os.walk(top, onerror=_raise):
            left_out.hidden += sum(d.startswith(".") for d in dirnames)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    left_out.hidden += 1
                elif is_image_name(name):
                    yield Path(dirpath, name).as_uri()
                else:
                    left_out.not_a_photo(name)
        left_out.tell()


# ------------------------------------------------------------------------------------------------ S3

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AccountProblem",
    }
)


# Answers that say "not now" rather than "no": botocore's standard mode retries them too (RequestTimeout is a 400).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "ServiceUnavailable",
        "InternalError",
    }
)
_TRANSIENT_HINT = "the S3 endpoint is unreachable, overloaded or slow; retry later"


def _is_transient_answer(code: str, status: object) -> bool:
    return code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429))


def _translate(exc: Exception, uri: str, op: str) -> Exception:
    """The builtin/invsort exception for a botocore exception ``exc`` raised by ``op`` on ``uri``.

    Transient failures (5xx, throttling, timeouts, connection errors, a body that broke off) become
    :class:`~pipeline.errors.TransientError`; 4xx answers become ``FileNotFoundError`` (404, ``NoSuchKey``,
    ``NoSuchBucket``), ``PermissionError`` (403) or ``OSError``.
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        ParamValidationError,
    )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        meta = exc.response.get("ResponseMetadata", {}) or {}
        status = meta.get("HTTPStatusCode")
        message = str(err.get("Message", "") or "").strip()
        detail = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
        if _is_transient_answer(code, status):
            attempts = int(meta.get("RetryAttempts", 0) or 0) + 1
            return TransientError(f"S3 {op} on {uri} failed {attempts} time(s): {detail}; {_TRANSIENT_HINT}")
        if code == "NoSuchBucket":
            bucket = err.get("BucketName") or _bucket_of(uri)
            return FileNotFoundError(f"no such bucket: {bucket} (reading {uri})")
        if code in _NOT_FOUND_CODES or (status == 404 and not code.startswith("NoSuch")):
            return FileNotFoundError(f"no such object: {uri}")
        if code in _DENIED_CODES or status == 403:
            return PermissionError(f"S3 {op} on {uri} refused: {detail}")
        return OSError(f"S3 {op} on {uri} failed: {detail}")
    if isinstance(exc, NoCredentialsError):
        return OSError(
            f"S3 {op} on {uri} failed: NoCredentialsError: no AWS credentials found; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, ParamValidationError):
        return SourceError(f"invalid S3 request for {uri}: {exc}")
    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):  # timeouts and resets included
        return TransientError(f"S3 {op} on {uri} failed: {type(exc).__name__}: {exc}; {_TRANSIENT_HINT}")
    return OSError(f"S3 {op} on {uri} failed: {type(exc).__name__}: {exc}")


def _bucket_of(uri: str) -> str:
    return uri[len("s3://") :].partition("/")[0] if uri.startswith("s3://") else uri


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a stream of chunks, endings kept, split at ``\\n``, ``\\r\\n`` or ``\\r`` (a ``\\r\\n``
    across two chunks is one ending)."""
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).splitlines(keepends=True)
        pending = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        yield from lines
    if pending:
        yield pending


def _hidden(relative_key: str) -> bool:
    return any(part.startswith(".") for part in relative_key.split("/"))


class S3Storage:
    """S3 (or an S3-compatible endpoint) through one thread-safe boto3 client.

    Credentials and region come from boto3's usual chain (environment, profile, instance role); with no
    region configured anywhere, ``us-east-1`` is used. Transient failures (5xx, throttling, timeouts,
    connection resets) are retried by botocore's ``retry_mode`` with exponential backoff and jitter, up to
    ``max_attempts`` attempts per request (botocore's retry quota may stop them sooner when most requests fail);
    then :class:`~pipeline.errors.TransientError` is raised.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        endpoint_url: str | None = None,
        timeout_s: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        page_size: int | None = None,
        connect_timeout_s: float = 10.0,
        max_attempts: int = 10,
        retry_mode: Literal["standard", "adaptive"] = "standard",
        max_pool_connections: int = 32,
    ) -> None:
        """``client``: a ready boto3 S3 client (then ``endpoint_url``, the timeouts, ``retry_mode`` and
        ``max_pool_connections`` are unused). ``timeout_s``: read timeout, seconds; ``connect_timeout_s``:
        connect timeout, seconds. ``max_attempts``: attempts of one request, the first included; a body that
        breaks off mid-read is also asked for again up to this many times. ``page_size``: keys per
        ``ListObjectsV2`` page (None: the service's default, 1000).

        Raises:
            ConfigError: the client cannot be created (unknown AWS profile, invalid endpoint URL, a bad retry
                setting).
        """
        if client is None:
            client = self._make_client(
                endpoint_url, read_timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                max_attempts=max_attempts, retry_mode=retry_mode, max_pool_connections=max_pool_connections,
            )
        self.client = client
        self.max_bytes = max_bytes
        self.page_size = page_size
        self.max_attempts = max(1, max_attempts)

    @staticmethod
    def _make_client(
        endpoint_url: str | None,
        *,
        read_timeout_s: float,
        connect_timeout_s: float,
        max_attempts: int,
        retry_mode: str,
        max_pool_connections: int,
    ) -> Any:
        import boto3.session
        import botocore.config
        from botocore.exceptions import BotoCoreError

        try:
            session = boto3.session.Session()
            config = botocore.config.Config(
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"total_max_attempts": max_attempts, "mode": retry_mode},
                max_pool_connections=max_pool_connections,
            )
            return session.client(
                "s3",
                endpoint_url=endpoint_url or None,
                region_name=session.region_name or "us-east-1",
                config=config,
            )
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(
                f"cannot create the S3 client (INVSORT_S3_ENDPOINT_URL={endpoint_url!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def read(self, uri: str) -> bytes:
        """The bytes of the object at ``s3://bucket/key``.

        A body that breaks off mid-read (a connection reset, a read timeout) is asked for again, up to
        ``max_attempts`` times: botocore retries requests, not the bodies it has handed over.

        Raises:
            FileNotFoundError: ``no such object: URI`` or ``no such bucket: BUCKET ...``.
            PermissionError: access denied (403, bad credentials).
            TooLargeError: ``ContentLength`` is larger than ``max_bytes`` (the body is not read).
            SourceError: not a valid ``s3://bucket/key`` URI.
            TransientError: 5xx, throttling, timeouts or connection errors still failing after the retries.
            OSError: any other S3 error (another 4xx answer); the message has the S3 error code.
        """
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise SourceError(f"S3 URI {uri!r} has no key: use s3://bucket/key")
        attempt = 1
        while True:
            try:
                resp = self.client.get_object(Bucket=bucket, Key=key)
            except _botocore_errors() as exc:
                raise _translate(exc, uri, "GetObject") from exc
            try:
                return self._body(resp, uri)
            except TransientError as exc:
                if attempt >= self.max_attempts:
                    raise
                log.info("asking again: %s", exc)
                attempt += 1

    def _body(self, resp: dict[str, Any], uri: str) -> bytes:
        """The body of a GetObject answer, all of it.

        Raises:
            TooLargeError: over ``max_bytes``.
            TransientError: the body broke off (a reset, a read timeout, fewer bytes than ``ContentLength``).
        """
        body = resp["Body"]
        try:
            size = resp.get("ContentLength")
            if size is not None and size > self.max_bytes:
                raise TooLargeError(f"object is {size} bytes, more than the limit of {self.max_bytes}: {uri}")
            data: bytes = body.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise TooLargeError(f"object is more than the limit of {self.max_bytes} bytes: {uri}")
            if size is not None and len(data) != size:  # read(amt) does not check the length; a cut body is short
                raise TransientError(
                    f"S3 GetObject on {uri} broke off after {len(data)} of {size} bytes; {_TRANSIENT_HINT}"
                )
            return data
        except _botocore_errors() as exc:
            raise _translate(exc, uri, "GetObject") from exc
        finally:
            body.close()

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        """Stream the lines of the object at ``uri`` (line endings kept); no size limit.

        The URI is checked when this is called; the ``GetObject`` request is made on the first
        ``next()``, and the connection is released when the iterator is exhausted or closed.

        Raises:
            SourceError: not a valid ``s3://bucket/key`` URI (at call time).
            FileNotFoundError, PermissionError, TransientError, OSError: like :meth:`read`, while iterating (a
                stream that breaks off is not restarted: TransientError).
        """
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise SourceError(f"S3 URI {uri!r} has no key: use s3://bucket/key")
        return self._lines(bucket, key, uri)

    def _lines(self, bucket: str, key: str, uri: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
        except _botocore_errors() as exc:
            raise _translate(exc, uri, "GetObject") from exc
        try:
            yield from body.iter_lines(chunk_size=64 * 1024, keepends=True)
        except _botocore_errors() as exc:
            raise _translate(exc, uri, "GetObject") from exc
        finally:
            body.close()

    def list(self, prefix_uri: str) -> Iterator[str]:
        """Stream the ``s3://bucket/key`` URIs of the image objects whose keys start with the prefix.

        Plain S3 prefix semantics (``s3://b/photos`` also matches ``photos2/...``; :func:`iter_source`
        adds the trailing ``/``). Pages of ``ListObjectsV2`` are fetched as the iterator is consumed;
        keys come in S3's (UTF-8 binary) order. Only keys with an image suffix are yielded; "directory
        marker" keys ending in ``/`` are skipped, and so are keys with a path segment below the prefix
        that starts with ``.`` (like hidden files in :meth:`LocalStorage.list`). When the listing ends, one
        WARNING says how many keys were left out because their names are not photos (:class:`LeftOut`).

        Raises (while iterating):
            FileNotFoundError: ``no such bucket: BUCKET ...``.
            PermissionError: access denied.
            TransientError: 5xx, throttling, timeouts or connection errors still failing after the retries.
            OSError: any other S3 error.
            SourceError: not an ``s3://`` URI (raised at call time).
        """
        bucket, prefix = parse_s3_uri(prefix_uri)
        return self._list(bucket, prefix, prefix_uri)

    def _list(self, bucket: str, prefix: str, prefix_uri: str) -> Iterator[str]:
        pagination: dict[str, int] = {"PageSize": self.page_size} if self.page_size else {}
        left_out = LeftOut(prefix_uri)
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=pagination):
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    if _hidden(key[len(prefix) :]):
                        left_out.hidden += 1
                    elif is_image_name(key):
                        yield f"s3://{bucket}/{key}"
                    else:
                        left_out.not_a_photo(key[len(prefix) :])
        except _botocore_errors() as exc:
            raise _translate(exc, prefix_uri, "ListObjectsV2") from exc
        left_out.tell()


# -------------------------------------------------------------------------------------------- reader


class ObjectReader:
    """Reads and lists URIs of any supported scheme: ``file://`` (and plain paths) and ``s3://``.

    The :class:`S3Storage` is created on first S3 use (thread-safe), so local-only runs never touch boto3.
    One reader may be shared by the threads of a fetch pool.
    """

    def __init__(
        self,
        local: LocalStorage,
        *,
        s3: S3Storage | None = None,
        s3_factory: Callable[[], S3Storage] | None = None,
        fetch_concurrency: int | None = None,
    ) -> None:
        """``s3``: a ready S3 storage; else ``s3_factory()`` (default ``S3Storage()``) on first S3 use.
        ``fetch_concurrency``: the reads over the network this reader is meant to serve at once (its S3 connection
        pool is sized for them), which :func:`pipeline.inference.streaming.run_pipeline` uses; None: no advice."""
        self.local = local
        self._s3 = s3
        self._s3_factory = s3_factory or S3Storage
        self._lock = threading.Lock()
        self.fetch_concurrency = fetch_concurrency

    @property
    def s3(self) -> S3Storage:
        """The S3 storage, created on first access."""
        s3 = self._s3
        if s3 is None:
            with self._lock:
                if self._s3 is None:
                    self._s3 = self._s3_factory()
                s3 = self._s3
        return s3

    def storage_for(self, uri: str) -> LocalStorage | S3Storage:
        """The storage that handles ``uri``.

        Raises:
            SourceError: ``unsupported URI scheme ...`` for anything but ``file://``, ``s3://``, plain paths.
        """
        scheme = uri_scheme(uri)
        if scheme in (None, "file"):
            return self.local
        if scheme == "s3":
            return self.s3
        raise _unsupported_scheme(uri, scheme)

    def read(self, uri: str) -> bytes:
        """The bytes at ``uri``. Raises what :meth:`LocalStorage.read` / :meth:`S3Storage.read` raise,
        and :class:`~pipeline.errors.SourceError` for an unsupported scheme."""
        return self.storage_for(uri).read(uri)

    def list(self, prefix_uri: str) -> Iterator[str]:
        """Image URIs under ``prefix_uri`` (see :meth:`LocalStorage.list`, :meth:`S3Storage.list`)."""
        return self.storage_for(prefix_uri).list(prefix_uri)

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        """The lines of the object at ``uri``, endings kept (see :meth:`LocalStorage.iter_lines`,
        :meth:`S3Storage.iter_lines`)."""
        return self.storage_for(uri).iter_lines(uri)

    def local_kind(self, uri: str) -> Literal["directory", "file"] | None:
        """What is at a local ``uri`` or path: see :meth:`LocalStorage.kind`.

        Raises:
            PermissionError: outside the local roots.
            SourceError: not a local URI.
        """
        return self.local.kind(uri)

    def close(self) -> None:
        """Close the S3 client's connections, if one was created."""
        if self._s3 is not None:
            close = getattr(self._s3.client, "close", None)
            if close is not None:
                close()


# The S3 storages of this process, one per configuration: a client costs ~0.3 s to create and its pool's
# connections a round trip each to open, so a worker reuses them from task to task instead of paying both per task.
_SHARED_S3: dict[tuple[Any, ...], S3Storage] = {}
_SHARED_S3_LOCK = threading.Lock()
# What boto3 reads from the environment when it creates a client: a change makes a new client (tests change them).
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE")


def _forget_shared_s3() -> None:
    _SHARED_S3.clear()  # a forked child must not share its parent's connections


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_s3)


def _shared_s3(**options: Any) -> S3Storage:
    """The process's :class:`S3Storage` for ``options`` (and the AWS environment), created on first use."""
    key = (tuple(sorted(options.items())), tuple(os.environ.get(name) for name in _AWS_ENV))
    with _SHARED_S3_LOCK:
        storage = _SHARED_S3.get(key)
        if storage is None:
            storage = _SHARED_S3[key] = S3Storage(**options)
        return storage


def make_reader(settings: Settings | None = None, extra_roots: Sequence[Path] = ()) -> ObjectReader:
    """An :class:`ObjectReader` for ``settings`` (the process's :func:`get_settings` when None).

    Local roots are ``settings.local_roots`` plus ``extra_roots`` (realpath-resolved); images larger than
    ``settings.max_image_bytes`` are refused; S3 uses ``settings.s3_endpoint_url``, the timeouts
    ``fetch_timeout_s`` (read) and ``s3_connect_timeout_s``, the retries ``s3_retry_mode`` and ``s3_max_attempts``,
    and a connection pool of ``s3_max_pool_connections``, or ``fetch_concurrency`` where that is more (every fetch
    thread gets a connection of its own). The S3 client is created on first S3 use and shared by the readers of
    this process with the same settings (and AWS environment): its connections stay open from one task to the
    next. The reader's ``fetch_concurrency`` is ``settings.fetch_concurrency``.
    """
    if settings is None:
        from pipeline.settings import get_settings

        settings = get_settings()
    roots = [*settings.local_roots, *extra_roots]
    local = LocalStorage(roots, max_bytes=settings.max_image_bytes)
    factory = partial(
        _shared_s3,
        endpoint_url=settings.s3_endpoint_url,
        timeout_s=settings.fetch_timeout_s,
        max_bytes=settings.max_image_bytes,
        connect_timeout_s=settings.s3_connect_timeout_s,
        max_attempts=settings.s3_max_attempts,
        retry_mode=settings.s3_retry_mode,
        max_pool_connections=max(settings.s3_max_pool_connections, settings.fetch_concurrency),
    )
    return ObjectReader(local, s3_factory=factory, fetch_concurrency=settings.fetch_concurrency)


