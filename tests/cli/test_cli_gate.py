"""`sdpo jobs get` on a gated sDPO job: the gate and its outcome per step (passed, failed with the reason,
not run) with the value, delta and drift the server's check compared, against a real API server whose job
moves through core.jobs.lifecycle as a worker's would; `--json` stays the API's job object."""

from __future__ import annotations

import json

from sdpo_cli.main import main
from tests.worker.test_gate_lifecycle import _gated, _succeed
from tests.worker.test_lifecycle import make_job  # noqa: F401 (fixture)


def _get(capsys, live_server: str, key: str, job_id: str, *extra: str) -> str:
    capsys.readouterr()
    assert main(["jobs", "get", job_id, "--url", live_server, "--api-key", key, *extra]) == 0
    return capsys.readouterr().out


def _gate_rows(out: str) -> dict[int, list[str]]:
    """The per-step rows under the gate's header, by step index."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "gate"]) + 1
    rows = {}
    for line in lines[start:]:
        if not line[:4].strip().isdigit():
            break
        rows[int(line.split()[0])] = line.split()[1:]
    return rows


def test_jobs_get_prints_the_gate_outcome_of_every_step(db, make_job, live_server, user_key, capsys):  # noqa: F811
    job = _gated(db, make_job(n_steps=3, steps=("queued", "pending", "pending")), "stop")
    assert _succeed(db, job, 1, 0.3)[0] is True

    running = _get(capsys, live_server, user_key, job.id)
    assert "gate: eval.reward_margin, min_delta 0.0000, max_drift -, on_fail stop: no outcome yet" in running
    # step 1 against the base, whose reward margin is 0; drift.max_abs_per_token 0.01
    assert _gate_rows(running) == {1: ["passed", "0.3000", "+0.3000", "0.0100"],
                                   2: ["-", "(queued)", "-", "-", "-"], 3: ["-", "(pending)", "-", "-", "-"]}

    _succeed(db, job, 2, 0.1)  # 0.3 -> 0.1: delta -0.2 < min_delta 0, the job ends with step 2 as its result
    ended = _get(capsys, live_server, user_key, job.id)
    assert "on_fail stop: failed" in ended
    assert _gate_rows(ended) == {1: ["passed", "0.3000", "+0.3000", "0.0100"],
                                 2: ["failed", "(min_delta)", "0.1000", "-0.2000", "0.0100"],
                                 3: ["-", "(cancelled)", "-", "-", "-"]}
    db.expire_all()
    db.refresh(job)
    assert (f"gate failed after step 2: stopped; the result is step 2 ({job.gate['result_checkpoint']}), "
            f"{job.fine_tuned_model}") in ended

    # --json: the API's job object exactly, no gate table
    as_json = json.loads(_get(capsys, live_server, user_key, job.id, "--json"))
    assert as_json["gate"]["failed_step"] == 2 and as_json["gate"]["reason"] == "min_delta"
    assert "steps" not in as_json and as_json["id"] == job.id


def test_jobs_get_prints_no_gate_for_a_job_without_one(db, make_job, live_server, user_key, capsys):  # noqa: F811
    job = make_job(n_steps=2, steps=("queued", "pending"))
    out = _get(capsys, live_server, user_key, job.id)
    assert out.startswith(job.id) and "lineage: " in out and "gate" not in out
