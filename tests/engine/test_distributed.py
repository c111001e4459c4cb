"""One sDPO step on N ranks (sdpo_engine/distributed.py, issue #15), on this CPU machine: gloo ranks.

The fast tests check the contract (the spec's `distributed`, the per-rank batch, the exit code of the
launcher, the reference pass's dealing of batches in one process). The slow ones run the real launcher
(`python -m sdpo_engine step SPEC.json`, which re-runs itself under `torch.distributed.run`) with 2 ranks
against the one-process step on the same seed and data: DDP and FSDP2, the sharded reference pass with an
odd number of pairs, and a SIGTERM to the launcher followed by a resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdpo_engine.config import ConfigError, StepConfig
from sdpo_engine.distributed import SEAL_NAME, exit_code_of, reference_pass, resume_point, trainer_overrides
from sdpo_engine.manifest import checkpoint_identity, read_manifest
from sdpo_engine.protocol import ExitCode, SpecError, StepSpec
from sdpo_engine.sample_data import make_pairs, write_jsonl

REPO = Path(__file__).resolve().parents[2]
HPARAMS = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 96, "beta": 0.1, "seed": 0}


def _spec(tiny_model: Path, tmp: Path, **extra) -> dict:
    return {"index": 1, "policy_init": str(tiny_model), "train_file": str(tmp / "c1.jsonl"),
            "output_dir": str(tmp / "out"), "work_dir": str(tmp / "work"), "hyperparameters": HPARAMS,
            "device": "cpu", **extra}


# ---------------------------------------------------------------------------------------------
# The contract (fast)


def test_spec_distributed_is_checked(tiny_model, tmp_path):
    write_jsonl(make_pairs(4, seed=1), tmp_path / "c1.jsonl")
    base = _spec(tiny_model, tmp_path)
    spec = StepSpec.from_dict({**base, "distributed": {"num_processes": 2, "strategy": "fsdp"}})
    assert (spec.num_processes, spec.strategy) == (2, "fsdp")
    assert (StepSpec.from_dict(base).num_processes, StepSpec.from_dict(base).strategy) == (1, None)
    # One rank is one plain process, unless it asks for FSDP: then one FSDP2 rank under the launcher.
    one = StepSpec.from_dict({**base, "distributed": {"num_processes": 1}})
    assert (one.strategy, one.launched) == (None, False)
    assert StepSpec.from_dict({**base, "distributed": {"num_processes": 1, "strategy": "ddp"}}).launched is False
    fsdp1 = StepSpec.from_dict({**base, "distributed": {"num_processes": 1, "strategy": "fsdp"}})
    assert (fsdp1.num_processes, fsdp1.strategy, fsdp1.launched) == (1, "fsdp", True)
    assert StepSpec.from_dict(base).launched is False and spec.launched is True
    for bad, field in [({"num_processes": 0}, "num_processes"), ({"num_processes": True}, "num_processes"),
                       ({"num_processes": 2, "strategy": "zero3"}, "strategy"), ({"ranks": 2}, "ranks"),
                       ([2], "distributed")]:
        with pytest.raises(SpecError, match=field):
            StepSpec.from_dict({**base, "distributed": bad})
    with pytest.raises(SpecError, match="fsdp"):
        StepSpec.from_dict({**base, "lora": {"r": 4}, "distributed": {"num_processes": 2, "strategy": "fsdp"}})


def test_batch_size_stays_the_global_batch(tiny_model, tmp_path):
    write_jsonl(make_pairs(4, seed=1), tmp_path / "c1.jsonl")
    spec = StepSpec.from_dict({**_spec(tiny_model, tmp_path), "distributed": {"num_processes": 2}})
    assert trainer_overrides(StepConfig.from_dict({"batch_size": 8}), spec)["per_device_train_batch_size"] == 4
    assert "fsdp" not in trainer_overrides(StepConfig.from_dict({"batch_size": 8}), spec)
    with pytest.raises(ConfigError) as err:
        trainer_overrides(StepConfig.from_dict({"batch_size": 3}), spec)
    assert err.value.param == "batch_size"
    assert trainer_overrides(StepConfig.from_dict({"batch_size": 3}), StepSpec.from_dict(_spec(tiny_model, tmp_path))) == {}
    fsdp = StepSpec.from_dict({**_spec(tiny_model, tmp_path), "distributed": {"num_processes": 2, "strategy": "fsdp"}})
    assert trainer_overrides(StepConfig.from_dict({"batch_size": 2}), fsdp)["fsdp_config"]["version"] == 2
    fsdp1 = StepSpec.from_dict({**_spec(tiny_model, tmp_path), "distributed": {"num_processes": 1, "strategy": "fsdp"}})
    one_rank = trainer_overrides(StepConfig.from_dict({"batch_size": 3}), fsdp1)
    assert one_rank["per_device_train_batch_size"] == 3 and one_rank["fsdp"] is True


def _checkpoint(work: Path, step: int, sealed: dict | None) -> Path:
    """A trainer checkpoint folder as the Trainer leaves it; `sealed`: the layout every rank finished writing."""
    folder = work / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "rng_state_0.pth").write_bytes(b"x")
    if sealed is not None:
        (folder / SEAL_NAME).write_text(json.dumps(sealed))
    return folder


def test_resume_takes_the_newest_sealed_checkpoint_and_drops_a_save_cut_short(tiny_model, tmp_path):
    write_jsonl(make_pairs(4, seed=1), tmp_path / "c1.jsonl")
    spec = StepSpec.from_dict({**_spec(tiny_model, tmp_path), "distributed": {"num_processes": 2}})
    work = Path(spec.work_dir)
    same = {"world_size": 2, "strategy": "ddp"}
    _checkpoint(work, 2, same)
    four = _checkpoint(work, 4, same)
    # Killed while rank 1 still wrote its RNG state: rank 0's trainer_state.json is there, the seal is not.
    _checkpoint(work, 6, None)
    events: list[dict] = []
    assert resume_point(spec, events.append) == str(four)
    assert events == []
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # Nothing sealed at all (a save cut short on the first checkpoint): start afresh, nothing left behind.
    spec_one = StepSpec.from_dict({**_spec(tiny_model, tmp_path), "work_dir": str(tmp_path / "work-b")})
    _checkpoint(Path(spec_one.work_dir), 2, None)
    assert resume_point(spec_one, events.append) is None
    assert list(Path(spec_one.work_dir).iterdir()) == [] and events == []


@pytest.mark.parametrize("written", [{"world_size": 1, "strategy": None}, {"world_size": 4, "strategy": "ddp"},
                                     {"world_size": 2, "strategy": "fsdp"}])
def test_a_checkpoint_of_another_layout_is_not_resumed_the_step_starts_afresh(written, tiny_model, tmp_path):
    write_jsonl(make_pairs(4, seed=1), tmp_path / "c1.jsonl")
    spec = StepSpec.from_dict({**_spec(tiny_model, tmp_path), "distributed": {"num_processes": 2}})
    work = Path(spec.work_dir)
    _checkpoint(work, 2, written)
    stale = _checkpoint(work, 4, written)
    events: list[dict] = []
    assert resume_point(spec, events.append) is None
    assert [(e["event"], e["code"]) for e in events] == [("warning", "resume_layout_changed")]
    assert events[0]["checkpoint"] == str(stale)
    assert events[0]["checkpoint_layout"] == written and events[0]["layout"] == {"world_size": 2, "strategy": "ddp"}
    # Gone, so the fresh run's checkpoint-K folders never mix with the old layout's files.
    assert list(work.iterdir()) == []


def test_launcher_exit_code_follows_rank_zeros_last_line():
    assert exit_code_of({"event": "result"}) == ExitCode.OK
    assert exit_code_of({"event": "stopped"}) == ExitCode.STOPPED
    assert exit_code_of({"event": "error", "code": "non_finite"}) == ExitCode.NON_FINITE
    assert exit_code_of({"event": "error", "code": "no_trainable_pairs"}) == ExitCode.BAD_INPUT
    assert exit_code_of({"event": "error", "code": "step_failed"}) == ExitCode.FAILED
    assert exit_code_of(None) == ExitCode.FAILED  # a rank died before rank 0 printed its last line


def test_reference_pass_in_one_process_scores_every_row_once_in_row_order():
    import torch

    seen: list[list[int]] = []

    def score(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(idx)
        t = torch.tensor(idx, dtype=torch.float32)
        return -t, -2 * t

    order = [4, 0, 3, 1, 2]
    chosen, rejected = reference_pass(5, order, 2, score)
    assert seen == [[4, 0], [3, 1], [2]]
    assert chosen.tolist() == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert rejected.tolist() == [0.0, -2.0, -4.0, -6.0, -8.0]


# ---------------------------------------------------------------------------------------------
# Real ranks (slow)


def _run(spec: dict, path: Path, timeout: float = 300) -> tuple[int, list[dict], str]:
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "sdpo_engine", "step", str(path)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.strip()], proc.stderr


def _two_steps(tiny_model: Path, data: Path, root: Path, distributed: dict | None) -> list[dict]:
    """Steps 1 and 2 of a job (step 2 starts from, and is referenced to, step 1's output), with samples
    (step 1 also the base model's)."""
    runs = []
    policy = tiny_model
    for index in (1, 2):
        tmp = root / f"step{index}"
        tmp.mkdir(parents=True)
        spec = {**_spec(policy, tmp), "index": index, "train_file": str(data / f"c{index}.jsonl"),
                # Held-out metrics after training: under FSDP the pass runs on the sharded policy.
                "eval_file": str(data / "eval.jsonl"), "eval_reference": str(tiny_model),
                # On N ranks rank 0 decodes (under FSDP with the gathered full state dict), the others wait.
                "samples": {"n_prompts": 3, "max_new_tokens": 8, "seed": 0, "base": index == 1}}
        if distributed:
            spec["distributed"] = distributed
        rc, lines, err = _run(spec, tmp / "spec.json")
        assert rc == 0, err[-3000:]
        out = tmp / "out"
        runs.append({"lines": lines, "out": out, "manifest": read_manifest(out),
                     "losses": [e["loss"] for e in lines if e["event"] == "metrics"],
                     "result": lines[-1]})
        policy = out
    return runs


@pytest.fixture(scope="module")
def step_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("ranks-data")
    # 16 pairs per chunk: 4 optimizer steps of the global batch 4 (2 pairs per rank on 2 ranks).
    write_jsonl(make_pairs(8, seed=1), data / "c1.jsonl")
    write_jsonl(make_pairs(8, seed=2), data / "c2.jsonl")
    write_jsonl(make_pairs(3, seed=3)[:5], data / "eval.jsonl")
    return data


@pytest.fixture(scope="module")
def one_rank(tiny_model, step_data, tmp_path_factory):
    return _two_steps(tiny_model, step_data, tmp_path_factory.mktemp("one-rank"), None)


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _assert_same_as_one_rank(runs: list[dict], one: list[dict], strategy: str, world: int) -> None:
    for index, (run, ref) in enumerate(zip(runs, one, strict=True), start=1):
        assert len(run["losses"]) == len(ref["losses"]) > 0
        for a, b in zip(run["losses"], ref["losses"], strict=True):
            assert abs(a - b) <= 1e-5, (index, run["losses"], ref["losses"])
        assert abs(run["losses"][0] - math.log(2)) <= 1e-6
        assert abs(run["result"]["summary"]["mean_gamma_ref"] - ref["result"]["summary"]["mean_gamma_ref"]) <= 1e-4
        held, held_ref = run["result"]["summary"]["eval"], ref["result"]["summary"]["eval"]
        assert held["pairs"] == held_ref["pairs"] == 5
        assert abs(held["reward_margin"] - held_ref["reward_margin"]) <= 1e-4
        mine, theirs = _weights(run["out"]), _weights(ref["out"])
        assert sorted(mine) == sorted(theirs)
        worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
        assert worst <= 1e-4, (index, worst)
        assert run["manifest"]["distributed"] == {"world_size": world, "strategy": strategy}
        samples, samples_ref = run["result"]["summary"]["samples"], ref["result"]["summary"]["samples"]
        assert len(samples["answers"]) == 3
        assert (samples["answers"], samples["base_answers"]) == (samples_ref["answers"], samples_ref["base_answers"])
        assert (samples["base_answers"] is None) == (index == 2) and run["manifest"]["samples"] == samples
        assert ref["manifest"]["distributed"] == {"world_size": 1, "strategy": None}
    # Lineage as in one process: step 2's reference is step 1's output, by sha256.
    assert runs[1]["manifest"]["reference"]["sha256"] == runs[0]["result"]["summary"]["output"]["sha256"]
    assert runs[1]["manifest"]["reference"] == checkpoint_identity(runs[0]["out"])


@pytest.mark.slow
@pytest.mark.parametrize(("world", "strategy"), [(2, "ddp"), (2, "fsdp"), (1, "fsdp")])
def test_n_ranks_train_like_one_process(world, strategy, tiny_model, step_data, one_rank, tmp_path):
    """2 DDP ranks, 2 FSDP2 ranks and one FSDP2 rank under the launcher against the plain process."""
    runs = _two_steps(tiny_model, step_data, tmp_path, {"num_processes": world, "strategy": strategy})
    _assert_same_as_one_rank(runs, one_rank, strategy, world)
    # Only rank 0 wrote: one output, one manifest; no rank's temp folder left beside it.
    for run in runs:
        assert sorted(p.name for p in run["out"].parent.iterdir() if p.name.startswith((".out", "out"))) == ["out"]
    # FSDP's checkpoint is the full model, loadable in one process.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs[1]["out"])
    saved = _weights(runs[1]["out"])
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert tensor.equal(saved[name]), name


RANK_SCRIPT = r'''
import json, os, sys
import torch.distributed as dist
from sdpo_engine.data import load_pairs
from sdpo_engine.step import load_policy, pair_logps

dist.init_process_group("gloo")
tok, model = load_policy(sys.argv[1], "cpu")
pairs = load_pairs(sys.argv[2])
kept = []
chosen, rejected = pair_logps(model, tok, pairs, max_length=96, batch_size=2, kept=kept)
if dist.get_rank() == 0:
    with open(sys.argv[3], "w") as fh:
        json.dump({"chosen": chosen, "rejected": rejected, "kept": kept, "world": dist.get_world_size()}, fh)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_sharded_reference_pass_equals_one_process_pair_for_pair(tiny_model, tmp_path):
    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import load_policy, pair_logps

    # 9 pairs in batches of 2: 5 batches, rank 0 scores 3 and rank 1 scores 2 (and repeats one).
    data = write_jsonl(make_pairs(5, seed=7)[:9], tmp_path / "odd.jsonl")  # make_pairs(n) gives 2n pairs
    script = tmp_path / "rank_ref.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "sharded.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tiny_model), str(data), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                      "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["world"] == 2
    tok, model = load_policy(tiny_model, "cpu")
    kept: list[int] = []
    chosen, rejected = pair_logps(model, tok, load_pairs(data), max_length=96, batch_size=2, kept=kept)
    assert len(chosen) == 9 and sharded["kept"] == kept
    for mine, theirs in ((sharded["chosen"], chosen), (sharded["rejected"], rejected)):
        for a, b in zip(mine, theirs, strict=True):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigterm_to_the_launcher_stops_every_rank_and_a_rerun_resumes(strategy, tiny_model, tmp_path):
    write_jsonl(make_pairs(16, seed=3), tmp_path / "c1.jsonl")  # 32 pairs
    hp = {**HPARAMS, "batch_size": 2, "n_epochs": 2}  # 32 optimizer steps: time to stop in between
    distributed = {"num_processes": 2, "strategy": strategy}

    whole = tmp_path / "whole"
    whole.mkdir()
    rc, lines, err = _run({**_spec(tiny_model, whole, hyperparameters=hp, distributed=distributed),
                           "train_file": str(tmp_path / "c1.jsonl")}, whole / "spec.json")
    assert rc == 0, err[-3000:]
    uninterrupted = lines[-1]["summary"]["last_loss"]

    run = tmp_path / "paused"
    run.mkdir()
    spec = {**_spec(tiny_model, run, hyperparameters=hp, distributed=distributed), "train_file": str(tmp_path / "c1.jsonl")}
    (run / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "sdpo_engine", "step", str(run / "spec.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                            start_new_session=True)
    assert proc.stdout is not None
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "metrics" and events[-1]["global_step"] == 2:
            os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as the supervisor's pause does
    assert proc.wait(timeout=120) == ExitCode.STOPPED
    stopped = events[-1]
    assert stopped["event"] == "stopped" and 2 <= stopped["global_step"] < 32
    assert Path(stopped["checkpoint"]).is_dir() and not (run / "out").exists()
    # Every rank saved its RNG state into the one checkpoint, and no rank is left running.
    assert sorted(p.name for p in Path(stopped["checkpoint"]).glob("rng_state*")) == ["rng_state_0.pth",
                                                                                   "rng_state_1.pth"]
    # Sealed once both ranks had written their part, with the layout it resumes under.
    assert json.loads((Path(stopped["checkpoint"]) / SEAL_NAME).read_text()) == {"world_size": 2, "strategy": strategy}
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", str(run / "work")], capture_output=True).returncode == 1

    if strategy == "ddp":
        # The same trainer state rerun as one process (the worker now owns one GPU): not resumed (two ranks'
        # RNG states do not map onto one), the step starts afresh with a warning and trains as uninterrupted.
        other = tmp_path / "one-process"
        shutil.copytree(run / "work", other / "work")
        spec_one = {**spec, "output_dir": str(other / "out"), "work_dir": str(other / "work")}
        del spec_one["distributed"]
        rc, lines, err = _run(spec_one, other / "spec.json")
        assert rc == 0, err[-3000:]
        warned = [e for e in lines if e["event"] == "warning" and e["code"] == "resume_layout_changed"]
        assert len(warned) == 1 and warned[0]["checkpoint_layout"] == {"world_size": 2, "strategy": "ddp"}
        assert not any(e.get("phase") == "resume" for e in lines) and lines[-1]["summary"]["resumed_from"] is None
        assert lines[-1]["summary"]["last_loss"] == pytest.approx(uninterrupted, abs=1e-4)

    rc, lines, err = _run(spec, run / "spec.json")
    assert rc == 0, err[-3000:]
    assert any(e.get("phase") == "resume" for e in lines)
    assert abs(lines[-1]["summary"]["last_loss"] - uninterrupted) <= 1e-3
