"""Runs the parts of the reproduction on a process pool and collects their results (JSON-able dicts)."""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import runner
from .settings import METHODS, Setting


class Log:
    def __init__(self, stream):
        self.stream = stream
        self.t0 = time.perf_counter()

    def __call__(self, msg: str):
        self.stream.write(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}\n")
        self.stream.flush()


def result(future):
    """`future.result()`, waking every second so that the main thread can run a signal handler (SIGTERM)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    while True:
        try:
            return future.result(timeout=1.0)
        except FutureTimeout:
            continue


def make_pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=runner.worker_init, initargs=(threads,))


def _pick_learning_rate(tuning: list[dict]) -> float:
    """Highest held-out preference accuracy of plain DPO on the tuning seed; ties: higher reward accuracy,
    then the smaller learning rate."""
    best = max(tuning, key=lambda t: (round(t["final"]["all"]["preference_accuracy"], 6),
                                      round(t["final"]["all"]["reward_accuracy"], 6), -t["learning_rate"]))
    return best["learning_rate"]


class LoadSampler:
    """The machine's 1-minute load average every `every` seconds while a part runs (timings are noisy)."""

    def __init__(self, every: float = 15.0):
        import threading

        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples), "min": min(self.samples),
                "samples": len(self.samples)}


def run_part(setting: Setting, work: Path, pool: ProcessPoolExecutor, log: Log, *, base_model: str | None = None,
             keep: bool = False) -> dict:
    with LoadSampler() as load:
        part = _run_part(setting, work, pool, log, base_model=base_model, keep=keep)
    part["load"] = load.summary()
    return part


def _run_part(setting: Setting, work: Path, pool: ProcessPoolExecutor, log: Log, *, base_model: str | None = None,
              keep: bool = False) -> dict:
    t0 = time.perf_counter()
    phases = {}
    tune = bool(setting.lr_grid)
    seeds = list(setting.seeds)
    log(f"{setting.name}: preparing seeds {seeds}{' and tuning seed ' + str(setting.tune_seed) if tune else ''}"
        " (data, base, SFT warm start, S log-probs)")
    prep_f = {s: pool.submit(runner.prepare, setting, s, str(work), base_model)
              for s in ([setting.tune_seed] if tune else []) + seeds}

    tuning = []
    tprep = None
    learning_rate = setting.learning_rate
    if tune:
        tprep = result(prep_f[setting.tune_seed])
        log(f"{setting.name}: tuning seed ready; sweeping the DPO learning rate over {list(setting.lr_grid)}")
        tune_f = [pool.submit(runner.run_method, setting, setting.tune_seed, "dpo", lr, str(work), tprep,
                              f"tune-lr{lr:g}-", keep) for lr in setting.lr_grid]
        for f in tune_f:
            r = result(f)
            tuning.append({"learning_rate": r["learning_rate"], "final": r["final"], "seconds": r["seconds"],
                           "cpu_seconds": r.get("cpu_seconds"), "steps": r["steps"]})
            log(f"{setting.name}: DPO lr {r['learning_rate']:g}: held-out preference accuracy "
                f"{r['final']['all']['preference_accuracy']:.3f}")
        learning_rate = _pick_learning_rate(tuning)
        log(f"{setting.name}: chosen learning rate {learning_rate:g} (used by every method)")
        # Sensitivity: the sDPO variants at the *other* rates of the sweep, on the tuning seed (no Figure 3
        # extra). Not used to choose anything; it shows whether the conclusions depend on the rate.
        sens_f = {(lr, m): pool.submit(runner.run_method, setting, setting.tune_seed, m, lr, str(work), tprep,
                                       f"tune-lr{lr:g}-", keep, False)
                  for lr in setting.lr_grid if lr != learning_rate for m in METHODS if m != "dpo"}
        phases["tuning (incl. its seed's preparation)"] = time.perf_counter() - t0

    preps = {}
    for s in seeds:
        preps[s] = result(prep_f[s])
        log(f"{setting.name}: seed {s} ready: S prefers chosen on "
            + ", ".join(f"{k} {v:.2f}" for k, v in preps[s]["scores"].items()) + " of training pairs")
    t_methods = time.perf_counter()
    futures = {(s, m): pool.submit(runner.run_method, setting, s, m, learning_rate, str(work), preps[s], "", keep)
               for s in seeds for m in METHODS}
    runs: dict = {s: {} for s in seeds}
    for (s, m), f in futures.items():
        runs[s][m] = result(f)
        log(f"{setting.name}: seed {s} {m}: held-out preference accuracy "
            f"{runs[s][m]['final']['all']['preference_accuracy']:.3f} ({runs[s][m]['seconds']:.0f} s)")
    sensitivity = []
    if tune:
        for lr in setting.lr_grid:
            if lr == learning_rate:
                continue
            row = {"learning_rate": lr, "dpo": next(t for t in tuning if t["learning_rate"] == lr)}
            for m in METHODS[1:]:
                r = result(sens_f[(lr, m)])
                row[m] = {k: r[k] for k in ("final", "steps", "seconds", "cpu_seconds") if k in r}
                if "figure2" in r:
                    row[m]["figure2"] = r["figure2"]
            sensitivity.append(row)
        log(f"{setting.name}: learning-rate sensitivity runs done")
    phases["methods and sensitivity runs (after the seeds were prepared)"] = time.perf_counter() - t_methods
    wall = time.perf_counter() - t0
    cpu = ([p["cpu_seconds"] for p in preps.values()] + [r["cpu_seconds"] for rs in runs.values() for r in rs.values()]
           + [t["cpu_seconds"] for t in tuning] + [row[m]["cpu_seconds"] for row in sensitivity for m in METHODS[1:]])
    if tprep is not None:
        cpu.append(tprep["cpu_seconds"])
    return {
        "setting": setting.to_dict(),
        "learning_rate": learning_rate,
        "tuning": tuning,
        "sensitivity": sensitivity,
        "tune_prep": tprep if tune else None,
        "prep": {str(s): p for s, p in preps.items()},
        "runs": {str(s): r for s, r in runs.items()},
        "wall_seconds": wall,
        # CPU time of all the part's tasks (1 torch thread each): about what the part needs on idle cores
        "cpu_seconds": sum(cpu),
        "phase_seconds": phases,
        "task_seconds": {
            "prepare": {str(s): p["seconds"] for s, p in preps.items()},
            "methods": {f"{s}/{m}": runs[s][m]["seconds"] for s in seeds for m in METHODS},
        },
    }


def machine() -> dict:
    import torch
    import transformers
    import trl

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "loadavg_start": os.getloadavg(),
    }
