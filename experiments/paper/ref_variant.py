"""One DPO step whose policy starts from a model *other than* its reference (the paper's Figure 3).

The engine's `run_step` always uses the step's `policy_init` as its frozen reference, which is what
sDPO is; this ablation needs policy = S and reference = M1. It is built here, on TRL's DPOTrainer
with an explicit `ref_model`, reusing the engine's `dpo_config` and `to_trl_rows` so that the data,
tokenization, hyperparameters, batch order and learning-rate schedule are exactly those of the
engine's step 2 (same seed). With `precompute_ref_log_probs=True` (set by `dpo_config`) TRL
computes the reference log-probs with `ref_model` before training.
"""

from __future__ import annotations

import math
import time
from pathlib import Path


def train_with_other_reference(policy_init: str | Path, reference: str | Path, pairs: list[dict],
                               work_dir: str | Path, hyperparameters: dict, *, device: str = "cpu",
                               save_to: str | Path | None = None) -> dict:
    """Train `policy_init` with DPO against the frozen `reference` on `pairs`.

    Returns the loss curve, the reference's and the initial policy's gammas on `pairs`, and the
    loss the theory predicts at the start: mean over pairs of -log sigmoid(beta * (gamma_init - gamma_ref)).
    """
    from datasets import Dataset
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    from sdpo_engine.config import StepConfig
    from sdpo_engine.step import dpo_config, gammas, load_policy, pair_logps, to_trl_rows

    t0 = time.perf_counter()
    cfg = StepConfig.from_dict(hyperparameters)
    set_seed(cfg.seed)
    tokenizer, policy = load_policy(policy_init, device)
    _, ref_model = load_policy(reference, device)
    init_c, init_r = pair_logps(policy, tokenizer, pairs, max_length=cfg.max_length,
                                batch_size=max(cfg.batch_size, 8), device=device)
    args = dpo_config(cfg, str(work_dir), device)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args,
                         train_dataset=Dataset.from_list(to_trl_rows(pairs, tokenizer)), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    ref_g = gammas(list(trainer.train_dataset["ref_chosen_logps"]), list(trainer.train_dataset["ref_rejected_logps"]))
    init_g = gammas(init_c, init_r)
    if len(ref_g) != len(init_g):
        raise ValueError("some pairs were dropped for length; raise max_length")
    predicted = sum(_neg_log_sigmoid(cfg.beta * (a - b)) for a, b in zip(init_g, ref_g, strict=True)) / len(ref_g)
    trainer.train()
    curve = [{"global_step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history
             if "loss" in h and "train_runtime" not in h]
    if save_to:
        trainer.model.save_pretrained(save_to, safe_serialization=True)
        tokenizer.save_pretrained(save_to)
    del trainer, policy, ref_model
    return {
        "curve": curve,
        "first_loss": curve[0]["loss"],
        "last_loss": curve[-1]["loss"],
        "predicted_first_loss": predicted,
        "mean_gamma_reference": sum(ref_g) / len(ref_g),
        "mean_gamma_policy_init": sum(init_g) / len(init_g),
        "seconds": time.perf_counter() - t0,
    }


def _neg_log_sigmoid(x: float) -> float:
    # -log sigmoid(x) = log(1 + exp(-x)), computed stably
    return math.log1p(math.exp(-x)) if x > -30 else -x
