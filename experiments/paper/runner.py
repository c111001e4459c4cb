"""The units of work of the reproduction. Each is a top-level function so that a process pool can run it.

- `convert_smollm2`: the plain HF copy of SmolLM2-135M (once, cached).
- `prepare`: one seed's data, base model, SFT model S, and S's log-probs on the training and held-out
  pairs (they give the source scores, gamma_S, and the fixed reference for every held-out metric).
- `run_method`: one method on one seed through the engine's `run_sdpo` (DPO = one step on all
  data; sDPO = two steps), then held-out metrics after every step; for easy-to-hard also the
  paper's Figure 2 (gamma_ref of the step-2 data under S, M1, M2) and Figure 3 (step 2 started from
  S with reference M1, via `ref_variant`).

Held-out metrics are always against the same fixed reference, S of that seed: `reward_accuracy` and
`reward_margin` (beta * ((log pi - log S)(chosen) - (log pi - log S)(rejected))), plus the
reference-free `preference_accuracy` (share of pairs with log pi(chosen) > log pi(rejected)).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

from .settings import METHODS, Setting

SOURCES = ("polite", "larger")


def worker_init(threads: int) -> None:
    """Quiet, single-purpose worker: `threads` torch threads (1 avoids oversubscribing 2 shared cores)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - quietness only
        pass


def seed_dir(work: Path, setting: Setting, seed: int) -> Path:
    return Path(work) / setting.name / f"seed-{seed}"


def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def _eval_batch(setting: Setting) -> int:
    return 32 if setting.model == "tiny" else 8


# ------------------------------------------------------------------------------------------------
# Metrics


def split_metrics(policy: tuple[list, list], reference: tuple[list, list], pairs: list[dict], beta: float) -> dict:
    """`preference_metrics` of the engine, over all held-out pairs and per source."""
    from sdpo_engine.step import preference_metrics

    out = {"all": preference_metrics(policy, reference, beta)}
    for source in SOURCES:
        idx = [i for i, p in enumerate(pairs) if p.get("source") == source]
        pol = ([policy[0][i] for i in idx], [policy[1][i] for i in idx])
        ref = ([reference[0][i] for i in idx], [reference[1][i] for i in idx])
        out[source] = preference_metrics(pol, ref, beta)
    return out


def logps(model_dir, pairs: list[dict], setting: Setting) -> tuple[list[float], list[float]]:
    from sdpo_engine.step import load_policy, pair_logps

    tok, model = load_policy(model_dir, "cpu")
    c, r = pair_logps(model, tok, pairs, max_length=setting.dpo["max_length"], batch_size=_eval_batch(setting))
    if len(c) != len(pairs):
        raise RuntimeError(f"{len(pairs) - len(c)} pairs dropped for length; raise max_length")
    del model
    return c, r


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# Tasks


def convert_smollm2(cache_dir: str) -> dict:
    from sdpo_engine.models import resolve_base_model

    t0, c0 = time.perf_counter(), time.process_time()
    path = resolve_base_model("smollm2-135m", cache_dir)
    return {"path": str(path), "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def prepare(setting: Setting, seed: int, work: str, base_model: str | None = None) -> dict:
    """Data, base, S and S's log-probs for one seed (idempotent: the seed's directory is rebuilt)."""
    from sdpo_engine.data import load_pairs

    from .data import write_splits
    from .sft import supervised_warm_start

    t0, c0 = time.perf_counter(), time.process_time()
    d = seed_dir(Path(work), setting, seed)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    files = write_splits(seed, d / "data", n_sft=setting.n_sft, n_train=setting.n_train, n_heldout=setting.n_heldout)
    if setting.model == "tiny":
        from sdpo_engine.tiny import build_tiny_model

        base = build_tiny_model(d / "base", seed=seed, **setting.tiny_arch)
    else:
        base = Path(base_model)
    sft_rows = [json.loads(line) for line in files["sft"].read_text().splitlines()]
    sft = supervised_warm_start(base, sft_rows, d / "S", seed=seed, **setting.sft)

    train = load_pairs(files["train"])
    heldout = load_pairs(files["heldout"])
    t_eval = time.perf_counter()
    base_heldout = logps(base, heldout, setting)
    s_train = logps(d / "S", train, setting)
    s_heldout = logps(d / "S", heldout, setting)
    (d / "S_logps.json").write_text(json.dumps({"train": s_train, "heldout": s_heldout}))

    gamma_train = [c - r for c, r in zip(*s_train, strict=True)]
    scores, gamma_s = {}, {}
    for source in SOURCES:
        g = [x for x, p in zip(gamma_train, train, strict=True) if p["source"] == source]
        scores[source] = sum(x > 0 for x in g) / len(g)  # the engine's score_sources definition
        gamma_s[source] = mean(g)
    beta = setting.dpo["beta"]
    return {
        "seed": seed,
        "files": {k: str(v) for k, v in files.items()},
        "sizes": {"sft": len(sft_rows), "train": len(train), "heldout": len(heldout)},
        "sft": sft,
        "scores": scores,
        "train_mean_gamma_S": gamma_s,
        "base_eval": split_metrics(base_heldout, s_heldout, heldout, beta),
        "S_eval": split_metrics(s_heldout, s_heldout, heldout, beta),
        "eval_seconds": time.perf_counter() - t_eval,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def _chunks(setting: Setting, method: str, train: list[dict], scores: dict, seed: int) -> list[list[int]]:
    from sdpo_engine.partition import partition, source_order

    if method == "dpo":
        return [list(range(len(train)))]
    if method == "random":
        # the same chunk sizes as the curriculum split: one source's worth of pairs per step
        order = source_order(scores, "easy_to_hard")
        sizes = [sum(p["source"] == s for p in train) for s in order]
        return partition(train, "random", 2, seed=seed, sizes=sizes)
    return partition(train, method, 2, seed=seed, source_scores=scores)


def run_method(setting: Setting, seed: int, method: str, learning_rate: float, work: str, prep: dict,
               tag: str = "", keep: bool = False, figure3: bool = True) -> dict:
    """One method on one seed. Returns per-step training and held-out metrics (and Figures 2/3 for e2h)."""
    from sdpo_engine.data import load_pairs, write_pairs
    from sdpo_engine.partition import describe
    from sdpo_engine.sdpo import run_sdpo

    from .ref_variant import train_with_other_reference

    assert method in METHODS, method
    t0, c0 = time.perf_counter(), time.process_time()
    sd = seed_dir(Path(work), setting, seed)
    d = sd / f"{tag}{method}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    train = load_pairs(prep["files"]["train"])
    heldout = load_pairs(prep["files"]["heldout"])
    s_logps = _read_json(sd / "S_logps.json")
    s_train, s_heldout = s_logps["train"], s_logps["heldout"]
    beta = setting.dpo["beta"]
    hp = {**setting.dpo, "learning_rate": learning_rate, "seed": seed}

    chunks = _chunks(setting, method, train, prep["scores"], seed)
    files = []
    for k, idx in enumerate(chunks, start=1):
        files.append(d / "chunks" / f"step-{k}.jsonl")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        write_pairs([train[i] for i in idx], files[-1])
    summary = run_sdpo(str(sd / "S"), d / "run", step_files=[str(f) for f in files], hyperparameters=hp,
                       seed=seed, device="cpu")

    steps = []
    for k, step in enumerate(summary["steps"], start=1):
        idx = chunks[k - 1]
        gamma_s = mean(s_train[0][i] - s_train[1][i] for i in idx)
        ev = split_metrics(logps(step["output"]["path"], heldout, setting), s_heldout, heldout, beta)
        steps.append({
            "index": k,
            "sources": describe(train, [idx])[0]["sources"],
            "first_loss": step["first_loss"],
            "last_loss": step["last_loss"],
            "mean_gamma_ref": step["mean_gamma_ref"],
            "mean_gamma_S_on_chunk": gamma_s,
            "train_reward_accuracy": step["reward_accuracy"],
            "train_reward_margin": step["reward_margin"],
            "global_steps": step["global_steps"],
            "train_seconds": step["train_seconds"],
            "eval": ev,
        })
    curve = []
    for line in (d / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("loss") is not None:
            curve.append({"step": m["step"], "global_step": m["global_step"], "loss": m["loss"]})

    result = {"seed": seed, "method": method, "learning_rate": learning_rate, "hyperparameters": hp,
              "steps": steps, "final": steps[-1]["eval"], "curve": curve}

    if method == "easy_to_hard":
        # Figure 2: mean gamma on the step-2 data under S, M1 (= step 2's reference) and M2.
        chunk2 = [train[i] for i in chunks[1]]
        hard = next(iter(steps[1]["sources"]))  # the step-2 source (the harder one under S)
        m1, m2 = summary["steps"][0]["output"]["path"], summary["steps"][1]["output"]["path"]
        c2, r2 = logps(m2, chunk2, setting)
        result["figure2"] = {
            "step2_sources": steps[1]["sources"],
            "step2_source": hard,
            "train": {"S": steps[1]["mean_gamma_S_on_chunk"], "M1": steps[1]["mean_gamma_ref"],
                      "M2": mean(a - b for a, b in zip(c2, r2, strict=True))},
            # the same three models on *unseen* pairs of the step-2 source
            "heldout": {
                "S": prep["S_eval"][hard]["mean_gamma"],
                "M1": steps[0]["eval"][hard]["mean_gamma"],
                "M2": steps[1]["eval"][hard]["mean_gamma"],
            },
            # consistency: step 1's reference is S, so its gamma_ref equals gamma_S on that chunk
            "step1_gamma_ref_minus_gamma_S": steps[0]["mean_gamma_ref"] - steps[0]["mean_gamma_S_on_chunk"],
        }
        if setting.figure3 and figure3:
            variant = train_with_other_reference(sd / "S", m1, chunk2, d / "fig3-work", hp, save_to=d / "fig3-model")
            variant["final_eval"] = split_metrics(logps(d / "fig3-model", heldout, setting), s_heldout, heldout, beta)
            variant["from_M1_curve"] = [{"global_step": c["global_step"], "loss": c["loss"]}
                                        for c in curve if c["step"] == 2]
            variant["from_M1_final_eval"] = steps[1]["eval"]
            result["figure3"] = variant

    if not keep:  # checkpoints are large (SmolLM2: 0.5 GB each); the numbers are in the result
        for p in [d / "run", d / "fig3-model", d / "fig3-work"]:
            shutil.rmtree(p, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - c0
    return result

