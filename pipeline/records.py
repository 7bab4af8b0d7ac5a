"""Plain records passed between the pipeline, the catalog writes and the Celery tasks (no torch here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

#: What a sort makes of an item (the status of an :class:`ItemResult`).
Status = Literal["sorted", "needs_review", "failed"]
SORT_STATUSES: tuple[Status, ...] = ("sorted", "needs_review", "failed")
#: A catalog row a human has decided on (:mod:`db.reviews`): never produced by a sort, never overwritten by one.
REVIEWED = "reviewed"
#: Every status a ``catalog_items`` row can have: a sort's, or ``reviewed``.
STATUSES: tuple[str, ...] = (*SORT_STATUSES, REVIEWED)

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with what PostgreSQL cannot store (NUL) or no database driver can encode (an unpaired surrogate)
    written as escapes: NUL as ``\\x00``, an unpaired surrogate U+DC80..U+DCFF (how Python's file system encoding
    carries a byte of a name that is not UTF-8, :pep:`383`) as ``\\xNN`` of that byte, any other unpaired surrogate
    as ``\\udNNN``. For messages (the ``error`` of a row); text without them is returned unchanged. Not
    reversible: a backslash is not escaped.
    """
    return _UNSTORABLE.sub(_escape, text) if _UNSTORABLE.search(text) else text


@dataclass(frozen=True, slots=True)
class Item:
    """One catalogue item to sort: its id in the catalog and the URI of its photo."""

    item_id: str
    uri: str


@dataclass(slots=True)
class AttributeResult:
    """What the model of one attribute other than the category found for one item: one row of
    ``catalog_attributes`` (:mod:`db.attributes`).

    ``value`` is the model's top-1 and ``confidence`` its probability 0..1 (both None when ``failed``);
    ``status`` is ``sorted`` or ``needs_review`` by that model's own review threshold (``error`` = ``unknown`` when
    its open-set score rejected the photo); ``topk`` is ``[[value, probability], ...]``, best first.
    """

    attribute: str
    status: Status
    value: str | None = None
    confidence: float | None = None
    topk: list[list[str | float]] = field(default_factory=list)
    error: str | None = None
    model_name: str | None = None
    model_version: str | None = None


@dataclass(slots=True)
class ItemResult:
    """What the pipeline found for one item: one row of ``catalog_items``.

    ``category`` and ``confidence`` are None for ``failed`` rows, whose ``error`` says why.
    ``topk`` is ``[[class_name, probability], ...]``, best first, probabilities in 0..1. ``attributes`` are the
    predictions of the job's models of other attributes (none for a failed item: its photo was never read).
    """

    item_id: str
    image_uri: str
    status: Status
    category: str | None = None
    confidence: float | None = None
    topk: list[list[str | float]] = field(default_factory=list)
    error: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    job_id: str | None = None
    attributes: list[AttributeResult] = field(default_factory=list)  # other attributes' models, in job order
