"""The DPO loss family on POST /v1/fine_tuning/jobs (#18): accepted settings resolve to TRL's loss list,
bad combinations are 400s naming the field, and nothing is written for them."""

from __future__ import annotations

import pytest

from core.models import JobStep
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"
HP = "method.dpo.hyperparameters"
SDPO_HP = "method.sdpo.hyperparameters"


@pytest.fixture
def training_file(upload, user_key, base_model) -> str:
    return upload(user_key, preference_rows(10))["id"]


def dpo(file: str, hp: dict) -> dict:
    return {"model": "tiny-base", "training_file": file, "method": {"type": "dpo", "dpo": {"hyperparameters": hp}}}


def sdpo(file: str, hp: dict, steps: list[dict]) -> dict:
    return {"model": "tiny-base", "method": {"type": "sdpo", "sdpo": {
        "hyperparameters": hp, "steps": [{"training_file": file, **s} for s in steps]}}}


# (case id, body builder, param, words the message must contain)
BAD = [
    ("fewer weights than losses", lambda f: dpo(f, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}),
     f"{HP}.loss_weights", "1 weight(s) for 2 loss(es)"),
    ("more weights than losses", lambda f: dpo(f, {"loss_type": "hinge", "loss_weights": [1.0, 2.0]}),
     f"{HP}.loss_weights", "one weight per loss"),
    ("a negative weight", lambda f: dpo(f, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -0.5]}),
     f"{HP}.loss_weights", "out of range"),
    ("every weight zero", lambda f: dpo(f, {"loss_type": ["sigmoid", "sft"], "loss_weights": [0, 0]}),
     f"{HP}.loss_weights", "every weight is 0"),
    ("a weight not a number", lambda f: dpo(f, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1, "x"]}),
     f"{HP}.loss_weights", "finite number"),
    ("weights not a list", lambda f: dpo(f, {"loss_weights": 1.0}), f"{HP}.loss_weights", "list"),
    ("a weight beyond float's range", lambda f: dpo(f, {"loss_weights": [10**400]}), f"{HP}.loss_weights",
     "out of range"),
    ("an ld_alpha beyond float's range", lambda f: dpo(f, {"ld_alpha": 10**400}), f"{HP}.ld_alpha", "too large"),
    ("a learning_rate_multiplier beyond float's range", lambda f: dpo(f, {"learning_rate_multiplier": 10**400}),
     f"{HP}.learning_rate_multiplier", "out of range"),
    ("an unknown loss in a list", lambda f: dpo(f, {"loss_type": ["sigmoid", "magic"]}), f"{HP}.loss_type",
     "unknown loss type 'magic'"),
    ("a loss given twice", lambda f: dpo(f, {"loss_type": ["sigmoid", "sigmoid"]}), f"{HP}.loss_type",
     "more than once"),
    ("an empty loss list", lambda f: dpo(f, {"loss_type": []}), f"{HP}.loss_type", "empty"),
    ("a loss type not a string", lambda f: dpo(f, {"loss_type": 3}), f"{HP}.loss_type", "loss name"),
    ("SimPO", lambda f: dpo(f, {"loss_type": "simpo"}), f"{HP}.loss_type", "reference-free"),
    ("CPO in a list", lambda f: dpo(f, {"loss_type": ["sigmoid", "cpo"]}), f"{HP}.loss_type", "reference-free"),
    ("ORPO", lambda f: dpo(f, {"loss_type": "orpo"}), f"{HP}.loss_type", "reference chain"),
    ("SimPO's gamma", lambda f: dpo(f, {"simpo_gamma": 0.5}), f"{HP}.simpo_gamma", "reference-free"),
    ("reference_free", lambda f: dpo(f, {"reference_free": True}), f"{HP}.reference_free", "reference-free"),
    ("label_smoothing 0.5", lambda f: dpo(f, {"loss_type": "robust", "label_smoothing": 0.5}),
     f"{HP}.label_smoothing", "out of range [0, 0.5)"),
    ("label_smoothing negative", lambda f: dpo(f, {"loss_type": "robust", "label_smoothing": -0.1}),
     f"{HP}.label_smoothing", "out of range"),
    ("label_smoothing with sigmoid", lambda f: dpo(f, {"label_smoothing": 0.1}), f"{HP}.label_smoothing",
     "ignore"),
    ("label_smoothing with hinge and ipo", lambda f: dpo(f, {"loss_type": ["hinge", "ipo"], "label_smoothing": 0.1}),
     f"{HP}.label_smoothing", "ignore"),
    ("exo_pair without label_smoothing", lambda f: dpo(f, {"loss_type": "exo_pair"}), f"{HP}.label_smoothing",
     "exo_pair needs label_smoothing"),
    ("rpo_alpha with another loss", lambda f: dpo(f, {"rpo_alpha": 0.5, "loss_type": "hinge"}), f"{HP}.rpo_alpha",
     "not both"),
    ("rpo_alpha with weights", lambda f: dpo(f, {"rpo_alpha": 0.5, "loss_weights": [1.0]}), f"{HP}.rpo_alpha",
     "not both"),
    ("rpo_alpha negative", lambda f: dpo(f, {"rpo_alpha": -1}), f"{HP}.rpo_alpha", "out of range"),
    ("rpo_alpha a boolean", lambda f: dpo(f, {"rpo_alpha": True}), f"{HP}.rpo_alpha", "finite number"),
    ("ld_alpha above 1", lambda f: dpo(f, {"ld_alpha": 1.5}), f"{HP}.ld_alpha", "out of range [0, 1]"),
    ("ld_alpha with sft alone", lambda f: dpo(f, {"loss_type": "sft", "ld_alpha": 0.5}), f"{HP}.ld_alpha",
     "sft ignores it"),
    ("discopop_tau without discopop", lambda f: dpo(f, {"discopop_tau": 0.1}), f"{HP}.discopop_tau",
     "only the discopop loss"),
    ("discopop_tau 0", lambda f: dpo(f, {"loss_type": "discopop", "discopop_tau": 0}), f"{HP}.discopop_tau",
     "out of range (0, 10]"),
    ("a step's weights for the method's losses", lambda f: sdpo(f, {"loss_type": ["sigmoid", "sft"]},
                                                                [{"hyperparameters": {"loss_weights": [1, 2, 3]}}]),
     "method.sdpo.steps[0].hyperparameters.loss_weights", "3 weight(s) for 2 loss(es)"),
]


@pytest.mark.parametrize(("build", "param", "words"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_loss_settings_are_400s_naming_the_field(client, training_file, user_key, count_rows, build, param,
                                                     words):
    before = count_rows()
    response = client.post(JOBS, headers=bearer(user_key), json=build(training_file))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_hyperparameter",
                                                              param), error
    assert words in error["message"], error["message"]
    assert count_rows() == before


def test_rpo_alpha_resolves_to_sigmoid_plus_weighted_sft(client, training_file, user_key, db):
    response = client.post(JOBS, headers=bearer(user_key), json=dpo(training_file, {"rpo_alpha": 0.5}))
    assert response.status_code == 200, response.text
    resolved = response.json()["method"]["dpo"]["hyperparameters"]
    assert (resolved["loss_type"], resolved["loss_weights"]) == (["sigmoid", "sft"], [1.0, 0.5])
    assert "rpo_alpha" not in resolved
    [step] = db.query(JobStep).filter_by(job_id=response.json()["id"]).all()
    assert (step.hyperparameters["loss_type"], step.hyperparameters["loss_weights"]) == (["sigmoid", "sft"],
                                                                                       [1.0, 0.5])


def test_loss_list_settings_are_echoed_and_stored(client, training_file, user_key, db):
    hp = {"loss_type": ["robust", "sft", "hinge"], "loss_weights": [1, 0.2, 0.5], "label_smoothing": 0.1,
          "ld_alpha": 0.5}
    response = client.post(JOBS, headers=bearer(user_key), json=dpo(training_file, hp))
    assert response.status_code == 200, response.text
    resolved = response.json()["method"]["dpo"]["hyperparameters"]
    assert {k: resolved[k] for k in hp} == {**hp, "loss_weights": [1.0, 0.2, 0.5]}
    [step] = db.query(JobStep).filter_by(job_id=response.json()["id"]).all()
    assert {k: step.hyperparameters[k] for k in hp} == {**hp, "loss_weights": [1.0, 0.2, 0.5]}


def test_a_steps_loss_replaces_the_methods_rpo_alpha(client, training_file, user_key):
    body = sdpo(training_file, {"rpo_alpha": 0.3}, [{}, {"hyperparameters": {"loss_type": "hinge"}},
                                                     {"hyperparameters": {"rpo_alpha": 0}}])
    response = client.post(JOBS, headers=bearer(user_key), json=body)
    assert response.status_code == 200, response.text
    steps = client.get(f"{JOBS}/{response.json()['id']}/steps", headers=bearer(user_key)).json()["data"]
    assert [(s["hyperparameters"]["loss_type"], s["hyperparameters"]["loss_weights"]) for s in steps] == [
        (["sigmoid", "sft"], [1.0, 0.3]), ("hinge", None), ("sigmoid", None)]
