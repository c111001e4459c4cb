"""The pair-level curriculum with rescore through the service (issue #17): API + a real worker, a
3-step job on a file without sources. Step 1's chunk is ordered by the base; before steps 2 and 3 the
worker rescores the pairs not yet trained with the previous step's checkpoint (tested by lineage:
the sha256 recorded for step t is step t-1's checkpoint's), every pair is trained exactly once, and
each chunk is the easiest of what was left under that model (recomputed here with the engine)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sqlalchemy import select

from core.db import make_engine, make_session_factory, session_scope
from core.models import Checkpoint, Job, JobStep, RegisteredModel
from core.storage import LocalStorage
from sdpo_engine.data import load_pairs
from sdpo_engine.sample_data import make_pairs, write_jsonl

from .conftest import TINY_DEFAULTS, upload, wait_job

pytestmark = pytest.mark.slow  # a 3-step job plus two rescoring passes: about a minute


def test_rescore_orders_each_later_chunk_by_the_previous_checkpoint(service, tmp_path):
    from sdpo_engine.curriculum import score_pairs
    from sdpo_engine.manifest import checkpoint_identity
    from sdpo_engine.partition import pair_order

    service.start_api()
    service.start_worker("w1")
    client = service.client()
    rows = [{k: v for k, v in p.items() if k != "source"} for p in make_pairs(6, seed=31)]
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdpo-tiny", "training_file": upload(client, train), "seed": 0,
        "method": {"type": "sdpo", "sdpo": {"hyperparameters": {"n_epochs": 1, "learning_rate": 5e-3},
                                             "partition": {"strategy": "pair_easy_to_hard", "n_steps": 3,
                                                           "rescore": True}}}})
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", service.logs()

    factory = make_session_factory(make_engine(service.database_url))
    local_path = LocalStorage(service.home / "storage").local_path
    with session_scope(factory) as s:
        base = s.get_one(RegisteredModel, "sdpo-tiny").uri.removeprefix("file://")
        steps = s.scalars(select(JobStep).where(JobStep.job_id == job["id"]).order_by(JobStep.index)).all()
        chunks = [load_pairs(local_path(st.chunk_uri)) for st in steps]
        outputs = [s.get_one(Checkpoint, st.output_checkpoint_id) for st in steps]
        ckpt_dirs = [local_path(c.uri) for c in outputs]
        shas = [c.sha256 for c in outputs]
        plan = s.get_one(Job, job["id"]).partition

    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    assert Counter(key(p) for c in chunks for p in c) == Counter(key(p) for p in load_pairs(train))  # once each
    assert [len(c) for c in chunks] == [4, 4, 4]
    # Lineage: the model that ordered step t's chunk is M_{t-1}.
    assert plan["pair_scores"]["1"]["sha256"] == checkpoint_identity(base)["sha256"]
    assert plan["pair_scores"]["2"]["sha256"] == shas[0]
    assert plan["pair_scores"]["3"]["sha256"] == shas[1]
    # Step 2's chunk is the easiest 4 of the pairs left after step 1 (chunks 2 and 3) under M1,
    # recomputed here with the engine on step 1's checkpoint.
    pool = chunks[1] + chunks[2]
    scores = score_pairs(ckpt_dirs[0], pool, max_length=TINY_DEFAULTS["max_length"], device="cpu")["scores"]
    easiest = [key(pool[i]) for i in pair_order(scores, len(pool))][:4]
    assert Counter(easiest) == Counter(key(p) for p in chunks[1])
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert sum(1 for e in events if (e.get("data") or {}).get("pair_scores")) == 2
