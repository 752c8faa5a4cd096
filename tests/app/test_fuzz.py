"""Property-based fuzzing of the whole API from its OpenAPI schema (schemathesis), bounded for CI:
no 5xx, and every response matches the schema (status code, content type, body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from stack import make_stack

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """Embedded flavour only: the schema is the same on both, and fuzzing needs no worker."""
    stack, teardown = make_stack("embedded", tmp_path_factory.mktemp("fuzz"), [str(tiny_model_dir)],
                                 extra_env={"SBORA_GENERATE_MAX_NEW_TOKENS": "8"})
    yield stack
    teardown()


@pytest.fixture(scope="module")
def api_schema(client):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    # Invalid data must be refused; a body over SBORA_MAX_BODY_BYTES is refused before it is parsed,
    # with the 413 every route documents (the fuzzer sometimes builds one of hundreds of megabytes).
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]  # a new list: the default is shared
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.exclude(path_regex=r".*/events/stream$").parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_match_the_schema(case, alice):
    # Schema-valid requests may still be refused on meaning (an unknown dataset id, a file with
    # bad lines): that 422 is correct, so the "positive data accepted" check does not apply.
    excluded = [schemathesis.checks.positive_data_acceptance]
    if case.path == "/readyz":  # this stack runs no worker: "not ready" (a documented 503) is the right answer
        excluded.append(schemathesis.checks.not_a_server_error)
    case.call_and_validate(headers={**(case.headers or {}), **alice}, excluded_checks=excluded)
