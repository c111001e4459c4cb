"""Schemathesis against the OpenAPI schema: generated requests to every operation (valid ones and,
in its coverage phase, edge cases of each parameter) never get a 5xx, and every response that
the schema documents matches it.

Runs in-process against the ASGI app with a normal user's key and a bounded number of examples
per operation (SDPO_FUZZ_EXAMPLES, default 25), so it finishes in a couple of minutes on two
cores; CI runs it with the slow tests (`python -m pytest -m slow`).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import bearer

EXAMPLES = int(os.environ.get("SDPO_FUZZ_EXAMPLES", "25"))

pytestmark = pytest.mark.slow


@pytest.fixture
def api_schema(clean_state, settings_for_fuzz):
    from api.main import create_app

    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_for_fuzz))


@pytest.fixture
def settings_for_fuzz(settings, tmp_path):
    # Small limits: a generated upload is refused quickly whatever its size.
    return settings.model_copy(update={"max_upload_bytes": 64 * 1024, "max_line_bytes": 8 * 1024})


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_responses_match_the_schema(case, user_key, base_model):
    case.call_and_validate(headers=bearer(user_key), checks=[not_a_server_error, response_schema_conformance])
