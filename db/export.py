"""Exports of the catalog, streamed: CSV, JSON Lines and Parquet (``invsort export``, the catalog page's downloads).

Rows are read a keyset page at a time (:func:`db.queries.list_items`, one short transaction each) and written as
they come, so memory stays flat whatever the catalog's size; the order is the items' key. The columns are
:data:`EXPORT_COLUMNS`, the fields of :class:`db.catalog.CatalogRow` (``item_id`` the whole id). CSV has a header
line and ``topk`` and ``attributes`` as JSON text (empty cells for nulls); JSON Lines one object per row; Parquet
typed columns (``topk`` a list of ``{category, probability}``, ``attributes`` a map of attribute to value, times as
UTC timestamps), written in row groups of
``row_group_rows`` rows, through pyarrow (``pip install 'invsort[parquet]'``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import fields
from datetime import datetime
from typing import IO, Any

from db.catalog import CatalogRow
from db.queries import ItemFilters, list_items
from db.session import session_scope
from pipeline.errors import InvsortError

__all__ = [
    "EXPORT_CHUNK",
    "EXPORT_COLUMNS",
    "EXPORT_FORMATS",
    "PARQUET_ROW_GROUP",
    "csv_chunks",
    "jsonl_lines",
    "parquet_schema",
    "walk_items",
    "write_export",
    "write_parquet",
]

EXPORT_CHUNK = 1000  # rows read per keyset page while an export streams
EXPORT_COLUMNS = tuple(f.name for f in fields(CatalogRow))
EXPORT_FORMATS = ("csv", "jsonl", "parquet")
PARQUET_ROW_GROUP = 50_000
_CSV_FLUSH = 200  # rows per chunk of CSV text
_JSON = ("topk", "attributes")  # the columns a CSV cell holds as JSON text


def walk_items(url: str, filters: ItemFilters | None = None, *, chunk: int = EXPORT_CHUNK) -> Iterator[CatalogRow]:
    """Every catalog row of ``url`` matching ``filters``, by key, a keyset page per short transaction: a row written
    meanwhile may or may not be in it, a row that existed throughout is in it exactly once."""
    after = None
    while True:
        with session_scope(url) as session:
            page = list_items(session=session, filters=filters, after=after, limit=chunk)
        yield from page.rows
        if page.next_after is None:
            return
        after = page.next_after


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def csv_chunks(rows: Iterable[CatalogRow]) -> Iterator[str]:
    """CSV text of ``rows``: the header, then a chunk every 200 rows (``topk`` and ``attributes`` as JSON, nulls as
    empty cells)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for n, row in enumerate(rows, 1):
        writer.writerow(["" if (v := getattr(row, name)) is None else json.dumps(v) if name in _JSON else _plain(v)
                         for name in EXPORT_COLUMNS])
        if n % _CSV_FLUSH == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def jsonl_lines(rows: Iterable[CatalogRow]) -> Iterator[str]:
    """One JSON object a row (times in ISO 8601, UTC), each line ending with a newline."""
    for row in rows:
        yield json.dumps({name: _plain(getattr(row, name)) for name in EXPORT_COLUMNS}, ensure_ascii=False) + "\n"


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InvsortError("the Parquet export needs pyarrow: pip install 'invsort[parquet]'") from None
    return pyarrow, pyarrow.parquet


def parquet_schema() -> Any:
    """The ``pyarrow.Schema`` of a Parquet export: one field per :data:`EXPORT_COLUMNS`."""
    pa, _ = _pyarrow()
    text, number, when = pa.string(), pa.float64(), pa.timestamp("us", tz="UTC")
    types = {"confidence": number, "model_confidence": number, "updated_at": when, "reviewed_at": when,
             "topk": pa.list_(pa.struct([("category", text), ("probability", number)])),
             "attributes": pa.map_(text, text)}
    nullable = {"item_id": False, "image_uri": False, "status": False, "updated_at": False, "attributes": False}
    return pa.schema([pa.field(name, types.get(name, text), nullable=nullable.get(name, True))
                      for name in EXPORT_COLUMNS])


def _columns(rows: list[CatalogRow]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [getattr(r, name) for r in rows] for name in EXPORT_COLUMNS}
    columns["topk"] = [None if t is None else [{"category": str(c), "probability": float(p)} for c, p in t]
                       for t in columns["topk"]]
    columns["attributes"] = [sorted(a.items()) for a in columns["attributes"]]
    return columns


def write_parquet(rows: Iterable[CatalogRow], sink: str | IO[bytes], *, row_group_rows: int = PARQUET_ROW_GROUP,
                  chunk: int = EXPORT_CHUNK) -> int:
    """Write ``rows`` as Parquet to ``sink`` (a path or a binary file, a pipe included), ``row_group_rows`` rows a
    row group; at most one row group is held in memory. Returns how many rows were written.

    Raises:
        InvsortError: pyarrow is not installed.
        ValueError: ``row_group_rows`` is below 1.
    """
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be at least 1, got {row_group_rows}")
    pa, pq = _pyarrow()
    schema = parquet_schema()
    written, pending, held = 0, [], 0
    batch: list[CatalogRow] = []
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:

        def add(rows_: list[CatalogRow]) -> None:
            nonlocal held
            pending.append(pa.RecordBatch.from_pydict(_columns(rows_), schema=schema))
            held += len(rows_)

        def write_group() -> None:
            nonlocal held, written
            if held:
                writer.write_table(pa.Table.from_batches(pending, schema=schema), row_group_size=held)
                written += held
                pending.clear()
                held = 0

        for row in rows:
            batch.append(row)
            if len(batch) == min(chunk, row_group_rows - held):
                add(batch)
                batch = []
                if held >= row_group_rows:
                    write_group()
        if batch:
            add(batch)
        write_group()
    return written


def write_export(rows: Iterable[CatalogRow], fmt: str, sink: IO[bytes], *,
                 row_group_rows: int = PARQUET_ROW_GROUP) -> int:
    """Write ``rows`` to the binary file ``sink`` as ``fmt`` (``csv``, ``jsonl`` or ``parquet``; text in UTF-8).
    Returns how many rows were written.

    Raises:
        ValueError: an unknown format.
        InvsortError: ``parquet`` without pyarrow.
    """
    if fmt == "parquet":
        return write_parquet(rows, sink, row_group_rows=row_group_rows)
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"no export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    counted = 0

    def count(source: Iterable[CatalogRow]) -> Iterator[CatalogRow]:
        nonlocal counted
        for row in source:
            counted += 1
            yield row

    pieces = csv_chunks(count(rows)) if fmt == "csv" else jsonl_lines(count(rows))
    for piece in pieces:
        sink.write(piece.encode("utf-8"))
    return counted
