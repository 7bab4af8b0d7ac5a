"""What a lean process needs of a model file, read without torch: :class:`ModelMeta`.

A process that runs the model through ONNX Runtime or OpenVINO (``INVSORT_RUNTIME``) and ``invsort submit`` never
build the network, so they need none of the weights: only the class names, the input size and channels, mean/std,
the temperature, the review threshold, the open-set threshold, and the version (computed from the file's content,
as :func:`pipeline.models.modelfile.load_model_file` computes it). :func:`load_model_meta` reads them with
:func:`pipeline.models.fileversion.read_model_payload` (a ``zipfile`` read of torch's format and a restricted
unpickler), so ``import torch`` (about 500 MB and 1.5 s) is never paid. The network itself comes from the ONNX
export made by a process that has torch (:mod:`pipeline.models.runtimes`).

The checks that need the network (the weights fit the architecture, the outputs are finite on probe images) ran
where the export was made, on the same content: an export is only used for the version it was made from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelFileError
from pipeline.models.fileversion import BUNDLED_PREFIX, read_model_bytes, read_model_payload

if TYPE_CHECKING:
    from pipeline.io.storage import ObjectReader


UNKNOWN = "unknown"  # the reason in catalog_items.error of a needs_review row that the open-set score calls unknown
#: What a model file predicts unless it says otherwise: the item's category (``catalog_items``). A model of another
#: attribute (``"toe"``, ``"material"``) writes ``catalog_attributes`` (:mod:`db.attributes`).
CATEGORY = "category"
ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class OpenSetMeta:
    """A model file's open-set score, without its tensors (they are in the ONNX graph): a row scoring below
    ``threshold`` is unknown (:class:`pipeline.models.openset.OpenSet`)."""

    method: str
    threshold: float
    tpr: float
    n_fit: int = 0
    n_val: int = 0


@dataclass
class ModelMeta:
    """A model file's fields that inference uses, as :class:`pipeline.models.modelfile.ModelFile` has them, without
    the weights. ``name`` and ``version`` are what :func:`~pipeline.models.modelfile.load_model_file` gives the
    same file."""

    arch: str
    class_names: list[str]
    in_chans: int
    input_size: tuple[int, int]  # (H, W) pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    version: str
    name: str
    temperature: float = 1.0
    review_threshold: float = 0.0
    created_at: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    open_set: OpenSetMeta | None = None
    attribute: str = CATEGORY

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def output_width(self) -> int:
        """Columns of the network's output: the classes, plus one for the open-set score."""
        return self.num_classes + (self.open_set is not None)


def checked_attribute(name: object, what: str = "attribute") -> str:
    """``name`` as the attribute a model predicts: ``category`` (the item's category, ``catalog_items``) or another
    lower-case name of 1..64 letters, digits and ``_`` starting with a letter (a column of ``catalog_attributes``).

    Raises:
        ModelFileError: anything else; the message says what is valid.
    """
    if not isinstance(name, str) or not ATTRIBUTE_NAME.fullmatch(name):
        raise ModelFileError(f"{what}: attribute {name!r} is not a valid name: 1..64 characters of a-z, 0-9 and _, "
                             f"starting with a letter ('{CATEGORY}' for the item's category)")
    return name


def model_name(spec: str, path: str, arch: str) -> str:
    """What ``catalog_items.model_name`` holds for the model file ``spec`` (resolved to ``path``): the spec itself
    for ``bundled:NAME``, else ``ARCH:STEM`` (the file name without its suffix)."""
    return spec if spec.startswith(BUNDLED_PREFIX) else f"{arch}:{Path(path).stem}"


def _fields(obj: dict[str, Any], what: str) -> ModelMeta:
    """The :class:`ModelMeta` of a payload (``name`` and ``version`` empty).

    Raises:
        ModelFileError: a missing or bad field.
    """
    try:
        entry = obj.get("open_set")
        open_set = None
        if entry is not None:
            open_set = OpenSetMeta(method=str(entry["method"]), threshold=float(entry["threshold"]),
                                   tpr=float(entry["tpr"]), n_fit=int(entry.get("n_fit") or 0),
                                   n_val=int(entry.get("n_val") or 0))
        size = obj["input_size"]
        return ModelMeta(
            arch=str(obj["arch"]),
            class_names=[str(c) for c in obj["class_names"]],
            in_chans=int(obj["in_chans"]),
            input_size=(int(size[0]), int(size[1])),
            mean=tuple(float(x) for x in obj["mean"]),
            std=tuple(float(x) for x in obj["std"]),
            version="",
            name="",
            temperature=float(obj.get("temperature", 1.0)),
            review_threshold=float(obj.get("review_threshold", 0.0)),
            created_at=str(obj.get("created_at", "")),
            info=dict(obj.get("info") or {}),
            open_set=open_set,
            attribute=checked_attribute(obj.get("attribute", CATEGORY), what),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelFileError(f"{what} is a damaged invsort model file: missing or bad field {exc}") from None


def _check(meta: ModelMeta, what: str) -> None:
    """The checks of :func:`~pipeline.models.modelfile.load_model_file` that need no network.

    Raises:
        ModelFileError: mean/std not one value a channel, class names not at least 2 and distinct, a value that is
            not finite (or std not above 0, a negative temperature).
    """
    if len(meta.mean) != meta.in_chans or len(meta.std) != meta.in_chans:
        raise ModelFileError(f"{what}: mean/std have {len(meta.mean)} values for {meta.in_chans} channels")
    if len(set(meta.class_names)) != len(meta.class_names) or len(meta.class_names) < 2:
        raise ModelFileError(f"{what}: class names must be at least 2 and distinct")
    if not all(math.isfinite(x) for x in (*meta.mean, *meta.std)) or min(meta.std) <= 0:
        raise ModelFileError(f"{what}: mean {list(meta.mean)} and std {list(meta.std)} must be finite and std "
                             "above 0 (inputs are divided by std)")
    if not (math.isfinite(meta.temperature) and meta.temperature >= 0 and math.isfinite(meta.review_threshold)):
        raise ModelFileError(f"{what}: temperature {meta.temperature} and review threshold {meta.review_threshold} "
                             "must be finite numbers, the temperature not negative")
    if meta.open_set is not None and not math.isfinite(meta.open_set.threshold):
        raise ModelFileError(f"{what}: the open-set threshold is {meta.open_set.threshold}")


def load_model_meta(spec: str, *, reader: ObjectReader | None = None) -> ModelMeta:
    """The :class:`ModelMeta` of the model file ``spec`` names (a local path, an ``s3://`` URI or
    ``bundled:NAME``), read without importing torch; ``version`` and ``name`` are what
    :func:`pipeline.models.modelfile.load_model_file` gives the same bytes.

    Raises:
        FileNotFoundError: no such file or object.
        ModelFileError: not an invsort model file, a damaged one, or fields that do not fit together; one line.
        OSError, PermissionError: the read failed.
    """
    path, data = read_model_bytes(spec, reader=reader)
    what = f"model file {spec}"
    obj, version = read_model_payload(data, what=what)
    meta = _fields(obj, spec)
    _check(meta, what)
    meta.version = version
    meta.name = model_name(spec, path, meta.arch)
    return meta
