"""The web pages (worker/web/pages.py) in a real browser: Chromium driven by Playwright against a real uvicorn server
on a free port of 127.0.0.1, serving ``create_app`` on a SQLite catalog in a temporary folder that the bundled
model has sorted the example photos into (with a review threshold of 0.99: 17 of the 50 need review).

Nothing is mocked: decisions are typed on the keyboard and read back from the database, the classify page
uploads real photos, exports are downloaded. Every request a page makes must stay on the test server.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from db.catalog import CatalogRow, get_item, iter_items, upsert_items
from db.migrate import upgrade
from db.reviews import iter_reviews, review_queue
from db.session import dispose_engines, session_scope
from pipeline.records import ItemResult
from pipeline.settings import build_settings
from pipeline.sorting import get_predictor, sort_source
from tests.fixtures.browser import checked_page, served
from tests.images import BAD_IMAGES, EXAMPLES, example_files
from worker.web.app import create_app

pytestmark = pytest.mark.slow

REVIEW_THRESHOLD = 0.99  # the bundled model's confidences on the examples: 0.37..0.995


@dataclass
class Site:
    base: str
    url: str
    roots: Path
    classes: list[str]
    version: str


def _copy_examples(dest: Path, files: list[Path] | None = None) -> Path:
    for path in files or example_files():
        target = dest / path.relative_to(EXAMPLES)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The examples sorted into a fresh SQLite catalog, and ``create_app`` served on 127.0.0.1 by uvicorn."""
    tmp = tmp_path_factory.mktemp("pages")
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("INVSORT_")]:
            mp.delenv(name)
        mp.chdir(tmp)  # no .env of the caller's
        roots = tmp / "roots"
        _copy_examples(roots / "images")
        url = f"sqlite:///{tmp / 'catalog.db'}"
        upgrade(url)
        settings = build_settings(database_url=url, local_roots=str(roots), review_threshold=REVIEW_THRESHOLD,
                                  batch_size=16)
        outcome = sort_source(str(roots / "images"), settings=settings, allow_source_root=False)
        assert outcome.summary.needs_review >= 12, outcome
        mf = get_predictor(settings).model_file
        with served(create_app(settings)) as base:
            yield Site(base, url, roots, list(mf.class_names), mf.version)
        dispose_engines(url)


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    """A fresh browser page; after the test, every request it made must have gone to the test server."""
    with checked_page(browser, site.base, accept_downloads=True) as tab:
        yield tab


def _row(site: Site, item_id: str) -> CatalogRow:
    with session_scope(site.url) as session:
        row = get_item(session=session, item_id=item_id)
    assert row is not None
    return row


def _queue(site: Site, limit: int) -> list[CatalogRow]:
    with session_scope(site.url) as session:
        return review_queue(session=session, limit=limit)


def _actions(site: Site, item_id: str) -> list[tuple[str, str | None, str]]:
    with session_scope(site.url) as session:
        return [(r.action, r.category, r.reviewer) for r in iter_reviews(session=session, item_id=item_id)]


# ------------------------------------------------------------------------------------------------ review


def test_review_page_decisions_typed_on_the_keyboard_are_stored_with_the_reviewer(site: Site, page: Page) -> None:
    queue = _queue(site, 6)
    page.goto(f"{site.base}/review?limit=6")
    rows = page.locator("#queue .row")
    expect(rows).to_have_count(6)
    assert [rows.nth(i).get_attribute("data-item-id") for i in range(6)] == [r.item_id for r in queue]
    confidences = [r.confidence for r in queue]
    assert confidences == sorted(confidences), "least confident first"
    assert rows.nth(0).locator(".conf").inner_text() == f"{queue[0].confidence:.3f}"
    for i, row in enumerate(queue):  # its top-5 as bars
        meters = rows.nth(i).locator("meter")
        expect(meters).to_have_count(len(row.topk))
        assert float(meters.nth(0).get_attribute("value") or "nan") == pytest.approx(row.topk[0][1])
    page.wait_for_function("Array.from(document.querySelectorAll('#queue img.thumb'))"
                           ".every((img) => img.complete && img.naturalWidth > 0)")
    chips = page.locator(".legend .chip").all_inner_texts()
    assert chips[:10] == [f"{(i + 1) % 10} {name}" for i, name in enumerate(site.classes[:10])]

    page.fill("#reviewer", "ana")
    page.press("#reviewer", "Escape")  # back to the first row
    page.keyboard.press("3")  # the third class
    page.keyboard.press("Enter")  # the model's top-1
    page.keyboard.press("x")  # not a product
    for i in range(3):
        expect(rows.nth(i)).to_have_attribute("data-state", "reviewed")
    expect(rows.nth(0).locator(".decision")).to_have_text(f"→ {site.classes[2]} (ana)")

    first, second, third = (_row(site, r.item_id) for r in queue[:3])
    assert (first.status, first.category, first.reviewed_by, first.confidence) == ("reviewed", site.classes[2], "ana",
                                                                                 None)
    assert (first.model_category, first.model_confidence) == (queue[0].category, queue[0].confidence)
    assert (second.status, second.category, second.model_category) == ("reviewed", queue[1].category,
                                                                       queue[1].category)
    assert (third.status, third.category, third.model_category) == ("reviewed", None, queue[2].category)

    page.keyboard.press("u")  # undoes x on the third row
    expect(rows.nth(2)).to_have_attribute("data-state", "needs_review")
    restored = _row(site, queue[2].item_id)
    assert {**_fields(restored), "updated_at": None} == {**_fields(queue[2]), "updated_at": None}, "as it was"
    assert _actions(site, queue[1].item_id) == [("accept", queue[1].category, "ana")]

    page.keyboard.press("a")  # the page's top-1s: rows 3 to 6
    for i in range(6):
        expect(rows.nth(i)).to_have_attribute("data-state", "reviewed")
    for row in queue[2:]:
        now = _row(site, row.item_id)
        assert (now.status, now.category, now.model_category, now.reviewed_by) == ("reviewed", row.category,
                                                                                   row.category, "ana")
    assert _actions(site, queue[2].item_id) == [("review", None, "ana"), ("undo", queue[2].category, "ana"),
                                                ("accept", queue[2].category, "ana")]

    page.reload()  # the reviewer is remembered; the decided rows have left the queue
    expect(page.locator("#reviewer")).to_have_value("ana")
    shown = page.locator("#queue .row").evaluate_all("rows => rows.map((r) => r.dataset.itemId)")
    assert not set(shown) & {r.item_id for r in queue}


def _fields(row: CatalogRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in CatalogRow.__slots__}


def test_review_page_asks_for_a_name_and_pages_through_the_queue(site: Site, page: Page) -> None:
    queue = _queue(site, 4)
    page.goto(f"{site.base}/review?limit=2")
    page.evaluate("localStorage.clear()")
    page.reload()
    page.locator("#queue .row").first.click()
    page.keyboard.press("Enter")
    expect(page.locator("#review-msg")).to_contain_text("Type your name")
    assert _row(site, queue[0].item_id).status == "needs_review", "nothing stored without a reviewer"

    page.click("#next-page")
    shown = page.locator("#queue .row").evaluate_all("rows => rows.map((r) => r.dataset.itemId)")
    assert shown == [r.item_id for r in queue[2:4]]
    expect(page.locator("#start-page")).to_be_visible()


# ---------------------------------------------------------------------------------------------- classify


def _wait_sorted(page: Page, count: int) -> None:
    expect(page.locator("#results .card")).to_have_count(count)
    expect(page.locator('#results .card:not([data-status="pending"])')).to_have_count(count)


def test_classify_page_shows_each_photos_result_as_the_api_gives_it(site: Site, page: Page) -> None:
    photos = [example_files()[0], example_files()[-1]]
    answer = httpx.post(f"{site.base}/v1/classify",
                        files=[("file", (p.name, p.read_bytes(), "image/png")) for p in photos]).json()["results"]
    page.goto(f"{site.base}/")
    page.set_input_files("#files", [str(p) for p in photos])
    _wait_sorted(page, 2)
    cards = page.locator("#results .card")
    for i, expected in enumerate(answer):
        card = cards.nth(i)
        assert card.get_attribute("data-name") == photos[i].name
        assert card.get_attribute("data-status") == expected["status"]
        assert card.get_attribute("data-category") == expected["category"]
        assert float(card.get_attribute("data-confidence") or "nan") == expected["confidence"]
        expect(card.locator(".category")).to_have_text(expected["category"])
        assert "null" not in card.inner_text() and "undefined" not in card.inner_text()
        expect(card.locator("meter")).to_have_count(len(expected["topk"]))
    assert {a["category"] for a in answer} == {photos[0].parent.name, photos[1].parent.name}


def test_classify_page_takes_dropped_and_pasted_photos_and_shows_failures(site: Site, page: Page) -> None:
    page.goto(f"{site.base}/")
    photo = base64.b64encode(example_files()[5].read_bytes()).decode()
    script = """([kind, name, data]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        if (kind === "drop") {
            const drop = new DragEvent("drop", {dataTransfer: transfer, bubbles: true});
            document.getElementById("drop").dispatchEvent(drop);
        } else {
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true}));
        }
    }"""
    page.evaluate(script, ["drop", "dropped.png", photo])
    page.evaluate(script, ["paste", "pasted.png", photo])
    page.evaluate(script, ["drop", "text_renamed.png", base64.b64encode(BAD_IMAGES["text_renamed.jpg"]).decode()])
    _wait_sorted(page, 3)
    cards = page.locator("#results .card")
    assert cards.nth(0).get_attribute("data-category") == cards.nth(1).get_attribute("data-category") == \
        example_files()[5].parent.name
    assert cards.nth(2).get_attribute("data-status") == "failed"
    expect(cards.nth(2).locator(".error-text")).to_contain_text("not an image")


# ----------------------------------------------------------------------------------------------- catalog


def _shown_ids(page: Page) -> list[str]:
    return page.locator("#items tbody tr").evaluate_all("rows => rows.map((r) => r.dataset.itemId)")


def test_catalog_page_filters_pages_and_exports_the_filter(site: Site, page: Page) -> None:
    with session_scope(site.url) as session:
        sorted_rows = list(iter_items(session=session, status="sorted"))
    category = max(site.classes, key=lambda c: sum(r.category == c for r in sorted_rows))
    expected = [r for r in sorted_rows if r.category == category]
    assert len(expected) >= 3

    page.goto(f"{site.base}/catalog")
    page.select_option("select[name=status]", "sorted")
    page.fill("input[name=category]", category)
    page.fill("input[name=limit]", "2")
    page.click("#filters button[type=submit]")
    shown = _shown_ids(page)
    while page.locator("#next-page").count():
        page.click("#next-page")
        shown += _shown_ids(page)
    assert shown == [r.item_id for r in expected], "every matching row once, in key order"
    expect(page.locator("select[name=status]")).to_have_value("sorted")

    with page.expect_download() as download:
        page.click("#export-csv")
    assert download.value.suggested_filename == "catalog.csv"
    with open(download.value.path(), newline="", encoding="utf-8") as f:
        exported = list(csv.DictReader(f))
    assert [r["item_id"] for r in exported] == [r.item_id for r in expected]
    for got, row in zip(exported, expected, strict=True):
        assert (got["status"], got["category"], float(got["confidence"])) == ("sorted", category, row.confidence)
        assert json.loads(got["topk"]) == row.topk and got["model_version"] == site.version

    jsonl = httpx.get(f"{site.base}{page.get_attribute('#export-jsonl', 'href')}")
    assert [json.loads(line)["item_id"] for line in jsonl.text.splitlines()] == [r.item_id for r in expected]


def test_catalog_page_confidence_range_and_bad_filters(site: Site, page: Page) -> None:
    with session_scope(site.url) as session:
        rows = list(iter_items(session=session))
    expected = [r.item_id for r in rows if r.confidence is not None and 0.5 <= r.confidence <= 0.99]
    page.goto(f"{site.base}/catalog?min_confidence=0.5&max_confidence=0.99&limit=500")
    assert _shown_ids(page) == expected
    confidences = [float(t) for t in page.locator("#items td.conf").all_inner_texts()]
    assert all(0.5 <= c <= 0.99 for c in confidences)

    answer = page.goto(f"{site.base}/catalog?min_confidence=high&status=lost")
    assert answer is not None and answer.status == 422
    expect(page.locator(".error")).to_have_count(2)
    expect(page.locator(".error").first).to_contain_text("status must be one of")


# -------------------------------------------------------------------------------- thumbnails, assets, CSP


def test_thumbnails_are_served_only_for_catalog_rows_inside_the_roots(site: Site) -> None:
    with session_scope(site.url) as session:
        upsert_items(session=session, rows=[ItemResult(item_id="outside", image_uri="file:///etc/hostname",
                                                       status="failed", error="made by the test")])
        row = next(iter_items(session=session, status="sorted"))
    ok = httpx.get(f"{site.base}/ui/thumb", params={"item_id": row.item_id})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(ok.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape[:2] == (28, 28), "a small photo keeps its size"

    outside = httpx.get(f"{site.base}/ui/thumb", params={"item_id": "outside"})
    assert outside.status_code == 404 and "outside the local roots" in outside.json()["detail"]
    for item_id in ("/etc/hostname", "file:///etc/hostname", str(site.roots / "images")):
        assert httpx.get(f"{site.base}/ui/thumb", params={"item_id": item_id}).status_code == 404
    for name in ("../pages.py", "..%2Fpages.py", "nothing.js"):
        assert httpx.get(f"{site.base}/ui/static/{name}").status_code == 404

    html = httpx.get(f"{site.base}/review")
    assert "default-src 'self'" in html.headers["content-security-policy"]
    assert "http" not in "".join(part.split('"')[0] for part in html.text.split('src="')[1:])


# -------------------------------------------------------------------------------------------- models, jobs


def test_models_page_shows_the_card_and_the_thresholds(site: Site, page: Page) -> None:
    page.goto(f"{site.base}/models")
    expect(page.locator("#model-version")).to_have_text(site.version)
    expect(page.locator("#model-classes")).to_have_text(", ".join(site.classes))
    expect(page.locator("#threshold")).to_contain_text(f"{REVIEW_THRESHOLD:.4f} (INVSORT_REVIEW_THRESHOLD")
    expect(page.locator("#open-set")).to_contain_text("none")
    expect(page.locator("#model-card")).to_contain_text("# Model card: invsort_cnn")
    expect(page.locator("#model-card")).to_contain_text(f"Version: `{site.version}`")


def _started_job(page: Page) -> Locator:
    """The row of the job the form just started (its id is in the message)."""
    message = page.locator("#job-msg")
    expect(message).to_contain_text("started (embedded")
    job_id = message.inner_text().split()[1]
    return page.locator(f'#jobs tbody tr[data-job-id="{job_id}"]')


def test_jobs_page_starts_a_job_follows_it_and_shows_its_failures(site: Site, page: Page) -> None:
    source = _copy_examples(site.roots / "more", example_files()[:6])
    (source / "text_renamed.jpg").write_bytes(BAD_IMAGES["text_renamed.jpg"])
    page.goto(f"{site.base}/jobs")
    page.fill("#source", "/etc")
    page.click("#job-form button[type=submit]")
    expect(page.locator("#job-msg")).to_contain_text("outside")

    streams: list[tuple[str, int]] = []  # the event streams the page read: (path, status)
    page.on("response", lambda r: streams.append((r.url.removeprefix(site.base), r.status)) if "/events" in r.url
            else None)
    page.fill("#source", str(source))
    page.click("#job-form button[type=submit]")
    job = _started_job(page)
    expect(job).to_have_attribute("data-status", "done", timeout=120_000)
    assert job.locator(".id").inner_text() == str(source)
    job_id = job.get_attribute("data-job-id")
    assert (f"/v1/jobs/{job_id}/events", 200) in streams, f"the page did not follow the job's events: {streams}"
    sorted_n, review_n = (int(job.locator(c).inner_text()) for c in (".sorted", ".needs-review"))
    assert (sorted_n + review_n, job.locator(".failed").inner_text()) == (6, "1")
    expect(job.locator("progress")).to_have_attribute("value", "7")

    job.locator("button.show-failures").click()
    failures = page.locator("#failures")
    expect(failures).to_be_visible()
    bad = _row(site, (source / "text_renamed.jpg").as_uri())
    expect(failures.locator("tbody tr")).to_have_count(1)
    expect(failures.locator("tbody tr td").nth(1)).to_have_text(bad.error or "?")


def test_jobs_page_cancels_a_running_job(site: Site, page: Page) -> None:
    source = site.roots / "many"
    files = example_files()
    for i in range(8000):
        target = source / f"part{i // 500:02d}" / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(files[i % len(files)], target)
    page.goto(f"{site.base}/jobs")
    page.fill("#source", str(source))
    page.click("#job-form button[type=submit]")
    job = _started_job(page)
    job.locator("button.cancel").click()
    expect(job).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(page.locator("#job-msg")).to_contain_text("cancelled")
    assert int(job.locator(".sorted").inner_text()) + int(job.locator(".needs-review").inner_text()) < 8000


def test_pages_show_ids_and_errors_as_text_never_as_markup(site: Site, page: Page) -> None:
    odd = """<img src=x onerror="document.title='owned'">&'"""
    with session_scope(site.url) as session:
        upsert_items(session=session, rows=[ItemResult(item_id=odd, image_uri="s3://bucket/k.jpg", status="failed",
                                                       error=f"<b>{odd}</b>", job_id="odd-job")])
    page.goto(f"{site.base}/catalog?job_id=odd-job")
    row = page.locator("#items tbody tr")
    expect(row).to_have_count(1)
    assert row.get_attribute("data-item-id") == odd
    expect(row.locator("td.id")).to_have_text(odd)
    expect(row.locator("td.error-text")).to_have_text(f"<b>{odd}</b>")
    assert page.title() != "owned" and page.locator("#items img").count() == 0
