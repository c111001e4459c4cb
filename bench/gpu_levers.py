"""Issue #19's device check: TRL's fastest configuration (a') against the engine with each lever alone and all
together, in one command that fits a short GPU lease.

    bash bench/device_run.sh                 # on the GPU machine: installs the carried wheels, runs this
    python bench/gpu_levers.py --size tiny --pairs 16 --batch-size 4 --shape 48:16 --out-dir /tmp/levers \
        --variants engine,one_pair_per_row   # CPU smoke run, 1.5 minutes (the whole set: --budget-s 600,
                                             # compile alone takes 3 minutes on CPU; flex is GPU-only)

The model and pairs are gpu_check.py's (a random 0.54B Qwen2 with the offline byte-level tokenizer; random
words cut to `--shape` prompt:answer tokens, by default the issue's 384:128). Variants, in the order they
run (the budget skips those that would end past it):

  tuned        (a') TRL with precompute_ref_log_probs=True, gradient checkpointing off, bf16 on a GPU
  engine       the engine's step with the spec's defaults of the day
  all          every lever of ALL_LEVERS at once (those the engine knows); if it fails with compile on,
               all_but_compile runs next
  <lever>      each lever alone, on top of the defaults (LEVERS below)

A variant is a set of step spec fields, `key=value` with a JSON value (`attention=flex`,
`group_by_length=true`, `reference_batch_size=64`); a key that is a StepConfig field goes into the
hyperparameters instead. A key the engine does not know (a lever not landed yet) skips its variant with
"unknown spec field" (and drops out of `all`); a value the engine refuses, or a run that fails, is
reported as failed with its error and the next variant runs. `--add NAME:key=value,key=value` adds a
variant; `--variants a,b` picks some.

Per variant: step s (the reference forward pass + trainer.train(); for (a') TRL's precompute forward,
timed around `DPOTrainer._precompute_ref_logps`, + train(); tokenisation and TRL's weight hash, which
the engine skips, excluded), train tokens/s (TRL's num_tokens, the same count for every variant), MFU =
6 x parameters x tokens/s / the card's dense bf16 peak (989 TFLOP/s on an H100/H200), peak GPU memory
(torch.cuda.max_memory_allocated; max RSS on CPU), and against (a'): the step ratio, the largest
difference between the two loss curves step by step and the difference of their means (a variant that
reorders batches, group_by_length, changes the per-step losses but not the mean much). Bf16 on both
sides: expect ~1e-2 differences, not the 1e-4 of float32.

Budget (`--budget-s`, seconds from this script's start): before each variant the script estimates its
time (the slowest finished variant of its kind, compiling or not; the first compiling one: the slowest
other x1.5) and skips it if it would end past the budget; each child process is also killed at the
budget. (a') and the engine's defaults always run.

Output in `--out-dir` (at most 6 files, so all come back through the device tool's $OUT):
results.jsonl (one JSON line per variant, losses included), summary.txt (the table), raw.tar.gz (every
child's stdout, with the engine's events, and stderr), ranks.txt (the optional world-size-1 FSDP check,
`--ranks-cmd`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import PEAK_BF16_TFLOPS, SIZES  # noqa: E402

# Each lever's "on" value (issue #19). Off is the engine's default of the day (variant `engine`).
# The three bf16 settings run first, next to each other: against `engine` (float32 weights, bf16 autocast) they
# compare pure bf16 (bf16_weights: at DPO's learning rates most updates are lost), bf16 with AdamW over float32
# master weights (bf16_master) and torchao's stochastic rounding (bf16_sr; refused by the engine, and reported
# as failed, where torchao is not installed: put its wheel in .whl) on the loss curve and the step's speed.
LEVERS: dict[str, dict[str, object]] = {
    "bf16_weights": {"param_dtype": "bfloat16"},
    "bf16_master": {"param_dtype": "bfloat16-master"},
    "bf16_sr": {"param_dtype": "bfloat16-sr"},
    "flex": {"attention": "flex"},
    "compile": {"compile": "layers"},
    "one_pair_per_row": {"pack_tokens": 0},  # the off side of several pairs per row (default 2048)
    "ref_batch_64": {"reference_batch_size": 64},
    "group_by_length": {"group_by_length": True},
}
# `all` leaves out one_pair_per_row: its lever is the default's several pairs per row; of the bf16 settings it
# takes bf16_master, the one that keeps every update (pure bf16 loses them at DPO's learning rates).
ALL_LEVERS = ("bf16_master", "flex", "compile", "ref_batch_64", "group_by_length")
# The keys the script sets itself.
RESERVED = {"index", "policy_init", "train_file", "output_dir", "work_dir", "hyperparameters", "device"}


def parse_fields(items: list[str]) -> dict[str, object]:
    """`["attention=flex", "pack_tokens=0", "reference_batch_size=null"]` -> {key: JSON value}; a value
    that is not JSON is a string. Raises ValueError for an item without '='."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def route_fields(fields: dict[str, object]) -> tuple[dict, dict, list[str]]:
    """Split fields into (step spec fields, StepConfig hyperparameters, unknown keys) by the engine's own
    dataclasses (sdpo_engine.protocol.StepSpec, sdpo_engine.config.StepConfig), so a lever that has not
    landed yet is named instead of refused by the engine after a model load. Keys the script sets itself
    (RESERVED) count as unknown."""
    from sdpo_engine.config import StepConfig
    from sdpo_engine.protocol import StepSpec

    spec_keys = {f.name for f in dataclasses.fields(StepSpec)} - RESERVED
    hp_keys = {f.name for f in dataclasses.fields(StepConfig)}
    spec = {k: v for k, v in fields.items() if k in spec_keys}
    hp = {k: v for k, v in fields.items() if k in hp_keys and k not in spec_keys}
    return spec, hp, sorted(set(fields) - set(spec) - set(hp))


def default_variants() -> dict[str, dict[str, object]]:
    """name -> fields, in run order (the budget drops from the end)."""
    out: dict[str, dict[str, object]] = {"tuned": {}, "engine": {}}
    out["all"] = {k: v for lever in ALL_LEVERS for k, v in LEVERS[lever].items()}
    out.update(LEVERS)
    return out


def compiles(fields: dict[str, object]) -> bool:
    return fields.get("compile") not in (None, "off")


def estimate_seconds(fields: dict[str, object], finished: dict[bool, list[float]]) -> float:
    """Seconds a variant is expected to take: the slowest finished variant of its kind (compiling or
    not, keyed by `compiles`); for the first compiling one, the slowest other x1.5 (compile time on
    top of the same work). 0 before any has finished."""
    same = finished.get(compiles(fields), [])
    if same:
        return max(same)
    return max(finished.get(not compiles(fields), []), default=0.0) * (1.5 if compiles(fields) else 1.0)


def skip_reason(name: str, fields: dict[str, object], elapsed: float, budget: float,
                finished: dict[bool, list[float]]) -> str | None:
    """Why a variant is not started, or None to run it: (a') and the engine's defaults always run;
    another runs only if its estimate ends within the budget."""
    if name in ("tuned", "engine"):
        return None
    estimate = estimate_seconds(fields, finished)
    if elapsed + estimate > budget:
        return f"budget: {elapsed:.0f} s used + ~{estimate:.0f} s estimated > {budget:.0f} s"
    return None


# --- child processes --------------------------------------------------------------------------------

def child(args) -> None:
    import torch

    # Both sides' libraries imported before the clock starts (TRL loads its trainer lazily).
    from datasets import Dataset  # noqa: F401
    from trl import DPOTrainer

    from sdpo_engine.step import run_step

    hp = json.loads(args.hparams)
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    if args.child == "tuned":
        from common import train_plain_trl

        # TRL 1.16 runs its precompute in DPOTrainer.__init__, outside train(): time its forward pass
        # (the counterpart of the engine's reference pass) around the method that does it.
        timed = {"reference": 0.0}
        original = DPOTrainer._precompute_ref_logps

        def precompute(self, *a, **k):
            t = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                timed["reference"] += time.perf_counter() - t

        DPOTrainer._precompute_ref_logps = precompute
        # TRL's hash of every weight (it names the on-disk cache of these log-probs): reported, not counted.
        import trl.trainer.dpo_trainer as dpo_module

        original_hash = dpo_module.hash_module

        def hash_module(*a, **k):
            t = time.perf_counter()
            try:
                return original_hash(*a, **k)
            finally:
                timed["hash"] = timed.get("hash", 0.0) + time.perf_counter() - t

        dpo_module.hash_module = hash_module
        plain = train_plain_trl(args.model_dir, args.data, hp, on_gpu=cuda, tuned=True)
        result = {"train_seconds": plain["train_seconds"], "reference_seconds": timed["reference"],
                  "losses": plain["losses"], "tokens": plain["tokens"],
                  "settings": {"precompute_ref_log_probs": True, "gradient_checkpointing": False, "bf16": cuda,
                               "weight_hash_seconds": timed.get("hash"), "trl": __import__("trl").__version__}}
    else:
        fields = json.loads(args.fields)
        events: list[dict] = []

        def emit(event: dict) -> None:
            events.append(event)
            print(json.dumps(event, default=str), flush=True)  # into the raw output

        with tempfile.TemporaryDirectory() as tmp:
            summary = run_step({"index": 1, "policy_init": args.model_dir, "train_file": args.data,
                                "output_dir": f"{tmp}/out", "work_dir": f"{tmp}/work",
                                "hyperparameters": {**hp, **fields["hp"]}, "device": "cuda" if cuda else "cpu",
                                **fields["spec"]}, emit=emit)
        ref = next((e for e in events if e.get("phase") == "reference_logps"), {})
        metrics = [e for e in events if e["event"] == "metrics"]
        result = {"train_seconds": summary["train_seconds"],
                  "reference_seconds": ref.get("forward_seconds") or ref.get("seconds", 0.0),
                  "losses": [e["loss"] for e in metrics],
                  "tokens": max((e.get("num_tokens") or 0) for e in metrics),
                  "settings": {"packing": ref.get("packing"),
                               "config": next((e.get("config") for e in events if e.get("phase") == "start"), None),
                               "memory": next((e for e in events if e.get("phase") == "memory"), None)}}
    result["wall"] = time.perf_counter() - t0
    result["peak_bytes"] = (torch.cuda.max_memory_allocated() if cuda
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    result["torch"] = torch.__version__
    print(json.dumps(result))


def run_variant(name: str, fields: dict, model_dir: Path, data: Path, hp: dict, timeout: float,
                raw: tarfile.TarFile) -> dict:
    """One variant in a process of its own (its own imports and peak memory), killed after `timeout`
    seconds. Its stdout and stderr go into `raw`; returns the child's result, or status failed/timeout."""
    cmd = [sys.executable, __file__, "--child", "tuned" if name == "tuned" else "engine", "--model-dir",
           str(model_dir), "--data", str(data), "--hparams", json.dumps(hp), "--fields", json.dumps(fields)]
    # A fresh inductor cache per variant: each compiling variant pays its own compile (a step's process
    # on a fresh host does), not one warmed by the variant before it.
    env = {**{k: v for k, v in os.environ.items() if k != "SDPO_PACKING"}, "TQDM_DISABLE": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(model_dir.parent / f"inductor-{name}")}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        stdout, stderr, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed the child
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        stdout, stderr, rc = text(e.stdout), text(e.stderr), None
    process_seconds = time.perf_counter() - t0
    for suffix, body in (("stdout", stdout), ("stderr", stderr)):
        data_bytes = body.encode()
        info = tarfile.TarInfo(f"{name}.{suffix}")
        info.size = len(data_bytes)
        info.mtime = int(time.time())
        raw.addfile(info, io.BytesIO(data_bytes))
    if rc is None:
        return {"status": "timeout", "reason": f"killed after {timeout:.0f} s", "process_seconds": process_seconds}
    if rc != 0:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]  # the exception's message
        return {"status": "failed", "reason": " ".join(tail)[-600:] or f"exit {rc}",
                "process_seconds": process_seconds}
    return {"status": "ok", **json.loads(stdout.strip().splitlines()[-1]), "process_seconds": process_seconds}


# --- the parent ---------------------------------------------------------------------------------------

def figures(r: dict, base: dict | None, n_params: int, peak_tflops: float | None) -> dict:
    """step s, tokens/s, MFU and the comparisons against (a') of one finished variant."""
    step = r["reference_seconds"] + r["train_seconds"]
    tps = r["tokens"] / step if step > 0 else float("nan")
    out = {"step_seconds": step, "tokens_per_s": tps,
           "mfu": 6 * n_params * tps / (peak_tflops * 1e12) if peak_tflops else None}
    if base is not None and base.get("status") == "ok":
        a, b = base["losses"], r["losses"]
        n = min(len(a), len(b))
        out["step_tuned_over_variant"] = base["step_seconds"] / step
        out["peak_memory_variant_over_tuned"] = r["peak_bytes"] / base["peak_bytes"]
        out["max_loss_diff"] = max((abs(x - y) for x, y in zip(a, b, strict=False)), default=float("nan"))
        out["mean_loss_diff"] = abs(sum(a[:n]) / n - sum(b[:n]) / n) if n else float("nan")
        out["logged_steps"] = [len(a), len(b)]
    return out


def row(name: str, r: dict) -> str:
    if r["status"] != "ok":
        return f"{name:17} {r['status']}: {r['reason']}"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
    ratio = f"{r['step_tuned_over_variant']:.2f}" if "step_tuned_over_variant" in r else "-"
    mem = f"{r['peak_memory_variant_over_tuned']:.2f}" if "peak_memory_variant_over_tuned" in r else "-"
    diff = f"{r['max_loss_diff']:.1e}" if "max_loss_diff" in r else "-"
    mean = f"{r['mean_loss_diff']:.1e}" if "mean_loss_diff" in r else "-"
    return (f"{name:17} {r['step_seconds']:7.1f} {r['reference_seconds']:6.1f} {r['wall']:7.1f} {r['tokens_per_s']:9.0f} "
            f"{mfu:>6} {r['peak_bytes'] / 1e9:8.2f} {ratio:>6} {mem:>8} {diff:>9} {mean:>9}")


HEADER = " ".join(f"{label:{width}}" for label, width in (
    ("variant", "17"), ("step s", ">7"), ("ref s", ">6"), ("wall s", ">7"), ("tok/s", ">9"), ("MFU", ">6"),
    ("peak GB", ">8"), ("a'/x", ">6"), ("mem x/a'", ">8"), ("max|dL|", ">9"), ("|dmean|", ">9")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["tuned", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hparams", help=argparse.SUPPRESS)
    p.add_argument("--fields", help=argparse.SUPPRESS)
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shape", default="384:128", help="prompt:answer tokens (default: the issue's 3:1 case)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not an H100/H200/A100/L40S")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds from this script's start; variants that would end later are skipped")
    p.add_argument("--variants", help="comma-separated names to run (default: all; tuned and --add ones always run)")
    p.add_argument("--add", action="append", default=[], metavar="NAME:key=value,...",
                   help="an extra engine variant from spec fields (repeatable)")
    p.add_argument("--engine-spec", action="append", default=[], metavar="key=value",
                   help="a spec field set in every engine variant, baseline included (repeatable)")
    p.add_argument("--ranks-cmd", default="",
                   help="a command run last if the budget leaves ~90 s (the world-size-1 FSDP against the plain step, "
                        "e.g. 'python bench/ranks.py --gpu-check --model {model_dir}'; {model_dir}: this run's "
                        "model); its output goes to ranks.txt")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results" / f"gpu-{time.strftime('%Y-%m-%d')}"))
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    t_start = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = default_variants()
    if args.variants:
        keep = {"tuned", *args.variants.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep}
    for item in args.add:  # added variants run whatever --variants picks
        name, _, body = item.partition(":")
        variants[name] = parse_fields([x for x in body.split(",") if x])
    common_fields = parse_fields(args.engine_spec)

    from gpu_check import build_model, make_pairs

    prompt_tokens, answer_tokens = (int(x) for x in args.shape.split(":"))
    results: dict[str, dict] = {}
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="sdpo-levers-") as tmp_name, \
            tarfile.open(out_dir / "raw.tar.gz", "w:gz") as raw, \
            open(out_dir / "results.jsonl", "w") as jsonl:
        tmp = Path(tmp_name)
        n_params = build_model(tmp / "model", args.size)
        data = tmp / "pairs.jsonl"
        make_pairs(data, tmp / "model", args.pairs, prompt_tokens, answer_tokens, seed=0)
        hp = {"beta": 0.1, "learning_rate": 1e-5, "n_epochs": 1, "batch_size": args.batch_size,
              "max_length": prompt_tokens + answer_tokens + 8, "seed": 0, "warmup_ratio": 0.0}
        say(f"random Qwen2 {args.size}: {n_params / 1e6:.1f}M parameters; {args.pairs} pairs of {prompt_tokens}:"
            f"{answer_tokens} tokens, batch {args.batch_size}, 1 epoch; budget {args.budget_s:.0f} s; set up in "
            f"{time.perf_counter() - t_start:.0f} s")
        walls: dict[bool, list[float]] = {False: [], True: []}  # process seconds, by compiles(fields)
        peak_tflops = args.peak_tflops
        queue = list(variants.items())
        while queue:
            name, own = queue.pop(0)
            fields = {} if name == "tuned" else {**common_fields, **own}
            record: dict = {"variant": name}
            if name in ("all", "all_but_compile"):  # `all` = the levers the engine knows
                unknown = route_fields(fields)[2]
                if unknown:
                    record["dropped_unknown"] = unknown
                    fields = {k: v for k, v in fields.items() if k not in unknown}
            record["fields"] = fields
            spec, hp_fields, unknown = route_fields(fields)
            elapsed = time.perf_counter() - t_start
            why = skip_reason(name, fields, elapsed, args.budget_s, walls)
            if unknown:
                record.update(status="skipped", reason=f"unknown spec field: {', '.join(unknown)}")
            elif name in ("all", "all_but_compile") and not (set(fields) - set(common_fields)):
                record.update(status="skipped", reason="no lever known to the engine")
            elif why:
                record.update(status="skipped", reason=why)
            else:
                timeout = max(60.0, args.budget_s - elapsed)
                r = run_variant(name, {"spec": spec, "hp": hp_fields}, tmp / "model", data, hp, timeout, raw)
                record.update(r)
                if r["status"] == "ok":
                    walls[compiles(fields)].append(r["process_seconds"])
                    if peak_tflops is None:
                        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in r["device"]), None)
                    record.update(figures(r, results.get("tuned"), n_params, peak_tflops))
                elif name == "all" and compiles(fields):
                    # The headline figure should not hang on the compiler alone: the other levers next.
                    queue.insert(0, ("all_but_compile", {k: v for k, v in fields.items() if k != "compile"}))
            results[name] = record
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            print(f"[{time.perf_counter() - t_start:5.0f} s] {row(name, record)}", flush=True)

        tuned = results["tuned"]
        say(f"\ndevice: {tuned.get('device', '?')}, torch {tuned.get('torch', '?')}; MFU against "
            f"{peak_tflops or '?'} TFLOP/s; step s = reference forward + train(); a'/x = (a') step s / variant's")
        say(HEADER)
        for name, r in results.items():
            say(row(name, r))
        if tuned["status"] == "ok":
            hashed = tuned["settings"].get("weight_hash_seconds")
            say(f"  tuned: TRL {tuned['settings'].get('trl')}; its weight hash {hashed or 0:.1f} s, not in step s")
        for name, r in results.items():
            if r["status"] == "ok" and name != "tuned":
                settings = r.get("settings") or {}
                memory = settings.get("memory") or {}
                say(f"  {name}: fields {json.dumps(r['fields'])}; packing {settings.get('packing')}; activation "
                    f"checkpointing {memory.get('activation_checkpointing')}")

        elapsed = time.perf_counter() - t_start
        if args.ranks_cmd:
            if elapsed + 90 > args.budget_s:
                say(f"\nranks: skipped (budget: {elapsed:.0f} s used)")
            else:
                try:
                    command = [part.replace("{model_dir}", str(tmp / "model")) for part in shlex.split(args.ranks_cmd)]
                    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                          timeout=max(60.0, args.budget_s - elapsed))
                    text = f"$ {args.ranks_cmd}\nexit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
                except subprocess.TimeoutExpired:
                    text = f"$ {args.ranks_cmd}\ntimed out"
                (out_dir / "ranks.txt").write_text(text)
                say("\n" + text.strip()[:3000])
        say(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    return 0 if results["tuned"]["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
