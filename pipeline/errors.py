"""Errors that invsort raises on purpose, each with a message a user can act on."""


class InvsortError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero, without a traceback."""


class ConfigError(InvsortError, ValueError):
    """A setting or command-line option has a value that is not valid."""


class SourceError(InvsortError, ValueError):
    """A source URI cannot be used: unknown scheme, outside the local roots, malformed manifest."""


class ModelFileError(InvsortError, ValueError):
    """A file is not an invsort model file, or its contents do not fit together."""


class ModelVersionError(ModelFileError):
    """The model file behind a path is no longer the version a job pinned when it was submitted (the file was
    replaced since); the message names the path, the pinned version and the file's version now."""


class ImageError(InvsortError, ValueError):
    """One image cannot be decoded; the message is the reason stored on its ``failed`` row."""


class TransientError(InvsortError, OSError):
    """A service stayed unreachable, overloaded or slow through all its retries: an S3 5xx answer, throttling
    (``SlowDown``), a timeout or a connection reset. Nothing is wrong with the item, so it never becomes a
    ``failed`` row: the error leaves the pipeline, a queued batch is retried by its Celery task, and ``invsort
    sort`` fails the job in one line (re-running it upserts). Also an ``OSError``, as I/O errors are.
    """
