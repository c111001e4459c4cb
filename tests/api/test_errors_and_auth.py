"""The error envelope everywhere, and bearer-key authentication."""

from __future__ import annotations

import api.jobs.service
from core.db import session_scope
from core.keys import create_api_key, revoke_key
from tests.conftest import bearer


def _is_envelope(body: dict) -> bool:
    return set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])


def test_missing_wrong_and_revoked_keys_are_401(client, session_factory):
    with session_scope(session_factory) as session:
        row, revoked = create_api_key(session, name="temp", owner="carol")
        key_id = row.id
    assert client.get("/v1/files", headers=bearer(revoked)).status_code == 200
    with session_scope(session_factory) as session:
        revoke_key(session, key_id)
    for headers in ({}, {"Authorization": "Basic abc"}, bearer("sk-sdpo-nope"), bearer(revoked)):
        response = client.get("/v1/files", headers=headers)
        assert response.status_code == 401, headers
        assert _is_envelope(response.json()) and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    # The key is never echoed back.
    assert revoked not in client.get("/v1/files", headers=bearer(revoked)).text


def test_unknown_route_and_wrong_method(client, user_key):
    response = client.get("/v1/nothing", headers=bearer(user_key))
    assert response.status_code == 404 and _is_envelope(response.json())
    response = client.put("/v1/files", headers=bearer(user_key))
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_a_bug_is_a_500_envelope_without_internals(client, user_key, monkeypatch):
    def explode(*_args, **_kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(api.jobs.service, "list_jobs", explode)
    response = client.get("/v1/fine_tuning/jobs", headers=bearer(user_key))
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text


def test_bad_idempotency_key(client, user_key):
    response = client.post("/v1/fine_tuning/jobs", headers={**bearer(user_key), "Idempotency-Key": "k" * 256},
                           json={"model": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"


def test_an_oversized_json_body_is_413(client, user_key, count_rows):
    before = count_rows()
    body = b'{"model": "x", "metadata": {"k": "' + b"v" * (2 << 20) + b'"}}'
    response = client.post("/v1/fine_tuning/jobs", headers={**bearer(user_key), "Content-Type": "application/json"},
                           content=body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert count_rows() == before
