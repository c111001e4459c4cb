"""Authentication everywhere, keys kept only as hashes and compared in constant time, revoked keys
refused, and no key in any log line."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest
from sqlalchemy import text

from core import keys as core_keys
from core.db import session_scope
from core.keys import create_api_key, revoke_key
from tests.conftest import bearer, jsonl_bytes, preference_rows

# Reachable without a key, by design: probes and the API's description.
PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"}


def _operations(client) -> list[tuple[str, str]]:
    schema = client.get("/openapi.json").json()
    out = []
    for path, operations in schema["paths"].items():
        for method in operations:
            if method in ("get", "post", "delete", "put", "patch"):
                out.append((method.upper(), re.sub(r"\{[^}]+\}", "x-123", path)))
    return out


def test_every_v1_operation_needs_a_valid_unrevoked_key(client, session_factory, count_rows):
    with session_scope(session_factory) as session:
        row, revoked = create_api_key(session, name="gone", owner="dave")
        revoke_key(session, row.id)
    operations = [(m, p) for m, p in _operations(client) if p.startswith("/v1/")]
    assert len(operations) >= 16
    before = count_rows()
    for method, path in operations:
        for headers in ({}, bearer("sk-sdpo-wrong"), bearer(revoked), {"Authorization": f"Basic {revoked}"}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert revoked not in response.text
    assert count_rows() == before


def test_only_probes_and_docs_answer_without_a_key(client):
    for method, path in _operations(client):
        if path.startswith("/v1/") or path == "/metrics":
            continue  # /v1: above; /metrics: the operator's scrape endpoint (see its own tests)
        assert path in PUBLIC, f"{method} {path} answers without a key: add auth or list it as public"
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_keys_are_stored_only_as_hashes(db, session_factory, settings, admin_key, user_key):
    with session_scope(session_factory) as session:
        _row, plaintext = create_api_key(session, name="eve", owner="eve")
    dump = " ".join(str(v) for row in db.execute(text("SELECT * FROM api_keys")).all() for v in row)
    for key in (plaintext, user_key, admin_key):
        assert key not in dump
        assert hashlib.sha256(key.encode()).hexdigest() in dump


def test_the_key_check_is_constant_time(client, user_key, monkeypatch):
    compared = []
    real = core_keys.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(core_keys.hmac, "compare_digest", spy)
    assert client.get("/v1/files", headers=bearer(user_key)).status_code == 200
    assert compared == [(hashlib.sha256(user_key.encode()).hexdigest(),) * 2]


def test_no_key_or_secret_reaches_the_logs(make_client, settings, user_key, base_model, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client()  # the lifespan registers SDPO_ADMIN_KEY
    admin = settings.admin_key
    upload = client.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                         files={"file": ("a.jsonl", jsonl_bytes(preference_rows(3)), "application/jsonl")})
    assert upload.status_code == 200
    assert client.post("/v1/fine_tuning/jobs", headers=bearer(user_key),
                       json={"model": "tiny-base", "training_file": upload.json()["id"]}).status_code == 200
    assert client.get("/v1/models", headers=bearer(admin)).status_code == 200
    for wrong in ("sk-sdpo-not-a-key", admin + "x"):
        assert client.get("/v1/files", headers=bearer(wrong)).status_code == 401
    text_logged = "\n".join(f"{r.getMessage()} {r.args!r} {getattr(r, '__dict__', {})!r}" for r in caplog.records)
    for secret in (admin, user_key, "sk-sdpo-not-a-key", hashlib.sha256(user_key.encode()).hexdigest()):
        assert secret not in text_logged


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "bearer  ", "Token abc", "Bearer a b"])
def test_malformed_authorization_headers_are_401(client, header):
    response = client.get("/v1/files", headers={"Authorization": header})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
