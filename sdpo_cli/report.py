"""What both demos print: a job's events as they happen, and the per-step table (HTTP only)."""

from __future__ import annotations

import time
from typing import Any, TextIO

from sdpo_cli.sdk import SDPOClient


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(steps: list[dict[str, Any]], job: dict[str, Any], out: TextIO | None = None) -> None:
    """The per-step table: reference -> output checkpoint, first and last loss, mean gamma of the
    reference, reward accuracy and margin, held-out reward accuracy (`-` where a step has none)."""
    print(f"\n{'step':>4}  {'reference':<31} {'output':<31} {'first_loss':>10} {'gamma_ref':>10} {'last_loss':>9} "
          f"{'rew_acc':>7} {'margin':>7} {'heldout_acc':>11}", file=out)
    for s in steps:
        m = s.get("metrics") or {}
        ref = s.get("reference_checkpoint") or job["model"]
        held = (m.get("eval") or {}).get("reward_accuracy")
        print(f"{s['index']:>4}  {ref:<31} {str(s.get('output_checkpoint')):<31} {_fmt(m.get('first_loss')):>10} "
              f"{_fmt(m.get('mean_gamma_ref'), '.3f'):>10} {_fmt(m.get('last_loss')):>9} "
              f"{_fmt(m.get('reward_accuracy'), '.3f'):>7} {_fmt(m.get('reward_margin'), '.3f'):>7} "
              f"{_fmt(held, '.3f'):>11}", file=out)


def follow(client: SDPOClient, job: dict[str, Any], *, timeout: float, out: TextIO | None = None) -> dict[str, Any]:
    """Print the job's events live (server-sent events) until it ends: lifecycle messages as
    `- message`, training metrics as one line per change. Returns the finished job. Raises
    TimeoutError when it is still running after `timeout` seconds (checked as events arrive)."""
    deadline = time.monotonic() + timeout
    last_line = ""
    for event in client.jobs.stream_events(job["id"]):
        if event.get("type") == "metrics":
            d = event.get("data") or {}
            line = (f"  step {d.get('step')} [{d.get('global_step')}/{d.get('max_steps')}] loss "
                    f"{_fmt(d.get('loss'))} reward acc {_fmt(d.get('rewards/accuracies'), '.2f')}")
            if line != last_line:
                last_line = line
                print(line, file=out, flush=True)
        else:
            print(f"- {event['message']}", file=out, flush=True)
        if time.monotonic() > deadline:
            break
    job = client.jobs.retrieve(job["id"])
    if job["status"] not in ("succeeded", "failed", "cancelled"):
        raise TimeoutError(f"job {job['id']} still {job['status']} after {timeout:.0f} s")
    return job
