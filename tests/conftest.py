"""Shared fixtures: real PostgreSQL, SQLite, Redis and S3 (moto server) live in tests/fixtures/."""

pytest_plugins = ["tests.fixtures.pg", "tests.fixtures.s3"]
