"""Shared fixtures live in tests/fixtures/: real PostgreSQL and SQLite (pg.py), S3 through a moto server (s3.py),
and a folder of awkwardly named photos with a file outside it (files.py). Redis is test_worker.py's."""

pytest_plugins = ["tests.fixtures.pg", "tests.fixtures.s3", "tests.fixtures.files"]
