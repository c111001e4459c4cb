"""A worker whose steps run on 2 ranks (SDPO_WORKER_RANKS=2: gloo ranks on this CPU machine, issue #15).

Through the API and a real Celery worker: a 2-step sDPO job succeeds with every step trained on 2 ranks
(the manifests say so), and a rank SIGKILLed mid-step ends that attempt (the launcher reports the dead
rank, no rank is left behind), the existing attempt logic retries it, and the job succeeds with one
checkpoint per step.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from core.settings import Settings
from tests.e2e.conftest import sample_files, sdpo_job, upload, wait_job

RANKS = {"SDPO_WORKER_RANKS": "2", "SDPO_DISTRIBUTED_STRATEGY": "ddp"}
JOBS = "/v1/fine_tuning/jobs"


def _ranks(home) -> list[psutil.Process]:
    """Live rank processes of this service's steps (their spec lies in the step's work dir)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ".sdpo-rank-spec.json" in cmd and str(home) in cmd and "torch.distributed.run" not in cmd \
                and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def _manifests(svc, job_id: str) -> list[dict]:
    from sdpo_engine.manifest import read_manifest

    # The store and the worker's step folders hold copies: one manifest per checkpoint digest.
    found = {}
    for path in sorted(svc.home.rglob("sdpo_manifest.json")):
        manifest = read_manifest(path.parent)
        if manifest and manifest.get("distributed") and job_id in str(path):
            found[manifest["checkpoint_sha256"]] = manifest
    return list(found.values())


def test_settings_give_each_step_its_ranks():
    assert Settings(worker_ranks=2).step_distributed() == {"num_processes": 2, "strategy": "ddp"}
    gpus = Settings(worker_gpus="0,1,2,3", distributed_strategy="fsdp")
    assert gpus.step_distributed() == {"num_processes": 4, "strategy": "fsdp"}
    assert gpus.engine_environment() == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert Settings().step_distributed() is None and Settings().engine_environment() is None
    for bad in ({"worker_gpus": "0,x"}, {"worker_gpus": "1,1"}, {"worker_gpus": "0,1", "worker_ranks": 3},
                {"worker_ranks": 0}, {"distributed_strategy": "zero3"}):
        with pytest.raises(ValueError):
            Settings(**bad)


@pytest.mark.slow
def test_two_step_job_on_two_ranks_and_a_killed_rank_is_retried(make_service, tmp_path):
    svc = make_service(env=RANKS)
    svc.start_api()
    svc.start_worker("w1")
    client = svc.client()
    train, held = sample_files(tmp_path)
    r = client.post(JOBS, json=sdpo_job("sdpo-tiny", upload(client, train), batch_size=4))
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", svc.logs()
    steps = svc.step_rows(job["id"])
    assert [s["attempt"] for s in steps] == [1, 1]
    trained = _manifests(svc, job["id"])
    assert len(trained) == 2 and all(m["distributed"] == {"world_size": 2, "strategy": "ddp"} for m in trained)
    assert abs(steps[0]["metrics"]["first_loss"] - 0.6931471805599453) < 1e-3

    # Second job: SIGKILL one rank of step 1 as soon as it runs (the OOM killer on one GPU's process).
    r = client.post(JOBS, json=sdpo_job("sdpo-tiny", upload(client, train), batch_size=4))
    job_id = r.json()["id"]
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline:
        ranks = [p for p in _ranks(svc.home) if job_id in " ".join(p.cmdline())]
        if len(ranks) == 2:
            victim = ranks[-1]
            victim.send_signal(signal.SIGKILL)
            killed = (victim.pid, ranks[0].pid, time.monotonic())
        time.sleep(0.05)
    assert killed is not None, svc.logs()
    # The other rank, torchrun and the launcher end within seconds, not at a collective's timeout.
    while psutil.pid_exists(killed[1]) and psutil.Process(killed[1]).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() - killed[2] < 60:
        time.sleep(0.1)
    assert time.monotonic() - killed[2] < 30, "the surviving rank outlived its dead peer"
    done = wait_job(client, job_id, timeout=600)
    assert done["status"] == "succeeded", svc.logs()
    steps = svc.step_rows(job_id)
    assert steps[0]["attempt"] == 2 and steps[1]["attempt"] == 1
    # One checkpoint per step: the killed attempt wrote none.
    assert len(svc.checkpoints(job_id)) == 2
