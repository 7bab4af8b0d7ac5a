"""Progress display: a tqdm bar on a terminal, a bounded number of log lines (no ``\\r`` frames) elsewhere."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from pipeline.io.folders import load_images, scan_folder
from pipeline.progress import LogProgress, progress
from tests.images import EXAMPLES


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


def test_not_a_terminal_logs_a_line_every_tenth_and_at_the_end(capsys, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    items = list(progress(range(1000), desc="decode", unit="img", min_interval_s=0))  # stderr: captured, no tty
    assert items == list(range(1000))
    lines = _progress_lines(caplog)
    assert len(lines) == 10
    assert lines[0].startswith("decode: 100/1000 img (") and lines[-1].startswith("decode: 1000/1000 img (")
    assert "\r" not in capsys.readouterr().err


def test_a_fast_pass_gives_one_line_and_updates_work_without_an_iterable(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    bar = progress(total=500, desc="sorting", unit="img", stream=io.StringIO())
    assert isinstance(bar, LogProgress)
    for _ in range(50):
        bar.update(10)
    bar.set_postfix(loss="0.123")
    bar.close()
    bar.close()
    assert _progress_lines(caplog) == [caplog.records[0].getMessage()]  # well inside the 10 s interval: one line
    assert caplog.records[0].getMessage().startswith("sorting: 500/500 img (")
    assert caplog.records[0].getMessage().endswith("loss=0.123")


def test_disabled_logs_nothing_and_a_terminal_gets_tqdm(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    assert list(progress(range(5), desc="x", disable=True, stream=io.StringIO())) == list(range(5))
    assert not _progress_lines(caplog)
    term = _Terminal()
    bar = progress(range(3), desc="epoch 1/2", unit="batch", stream=term)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    assert "\r" in term.getvalue()  # what a log file must not get
    with pytest.raises(ValueError, match="log_every"):
        LogProgress(None, total=None, desc="x", unit="it", log_every=0)


def test_loading_a_folder_with_progress_on_writes_no_bar_frames(capsys, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    _, samples = scan_folder(EXAMPLES)
    arrays = load_images(samples, size=(28, 28), in_chans=1, progress=True, desc="decode test")
    assert len(arrays.labels) == len(samples) == 50
    assert "\r" not in capsys.readouterr().err
    lines = _progress_lines(caplog)
    assert 1 <= len(lines) <= 11 and lines[-1].startswith("decode test: 50/50 img")
