"""Schemathesis against the HTTP API's own OpenAPI document: every operation is called with requests generated from
its schema, valid ones and (where a query parameter or a body can be broken) invalid ones; no answer may be a 5xx,
and every answer must be one the document declares: its status code, media type and body schema (for the job event
stream, each event and the JobOut in its data).

The app is ``create_app`` on a SQLite catalog in a temporary folder into which the bundled model has sorted the
example photos, called in-process through schemathesis's ASGI transport (its lifespan runs, so the model is loaded
as in ``invsort serve``). Generation is bounded (:data:`FUZZ`: a fixed number of examples an operation and mode,
derandomized, no deadline): the module takes about half a minute on two cores.

Generated ids name nothing (404), and a generated job source is refused before any job starts (422: it is not under
INVSORT_LOCAL_ROOTS, a folder that only this module's photos are in, or it has an unknown scheme). So a second test
sends the same generated requests with a real job id, item id or job source in them: a folder of 5 photos in the
roots (a real embedded job, a few seconds at most) or S3, which is a closed port on 127.0.0.1 reached with fake
credentials and one attempt (a job that fails at once, no network). A job still running makes the next start a 409,
which the document declares; the app's shutdown at the end stops whatever still runs. Nothing is excluded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from db.catalog import iter_items
from db.migrate import upgrade
from db.session import dispose_engines, session_scope
from pipeline.settings import build_settings
from pipeline.sorting import sort_source
from tests.images import EXAMPLES, example_files
from worker.web.app import create_app

pytestmark = pytest.mark.slow

#: Per operation and mode: examples generated, no deadline (the first calls load things), the same cases every run.
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

#: No setting or credential of the caller's: S3 is a closed local port, reached with fake keys, never the network.
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true"}
_DROPPED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def _cases() -> list[tuple[str, GenerationMode]]:
    """Every operation of the OpenAPI document (``GET /v1/jobs``, ...), read from an app that is never started, with
    valid requests, and with invalid ones where the schema can be broken: a query parameter or a body (a path or
    header parameter is any string)."""
    document = create_app(build_settings(database_url="sqlite://")).openapi()
    cases = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            cases.append((f"{method.upper()} {path}", GenerationMode.POSITIVE))
            if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", ())):
                cases.append((f"{method.upper()} {path}", GenerationMode.NEGATIVE))
    return cases


@dataclass(frozen=True)
class Served:
    """The app's schema and what its catalog holds: generated ids are never these, so a second test names them."""

    schema: schemathesis.BaseSchema
    job_id: str  # the job that sorted the examples (done)
    item_ids: list[str]  # a few of its rows
    sources: list[str]  # sources a job may start on: a folder of 5 photos in the roots, as a path and a URI; S3


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("INVSORT_")] + list(_DROPPED):
            mp.delenv(name, raising=False)
        for name, value in _ENV.items():
            mp.setenv(name, value)
        mp.chdir(tmp)  # no .env of the caller's
        photos, roots = tmp / "photos", tmp / "roots"  # the API may read the roots only: no generated source
        for i, path in enumerate(example_files()):
            for folder in (photos, roots / "few") if i % 10 == 0 else (photos,):
                target = folder / path.relative_to(EXAMPLES)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        url = f"sqlite:///{tmp / 'catalog.db'}"
        upgrade(url)
        common = {"database_url": url, "s3_endpoint_url": "http://127.0.0.1:1", "s3_max_attempts": 1,
                  "s3_connect_timeout_s": 1.0, "batch_size": 16}
        outcome = sort_source(str(photos), settings=build_settings(**common))  # rows, a job, items to review
        with session_scope(url) as session:
            items = [row.item_id for row in iter_items(session=session, job_id=outcome.job_id)]
        app = create_app(build_settings(local_roots=str(roots), **common))
        try:
            yield Served(schemathesis.openapi.from_asgi("/openapi.json", app), outcome.job_id, items[::10],
                         [str(roots / "few"), (roots / "few").as_uri(), "s3://catalogue/photos/"])
        finally:
            shutdown_lifespans()  # the app's shutdown (schemathesis started it): a running embedded job is stopped
            dispose_engines(url)


@pytest.mark.parametrize(("label", "mode"), _cases(), ids=lambda value: str(value))
def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(served, label, mode) -> None:
    operation = served.schema.find_operation_by_label(label)
    assert operation is not None, label

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    call()


#: Operations that name something of the catalog, and what they name: generated requests with a real one in them.
KNOWN = [("GET /v1/jobs/{job_id}", "job_id"), ("GET /v1/jobs/{job_id}/events", "job_id"),
         ("POST /v1/jobs/{job_id}/cancel", "job_id"), ("GET /v1/items/{item_id}", "item_id"),
         ("POST /v1/reviews", "item_id"), ("POST /v1/jobs", "source")]

#: schemathesis 4.32 refuses a response whose schema is a $ref to a model with a tuple (``topk``: JSON Schema 2020-12
#: ``prefixItems``) as an "Invalid Schema Object" (its Draft 4 conversion), though the same model inside a list is
#: checked (GET /v1/items): for these operations the body is checked against the document here instead.
OWN_SCHEMA_CHECK = {"GET /v1/items/{item_id}": "ItemOut"}


def _validator(schema: schemathesis.BaseSchema, model: str) -> Any:
    """A JSON Schema 2020-12 validator of the OpenAPI document's ``model`` (Open API 3.1 uses that dialect)."""
    document = schema.raw_schema
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{model}",
                                               "components": document["components"]})


@pytest.mark.parametrize(("label", "name"), KNOWN, ids=[label for label, _ in KNOWN])
def test_generated_requests_on_what_the_catalog_holds_answer_as_documented(served, label, name) -> None:
    """The same checks on valid requests that name the catalog's job or items, or a source a job can start on (in the
    roots, or S3 on a closed port: a job that fails at once): answers that are not 404 or 422."""
    operation = served.schema.find_operation_by_label(label)
    assert operation is not None, label
    values = {"job_id": [served.job_id], "item_id": served.item_ids, "source": served.sources}[name]
    checks = CHECKS
    own = None
    if label in OWN_SCHEMA_CHECK:
        checks = [check for check in CHECKS if check is not response_schema_conformance]
        own = _validator(served.schema, OWN_SCHEMA_CHECK[label])
    statuses: list[int] = []

    @settings(FUZZ, max_examples=25)
    @given(case=operation.as_strategy(), value=st.sampled_from(values))
    def call(case: schemathesis.Case, value: str) -> None:
        if case.path_parameters and name in case.path_parameters:
            # percent-encoded: schemathesis puts a path parameter in the URL as it is, and file:/// loses a slash
            case.path_parameters = {**case.path_parameters, name: quote(value, safe="")}
        else:
            case.body = {**case.body, name: value}
        response = case.call_and_validate(checks=checks)
        if own is not None and response.status_code == 200:
            own.validate(response.json())
        statuses.append(response.status_code)

    call()
    assert set(statuses) - {404, 422}, f"no request reached {label}'s work: {statuses}"
