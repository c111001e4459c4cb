"""Step gates and drift from the base, end to end: API (uvicorn) + a real Celery worker training the
tiny model + Postgres + a webhook receiver, the job read through the official openai SDK.

Step 2 of each job trains on a file whose chosen and rejected answers are swapped, so its held-out
reward margin against the base falls below step 1's: the gate fails after step 2. With `stop` the
job's result is step 2's checkpoint, with `rollback` step 1's. Drift numbers are checked against an
independent computation with the engine's `pair_logps` on the base and the step's checkpoint."""

from __future__ import annotations

import json
import time

import pytest

from core.db import make_engine, make_session_factory, session_scope
from core.models import RegisteredModel
from tests.webhooks.conftest import receiver, start_worker_with_beat  # noqa: F401 (a fixture)

from .conftest import TINY_DEFAULTS, upload, wait_job

pytestmark = pytest.mark.slow  # two 2-step trainings: about a minute


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(tmp_path):
    from sdpo_engine.data import load_pairs
    from sdpo_engine.sample_data import make_pairs

    good = make_pairs(12, seed=21)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in make_pairs(12, seed=23)]
    held = _write(tmp_path / "heldout.jsonl", make_pairs(4, seed=22))
    # The held-out pairs as the engine reads them (load_pairs: the file's messages, as the step scores them).
    return (_write(tmp_path / "step1.jsonl", good), _write(tmp_path / "step2-swapped.jsonl", swapped), held,
            load_pairs(str(held)))


def _gated_job(sdk, files: list[str], held: str, on_fail: str):
    return sdk.fine_tuning.jobs.create(
        model="sdpo-tiny", training_file=files[0], validation_file=held, seed=0,
        method={"type": "sdpo", "sdpo": {  # type: ignore[typeddict-unknown-key]
            "hyperparameters": {"n_epochs": 2},
            "steps": [{"training_file": f} for f in files],
            "gate": {"metric": "eval.reward_margin", "min_delta": 0.0, "on_fail": on_fail}}})


def _wait_for(check, seconds, what, service):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {seconds} s\n{service.logs()}")


def test_a_regressing_step_stops_or_rolls_back_the_chain(service, receiver, tmp_path):  # noqa: F811
    import openai

    from sdpo_engine.drift import drift_metrics
    from sdpo_engine.step import load_policy, pair_logps

    service.env.update({"SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS": "127.0.0.1", "SDPO_WEBHOOK_DISPATCH_SECONDS": "0.3"})
    service.start_api()
    start_worker_with_beat(service, "w1", train=True)
    client = service.client()
    hook = client.post("/v1/webhooks", json={"url": receiver.url + "/hook", "events": ["job.succeeded"]}).json()
    receiver.secrets["/hook"] = hook["secret"]
    sdk = openai.OpenAI(base_url=service.url + "/v1", api_key=service.admin_key, max_retries=0)
    step1, step2, held_path, held_pairs = _data(tmp_path)
    files = [upload(client, step1), upload(client, step2)]
    held = upload(client, held_path)

    # A gate without a validation file is refused before anything is written.
    r = client.post("/v1/fine_tuning/jobs", json={"model": "sdpo-tiny", "method": {"type": "sdpo", "sdpo": {
        "steps": [{"training_file": f} for f in files], "gate": {"metric": "eval.reward_margin"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file", r.text

    jobs = {on_fail: _gated_job(sdk, files, held, on_fail).id for on_fail in ("stop", "rollback")}
    session_factory = make_session_factory(make_engine(service.database_url))
    results = {}
    for on_fail, job_id in jobs.items():
        wait_job(client, job_id)
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        assert job.status == "succeeded", service.logs()
        gate = job.model_extra["gate"]
        steps = client.get(f"/v1/fine_tuning/jobs/{job_id}/steps").json()["data"]
        m1, m2 = (s["metrics"]["eval"]["reward_margin"] for s in steps)
        assert m1 > 0 > m2 - m1, f"step 2 did not regress: {m1} -> {m2}"
        assert (gate["status"], gate["failed_step"], gate["reason"], gate["on_fail"]) == (
            "failed", 2, "min_delta", on_fail)
        assert gate["previous"] == {"step": 1, "value": pytest.approx(m1)}
        assert gate["value"] == pytest.approx(m2) and gate["delta"] == pytest.approx(m2 - m1)
        expected_step = 2 if on_fail == "stop" else 1
        assert gate["result_step"] == expected_step
        assert gate["result_checkpoint"] == steps[expected_step - 1]["output_checkpoint"]
        assert job.fine_tuned_model == gate["fine_tuned_model"]
        with session_scope(session_factory) as s:
            registered = s.get_one(RegisteredModel, job.fine_tuned_model)
            assert registered.checkpoint_id == steps[expected_step - 1]["output_checkpoint"]
        events = sdk.fine_tuning.jobs.list_events(job_id, limit=100).data
        gate_events = [e for e in events if (getattr(e, "data", None) or {}).get("gate")]
        assert any(e.message.startswith("Gate failed after step 2: eval.reward_margin") for e in gate_events)
        results[on_fail] = (job, steps)

    def delivered():
        got = {e["data"]["job"]["id"]: e for e in receiver.accepted("/hook")}
        return got if set(jobs.values()) <= set(got) else None

    deliveries = _wait_for(delivered, 60, "job.succeeded deliveries", service)
    for on_fail, job_id in jobs.items():
        payload = deliveries[job_id]["data"]["job"]
        assert payload["gate"]["failed_step"] == 2 and payload["gate"]["on_fail"] == on_fail
        assert payload["fine_tuned_model"] == results[on_fail][0].fine_tuned_model

    # Drift from the base, checked against pair_logps on the base and each step's checkpoint.
    _, steps = results["stop"]
    job_id = jobs["stop"]
    max_length, beta = TINY_DEFAULTS["max_length"], TINY_DEFAULTS["beta"]
    with session_scope(session_factory) as s:
        service_base = s.get_one(RegisteredModel, "sdpo-tiny").uri.removeprefix("file://")
    tok, base = load_policy(service_base, "cpu")
    lengths: list[tuple[int, int]] = []
    bc, br = pair_logps(base, tok, held_pairs, max_length=max_length, lengths=lengths)
    assert len(bc) == len(held_pairs) and all(n_c > 0 and n_r > 0 for n_c, n_r in lengths)
    zero = drift_metrics((bc, br), (bc, br), lengths, beta)  # before training the policy is the base
    assert all(zero[k] == 0 for k in zero if k not in ("pairs", "base_preference_accuracy"))
    for step in steps:
        ckpt = service.home / "storage" / "checkpoints" / job_id / step["output_checkpoint"]
        tok_s, policy = load_policy(ckpt, "cpu")
        pc, pr = pair_logps(policy, tok_s, held_pairs, max_length=max_length)
        n = len(held_pairs)
        dc = [a - b for a, b in zip(pc, bc, strict=True)]
        dr = [a - b for a, b in zip(pr, br, strict=True)]
        expected = {
            "chosen_logratio": sum(dc) / n,
            "rejected_logratio": sum(dr) / n,
            "chosen_logratio_per_token": sum(dc) / sum(c for c, _ in lengths),
            "rejected_logratio_per_token": sum(dr) / sum(r for _, r in lengths),
            "reward_margin": beta * sum(c - r for c, r in zip(dc, dr, strict=True)) / n,
        }
        drift = step["metrics"]["drift"]
        assert drift["pairs"] == n
        for key, value in expected.items():
            assert abs(drift[key] - value) < 1e-5, (step["index"], key, drift[key], value)
        assert abs(drift["reward_margin"] - step["metrics"]["eval"]["reward_margin"]) < 1e-5
        assert drift["chosen_logratio"] != 0  # the step did move the policy
