"""Re-categorisation (pipeline/recategorize.py, ``invsort recategorize``, ``invsort beat``) on real SQLite and
PostgreSQL, with real photos sorted by the bundled model and re-sorted by other model files (the bundled one with a
class's bias moved: other versions, some categories changed). The queued path and the schedule run real worker and
beat processes on a Redis database of this file's own (9) and a PostgreSQL database of their own.

Every test that commits works in a database of its own (``url`` below: a SQLite file, or a PostgreSQL database).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text

from db import migrate
from db.catalog import get_item, iter_items, upsert_items
from db.jobs import acquire_lease
from db.models import CatalogHistory, CatalogItem, Lease, SortingJob
from db.reviews import record_review
from db.session import dispose_engines, session_scope
from pipeline.errors import ConfigError
from pipeline.models.modelfile import load_model_file, save_model_file
from pipeline.recategorize import LEASE, AlreadyRunningError, recategorize
from pipeline.records import ItemResult
from pipeline.settings import build_settings, get_settings
from tests.fixtures.pg import create_pg_database, drop_pg_database
from tests.images import example_files
from tests.test_worker import flushed_redis, invsort, stop_worker, wait_for
from worker.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = "bundled:fashion_mnist_cnn"
REDIS_URL = "redis://127.0.0.1:6379/9"  # this file's own database (test_worker.py and test_jobs.py use 13, ...)
HEADER = ["from_category", "to_category", "items"]
UNSET = {k: None for k in os.environ if k.startswith("INVSORT_")}


def _model(path: Path, category: str, delta: float) -> tuple[Path, str]:
    """The bundled model with ``category``'s output bias moved by ``delta``: another version, other predictions."""
    mf = load_model_file(BUNDLED)
    state = dict(mf.state_dict)
    bias = state["classifier.5.bias"].clone()
    bias[mf.class_names.index(category)] += delta
    state["classifier.5.bias"] = bias
    return path, save_model_file(dataclasses.replace(mf, state_dict=state), path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """``shoes`` (Bag +6: some photos move to Bag) and ``shoes2`` (Coat +4), with their versions."""
    folder = tmp_path_factory.mktemp("models")
    return {"shoes": _model(folder / "shoes.pt", "Bag", 6.0), "shoes2": _model(folder / "shoes2.pt", "Coat", 4.0)}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> Iterator[str]:
    """A migrated catalog of this test's own."""
    if request.param == "sqlite":
        found = f"sqlite:///{tmp_path / 'catalog.db'}"
        migrate.upgrade(found)
        yield found
        dispose_engines(found)
        return
    found = create_pg_database()
    try:
        migrate.upgrade(found)
        yield found
    finally:
        drop_pg_database(found)


def _photos(folder: Path, n: int = 16, start: int = 0) -> Path:
    for f in example_files()[start : start + n]:
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f.parent.name / f.name)
    return folder


def _cli(*args: str, env: dict[str, str | None] | None = None) -> str:
    result = CliRunner().invoke(main, list(args), env={**UNSET, **(env or {})}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _sort(url: str, folder: Path) -> str:
    out = _cli("sort", str(folder), "--db", url, "--no-progress")
    return out.split("job ", 1)[1].split(";", 1)[0]


def _report(path: Path) -> tuple[list[str], Counter[tuple[str, str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], Counter({(a, b): int(n) for a, b, n in rows[1:]})


def _rows(url: str) -> dict[str, object]:
    with session_scope(url) as session:
        return {r.item_id: r for r in iter_items(session=session)}


def _count(url: str, what: object, *where: object) -> int:
    with session_scope(url) as session:
        return int(session.execute(select(func.count()).select_from(what).where(*where)).scalar_one())


def _catalog_jobs(url: str) -> list[str]:
    with session_scope(url) as session:
        return list(session.scalars(select(SortingJob.id).where(SortingJob.source.startswith("catalog:"))
                                    .order_by(SortingJob.created_at)))


def _entries(url: str, job_id: str) -> list[CatalogHistory]:
    with session_scope(url) as session:
        return list(session.scalars(select(CatalogHistory).where(CatalogHistory.job_id == job_id)
                                    .order_by(CatalogHistory.id)))


# --------------------------------------------------------------------------------------------- embedded


def test_sixteen_photos_move_to_the_new_models_version_once(url, tmp_path, models):
    """The issue's "done when": 16 photos sorted with the bundled model, then re-sorted with shoes.pt."""
    shoes, version = models["shoes"]
    first_job = _sort(url, _photos(tmp_path / "photos"))
    before = {item_id: row.category for item_id, row in _rows(url).items()}
    assert len(before) == 16

    out = _cli("recategorize", "--model", str(shoes), "--report", str(tmp_path / "r.csv"), "--db", url,
               "--no-progress")
    assert "re-sorted 16 items" in out, out
    rows = _rows(url)
    assert {row.model_version for row in rows.values()} == {version}
    assert _count(url, CatalogHistory) == 32
    with session_scope(url) as session:
        assert session.execute(text("SELECT count(*) FROM catalog_current")).scalar_one() == 16
    header, pairs = _report(tmp_path / "r.csv")
    assert header == HEADER and sum(pairs.values()) == 16
    assert pairs == Counter((before[i], row.category) for i, row in rows.items())
    assert any(a != b for a, b in pairs) and any(a == b for a, b in pairs)  # moved and unchanged pairs
    (job,) = _catalog_jobs(url)
    entries = _entries(url, job)
    assert len(entries) == 16 and {e.source for e in entries} == {"model"}
    assert {(e.previous_category, e.category) for e in entries} == set(pairs)
    assert all(row.job_id == job for row in rows.values()) and job != first_job

    again = _cli("recategorize", "--model", str(shoes), "--report", str(tmp_path / "r2.csv"), "--db", url,
                 "--no-progress")
    assert "nothing to re-sort" in again
    assert (tmp_path / "r2.csv").read_text().splitlines() == [",".join(HEADER)]
    assert _catalog_jobs(url) == [job] and _count(url, CatalogHistory) == 32


def test_reviewed_rows_are_never_touched_and_filters_narrow_the_rows(url, tmp_path, models):
    shoes, version = models["shoes"]
    first_job = _sort(url, _photos(tmp_path / "photos"))
    rows = _rows(url)
    reviewed = sorted(i for i, r in rows.items() if r.category == "Bag")[0]
    with session_scope(url) as session:
        record_review(session=session, item_id=reviewed, category="Coat", reviewer="ana")
        kept = get_item(session=session, item_id=reviewed)

    def run(*filters: str) -> Counter[tuple[str, str]]:
        _cli("recategorize", "--model", str(shoes), "--report", str(tmp_path / "r.csv"), "--db", url,
             "--no-progress", *filters)
        return _report(tmp_path / "r.csv")[1]

    def still_old(predicate) -> set[str]:
        return {i for i, r in _rows(url).items() if r.status != "reviewed" and r.model_version != version
                and predicate(r)}

    bags = still_old(lambda r: r.category == "Bag")
    assert 0 < len(bags) < 15
    assert sum(run("--category", "Bag").values()) == len(bags)
    assert not still_old(lambda r: r.category == "Bag")

    assert run("--before", "2020-01-01").total() == 0  # every row was written later
    assert run("--job", "no-such-job").total() == 0

    review = still_old(lambda r: r.status == "needs_review" and r.job_id == first_job)
    assert sum(run("--status", "needs_review", "--job", first_job).values()) == len(review)
    rest = still_old(lambda r: True)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    assert sum(run("--before", tomorrow).values()) == len(rest) > 0
    assert len(_catalog_jobs(url)) == 3

    after = _rows(url)
    assert {r.model_version for i, r in after.items() if i != reviewed} == {version}
    with session_scope(url) as session:
        assert get_item(session=session, item_id=reviewed) == kept  # not a column changed, updated_at included
    resorted = {e.item_id for job in _catalog_jobs(url) for e in _entries(url, job)}
    assert len(resorted) == 15 and reviewed not in resorted


def test_dry_run_prints_the_count_and_an_estimate_and_writes_nothing(url, tmp_path, models):
    shoes, _ = models["shoes"]
    _sort(url, _photos(tmp_path / "photos"))

    def state() -> tuple[int, ...]:
        return (_count(url, SortingJob), _count(url, CatalogHistory), _count(url, Lease),
                hash(tuple(sorted((i, r.model_version, str(r.updated_at)) for i, r in _rows(url).items()))))

    before = state()
    out = _cli("recategorize", "--model", str(shoes), "--db", url, "--dry-run", "--category", "Bag")
    bags = sum(r.category == "Bag" for r in _rows(url).values())
    assert f"dry run: {bags} items would be re-sorted" in out
    assert "estimated time:" in out and "images/s on cpu, measured here" in out, out
    out = _cli("recategorize", "--model", BUNDLED, "--db", url, "--dry-run")
    assert "dry run: nothing to re-sort" in out and "estimated" not in out
    assert state() == before
    refused = CliRunner().invoke(main, ["recategorize", "--dry-run", "--report", "x.csv", "--db", url], env=UNSET)
    assert refused.exit_code == 2 and "--dry-run writes nothing" in refused.output


def test_rollback_puts_back_the_previous_predictions_and_leaves_changed_items(url, tmp_path, models):
    shoes, version = models["shoes"]
    first_job = _sort(url, _photos(tmp_path / "photos"))
    old = _rows(url)
    _cli("recategorize", "--model", str(shoes), "--db", url, "--no-progress")
    (job,) = _catalog_jobs(url)
    ids = sorted(old)
    reviewed, changed = ids[0], ids[1]
    with session_scope(url) as session:  # after the job: a person's decision, and another sort of one item
        record_review(session=session, item_id=reviewed, category="Coat", reviewer="ana")
        upsert_items(session=session, rows=[ItemResult(item_id=changed, image_uri=old[changed].image_uri,
                                                       status="failed", error="gone", model_version="v9",
                                                       job_id="other-job")])
    out = _cli("recategorize", "--rollback", job, "--db", url)
    assert "14 items got their previous prediction back" in out, out
    assert "1 changed since the job, 1 reviewed by a person since, 0 created by the job" in out
    now = _rows(url)
    for item_id in ids[2:]:
        was, back = old[item_id], now[item_id]
        assert (back.category, back.confidence, back.status, back.topk, back.error, back.model_name,
                back.model_version, back.job_id) == (was.category, was.confidence, was.status, was.topk, was.error,
                                                     was.model_name, was.model_version, first_job)
        assert back.updated_at > was.updated_at
    assert now[reviewed].status == "reviewed" and now[changed].model_version == "v9"
    restored = [e for e in _entries(url, job) if e.source == "rollback"]
    assert len(restored) == 14 and all(e.model_version != version for e in restored)
    assert sum(e.changed for e in restored) == sum(old[i].category != e.previous_category for i, e in
                                                   zip(ids[2:], sorted(restored, key=lambda e: e.item_id),
                                                       strict=True))

    assert "0 items got their previous prediction back" in _cli("recategorize", "--rollback", job, "--db", url)
    assert _count(url, CatalogHistory, CatalogHistory.source == "rollback") == 14

    created_job = _sort(url, _photos(tmp_path / "more", n=4, start=30))  # new items: nothing to go back to
    out = _cli("recategorize", "--rollback", created_job, "--db", url)
    assert "0 items got their previous prediction back" in out and "4 created by the job (kept" in out
    assert len(_rows(url)) == 20

    with session_scope(url) as session:
        session.execute(text("UPDATE sorting_jobs SET status = 'running' WHERE id = :j"), {"j": created_job})
    refused = CliRunner().invoke(main, ["recategorize", "--rollback", created_job, "--db", url], env=UNSET)
    assert refused.exit_code == 1 and f"job {created_job} is still running" in refused.output
    missing = CliRunner().invoke(main, ["recategorize", "--rollback", "no-such-job", "--db", url], env=UNSET)
    assert missing.exit_code == 1 and "no sorting job 'no-such-job'" in missing.output


def test_a_photo_outside_the_roots_is_left_as_it_is_unless_an_earlier_sort_read_it(tmp_path, models):
    shoes, version = models["shoes"]
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    migrate.upgrade(url)
    _sort(url, _photos(tmp_path / "photos", n=4))
    outside = next(iter(_rows(url)))
    with session_scope(url) as session:  # as if its sort had refused it
        session.execute(text("UPDATE catalog_items SET status = 'failed', category = NULL WHERE item_id = :i"),
                        {"i": outside})
    settings = build_settings(database_url=url, device="cpu")
    queued: list[tuple[str, int, str]] = []
    # queued: the submitting process's roots decide (none here): every local photo is left out and counted
    outcome = recategorize(settings, model_spec=str(shoes), enqueue=lambda *task: queued.append(task))
    assert (outcome.job_id, outcome.skipped, queued) == (None, 4, [])
    # embedded: the three photos an earlier sort read are read again; the failed row's is not
    outcome = recategorize(settings, model_spec=str(shoes))
    assert (outcome.items, outcome.skipped, outcome.first_skipped) == (3, 1, outside)
    assert _rows(url)[outside].model_version != version
    # inside a root it is read
    outcome = recategorize(settings, model_spec=str(shoes), extra_roots=[tmp_path / "photos"])
    assert (outcome.items, outcome.skipped) == (1, 0)
    assert {r.model_version for r in _rows(url).values()} == {version}
    dispose_engines(url)


@pytest.fixture
def pg(tmp_path) -> Iterator[str]:
    found = create_pg_database()
    try:
        migrate.upgrade(found)
        yield found
    finally:
        drop_pg_database(found)


def test_one_recategorisation_at_a_time(pg, tmp_path, models):
    """Four runs at once (PostgreSQL: where beats and workers run side by side; on SQLite a queued submission's
    reads and writes in one transaction may meet another writer's commit, SQLite's "database is locked")."""
    url = pg
    shoes, _ = models["shoes"]
    _sort(url, _photos(tmp_path / "photos", n=8))
    settings = build_settings(database_url=url, local_roots=str(tmp_path), items_per_task=3)
    queued: list[tuple[str, int, str]] = []
    results: list[object] = []

    def run() -> None:
        try:
            results.append(recategorize(settings, model_spec=str(shoes), enqueue=lambda *t: queued.append(t)))
        except AlreadyRunningError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    started = [r for r in results if not isinstance(r, Exception)]
    assert len(results) == 4 and len(started) == 1 and started[0].items == 8
    assert len(_catalog_jobs(url)) == 1 and len(queued) == 3  # 8 items, 3 a task
    (job,) = _catalog_jobs(url)
    with pytest.raises(AlreadyRunningError, match=f"job {job}, a re-categorisation .* is still running"):
        recategorize(settings, model_spec=str(shoes))
    with session_scope(url) as session:  # a run that is starting holds the lease
        session.execute(text("UPDATE sorting_jobs SET status = 'cancelled'"))
        assert acquire_lease(session=session, name=LEASE, holder="elsewhere:1", ttl_s=60)
    with pytest.raises(AlreadyRunningError, match="starting at this moment"):
        recategorize(settings, model_spec=str(shoes))
    with session_scope(url) as session:
        session.execute(text("DELETE FROM leases"))
    # the cancelled job's items were never sorted: the next run lists them again
    assert recategorize(settings, model_spec=str(shoes)).items == 8


def test_the_schedule_setting_is_a_cron_expression():
    assert build_settings(recategorize_schedule=" */15  2 * * mon-fri ").recategorize_schedule == "*/15 2 * * mon-fri"
    assert build_settings(recategorize_schedule="").recategorize_schedule is None
    for bad, field in [("0 3 * *", "(4 fields)"), ("61 * * * *", "minute field '61'"),
                       ("* * 0 * *", "day of month field '0'"), ("* * * * 7", "day of week field '7'")]:
        with pytest.raises(ConfigError, match="INVSORT_RECATEGORIZE_SCHEDULE must be a cron expression of 5 fields") \
                as caught:
            build_settings(recategorize_schedule=bad)
        assert field in str(caught.value)
    from worker.app import beat_schedule

    assert beat_schedule(build_settings()) == {}
    entries = beat_schedule(build_settings(recategorize_schedule="0 3 * * *", history_retention_days=30))
    assert {name: e["task"] for name, e in entries.items()} == {
        "invsort-recategorize": "invsort.recategorize", "invsort-prune-history": "invsort.prune_history"}
    cron = entries["invsort-recategorize"]["schedule"]
    assert (cron.minute, cron.hour) == ({0}, {3})


def test_one_beat_at_a_time_holds_the_lease(tmp_path, monkeypatch):
    from worker.app import app
    from worker.beat import RENEW_S, LeaderScheduler

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    migrate.upgrade(url)
    monkeypatch.setenv("INVSORT_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        first, second = (LeaderScheduler(app=app, lazy=True) for _ in range(2))
        assert first._lead() and not second._lead()
        assert second.tick() == RENEW_S  # standing by: sends nothing
        first.close()  # gives the lease back
        assert second._lead() and not first._lead()
        second.close()
    finally:
        get_settings.cache_clear()
        dispose_engines(url)


def test_the_scheduled_tasks_end_at_once_when_there_is_nothing_to_do_and_prune_the_history(tmp_path, monkeypatch,
                                                                                            models):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    migrate.upgrade(url)
    _sort(url, _photos(tmp_path / "photos", n=2))
    with session_scope(url) as session:  # two entries of one item, the first 40 days old
        item = session.scalars(select(CatalogItem.item_id)).first()
        upsert_items(session=session, rows=[ItemResult(item_id=item, image_uri="x", status="failed", error="e")])
        session.execute(text("UPDATE catalog_history SET written_at = :t WHERE id = (SELECT min(id) FROM "
                             "catalog_history WHERE item_id = :i)"),
                        {"t": (datetime.now(UTC) - timedelta(days=40)).strftime("%Y-%m-%d %H:%M:%S.%f"), "i": item})
    monkeypatch.setenv("INVSORT_DATABASE_URL", url)
    monkeypatch.setenv("INVSORT_MODEL_PATH", BUNDLED)
    get_settings.cache_clear()
    try:
        from worker.tasks import prune_history_task, recategorize_task

        assert prune_history_task() == 0  # no retention set: the history is kept whole
        monkeypatch.setenv("INVSORT_HISTORY_RETENTION_DAYS", "30")
        get_settings.cache_clear()
        assert prune_history_task() == 1
        with session_scope(url) as session:  # every row but the failed one is on the bundled model's version
            session.execute(text("DELETE FROM catalog_items WHERE status = 'failed'"))
        assert recategorize_task() == {"job_id": None, "items": 0, "batches": 0, "skipped_outside_roots": 0}
        with session_scope(url) as session:
            session.execute(text("UPDATE catalog_items SET model_version = 'old'"))
            assert acquire_lease(session=session, name=LEASE, holder="elsewhere:1", ttl_s=60)
        skipped = recategorize_task()
        assert skipped["job_id"] is None and "starting at this moment" in skipped["skipped_because"]
        assert _catalog_jobs(url) == []
    finally:
        get_settings.cache_clear()
        dispose_engines(url)


# --------------------------------------------------------------- queued: a real worker, and two beat processes


@pytest.fixture(scope="module")
def queued(tmp_path_factory, models) -> Iterator[tuple[str, dict[str, str], Path, list[Path]]]:
    """A PostgreSQL catalog of its own, Redis database 9 and one ``invsort worker`` whose model is shoes2.pt."""
    with flushed_redis(REDIS_URL):
        yield from _queued_worker(tmp_path_factory, models)


def _queued_worker(tmp_path_factory, models) -> Iterator[tuple[str, dict[str, str], Path, list[Path]]]:
    folder = tmp_path_factory.mktemp("queued")
    pg = create_pg_database()
    migrate.upgrade(pg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVSORT_")}
    env.update(INVSORT_DATABASE_URL=pg, INVSORT_BROKER_URL=REDIS_URL, INVSORT_LOCAL_ROOTS=str(folder),
               INVSORT_MODEL_PATH=str(models["shoes2"][0]), INVSORT_ITEMS_PER_TASK="4", INVSORT_BATCH_SIZE="4",
               INVSORT_METRICS_PORT="0", INVSORT_DEVICE="cpu", PYTHONUNBUFFERED="1")
    logs = [folder / "worker.log"]
    with open(logs[0], "wb") as log:
        worker = subprocess.Popen(invsort("worker", "-c", "1", "-n", "recat@%h", "-l", "INFO"), cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        yield pg, env, folder, logs
    finally:
        stop_worker(worker)
        drop_pg_database(pg)


@pytest.mark.slow
def test_queue_submits_the_job_to_the_workers_and_waits_for_its_report(queued, models):
    pg, env, folder, logs = queued
    shoes, version = models["shoes"]
    _sort(pg, _photos(folder / "photos"))
    out = subprocess.run(invsort("recategorize", "--model", str(shoes), "--queue", "--report",
                                  str(folder / "r.csv")), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr + logs[0].read_text()
    assert "16 images in 4 tasks queued" in out.stdout and " done: 16/16 images" in out.stdout, out.stdout
    header, pairs = _report(folder / "r.csv")
    assert header == HEADER and sum(pairs.values()) == 16
    assert {r.model_version for r in _rows(pg).values()} == {version}
    assert _count(pg, CatalogHistory) == 32


@pytest.mark.slow
def test_two_beats_resort_each_item_once(queued, models):
    """Two ``invsort beat`` processes on a 2-second schedule, one worker whose model is shoes2.pt: one beat sends,
    one job re-sorts every item once, and the ticks after it find nothing to re-sort."""
    pg, env, folder, logs = queued
    _, version = models["shoes2"]
    _sort(pg, _photos(folder / "more", n=8, start=20))  # besides the first test's 16 items (on shoes.pt)
    items = len(_rows(pg))
    beats = []
    for name in ("beat1", "beat2"):
        logs.append(folder / f"{name}.log")
        with open(logs[-1], "wb") as log:
            beats.append(subprocess.Popen(invsort("beat", "--every", "2", "-l", "INFO"), cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        wait_for(lambda: {r.model_version for r in _rows(pg).values()} == {version}, 240,
                 "every item re-sorted by the scheduled run", tuple(logs), poll_s=0.5)
        ticks = logs[0].read_text().count("invsort.recategorize")
        wait_for(lambda: logs[0].read_text().count("invsort.recategorize") >= ticks + 6, 60,
                 "three more ticks received by the worker", tuple(logs), poll_s=0.5)
        beat_logs = [p.read_text() for p in logs[-2:]]  # before either stops (the other would take over)
    finally:
        for beat in beats:
            stop_worker(beat)
    with session_scope(pg) as session:
        jobs = list(session.scalars(select(SortingJob).where(SortingJob.source.startswith("catalog:"),
                                                             SortingJob.model_version == version)))
        entries = Counter(session.scalars(select(CatalogHistory.item_id).where(
            CatalogHistory.job_id.in_([j.id for j in jobs]))))
        on_version = session.execute(select(func.count()).select_from(CatalogItem)
                                     .where(CatalogItem.model_version == version)).scalar_one()
    assert len(jobs) == 1 and jobs[0].status == "done" and jobs[0].total_items == items
    assert len(entries) == items and set(entries.values()) == {1}  # each item re-sorted once
    assert on_version == items
    assert sorted("holds the lease: sending" in text for text in beat_logs) == [False, True], beat_logs
    assert sorted("another beat holds the lease: standing by" in text for text in beat_logs) == [False, True]
    assert sorted("Sending due task invsort-recategorize" in text for text in beat_logs) == [False, True]
    assert "nothing to re-sort" in logs[0].read_text()
