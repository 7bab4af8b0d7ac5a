"""Progress display: a tqdm bar on a terminal, a few log lines anywhere else.

tqdm redraws its bar with ``\\r`` many times a second; on a terminal that is one line, but in a log file (stderr
redirected, a CI job, ``nohup``) every frame is kept, megabytes for one training run. :func:`progress` gives a
tqdm bar only when the stream it would draw on is a terminal; otherwise it gives a :class:`LogProgress`, which
writes ``desc: n/total unit (rate unit/s)`` through :mod:`logging` (logger ``pipeline.progress``, level INFO)
every ``log_every`` items, at most one line every ``min_interval_s`` seconds, and once at the end: a short pass
(a fast epoch, a small folder) gives one line.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_LINES = 10  # with a known total and no log_every: a line every tenth of it
MIN_INTERVAL_S = 10.0  # and no more often than this, except the last line


class LogProgress(Generic[T]):
    """tqdm's interface (iterate, :meth:`update`, :meth:`set_postfix`, :meth:`close`, ``n``) writing log lines.

    A line is logged when ``n`` reaches the next multiple of ``log_every`` and ``min_interval_s`` seconds
    have passed since the last line (or the start), and once at :meth:`close` (or the end of the iteration) when
    items were counted since the last line; with ``disable`` nothing is logged.

    Raises:
        ValueError: ``log_every < 1`` or a negative ``min_interval_s``.
    """

    def __init__(self, iterable: Iterable[T] | None, *, total: int | None, desc: str, unit: str, log_every: int,
                 min_interval_s: float = MIN_INTERVAL_S, disable: bool = False, logger: logging.Logger = log) -> None:
        if log_every < 1 or min_interval_s < 0:
            raise ValueError(f"log_every must be >= 1 and min_interval_s >= 0, got {log_every}, {min_interval_s}")
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.log_every, self.min_interval_s, self.disable, self.logger = log_every, min_interval_s, disable, logger
        self.n = 0
        self._logged_n = 0
        self._next = log_every
        self._postfix = ""
        self._t0 = self._t_logged = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("LogProgress made without an iterable cannot be iterated; call update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items; log a line when a multiple of ``log_every`` was reached (and the interval)."""
        self.n += n
        if self.n >= self._next:
            self._next = (self.n // self.log_every + 1) * self.log_every
            if time.perf_counter() - self._t_logged >= self.min_interval_s:
                self._log()

    def set_postfix(self, **values: Any) -> None:
        """Shown after the rate in the next line, as ``key=value`` pairs (tqdm's ``set_postfix``)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def refresh(self) -> None:
        """Nothing to redraw: lines are written by :meth:`update` and :meth:`close`."""

    def close(self) -> None:
        """Log the final count (when it was not the last line logged)."""
        if not self._closed and self.n != self._logged_n:
            self._log()
        self._closed = True

    def _log(self) -> None:
        self._logged_n = self.n
        self._t_logged = time.perf_counter()
        if self.disable:
            return
        seconds = self._t_logged - self._t0
        rate = f"{self.n / seconds:.1f} {self.unit}/s" if seconds > 0 else f"? {self.unit}/s"
        of = "" if self.total is None else f"/{self.total}"
        self.logger.info("%s: %d%s %s (%s)%s", self.desc, self.n, of, self.unit, rate,
                         f" {self._postfix}" if self._postfix else "")


def default_log_every(total: int | None) -> int:
    """Items between log lines: a tenth of ``total`` (at least 1), or 1,000 when the total is unknown."""
    return max(1, math.ceil(total / LOG_LINES)) if total else 1000


def progress(
    iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str, unit: str = "it",
    log_every: int | None = None, min_interval_s: float = MIN_INTERVAL_S, disable: bool = False,
    stream: IO[str] | None = None, leave: bool = False,
) -> tqdm | LogProgress[Any]:
    """A progress display for ``iterable`` (or, without one, for :meth:`update` calls).

    Args:
        iterable: what to iterate; None for a display advanced by ``update(n)``.
        total: the expected number of items (default: ``len(iterable)`` when it has one).
        desc: the label (e.g. ``"epoch 3/8"``).
        unit: what one item is (``"img"``, ``"batch"``).
        log_every: items between log lines when ``stream`` is not a terminal [default: a tenth of ``total``, so
            at most 11 lines, or every 1,000 items without a total].
        min_interval_s: and at most one line per this many seconds (the last line excepted) when not a terminal.
        disable: show nothing (iteration still works).
        stream: where a bar would be drawn [default: ``sys.stderr``]; a terminal gets a tqdm bar.
        leave: whether a tqdm bar stays on screen when done.

    Returns:
        A ``tqdm`` bar when ``stream.isatty()``, else a :class:`LogProgress` logging at INFO on
        ``pipeline.progress``; both iterate like ``iterable`` and have ``update``, ``set_postfix``, ``close``, ``n``.
    """
    stream = stream if stream is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not disable and _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, log_every=log_every or default_log_every(total),
                       min_interval_s=min_interval_s, disable=disable)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
