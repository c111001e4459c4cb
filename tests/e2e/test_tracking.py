"""A job's integrations really track (#18): a real `mlflow server` on a free loopback port, the API
and a Celery worker in their own processes, a 2-step tiny sDPO job, then MLflow's own client and
the W&B offline run's own files read back every step's per-optimizer-step metrics and its lineage,
exactly as the job's events and steps say. A tracker that is down leaves a warning, and the job
still succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.wandb_offline import wandb_run

from .conftest import free_port, sample_files, sdpo_job, upload, wait_job

pytestmark = pytest.mark.slow  # two tiny jobs, a tracking server and W&B: about a minute on 2 cores


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """`mlflow server` with its backend store (SQLite) and artifacts under tmp_path; yields its URL."""
    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    log = open(root / "server.log", "ab")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner needed
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: uvicorn and its workers go with it
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _events(client: httpx.Client, job_id: str) -> list[dict]:
    events, after = [], None
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                          params={"limit": 100, **({"after": after} if after else {})}).json()
        events += page["data"]
        if not page["has_more"]:
            return events[::-1]  # oldest first
        after = page["data"][-1]["id"]


def _optimizer_losses(events: list[dict]) -> dict[int, dict[int, float]]:
    """{sdpo step: {global step: loss}} from the job's metrics events."""
    out: dict[int, dict[int, float]] = {}
    for e in events:
        if e["type"] == "metrics":
            out.setdefault(e["data"]["step"], {})[e["data"]["global_step"]] = e["data"]["loss"]
    return out


def _eventually(read, done, what: str, timeout: float = 90):
    """`read()` once `done(value)`: the job's end reaches its trackers just after the job shows
    succeeded (the worker writes them after recording it)."""
    deadline = time.time() + timeout
    while True:
        value = read()
        if done(value):
            return value
        assert time.time() < deadline, f"{what} not tracked after {timeout} s: {value}"
        time.sleep(0.5)


def test_mlflow_and_wandb_track_a_two_step_job(service, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    service.env["SDPO_MLFLOW_TRACKING_URI"] = mlflow_server
    service.start_api()
    service.start_worker("w1")
    client = service.client()
    train, held = sample_files(tmp_path)
    body = sdpo_job("sdpo-tiny", upload(client, train), upload(client, held))
    body["integrations"] = [{"type": "wandb", "wandb": {"project": "sdpo-e2e", "tags": ["e2e"]}},
                            {"type": "mlflow", "mlflow": {"experiment_name": "sdpo-e2e", "run_name": "two-steps"}}]
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    assert [i["type"] for i in r.json()["integrations"]] == ["wandb", "mlflow"]
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", service.logs()

    mlflow = MlflowClient(tracking_uri=mlflow_server)
    experiment = mlflow.get_experiment_by_name("sdpo-e2e")
    runs = _eventually(
        lambda: mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`sdpo.job_id` = '{job['id']}'"),
        lambda runs: any(r.data.tags["sdpo.kind"] == "job" and r.info.status == "FINISHED" for r in runs), "MLflow")
    run_dir = service.home / "storage" / "tracking" / "wandb" / job["id"]
    history, config, summary = _eventually(lambda: wandb_run(run_dir), lambda run: "fine_tuned_model" in run[2],
                                           "W&B")
    events = _events(client, job["id"])
    assert not [e for e in events if e["level"] == "warn" and (e["data"] or {}).get("integration")], events
    losses = _optimizer_losses(events)
    assert set(losses) == {1, 2} and all(len(v) >= 2 for v in losses.values())
    steps = {s["index"]: s for s in client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps").json()["data"]}
    sha = {c["id"]: c["sha256"] for c in client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]}
    final_checkpoint = steps[2]["output_checkpoint"]

    # MLflow, through its own client: one parent run, one nested run per step.
    [parent] = [r for r in runs if r.data.tags["sdpo.kind"] == "job"]
    children = {int(r.data.tags["sdpo.step"]): r for r in runs if r.data.tags["sdpo.kind"] == "step"}
    assert parent.info.run_name == "two-steps" and parent.info.status == "FINISHED"
    assert parent.data.params["n_steps"] == "2" and parent.data.params["model"] == "sdpo-tiny"
    assert parent.data.tags["sdpo.final_checkpoint"] == final_checkpoint
    assert parent.data.tags["sdpo.final_checkpoint_sha256"] == sha[final_checkpoint]
    assert parent.data.tags["sdpo.fine_tuned_model"] == job["fine_tuned_model"]
    assert set(children) == {1, 2}
    for k, run in children.items():
        tags, step = run.data.tags, steps[k]
        assert tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        loss_history = mlflow.get_metric_history(run.info.run_id, "loss")
        assert {m.step: m.value for m in loss_history} == losses[k]  # every optimizer step, as the events say
        assert run.data.params["beta"] == str(step["hyperparameters"]["beta"])
        assert tags["sdpo.output_checkpoint"] == step["output_checkpoint"]
        assert tags["sdpo.output_sha256"] == sha[step["output_checkpoint"]]
        assert run.data.metrics["step/first_loss"] == pytest.approx(step["metrics"]["first_loss"])
        assert run.data.metrics["eval/reward_accuracy"] == pytest.approx(step["metrics"]["eval"]["reward_accuracy"])
        drift = {k[len("drift/"):]: v for k, v in run.data.metrics.items() if k.startswith("drift/")}
        assert drift == pytest.approx(step["metrics"]["drift"])  # the held-out pairs' drift from the base
    assert "sdpo.reference_checkpoint" not in children[1].data.tags  # step 1's reference is the base model
    assert children[1].data.tags["sdpo.reference_model"] == "sdpo-tiny"
    assert children[2].data.tags["sdpo.reference_checkpoint"] == steps[1]["output_checkpoint"]  # sDPO's chain
    assert children[2].data.tags["sdpo.reference_sha256"] == sha[steps[1]["output_checkpoint"]]
    first_losses = mlflow.get_metric_history(parent.info.run_id, "step/first_loss")
    assert sorted(m.step for m in first_losses) == [1, 2]  # the sDPO step as the parent's step axis

    # W&B: one offline run for the job in the storage folder, holding the same numbers.
    tracked = {}
    for row in history:
        if "train/loss" in row:
            tracked.setdefault(row["sdpo_step"], {})[row["global_step"]] = row["train/loss"]
    assert tracked == {k: pytest.approx(v) for k, v in losses.items()}
    assert [row["_step"] for row in history] == sorted(row["_step"] for row in history)  # one axis across steps
    assert config["n_steps"] == 2 and config["job_id"] == job["id"]
    assert config["steps"]["2"]["reference_checkpoint"] == steps[1]["output_checkpoint"]
    assert config["steps"]["2"]["output_sha256"] == sha[final_checkpoint]
    assert summary["final_checkpoint_sha256"] == sha[final_checkpoint]
    assert summary["fine_tuned_model"] == job["fine_tuned_model"]
    evals = [row["eval/reward_accuracy"] for row in history if "eval/reward_accuracy" in row]
    assert evals == pytest.approx([steps[k]["metrics"]["eval"]["reward_accuracy"] for k in (1, 2)])


def test_a_tracker_that_is_down_warns_and_training_goes_on(service, tmp_path):
    closed = free_port()  # nothing listens here
    service.env["SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS"] = "127.0.0.1"  # so the job may name loopback at all
    service.start_api()
    service.start_worker("w1")
    client = service.client()
    train, _held = sample_files(tmp_path)
    body = sdpo_job("sdpo-tiny", upload(client, train))
    body["integrations"] = [{"type": "mlflow", "mlflow": {"tracking_uri": f"http://127.0.0.1:{closed}"}}]
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", service.logs()
    warnings = _eventually(lambda: [e for e in _events(client, job["id"])
                                    if (e["data"] or {}).get("integration") == "mlflow"],
                           lambda found: len(found) >= 3, "the job's end")
    assert [w["step"] for w in warnings] == [1, 2, None], warnings  # each step, then the job's end
    assert all(w["level"] == "warn" and "training goes on" in w["message"] for w in warnings)


def test_a_job_cancelled_while_queued_ends_its_mlflow_run_killed(service, mlflow_server, tmp_path):
    """No worker is running (so none runs a step of it) when the job is cancelled: the cancel's
    `sdpo.job_ended` task, taken by the worker once it starts, closes the job's run as KILLED."""
    from mlflow.tracking import MlflowClient

    service.env["SDPO_MLFLOW_TRACKING_URI"] = mlflow_server
    service.start_api()
    client = service.client()
    train, _held = sample_files(tmp_path)
    body = sdpo_job("sdpo-tiny", upload(client, train))
    body["integrations"] = [{"type": "mlflow", "mlflow": {"experiment_name": "sdpo-e2e-cancel"}}]
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    service.start_worker("w1")

    mlflow = MlflowClient(tracking_uri=mlflow_server)
    runs = _eventually(
        lambda: (mlflow.search_runs([e.experiment_id], filter_string=f"tags.`sdpo.job_id` = '{job_id}'")
                 if (e := mlflow.get_experiment_by_name("sdpo-e2e-cancel")) else []),
        lambda runs: any(r.info.status != "RUNNING" for r in runs), "the cancel")
    [parent] = runs  # the job's run only: no step ran
    assert (parent.info.status, parent.data.tags["sdpo.status"]) == ("KILLED", "cancelled"), service.logs()
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"
    assert not [e for e in _events(client, job_id) if (e["data"] or {}).get("integration")]
