"""The README's screenshots of the web pages, taken in Chromium against the pages' test server (tests/test_pages.py).

Skipped unless ``INVSORT_SCREENSHOTS`` names a folder to write them into::

    INVSORT_SCREENSHOTS=worker/web/screenshots .venv/bin/pytest tests/test_screenshots.py

Each screenshot is still a check: the page must render its main element without a JavaScript error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from tests.test_pages import Site, site  # noqa: F401 - the fixture of the pages' test server

OUT = os.environ.get("INVSORT_SCREENSHOTS")
OUT_DIR = Path(OUT).resolve() if OUT else None  # before the fixture changes directory
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not OUT, reason="set INVSORT_SCREENSHOTS=DIR to write the README's screenshots")]

VIEWPORT = {"width": 1200, "height": 760}


def test_screenshots_of_every_page(site: Site, browser: Browser) -> None:  # noqa: F811 - a pytest fixture
    assert OUT_DIR is not None
    out = OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{site.base}/")
        photos = sorted((site.roots / "images").rglob("*.png"))[:4]
        page.set_input_files("#files", [str(p) for p in photos])
        expect(page.locator("#results .card .category")).to_have_count(len(photos))
        page.wait_for_timeout(300)
        page.screenshot(path=str(out / "classify.png"))

        page.goto(f"{site.base}/review?limit=8")
        expect(page.locator("#queue .row").first).to_be_visible()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(out / "review.png"))

        page.goto(f"{site.base}/catalog")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(out / "catalog.png"))

        page.goto(f"{site.base}/jobs")
        page.fill("#source", str(site.roots / "images"))
        page.locator("#job-form button[type=submit]").click()
        started = page.get_by_text("started (")
        expect(started).to_be_visible()
        job_id = started.inner_text().split()[1]
        expect(page.locator(f"#jobs tbody tr[data-job-id='{job_id}']")).to_have_attribute("data-status", "done",
                                                                                        timeout=120_000)
        page.screenshot(path=str(out / "jobs.png"))

        page.goto(f"{site.base}/models")
        page.screenshot(path=str(out / "models.png"), full_page=False)
    finally:
        context.close()
    assert errors == [], errors
    assert {p.name for p in out.glob("*.png")} >= {"classify.png", "review.png", "catalog.png", "jobs.png",
                                                    "models.png"}
