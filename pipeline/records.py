"""Plain records passed between the pipeline, the catalog writes and the Celery tasks (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["sorted", "needs_review", "failed"]
STATUSES: tuple[Status, ...] = ("sorted", "needs_review", "failed")


@dataclass(frozen=True, slots=True)
class Item:
    """One catalogue item to sort: its id in the catalog and the URI of its photo."""

    item_id: str
    uri: str


@dataclass(slots=True)
class ItemResult:
    """What the pipeline found for one item: one row of ``catalog_items``.

    ``category`` and ``confidence`` are None for ``failed`` rows, whose ``error`` says why.
    ``topk`` is ``[[class_name, probability], ...]``, best first, probabilities in 0..1.
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
