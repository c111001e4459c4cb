"""Job creation: valid specs in every form, and a table of bad ones that each get the right
4xx and code while the database and the broker stay untouched."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.models import Job, JobStep
from tests.api.factories import checkpoint_row, file_row, fine_tuned_model_row, job_row
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"


@dataclass
class Ctx:
    good: str  # alice: 10 pairs, sources easy/hard
    small: str  # alice: 3 pairs
    no_source: str  # alice: 6 pairs without source
    failed: str  # alice: a file whose validation failed (inserted directly)
    deleted: str  # alice: deleted
    bobs_file: str
    bobs_checkpoint: str
    bobs_model: str
    own_checkpoint: str
    own_model: str


@pytest.fixture
def ctx(client, db, upload, user_key, other_key, base_model) -> Ctx:
    good = upload(user_key, preference_rows(10))["id"]
    small = upload(user_key, preference_rows(3))["id"]
    no_source = upload(user_key, preference_rows(6, sources=()))["id"]
    deleted = upload(user_key, preference_rows(2))["id"]
    assert client.delete(f"/v1/files/{deleted}", headers=bearer(user_key)).status_code == 200
    failed = file_row(db, "alice", status="error", details="line 3: missing chosen").id
    bobs_file = upload(other_key, preference_rows(10))["id"]
    bobs_job = job_row(db, "bob", bobs_file)
    bobs_checkpoint = checkpoint_row(db, bobs_job)
    bobs_model = fine_tuned_model_row(db, bobs_job, bobs_checkpoint)
    own_job = job_row(db, "alice", good)
    own_checkpoint = checkpoint_row(db, own_job)
    own_model = fine_tuned_model_row(db, own_job, own_checkpoint)
    return Ctx(good, small, no_source, failed, deleted, bobs_file, bobs_checkpoint.id, bobs_model.id,
               own_checkpoint.id, own_model.id)


def dpo(ctx: Ctx, hp: dict | None = None, **top) -> dict:
    body = {"model": "tiny-base", "training_file": ctx.good,
            "method": {"type": "dpo", "dpo": {"hyperparameters": hp or {}}}}
    body.update(top)
    return body


def sdpo_partition(ctx: Ctx, partition: dict, file: str | None = None, hp: dict | None = None) -> dict:
    return {"model": "tiny-base", "training_file": file or ctx.good,
            "method": {"type": "sdpo", "sdpo": {"hyperparameters": hp or {}, "partition": partition}}}


def sdpo_steps(ctx: Ctx, steps: list[dict], **top) -> dict:
    body = {"model": "tiny-base", "method": {"type": "sdpo", "sdpo": {"steps": steps}}}
    body.update(top)
    return body


HP = "method.dpo.hyperparameters"
PART = "method.sdpo.partition"

# (case id, body builder, status, code, param)
BAD_SPECS = [
    ("unknown model", lambda c: dpo(c, model="no-such-model"), 400, "model_not_found", "model"),
    ("another owner's fine-tuned model", lambda c: dpo(c, model=c.bobs_model), 400, "model_not_found", "model"),
    ("another owner's checkpoint", lambda c: dpo(c, model=c.bobs_checkpoint), 400, "model_not_found", "model"),
    ("missing model", lambda c: {"training_file": c.good}, 400, "missing_required_parameter", "model"),
    ("unknown training file", lambda c: dpo(c, training_file="file-0000"), 400, "file_not_found", "training_file"),
    ("another owner's file", lambda c: dpo(c, training_file=c.bobs_file), 400, "file_not_found", "training_file"),
    ("a file that failed validation", lambda c: dpo(c, training_file=c.failed), 400, "file_not_processed",
     "training_file"),
    ("a deleted file", lambda c: dpo(c, training_file=c.deleted), 400, "file_not_found", "training_file"),
    ("another owner's validation file", lambda c: dpo(c, validation_file=c.bobs_file), 400, "file_not_found",
     "validation_file"),
    ("dpo without training_file", lambda c: {"model": "tiny-base", "method": {"type": "dpo"}}, 400,
     "missing_required_parameter", "training_file"),
    ("beta = 0", lambda c: dpo(c, {"beta": 0}), 400, "invalid_hyperparameter", f"{HP}.beta"),
    ("beta < 0", lambda c: dpo(c, {"beta": -0.1}), 400, "invalid_hyperparameter", f"{HP}.beta"),
    ("beta not a number", lambda c: dpo(c, {"beta": "high"}), 400, "invalid_hyperparameter", f"{HP}.beta"),
    ("negative learning rate", lambda c: dpo(c, {"learning_rate": -1e-5}), 400, "invalid_hyperparameter",
     f"{HP}.learning_rate"),
    ("absurd learning rate", lambda c: dpo(c, {"learning_rate": 3.0}), 400, "invalid_hyperparameter",
     f"{HP}.learning_rate"),
    ("learning_rate_multiplier 0", lambda c: dpo(c, {"learning_rate_multiplier": 0}), 400,
     "invalid_hyperparameter", f"{HP}.learning_rate_multiplier"),
    ("multiplier giving an absurd rate", lambda c: dpo(c, {"learning_rate_multiplier": 500}), 400,
     "invalid_hyperparameter", f"{HP}.learning_rate_multiplier"),
    ("learning_rate and multiplier both", lambda c: dpo(c, {"learning_rate": 1e-4, "learning_rate_multiplier": 2}),
     400, "conflicting_parameters", f"{HP}.learning_rate_multiplier"),
    ("n_epochs 0", lambda c: dpo(c, {"n_epochs": 0}), 400, "invalid_hyperparameter", f"{HP}.n_epochs"),
    ("batch_size 0", lambda c: dpo(c, {"batch_size": 0}), 400, "invalid_hyperparameter", f"{HP}.batch_size"),
    ("batch_size fractional", lambda c: dpo(c, {"batch_size": 2.5}), 400, "invalid_hyperparameter",
     f"{HP}.batch_size"),
    ("batch_size boolean", lambda c: dpo(c, {"batch_size": True}), 400, "invalid_hyperparameter",
     f"{HP}.batch_size"),
    ("unknown loss type", lambda c: dpo(c, {"loss_type": "magic"}), 400, "invalid_hyperparameter",
     f"{HP}.loss_type"),
    ("unknown hyperparameter", lambda c: dpo(c, {"gamma": 1}), 400, "unknown_parameter", f"{HP}.gamma"),
    ("seed as a hyperparameter", lambda c: dpo(c, {"seed": 1}), 400, "unknown_parameter", f"{HP}.seed"),
    ("more steps than pairs", lambda c: sdpo_partition(c, {"strategy": "random", "n_steps": 4}, file=c.small), 400,
     "too_many_steps", f"{PART}.n_steps"),
    ("more steps than the service allows", lambda c: sdpo_partition(c, {"strategy": "random", "n_steps": 33}), 400,
     "too_many_steps", f"{PART}.n_steps"),
    ("zero steps", lambda c: sdpo_partition(c, {"strategy": "random", "n_steps": 0}), 400, "invalid_value",
     f"{PART}.n_steps"),
    ("unknown strategy", lambda c: sdpo_partition(c, {"strategy": "alphabetical", "n_steps": 2}), 400,
     "unknown_partition_strategy", f"{PART}.strategy"),
    ("sizes not summing to the rows", lambda c: sdpo_partition(c, {"strategy": "random", "n_steps": 2,
                                                                  "sizes": [3, 3]}), 400, "invalid_value",
     f"{PART}.sizes"),
    ("sizes with a curriculum", lambda c: sdpo_partition(c, {"strategy": "easy_to_hard", "n_steps": 2,
                                                            "sizes": [5, 5]}), 400, "conflicting_parameters",
     f"{PART}.sizes"),
    ("curriculum with more steps than sources", lambda c: sdpo_partition(c, {"strategy": "easy_to_hard",
                                                                            "n_steps": 3}), 400, "too_many_steps",
     f"{PART}.n_steps"),
    ("curriculum on pairs without sources", lambda c: sdpo_partition(c, {"strategy": "hard_to_easy", "n_steps": 2},
                                                                     file=c.no_source), 400, "missing_source",
     "training_file"),
    ("partition n_steps not an integer", lambda c: sdpo_partition(c, {"strategy": "random", "n_steps": 2.5}), 400,
     "invalid_type", f"{PART}.n_steps"),
    ("steps and partition both", lambda c: {"model": "tiny-base", "training_file": c.good, "method": {
        "type": "sdpo", "sdpo": {"steps": [{"training_file": c.good}],
                                 "partition": {"strategy": "random", "n_steps": 2}}}}, 400,
     "conflicting_parameters", PART),
    ("sdpo with neither steps nor partition", lambda c: {"model": "tiny-base", "training_file": c.good,
                                                         "method": {"type": "sdpo", "sdpo": {}}}, 400,
     "missing_required_parameter", "method.sdpo.steps"),
    ("sdpo without its block", lambda c: {"model": "tiny-base", "training_file": c.good,
                                          "method": {"type": "sdpo"}}, 400, "missing_required_parameter",
     "method.sdpo"),
    ("empty steps", lambda c: sdpo_steps(c, []), 400, "invalid_value", "method.sdpo.steps"),
    ("a step's unknown file", lambda c: sdpo_steps(c, [{"training_file": c.good}, {"training_file": "file-x"}]),
     400, "file_not_found", "method.sdpo.steps[1].training_file"),
    ("a step's bad hyperparameter", lambda c: sdpo_steps(c, [{"training_file": c.good,
                                                              "hyperparameters": {"beta": 0}}]), 400,
     "invalid_hyperparameter", "method.sdpo.steps[0].hyperparameters.beta"),
    ("a step without training_file", lambda c: sdpo_steps(c, [{"hyperparameters": {}}]), 400,
     "missing_required_parameter", "method.sdpo.steps[0].training_file"),
    ("training_file differing from the first step's", lambda c: sdpo_steps(
        c, [{"training_file": c.good}], training_file=c.small), 400, "conflicting_parameters", "training_file"),
    ("supervised method", lambda c: {"model": "tiny-base", "training_file": c.good,
                                     "method": {"type": "supervised", "supervised": {}}}, 400,
     "unsupported_method", "method.type"),
    ("unknown method", lambda c: {"model": "tiny-base", "training_file": c.good, "method": {"type": "ppo"}}, 400,
     "unsupported_method", "method.type"),
    ("dpo with an sdpo block", lambda c: {"model": "tiny-base", "training_file": c.good,
                                          "method": {"type": "dpo", "sdpo": {"steps": []}}}, 400,
     "conflicting_parameters", "method.sdpo"),
    ("top-level and method hyperparameters", lambda c: dpo(c, {"beta": 0.2}, hyperparameters={"n_epochs": 2}), 400,
     "conflicting_parameters", "hyperparameters"),
    ("metadata over 16 pairs", lambda c: dpo(c, metadata={f"k{i}": "v" for i in range(17)}), 400,
     "invalid_metadata", "metadata"),
    ("metadata key over 64 characters", lambda c: dpo(c, metadata={"k" * 65: "v"}), 400, "invalid_metadata",
     "metadata"),
    ("metadata value over 512 characters", lambda c: dpo(c, metadata={"k": "v" * 513}), 400, "invalid_metadata",
     "metadata.k"),
    ("metadata value not a string", lambda c: dpo(c, metadata={"k": 1}), 400, "invalid_metadata", "metadata.k"),
    ("suffix too long", lambda c: dpo(c, suffix="s" * 65), 400, "invalid_value", "suffix"),
    ("suffix with bad characters", lambda c: dpo(c, suffix="my model!"), 400, "invalid_value", "suffix"),
    ("negative seed", lambda c: dpo(c, seed=-1), 400, "invalid_value", "seed"),
    ("seed not an integer", lambda c: dpo(c, seed="42"), 400, "invalid_type", "seed"),
    ("unknown top-level field", lambda c: dpo(c, priority="high"), 400, "unknown_parameter", "priority"),
    ("unknown field inside the method", lambda c: sdpo_partition(c, {"strategy": "random", "n_steps": 2,
                                                                    "shuffle": True}), 400, "unknown_parameter",
     f"{PART}.shuffle"),
    ("unknown integration type", lambda c: dpo(c, integrations=[{"type": "wandb", "wandb": {"project": "p"}},
                                                                {"type": "comet", "comet": {}}]), 400,
     "unsupported_integration", "integrations[1].type"),
    ("wandb without a project", lambda c: dpo(c, integrations=[{"type": "wandb", "wandb": {"name": "r"}}]), 400,
     "missing_required_parameter", "integrations[0].wandb.project"),
    ("wandb api key in the body", lambda c: dpo(c, integrations=[
        {"type": "wandb", "wandb": {"project": "p", "api_key": "x"}}]), 400, "unknown_parameter",
     "integrations[0].wandb.api_key"),
    ("wandb tag too long", lambda c: dpo(c, integrations=[{"type": "wandb", "wandb": {"project": "p",
                                                                                      "tags": ["t" * 65]}}]),
     400, "invalid_integration", "integrations[0].wandb.tags[0]"),
    ("two wandb integrations", lambda c: dpo(c, integrations=[{"type": "wandb", "wandb": {"project": "p"}}] * 2),
     400, "invalid_integration", "integrations[1].type"),
    ("mlflow without a tracking server", lambda c: dpo(c, integrations=[{"type": "mlflow", "mlflow": {}}]), 400,
     "missing_required_parameter", "integrations[0].mlflow.tracking_uri"),
    ("mlflow on a loopback address", lambda c: dpo(c, integrations=[
        {"type": "mlflow", "mlflow": {"tracking_uri": "http://127.0.0.1:5000"}}]), 400, "url_not_allowed",
     "integrations[0].mlflow.tracking_uri"),
    ("mlflow on the metadata service", lambda c: dpo(c, integrations=[
        {"type": "mlflow", "mlflow": {"tracking_uri": "http://metadata.google.internal/"}}]), 400,
     "url_not_allowed", "integrations[0].mlflow.tracking_uri"),
    ("mlflow on a file: URI", lambda c: dpo(c, integrations=[
        {"type": "mlflow", "mlflow": {"tracking_uri": "file:///etc"}}]), 400, "invalid_url",
     "integrations[0].mlflow.tracking_uri"),
    ("mlflow credentials in the URI", lambda c: dpo(c, integrations=[
        {"type": "mlflow", "mlflow": {"tracking_uri": "https://u:p@mlflow.example.com"}}]), 400,
     "invalid_integration", "integrations[0].mlflow.tracking_uri"),
    ("a JSON array", lambda c: [1, 2], 400, "invalid_type", None),
    ("malformed JSON", lambda c: b'{"model": "tiny-base",', 400, "invalid_json", None),
    ("NaN in JSON", lambda c: b'{"model": "tiny-base", "seed": NaN}', 400, "invalid_json", None),
    ("empty body", lambda c: b"", 400, "invalid_json", None),
]


@pytest.mark.parametrize(("build", "status", "code", "param"), [case[1:] for case in BAD_SPECS],
                         ids=[case[0] for case in BAD_SPECS])
def test_bad_job_spec_is_refused_and_changes_nothing(client, ctx, user_key, count_rows, redis_client, settings,
                                                     build, status, code, param):
    assert len(BAD_SPECS) >= 25
    body = build(ctx)
    before = count_rows()
    headers = {**bearer(user_key), "Idempotency-Key": "bad-spec"}
    if isinstance(body, bytes):
        response = client.post(JOBS, headers={**headers, "Content-Type": "application/json"}, content=body)
    else:
        response = client.post(JOBS, headers=headers, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error" and error["message"]
    assert count_rows() == before
    assert redis_client.llen(settings.light_queue) == 0


# ------------------------------------------------------------------------------------------------
# Valid specs


def test_dpo_job_is_one_step_with_resolved_hyperparameters(client, ctx, user_key, db):
    body = dpo(ctx, {"beta": 0.2, "learning_rate_multiplier": 2, "n_epochs": "auto"}, seed=7, suffix="exp-1",
               metadata={"team": "a"}, validation_file=ctx.small)
    response = client.post(JOBS, headers=bearer(user_key), json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["model"] == "tiny-base" and job["training_file"] == ctx.good and job["validation_file"] == ctx.small
    assert job["seed"] == 7 and job["user_provided_suffix"] == "exp-1" and job["metadata"] == {"team": "a"}
    assert job["organization_id"] == "alice" and job["n_steps"] == 1 and job["current_step"] == 0
    assert job["hyperparameters"] == {"batch_size": 2, "learning_rate_multiplier": 2.0, "n_epochs": 1, "beta": 0.2}
    resolved = job["method"]["dpo"]["hyperparameters"]
    # The multiplier scales the model's default rate (1e-3 for tiny-base), not StepConfig's 5e-7.
    assert resolved["learning_rate"] == pytest.approx(2e-3)
    [step] = db.query(JobStep).filter_by(job_id=job["id"]).all()
    assert step.status == "pending" and step.index == 1 and step.training_file_id == ctx.good
    assert step.hyperparameters["seed"] == 7 and step.hyperparameters["learning_rate"] == pytest.approx(2e-3)


def test_legacy_top_level_hyperparameters_make_a_dpo_job(client, ctx, user_key):
    response = client.post(JOBS, headers=bearer(user_key),
                           json={"model": "tiny-base", "training_file": ctx.good, "hyperparameters": {"n_epochs": 3}})
    assert response.status_code == 200, response.text
    assert response.json()["method"]["type"] == "dpo"
    assert response.json()["hyperparameters"]["n_epochs"] == 3


def test_sdpo_steps_form_one_file_per_step_with_overrides(client, ctx, user_key, db):
    body = sdpo_steps(ctx, [
        {"training_file": ctx.good},
        {"training_file": ctx.small, "hyperparameters": {"beta": 0.5, "learning_rate": 1e-4}},
        {"training_file": ctx.no_source, "hyperparameters": {"n_epochs": "auto"}},
    ])
    body["method"]["sdpo"]["hyperparameters"] = {"beta": 0.2, "learning_rate_multiplier": 0.5}
    response = client.post(JOBS, headers=bearer(user_key), json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["n_steps"] == 3 and job["training_file"] == ctx.good
    steps = client.get(f"{JOBS}/{job['id']}/steps", headers=bearer(user_key)).json()["data"]
    assert [s["index"] for s in steps] == [1, 2, 3] and {s["status"] for s in steps} == {"pending"}
    assert [s["training_file"] for s in steps] == [ctx.good, ctx.small, ctx.no_source]
    assert [s["hyperparameters"]["beta"] for s in steps] == [0.2, 0.5, 0.2]
    lrs = [s["hyperparameters"]["learning_rate"] for s in steps]
    assert lrs == pytest.approx([5e-4, 1e-4, 5e-4])
    assert set(steps[0]["metrics"]) >= {"first_loss", "mean_gamma_ref", "last_loss", "reward_accuracy",
                                        "reward_margin", "eval"}
    echoed = job["method"]["sdpo"]["steps"]
    assert echoed[1]["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(0.1)


@pytest.mark.parametrize("strategy", ["random", "stratified", "easy_to_hard", "hard_to_easy"])
def test_sdpo_partition_form(client, ctx, user_key, db, strategy):
    partition = {"strategy": strategy, "n_steps": 2}
    if strategy == "random":
        partition["sizes"] = [4, 6]
    response = client.post(JOBS, headers=bearer(user_key), json=sdpo_partition(ctx, partition))
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["n_steps"] == 2
    assert job["method"]["sdpo"]["partition"]["strategy"] == strategy
    assert job["method"]["sdpo"]["partition"]["source_field"] == "source"
    rows = db.query(JobStep).filter_by(job_id=job["id"]).order_by(JobStep.index).all()
    assert [(s.index, s.status, s.training_file_id) for s in rows] == [(1, "pending", None), (2, "pending", None)]
    assert db.get(Job, job["id"]).partition["n_steps"] == 2


def test_branch_from_a_checkpoint_or_a_fine_tuned_model(client, ctx, user_key, db):
    for model in (ctx.own_checkpoint, ctx.own_model):
        response = client.post(JOBS, headers=bearer(user_key), json=dpo(ctx, model=model))
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["model"] == model
        row = db.get(Job, job["id"])
        assert row.initial_checkpoint_id == ctx.own_checkpoint
        step = client.get(f"{JOBS}/{job['id']}/steps", headers=bearer(user_key)).json()["data"][0]
        assert step["reference_checkpoint"] == step["policy_init_checkpoint"] == ctx.own_checkpoint
