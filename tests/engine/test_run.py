"""The engine as a command: stop and resume, the run command's files, easy-to-hard by measured score."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

from sdpo_engine.sample_data import make_pairs, write_jsonl

HP = {"learning_rate": 1e-3, "batch_size": 1, "max_length": 96, "seed": 0}


def _read_events(proc, until=None, timeout=240):
    """Read JSON lines from the child until `until(event)` is true or it exits."""
    events = []
    deadline = time.time() + timeout
    for line in proc.stdout:
        events.append(json.loads(line))
        if until and until(events[-1]):
            break
        assert time.time() < deadline, "step did not reach the expected point in time"
    return events


def test_sigterm_saves_a_resumable_checkpoint_and_a_rerun_continues(tmp_path, tiny_model):
    train = write_jsonl(make_pairs(40, seed=7), tmp_path / "train.jsonl")  # 80 pairs, batch 1, 3 epochs
    spec = {"index": 1, "policy_init": str(tiny_model), "train_file": str(train),
            "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "hyperparameters": {**HP, "n_epochs": 3}, "device": "cpu"}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "sdpo_engine", "step", str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    _read_events(proc, until=lambda e: e.get("event") == "metrics" and e["global_step"] >= 5)
    proc.send_signal(signal.SIGTERM)
    rest = _read_events(proc)
    assert proc.wait(timeout=60) == 75
    stopped = [e for e in rest if e.get("event") == "stopped"]
    assert stopped and stopped[0]["checkpoint"], rest[-3:]
    stopped_at = stopped[0]["global_step"]
    assert 5 <= stopped_at < 240
    assert not (tmp_path / "out").exists(), "a stopped step must not publish an output checkpoint"

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert any(e.get("phase") == "resume" for e in events)
    steps = [e["global_step"] for e in events if e.get("event") == "metrics"]
    assert steps[0] == stopped_at + 1, "the rerun did not continue from the saved global step"
    assert steps[-1] == 240
    result = [e for e in events if e.get("event") == "result"][0]["summary"]
    assert result["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    # the summary spans the whole step, first loss from before the stop
    assert abs(result["first_loss"] - math.log(2)) < 1e-4


def test_bad_data_exits_2_with_line_numbers(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\nnot json\n')
    spec = {"index": 1, "policy_init": str(tiny_model), "train_file": str(bad), "output_dir": str(tmp_path / "o"),
            "work_dir": str(tmp_path / "w"), "hyperparameters": HP, "device": "cpu"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "step", str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    err = json.loads(done.stdout.splitlines()[-1])
    assert err["event"] == "error" and {e["line"] for e in err["errors"]} == {1, 2}


def test_run_command_easy_to_hard_writes_metrics_and_summary(tmp_path, tiny_model):
    train = write_jsonl(make_pairs(12, seed=3), tmp_path / "train.jsonl")
    held = write_jsonl(make_pairs(4, seed=4), tmp_path / "held.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdpo_engine", "run", "--model", str(tiny_model), "--train-file", str(train),
           "--partition", "easy_to_hard", "--steps", "2", "--eval-file", str(held), "--out", str(out),
           "--learning-rate", "1e-3", "--batch-size", "4", "--max-length", "96", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final checkpoint" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["partition"]["source_scores"]
    order = summary["partition"]["source_order"]
    assert order == sorted(scores, key=lambda s: (-scores[s], s)), "sources not ordered easiest first"
    for k, source in enumerate(order, start=1):  # one source per step, in the measured order
        rows = [json.loads(line) for line in (out / "data" / f"step-{k}.jsonl").read_text().splitlines()]
        assert {r["source"] for r in rows} == {source}
    for s in summary["steps"]:
        assert {"index", "reference", "output", "first_loss", "mean_gamma_ref", "last_loss", "reward_accuracy",
                "reward_margin", "eval"} <= set(s)
        assert len(s["output"]["sha256"]) == 64
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "global_step", "loss"} <= set(x) for x in lines)
    assert {x["step"] for x in lines} == {1, 2}
    # re-running the finished job trains nothing again and gives the same checkpoints
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads((out / "summary.json").read_text())["steps"][1]["output"] == summary["steps"][1]["output"]


def test_engine_processes_keep_known_import_noise_out_of_their_stderr(tmp_path):
    """transformers imports torchao (the perf extra) and, on a CPU-only torch, torchao warns about each CUDA
    library it cannot load and torch about each Enum it registers: lines in every step's log that read as
    failures. The engine's entry point drops them; a plain import still shows them (so this can fail)."""
    import importlib.util

    assert importlib.util.find_spec("torchao") is not None, "install.sh installs the perf extra (torchao)"
    noise = ("Failed to load", "is an Enum subclass and is now natively supported")
    plain = subprocess.run([sys.executable, "-c", "import transformers.modeling_utils"], capture_output=True,
                           text=True, timeout=300)
    cpu_only = not __import__("torch").cuda.is_available()
    if cpu_only:
        assert any(n in plain.stderr for n in noise), plain.stderr[-2000:]
    engine = subprocess.run([sys.executable, "-m", "sdpo_engine", "tiny-model", str(tmp_path / "tiny")],
                            capture_output=True, text=True, timeout=300)
    assert engine.returncode == 0, engine.stderr[-2000:]
    assert not [line for line in engine.stderr.splitlines() if any(n in line for n in noise)], engine.stderr[-2000:]
