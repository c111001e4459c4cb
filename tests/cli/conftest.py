"""CLI tests: the e2e service on a Redis database of its own, and the webhook receiver."""

from __future__ import annotations

import pytest

from tests.webhooks.conftest import receiver, started_service, tiny_model  # noqa: F401  (fixtures)

CLI_REDIS_DB = 11


@pytest.fixture
def service(tmp_path, postgres_server_url, redis_url, tiny_model):  # noqa: F811
    yield from started_service(tmp_path, postgres_server_url, redis_url, tiny_model, CLI_REDIS_DB,
                               {"SDPO_WEBHOOK_DISPATCH_SECONDS": "0.5"})
