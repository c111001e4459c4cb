"""`sdpo demo`: the main job, end to end over HTTP.

Starts the embedded service if none answers, uploads the bundled sample preference set (two
sources of different difficulty: polite greetings and sums), submits a 2-step sDPO job with the
paper's easy-to-hard partition, follows its progress, and prints the per-step table.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import socket
import sys
import time
from pathlib import Path

import httpx

from core.settings import get_settings
from sdpo_cli import up as up_cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def asset(name: str) -> Path:
    return Path(str(importlib.resources.files("sdpo_engine") / "assets" / name))


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(steps: list[dict], job: dict, out=sys.stdout) -> None:
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


def run_demo(url: str, key: str, *, n_epochs: int = 2, timeout: float = 900, out=sys.stdout) -> dict:
    """Upload, submit, follow, report. Returns the finished job object."""
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    files = {}
    for purpose_name, name in (("training", "sample_train.jsonl"), ("validation", "sample_heldout.jsonl")):
        with open(asset(name), "rb") as fh:
            r = client.post("/v1/files", files={"file": (name, fh, "application/jsonl")},
                            data={"purpose": "fine-tune"})
        r.raise_for_status()
        files[purpose_name] = r.json()
        print(f"uploaded {name}: {files[purpose_name]['id']} ({r.json().get('rows')} pairs)", file=out)
    body = {
        "model": up_cmd.BUILTIN_MODEL,
        "training_file": files["training"]["id"],
        "validation_file": files["validation"]["id"],
        "suffix": "demo",
        "seed": 0,
        "method": {"type": "sdpo", "sdpo": {
            "hyperparameters": {"n_epochs": n_epochs, "beta": 0.1},
            "partition": {"strategy": "easy_to_hard", "n_steps": 2, "source_field": "source"},
        }},
    }
    r = client.post("/v1/fine_tuning/jobs", json=body)
    r.raise_for_status()
    job = r.json()
    print(f"submitted {job['id']}: 2-step sDPO on {job['model']}, partition easy_to_hard", file=out)

    seen_events: set[str] = set()
    deadline = time.time() + timeout
    last_line = ""
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
        for e in reversed(events):
            if e["id"] in seen_events:
                continue
            seen_events.add(e["id"])
            if e.get("type") == "metrics":
                d = e.get("data") or {}
                line = (f"  step {d.get('step')} [{d.get('global_step')}/{d.get('max_steps')}] loss "
                        f"{_fmt(d.get('loss'))} reward acc {_fmt(d.get('rewards/accuracies'), '.2f')}")
                if line != last_line:
                    last_line = line
                    print(line, file=out)
            else:
                print(f"- {e['message']}", file=out)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        if time.time() > deadline:
            raise TimeoutError(f"job {job['id']} still {job['status']} after {timeout:.0f} s")
        time.sleep(1.0)
    steps = client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps").json()["data"]
    print_table(steps, job, out=out)
    if job["status"] != "succeeded":
        print(f"\njob {job['status']}: {job.get('error')}", file=out)
        return job
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    final = max(ckpts, key=lambda c: c.get("step_index") or c.get("step_number") or 0)
    print(f"\nfine-tuned model: {job['fine_tuned_model']}", file=out)
    print(f"final checkpoint: {final['id']}  download: curl -H 'Authorization: Bearer $KEY' "
          f"{url}/v1/fine_tuning/jobs/{job['id']}/checkpoints/{final['id']}/content -o model.tar", file=out)
    local = get_settings().storage_dir / "checkpoints" / job["id"] / final["id"]
    if local.is_dir():
        print(f"on this machine: {local}", file=out)
    return job


def _demo(args: argparse.Namespace) -> int:
    settings = get_settings()
    started = None
    url = args.url or os.environ.get("SDPO_URL")
    if url is None:
        info = up_cmd.running_service(settings)
        if info is None:
            print("starting the embedded service (SQLite, no Redis)...", file=sys.stderr)
            info, started = up_cmd.start("127.0.0.1", args.port or _free_port(), quiet=True)
        url = info["url"]
    key = os.environ.get("SDPO_API_KEY") or up_cmd.admin_key(settings)
    t0 = time.time()
    try:
        if args.model == "smollm2-135m":
            from sdpo_cli.smollm2_demo import run_smollm2_demo

            job = run_smollm2_demo(url, key)
        else:
            job = run_demo(url, key, n_epochs=args.epochs)
    finally:
        if started is not None and not args.keep_running:
            up_cmd.stop(started)
            up_cmd.service_file(settings).unlink(missing_ok=True)
    print(f"\ndemo finished in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0 if job["status"] == "succeeded" else 1


def register_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="run the main job: a 2-step sDPO job on the bundled sample data")
    demo.add_argument("--url", help="a running service (default: SDPO_URL, else the one `sdpo up` started, "
                                    "else start the embedded one)")
    demo.add_argument("--port", type=int, help="port for an embedded service started by the demo")
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--model", choices=["sdpo-tiny", "smollm2-135m"], default="sdpo-tiny",
                      help="smollm2-135m: align the real SmolLM2-135M-Instruct and print answers before and after "
                           "(sdpo_cli.smollm2_demo)")
    demo.add_argument("--keep-running", action="store_true", help="leave a service the demo started running")
    demo.set_defaults(handler=_demo)
