"""The request's session is its unit of work (api/deps.py `get_db`): a write request is committed
in one place, after its route returned; routers and services never commit. A commit that fails
there is answered in the error envelope with nothing written and nothing sent, and two requests
racing with one `Idempotency-Key` still create one job and send one message."""

from __future__ import annotations

import ast
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from core.webhooks import install_outbox
from tests.conftest import bearer, preference_rows, stored_objects

JOBS = "/v1/fine_tuning/jobs"
API = Path(__file__).resolve().parents[2] / "api"


@pytest.fixture
def training_file(upload, user_key, base_model) -> str:
    return upload(user_key, preference_rows(10))["id"]


def test_only_the_request_session_commits():
    """No `.commit()` call anywhere in api/ but the one in api/deps.py."""
    calls = []
    for path in sorted(API.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "commit"):
                calls.append(f"{path.relative_to(API.parent)}:{node.lineno}")
    assert [c.split(":")[0] for c in calls] == ["api/deps.py"], calls


class _CommitFails(Session):
    """A session whose COMMIT is lost (the database went away at that moment)."""

    def commit(self) -> None:
        raise sa_exc.OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))


@pytest.fixture
def commit_fails(client):
    services = client.app.state.services
    working = services.session_factory
    services.session_factory = install_outbox(sessionmaker(bind=working.kw["bind"], class_=_CommitFails,
                                                           expire_on_commit=False))
    yield
    services.session_factory = working


def test_a_failed_commit_is_a_503_with_nothing_written_or_sent(client, user_key, training_file, count_rows,
                                                              redis_client, settings, commit_fails):
    before = count_rows()
    r = client.post(JOBS, headers=bearer(user_key), json={"model": "tiny-base", "training_file": training_file})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "database_unavailable"
    assert count_rows() == before and redis_client.llen(settings.light_queue) == 0


def test_a_failed_commit_of_an_upload_deletes_the_stored_object(client, user_key, count_rows, settings,
                                                                commit_fails):
    before = count_rows()
    r = client.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                    files={"file": ("p.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
                                    "application/jsonl")})
    assert r.status_code == 503, r.text
    assert count_rows() == before and stored_objects(settings) == []


def test_one_idempotency_key_raced_by_four_requests_makes_one_job(make_client, user_key, training_file,
                                                                  count_rows, redis_client, settings):
    client = make_client()
    body = {"model": "tiny-base", "training_file": training_file, "seed": 5}
    headers = {**bearer(user_key), "Idempotency-Key": "race-1"}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: client.post(JOBS, headers=headers, json=body), range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count_rows()["jobs"] == 1 and redis_client.llen(settings.light_queue) == 1
