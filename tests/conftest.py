"""Shared fixtures live in tests/fixtures/: real PostgreSQL and SQLite (pg.py), S3 through a moto server (s3.py),
a folder of awkwardly named photos with a file outside it (files.py), and a footwear model trained once
per session (footwear.py), Chromium and a uvicorn server in a thread for the pages (browser.py). Redis is
test_worker.py's."""

pytest_plugins = ["tests.fixtures.pg", "tests.fixtures.s3", "tests.fixtures.files", "tests.fixtures.footwear",
                  "tests.fixtures.browser"]
