"""The value each DPO loss takes when the policy is its reference: the first loss of every sDPO step.

Pure Python (no torch). An sDPO step starts its policy from the checkpoint that is also its
reference, so before the first update every log-ratio log pi/pi_ref is 0 and every loss of TRL
1.16's DPOTrainer (trl/trainer/dpo_trainer.py, `_compute_loss`) has a value that depends only on
its settings, except `sft`, whose NLL is the reference's own. The engine compares the first logged
loss with this value (step.py, `first_loss_not_ln2` warning); tests/engine/test_loss_family.py checks
it for every loss.

At policy = reference, with beta, label smoothing epsilon and log-ratios 0 (so TRL's delta_score = 0
for every f-divergence, and every reward beta*logratio = 0):

  sigmoid, sigmoid_norm, robust, aot, aot_unpaired   ln 2   (-log sigmoid(0); robust's
                                                     ((1-e) ln2 - e ln2) / (1-2e) = ln 2)
  hinge                                              1      relu(1 - 0)
  ipo                                                1/(4 beta^2)   (0 - 1/(2 beta))^2
  exo_pair                                           -ln 2 - (ln e + ln(1-e))/2
  nca_pair, bco_pair                                 2 ln 2
  sppo_hard                                          1/(2 beta^2)   2 (0.5/beta)^2
  apo_zero, apo_down                                 1      (1 - 1/2) + 1/2
  discopop                                           (ln 2 + 1)/2   (modulation sigmoid(0) = 1/2)
  sft                                                the reference's mean NLL per chosen token of the
                                                     batch: -sum(ref chosen log-probs) / chosen tokens

TRL sums the losses as sum_k w_k * mean(loss_k), so a combination takes sum_k w_k * value_k.
"""

from __future__ import annotations

import math

LN2 = math.log(2)


def loss_at_reference(loss_type: str, *, beta: float, label_smoothing: float = 0.0,
                      sft_nll: float | None = None) -> float | None:
    """One loss's value at policy = reference. `sft_nll`: the reference's mean NLL per chosen token over
    the batch (nats), needed for "sft" only; None there gives None (not known). ValueError for a name
    TRL 1.16 does not have."""
    constant = {
        "sigmoid": LN2, "sigmoid_norm": LN2, "robust": LN2, "aot": LN2, "aot_unpaired": LN2,
        "hinge": 1.0, "apo_zero": 1.0, "apo_down": 1.0,
        "nca_pair": 2 * LN2, "bco_pair": 2 * LN2,
        "discopop": (LN2 + 1.0) / 2,
    }
    if loss_type in constant:
        return constant[loss_type]
    if loss_type == "ipo":
        return 1.0 / (4.0 * beta * beta)
    if loss_type == "sppo_hard":
        return 1.0 / (2.0 * beta * beta)
    if loss_type == "exo_pair":
        eps = label_smoothing
        return -LN2 - 0.5 * (math.log(eps) + math.log1p(-eps))
    if loss_type == "sft":
        return sft_nll
    raise ValueError(f"unknown loss type {loss_type!r}")


def combined_loss_at_reference(loss_types: list[str], loss_weights: list[float] | None, *, beta: float,
                               label_smoothing: float = 0.0, sft_nll: float | None = None) -> float | None:
    """TRL's weighted sum (weights default 1) at policy = reference; None when a term is not known
    (sft without `sft_nll`)."""
    weights = loss_weights or [1.0] * len(loss_types)
    total = 0.0
    for name, weight in zip(loss_types, weights, strict=True):
        value = loss_at_reference(name, beta=beta, label_smoothing=label_smoothing, sft_nll=sft_nll)
        if value is None:
            return None
        total += weight * value
    return total
