"""worker/workdir.py on real folders: the trainer state handed from one attempt to the next, and
where a starting model is read from."""

from __future__ import annotations

import json
from pathlib import Path

from worker import workdir


def _trainer_checkpoint(work: Path, attempt: int, global_step: int, *, complete: bool = True) -> Path:
    folder = work / f"attempt-{attempt}" / "trainer" / f"checkpoint-{global_step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"x" * global_step)
    if complete:  # transformers' trainer_state.json, then the engine's seal once every rank saved
        (folder / workdir.TRAINER_STATE).write_text(json.dumps({"global_step": global_step}))
        (folder / workdir.TRAINER_CHECKPOINT_SEAL).write_text(json.dumps({"world_size": 1, "strategy": None}))
    return folder


def test_a_checkpoint_without_the_engine_seal_is_not_handed_over(tmp_path):
    """transformers wrote trainer_state.json, but the seal (written after every rank's RNG file) is missing:
    the engine would refuse to resume it, so the worker neither hands it over nor counts it."""
    work = tmp_path / "step-1"
    _trainer_checkpoint(work, 1, 4)
    unsealed = _trainer_checkpoint(work, 1, 6)
    (unsealed / workdir.TRAINER_CHECKPOINT_SEAL).unlink()
    assert workdir.newest_trainer_checkpoint(work) == (4, work / "attempt-1" / "trainer" / "checkpoint-4")


def test_the_newest_complete_trainer_checkpoint_is_handed_over_and_old_attempts_go(tmp_path):
    work = tmp_path / "step-1"
    _trainer_checkpoint(work, 1, 2)
    _trainer_checkpoint(work, 1, 6, complete=False)  # cut off by a kill: never resumed from
    _trainer_checkpoint(work, 2, 4)
    attempt_dir = workdir.new_attempt_dir(work, 3)
    resumed = workdir.hand_over_trainer_state(work, 3)
    assert resumed == attempt_dir / "trainer" / "checkpoint-4"
    assert (resumed / "optimizer.pt").read_bytes() == b"xxxx"
    assert json.loads((resumed / workdir.TRAINER_STATE).read_text()) == {"global_step": 4}
    assert sorted(p.name for p in work.iterdir()) == ["attempt-3"]


def test_a_first_attempt_starts_afresh(tmp_path):
    work = tmp_path / "step-1"
    workdir.new_attempt_dir(work, 1)
    assert workdir.hand_over_trainer_state(work, 1) is None
    assert sorted(p.name for p in work.iterdir()) == ["attempt-1"]


def test_a_retried_attempt_folder_starts_empty(tmp_path):
    work = tmp_path / "step-1"
    leftover = workdir.new_attempt_dir(work, 2) / "output" / "half-written"
    leftover.parent.mkdir()
    leftover.write_text("x")
    assert list(workdir.new_attempt_dir(work, 2).iterdir()) == []


def test_a_registered_model_is_read_where_it_lies(settings, tmp_path):
    assert workdir.model_dir(settings, ("local", "m", (tmp_path / "m").as_uri())) == tmp_path / "m"
    assert workdir.model_dir(settings, ("hub", "org/m", "org/m")) == Path("org/m")
