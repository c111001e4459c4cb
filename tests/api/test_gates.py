"""Step gates in the job spec (method.sdpo.gate): accepted and echoed with a validation file, each bad
gate a 400 naming its field; and the gate decision itself (core/jobs/gates.py) on step histories."""

from __future__ import annotations

import pytest

from core.jobs.gates import check_gate
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"


def _body(train: str, gate: dict, validation: str | None) -> dict:
    body = {"model": "tiny-base", "training_file": train,
            "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": 2},
                                                 "gate": gate}}}
    if validation is not None:
        body["validation_file"] = validation
    return body


def test_gate_is_echoed_and_the_job_object_has_no_outcome_yet(client, upload, user_key, base_model):
    train = upload(user_key, preference_rows(10))["id"]
    valid = upload(user_key, preference_rows(4))["id"]
    r = client.post(JOBS, json=_body(train, {"metric": "eval.reward_margin", "on_fail": "rollback",
                                             "max_drift": 0.5}, valid), headers=bearer(user_key))
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["method"]["sdpo"]["gate"] == {"metric": "eval.reward_margin", "min_delta": 0.0,
                                             "on_fail": "rollback", "max_drift": 0.5}
    assert job["gate"] is None


@pytest.mark.parametrize("gate, with_validation, param", [
    ({"metric": "eval.reward_margin"}, False, "validation_file"),
    ({"metric": "train.loss"}, True, "method.sdpo.gate.metric"),
    ({"metric": "eval.reward_accuracy", "on_fail": "retry"}, True, "method.sdpo.gate.on_fail"),
    ({"metric": "eval.reward_accuracy", "max_drift": -1}, True, "method.sdpo.gate.max_drift"),
    ({"metric": "eval.reward_accuracy", "threshold": 1}, True, "method.sdpo.gate.threshold"),
])
def test_bad_gates_are_400_naming_the_field(client, upload, user_key, base_model, gate, with_validation, param):
    train = upload(user_key, preference_rows(10))["id"]
    valid = upload(user_key, preference_rows(4))["id"] if with_validation else None
    r = client.post(JOBS, json=_body(train, gate, valid), headers=bearer(user_key))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def _m(value: float, drift: float = 0.0, base_pref: float = 0.5) -> dict:
    return {"eval": {"reward_margin": value, "reward_accuracy": value, "preference_accuracy": value},
            "drift": {"max_abs_per_token": drift, "base_preference_accuracy": base_pref}}


def test_gate_decisions():
    gate = {"metric": "eval.reward_margin", "min_delta": 0.0, "on_fail": "stop", "max_drift": None}
    assert check_gate(gate, [(1, "c1", _m(0.2))]) is None  # step 1 vs the base (margin 0)
    assert check_gate(gate, [(1, "c1", _m(0.2)), (2, "c2", _m(0.3))]) is None
    out = check_gate(gate, [(1, "c1", _m(0.2)), (2, "c2", _m(0.1))])
    assert out is not None
    assert (out["failed_step"], out["reason"], out["result_step"], out["result_checkpoint"]) == (2, "min_delta", 2, "c2")
    assert out["previous"] == {"step": 1, "value": 0.2} and out["delta"] == pytest.approx(-0.1)
    rollback = {**gate, "on_fail": "rollback"}
    out = check_gate(rollback, [(1, "c1", _m(0.2)), (2, "c2", _m(0.5)), (3, "c3", _m(0.4))])
    assert (out["result_step"], out["result_checkpoint"], out["rolled_back"]) == (2, "c2", True)
    # step 1 compared with the base: its reward margin is 0, its preference accuracy the base's own
    assert check_gate(gate, [(1, "c1", _m(-0.01))])["previous"] == {"step": 0, "value": 0.0}
    pref = {**gate, "metric": "eval.preference_accuracy"}
    assert check_gate(pref, [(1, "c1", _m(0.6, base_pref=0.7))])["delta"] == pytest.approx(-0.1)
    # min_delta demands an improvement
    assert check_gate({**gate, "min_delta": 0.2}, [(1, "c1", _m(0.2)), (2, "c2", _m(0.3))])["reason"] == "min_delta"
    # max_drift: a drifting step is not a rollback target
    drifting = {**rollback, "max_drift": 0.1}
    out = check_gate(drifting, [(1, "c1", _m(0.2)), (2, "c2", _m(0.9, drift=0.3))])
    assert (out["reason"], out["result_step"], out["drift"]) == ("max_drift", 1, 0.3)
    out = check_gate(drifting, [(1, "c1", _m(0.2, drift=0.3))])
    assert (out["reason"], out["result_step"], out["rolled_back"]) == ("max_drift", 1, False)
    # no held-out metrics reported: the gate cannot hold
    assert check_gate(gate, [(1, "c1", {"eval": None})])["reason"] == "no_eval"
