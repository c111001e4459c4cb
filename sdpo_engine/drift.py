"""Drift from the base model: how far a step's policy has moved from where the job started.

In sDPO the reference moves every step (M_{t-1}), so a step's own rewards say how far it moved from
the previous step, not from the start. The held-out pass already scores the validation pairs under
the fixed base model (the job's starting model, `StepSpec.eval_reference`); drift compares the step's
policy with those base log-probs:

- ``chosen_logratio`` / ``rejected_logratio``: mean over the validation pairs of
  log π_θ(y|x) − log π_base(y|x), summed over the answer's tokens (nats per answer);
- ``chosen_logratio_per_token`` / ``rejected_logratio_per_token``: the same log-ratios summed over
  every pair and divided by the answers' scored tokens (nats per token; token-weighted, so long and
  short answers count by their length);
- ``reward_margin``: β · mean((log-ratio chosen) − (log-ratio rejected)), the implicit reward margin
  against the base (equal to ``eval.reward_margin``, which is computed against the same base);
- ``max_abs_per_token``: max(|chosen per token|, |rejected per token|), what a gate's ``max_drift``
  bounds;
- ``base_preference_accuracy``: share of pairs the base itself prefers chosen on (gamma > 0), the
  base's ``eval.preference_accuracy`` (a gate's step-0 value for that metric).

Before any training the policy is the base and every number is exactly 0. Source of the
log-probs and token counts: ``step.pair_logps`` (TRL's reference pass: same tokenization,
truncation and masking as training; pairs without training signal are left out of both).
"""

from __future__ import annotations

from collections.abc import Sequence

LogProbs = tuple[Sequence[float], Sequence[float]]  # (chosen, rejected) summed completion log-probs
Lengths = Sequence[tuple[int, int]]  # (chosen, rejected) scored completion tokens per pair

DRIFT_KEYS = ("chosen_logratio", "rejected_logratio", "chosen_logratio_per_token", "rejected_logratio_per_token",
              "reward_margin", "max_abs_per_token", "base_preference_accuracy")


def drift_metrics(policy: LogProbs, base: LogProbs, lengths: Lengths, beta: float) -> dict[str, float | int]:
    """Drift of `policy` from `base` over the same pairs (see the module doc for each key).

    `policy` and `base` are `pair_logps` results for the same pairs, `lengths` their scored token
    counts (`pair_logps(..., lengths=[])`), `beta` the step's β. Returns {"pairs": 0} for no pairs.
    Raises ValueError when the three do not cover the same number of pairs.
    """
    pc, pr = policy
    bc, br = base
    n = len(pc)
    if not (len(pr) == len(bc) == len(br) == len(lengths) == n):
        raise ValueError(f"drift needs as many base log-probs and lengths as policy log-probs: policy {n}, "
                         f"base {len(bc)}/{len(br)}, lengths {len(lengths)}")
    if n == 0:
        return {"pairs": 0}
    dc = [a - b for a, b in zip(pc, bc, strict=True)]
    dr = [a - b for a, b in zip(pr, br, strict=True)]
    tokens_c = sum(c for c, _ in lengths)
    tokens_r = sum(r for _, r in lengths)
    per_token_c = sum(dc) / tokens_c if tokens_c else 0.0
    per_token_r = sum(dr) / tokens_r if tokens_r else 0.0
    return {
        "pairs": n,
        "chosen_logratio": sum(dc) / n,
        "rejected_logratio": sum(dr) / n,
        "chosen_logratio_per_token": per_token_c,
        "rejected_logratio_per_token": per_token_r,
        "reward_margin": beta * sum(c - r for c, r in zip(dc, dr, strict=True)) / n,
        "max_abs_per_token": max(abs(per_token_c), abs(per_token_r)),
        "base_preference_accuracy": sum(c > r for c, r in zip(bc, br, strict=True)) / n,
    }
