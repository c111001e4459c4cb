"""Shared by the step benchmarks (step_vs_trl.py, gpu_check.py): plain TRL as a user writes it from
TRL's docs, their baseline (a), and running one variant in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_child(script: str, variant: str, model_dir: str | Path, data: str | Path, hp: dict,
              env: dict | None = None) -> dict:
    """Run `script --child variant ...` in a fresh process (its own imports, its own peak memory) and
    return the JSON line it prints last. Every variant states its own engine settings in its step
    spec; SDPO_PACKING from the caller's shell is dropped all the same (older engines read it)."""
    cmd = [sys.executable, script, "--child", variant, "--model-dir", str(model_dir), "--data", str(data),
           "--hparams", json.dumps(hp)]
    base = {k: v for k, v in os.environ.items() if k != "SDPO_PACKING"}
    done = subprocess.run(cmd, capture_output=True, text=True, env={**base, "TQDM_DISABLE": "1", **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_plain_trl(model_dir: str, data: str, hp: dict, *, on_gpu: bool = False,
                    gradient_checkpointing: bool | None = None, tuned: bool = False) -> dict:
    """One DPO step with TRL's DPOTrainer: the reference model loaded as a second model, DPOConfig
    defaults except what the device needs (no bf16 on CPU), logging every step (to compare the
    loss curves) and the run's hyperparameters. gradient_checkpointing None keeps TRL's default (on).

    `tuned`: TRL as a user who read its docs to the end sets it up for sDPO's case (issue #21's a'):
    `precompute_ref_log_probs=True` with no second model (the policy is the reference) and
    gradient checkpointing off; everything else identical.

    Returns train() seconds, the logged losses and TRL's token count.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import to_trl_rows

    set_seed(hp["seed"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    # float32 weights on both devices: on the GPU the trainer's bf16 autocast does the mixed precision.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    ref = None if tuned else AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    if tuned:
        extra = {"gradient_checkpointing": False, "precompute_ref_log_probs": True,
                 "precompute_ref_batch_size": max(hp["batch_size"], 8)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(output_dir=tmp, bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu,
                        report_to="none", logging_steps=1, save_strategy="no", beta=hp["beta"],
                        learning_rate=hp["learning_rate"], num_train_epochs=hp["n_epochs"],
                        per_device_train_batch_size=hp["batch_size"], max_length=hp["max_length"],
                        warmup_steps=hp.get("warmup_ratio", 0.0), seed=hp["seed"], data_seed=hp["seed"],
                        lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, disable_tqdm=True,
                        **extra)
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, processing_class=tok,
                             train_dataset=Dataset.from_list(to_trl_rows(load_pairs(data), tok)))
        t_train = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t_train
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"train_seconds": train_seconds, "losses": [h["loss"] for h in logs],
            "tokens": max(h.get("num_tokens", 0) for h in logs)}
