"""worker/tracking.py against real Postgres, a real MLflow store and real W&B offline runs (#18):
what a job recorded (steps, checkpoints, metrics events) is what the trackers get, written once;
a tracker that fails is a warn event and never an exception; a job-supplied MLflow URI is checked
against DNS and never sent the worker's MLflow credentials. (The whole path through the API, a
Celery worker and an `mlflow server`: tests/e2e/test_tracking.py, slow.)"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from core import ids
from core.jobs.events import record_engine_event
from core.models import Event, Job, JobStep
from tests.api.factories import checkpoint_row, file_row, job_row
from tests.wandb_offline import wandb_run
from worker import tracking

LOSSES = {1: {1: 0.6931, 2: 0.61, 3: 0.55}, 2: {1: 0.6931, 2: 0.66}}
# A step's drift from the base (sdpo_engine/drift.py's keys), as the step's metrics hold it.
DRIFT = {k: {"pairs": 4, "chosen_logratio": -0.5 * k, "rejected_logratio": -1.5 * k,
             "chosen_logratio_per_token": -0.05 * k, "rejected_logratio_per_token": -0.125 * k,
             "reward_margin": 0.1 * k, "max_abs_per_token": 0.125 * k, "base_preference_accuracy": 0.75}
         for k in (1, 2)}


@pytest.fixture
def worker_db(monkeypatch, settings):
    """worker.db's sessions on the test database (the worker reads its settings from the environment)."""
    import worker.db

    monkeypatch.setattr(worker.db, "get_settings", lambda: settings)
    worker.db.reset()
    yield
    worker.db.reset()


@pytest.fixture
def make_job(db, clean_state, base_model, worker_db):
    """A running 2-step job with `integrations` whose steps succeed when `succeed(k)` is called."""

    def make(integrations: list[dict]) -> tuple[Job, callable]:
        job = job_row(db, "alice", file_row(db, "alice").id, status="running", n_steps=2)
        job.integrations = integrations
        job.hyperparameters = {"beta": 0.1, "learning_rate": 1e-3}
        db.commit()

        def succeed(k: int) -> None:
            step = db.scalars(select(JobStep).where(JobStep.job_id == job.id, JobStep.index == k)).one()
            for g, loss in LOSSES[k].items():
                record_engine_event(db, job.id, k, 1, 0, {"event": "metrics", "step": k, "global_step": g,
                                                          "max_steps": len(LOSSES[k]), "loss": loss,
                                                          "grad_norm": 1.5}, event_id=ids.new_id(ids.EVENT))
            output = checkpoint_row(db, job, k)
            output.sha256 = f"{k}" * 64
            previous = db.scalars(select(JobStep).where(JobStep.job_id == job.id, JobStep.index == k - 1)).first()
            step.reference_checkpoint_id = step.policy_init_checkpoint_id = (
                previous.output_checkpoint_id if previous else None)
            step.output_checkpoint_id, step.status = output.id, "succeeded"
            step.hyperparameters = {"beta": 0.1 * k, "learning_rate": 1e-3, "seed": 0}
            step.metrics = {"first_loss": LOSSES[k][1], "last_loss": LOSSES[k][max(LOSSES[k])],
                            "eval": {"pairs": 4, "reward_accuracy": 0.25 * k}, "drift": DRIFT[k]}
            if k == 2:
                job.status, job.fine_tuned_model = "succeeded", f"ft:tiny-base:alice::{job.id}"
            db.commit()

        return job, succeed

    return make


def _warnings(db, job_id: str) -> list[Event]:
    db.expire_all()
    return [e for e in db.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq))
            if e.level == "warn"]


def test_steps_and_the_end_reach_mlflow_and_wandb_once(make_job, settings, tmp_path, db):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a real MLflow store, no server: the e2e test has one
    settings = settings.model_copy(update={"mlflow_tracking_uri": store})
    job, succeed = make_job([{"type": "wandb", "wandb": {"project": "p", "entity": None, "name": None,
                                                         "tags": ["t"]}},
                             {"type": "mlflow", "mlflow": {"tracking_uri": None, "experiment_name": None,
                                                           "run_name": None}}])
    succeed(1)
    tracking.step_succeeded(job.id, 1, settings)
    history, config, summary = wandb_run(tracking.wandb_dir(settings, job.id))
    assert {r["global_step"]: r["train/loss"] for r in history} == LOSSES[1] and "final_checkpoint" not in summary
    succeed(2)
    tracking.step_succeeded(job.id, 2, settings)
    tracking.job_ended(job.id, settings)
    tracking.job_ended(job.id, settings)  # again (a redelivered finalize): nothing is written twice
    assert _warnings(db, job.id) == []

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("sdpo").experiment_id])
    [parent] = [r for r in runs if r.data.tags["sdpo.kind"] == "job"]
    steps = {int(r.data.tags["sdpo.step"]): r for r in runs if r.data.tags["sdpo.kind"] == "step"}
    assert len(runs) == 3 and parent.info.run_name == job.id and parent.info.status == "FINISHED"
    assert parent.data.tags["sdpo.final_checkpoint_sha256"] == "2" * 64
    assert parent.data.params["hp.beta"] == "0.1" and parent.data.params["n_steps"] == "2"
    for k, run in steps.items():
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert {m.step: m.value for m in losses} == LOSSES[k]
        assert run.data.params["beta"] == str(0.1 * k)
        assert run.data.tags["sdpo.output_sha256"] == f"{k}" * 64
        assert run.data.metrics["eval/reward_accuracy"] == 0.25 * k
        assert {k_[len("drift/"):]: v for k_, v in run.data.metrics.items() if k_.startswith("drift/")} == DRIFT[k]
    assert steps[2].data.tags["sdpo.reference_checkpoint"] == steps[1].data.tags["sdpo.output_checkpoint"]
    assert steps[2].data.tags["sdpo.reference_sha256"] == "1" * 64
    assert steps[1].data.tags["sdpo.reference_model"] == "tiny-base"
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "eval/reward_accuracy")] \
        == [(1, 0.25), (2, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "drift/max_abs_per_token")] \
        == [(1, 0.125), (2, 0.25)]  # the gate's max_drift quantity, by sDPO step

    history, config, summary = wandb_run(tracking.wandb_dir(settings, job.id))
    rows = {(r["sdpo_step"], r["global_step"]): r["train/loss"] for r in history}
    assert rows == {(k, g): v for k, losses in LOSSES.items() for g, v in losses.items()}
    assert [r["_step"] for r in history] == [1, 2, 3, 4, 5]  # the optimizer step across the job
    assert config["steps"]["2"]["reference_sha256"] == "1" * 64 and config["hp.beta"] == 0.1
    assert summary["final_checkpoint_sha256"] == "2" * 64 and summary["fine_tuned_model"] == job.fine_tuned_model
    assert [(r["sdpo_step"], r["drift/chosen_logratio"]) for r in history if "drift/chosen_logratio" in r] \
        == [(1, -0.5), (2, -1.0)]
    assert len(list(tracking.wandb_dir(settings, job.id).parent.iterdir())) == 1  # no staging folder left


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An HTTP server that records each request's Authorization header and answers 503."""

    seen: list[str | None] = []

    def _answer(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_failing_trackers_are_warnings_and_user_uris_get_no_host_credentials(make_job, settings, db, recorder,
                                                                             monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "host-secret")
    blocked_file = tmp_path / "not-a-folder"
    blocked_file.write_text("")
    # The user's URI is on loopback, allowed by the admin so that the request is really made.
    allowed = settings.model_copy(update={"webhook_allowed_private_networks": ["127.0.0.1"],
                                          "storage_dir": blocked_file})
    job, succeed = make_job([{"type": "wandb", "wandb": {"project": "p", "entity": None, "name": None,
                                                         "tags": None}},
                             {"type": "mlflow", "mlflow": {"tracking_uri": recorder, "experiment_name": None,
                                                           "run_name": None}}])
    succeed(1)
    tracking.step_succeeded(job.id, 1, allowed)  # returns: nothing raised
    assert _Recorder.seen and set(_Recorder.seen) == {None}  # called, without the host's token
    warnings = _warnings(db, job.id)
    assert [(w.step_index, w.data["integration"]) for w in warnings] == [(1, "wandb"), (1, "mlflow")]
    assert all("training goes on" in w.message and str(tmp_path) not in w.message for w in warnings)

    # The same server as the admin's default: trusted, so the host's credentials go to it.
    _Recorder.seen = []
    trusted = allowed.model_copy(update={"mlflow_tracking_uri": recorder})
    with pytest.raises(MlflowException):  # the recorder answers 503 to everything
        tracking.write_mlflow(tracking.read_job(db, job.id), {"tracking_uri": None}, trusted)
    assert _Recorder.seen[0] == "Bearer host-secret"

    # Without the admin's allowance the loopback address is refused before any request.
    _Recorder.seen = []
    tracking.step_succeeded(job.id, 1, settings.model_copy(update={"storage_dir": tmp_path / "s"}))
    assert _Recorder.seen == []
    assert _warnings(db, job.id)[-1].data["error"].startswith("BlockedAddress")


def test_a_job_without_integrations_is_not_read_further(make_job, settings, db):
    job, succeed = make_job([])
    succeed(1)
    tracking.step_succeeded(job.id, 1, settings)
    assert not tracking.wandb_dir(settings, job.id).exists() and _warnings(db, job.id) == []
    assert tracking.read_job(db, job.id) is None


def test_check_tracking_address_resolves_names(settings):
    from core.netguard import BlockedAddress

    with pytest.raises(BlockedAddress):
        tracking.check_tracking_address("http://localhost:5000", settings)  # a name that resolves to loopback
    with pytest.raises(ValueError):
        tracking.check_tracking_address("file:///etc/passwd", settings)
    assert socket.gethostbyname("localhost").startswith("127.")


def test_a_failed_job_closes_its_runs_as_failed_and_a_running_one_is_left_alone(make_job, settings, tmp_path, db):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = settings.model_copy(update={"mlflow_tracking_uri": store})
    job, succeed = make_job([{"type": "mlflow", "mlflow": {"tracking_uri": None, "experiment_name": "e",
                                                           "run_name": "r"}}])
    succeed(1)
    tracking.job_ended(job.id, settings)  # still running: not an end
    client = MlflowClient(tracking_uri=store)
    assert client.get_experiment_by_name("e") is None

    db.get(Job, job.id).status = "failed"
    db.commit()
    tracking.job_ended(job.id, settings)
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    [parent] = [r for r in runs if r.data.tags["sdpo.kind"] == "job"]
    assert (parent.info.status, parent.data.tags["sdpo.status"]) == ("FAILED", "failed")
    assert "sdpo.final_checkpoint" not in parent.data.tags
    assert [r.data.tags["sdpo.step"] for r in runs if r.data.tags["sdpo.kind"] == "step"] == ["1"]


def _mlflow_job(make_job, tmp_path, settings):
    """A running 2-step job tracked to a real MLflow store (SQLite); (job, succeed, settings, client)."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = settings.model_copy(update={"mlflow_tracking_uri": store})
    job, succeed = make_job([{"type": "mlflow", "mlflow": {"tracking_uri": None, "experiment_name": "e",
                                                           "run_name": None}}])
    return job, succeed, settings, MlflowClient(tracking_uri=store)


def _job_runs(client, job_id: str) -> tuple[list, list]:
    """(the job's parent runs, its step runs) in experiment `e`."""
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id],
                              filter_string=f"tags.`sdpo.job_id` = '{job_id}'")
    return ([r for r in runs if r.data.tags["sdpo.kind"] == "job"],
            [r for r in runs if r.data.tags["sdpo.kind"] == "step"])


def test_a_job_cancelled_between_steps_gets_its_run_killed_by_the_cancels_task(make_job, settings, tmp_path, db,
                                                                               monkeypatch, redis_client):
    from core.celery_config import JOB_ENDED
    from core.jobs import lifecycle
    from core.queue import make_celery
    from tests.conftest import queued_messages
    from worker import flows

    job, succeed, settings, client = _mlflow_job(make_job, tmp_path, settings)
    succeed(1)
    tracking.step_succeeded(job.id, 1, settings)
    [parent], _ = _job_runs(client, job.id)
    assert parent.info.status == "RUNNING"

    # The user cancels while step 2 waits for a worker: no worker's step sees it, the cancel's task must.
    lifecycle.cancel_job(db, db.get(Job, job.id), make_celery(settings))
    db.commit()
    [message] = [m for m in queued_messages(redis_client, settings.light_queue)
                 if m["headers"]["task"] == JOB_ENDED]
    assert message["headers"]["argsrepr"] == repr((job.id,))
    monkeypatch.setattr(tracking, "get_settings", lambda: settings)  # the worker's settings, as the task reads them
    flows.end_job(job.id, settings=settings)  # what the light worker runs for that message (worker.tasks)
    flows.end_job(job.id, settings=settings)  # and a redelivery: the end time stays
    [parent], [step] = _job_runs(client, job.id)
    assert (parent.info.status, parent.data.tags["sdpo.status"]) == ("KILLED", "cancelled")
    assert step.data.tags["sdpo.step"] == "1" and step.info.status == "FINISHED"
    assert parent.info.end_time is not None and _warnings(db, job.id) == []


def test_two_end_calls_for_one_job_take_turns_and_create_one_parent_run(make_job, settings, tmp_path, db,
                                                                       db_engine):
    """A cancel's task and the worker that stopped the running step both end the job; on Postgres
    the second waits for the first, so it finds the first's parent run instead of creating one."""
    from sqlalchemy import text

    job, succeed, settings, client = _mlflow_job(make_job, tmp_path, settings)
    db.get(Job, job.id).status = "cancelled"  # cancelled during step 1: no run of the job exists yet
    db.commit()
    with db_engine.connect() as other:  # another tracking call of this job, holding its turn
        other.execute(text("SELECT pg_advisory_lock(hashtextextended(:key, 0))"), {"key": f"tracking:{job.id}"})
        waiting = threading.Thread(target=tracking.job_ended, args=(job.id, settings))
        waiting.start()
        waiting.join(1.5)
        assert waiting.is_alive() and client.get_experiment_by_name("e") is None  # it waits its turn
        other.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), {"key": f"tracking:{job.id}"})
        other.commit()
    waiting.join(60)
    assert not waiting.is_alive()
    tracking.job_ended(job.id, settings)  # the other caller, after it
    [parent], steps = _job_runs(client, job.id)
    assert (parent.info.status, steps) == ("KILLED", [])
