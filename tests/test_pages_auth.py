"""The token flow of the web pages in a real browser: Chromium driven by Playwright against a real uvicorn server on
a free port of 127.0.0.1, serving ``create_app`` with INVSORT_API_TOKEN set, on a SQLite catalog that the bundled
model has sorted a few example photos into (review threshold 0.99: some need review).

A page sends the browser to the login page, the token is typed once, and then the pages work through the session
cookie: the classify page's upload and a review decision are POSTs that pass only with the page's CSRF token.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from db.catalog import get_item
from db.migrate import upgrade
from db.reviews import review_queue
from db.session import dispose_engines, session_scope
from pipeline.settings import build_settings
from pipeline.sorting import sort_source
from tests.fixtures.browser import checked_page, served
from tests.images import example_files
from tests.test_pages import REVIEW_THRESHOLD, _copy_examples
from worker.web.app import create_app
from worker.web.auth import SESSION_COOKIE

pytestmark = pytest.mark.slow

TOKEN = "pages-token-0123456789abcdef"


@dataclass
class Site:
    base: str
    url: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Ten example photos sorted into a fresh SQLite catalog, served with a token on 127.0.0.1 by uvicorn."""
    tmp = tmp_path_factory.mktemp("pages-auth")
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("INVSORT_")]:
            mp.delenv(name)
        mp.chdir(tmp)  # no .env of the caller's
        roots = tmp / "roots"
        _copy_examples(roots / "images", example_files()[::5])
        url = f"sqlite:///{tmp / 'catalog.db'}"
        upgrade(url)
        settings = build_settings(database_url=url, local_roots=str(roots), review_threshold=REVIEW_THRESHOLD,
                                  batch_size=16, api_token=TOKEN)
        outcome = sort_source(str(roots / "images"), settings=settings, allow_source_root=False)
        assert outcome.summary.needs_review >= 2, outcome
        with served(create_app(settings)) as base:
            yield Site(base, url)
        dispose_engines(url)


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    """A fresh browser (no cookie); after the test, every request it made must have gone to the test server."""
    with checked_page(browser, site.base) as tab:
        yield tab


def _log_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#login button[type=submit]")


def test_the_token_is_asked_once_then_the_pages_classify_and_review(site: Site, page: Page) -> None:
    page.goto(f"{site.base}/")
    expect(page).to_have_url(f"{site.base}/login?next=%2F")
    expect(page.locator("nav a")).to_have_count(0)  # nothing but the login form

    _log_in(page, "not-the-token-of-this-server")
    expect(page.locator("#login-error")).to_contain_text("That is not the token of this server")
    assert page.context.cookies() == []

    _log_in(page, TOKEN)
    expect(page).to_have_url(f"{site.base}/")
    (cookie,) = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (SESSION_COOKIE, True,
                                                                                       "Strict", "/")
    assert TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == "", "the session cookie is out of the scripts' reach"

    # the upload is a POST with the session cookie: it passes only with the page's CSRF token
    photo = example_files()[1]
    page.set_input_files("#files", [str(photo)])
    card = page.locator("#results .card")
    expect(card).to_have_count(1)
    expect(card).not_to_have_attribute("data-status", "pending")
    assert card.get_attribute("data-status") in ("sorted", "needs_review"), card.inner_text()
    assert card.get_attribute("data-category") == photo.parent.name

    # a review decision typed on the keyboard (POST /ui/review/accept with the cookie and the CSRF header)
    with session_scope(site.url) as session:
        first = review_queue(session=session, limit=1)[0]
    page.click("nav a[href='/review']")
    expect(page.locator("#queue .row").first).to_have_attribute("data-item-id", first.item_id)
    page.fill("#reviewer", "ana")
    page.press("#reviewer", "Escape")
    page.keyboard.press("Enter")
    expect(page.locator("#queue .row").first).to_have_attribute("data-state", "reviewed")
    with session_scope(site.url) as session:
        row = get_item(session=session, item_id=first.item_id)
    assert row is not None and (row.status, row.reviewed_by) == ("reviewed", "ana")

    # the same session without the page's token is refused
    refused = page.evaluate("""async () => {
        const r = await fetch("/ui/review/undo", {method: "POST", headers: {"Content-Type": "application/json"},
                                                  body: JSON.stringify({item_ids: ["x"], reviewer: "ana"})});
        return [r.status, (await r.json()).detail];
    }""")
    assert refused[0] == 403 and refused[1].startswith("missing or wrong CSRF token")

    page.click("header .logout button")
    expect(page).to_have_url(f"{site.base}/login")
    assert page.context.cookies() == []
    page.goto(f"{site.base}/catalog")
    expect(page).to_have_url(f"{site.base}/login?next=%2Fcatalog")


def test_login_goes_on_to_the_page_asked_for_and_the_api_still_wants_the_bearer(site: Site, page: Page) -> None:
    page.goto(f"{site.base}/review?limit=2")
    expect(page).to_have_url(f"{site.base}/login?next={quote('/review?limit=2', safe='')}")
    _log_in(page, TOKEN)
    expect(page).to_have_url(f"{site.base}/review?limit=2")
    expect(page.locator("#queue .row").first).to_be_visible()
    page.wait_for_function("Array.from(document.querySelectorAll('#queue img.thumb'))"
                           ".every((img) => img.complete && img.naturalWidth > 0)")  # thumbnails with the cookie

    assert httpx.get(f"{site.base}/v1/jobs").status_code == 401  # not a browser: the token, or nothing
    assert httpx.get(f"{site.base}/v1/jobs", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(f"{site.base}/healthz").status_code == 200
