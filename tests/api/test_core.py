"""core's building blocks: the state machine, storage, settings, and the `sdpo keys` command."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.errors import InvalidTransition
from core.keys import find_active_key, hash_key
from core.models import ApiKey
from core.settings import Settings
from core.states import (
    JOB_TRANSITIONS,
    STEP_TRANSITIONS,
    JobStatus,
    StepStatus,
    can_transition,
    sources,
    transition,
)
from sdpo_cli.main import main as sdpo

# ------------------------------------------------------------------------------------------------
# State machine


@pytest.mark.parametrize(("old", "new"), [
    ("validating_files", "queued"), ("queued", "running"), ("running", "pausing"), ("pausing", "paused"),
    ("paused", "queued"), ("running", "succeeded"), ("queued", "cancelled"), ("pausing", "cancelled"),
])
def test_allowed_job_edges(old, new):
    job = SimpleNamespace(status=old, started_at=None, finished_at=None, updated_at=None)
    transition(job, JobStatus(new))
    assert job.status == new and job.updated_at is not None
    assert (job.finished_at is not None) == (new in ("succeeded", "failed", "cancelled"))
    assert (job.started_at is not None) == (new == "running")


@pytest.mark.parametrize(("old", "new"), [
    ("succeeded", "running"), ("cancelled", "queued"), ("failed", "cancelled"), ("queued", "succeeded"),
    ("paused", "succeeded"), ("queued", "queued"), ("validating_files", "running"),
])
def test_forbidden_job_edges_raise(old, new):
    job = SimpleNamespace(status=old)
    with pytest.raises(InvalidTransition):
        transition(job, JobStatus(new))
    assert job.status == old


def test_step_edges():
    step = SimpleNamespace(status="pending", started_at=None, finished_at=None)
    for new in ("queued", "running", "queued", "running", "succeeded"):  # a requeue in the middle
        transition(step, StepStatus(new))
    with pytest.raises(InvalidTransition):
        transition(step, StepStatus.RUNNING)
    assert not can_transition("pending", StepStatus.RUNNING)
    assert sources(StepStatus.RUNNING) == {StepStatus.QUEUED}


def test_tables_cover_every_status_and_transition_needs_an_enum():
    assert set(JOB_TRANSITIONS) == set(JobStatus) and set(STEP_TRANSITIONS) == set(StepStatus)
    with pytest.raises(TypeError):
        transition(SimpleNamespace(status="queued"), "running")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Storage


# The storage contract (local folder and S3): tests/storage/test_contract.py


# ------------------------------------------------------------------------------------------------
# Settings


def test_settings_defaults_derive_from_home(tmp_path, monkeypatch):
    for name in ("SDPO_DATABASE_URL", "SDPO_BROKER_URL", "SDPO_STORAGE_DIR", "SDPO_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SDPO_MODEL_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    settings = Settings(home=tmp_path / "h")
    assert settings.database_url == f"sqlite:///{tmp_path}/h/sdpo.db"
    assert settings.broker_url == f"sqla+sqlite:////{str(tmp_path).lstrip('/')}/h/broker.db"  # 4 slashes
    assert settings.storage_dir == tmp_path / "h" / "storage"
    assert settings.model_roots == [tmp_path / "a", tmp_path / "b"]
    assert (settings.light_queue, settings.train_queue) == ("sdpo.light", "sdpo.train")


def test_production_refuses_a_missing_or_short_admin_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SDPO_ADMIN_KEY", raising=False)
    with pytest.raises(ValueError, match="SDPO_ADMIN_KEY"):
        Settings(home=tmp_path, environment="production")
    with pytest.raises(ValueError, match="at least"):
        Settings(home=tmp_path, environment="production", admin_key="short")
    assert Settings(home=tmp_path, environment="production", admin_key="k" * 40).admin_key


# ------------------------------------------------------------------------------------------------
# sdpo keys


@pytest.fixture
def cli_settings(monkeypatch, database_url):
    from core.settings import get_settings

    monkeypatch.setenv("SDPO_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_keys_create_list_revoke(cli_settings, capsys, db, client):
    assert sdpo(["keys", "create", "--name", "ci-bot", "--owner", "team-x"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-sdpo-") and len(key) > 40
    row = db.query(ApiKey).filter_by(key_hash=hash_key(key)).one()
    assert row.owner == "team-x" and not row.is_admin
    assert db.query(ApiKey).filter(ApiKey.key_hash == key).count() == 0  # only the hash is stored
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    assert sdpo(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert row.id in listing and key not in listing

    assert sdpo(["keys", "revoke", row.id]) == 0
    db.expire_all()
    assert find_active_key(db, key) is None
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert sdpo(["keys", "create", "--name", "bad owner!"]) == 2  # owners are plain names
