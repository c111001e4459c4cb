"""What the service adds around the engine: the same 2-step sDPO job through the API and a worker
against `python -m sdpo_engine run` in one process, side by side.

    python bench/service_overhead.py --model tiny
    python bench/service_overhead.py --model smollm2 --pairs 8

The service is the embedded one (`sdpo up`: uvicorn + one Celery worker, SQLite, a broker on a
SQLite file) under a temporary SDPO_HOME, started once and warm, as in production. The model
directory is registered with the admin `POST /v1/models`; the two step files are uploaded and the
job is submitted with `method.sdpo.steps` and every hyperparameter given. Its wall time runs from
the POST to the job's "Job succeeded" event (the POST's round trip plus the server-side time from
the job's row to that event; the job is polled only every 0.5 s, so as not to load the service). The engine runs the same
files, hyperparameters and seed as one fresh process (`python -m sdpo_engine run`), its wall time
measured around the process. Runs alternate service/engine to spread machine noise.

Prints the ratio service/engine, the fixed cost per step ((service - engine) / T), and where a
service step spends its time, from the job's events in the database:
dispatch (previous step done -> step claimed: broker hop and claim), child start (claimed -> the
engine's first line: process start, imports, data read), model load + reference pass, training,
save + store + record (the engine saves and hashes the checkpoint, the worker copies it into the
store and commits). The engine process pays its imports and model load too; the service pays them
once per step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "sk-sdpo-bench-admin-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedService:
    def __init__(self, home: Path, *, warm_engine: bool = True):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
        env.update({"SDPO_HOME": str(home), "SDPO_ADMIN_KEY": KEY, "SDPO_DEVICE": "cpu", "TQDM_DISABLE": "1",
                    "SDPO_WARM_ENGINE": "true" if warm_engine else "false"})
        self.log = open(home / "up.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sdpo_cli.main", "up", "--port", str(self.port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdpo up exited: {(self.home / 'up.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the embedded service did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_service_job(client, model_id: str, file_ids: list[str], hp: dict, seed: int) -> tuple[float, dict]:
    body = {"model": model_id, "training_file": file_ids[0], "seed": seed,
            "method": {"type": "sdpo", "sdpo": {"hyperparameters": hp,
                                                 "steps": [{"training_file": f} for f in file_ids]}}}
    t0 = time.perf_counter()
    r = client.post("/v1/fine_tuning/jobs", json=body)
    r.raise_for_status()
    post_seconds = time.perf_counter() - t0
    job_id = r.json()["id"]
    while True:  # slow polling: the benchmark must not load the service it measures
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    if job["status"] != "succeeded":
        raise RuntimeError(f"service job {job['status']}: {job.get('error')}")
    return post_seconds, job


def run_engine(model_dir: str, files: list[Path], hp: dict, seed: int, out: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "sdpo_engine", "run", "--model", model_dir, "--out", str(out), "--quiet",
           "--device", "cpu", "--seed", str(seed), "--beta", str(hp["beta"]), "--learning-rate",
           str(hp["learning_rate"]), "--epochs", str(hp["n_epochs"]), "--batch-size", str(hp["batch_size"]),
           "--max-length", str(hp["max_length"]), "--warmup-ratio", str(hp["warmup_ratio"])]
    for f in files:
        cmd += ["--step-file", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
    env["TQDM_DISABLE"] = "1"
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"engine run failed:\n{done.stderr[-3000:]}")
    return wall, json.loads((out / "summary.json").read_text())


def service_seconds(home: Path, job_id: str) -> float:
    """From the job's row being written to its "Job succeeded" event, server-side timestamps."""
    from sqlalchemy import select

    from core.db import make_engine, make_session_factory, session_scope
    from core.models import Event, Job

    factory = make_session_factory(make_engine(f"sqlite:///{home / 'sdpo.db'}"))
    with session_scope(factory) as s:
        created = s.get(Job, job_id).created_at
        done = max(e.created_at for e in s.scalars(select(Event).where(Event.job_id == job_id))
                   if e.message.startswith("Job succeeded"))
    return (done - created).total_seconds()


def step_breakdown(home: Path, job_id: str, n_steps: int) -> list[dict]:
    """Per step, seconds in each phase, from the events the worker wrote (microsecond timestamps)."""
    from sqlalchemy import select

    from core.db import make_engine, make_session_factory, session_scope
    from core.models import Event, Job

    factory = make_session_factory(make_engine(f"sqlite:///{home / 'sdpo.db'}"))
    with session_scope(factory) as s:
        created = s.get(Job, job_id).created_at
        events = [(e.created_at, e.step_index, e.message, e.data or {})
                  for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq))]
    def at(k: int, pred):
        hit = next((e[0] for e in events if e[1] == k and pred(e)), None)
        if hit is None:
            raise RuntimeError(f"step {k}: an expected event is missing: {[e[2] for e in events if e[1] == k]}")
        return hit

    rows, previous = [], created
    for k in range(1, n_steps + 1):
        claimed = at(k, lambda e, k=k: e[2].startswith(f"Step {k}/"))
        started = at(k, lambda e: e[3].get("phase") == "start")
        reference = at(k, lambda e: e[3].get("phase") == "reference_logps")
        trained = at(k, lambda e: e[3].get("phase") == "train_end")
        done = at(k, lambda e, k=k: e[2].startswith(f"Step {k} succeeded"))
        rows.append({"dispatch": (claimed - previous).total_seconds(),
                     "child start": (started - claimed).total_seconds(),
                     "load + reference": (reference - started).total_seconds(),
                     "train": (trained - reference).total_seconds(),
                     "save + store + record": (done - trained).total_seconds()})
        previous = done
    return rows


def model_dir_for(name: str, cache: Path) -> str:
    from sdpo_engine.models import resolve_base_model

    return str(resolve_base_model({"tiny": "sdpo-tiny", "smollm2": "smollm2-135m"}.get(name, name), cache))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, smollm2 or a model directory")
    p.add_argument("--pairs", type=int, default=16, help="pairs per step")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--repeats", type=int, default=2, help="service/engine pairs (alternated)")
    p.add_argument("--warmup", type=int, default=1, help="service jobs run before the measured ones")
    p.add_argument("--cold-engine", action="store_true",
                   help="run the worker with SDPO_WARM_ENGINE=false (every step's process imports torch/TRL)")
    p.add_argument("--cache", default=str(ROOT / ".sdpo" / "bench-models"))
    args = p.parse_args()

    import httpx

    from sdpo_engine.sample_data import make_pairs, write_jsonl

    model_dir = model_dir_for(args.model, Path(args.cache))
    lr = args.learning_rate or (1e-3 if args.model == "tiny" else 5e-6)
    hp = {"beta": 0.1, "learning_rate": lr, "n_epochs": args.epochs, "batch_size": args.batch_size,
          "max_length": args.max_length, "warmup_ratio": 0.1}
    seed, n_steps = 0, 2
    with tempfile.TemporaryDirectory(prefix="sdpo-bench-") as tmp:
        tmp = Path(tmp)
        files = [write_jsonl(make_pairs((args.pairs + 1) // 2, seed=10 + k)[:args.pairs], tmp / f"step-{k}.jsonl")
                 for k in range(1, n_steps + 1)]
        (tmp / "home").mkdir()
        service = EmbeddedService(tmp / "home", warm_engine=not args.cold_engine)
        try:
            service.wait_ready()
            client = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            r = client.post("/v1/models", json={"id": "bench-model", "path": model_dir, "format": "hf"})
            r.raise_for_status()
            file_ids = []
            for f in files:
                with open(f, "rb") as fh:
                    r = client.post("/v1/files", files={"file": (f.name, fh, "application/jsonl")},
                                    data={"purpose": "fine-tune"})
                r.raise_for_status()
                file_ids.append(r.json()["id"])
            print(f"model {args.model} ({model_dir}), {n_steps} steps x {args.pairs} pairs, epochs {args.epochs}, "
                  f"batch {args.batch_size}, max_length {args.max_length}, lr {lr}; embedded service (SQLite), "
                  f"{'cold' if args.cold_engine else 'warm'} engine processes")
            for _ in range(args.warmup):
                # A worker that has run a step before keeps a warm engine process (worker/supervisor.py);
                # production workers are long-lived, so by default one job runs before the measured ones.
                t0 = time.perf_counter()
                run_service_job(client, "bench-model", file_ids, hp, seed)
                print(f"  warm-up job (not counted, the worker's first: its first step starts cold): "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            runs = []
            for i in range(args.repeats):
                post_seconds, job = run_service_job(client, "bench-model", file_ids, hp, seed)
                s_wall = post_seconds + service_seconds(tmp / "home", job["id"])
                e_wall, summary = run_engine(model_dir, files, hp, seed, tmp / f"engine-{i}")
                steps = client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps").json()["data"]
                loss_diff = max(abs(st["metrics"]["last_loss"] - es["last_loss"])
                                for st, es in zip(steps, summary["steps"], strict=True))
                runs.append({"service": s_wall, "engine": e_wall, "engine_in_process": summary["seconds"],
                             "breakdown": step_breakdown(tmp / "home", job["id"], n_steps), "loss_diff": loss_diff,
                             "engine_train": sum(s["train_seconds"] for s in summary["steps"]),
                             "service_train": sum(st["metrics"]["train_seconds"] for st in steps)})
                print(f"  run {i + 1}: service {s_wall:.1f} s, engine {e_wall:.1f} s "
                      f"(in-process {summary['seconds']:.1f} s), max |last loss service - engine| {loss_diff:.1e}; "
                      "trainer.train() s per step, service "
                      + "/".join(f"{st['metrics']['train_seconds']:.1f}" for st in steps) + ", engine "
                      + "/".join(f"{es['train_seconds']:.1f}" for es in summary["steps"]), flush=True)
        finally:
            service.stop()

    def med(values):
        return statistics.median(values)

    ratio = med([r["service"] / r["engine"] for r in runs])
    fixed = med([(r["service"] - r["engine"]) / n_steps for r in runs])
    print(f"\n{'service/engine wall':>22} {'fixed cost/step s':>18} {'service s':>10} {'engine s':>9}  "
          f"(median of {len(runs)})")
    print(f"{ratio:>22.2f} {fixed:>18.2f} {med([r['service'] for r in runs]):>10.1f} "
          f"{med([r['engine'] for r in runs]):>9.1f}")
    phases = list(runs[0]["breakdown"][0])
    print("\nservice step breakdown, seconds (median over runs and steps):")
    for ph in phases:
        print(f"  {ph:<24} {med([b[ph] for r in runs for b in r['breakdown']]):8.2f}")
    print(f"  {'engine process start + imports':<32} "
          f"{med([r['engine'] - r['engine_in_process'] for r in runs]):.2f} (once per engine run)")
    print(f"  {'trainer.train() per step, service':<32} {med([r['service_train'] / n_steps for r in runs]):.2f}")
    print(f"  {'trainer.train() per step, engine':<32} {med([r['engine_train'] / n_steps for r in runs]):.2f}")


if __name__ == "__main__":
    main()
