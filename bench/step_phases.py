"""Where a step's time goes, phase by phase: TRL tuned by hand (a') against the engine's trainer with
several pairs per packed row (b, the default) and with one pair per row (b3), on one data shape.

    python bench/step_phases.py --model tiny19m --shape short --pairs 96 --batch-size 8 --max-length 128

All three run in this one process, one after the other (imports paid once, not measured), on the same
data, seed and hyperparameters, each `--repeats` times in turn (a', b, b3, a', b, b3, ...); printed are
the medians per phase, in wall seconds and in CPU seconds of the process (all threads: less sensitive
to other load on the machine), and b's ratio against the two others. Phases:
  reference      the reference log-probs before training (a': TRL's precompute; b: the engine's pass)
  collate        the data collator, every micro-batch (b: TRL's tensors plus the packed rows)
  forward        compute_loss: the policy's forward and TRL's loss and metrics
  backward       accelerator.backward
  optimizer      the optimizer step (gradient clipping excluded), every optimizer step
  train (all)    trainer.train() as a whole: the phases above plus the loop's own overhead
  save, sha256   save_pretrained of the trained model, then hashing its files (manifest.file_hashes)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_vs_trl import make_shape, model_dir_for  # noqa: E402

PHASES = ("reference", "collate", "forward", "backward", "optimizer", "train (all)", "save", "sha256")


class _Clock:
    """Wall and process-CPU seconds summed per phase."""

    def __init__(self):
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase, fn):
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[phase] += time.perf_counter() - w
                self.cpu[phase] += time.process_time() - c
        return timed


def _run(side: str, model_dir: str, data: Path, hp: dict) -> _Clock:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import DPOConfig, DPOTrainer

    from sdpo_engine.config import StepConfig
    from sdpo_engine.data import load_pairs
    from sdpo_engine.manifest import file_hashes
    from sdpo_engine.step import _trainer_class, build_trainer, dpo_config, load_policy, to_trl_rows

    clock = _Clock()

    class OptimizerClock(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.t = (time.perf_counter(), time.process_time())

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.wall["optimizer"] += time.perf_counter() - self.t[0]
            clock.cpu["optimizer"] += time.process_time() - self.t[1]

    set_seed(hp["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        if side == "a'":
            tok = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
            cfg = DPOConfig(output_dir=tmp, bf16=False, use_cpu=True, report_to="none", logging_steps=1,
                            save_strategy="no", beta=hp["beta"], learning_rate=hp["learning_rate"],
                            num_train_epochs=hp["n_epochs"], per_device_train_batch_size=hp["batch_size"],
                            max_length=hp["max_length"], seed=hp["seed"], data_seed=hp["seed"], max_grad_norm=1.0,
                            weight_decay=0.0, disable_tqdm=True, gradient_checkpointing=False,
                            precompute_ref_log_probs=True, precompute_ref_batch_size=max(hp["batch_size"], 8))
            original = DPOTrainer._precompute_ref_logps
            DPOTrainer._precompute_ref_logps = clock.wrap("reference", original)
            try:
                trainer = DPOTrainer(model=model, args=cfg, processing_class=tok, callbacks=[OptimizerClock()],
                                     train_dataset=Dataset.from_list(to_trl_rows(load_pairs(data), tok)))
            finally:
                DPOTrainer._precompute_ref_logps = original
        else:
            tok, model = load_policy(model_dir, "cpu")
            args = dpo_config(StepConfig.from_dict(hp), tmp, "cpu")
            cls = _trainer_class()
            original = cls._precompute_ref_logps
            cls._precompute_ref_logps = clock.wrap("reference", original)
            try:
                trainer = build_trainer(model, tok, to_trl_rows(load_pairs(data), tok), args,
                                        callbacks=[OptimizerClock()], pack_tokens=0 if side == "b3" else None)
            finally:
                cls._precompute_ref_logps = original
        trainer.data_collator = clock.wrap("collate", trainer.data_collator)
        trainer.compute_loss = clock.wrap("forward", trainer.compute_loss)
        trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
        clock.wrap("train (all)", trainer.train)()
        if clock.wall["reference"] == 0.0:
            raise RuntimeError(f"{side}: the reference pass was not timed (it ran elsewhere)")
        out = Path(tmp) / "saved"
        clock.wrap("save", lambda: (trainer.model.save_pretrained(out, safe_serialization=True),
                                    tok.save_pretrained(out)))()
        clock.wrap("sha256", file_hashes)(out)
    return clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny19m", help="tiny, tiny19m, smollm2 or a model directory")
    p.add_argument("--shape", default="short", choices=["short", "prompt3x", "multiturn", "skewed"])
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cache", default=str(ROOT / ".sdpo" / "bench-models"))
    args = p.parse_args()
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    model_dir = model_dir_for(args.model, Path(args.cache))
    hp = {"beta": 0.1, "learning_rate": 1e-3 if args.model.startswith("tiny") else 5e-6, "n_epochs": args.epochs,
          "batch_size": args.batch_size, "max_length": args.max_length, "warmup_ratio": 0.0, "seed": 0}
    sides = ("a'", "b", "b3")
    runs: dict[str, list[_Clock]] = {s: [] for s in sides}
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        make_shape(data, args.shape, args.pairs, seed=0, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                   max_length=args.max_length)
        for _ in range(args.repeats):
            for side in sides:
                runs[side].append(_run(side, model_dir, data, hp))
    print(f"model {args.model}, shape {args.shape}, {args.pairs} pairs, batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.epochs} epoch(s), median of {args.repeats}; load {os.getloadavg()[0]:.1f}")
    print(f"{'phase':>12} " + " ".join(f"{s + ' wall':>9} {s + ' cpu':>8}" for s in sides)
          + f" {'cpu a`/b':>9} {'cpu b3/b':>9}")
    for phase in PHASES:
        wall = {s: statistics.median(c.wall[phase] for c in runs[s]) for s in sides}
        cpu = {s: statistics.median(c.cpu[phase] for c in runs[s]) for s in sides}
        ratios = [f"{cpu[s] / cpu['b']:>9.2f}" if cpu["b"] > 0 else f"{'-':>9}" for s in (sides[0], "b3")]
        print(f"{phase:>12} " + " ".join(f"{wall[s]:>9.2f} {cpu[s]:>8.2f}" for s in sides) + " " + " ".join(ratios))


if __name__ == "__main__":
    main()
