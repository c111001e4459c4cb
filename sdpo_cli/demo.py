"""`sdpo demo`: the main job, end to end over HTTP.

Starts the embedded service if none answers, uploads the bundled sample preference set (two
sources of different difficulty: polite greetings and sums), submits a 2-step sDPO job with the
paper's easy-to-hard partition, follows its progress, and prints the per-step table.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

from sdpo_cli import up as up_cmd
from sdpo_cli.report import follow, print_table
from sdpo_cli.sdk import SDPOClient
from sdpo_cli.smollm2_demo import run_smollm2_demo

__all__ = ["print_table", "register_demo", "run_demo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def asset(name: str) -> Path:
    return Path(str(importlib.resources.files("sdpo_engine") / "assets" / name))


def run_demo(url: str, key: str, *, n_epochs: int = 2, timeout: float = 900, out: TextIO | None = None,
             storage_dir: Path | None = None, key_shell: str | None = None, service_stays: bool = True) -> dict:
    """Upload, submit, follow, report over HTTP (sdpo_cli.sdk). Returns the finished job object.
    `storage_dir`: the service's store, when it is on this machine (its checkpoint path is printed).
    `key_shell`: a shell expression that gives the key (`"$SDPO_API_KEY"`, `"$(cat …/admin_key)"`; the
    key itself is never printed) for the printed curl command; None: no curl command.
    `service_stays`: False when the service stops after the demo: the download commands then say to
    start it first (a pasted command must work).
    `out`: default the current sys.stdout (looked up per call, not bound at import)."""
    out = out or sys.stdout
    with SDPOClient(url, key) as client:
        files = {}
        for purpose_name, name in (("training", "sample_train.jsonl"), ("validation", "sample_heldout.jsonl")):
            files[purpose_name] = client.files.create(asset(name))
            print(f"uploaded {name}: {files[purpose_name]['id']} ({files[purpose_name].get('rows')} pairs)", file=out)
        job = client.jobs.create(
            model=up_cmd.BUILTIN_MODEL, training_file=files["training"]["id"],
            validation_file=files["validation"]["id"], suffix="demo", seed=0,
            method={"type": "sdpo", "sdpo": {
                "hyperparameters": {"n_epochs": n_epochs, "beta": 0.1},
                "partition": {"strategy": "easy_to_hard", "n_steps": 2, "source_field": "source"},
            }})
        print(f"submitted {job['id']}: 2-step sDPO on {job['model']}, partition easy_to_hard", file=out)
        job = follow(client, job, timeout=timeout, out=out)
        print_table(client.jobs.steps(job["id"])["data"], job, out=out)
        if job["status"] != "succeeded":
            print(f"\njob {job['status']}: {job.get('error')}", file=out)
            return job
        final = max(client.jobs.checkpoints(job["id"], limit=100)["data"], key=lambda c: c["step_index"])
    print(f"\nfine-tuned model: {job['fine_tuned_model']}", file=out)
    print(f"final checkpoint: {final['id']}", file=out)
    cli = f"sdpo checkpoints download {job['id']} -o model --extract"
    if service_stays:
        print(f"download: {cli} --url {shlex.quote(url)}", file=out)
        if key_shell:
            print(f"      or: curl -fH \"Authorization: Bearer {key_shell}\" "
                  f"{url}/v1/fine_tuning/jobs/{job['id']}/checkpoints/{final['id']}/content -o model.tar", file=out)
    else:
        print(f"download: the demo's service has stopped (`sdpo demo --keep-running` leaves it up); start it "
              f"with `sdpo up` (it stays in the foreground), then in another terminal: {cli}", file=out)
    local = storage_dir / "checkpoints" / job["id"] / final["id"] if storage_dir else None
    if local is not None and local.is_dir():
        print(f"on this machine: {local}", file=out)
    return job


def _demo(args: argparse.Namespace) -> int:
    from core.settings import get_settings  # the embedded service's home and store (a local command)

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
            job = run_smollm2_demo(url, key, storage_dir=settings.storage_dir)
        else:
            job = run_demo(url, key, n_epochs=args.epochs, storage_dir=settings.storage_dir,
                           key_shell=_key_shell(settings), service_stays=started is None or args.keep_running)
    finally:
        if started is not None and not args.keep_running:
            up_cmd.stop(started)
            up_cmd.service_file(settings).unlink(missing_ok=True)
    print(f"\ndemo finished in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0 if job["status"] == "succeeded" else 1


def _key_shell(settings) -> str | None:
    """How a shell gets the key the demo used, without printing it: the variable it came from, or the
    admin key's file."""
    if os.environ.get("SDPO_API_KEY"):
        return "$SDPO_API_KEY"
    if settings.admin_key:
        return "$SDPO_ADMIN_KEY" if os.environ.get("SDPO_ADMIN_KEY") else None
    path = settings.home / "admin_key"
    return f"$(cat {shlex.quote(str(path.resolve()))})" if path.is_file() else None


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
