"""``POST /v1/classify``'s batcher (worker/web/batcher.py): requests that arrive together share a forward pass and
each gets the answer it would have got alone, in upload order, a bad photo failing alone.

The real app through FastAPI's TestClient (its lifespan starts the batcher), the bundled model, real photos and the
bad files of tests/images.py; the batcher is also driven directly, where the test decides which requests queue up
together. No figure here depends on time.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pipeline.errors import ConfigError
from pipeline.settings import BUNDLED_MODEL, build_settings
from pipeline.sorting import classify_images
from tests.images import BAD_IMAGES, example_files
from worker.web.app import create_app
from worker.web.batcher import (
    THREADS_ENV,
    WAIT_ENV,
    BatcherClosedError,
    BatcherOptions,
    ClassifyBatcher,
)

CLIENTS = 8
BAD = "text_renamed.jpg"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch, tmp_path):
    """No INVSORT_* variable or .env file of the caller's: every setting is the test's."""
    for name in [k for k in os.environ if k.startswith("INVSORT_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def post(client: TestClient, photos: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    answer = client.post("/v1/classify", files=[("file", (name, data, "application/octet-stream"))
                                                for name, data in photos])
    assert answer.status_code == 200, answer.text
    results: list[dict[str, Any]] = answer.json()["results"]
    return results


def same_answer(mine: dict[str, Any], alone: dict[str, Any]) -> None:
    assert (mine["filename"], mine["status"], mine["category"], mine["error"]) == \
        (alone["filename"], alone["status"], alone["category"], alone["error"])
    assert mine["confidence"] == pytest.approx(alone["confidence"], abs=1e-5)
    assert [c for c, _ in mine["topk"]] == [c for c, _ in alone["topk"]]
    for (_, p), (_, q) in zip(mine["topk"], alone["topk"], strict=True):
        assert p == pytest.approx(q, abs=1e-5)


def batch_histograms(client: TestClient) -> dict[str, dict[str, float]]:
    """``{metric: {"count": n, "sum": s, "le=1": n1}}`` of the batcher's two histograms, read from /metrics."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name in ("invsort_classify_batch_photos", "invsort_classify_batch_requests"):
            figures = out.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    figures["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    figures["sum"] = sample.value
                elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 1.0:
                    figures["le=1"] = sample.value
    return out


def multi(histograms: dict[str, dict[str, float]], name: str) -> float:
    """How many batches counted in histogram ``name`` held more than one (request, or photo)."""
    figures = histograms.get(name, {})
    return figures.get("count", 0.0) - figures.get("le=1", 0.0)


def run_together(client: TestClient, requests: list[list[tuple[str, bytes]]]) -> list[list[dict[str, Any]]]:
    """Send ``requests`` from one thread each, released together; their answers, in the same order."""
    answers: list[list[dict[str, Any]] | None] = [None] * len(requests)
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def send(i: int) -> None:
        try:
            start.wait()
            answers[i] = post(client, requests[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert all(a is not None for a in answers)
    return answers  # type: ignore[return-value]


@pytest.fixture
def api(sqlite_url: str, monkeypatch) -> Iterator[TestClient]:
    # A batch waits for requests still being decoded (never for ones not yet read), up to 1 s here instead of
    # 2 ms: requests released together all but surely meet in one forward pass however slow the machine.
    monkeypatch.setenv(WAIT_ENV, "1000")
    with TestClient(create_app(build_settings(database_url=sqlite_url, batch_size=16))) as client:
        yield client


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers_in_order(api):
    photos = [(p.name, p.read_bytes()) for p in example_files()[::3][:CLIENTS + 3]]
    bad = (BAD, BAD_IMAGES[BAD])
    alone = {name: post(api, [(name, data)])[0] for name, data in photos}
    alone[BAD] = post(api, [bad])[0]
    assert alone[BAD]["status"] == "failed" and alone[BAD]["error"].startswith("not an image")
    before = batch_histograms(api)

    # Per round: one-photo requests, a request of three photos with a bad one in the middle, a bad photo alone.
    requests = [[photo] for photo in photos[: CLIENTS - 2]] + [[photos[-3], bad, photos[-1]], [bad]]
    merged = False
    for _ in range(5):
        answers = run_together(api, requests)
        for request, answer in zip(requests, answers, strict=True):
            assert [r["filename"] for r in answer] == [name for name, _ in request], "upload order"
            for mine in answer:
                same_answer(mine, alone[mine["filename"]])
        after = batch_histograms(api)
        merged = multi(after, "invsort_classify_batch_requests") > multi(before, "invsort_classify_batch_requests")
        if merged:
            break
    assert merged, f"no forward pass held two requests: {after}"
    assert multi(after, "invsort_classify_batch_photos") > multi(before, "invsort_classify_batch_photos")
    # every photo that went to the model was counted once: the bad-only requests never reach a forward pass
    rounds_photos = after["invsort_classify_batch_photos"]["sum"] - before["invsort_classify_batch_photos"]["sum"]
    assert rounds_photos % (CLIENTS - 2 + 3) == 0


def test_the_batcher_runs_queued_requests_in_one_pass_and_a_bad_photo_fails_alone(sqlite_url):
    """Driven directly: five requests are queued before the forward threads start, so they meet in one pass."""
    settings = build_settings(database_url=sqlite_url, batch_size=64)
    files = example_files()
    requests: list[list[tuple[str, bytes]]] = [
        [(files[0].name, files[0].read_bytes())],
        [(files[10].name, files[10].read_bytes()), (BAD, BAD_IMAGES[BAD]), (files[20].name, files[20].read_bytes())],
        [(files[30].name, files[30].read_bytes())],
        [("zero_bytes.jpg", b""), (files[40].name, files[40].read_bytes())],
        [(files[49].name, files[49].read_bytes())],
    ]
    batches: list[tuple[int, int]] = []
    batcher = ClassifyBatcher(settings, BUNDLED_MODEL, BatcherOptions(max_batch=64, max_wait_s=0),
                              on_batch=lambda photos, reqs: batches.append((photos, reqs)))

    async def scenario() -> list[list[Any]]:
        tasks = [asyncio.ensure_future(batcher.classify(r)) for r in requests]
        while batcher.queued_requests < len(requests):  # decoded and queued; no forward thread runs yet
            await asyncio.sleep(0.01)
        await asyncio.to_thread(batcher.start)
        return list(await asyncio.gather(*tasks))

    try:
        answers = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        batcher.close()
    assert batches == [(8, 5)]  # every photo of the five requests, bad ones included, in one pass
    for request, rows in zip(requests, answers, strict=True):
        alone = classify_images(request, settings=settings, model_spec=BUNDLED_MODEL)
        assert [r.item_id for r in rows] == [name for name, _ in request] == [r.item_id for r in alone]
        for mine, theirs in zip(rows, alone, strict=True):
            assert (mine.status, mine.category, mine.error, mine.image_uri) == \
                (theirs.status, theirs.category, theirs.error, theirs.image_uri)
            if mine.status != "failed":
                assert mine.confidence == pytest.approx(theirs.confidence, abs=1e-5)
    failed = {r.item_id: r.error for rows in answers for r in rows if r.status == "failed"}
    assert set(failed) == {BAD, "zero_bytes.jpg"} and failed["zero_bytes.jpg"] == "empty file (0 bytes)"

    with pytest.raises(BatcherClosedError):
        asyncio.run(batcher.classify(requests[0]))


def test_a_request_of_bad_photos_only_is_answered_without_a_forward_pass(sqlite_url):
    settings = build_settings(database_url=sqlite_url)
    batches: list[tuple[int, int]] = []
    batcher = ClassifyBatcher(settings, BUNDLED_MODEL, BatcherOptions(), on_batch=lambda *b: batches.append(b))
    try:  # not started: no forward thread could answer
        rows = asyncio.run(batcher.classify([(name, data) for name, data in BAD_IMAGES.items()]))
    finally:
        batcher.close()
    assert [r.item_id for r in rows] == list(BAD_IMAGES) and {r.status for r in rows} == {"failed"}
    assert all(r.error for r in rows) and batches == []


def test_without_the_lifespan_classify_still_answers_alone(sqlite_url):
    """A TestClient not used as a context manager runs no lifespan, so no batcher: each request is classified on
    its own, with the same answers."""
    photo = example_files()[5]
    client = TestClient(create_app(build_settings(database_url=sqlite_url)))
    assert not hasattr(client.app.state, "classify_batcher")
    plain = post(client, [(photo.name, photo.read_bytes())])
    with TestClient(create_app(build_settings(database_url=sqlite_url))) as batched:
        same_answer(post(batched, [(photo.name, photo.read_bytes())])[0], plain[0])
    client.close()


@pytest.mark.parametrize(("name", "value", "words"), [
    (WAIT_ENV, "-1", f"{WAIT_ENV} must be between 0 and 1000 ms, got -1"),
    (WAIT_ENV, "soon", f"{WAIT_ENV} must be a number, got 'soon'"),
    (THREADS_ENV, "1.5", f"{THREADS_ENV} must be a whole number, got '1.5'"),
    (THREADS_ENV, "65", f"{THREADS_ENV} must be between 0 and 64, got 65"),
])
def test_batcher_settings_are_checked(name, value, words):
    with pytest.raises(ConfigError) as caught:
        BatcherOptions.from_settings(build_settings(batch_size=24), {name: value})
    assert str(caught.value) == words


def test_batcher_settings_default_and_read():
    settings = build_settings(batch_size=24)
    assert BatcherOptions.from_settings(settings, {}) == BatcherOptions(max_batch=24, max_wait_s=0.002,
                                                                        forward_threads=0)
    assert BatcherOptions.from_settings(settings, {WAIT_ENV: "0", THREADS_ENV: "3"}) == BatcherOptions(
        max_batch=24, max_wait_s=0.0, forward_threads=3)


def test_a_bad_batcher_setting_stops_the_app_at_start_up(sqlite_url, monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "5000")
    with pytest.raises(ConfigError, match=WAIT_ENV), TestClient(create_app(build_settings(database_url=sqlite_url))):
        pass
