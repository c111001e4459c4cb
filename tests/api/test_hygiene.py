"""Input hygiene wherever a user's text enters (issue #20, kind 6):

- malformed Unicode in a JSON body (a lone surrogate escape, invalid UTF-8, UTF-8-encoded
  surrogates) is a 400 in the error envelope on every JSON endpoint, never a 500, and nothing is
  written; malformed percent-encodings in paths and queries are never a 500 either;
- names users give (file names, job suffixes, webhook descriptions, key names) lose Unicode control
  and format characters (Cc, Cf: escapes, direction overrides, zero-width characters); a name
  with nothing visible left is refused;
- /metrics label values come from fixed sets: garbage methods, paths and statuses go under `other`.
"""

from __future__ import annotations

import re
import secrets

import pytest

from core.db import session_scope
from core.errors import InvalidRequest
from core.keys import create_api_key
from core.text import clean_name
from tests.conftest import bearer, jsonl_bytes, preference_rows

BAD_BODIES = {
    "lone surrogate escape": b'{"model": "\\ud800", "url": "\\udfff x", "id": "a\\ud83d"}',
    "surrogate as a key": b'{"\\udc00": 1}',
    "invalid utf-8": b'{"model": "\xff\xfe caf\xe9"}',
    "utf-8-encoded surrogate": b'{"model": "\xed\xa0\x80"}',
    "truncated utf-8": b'{"model": "\xe2\x82"}',
}


def json_endpoints(app) -> list[tuple[str, str]]:
    """(method, path with ids filled in) of every operation whose documented body is JSON."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                found.append((method.upper(), re.sub(r"\{[^}]+\}", "x-unknown", path)))
    return found


def test_malformed_unicode_in_json_bodies_is_a_400_everywhere(client, admin_key, count_rows):
    endpoints = json_endpoints(client.app)
    assert {("POST", "/v1/fine_tuning/jobs"), ("POST", "/v1/models"), ("POST", "/v1/webhooks")} <= set(endpoints)
    before = count_rows()
    for method, path in endpoints:
        for name, body in BAD_BODIES.items():
            response = client.request(method, path, content=body,
                                      headers={**bearer(admin_key), "Content-Type": "application/json"})
            assert response.status_code == 400, (method, path, name, response.status_code, response.text)
            error = response.json()["error"]
            assert error["code"] in ("invalid_json", "invalid_value"), (path, name, error)
            assert set(error) >= {"message", "type", "param", "code"}
    assert count_rows() == before


@pytest.mark.parametrize("target", [
    "/v1/files/%ed%a0%80", "/v1/files/%ff%fe/content", "/v1/fine_tuning/jobs/%c3%28",
    "/v1/fine_tuning/jobs?after=%ed%a0%80", "/v1/fine_tuning/jobs?metadata[%ff]=%ed%a0%80",
    "/v1/files?after=%ff&purpose=%ed%b0%80", "/v1/models/%e2%80%ae", "/v1/webhooks/%ff",
    "/v1/fine_tuning/jobs/x/events?stream=true&after=%ff",
])
def test_malformed_percent_encodings_are_never_a_500(client, user_key, target):
    response = client.get(target, headers=bearer(user_key))
    assert response.status_code < 500, (target, response.status_code, response.text)


def test_clean_name():
    assert clean_name(" report\u202egpj.exe \t") == "reportgpj.exe"
    assert clean_name("a\u200bb\u2066c\u2069\ufeff\u00ad d\x1b[0m\x7f\x85") == "abc d[0m"
    assert clean_name("line\u2028break\u2029") == "linebreak"
    assert clean_name("\ud800x") == "x"
    # Ordinary text, spaces inside and scripts included, is kept as it is.
    assert clean_name("données d'été 2024 — 東京 (v2).jsonl") == "données d'été 2024 — 東京 (v2).jsonl"
    assert clean_name("\u200b\u202e\n") == ""


def test_uploaded_file_names_lose_control_and_format_characters(client, user_key):
    name = "pairs\u202elsnoj\u200b.\x1bjsonl"
    response = client.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                           files={"file": (name, jsonl_bytes(preference_rows(4)), "application/jsonl")})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "pairslsnoj.jsonl"
    listed = client.get("/v1/files", headers=bearer(user_key)).json()["data"]
    assert [f["filename"] for f in listed] == ["pairslsnoj.jsonl"]


def test_job_suffix_loses_control_and_format_characters(client, upload, user_key, base_model, count_rows):
    file_id = upload(user_key, preference_rows(6))["id"]
    job = {"model": "tiny-base", "training_file": file_id}
    response = client.post("/v1/fine_tuning/jobs", headers=bearer(user_key), json={**job, "suffix": "v1\u202e\u200b"})
    assert response.status_code == 200, response.text
    assert response.json()["user_provided_suffix"] == "v1"
    before = count_rows()
    for invisible in ("\u202e", "\u200b\u2060", "\n\t"):
        refused = client.post("/v1/fine_tuning/jobs", headers=bearer(user_key), json={**job, "suffix": invisible})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "suffix"
    assert count_rows() == before


def test_webhook_description_loses_control_and_format_characters(client, user_key):
    body = {"url": "https://93.184.215.14/hook", "description": "deploys\u202e to prod\x07"}
    response = client.post("/v1/webhooks", headers=bearer(user_key), json=body)
    assert response.status_code == 200, response.text
    assert response.json()["description"] == "deploys to prod"
    refused = client.post("/v1/webhooks", headers=bearer(user_key), json={**body, "description": "\u2066\u2069"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "description"


def test_key_names_and_owners(session_factory):
    with session_scope(session_factory) as s:
        row, _ = create_api_key(s, name="ci\u202e-runner\x1b", owner=f"o-{secrets.token_hex(3)}")
        assert row.name == "ci-runner"
    with session_factory() as s:
        with pytest.raises(InvalidRequest):
            create_api_key(s, name="\u200b", owner="someone")
        with pytest.raises(InvalidRequest):  # a trailing newline used to pass the owner's pattern
            create_api_key(s, name="x", owner="alice\n")


def _series(text: str) -> set[tuple[str, str, str]]:
    found = set()
    for line in text.splitlines():
        if line.startswith("sdpo_http_requests_total{"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line))
            found.add((labels["method"], labels["route"], labels["status"]))
    return found


def test_metrics_labels_stay_in_fixed_sets(client, user_key):
    client.get("/v1/files", headers=bearer(user_key))
    before = _series(client.get("/metrics").text)
    # Unauthenticated garbage: made-up methods and paths, each different.
    tokens = []
    for _ in range(30):
        tokens += [secrets.token_hex(4).upper(), secrets.token_hex(8), secrets.token_hex(6)]
        client.request(f"X{tokens[-3]}", f"/v1/files/{tokens[-2]}")
        client.get(f"/nothing/{tokens[-2]}")
        client.request("PROPFIND", f"/{tokens[-1]}")
    after = _series(client.get("/metrics").text)
    templates = set(client.app.openapi()["paths"]) | {"other"}
    for method, route, status in after:
        assert method in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, method
        assert route in templates, route
        assert not any(token.lower() in route.lower() for token in tokens), route
        assert status == "other" or (status.isdigit() and 100 <= int(status) <= 599), status
    # 90 distinct garbage requests add a handful of series, not 90.
    assert len(after - before) <= 6, sorted(after - before)
    assert ("other", "other", "404") in after or ("other", "/v1/files/{file_id}", "405") in after
