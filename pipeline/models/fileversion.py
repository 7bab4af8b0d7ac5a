"""A model file's version and identity, computed from its bytes without importing torch.

The version of a model file is never read from the file: it is 12 hex characters of a SHA-256 over everything
in it that changes a prediction (architecture, class names, input size, channels, mean/std, temperature,
review threshold, the open-set score, and the weights' names, shapes and bytes; :func:`version_digest` is the
one place that lays the hash out). :func:`pipeline.models.modelfile.load_model_file` computes it twice on the
bytes it loads, from the tensors torch built and with :func:`content_version`, and refuses a file where the two
differ; so :func:`model_file_version` (no torch: a ``zipfile`` read of torch's format and a restricted
unpickler that builds nothing but plain values and tensor references) gives exactly the version a worker will
find, for ``invsort submit`` to pin cheaply. Same content, same version: re-saving a file, or changing only its
``info`` or ``created_at``, keeps it.

:func:`model_file_fingerprint` says cheaply whether the file behind a path has changed (local: ``os.stat``;
``s3://``: the object's ETag from one HEAD request), so a process can keep a loaded model while it has not.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import pickle  # noqa: S403 (a restricted unpickler: find_class never returns anything that runs code)
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelFileError

if TYPE_CHECKING:
    from pipeline.io.storage import ObjectReader

FORMAT = "invsort-model/1"
BUNDLED_PREFIX = "bundled:"
BUNDLED = {"fashion_mnist_cnn": "fashion_mnist_cnn.pt"}
VERSION_CHARS = 12

# torch's legacy typed-storage classes, as torch.save names them in the pickle, and their element size in bytes
_ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
             "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
             "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8}

Fingerprint = tuple[Any, ...]


def resolve_model_path(spec: str) -> str:
    """``bundled:NAME`` → the packaged file's path; anything else unchanged.

    Raises:
        ModelFileError: unknown bundled name (the message lists the known ones).
    """
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX) :]
        if name not in BUNDLED:
            raise ModelFileError(
                f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED_PREFIX + n for n in BUNDLED)}"
            )
        return str(resources.files("pipeline.assets").joinpath(BUNDLED[name]))
    return spec


def version_meta(arch: str, class_names: Sequence[str], in_chans: int, input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], temperature: float, review_threshold: float
                 ) -> list[Any]:
    """The plain fields :func:`version_digest` hashes, normalised (``str``, ``int``, ``float``)."""
    return [str(arch), [str(c) for c in class_names], int(in_chans), [int(x) for x in input_size],
            [float(x) for x in mean], [float(x) for x in std], float(temperature), float(review_threshold)]


def version_digest(meta: Sequence[Any], open_set_parts: Iterable[bytes],
                   tensors: Iterable[tuple[str, tuple[int, ...], bytes]]) -> str:
    """A model's version: :data:`VERSION_CHARS` lower-case hex characters of a SHA-256.

    Args:
        meta: :func:`version_meta`'s list.
        open_set_parts: the open-set score's method/threshold/TPR line and its tensors' float32 bytes
            (:meth:`pipeline.models.openset.OpenSet.hash_parts`); empty for a file without one.
        tensors: ``(name, shape, bytes)`` of every weight, in sorted name order; ``bytes`` is the tensor's
            elements in row-major order, native (little-endian) byte order.
    """
    h = hashlib.sha256()
    h.update(repr(list(meta)).encode())
    for part in open_set_parts:
        h.update(part)
    for key, shape, data in tensors:
        h.update(key.encode())
        h.update(str(tuple(shape)).encode())
        h.update(data)
    return h.hexdigest()[:VERSION_CHARS]


# --------------------------------------------------------------------------------- torch's format, no torch


@dataclass(frozen=True)
class _StorageType:
    name: str
    itemsize: int


@dataclass(frozen=True)
class _Storage:
    key: str
    kind: _StorageType


@dataclass(frozen=True)
class _TensorRef:
    """What ``torch._utils._rebuild_tensor_v2`` would build, as a reference into the archive."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Opaque:
    """Anything else the pickle names (e.g. in ``info``): built as an inert placeholder, never imported."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads torch's ``data.pkl`` into plain values and :class:`_TensorRef` s; runs nothing from the file."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name, _ITEMSIZE.get(name, 0))
        return _Opaque

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        return _Storage(str(pid[2]), pid[1])


class _Archive:
    """The records of a ``torch.save`` zip archive: the unpickled object and the storages' bytes."""

    def __init__(self, data: bytes, what: str) -> None:
        self.what = what
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            names = self.zip.namelist()
            self.prefix = names[0].split("/", 1)[0] + "/" if names else ""
            order = self._record("byteorder", required=False)
            if order not in (None, b"little"):
                raise ModelFileError(f"{what} stores its tensors {order!r}-endian; save it again on this machine")
            self.obj = _ArchiveUnpickler(io.BytesIO(self._record("data.pkl") or b"")).load()
        except ModelFileError:
            raise
        except Exception as exc:  # zip, pickle and decoding errors all mean "not a model file"
            raise ModelFileError(f"{what} is not an invsort model file ({type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0][:200]})") from None
        self._blobs: dict[str, bytes] = {}

    def _record(self, name: str, *, required: bool = True) -> bytes | None:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            if required:
                raise
            return None

    def tensor_bytes(self, t: Any, name: str) -> tuple[tuple[int, ...], bytes, str]:
        """``(shape, row-major bytes, storage type name)`` of tensor reference ``t``.

        Raises:
            ModelFileError: ``t`` is not a tensor, or its storage type or bounds are not what torch would load.
        """
        if not isinstance(t, _TensorRef):
            raise ModelFileError(f"{self.what} is a damaged invsort model file: {name} is not a tensor")
        k = t.storage.kind.itemsize
        if not k:
            raise ModelFileError(f"{self.what}: {name} has unsupported storage type {t.storage.kind.name}")
        if t.storage.key not in self._blobs:
            try:
                self._blobs[t.storage.key] = self.zip.read(f"{self.prefix}data/{t.storage.key}")
            except KeyError:
                raise ModelFileError(f"{self.what} is a damaged invsort model file: no data for {name}") from None
        blob = self._blobs[t.storage.key]
        numel = math.prod(t.size)
        if numel == 0:
            return t.size, b"", t.storage.kind.name
        last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride, strict=False))
        if len(t.size) != len(t.stride) or t.offset < 0 or min(t.stride, default=0) < 0 or (last + 1) * k > len(blob):
            raise ModelFileError(f"{self.what} is a damaged invsort model file: {name} lies outside its storage")
        return t.size, _gather(blob, k, t.offset, t.size, t.stride), t.storage.kind.name


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for s in reversed(size):
        out.append(step)
        step *= s
    return tuple(reversed(out))


def _gather(blob: bytes, k: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """The elements of a strided view of ``blob`` (``k`` bytes each) in row-major order."""
    if all(st == c for s, st, c in zip(size, stride, _contiguous_strides(size), strict=True) if s != 1):
        return blob[offset * k : (offset + math.prod(size)) * k]
    out = bytearray()
    view = memoryview(blob)
    for idx in itertools.product(*(range(s) for s in size[:-1])):
        base = offset + sum(i * st for i, st in zip(idx, stride, strict=False))
        if stride[-1] == 1:
            out += view[base * k : (base + size[-1]) * k]
        else:
            for j in range(size[-1]):
                p = (base + j * stride[-1]) * k
                out += view[p : p + k]
    return bytes(out)


def _as_float32(data: bytes, kind: str) -> bytes:
    """Elements of storage type ``kind`` as float32 bytes (what ``tensor.float()`` gives)."""
    if kind == "FloatStorage":
        return data
    if kind == "DoubleStorage":
        values: Iterable[float] = struct.unpack(f"<{len(data) // 8}d", data)
    elif kind == "HalfStorage":
        values = struct.unpack(f"<{len(data) // 2}e", data)
    elif kind == "BFloat16Storage":
        return b"".join(b"\x00\x00" + data[i : i + 2] for i in range(0, len(data), 2))
    else:
        raise ValueError(f"open-set tensors of storage type {kind}")
    return struct.pack(f"<{len(data) // (8 if kind == 'DoubleStorage' else 2)}f", *values)


def _open_set_parts(archive: _Archive, entry: Any) -> Iterator[bytes]:
    yield repr([str(entry["method"]), float(entry["threshold"]), float(entry["tpr"])]).encode()
    for name in ("whiten", "centers"):
        _, data, kind = archive.tensor_bytes(entry[name], f"open_set.{name}")
        yield _as_float32(data, kind)


def content_version(data: bytes, *, what: str = "model file") -> str:
    """The version of the model file whose bytes are ``data``, without importing torch (see the module's
    docstring): equal to :func:`pipeline.models.modelfile.model_version` of the file once loaded.

    Raises:
        ModelFileError: not a ``torch.save`` archive of an invsort model file, or a damaged one (missing fields,
            tensors outside their storage, unsupported tensor types); one line that starts with ``what``.
    """
    return _archive_version(_Archive(data, what))


def read_model_payload(data: bytes, *, what: str = "model file") -> tuple[dict[str, Any], str]:
    """``(fields, version)`` of the model file whose bytes are ``data``, without importing torch, in one read.

    ``fields`` is the file's dict without its tensors: no ``state_dict``, and an ``open_set`` entry without its
    ``whiten`` and ``centers``; any value that is not a plain one (``str``, ``int``, ``float``, ``bool``,
    ``None``, lists and string-keyed dicts of them), e.g. a tensor or an object in ``info``, is ``None``.
    ``version`` is :func:`content_version`'s. :func:`pipeline.models.meta.load_model_meta` checks the fields.

    Raises:
        ModelFileError: as :func:`content_version`.
    """
    archive = _Archive(data, what)
    version = _archive_version(archive)
    fields = {k: _plain(v) for k, v in archive.obj.items() if k != "state_dict"}
    entry = archive.obj.get("open_set")
    if isinstance(entry, dict):
        fields["open_set"] = {k: _plain(v) for k, v in entry.items() if k not in ("whiten", "centers")}
    return fields, version


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` if it is a plain value (lists and string-keyed dicts of them included, 32 levels at most), else
    None."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if depth < 32 and isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    if depth < 32 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    return None


def _archive_version(archive: _Archive) -> str:
    """:func:`content_version` of an archive already read."""
    what = archive.what
    obj = archive.obj
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelFileError(f"{what} is not an invsort model file (expected format {FORMAT!r}); "
                             "make one with 'invsort train DIR --out MODEL'")
    try:
        meta = version_meta(obj["arch"], obj["class_names"], obj["in_chans"], obj["input_size"][:2], obj["mean"],
                            obj["std"], obj.get("temperature", 1.0), obj.get("review_threshold", 0.0))
        state = dict(obj["state_dict"])
        if not all(isinstance(key, str) for key in state):
            raise TypeError("state_dict keys must be strings")
        entry = obj.get("open_set")
        open_set = list(_open_set_parts(archive, entry)) if entry is not None else []
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, struct.error) as exc:
        raise ModelFileError(f"{what} is a damaged invsort model file: missing or bad field {exc}") from None
    tensors = ((key, *archive.tensor_bytes(state[key], key)[:2]) for key in sorted(state))
    return version_digest(meta, open_set, tensors)


# ---------------------------------------------------------------------------------------- files and objects


def read_model_bytes(spec: str, *, reader: ObjectReader | None = None) -> tuple[str, bytes]:
    """``(path, bytes)`` of the model file ``spec`` names (a local path, an ``s3://`` URI or ``bundled:NAME``).

    A local file is read directly (model files need not lie under ``INVSORT_LOCAL_ROOTS``); an ``s3://`` object
    through ``reader`` (None: :func:`pipeline.io.storage.make_reader` of the process's settings).

    Raises:
        FileNotFoundError: no such file or object.
        ModelFileError: unknown bundled name.
        OSError, PermissionError: the read failed (S3 errors as :class:`pipeline.io.storage.ObjectReader` raises them).
    """
    path = resolve_model_path(spec)
    if path.startswith("s3://"):
        if reader is None:
            from pipeline.io.storage import make_reader

            reader = make_reader()
        return path, reader.read(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    return path, Path(path).read_bytes()


def model_file_version(spec: str, *, reader: ObjectReader | None = None) -> str:
    """The version of the model file ``spec`` names, computed from its bytes without importing torch: what
    :func:`pipeline.models.modelfile.load_model_file` will report for the same bytes (``submit`` pins it).

    Args:
        spec: a local path, an ``s3://`` URI or ``bundled:NAME``.
        reader: reads ``s3://`` objects (None: one for the process's settings).

    Returns:
        :data:`VERSION_CHARS` lower-case hex characters.

    Raises:
        FileNotFoundError: no such file or object.
        ModelFileError: not an invsort model file, a damaged one, or an unknown bundled name.
        OSError, PermissionError: the read failed.
    """
    _, data = read_model_bytes(spec, reader=reader)
    return content_version(data, what=f"model file {spec}")


def model_file_fingerprint(spec: str, *, reader: ObjectReader | None = None) -> Fingerprint:
    """What changes when the file behind ``spec`` is replaced or rewritten, read without reading the file.

    Local file (and ``bundled:``): ``("file", st_dev, st_ino, st_size, st_mtime_ns)`` of ``os.stat`` (symlinks
    followed, so re-pointing a link counts). ``s3://``: ``("s3", uri, ETag)`` from one ``HeadObject`` request
    through ``reader`` (None: one for the process's settings).

    Raises:
        FileNotFoundError: no such file or object.
        ModelFileError: unknown bundled name.
        OSError, PermissionError: the stat or the request failed.
    """
    path = resolve_model_path(spec)
    if path.startswith("s3://"):
        from pipeline.io.storage import _botocore_errors, _translate, make_reader, parse_s3_uri

        s3 = (reader or make_reader()).s3
        bucket, key = parse_s3_uri(path)
        try:
            head = s3.client.head_object(Bucket=bucket, Key=key)
        except _botocore_errors() as exc:
            raise _translate(exc, path, "HeadObject") from exc
        return ("s3", path, str(head.get("ETag", "")))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such model file: {path}") from None
    return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
