"""Errors that invsort raises on purpose, each with a message a user can act on."""


class InvsortError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero, without a traceback."""


class ConfigError(InvsortError, ValueError):
    """A setting or command-line option has a value that is not valid."""


class SourceError(InvsortError, ValueError):
    """A source URI cannot be used: unknown scheme, outside the local roots, malformed manifest."""


class ModelFileError(InvsortError, ValueError):
    """A file is not an invsort model file, or its contents do not fit together."""


class ImageError(InvsortError, ValueError):
    """One image cannot be decoded; the message is the reason stored on its ``failed`` row."""
