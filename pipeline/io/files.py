"""Whole-file helpers: atomic writes and streaming SHA-256 digests.

One implementation for every file invsort writes that a reader may open at any moment (model files,
checkpoints, ONNX exports, split manifests, reports): the bytes go to a uniquely named temporary file in the
target's own folder, which then replaces the target with :func:`os.replace` (atomic on POSIX within one file
system), so a reader sees the old file or the new one, never a half-written one, and two writers never share a
temporary file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "sha256_file"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on a clean exit it replaces ``path``, on an error it is removed.

    The parent folder is created when missing. Raises what the writer or :func:`os.replace` raise (``OSError``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode(encoding))


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of the file's bytes, read in chunks (:func:`hashlib.file_digest`): flat memory at any size.

    Raises ``OSError`` when the file cannot be read.
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
