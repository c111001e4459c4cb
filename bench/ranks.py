"""One engine step on 1 rank against the same step on N ranks (issue #15), same seed, data and global batch.

    python bench/ranks.py                          # tiny model, 1 rank vs 2 ranks DDP and FSDP2, CPU
    python bench/ranks.py --pairs 64 --repeats 3 --strategies ddp
    python bench/ranks.py --ranks 4 --device cuda  # a GPU node: one rank per GPU
    python bench/ranks.py --fsdp1                  # adds one FSDP2 rank under the launcher against the plain step
    python bench/ranks.py --gpu-check              # GPU machine: plain vs world-size-1 FSDP, and N ranks (ddp,
                                                   # fsdp) when N >= 2 GPUs are visible

Each run is `python -m sdpo_engine step SPEC.json` in a process of its own, as the worker runs it (the N-rank
step re-runs itself under torch.distributed.run), alternating 1-rank and N-rank runs; a ratio is the median
over the repeats of a 1-rank run against the N-rank run right after it. A row "1x fsdp" is one FSDP2
rank under the launcher (`{"num_processes": 1, "strategy": "fsdp"}`) against the plain process: what the
launcher, `fully_shard` and the gathered save cost when nothing is split. Columns:
  wall 1/N        the whole command: imports, reference pass, training, save (the N-rank side also starts
                  torchrun and N interpreters)
  train 1/N       the trainer's own train_runtime (training loop only)
  |loss 1-N|      largest difference between the two loss curves, step by step (the same math: ~1e-7)
On a 2-core machine 2 ranks share the cores the 1-rank run has to itself: a correctness run, not a speed
claim. What N ranks buy (per-rank memory under FSDP, N GPUs' throughput) needs a multi-GPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_step(spec: dict, where: Path) -> dict:
    where.mkdir(parents=True)
    spec = {**spec, "output_dir": str(where / "out"), "work_dir": str(where / "work")}
    (where / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "step", str(where / "spec.json")],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"step failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    train_end = next(e for e in lines if e.get("phase") == "train_end")
    return {"wall": wall, "train": train_end["train_runtime"],
            "losses": [e["loss"] for e in lines if e["event"] == "metrics"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32, help="pairs in the step's chunk")
    p.add_argument("--batch-size", type=int, default=8, help="the global batch (each rank takes batch/N)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--fsdp1", action="store_true", help="add a row: one FSDP2 rank against the plain step")
    p.add_argument("--gpu-check", action="store_true",
                   help="on a GPU machine: --device cuda, the 1x fsdp row, and --ranks = the visible GPUs when >= 2")
    p.add_argument("--model", help="a local model folder instead of the tiny one (a real model on a GPU)")
    args = p.parse_args()
    settings = [(args.ranks, s) for s in args.strategies]
    if args.gpu_check:
        import torch

        args.device = "cuda"
        gpus = torch.cuda.device_count()
        settings = [(1, "fsdp")] + ([(gpus, s) for s in args.strategies] if gpus >= 2 else [])
    elif args.fsdp1:
        settings = [(1, "fsdp"), *settings]

    from sdpo_engine.sample_data import make_pairs, write_jsonl
    from sdpo_engine.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.model) if args.model else build_tiny_model(tmp / "tiny")
        data = write_jsonl(make_pairs(max(1, args.pairs // 2), seed=5)[:args.pairs], tmp / "chunk.jsonl")
        base = {"index": 1, "policy_init": str(model), "train_file": str(data), "device": args.device,
                "hyperparameters": {"learning_rate": 1e-3, "batch_size": args.batch_size, "max_length": 96,
                                    "beta": 0.1, "seed": 0}}
        print(f"{model.name if args.model else 'tiny'} model, {args.pairs} pairs, global batch {args.batch_size}, {args.device}, "
              f"{args.repeats} alternated pair(s) per row")
        print(f"{'setting':<16} {'wall 1/N':>9} {'train 1/N':>10} {'wall 1 s':>9} {'wall N s':>9} {'|loss 1-N|':>11}")
        for ranks, strategy in settings:
            walls, trains, one_s, n_s, worst = [], [], [], [], 0.0
            for r in range(args.repeats):
                one = run_step(base, tmp / f"{ranks}-{strategy}-{r}-one")
                many = run_step({**base, "distributed": {"num_processes": ranks, "strategy": strategy}},
                                tmp / f"{ranks}-{strategy}-{r}-many")
                walls.append(one["wall"] / many["wall"])
                trains.append(one["train"] / many["train"])
                one_s.append(one["wall"])
                n_s.append(many["wall"])
                worst = max([worst, *(abs(a - b) for a, b in zip(one["losses"], many["losses"], strict=True))])
            print(f"{f'{ranks}x {strategy}':<16} {statistics.median(walls):>9.2f} {statistics.median(trains):>10.2f} "
                  f"{statistics.median(one_s):>9.1f} {statistics.median(n_s):>9.1f} {worst:>11.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
