"""The feedback loop: human review decisions in the catalog become training photos (``invsort train --from-catalog``).

A reviewer's decision (:mod:`db.reviews`) makes a catalog row ``reviewed`` with the human's category. Those rows are
the photos the model was unsure of or wrong about, labelled: the most useful photos a next model can learn from.
:func:`reviewed_photos` reads them from a catalog database, fetches each photo through the worker's
:class:`~pipeline.io.storage.ObjectReader` (local roots or S3, with the same size limit as a sort), checks its header
(content sniffed, never trusted from the name) and writes it under ``dest/<category>/<sha256[:20]>.<ext>``, where
:func:`pipeline.training.recipe.train` (given :func:`catalog_feedback`) adds it to the **training** split only: the
validation and test splits stay the data folder's, so the figures of the model before and after are measured on
the same photos. A reviewed photo whose bytes equal a validation or test photo's is left out (it would leak the
answer into the figures).

Rows decided "not a product / unknown" (category null) and rows whose category is not one of the model's are
counted, not used: the first would train the open-set score (future work), the second needs a new category, which
is a new training run on a data folder that has it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from db.catalog import CatalogRow
from db.queries import ItemFilters, list_items
from db.session import session_scope
from pipeline.errors import ImageError, SourceError, TransientError
from pipeline.io.images import check_image_header
from pipeline.io.storage import ObjectReader, make_reader
from pipeline.records import REVIEWED
from pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)

_PAGE = 500  # catalog rows read per keyset page
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "PNM": "pnm", "GIF": "gif"}


@dataclass
class FeedbackSet:
    """What :func:`reviewed_photos` found.

    Attributes:
        photos: ``(path, category, sha256)`` of each usable photo, written under the destination folder.
        reviewed_rows: ``reviewed`` rows in the catalog.
        unknown: rows decided "not a product / unknown" (not used).
        other_category: rows whose category the model does not have, by category (not used).
        failed: ``(item_id, reason)`` of photos that could not be read or are not images (not used).
        duplicates: photos left out because their bytes are already in the set.
    """

    photos: list[tuple[str, str, str]] = field(default_factory=list)
    reviewed_rows: int = 0
    unknown: int = 0
    other_category: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0

    def summary(self, database_url: str) -> dict[str, Any]:
        """JSON-ready counts for the model file's ``info["data"]["feedback"]`` (the URL without its password)."""
        return {
            "database": make_url(database_url).render_as_string(hide_password=True),
            "reviewed_rows": self.reviewed_rows,
            "used": len(self.photos),
            "per_class": dict(Counter(c for _, c, _ in self.photos)),
            "unknown": self.unknown,
            "other_category": dict(self.other_category),
            "failed": len(self.failed),
            "failed_examples": [list(f) for f in self.failed[:20]],
            "duplicates": self.duplicates,
        }


def iter_reviewed(database_url: str) -> Iterator[CatalogRow]:
    """Every ``reviewed`` catalog row of ``database_url``, in key order (keyset pages of 500 rows)."""
    after: str | None = None
    while True:
        with session_scope(database_url) as session:
            page = list_items(session=session, filters=ItemFilters(status=REVIEWED), after=after, limit=_PAGE)
        yield from page.rows
        if page.next_after is None:
            return
        after = page.next_after


def reviewed_photos(
    database_url: str, class_names: Sequence[str], dest: str | Path, *, settings: Settings | None = None,
    reader: ObjectReader | None = None, log_fn: Callable[[str], None] = print,
) -> FeedbackSet:
    """Fetch the photos of the catalog's ``reviewed`` rows whose category is one of ``class_names`` into ``dest``.

    Args:
        database_url: the catalog (SQLAlchemy URL, SQLite or PostgreSQL), at the latest schema.
        class_names: the categories the model being trained has.
        dest: folder to write ``<category>/<sha256[:20]>.<ext>`` into (created; files already there are reused).
        settings: local roots, S3 endpoint and the byte limit for reading photos (default: the process's).
        reader: reads the photos (default: :func:`~pipeline.io.storage.make_reader` of ``settings``).
        log_fn: receives one summary line and a line per photo that could not be used (at most 20).

    Returns:
        A :class:`FeedbackSet`; a photo that cannot be read fails alone, with its reason.

    Raises:
        sqlalchemy.exc.OperationalError: the database did not answer.
    """
    settings = settings or get_settings()
    reader = reader or make_reader(settings)
    known = set(class_names)
    found = FeedbackSet()
    seen: set[str] = set()
    dest = Path(dest)
    for row in iter_reviewed(database_url):
        found.reviewed_rows += 1
        if row.category is None:
            found.unknown += 1
            continue
        if row.category not in known:
            found.other_category[row.category] += 1
            continue
        try:
            data = reader.read(row.image_uri)
            header = check_image_header(data, max_pixels=settings.max_image_pixels)
        except (ImageError, SourceError, TransientError, PermissionError, OSError) as exc:
            found.failed.append((row.item_id, f"{type(exc).__name__}: {exc}"))
            if len(found.failed) <= 20:
                log_fn(f"  feedback: cannot use {row.item_id} ({row.image_uri}): {exc}")
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            found.duplicates += 1
            continue
        seen.add(sha)
        path = dest / row.category / f"{sha[:20]}.{_EXTENSIONS.get(header.format.upper(), 'img')}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        found.photos.append((str(path), row.category, sha))
    per_class = ", ".join(f"{c} {n}" for c, n in sorted(Counter(c for _, c, _ in found.photos).items()))
    log_fn(f"feedback: {found.reviewed_rows} reviewed rows; {len(found.photos)} photos used ({per_class or 'none'}); "
           f"{found.unknown} not a product / unknown and {sum(found.other_category.values())} of other categories "
           f"left out; {len(found.failed)} unreadable; {found.duplicates} duplicates")
    return found


FeedbackSource = Callable[[Sequence[str], Path], tuple[list[tuple[str, str, str]], dict[str, Any]]]


def catalog_feedback(database_url: str, *, settings: Settings | None = None,
                     log_fn: Callable[[str], None] = print) -> FeedbackSource:
    """The ``feedback`` argument of :func:`pipeline.training.recipe.train` for a catalog: called with the run's
    category names and a folder, it runs :func:`reviewed_photos` and returns ``(photos, summary)``, where photos
    are ``(path, category, sha256)`` and summary is :meth:`FeedbackSet.summary`. (Training sits below the database
    layer, so it receives this function rather than importing it.)"""

    def fetch(class_names: Sequence[str], dest: Path) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
        found = reviewed_photos(database_url, class_names, dest, settings=settings, log_fn=log_fn)
        return found.photos, found.summary(database_url)

    return fetch
