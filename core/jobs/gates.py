"""Step gates: what must hold after each step of an sDPO job, on the held-out (validation) pairs.

A job's gate (``method.sdpo.gate``, checked by api/jobs/spec.py) is

    {"metric": "eval.reward_accuracy" | "eval.preference_accuracy" | "eval.reward_margin",
     "min_delta": float (default 0.0), "on_fail": "stop" | "rollback", "max_drift": float | null}

After step k the step's held-out value of `metric` (computed by the engine against the fixed base
model, `StepMetrics.eval`) is compared with step k-1's; step 1 is compared with the base model
itself (reward accuracy and margin 0 by definition, preference accuracy the base's own,
`drift.base_preference_accuracy`). The gate fails when value − previous < min_delta, or when
`max_drift` is set and the step's `drift.max_abs_per_token` (nats per token from the base,
sdpo_engine/drift.py) exceeds it. On a failure the chain stops and the job succeeds with:

- ``stop``: the failing step's checkpoint as its result;
- ``rollback``: the best step so far by `metric` (the earliest on a tie), the failing step
  included unless it failed on drift; when no step is eligible (step 1 failed on drift) the
  failing step is kept, and the outcome says so (``rolled_back: false``).

Pure functions; core.jobs.lifecycle applies them in the step's "succeeded" transaction.
"""

from __future__ import annotations

from typing import Any

GATE_METRICS = ("eval.reward_accuracy", "eval.preference_accuracy", "eval.reward_margin")
GATE_ACTIONS = ("stop", "rollback")


def gate_of(method: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's gate from its method echo (`method.sdpo.gate`), or None."""
    sdpo = (method or {}).get("sdpo") or {}
    gate = sdpo.get("gate")
    return gate if isinstance(gate, dict) else None


def metric_value(metrics: dict[str, Any] | None, metric: str) -> float | None:
    """A step's value of `metric` ("eval.<key>"), None when the step has no held-out metrics."""
    section, _, key = metric.partition(".")
    value = ((metrics or {}).get(section) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def base_value(metrics: dict[str, Any] | None, metric: str) -> float | None:
    """The base model's value of `metric` on the held-out pairs (the step-0 value step 1 is compared
    with): its rewards against itself are 0, its preference accuracy is drift.base_preference_accuracy."""
    if metric == "eval.preference_accuracy":
        value = ((metrics or {}).get("drift") or {}).get("base_preference_accuracy")
        return float(value) if isinstance(value, (int, float)) else None
    return 0.0


def drift_value(metrics: dict[str, Any] | None) -> float | None:
    value = ((metrics or {}).get("drift") or {}).get("max_abs_per_token")
    return float(value) if isinstance(value, (int, float)) else None


def check_gate(gate: dict[str, Any], history: list[tuple[int, str, dict[str, Any] | None]]) -> dict[str, Any] | None:
    """Check the gate after the last step of `history` ([(step index, output checkpoint id, metrics)]
    of the succeeded steps, in order). None when it holds; else the outcome recorded on the job:

    {"status": "failed", "metric", "min_delta", "max_drift", "on_fail", "failed_step", "reason"
     ("min_delta" | "max_drift" | "no_eval"), "value", "previous": {"step" (0: the base), "value"},
     "delta", "drift", "result_step", "result_checkpoint", "rolled_back"}
    """
    metric = gate["metric"]
    min_delta = float(gate.get("min_delta") or 0.0)
    max_drift = gate.get("max_drift")
    index, checkpoint, metrics = history[-1]
    value = metric_value(metrics, metric)
    if len(history) > 1:
        previous_step, previous = history[-2][0], metric_value(history[-2][2], metric)
    else:
        previous_step, previous = 0, base_value(metrics, metric)
    drift = drift_value(metrics)
    delta = value - previous if value is not None and previous is not None else None
    if value is None or previous is None:
        reason = "no_eval"  # the engine reported no held-out metrics: the gate cannot be shown to hold
    elif max_drift is not None and drift is not None and drift > float(max_drift):
        reason = "max_drift"
    elif delta is not None and delta < min_delta:
        reason = "min_delta"
    else:
        return None
    result_step, result_checkpoint, rolled_back = index, checkpoint, False
    if gate.get("on_fail") == "rollback":
        candidates = [(i, c, metric_value(m, metric)) for i, c, m in history
                      if not (i == index and reason != "min_delta")]
        candidates = [x for x in candidates if x[2] is not None]
        if candidates:
            best = max(candidates, key=lambda x: (x[2], -x[0]))  # the earliest best
            result_step, result_checkpoint, rolled_back = best[0], best[1], best[0] != index
    return {"status": "failed", "metric": metric, "min_delta": min_delta, "max_drift": max_drift,
            "on_fail": gate.get("on_fail", "stop"), "failed_step": index, "reason": reason, "value": value,
            "previous": {"step": previous_step, "value": previous}, "delta": delta, "drift": drift,
            "result_step": result_step, "result_checkpoint": result_checkpoint, "rolled_back": rolled_back}


def describe(outcome: dict[str, Any]) -> str:
    """The event's wording of a failed gate."""
    def num(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, (int, float)) else "-"

    prev = outcome["previous"]
    was = "the base" if prev["step"] == 0 else f"step {prev['step']}"
    if outcome["reason"] == "max_drift":
        why = f"drift {num(outcome['drift'])} nats/token > max_drift {num(outcome['max_drift'])}"
    elif outcome["reason"] == "no_eval":
        why = f"no held-out {outcome['metric']} was reported"
    else:
        why = (f"{outcome['metric']} {num(prev['value'])} ({was}) -> {num(outcome['value'])}, delta "
               f"{num(outcome['delta'])} < min_delta {num(outcome['min_delta'])}")
    if outcome["on_fail"] == "rollback" and outcome["rolled_back"]:
        then = f"rolled back to step {outcome['result_step']} (checkpoint {outcome['result_checkpoint']})"
    else:
        then = f"stopped; the result is step {outcome['result_step']} (checkpoint {outcome['result_checkpoint']})"
    return f"Gate failed after step {outcome['failed_step']}: {why}; {then}."
