"""The HTTP API (worker/web/): the real app through FastAPI's TestClient on SQLite and PostgreSQL, real photos, and
``invsort serve`` as a real process answering over HTTP.

Embedded jobs run in the app's background thread as in the server; queued ones go to a real Redis (the test's own
database number, flushed). Nothing is mocked: the model is the bundled one, uploads are real PNG and JPEG files and
the bad files of tests/images.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select

from db.catalog import iter_items
from db.models import CatalogItem, SortingJobBatch, WebhookOutbox
from db.queries import count_jobs_by_status
from db.session import session_scope
from pipeline.models.modelfile import load_model_file
from pipeline.settings import BUNDLED_MODEL, build_settings
from tests.images import BAD_IMAGES, EXAMPLES, example_files, photo_jpeg
from worker.cli import main
from worker.web.app import create_app
from worker.web.runner import shown_url

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("done", "failed", "cancelled")


@pytest.fixture
def pg_url(empty_pg_url: str) -> str:
    """A PostgreSQL database of this test's own, migrated: the jobs here commit rows, and other modules' tests on
    the session's shared database expect to find none of them."""
    from db import migrate

    migrate.upgrade(empty_pg_url)
    return empty_pg_url


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch, tmp_path):
    """No INVSORT_* variable or .env file of the caller's: every setting is the test's."""
    for name in [k for k in os.environ if k.startswith("INVSORT_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 60.0, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll_s)


def copy_examples(dest: Path, *, bad: bool = False) -> Path:
    """The 50 example photos under ``dest`` (their category folders kept), and with ``bad`` the bad files too."""
    for path in example_files():
        target = dest / path.relative_to(EXAMPLES)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    if bad:
        for name, data in BAD_IMAGES.items():
            (dest / "bad").mkdir(parents=True, exist_ok=True)
            (dest / "bad" / name).write_bytes(data)
    return dest


def many_photos(dest: Path, n: int) -> Path:
    """``n`` hard links to the example photos (a job that takes a while)."""
    files = example_files()
    for i in range(n):
        target = dest / f"part{i // 100:02d}" / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(files[i % len(files)], target)
    return dest


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    """The folder the API may read (INVSORT_LOCAL_ROOTS); each test puts its photos in a fresh folder inside."""
    root = tmp_path / f"roots-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    return root


def make_client(db_url: str, roots: Path, **overrides: Any) -> TestClient:
    settings = build_settings(database_url=db_url, local_roots=str(roots), **overrides)
    return TestClient(create_app(settings))


@pytest.fixture
def api(db_url: str, roots: Path) -> Iterator[TestClient]:
    with make_client(db_url, roots, batch_size=16) as client:
        yield client


def job_when_ended(client: TestClient, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    return wait_for(ended, timeout_s)


def catalog_rows(url: str) -> int:
    with session_scope(url) as session:
        return session.execute(select(func.count()).select_from(CatalogItem)).scalar_one()


def metric(text: str, sample_name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when it is not there)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def invoke(*args: object) -> Any:
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("INVSORT_")}
    return CliRunner().invoke(main, [str(a) for a in args], env=unset, catch_exceptions=False)


# ---------------------------------------------------------------------------------------------------- health


def test_healthz_names_the_model_and_says_the_database_answers(api, db_url):
    answer = api.get("/healthz")
    assert answer.status_code == 200
    body = answer.json()
    bundled = load_model_file(BUNDLED_MODEL)
    assert body["status"] == "ok"
    assert body["model"]["name"] == bundled.name and body["model"]["version"] == bundled.version
    assert body["model"]["classes"] == list(bundled.class_names)
    assert body["database"] == {"reachable": True, "dialect": db_url.split(":")[0].split("+")[0], "error": None}
    assert api.get("/openapi.json").status_code == 200 and api.get("/docs").status_code == 200


def test_a_database_that_does_not_answer_is_503_not_a_traceback(roots):
    with make_client("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/nowhere", roots) as client:
        health = client.get("/healthz")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unavailable" and body["database"]["reachable"] is False
        assert body["database"]["error"].startswith("database unavailable: ") and "s3cret" not in health.text
        jobs = client.get("/v1/jobs")
        assert jobs.status_code == 503 and jobs.json()["detail"].startswith("database unavailable: ")


# -------------------------------------------------------------------------------------------------- classify


def test_classify_keeps_upload_order_fails_bad_photos_alone_and_agrees_with_sort(api, db_url, tmp_path):
    good = example_files()[::10]  # 5 photos of different categories
    uploads: list[tuple[str, bytes]] = []
    for i, path in enumerate(good):
        uploads.append((path.name, path.read_bytes()))
        bad_name = list(BAD_IMAGES)[i]
        uploads.append((bad_name, BAD_IMAGES[bad_name]))
    uploads.append(("photo.jpg", photo_jpeg(3)))
    rows_before = catalog_rows(db_url)

    answer = api.post("/v1/classify", files=[("file", (name, data, "application/octet-stream"))
                                             for name, data in uploads])

    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in uploads]
    for r in results:
        if r["filename"] in BAD_IMAGES:
            assert r["status"] == "failed" and r["error"] and r["category"] is None and r["topk"] == []
        else:
            assert r["status"] in ("sorted", "needs_review") and r["error"] in (None, "unknown")
            assert 0 <= r["confidence"] <= 1 and r["topk"][0][0] == r["category"] and len(r["topk"]) == 5
    by_name = {r["filename"]: r for r in results}
    assert by_name["zero_bytes.jpg"]["error"] == "empty file (0 bytes)"
    assert by_name["text_renamed.jpg"]["error"].startswith("not an image")
    assert "too large" in by_name["huge_dimensions.png"]["error"]
    assert catalog_rows(db_url) == rows_before, "classify wrote to the catalog"

    # invsort sort on the same files gives the same category, confidence and status
    folder = copy_examples(tmp_path / "same")
    sorted_ = invoke("sort", folder, "--db", db_url, "--no-progress")
    assert sorted_.exit_code == 0, sorted_.output
    job_id = sorted_.stdout.split("job ")[1].split(";")[0]
    with session_scope(db_url) as session:
        rows = {Path(r.image_uri).name: r for r in iter_items(session=session, job_id=job_id)}
    for path in good:
        mine, theirs = by_name[path.name], rows[path.name]
        assert (mine["category"], mine["status"]) == (theirs.category, theirs.status), path
        assert mine["confidence"] == pytest.approx(theirs.confidence, abs=1e-5)
        assert [c for c, _ in mine["topk"]] == [c for c, _ in theirs.topk]

    # and so does invsort classify, the same function on the command line
    cli = invoke("classify", *good, "--json")
    assert cli.exit_code == 0, cli.output
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [(Path(x["filename"]).name, x["category"], x["status"]) for x in lines] == \
        [(p.name, by_name[p.name]["category"], by_name[p.name]["status"]) for p in good]


def test_classify_refuses_what_is_not_one_or_more_file_fields(api):
    png = example_files()[0].read_bytes()
    none = api.post("/v1/classify", files=[], data={})
    assert none.status_code == 422 and "multipart/form-data" in none.json()["detail"]
    wrong_field = api.post("/v1/classify", files=[("photo", ("a.png", png, "image/png"))])
    assert wrong_field.status_code == 422
    assert wrong_field.json()["detail"].startswith("unexpected form field 'photo': send each photo in a field named "
                                                   "'file'")
    plain = api.post("/v1/classify", content=b"{}", headers={"content-type": "application/json"})
    assert plain.status_code == 422 and "multipart/form-data" in plain.json()["detail"]
    cut = api.post("/v1/classify", content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                   b"filename=\"a.png\"\r\n\r\n" + png[:20],
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert cut.status_code == 422 and "closing boundary" in cut.json()["detail"]
    too_many = api.post("/v1/classify", files=[("file", (f"{i}.png", png, "image/png")) for i in range(33)])
    assert too_many.status_code == 422 and "more than 32 photos" in too_many.json()["detail"]


def test_an_upload_over_the_byte_limit_is_413(sqlite_url, roots):
    photo = photo_jpeg(1, (300, 400))
    limit = len(photo) - 1
    with make_client(sqlite_url, roots, max_image_bytes=limit) as client:
        small = client.post("/v1/classify", files=[("file", ("ok.png", example_files()[0].read_bytes(), "image/png"))])
        assert small.status_code == 200 and small.json()["results"][0]["status"] != "failed"
        big = client.post("/v1/classify", files=[("file", ("ok.png", example_files()[0].read_bytes(), "image/png")),
                                                 ("file", ("big.jpg", photo, "image/jpeg"))])
        assert big.status_code == 413
        assert big.json()["detail"] == (f"file 'big.jpg' is larger than the limit of {limit} bytes a photo "
                                        "(INVSORT_MAX_IMAGE_BYTES)")
        # a declared length no request within the limits can have is refused before the body is read
        declared = client.post("/v1/classify", content=b"x" * (32 * (limit + 16384) + 1),
                               headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert declared.status_code == 413 and "INVSORT_MAX_IMAGE_BYTES" in declared.json()["detail"]


# ------------------------------------------------------------------------------------------- jobs and items


def test_an_embedded_job_ends_done_and_its_items_page_through_filters(api, db_url, roots):
    folder = copy_examples(roots / "photos", bad=True)
    started = api.post("/v1/jobs", json={"source": str(folder)})
    assert started.status_code == 201, started.text
    job = started.json()
    assert job["mode"] == "embedded" and "INVSORT_BROKER_URL is not set" in job["mode_reason"]
    assert job["source"] == str(folder) and job["status"] in ("listing", "running", "done")
    done = job_when_ended(api, job["id"])
    n = 50 + len(BAD_IMAGES)
    assert done["status"] == "done" and done["total_items"] == n and done["processed"] == n
    assert done["failed_count"] == len(BAD_IMAGES)
    assert job["id"] in [j["id"] for j in api.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]

    # every page of 7, by cursor: each row once, in id order, all of the job's
    seen: list[str] = []
    cursor = None
    while True:
        params = {"job_id": job["id"], "limit": 7, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/items", params=params)
        assert page.status_code == 200, page.text
        seen += [item["item_id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == n and len(set(seen)) == n and seen == sorted(seen)
    assert set(seen) == {p.as_uri() for p in folder.rglob("*") if p.is_file()}

    def items(**params: Any) -> list[dict[str, Any]]:
        answer = api.get("/v1/items", params={"job_id": job["id"], "limit": 500, **params})
        assert answer.status_code == 200, answer.text
        assert answer.json()["next_cursor"] is None
        return answer.json()["items"]

    failed = items(status="failed")
    assert {Path(i["item_id"]).name for i in failed} == set(BAD_IMAGES) and all(i["error"] for i in failed)
    assert len(items(status="sorted")) == done["sorted_count"]
    assert len(items(status="needs_review")) == done["needs_review_count"]
    confident = items(status="sorted", min_confidence=0.995)
    assert confident and all(i["confidence"] >= 0.995 and i["status"] == "sorted" for i in confident)
    unsure = items(max_confidence=0.9)
    assert unsure and all(i["confidence"] <= 0.9 for i in unsure)
    bags = items(category="Bag")
    assert bags and all(i["category"] == "Bag" for i in bags)
    assert len(items(model_version=done["model_version"])) == n and items(model_version="000000000000") == []

    # one item by its id, slashes and all, as it is or percent-encoded
    one = failed[0]
    for path in (f"/v1/items/{one['item_id']}", f"/v1/items/{quote(one['item_id'], safe='')}"):
        answer = api.get(path)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json() == one


def test_cancel_stops_an_embedded_job_and_one_runs_at_a_time(db_url, roots):
    folder = many_photos(roots / "many", 600)
    with make_client(db_url, roots, batch_size=2) as client:
        job = client.post("/v1/jobs", json={"source": folder.as_uri()}).json()
        busy = client.post("/v1/jobs", json={"source": str(folder)})
        assert busy.status_code == 409 and f"embedded job {job['id']} is still running" in busy.json()["detail"]
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["cancelled"] is True and cancelled.json()["job"]["status"] == "cancelled"
        starter = client.app.state.invsort.jobs
        wait_for(lambda: starter.running_embedded() is None)
        stopped = client.get(f"/v1/jobs/{job['id']}").json()
        assert stopped["status"] == "cancelled" and stopped["processed"] < 600
        again = client.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert again["cancelled"] is False and again["message"].endswith("had already ended (cancelled): nothing to "
                                                                         "cancel")
        # the slot is free again; a job with a limit ends done with that many rows
        second = client.post("/v1/jobs", json={"source": str(folder), "limit": 5})
        assert second.status_code == 201, second.text
        assert job_when_ended(client, second.json()["id"])["processed"] == 5


def test_a_server_that_stops_fails_its_running_embedded_job(sqlite_url, roots):
    folder = many_photos(roots / "many", 600)
    with make_client(sqlite_url, roots, batch_size=2) as client:
        job_id = client.post("/v1/jobs", json={"source": str(folder)}).json()["id"]
    with make_client(sqlite_url, roots) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"].startswith("the server stopped while the job ran")
    assert job["processed"] < 600


def test_a_broker_that_does_not_answer_means_embedded_and_its_password_is_never_shown(sqlite_url, roots):
    folder = copy_examples(roots / "photos")
    with make_client(sqlite_url, roots, broker_url="redis://:s3cret@127.0.0.1:1/0") as client:
        answer = client.post("/v1/jobs", json={"source": str(folder), "limit": 3})
        assert answer.status_code == 201, answer.text
        job = answer.json()
        assert job["mode"] == "embedded" and "redis://:***@127.0.0.1:1/0 did not answer" in job["mode_reason"]
        assert "s3cret" not in answer.text
        assert job_when_ended(client, job["id"])["status"] == "done"
    assert shown_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert shown_url("redis://host:6379/0") == "redis://host:6379/0"


def test_unknown_ids_are_404_and_bad_input_is_422_saying_what_is_valid(api, roots, tmp_path):
    unknown = str(uuid.uuid4())
    for method, path, expected in (("get", f"/v1/jobs/{unknown}", f"no job '{unknown}'"),
                                   ("post", f"/v1/jobs/{unknown}/cancel", f"no job '{unknown}'"),
                                   ("get", "/v1/items/file:///no/such/photo.png",
                                    "no item 'file:///no/such/photo.png' in the catalog")):
        answer = getattr(api, method)(path)
        assert answer.status_code == 404 and answer.json() == {"detail": expected}, answer.text
    outside = tmp_path / "outside"
    copy_examples(outside)
    refused = api.post("/v1/jobs", json={"source": str(outside)})
    assert refused.status_code == 422 and "outside the local roots" in refused.json()["detail"]
    assert "INVSORT_LOCAL_ROOTS" in refused.json()["detail"]
    missing = api.post("/v1/jobs", json={"source": str(roots / "nothing-here")})
    assert missing.status_code == 422 and "source not found" in missing.json()["detail"]
    scheme = api.post("/v1/jobs", json={"source": "ftp://host/photos"})
    assert scheme.status_code == 422 and "s3://bucket/prefix" in scheme.json()["detail"]
    for body, expected in (({"source": str(roots), "limit": 0}, "limit: Input should be greater than or equal to 1"),
                           ({"source": ""}, "source: String should have at least 1 character"),
                           ({"source": str(roots), "model": "x.pt"}, "model: Extra inputs are not permitted"),
                           ({}, "source: Field required")):
        answer = api.post("/v1/jobs", json=body)
        assert answer.status_code == 422 and expected in answer.json()["detail"], answer.text
    for params, expected in (({"status": "nope"}, "status: must be one of sorted, needs_review, failed"),
                             ({"min_confidence": 2}, "min_confidence: Input should be less than or equal to 1"),
                             ({"min_confidence": 0.9, "max_confidence": 0.1}, "must not be above max_confidence"),
                             ({"limit": 501}, "limit: Input should be less than or equal to 500"),
                             ({"cursor": "not-a-cursor"}, "cursor: not a cursor of this API")):
        answer = api.get("/v1/items", params=params)
        assert answer.status_code == 422 and expected in answer.json()["detail"], answer.text
    first = api.get("/v1/items", params={"limit": 1})
    if first.json()["next_cursor"]:  # a cursor is bound to its filters
        other = api.get("/v1/items", params={"limit": 1, "status": "failed", "cursor": first.json()["next_cursor"]})
        assert other.status_code == 422 and "made for other filters" in other.json()["detail"]


def test_numbers_past_64_bits_are_422_not_500(api, roots):
    """Found by tests/test_openapi_fuzz.py: a job's limit and a change cursor beyond 2**63 - 1 were 500s (islice
    refused the limit; SQLite could not bind the cursor)."""
    folder = copy_examples(roots / "photos")
    for limit in (2**63, 10**30):
        answer = api.post("/v1/jobs", json={"source": str(folder), "limit": limit})
        assert answer.status_code == 422, answer.text
        assert "limit: Input should be less than or equal to 9223372036854775807" in answer.json()["detail"]
    job = api.post("/v1/jobs", json={"source": str(folder), "limit": 2**63 - 1})
    assert job.status_code == 201, job.text
    assert job_when_ended(api, job.json()["id"])["processed"] == 50
    for since in (2**63, 10**30):
        answer = api.get("/v1/changes", params={"since": since})
        assert answer.status_code == 422, answer.text
        assert "since: Input should be less than or equal to 9223372036854775807" in answer.json()["detail"]
    assert api.get("/v1/changes", params={"since": 2**63 - 1}).json()["changes"] == []


def test_a_review_decides_an_item_and_a_later_sort_keeps_it(api, roots):
    folder = copy_examples(roots / "photos")
    job = api.post("/v1/jobs", json={"source": str(folder)}).json()
    job_when_ended(api, job["id"])
    unsure = api.get("/v1/items", params={"job_id": job["id"], "status": "needs_review", "limit": 2}).json()["items"]
    assert len(unsure) == 2
    first, second = unsure

    decided = api.post("/v1/reviews", json={"item_id": first["item_id"], "category": "Bag", "reviewer": "ann"})
    assert decided.status_code == 201, decided.text
    body = decided.json()
    assert body["review"]["action"] == "review" and body["review"]["reviewer"] == "ann"
    assert body["review"]["model_category"] == first["category"] and body["review"]["previous_status"] == "needs_review"
    item = body["item"]
    assert (item["status"], item["category"], item["confidence"]) == ("reviewed", "Bag", None)
    assert item["reviewed_by"] == "ann" and item["reviewed_at"]
    assert (item["model_category"], item["model_confidence"]) == (first["category"], first["confidence"])
    unknown = api.post("/v1/reviews", json={"item_id": second["item_id"], "category": None, "reviewer": "bob"})
    assert unknown.status_code == 201 and unknown.json()["item"]["category"] is None

    reviewed = api.get("/v1/items", params={"job_id": job["id"], "status": "reviewed"}).json()["items"]
    assert {i["item_id"] for i in reviewed} == {first["item_id"], second["item_id"]}
    again = api.post("/v1/jobs", json={"source": str(folder)}).json()  # a re-sort leaves the decisions alone
    job_when_ended(api, again["id"])
    assert api.get(f"/v1/items/{first['item_id']}").json()["category"] == "Bag"

    for body, status, expected in (
        ({"item_id": first["item_id"], "category": "Spaceship", "reviewer": "ann"}, 422,
         "category 'Spaceship' is not one of the allowed categories: Ankle_boot, Bag"),
        ({"item_id": first["item_id"], "category": "Bag", "reviewer": "   "}, 422, "reviewer must be a non-empty"),
        ({"item_id": first["item_id"], "category": "Bag"}, 422, "reviewer: Field required"),
        ({"item_id": "file:///no/such.png", "category": "Bag", "reviewer": "ann"}, 404,
         "no item 'file:///no/such.png' in the catalog"),
    ):
        answer = api.post("/v1/reviews", json=body)
        assert answer.status_code == status and expected in answer.json()["detail"], answer.text


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_count_requests_classifications_and_jobs(api, db_url, roots):
    folder = copy_examples(roots / "photos")
    png = example_files()[0].read_bytes()
    assert api.post("/v1/classify", files=[("file", ("a.png", png, "image/png")),
                                           ("file", ("b.jpg", b"not a photo", "image/jpeg")),
                                           ("file", ("c.png", png, "image/png"))]).status_code == 200
    assert api.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert api.get("/no/such/route").status_code == 404
    job = api.post("/v1/jobs", json={"source": str(folder), "limit": 4}).json()
    job_when_ended(api, job["id"])
    # a webhook event produced a minute ago and tried twice, not delivered: a receiver that is down
    produced_at = datetime.now(UTC) - timedelta(seconds=60)
    with session_scope(db_url) as session:
        session.execute(insert(WebhookOutbox).values(
            event_id=f"test:{uuid.uuid4()}", event_type="job.completed", payload="{}", created_at=produced_at,
            attempts=2, next_attempt_at=produced_at, last_error="connection refused"))

    text = api.get("/metrics").text
    assert metric(text, "invsort_http_requests_total", method="POST", route="/v1/classify", status="200") == 1
    assert metric(text, "invsort_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert metric(text, "invsort_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert metric(text, "invsort_http_requests_total", method="POST", route="/v1/jobs", status="201") == 1
    assert metric(text, "invsort_classify_seconds_count") == 1 and metric(text, "invsort_classify_seconds_sum") > 0
    assert metric(text, "invsort_images_classified_total", status="failed") == 1
    assert metric(text, "invsort_images_classified_total", status="sorted") + \
        metric(text, "invsort_images_classified_total", status="needs_review") == 2
    assert metric(text, "invsort_jobs_started_total", mode="embedded") == 1
    assert metric(text, "invsort_database_up") == 1
    with session_scope(db_url) as session:
        in_db = count_jobs_by_status(session=session)
    assert in_db["done"] >= 1
    for status, n in in_db.items():
        assert metric(text, "invsort_jobs", status=status) == n
    assert metric(text, "invsort_webhook_events_pending") >= 1  # >=: the PostgreSQL database is shared
    assert 60 <= metric(text, "invsort_webhook_oldest_pending_seconds") < 3600
    assert metric(text, "invsort_webhook_max_attempts") >= 2


# ------------------------------------------------------------------------------------------- real processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[..., str]]:
    """Start ``invsort serve`` on a free port with the given INVSORT_* variables; returns its base URL once its
    /healthz answers. Stopped with SIGINT (uvicorn's graceful shutdown) at the end."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, **env: str) -> str:
        port = free_port()
        script = Path(sys.executable).with_name("invsort")
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("INVSORT_")}
        log = open(tmp_path / f"serve-{port}.log", "wb")  # noqa: SIM115 - the process writes it until stopped
        proc = subprocess.Popen([*argv, "serve", "--port", str(port), *args], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, env={**clean, **env, "PYTHONUNBUFFERED": "1"})
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / f"serve-{port}.log").read_text()
            try:
                return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout_s=180, poll_s=0.5)
        return url

    start.procs = procs  # type: ignore[attr-defined]  # the processes started, in order (a test may stop one)
    yield start
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_invsort_serve_answers_healthz_and_classify_over_http(serve, tmp_path):
    url = serve("--db", f"sqlite:///{tmp_path / 'served.db'}")
    health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["model"]["version"] == load_model_file(BUNDLED_MODEL).version
    photo = example_files()[0]
    answer = httpx.post(f"{url}/v1/classify", timeout=60,
                         files=[("file", (photo.name, photo.read_bytes(), "image/png")),
                                ("file", ("empty.jpg", b"", "image/jpeg"))])
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["results"]
    assert first["filename"] == photo.name and first["category"] == "Ankle_boot"
    assert second == {"filename": "empty.jpg", "status": "failed", "category": None, "confidence": None,
                      "topk": [], "error": "empty file (0 bytes)"}
    assert (tmp_path / "served.db").exists()  # migrated at start-up


@pytest.mark.slow
def test_with_a_broker_that_answers_serve_queues_the_job_for_workers(serve, pg_url, roots):
    broker = "redis://127.0.0.1:6379/14"
    client = redis.Redis.from_url(broker)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    client.flushdb()
    folder = copy_examples(roots / "photos")
    try:
        url = serve("--db", pg_url, INVSORT_BROKER_URL=broker, INVSORT_LOCAL_ROOTS=str(roots),
                    INVSORT_ITEMS_PER_TASK="8")
        answer = httpx.post(f"{url}/v1/jobs", json={"source": str(folder)}, timeout=60)
        assert answer.status_code == 201, answer.text
        job = answer.json()
        assert job["mode"] == "queued" and job["mode_reason"] == (f"batches queued on broker {broker} for invsort "
                                                                  "worker processes")
        listed = wait_for(lambda: (j := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["status"] == "running"
                          and j)
        assert listed["total_items"] == 50 and listed["total_batches"] == 7
        assert client.llen("invsort") == 7  # one task a batch, waiting for a worker
        cancelled = httpx.post(f"{url}/v1/jobs/{job['id']}/cancel").json()
        assert cancelled["cancelled"] is True and cancelled["job"]["status"] == "cancelled"
        with session_scope(pg_url) as session:
            states = session.execute(select(SortingJobBatch.state).where(SortingJobBatch.job_id == job["id"]))
            assert set(states.scalars()) == {"cancelled"}
    finally:
        client.flushdb()


# ------------------------------------------------------------------------------------- job events (SSE)


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """The events of a text/event-stream (the fields of each; ``comment`` holds its comment lines), as EventSource
    parses them: a blank line ends an event."""
    event: dict[str, str] = {}
    for line in lines:
        if line == "":
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            event["comment"] = event.get("comment", "") + line[1:].strip()
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[name] = event[name] + "\n" + value if name == "data" and name in event else value
    if event:
        yield event


def job_events(url: str, job_id: str, **headers: str) -> tuple[httpx.Response, list[dict[str, str]]]:
    """Every event of a job's stream, read until the server closes it (the test fails if that takes a minute)."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(60, read=20)) as answer:
        if answer.status_code != 200:
            answer.read()
            return answer, []
        events = list(sse_events(answer.iter_lines()))
    return answer, events


def test_unknown_job_events_are_404_json_and_the_stream_is_in_the_openapi(api):
    unknown = str(uuid.uuid4())
    answer = api.get(f"/v1/jobs/{unknown}/events")
    assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"detail": f"no job '{unknown}'"}
    operation = api.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
    assert "404" in operation["responses"]


@pytest.mark.slow
def test_job_events_stream_a_jobs_progress_over_http_until_it_ends(serve, tmp_path, roots):
    folder = many_photos(roots / "many", 4000)  # many polls long on any machine (200 ended within one in CI)
    url = serve("--db", f"sqlite:///{tmp_path / 'served.db'}", INVSORT_LOCAL_ROOTS=str(roots),
                INVSORT_BATCH_SIZE="2")
    started = httpx.post(f"{url}/v1/jobs", json={"source": str(folder)}, timeout=60)
    assert started.status_code == 201, started.text
    job_id = started.json()["id"]

    answer, events = job_events(url, job_id)

    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["cache-control"] == "no-store"
    data = [e for e in events if "data" in e]
    jobs = [json.loads(e["data"]) for e in data]
    assert len(jobs) >= 3, jobs  # the first state, some progress, the end
    print(f"{len(jobs)} events: " + ", ".join(f"{j['status']} {j['processed']}" for j in jobs))
    assert [int(e["id"]) for e in data] == list(range(1, len(data) + 1))
    assert all(e["retry"] == "2000" for e in data)
    assert {j["id"] for j in jobs} == {job_id}
    statuses = [j["status"] for j in jobs[:-1]]
    assert set(statuses) <= {"listing", "running"} and statuses == sorted(statuses, key=["listing", "running"].index)
    for before, after in zip(jobs, jobs[1:], strict=False):
        assert before != after, "an event only when something changed"
        for key in ("processed", "batches_done", "sorted_count", "needs_review_count", "failed_count"):
            assert before[key] <= after[key], (key, before, after)
    last = jobs[-1]
    assert last["status"] == "done" and last["processed"] == 4000
    assert last == httpx.get(f"{url}/v1/jobs/{job_id}").json()

    # a reconnect with Last-Event-ID: the state now, with the next id, and the stream closes
    again, events = job_events(url, job_id, **{"Last-Event-ID": data[-1]["id"]})
    assert again.status_code == 200
    assert [(e["id"], json.loads(e["data"])) for e in events] == [(str(len(data) + 1), last)]
    _, events = job_events(url, job_id, **{"Last-Event-ID": "not-a-number"})
    assert [e["id"] for e in events] == ["1"]


@pytest.mark.slow
def test_job_events_stop_when_the_client_leaves_and_do_not_hold_up_a_stopping_server(serve, tmp_path, roots):
    folder = many_photos(roots / "many", 4000)
    url = serve("--db", f"sqlite:///{tmp_path / 'served.db'}", INVSORT_LOCAL_ROOTS=str(roots),
                INVSORT_BATCH_SIZE="2")
    proc = serve.procs[-1]
    job_id = httpx.post(f"{url}/v1/jobs", json={"source": str(folder)}, timeout=60).json()["id"]
    route = {"method": "GET", "route": "/v1/jobs/{job_id}/events", "status": "200"}

    def streams_ended() -> float:
        return metric(httpx.get(f"{url}/metrics").text, "invsort_http_requests_total", **route)

    # a client that reads one event and leaves: the server ends that stream (its request is counted when it does)
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=30) as answer:
        first = next(e for e in sse_events(answer.iter_lines()) if "data" in e)
    assert json.loads(first["data"])["status"] in ("listing", "running")
    wait_for(lambda: streams_ended() == 1, timeout_s=10)

    # a stream still open when the server is told to stop: it ends, and the server exits
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=30) as answer:
        lines = answer.iter_lines()
        assert next(e for e in sse_events(lines) if "data" in e)
        assert httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] in ("listing", "running"), "it ended too soon"
        stopping = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = list(sse_events(lines))  # read until the server closes the stream
        closed_after = time.monotonic() - stopping
    assert all(json.loads(e["data"])["status"] in ("listing", "running") for e in rest if "data" in e)
    assert closed_after < 10, f"the stream stayed open {closed_after:.1f} s after SIGINT"
    assert proc.wait(timeout=30) == 0
    exited_after = time.monotonic() - stopping
    assert exited_after < 20, f"the server took {exited_after:.1f} s to stop"
