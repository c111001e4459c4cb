"""One DPO step: plain TRL as a user writes it (a) against this engine's step (b), side by side.

    python bench/step_vs_trl.py --model tiny --epochs 1 2
    python bench/step_vs_trl.py --model smollm2 --epochs 1 2 --pairs 16 --prompt-ratio 3

(a) follows TRL's docs: the reference model loaded as a second model, DPOConfig defaults except
what a CPU needs (bf16=False) and logging every step (to compare the loss curves). (b) is
`sdpo_engine.step.run_step`: the reference log-probs precomputed once by the initial policy.
Each variant runs in its own process (so peak RSS is its own) on the same data, seed and
hyperparameters, alternating a/b to spread machine noise. Prints ratios, never absolute claims.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILLER = ("The assistant reads the request carefully, keeps the answer short and polite, and "
          "checks any numbers before it replies. ")


def make_data(path: Path, n_pairs: int, prompt_ratio: float, seed: int) -> None:
    """Sample pairs whose prompts are about `prompt_ratio` times longer than the answers."""
    from sdpo_engine.sample_data import make_pairs, write_jsonl

    rows = make_pairs((n_pairs + 1) // 2, seed=seed)[:n_pairs]
    rng = random.Random(seed)
    for r in rows:
        answer_chars = (len(r["chosen"]) + len(r["rejected"])) / 2
        need = max(0, int(prompt_ratio * answer_chars) - len(r["prompt"]))
        context = (FILLER * (need // len(FILLER) + 1))[:need]
        r["prompt"] = (context + " " if context else "") + r["prompt"]
        rng.random()
    write_jsonl(rows, path)


def child(args) -> None:
    """Run one variant and print one JSON line of measurements."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Import everything first: both variants pay the same import cost, which is not the step's.
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import run_step, to_trl_rows

    t0 = time.perf_counter()
    hp = json.loads(args.hparams)
    if args.child == "engine":
        events = []
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_step({"index": 1, "policy_init": args.model_dir, "train_file": args.data,
                                "output_dir": f"{tmp}/out", "work_dir": f"{tmp}/work", "hyperparameters": hp,
                                "device": "cpu"}, emit=events.append)
            wall = time.perf_counter() - t0
        losses = [e["loss"] for e in events if e["event"] == "metrics"]
        tokens = max((e.get("num_tokens") or 0) for e in events if e["event"] == "metrics")
        train_seconds = summary["train_seconds"]
    else:
        set_seed(hp["seed"])
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")
        ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = DPOConfig(output_dir=tmp, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                            beta=hp["beta"], learning_rate=hp["learning_rate"], num_train_epochs=hp["n_epochs"],
                            per_device_train_batch_size=hp["batch_size"], max_length=hp["max_length"],
                            warmup_steps=hp["warmup_ratio"], seed=hp["seed"], data_seed=hp["seed"],
                            lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, disable_tqdm=True)
            rows = to_trl_rows(load_pairs(args.data), tok)
            trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok)
            t_train = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - t_train
            wall = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        losses = [h["loss"] for h in logs]
        tokens = max(h.get("num_tokens", 0) for h in logs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": args.child, "wall": wall, "train_seconds": train_seconds, "tokens": tokens,
                      "peak_mb": peak_mb, "losses": losses}))


def run_variant(variant: str, model_dir: str, data: Path, hp: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model-dir", model_dir, "--data", str(data),
           "--hparams", json.dumps(hp)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_dir_for(name: str, cache: Path) -> str:
    from sdpo_engine.models import resolve_base_model

    return str(resolve_base_model({"tiny": "sdpo-tiny", "smollm2": "smollm2-135m"}.get(name, name), cache))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["plain", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hparams", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny", help="tiny, smollm2 or a model directory")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--prompt-ratio", type=float, default=3.0, help="prompt length / answer length")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--repeats", type=int, default=1, help="a/b pairs per setting (alternated)")
    p.add_argument("--cache", default=str(ROOT / ".sdpo" / "bench-models"))
    args = p.parse_args()
    if args.child:
        child(args)
        return

    model_dir = model_dir_for(args.model, Path(args.cache))
    lr = args.learning_rate or (1e-3 if args.model == "tiny" else 5e-6)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        make_data(data, args.pairs, args.prompt_ratio, seed=0)
        print(f"model {args.model} ({model_dir}), {args.pairs} pairs, prompt/answer ~{args.prompt_ratio}x, "
              f"batch {args.batch_size}, max_length {args.max_length}, lr {lr}")
        print(f"{'epochs':>6} {'wall a/b':>9} {'train tok/s b/a':>16} {'peak mem b/a':>13} {'max |loss a-b|':>15} "
              f"{'a wall s':>9} {'b wall s':>9} {'a peak MB':>10} {'b peak MB':>10}")
        for epochs in args.epochs:
            hp = {"beta": 0.1, "learning_rate": lr, "n_epochs": epochs, "batch_size": args.batch_size,
                  "max_length": args.max_length, "warmup_ratio": 0.1, "seed": 0}
            a_runs, b_runs = [], []
            for _ in range(args.repeats):
                a_runs.append(run_variant("plain", model_dir, data, hp))
                b_runs.append(run_variant("engine", model_dir, data, hp))
            a = min(a_runs, key=lambda r: r["wall"])
            b = min(b_runs, key=lambda r: r["wall"])
            diff = max((abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)), default=float("nan"))
            tps_a, tps_b = a["tokens"] / a["train_seconds"], b["tokens"] / b["train_seconds"]
            print(f"{epochs:>6} {a['wall'] / b['wall']:>9.2f} {tps_b / tps_a:>16.2f} {b['peak_mb'] / a['peak_mb']:>13.2f} "
                  f"{diff:>15.2e} {a['wall']:>9.1f} {b['wall']:>9.1f} {a['peak_mb']:>10.0f} {b['peak_mb']:>10.0f}")


if __name__ == "__main__":
    main()
