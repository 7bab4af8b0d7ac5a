"""The invsort model file: weights plus everything needed to use them, in one ``torch.save`` dict.

Layout (every value is a type that ``torch.load(..., weights_only=True)`` accepts)::

    {"format": "invsort-model/1", "arch": "mobilenet_v2", "class_names": [...],
     "in_chans": 3, "input_size": [H, W], "mean": [...], "std": [...],
     "version": "<12 hex chars, for information only>", "state_dict": {...},
     "temperature": 1.0, "review_threshold": 0.0, "created_at": "ISO-8601", "info": {...},
     "open_set": {"method": "mahalanobis", "threshold": ..., "tpr": 0.95, "whiten": tensor, "centers": tensor},
     "attribute": "category"}

``open_set`` (:mod:`pipeline.models.openset`) is optional: a file without it (older ones) loads and rejects nothing.
``attribute`` says what the class names are values of: ``category`` (the default, and what a file without it
predicts) or another attribute such as ``toe`` or ``material``, which a sort writes into ``catalog_attributes``.

The ``version`` field is written but never read: :func:`load_model_file` computes the version from the content it
loads (:func:`model_version`, the same as :func:`pipeline.models.fileversion.content_version` computes without
torch), so a file whose weights were changed under an old version string gets its own version.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import ConfigError, ModelFileError
from pipeline.io.files import atomic_path
from pipeline.io.images import to_model_input
from pipeline.models.fileversion import BUNDLED as BUNDLED
from pipeline.models.fileversion import (
    FORMAT,
    content_version,
    read_model_bytes,
    version_digest,
    version_meta,
)
from pipeline.models.fileversion import resolve_model_path as resolve_model_path
from pipeline.models.meta import CATEGORY, checked_attribute, model_name
from pipeline.models.openset import OpenSet, OpenSetNet
from pipeline.models.registry import arch_spec, create_model

if TYPE_CHECKING:
    from pipeline.io.storage import ObjectReader


@dataclass
class ModelFile:
    """A loaded model file. ``name`` is what goes into ``catalog_items.model_name``."""

    arch: str
    class_names: list[str]
    in_chans: int
    input_size: tuple[int, int]  # (H, W) pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    state_dict: dict[str, torch.Tensor]
    version: str = ""
    name: str = ""
    temperature: float = 1.0
    review_threshold: float = 0.0
    created_at: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    open_set: OpenSet | None = None
    attribute: str = CATEGORY  # what the class names are values of (pipeline.models.meta.checked_attribute)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build(self) -> nn.Module:
        """The architecture with these weights loaded, in eval mode, on the CPU."""
        model = create_model(self.arch, num_classes=self.num_classes, in_chans=self.in_chans)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def build_scoring(self) -> nn.Module:
        """:meth:`build`, wrapped in :class:`pipeline.models.openset.OpenSetNet` when the file has an open-set
        score: ``(N, num_classes + 1)`` outputs, the logits then the score. Without one, :meth:`build`."""
        model = self.build()
        return model if self.open_set is None else OpenSetNet(model, self.open_set).eval()

    @property
    def output_width(self) -> int:
        """Columns of :meth:`build_scoring`'s output: the classes, plus one for the open-set score."""
        return self.num_classes + (self.open_set is not None)


def model_version(mf: ModelFile, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """12 hex chars of a SHA-256 over everything that changes a prediction: architecture, class names, input
    size, channels, mean/std, temperature, review threshold, the open-set score (method, threshold, TPR, tensors;
    nothing for a file without one, so older files keep their version), and the weights' names, shapes and bytes.

    Same content, same version; retraining, recalibrating or moving the threshold gives a new one. The layout is
    :func:`pipeline.models.fileversion.version_digest`'s, which also computes it from a file's bytes without torch.
    """
    meta = version_meta(mf.arch, mf.class_names, mf.in_chans, mf.input_size, mf.mean, mf.std, mf.temperature,
                        mf.review_threshold)
    parts = mf.open_set.hash_parts() if mf.open_set is not None else []
    state = mf.state_dict if state_dict is None else state_dict

    def tensors() -> Iterator[tuple[str, tuple[int, ...], bytes]]:
        for key in sorted(state):
            t = state[key].detach().cpu().contiguous()
            yield key, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()

    return version_digest(meta, parts, tensors())


def save_model_file(mf: ModelFile, path: str | Path) -> str:
    """Write ``mf`` to ``path`` (its version is recomputed from the weights). Returns the version."""
    state = {k: v.detach().cpu().contiguous() for k, v in mf.state_dict.items()}
    mf.version = model_version(mf, state)
    payload = {
        "format": FORMAT,
        "arch": mf.arch,
        "class_names": list(mf.class_names),
        "in_chans": int(mf.in_chans),
        "input_size": [int(x) for x in mf.input_size],
        "mean": [float(x) for x in mf.mean],
        "std": [float(x) for x in mf.std],
        "version": mf.version,
        "state_dict": state,
        "temperature": float(mf.temperature),
        "review_threshold": float(mf.review_threshold),
        "created_at": mf.created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "info": mf.info,
        "attribute": checked_attribute(mf.attribute),
    }
    if mf.open_set is not None:
        payload["open_set"] = mf.open_set.to_dict()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return mf.version


def _check_weights(mf: ModelFile, what: str) -> None:
    """Refuse weights that do not fit ``mf``'s architecture, class count and channels, in one line.

    The architecture is built on PyTorch's ``meta`` device (shapes only, no memory, no initialisation) and its
    tensor names and shapes are compared with the file's.

    Raises:
        ModelFileError: unknown architecture or channel count, a class count that the classifier's outputs do
            not match, or missing, unexpected or misshapen tensors; the message starts with ``what``.
    """
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in create_model(
                mf.arch, num_classes=mf.num_classes, in_chans=mf.in_chans).state_dict().items()}
    except ConfigError as exc:
        raise ModelFileError(f"{what}: {exc}") from None
    got = {k: tuple(v.shape) for k, v in mf.state_dict.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    head = arch_spec(mf.arch).classifier_prefixes
    if wrong and not missing and not unexpected and all(
        k.startswith(head) and expected[k][0] == mf.num_classes != got[k][0] for k in wrong
    ):
        raise ModelFileError(f"{what}: {mf.num_classes} class names but the classifier has {got[wrong[0]][0]} outputs")
    if missing or unexpected or wrong:
        problems = [f"{k} is {got[k]}, {mf.arch} needs {expected[k]}" for k in wrong[:2]]
        if missing:
            problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise ModelFileError(f"{what}: the weights do not fit {mf.arch} with {mf.in_chans} channel(s) and "
                             f"{mf.num_classes} classes: " + "; ".join(problems))


def _check_open_set(mf: ModelFile, what: str) -> None:
    """Refuse an open-set entry whose tensors do not fit the classes and the classifier's input width.

    Raises:
        ModelFileError: ``centers`` is not ``(num_classes, D)`` or ``whiten`` not ``(D, D)``.
    """
    os_ = mf.open_set
    if os_ is None:
        return
    c, d = (tuple(os_.centers.shape) + (0, 0))[:2]
    if os_.centers.dim() != 2 or c != mf.num_classes or tuple(os_.whiten.shape) != (d, d):
        raise ModelFileError(f"{what}: open-set tensors of shapes {tuple(os_.centers.shape)} and "
                             f"{tuple(os_.whiten.shape)} do not fit {mf.num_classes} classes")


def _load_error_reason(exc: Exception) -> str:
    """One line on why ``torch.load`` refused a file: torch's weights-only unpickler explains ``weights_only`` for
    a paragraph and puts the actual reason (e.g. ``Unsupported operand 103``, ``Unsupported global: ...``) after
    ``WeightsUnpickler error:``; other errors keep their first line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return f"refused by torch.load(weights_only=True): {detail[0] if detail else 'unsupported content'}"[:300]
    lines = text.strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _from_payload(obj: dict[str, Any], spec: str) -> ModelFile:
    """The :class:`ModelFile` in a loaded payload (its ``version`` left empty: the file's own is never used).

    Raises:
        ModelFileError: a missing or bad field.
    """
    try:
        return ModelFile(
            arch=str(obj["arch"]),
            class_names=[str(c) for c in obj["class_names"]],
            in_chans=int(obj["in_chans"]),
            input_size=(int(obj["input_size"][0]), int(obj["input_size"][1])),
            mean=tuple(float(x) for x in obj["mean"]),
            std=tuple(float(x) for x in obj["std"]),
            state_dict=dict(obj["state_dict"]),
            temperature=float(obj.get("temperature", 1.0)),
            review_threshold=float(obj.get("review_threshold", 0.0)),
            created_at=str(obj.get("created_at", "")),
            info=dict(obj.get("info", {})),
            open_set=OpenSet.from_dict(obj["open_set"]) if obj.get("open_set") is not None else None,
            attribute=checked_attribute(obj.get("attribute", CATEGORY), spec),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelFileError(f"{spec} is a damaged invsort model file: missing or bad field {exc}") from None


PROBE_SEED = 0


def _check_finite(mf: ModelFile, what: str) -> None:
    """Refuse a model that would give NaN or infinite outputs, in one line: a mean/std that is not finite or a
    std that is not above 0, a temperature or review threshold that is not finite (or a negative temperature),
    weights or open-set values that are not finite, or non-finite outputs of a forward pass (float32, CPU) on
    three probe images of ``mf.input_size``: black, white and seeded noise.

    Raises:
        ModelFileError: the message starts with ``what`` and says which value is at fault.
    """
    if not all(math.isfinite(x) for x in (*mf.mean, *mf.std)) or min(mf.std) <= 0:
        raise ModelFileError(f"{what}: mean {list(mf.mean)} and std {list(mf.std)} must be finite and std above 0 "
                             "(inputs are divided by std)")
    if not (math.isfinite(mf.temperature) and mf.temperature >= 0 and math.isfinite(mf.review_threshold)):
        raise ModelFileError(f"{what}: temperature {mf.temperature} and review threshold {mf.review_threshold} must "
                             "be finite numbers, the temperature not negative")
    tensors = dict(mf.state_dict)
    if mf.open_set is not None:
        if not math.isfinite(mf.open_set.threshold):
            raise ModelFileError(f"{what}: the open-set threshold is {mf.open_set.threshold}")
        tensors.update({"open_set.whiten": mf.open_set.whiten, "open_set.centers": mf.open_set.centers})
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelFileError(f"{what}: {bad} of the {t.numel()} values of {key} are NaN or infinite")
    h, w = mf.input_size
    noise = torch.randint(0, 256, (1, h, w, mf.in_chans), generator=torch.Generator().manual_seed(PROBE_SEED),
                          dtype=torch.uint8)
    probe = torch.cat([torch.zeros_like(noise), torch.full_like(noise, 255), noise])
    c = mf.in_chans
    with torch.inference_mode():
        mean = torch.tensor(mf.mean, dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(mf.std, dtype=torch.float32).view(1, c, 1, 1)
        out = mf.build_scoring()(to_model_input(probe, mean, std)).float()
    if not bool(torch.isfinite(out).all()):
        raise ModelFileError(f"{what}: a forward pass on probe images (black, white, noise) gives NaN or infinite "
                             "outputs")


def load_model_file(spec: str, *, reader: ObjectReader | None = None) -> ModelFile:
    """Load a model file from a local path, an ``s3://`` URI or ``bundled:NAME``.

    Uses ``torch.load(..., weights_only=True)``: a file cannot run code when it is loaded. The version is
    computed from the bytes loaded (:func:`model_version` of the tensors torch built, checked equal to
    :func:`pipeline.models.fileversion.content_version` of the same bytes, which ``submit`` pins without torch);
    the file's own ``version`` field is ignored.

    Raises:
        FileNotFoundError: no such file or object.
        ModelFileError: the file is not an invsort model file, or its fields do not fit together (e.g. its class
            names are not as many as the classifier's outputs, or its architecture is unknown), or it would give
            NaN or infinite outputs (:func:`_check_finite`); one line.
    """
    path, data = read_model_bytes(spec, reader=reader)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean "not a model file"
        raise ModelFileError(f"{spec} is not an invsort model file ({_load_error_reason(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelFileError(
            f"{spec} is not an invsort model file (expected format {FORMAT!r}); "
            "make one with 'invsort train DIR --out MODEL'"
        )
    mf = _from_payload(obj, spec)
    if len(mf.mean) != mf.in_chans or len(mf.std) != mf.in_chans:
        raise ModelFileError(f"{spec}: mean/std have {len(mf.mean)} values for {mf.in_chans} channels")
    if len(set(mf.class_names)) != len(mf.class_names) or len(mf.class_names) < 2:
        raise ModelFileError(f"{spec}: class names must be at least 2 and distinct")
    _check_weights(mf, f"model file {spec}")
    _check_open_set(mf, f"model file {spec}")
    _check_finite(mf, f"model file {spec}")
    mf.version = model_version(mf)
    without_torch = content_version(data, what=f"model file {spec}")
    if without_torch != mf.version:  # the two readers of the format disagree: refuse rather than pin wrongly
        raise ModelFileError(f"model file {spec}: its content hashes to version {mf.version} as torch loads it but "
                             f"{without_torch} as read without torch; save it again with invsort")
    mf.name = model_name(spec, path, mf.arch)
    return mf
