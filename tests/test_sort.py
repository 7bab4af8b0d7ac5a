"""The main job in embedded mode, through the real CLI, on real images, into SQLite and PostgreSQL."""

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.catalog import get_job, iter_items
from db.session import session_scope
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.inference.streaming import run_pipeline
from pipeline.io.storage import make_reader
from pipeline.models.modelfile import load_model_file
from pipeline.records import Item
from pipeline.settings import build_settings
from tests.images import BAD_IMAGES, EXAMPLES, example_files
from worker.cli import main


def rows_of(url, job_id=None):
    with session_scope(url) as session:
        return list(iter_items(session=session, job_id=job_id))


def invoke(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env or {}, catch_exceptions=False)
    return result


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


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["sort", "/no/such/folder"], {}, "source not found"),
        (["sort", "ftp://host/x"], {}, "unsupported URI scheme"),
        (["sort", "examples/images"], {"INVSORT_BATCH_SIZE": "0"}, "INVSORT_BATCH_SIZE must be between 1 and 4096"),
        (["sort", "examples/images"], {"INVSORT_DEVICE": "tpu"}, "INVSORT_DEVICE"),
        (["sort", "examples/images", "--model", "pyproject.toml"], {}, "not an invsort model file"),
        (["sort", "examples/images", "--model", "bundled:nope"], {}, "bundled:fashion_mnist_cnn"),
        (["sort", "examples/images", "--db", "mysql://x/y"], {}, "INVSORT_DATABASE_URL"),
        (["results"], {}, "invsort db upgrade"),
        (["status", "no-such-job"], {}, "invsort db upgrade"),
    ],
)
def test_bad_jobs_and_settings_are_refused_with_a_clear_message(args, env, message, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    env = {"INVSORT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db", **env}
    result = invoke(*args, env=env)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output


class ExplodingSource:
    """Yields ``good`` items, then raises as a broken listing would."""

    def __init__(self, items, fail_after):
        self.items, self.fail_after = items, fail_after

    def __iter__(self):
        for i, item in enumerate(self.items):
            if i == self.fail_after:
                raise OSError("listing broke midway")
            yield item


def test_source_that_raises_midway_keeps_the_rows_already_read():
    files = example_files()
    items = [Item(f.as_uri(), f.as_uri()) for f in files]
    predictor = Predictor(load_model_file("bundled:fashion_mnist_cnn"), PredictorOptions(device="cpu"))
    reader = make_reader(build_settings(local_roots=str(EXAMPLES)))
    got = []
    with pytest.raises(OSError, match="listing broke midway"):
        run_pipeline(ExplodingSource(items, 20), predictor=predictor, reader=reader, on_batch=got.extend,
                     batch_size=8, decode_threads=2, prefetch_batches=1)
    assert [r.item_id for r in got] == [it.item_id for it in items[:20]]
    assert all(r.status != "failed" for r in got)


def test_streaming_pipeline_gives_the_same_results_as_one_big_batch():
    files = example_files()
    items = [Item(f.as_uri(), f.as_uri()) for f in files]
    predictor = Predictor(load_model_file("bundled:fashion_mnist_cnn"), PredictorOptions(device="cpu"))
    reader = make_reader(build_settings(local_roots=str(EXAMPLES)))
    small, big = [], []
    run_pipeline(items, predictor=predictor, reader=reader, on_batch=small.extend, batch_size=3, decode_threads=3)
    run_pipeline(items, predictor=predictor, reader=reader, on_batch=big.extend, batch_size=64, decode_threads=1)
    assert [r.item_id for r in small] == [it.item_id for it in items]
    assert [r.category for r in small] == [r.category for r in big]
    assert all(abs(a.confidence - b.confidence) < 1e-4 for a, b in zip(small, big, strict=True))


def test_status_and_results_show_the_job(sqlite_url):
    result = invoke("sort", EXAMPLES, "--db", sqlite_url, "--no-progress", "--limit", 7)
    assert result.exit_code == 0, result.output
    job_id = result.output.split("job ")[1].split(";")[0]
    status = invoke("status", job_id, "--db", sqlite_url)
    assert status.exit_code == 0 and f"job {job_id} done: 7/7 images; 7 sorted" in status.output
    rows = invoke("results", "--db", sqlite_url, "--job", job_id, "--csv")
    assert rows.exit_code == 0 and len(rows.output.strip().splitlines()) == 1 + 7
    missing = invoke("status", "nope", "--db", sqlite_url)
    assert missing.exit_code == 1 and "no job nope" in missing.output


def test_review_threshold_routes_low_confidence_rows_to_review(sqlite_url):
    result = invoke("sort", EXAMPLES, "--db", sqlite_url, "--no-progress", env={"INVSORT_REVIEW_THRESHOLD": "0.999"})
    assert result.exit_code == 0, result.output
    rows = rows_of(sqlite_url)
    review = [r for r in rows if r.status == "needs_review"]
    assert review and all(r.confidence < 0.999 for r in review)
    assert all(r.confidence >= 0.999 for r in rows if r.status == "sorted")


def test_cpu_streams_split_a_batch_into_micro_batches_with_the_same_results():
    import numpy as np
    import torch

    from pipeline.errors import ConfigError
    from pipeline.io.images import decode_image

    mf = load_model_file("bundled:fashion_mnist_cnn")
    batch = torch.from_numpy(np.stack([decode_image(p.read_bytes(), size=mf.input_size, in_chans=1)
                                       for p in example_files()[:37]]))
    whole = Predictor(mf, PredictorOptions(device="cpu", cpu_streams=1, cpu_microbatch=4096))
    split = Predictor(mf, PredictorOptions(device="cpu", cpu_streams=3, cpu_microbatch=5))  # 8 micro-batches, 3 threads
    assert (whole.cpu_streams, split.cpu_streams) == (1, 3)
    probs = split.predict_probs(batch)
    assert probs.shape == (37, 10)
    torch.testing.assert_close(probs, whole.predict_probs(batch), rtol=1e-5, atol=1e-6)  # same rows, same order
    # each stream thread runs torch with its share of the cores; the caller's setting is left alone
    threads = torch.get_num_threads()
    assert split._pool.submit(torch.get_num_threads).result() == max(1, threads // 3)
    assert torch.get_num_threads() == threads
    pool = split._pool
    split.close()  # the forward threads are shut down; the closed predictor still predicts, in this thread
    assert pool._shutdown and split._pool is None
    torch.testing.assert_close(split.predict_probs(batch), probs)
    split.close()
    with Predictor(mf, PredictorOptions(device="cpu", cpu_streams=2)) as scoped:
        pool = scoped._pool
        assert pool is not None and scoped.predict_probs(batch[:3]).shape == (3, 10)
    assert pool._shutdown
    with pytest.raises(ConfigError, match="cpu_microbatch 1..4096"):
        Predictor(mf, PredictorOptions(device="cpu", cpu_microbatch=0))


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
