"""The job service (pipeline/sorting.py) on real images, into SQLite and PostgreSQL: the embedded job through the
real CLI, the queued job's two halves (``submit_job`` and ``sort_batch``) without Celery, and the predictor cache."""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.catalog import get_job, iter_items, list_jobs
from db.session import session_scope
from pipeline.errors import ModelFileError
from pipeline.inference.predictor import PredictorOptions
from pipeline.io.storage import local_path
from pipeline.settings import build_settings
from tests.images import BAD_IMAGES, EXAMPLES, example_files
from worker.cli import main


def rows_of(url, job_id=None):
    with session_scope(url) as session:
        return list(iter_items(session=session, job_id=job_id))


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env or {}, catch_exceptions=False)


def true_label(uri: str) -> str:
    return Path(uri).parent.name


def test_sort_bundled_examples_writes_one_row_per_image(db_url):
    result = invoke("sort", EXAMPLES, "--db", db_url, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "sorted 50 images" in result.output
    rows = rows_of(db_url)
    mine = [r for r in rows if r.image_uri.startswith(EXAMPLES.as_uri())]
    assert len(mine) == 50 and len({r.item_id for r in mine}) == 50
    assert all(r.status in ("sorted", "needs_review") for r in mine)
    assert all(0.0 <= r.confidence <= 1.0 and len(r.topk) == 5 for r in mine)
    accuracy = sum(r.category == true_label(r.image_uri) for r in mine) / len(mine)
    assert accuracy >= 0.8, accuracy

    again = invoke("sort", EXAMPLES, "--db", db_url, "--no-progress")
    assert again.exit_code == 0
    after = [r for r in rows_of(db_url) if r.image_uri.startswith(EXAMPLES.as_uri())]
    assert len(after) == 50  # re-running upserts, never duplicates
    assert {r.item_id: r.category for r in after} == {r.item_id: r.category for r in mine}


def test_bad_images_fail_alone_and_the_rest_of_their_batch_is_sorted(tmp_path, sqlite_url):
    src = tmp_path / "photos"
    good = example_files()[:6]
    for i, f in enumerate(good):
        (src / "a").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / "a" / f"good_{i}.png")
    for name, data in BAD_IMAGES.items():
        (src / "a" / name).write_bytes(data)
    result = invoke("sort", src, "--db", sqlite_url, "--batch-size", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = {Path(r.image_uri).name: r for r in rows_of(sqlite_url)}
    assert len(rows) == 6 + len(BAD_IMAGES)
    reasons = {
        "zero_bytes.jpg": "empty file",
        "text_renamed.jpg": "not an image",
        "truncated.jpg": "truncated JPEG",
        "tiny_3x3.png": "too small",
        "huge_dimensions.png": "too large",
    }
    for name, reason in reasons.items():
        assert rows[name].status == "failed" and reason in rows[name].error, (name, rows[name].error)
        assert rows[name].category is None
    for i in range(6):
        assert rows[f"good_{i}.png"].status in ("sorted", "needs_review")
        assert rows[f"good_{i}.png"].category is not None
    with session_scope(sqlite_url) as session:
        job = get_job(session=session, job_id=rows["good_0.png"].job_id)
    assert job.status == "done" and job.failed_count == len(BAD_IMAGES) and job.processed == 11


def test_manifest_source_with_ids_and_a_path_outside_the_roots(tmp_path, sqlite_url):
    files = example_files()[:3]
    photos = tmp_path / "m"
    photos.mkdir()
    lines = ["item_id,image_uri"]
    for i, f in enumerate(files):
        shutil.copy(f, photos / f.name)
        lines.append(f"SKU-{i},{f.name}")
    lines.append("SKU-etc,/etc/hostname")
    lines.append("SKU-missing,nope.png")
    (photos / "manifest.csv").write_text("\n".join(lines) + "\n")
    result = invoke("sort", photos / "manifest.csv", "--db", sqlite_url, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = {r.item_id: r for r in rows_of(sqlite_url)}
    assert set(rows) == {"SKU-0", "SKU-1", "SKU-2", "SKU-etc", "SKU-missing"}
    assert rows["SKU-etc"].status == "failed" and "INVSORT_LOCAL_ROOTS" in rows["SKU-etc"].error
    assert rows["SKU-missing"].status == "failed" and "no such file" in rows["SKU-missing"].error
    assert all(rows[f"SKU-{i}"].status != "failed" for i in range(3))


def test_a_name_that_is_not_utf8_and_a_1100_character_path_among_100_photos(tmp_path, db_url):
    """Issue 12: both are sorted like any photo and the job ends done with every row written."""
    src = tmp_path / "photos"
    src.mkdir()
    files = example_files()
    for i in range(100):
        shutil.copy(files[i % len(files)], src / f"p{i:03d}.png")
    raw_src = os.fsencode(src)
    odd = raw_src + b"/caf\xe9 \xff\xfe 100%.png"  # Latin-1 bytes, bytes no encoding has, and a literal '%'
    with open(odd, "wb") as f:
        f.write(files[7].read_bytes())
    deep = src / "/".join(["d" * 200] * 4)
    deep.mkdir(parents=True)
    long_path = deep / ("y" * (1100 - len(str(deep)) - 1 - 4) + ".png")
    long_path.write_bytes(files[8].read_bytes())
    assert len(str(long_path)) == 1100

    result = invoke("sort", src, "--db", db_url, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [r for r in rows_of(db_url) if r.image_uri.startswith(src.as_uri())]
    with session_scope(db_url) as session:
        job = get_job(session=session, job_id=rows[0].job_id)
    assert job.status == "done" and job.processed == 102 and job.failed_count == 0
    assert len(rows) == 102 and len({r.item_id for r in rows}) == 102
    by_path = {os.fsencode(local_path(r.image_uri)): r for r in rows}
    assert odd in by_path and os.fsencode(long_path) in by_path, "each URI reads back to the same bytes"
    odd_row, long_row = by_path[odd], by_path[os.fsencode(long_path)]
    assert odd_row.item_id == odd_row.image_uri == Path(os.fsdecode(odd)).as_uri()
    assert "%E9%20%FF%FE%20100%25.png" in odd_row.item_id
    assert long_row.item_id == long_row.image_uri == long_path.as_uri() and len(long_row.item_id) > 1024
    same_photo = {7: by_path[os.fsencode(src / "p007.png")], 8: by_path[os.fsencode(src / "p008.png")]}
    for row, twin in ((odd_row, same_photo[7]), (long_row, same_photo[8])):
        assert row.status in ("sorted", "needs_review") and row.error is None
        assert (row.category, row.confidence) == (twin.category, twin.confidence), "the same photo, sorted"


def test_manifest_ids_a_database_refuses_fail_alone_and_the_job_is_done(tmp_path, db_url):
    photos = tmp_path / "m"
    photos.mkdir()
    shutil.copy(example_files()[0], photos / "a.png")
    ids = {"nul": "SKU\x00NUL", "long": "SKU-" + "9" * 5000, "plain": "SKU-plain"}
    lines = [json.dumps({"item_id": v, "image_uri": "a.png"}) for v in ids.values()]
    (photos / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    result = invoke("sort", photos / "manifest.jsonl", "--db", db_url, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = {r.item_id: r for r in rows_of(db_url) if r.image_uri == (photos / "a.png").as_uri()}
    assert len(rows) == 3
    plain = rows[ids["plain"]]
    assert plain.status != "failed" and rows[ids["long"]].status == plain.status, "a 5004-character id is kept"
    if db_url.startswith("postgresql"):  # PostgreSQL text cannot hold NUL: that row fails, under its derived key
        (nul,) = (r for k, r in rows.items() if k.startswith("SKU\\x00NUL#sha256:"))
        assert nul.status == "failed" and nul.error.startswith("the database refused this row: ")
        assert "NUL" in nul.error
    else:  # SQLite stores it
        assert rows[ids["nul"]].status == plain.status
    with session_scope(db_url) as session:
        job = get_job(session=session, job_id=plain.job_id)
    failed = sum(r.status == "failed" for r in rows.values())
    assert job.status == "done" and job.processed == 3 and job.failed_count == failed, "counts agree with rows"


def test_review_threshold_routes_low_confidence_rows_to_review(sqlite_url):
    result = invoke("sort", EXAMPLES, "--db", sqlite_url, "--no-progress", env={"INVSORT_REVIEW_THRESHOLD": "0.999"})
    assert result.exit_code == 0, result.output
    rows = rows_of(sqlite_url)
    review = [r for r in rows if r.status == "needs_review"]
    assert review and all(r.confidence < 0.999 for r in review)
    assert all(r.confidence >= 0.999 for r in rows if r.status == "sorted")


# --- the queued job without Celery: submit_job lists and enqueues, sort_batch is one task ---------------------------


def test_submitted_batches_run_by_run_batch_finish_the_job_once_even_when_redelivered(db_url, tmp_path):
    from db.jobs import get_batch
    from pipeline.jobs import run_batch
    from pipeline.sorting import submit_job

    src = tmp_path / "photos"
    for f in example_files()[:10]:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / f.parent.name / f.name)
    (src / "bad").mkdir()
    (src / "bad" / "zero_bytes.jpg").write_bytes(b"")
    settings = build_settings(database_url=db_url, items_per_task=4, batch_size=3, device="cpu",
                              local_roots=str(src))
    queue: list[tuple[str, int, str]] = []
    job_id, total, batches = submit_job(str(src), settings=settings, model_spec="bundled:fashion_mnist_cnn",
                                        enqueue=lambda *task: queue.append(task))
    assert (total, batches) == (11, 3)
    assert queue == [(job_id, no, f"{job_id}:{no}") for no in range(3)]  # tasks name stored batches
    with session_scope(db_url) as session:
        stored = [get_batch(session=session, job_id=job_id, batch_no=no) for no in range(3)]
        assert get_job(session=session, job_id=job_id).status == "running"
    assert [len(b.items) for b in stored] == [4, 4, 3] and {b.state for b in stored} == {"queued"}
    # the database holds ids and URIs, never images (without a manifest an item's id is its URI)
    assert all(item_id == uri and uri.startswith(src.as_uri()) for b in stored for item_id, uri in b.items)

    counts = [run_batch(jid, no, settings=settings) for jid, no, _ in queue]
    assert sum(c["failed_count"] for c in counts) == 1
    assert run_batch(job_id, 0, settings=settings) == {}  # a redelivered task: nothing to do, counted once
    with session_scope(db_url) as session:
        job = get_job(session=session, job_id=job_id)
        assert {get_batch(session=session, job_id=job_id, batch_no=no).state for no in range(3)} == {"done"}
    assert job.status == "done" and (job.total_items, job.processed, job.failed_count) == (11, 11, 1)
    assert len(rows_of(db_url, job_id)) == 11


def test_submit_job_refuses_a_bad_model_before_creating_a_job_or_queueing(sqlite_url):
    from pipeline.sorting import submit_job

    queue: list = []
    settings = build_settings(database_url=sqlite_url)
    with pytest.raises(ModelFileError, match="not an invsort model file"):
        submit_job(str(EXAMPLES), settings=settings, model_spec=str(Path(__file__).parents[1] / "pyproject.toml"),
                   enqueue=lambda *task: queue.append(task))
    assert queue == []
    with session_scope(sqlite_url) as session:
        assert list_jobs(session=session) == []


# --- the predictor cache ----------------------------------------------------------------------------------------


def test_the_job_service_caches_a_predictor_per_model_and_options_and_closes_the_evicted_ones(monkeypatch):
    from pipeline import sorting

    monkeypatch.setattr(sorting, "MAX_CACHED_PREDICTORS", 2)
    sorting.close_predictors()
    settings = build_settings(device="cpu", cpu_streams=2)
    first = sorting.get_predictor(settings, "bundled:fashion_mnist_cnn")
    assert sorting.get_predictor(build_settings(device="cpu", cpu_streams=2), "bundled:fashion_mnist_cnn") is first
    assert first.options == PredictorOptions.from_settings(settings) and first.options.cpu_streams == 2
    second = sorting.get_predictor(build_settings(device="cpu", cpu_streams=2, review_threshold=0.5),
                                   "bundled:fashion_mnist_cnn")
    assert second is not first and second.review_threshold == 0.5
    assert first._pool is not None
    sorting.get_predictor(build_settings(device="cpu", cpu_streams=1), "bundled:fashion_mnist_cnn")  # evicts first
    assert first._pool is None and second._pool is not None
    sorting.close_predictors()
    assert second._pool is None and not sorting._predictors


def _recalibrated(src: str, out: Path, temperature: float) -> str:
    """Write ``src``'s model with another temperature to ``out`` (atomically: a new file); its version."""
    from pipeline.models.modelfile import load_model_file, save_model_file

    mf = load_model_file(src)
    mf.temperature = temperature
    return save_model_file(mf, out)


def test_the_cached_predictor_is_reloaded_when_its_model_file_changes_and_a_pinned_version_is_checked(tmp_path):
    import re

    from pipeline import sorting
    from pipeline.errors import ModelVersionError
    from pipeline.models.fileversion import model_file_version, resolve_model_path

    bundled = resolve_model_path("bundled:fashion_mnist_cnn")
    path = tmp_path / "m.pt"
    shutil.copy(bundled, path)
    spec = str(path)
    settings = build_settings(device="cpu", cpu_streams=1)
    sorting.close_predictors()
    pinned = model_file_version(spec)  # what submit pins, without torch
    first = sorting.get_predictor(settings, spec, version=pinned)
    assert first.model_file.version == pinned
    assert sorting.get_predictor(settings, spec, version=pinned) is first  # unchanged file: the cached one
    # replaced (a new file moved over the path)
    new_version = _recalibrated(spec, path, 2.0)
    second = sorting.get_predictor(settings, spec)
    assert second is not first and second.model_file.version == new_version != pinned
    with pytest.raises(ModelVersionError, match=re.escape(f"model file {spec} has changed since the job was "
                                                          f"submitted: the job pinned version {pinned}, the file "
                                                          f"now has version {new_version}")):
        sorting.get_predictor(settings, spec, version=pinned)
    assert sorting.get_predictor(settings, spec, version=new_version) is second
    # rewritten in place (same inode)
    inode = path.stat().st_ino
    path.write_bytes(Path(bundled).read_bytes())
    assert path.stat().st_ino == inode
    third = sorting.get_predictor(settings, spec, version=pinned)
    assert third is not second and third.model_file.version == pinned
    sorting.close_predictors()


def test_an_s3_model_is_reloaded_when_its_object_changes(s3_bucket, tmp_path):
    from pipeline import sorting
    from pipeline.errors import ModelVersionError
    from pipeline.io.storage import make_reader
    from pipeline.models.fileversion import model_file_version, resolve_model_path

    client, bucket = s3_bucket
    uri = f"s3://{bucket}/models/m.pt"
    client.upload_file(resolve_model_path("bundled:fashion_mnist_cnn"), bucket, "models/m.pt")
    settings = build_settings(device="cpu", cpu_streams=1, s3_endpoint_url=client.meta.endpoint_url)
    reader = make_reader(settings)
    sorting.close_predictors()
    pinned = model_file_version(uri, reader=reader)
    first = sorting.get_predictor(settings, uri, reader=reader, version=pinned)
    assert sorting.get_predictor(settings, uri, reader=reader, version=pinned) is first
    new_version = _recalibrated("bundled:fashion_mnist_cnn", tmp_path / "new.pt", 3.0)
    client.upload_file(str(tmp_path / "new.pt"), bucket, "models/m.pt")
    with pytest.raises(ModelVersionError, match=f"pinned version {pinned}, the file now has version {new_version}"):
        sorting.get_predictor(settings, uri, reader=reader, version=pinned)
    second = sorting.get_predictor(settings, uri, reader=reader, version=new_version)
    assert second is not first and second.model_file.version == new_version == model_file_version(uri, reader=reader)
    sorting.close_predictors()
