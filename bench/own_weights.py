"""The engine's CPU step with and without `sdpo_engine.step.own_weights` (issue #19's CPU side).

    python bench/own_weights.py --model smollm2 --epochs 1 2 --repeats 3

transformers loads safetensors memory-mapped, private: on CPU the policy's loaded weights are the
checkpoint file's pages, and the first optimizer step's writes take one copy-on-write page fault per
4 KiB of weights. `own_weights` copies them into the process's memory first (run_step does it for a
full-weight step on CPU). (m) is the step with the weights left mapped, (b) the step as it runs; both
are `run_step` as in bench/step_vs_trl.py's (b) (preload first, checkpoint saved and hashed), each in
its own process, alternating m/b; each ratio is the median over the repeats of an m run over the b
run right after it. Columns:
  wall m/b          whole step, model load to the saved checkpoint
  first m s / b s   seconds from the end of the reference pass to the first optimizer step's metrics
                    (trainer start, one micro-step's forward and backward, the first AdamW step)
  faults m / b      minor page faults of the process in that same span (thousands)
  mem b/m           peak resident memory of the process
  same              the two loss curves and the checkpoints' sha256 are identical (bit for bit)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import run_child  # noqa: E402


def child(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    import sdpo_engine.step as step

    if args.child == "mapped":
        step.own_weights = lambda model: 0  # run_step looks it up at call time
    step.preload()
    hp = json.loads(args.hparams)
    marks: dict[str, tuple[float, int]] = {}
    losses: list[float] = []

    def now() -> tuple[float, int]:
        return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def emit(event: dict) -> None:
        if event.get("phase") == "memory":  # the last event before train()
            marks["train"] = now()
        if event.get("event") == "metrics":
            losses.append(event["loss"])
            if event.get("global_step") == 1:
                marks["first"] = now()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = step.run_step({"index": 1, "policy_init": args.model_dir, "train_file": args.data,
                                 "output_dir": f"{tmp}/out", "work_dir": f"{tmp}/work", "hyperparameters": hp,
                                 "device": "cpu"}, emit=emit)
        wall = time.perf_counter() - t0
    print(json.dumps({"variant": args.child, "wall": wall, "first": marks["first"][0] - marks["train"][0],
                      "faults": marks["first"][1] - marks["train"][1], "losses": losses,
                      "sha256": summary["output"]["sha256"],
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["mapped", "owned"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hparams", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2", help="tiny, tiny19m, smollm2 or a model directory")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--prompt-ratio", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", default=str(ROOT / ".sdpo" / "bench-models"))
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from step_vs_trl import make_data, model_dir_for

    model_dir = model_dir_for(args.model, Path(args.cache))
    lr = 1e-3 if args.model.startswith("tiny") else 5e-6
    print(f"model {args.model} ({model_dir}), {args.pairs} pairs, prompt ratio {args.prompt_ratio:g}, batch 2, "
          f"max_length 256, lr {lr}, {args.repeats} repeat(s), median of paired ratios")
    print(f"{'epochs':>6} {'wall m/b':>9} {'m wall s':>9} {'b wall s':>9} {'first m s':>10} {'first b s':>10} "
          f"{'faults m':>9} {'faults b':>9} {'mem b/m':>8} {'same':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        make_data(data, args.pairs, args.prompt_ratio, seed=0)
        for epochs in args.epochs:
            hp = {"beta": 0.1, "learning_rate": lr, "n_epochs": epochs, "batch_size": 2, "max_length": 256,
                  "warmup_ratio": 0.1, "seed": 0}
            runs = [{"m": run_child(__file__, "mapped", model_dir, data, hp),
                     "b": run_child(__file__, "owned", model_dir, data, hp)} for _ in range(args.repeats)]

            def med(f, runs=runs):
                return statistics.median(f(r) for r in runs)

            same = all(r["m"]["losses"] == r["b"]["losses"] and r["m"]["sha256"] == r["b"]["sha256"] for r in runs)
            print(f"{epochs:>6} {med(lambda r: r['m']['wall'] / r['b']['wall']):>9.2f} "
                  f"{med(lambda r: r['m']['wall']):>9.1f} {med(lambda r: r['b']['wall']):>9.1f} "
                  f"{med(lambda r: r['m']['first']):>10.2f} {med(lambda r: r['b']['first']):>10.2f} "
                  f"{med(lambda r: r['m']['faults']) / 1000:>8.0f}k {med(lambda r: r['b']['faults']) / 1000:>8.0f}k "
                  f"{med(lambda r: r['b']['peak_mb'] / r['m']['peak_mb']):>8.2f} {'yes' if same else 'NO':>5}",
                  flush=True)


if __name__ == "__main__":
    main()
