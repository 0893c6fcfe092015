"""Fuzz the live admin API (TCP, bearer token) against its own OpenAPI document with schemathesis: for every
operation, generated (and schema-violating) requests never get a 5xx, and every answer conforms to the document
(status documented, content type, body schema, 401 when the token is left out).

Bounded: a few dozen examples per operation keep the whole module well under a minute."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway.admin import openapi_document
from tests.admin.conftest import ADMIN_TOKEN, LocalGateway

# The document as the code generates it; test_served_document_is_the_generated_one checks the server serves it.
schema = schemathesis.openapi.from_dict(openapi_document())

pytestmark = pytest.mark.gateway


@pytest.fixture(scope="module", autouse=True)
def all_credentials_servable(gw: LocalGateway) -> None:
    """GET /v1/ready answers 503 while a credential cannot be served (test_admin_api covers that): here every one
    can, so any 5xx the fuzzer finds is a bug."""
    secrets = gw.tmp / "secrets.yaml"
    secrets.write_text(secrets.read_text() + "local/missing: fuzz-secret-value-0000\n")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_admin_api_conforms_to_its_openapi_document(case: schemathesis.Case, gw: LocalGateway) -> None:
    excluded = []
    if case.operation.label == "PUT /v1/sandboxes/{id}":
        # A registration can match the schema and still be refused with 422 by design: it may name a policy that
        # the policy in force does not define, or a source that is not a CIDR, which only the gateway can judge.
        excluded.append(positive_data_acceptance)
    response = case.call_and_validate(
        base_url=gw.admin_url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        excluded_checks=excluded,
        timeout=10,
    )
    assert response.status_code < 500, response.text


def test_served_document_is_the_generated_one(gw: LocalGateway) -> None:
    with gw.tcp() as c:
        assert c.get("/v1/openapi.json").json() == openapi_document()
