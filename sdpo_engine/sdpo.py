"""The whole sDPO loop in one process: base model -> T steps, each starting from and referenced by
the previous step's output. What `python -m sdpo_engine run` does; the service runs the same
steps one by one on workers instead.

Output layout under `out_dir`:
  base/ (only when the base had to be built or converted), data/step-K.jsonl (each step's chunk),
  step-K/ (checkpoint + manifest), work/step-K/ (trainer checkpoints for resume),
  metrics.jsonl (one line per logged optimizer step), summary.json.

Re-running the same command continues: a finished step (its checkpoint exists) is not trained
again, and an interrupted one resumes from its trainer checkpoint.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

from .config import StepConfig
from .data import describe_held_out_overlap, held_out_overlap, load_pairs, write_pairs
from .manifest import read_manifest
from .partition import PartitionError, pair_order, partition, source_order
from .protocol import PAIR_CURRICULUM_STRATEGIES, PARTITION_STRATEGIES, check_training_settings

STRATEGIES = PARTITION_STRATEGIES


def score_sources(model_dir: str | Path, pairs: list[dict], *, max_length: int, device: str = "auto",
                  batch_size: int = 8, text_format: str = "chat", chat_template: str | None = None,
                  ) -> dict[str, float]:
    """The paper's (v2) difficulty of each source: share of its pairs where the initial model already
    prefers the chosen answer (gamma > 0). Higher = easier. Pairs without training signal at
    `max_length` (they are dropped from training too) do not count; a source left with none is an error."""
    from .curriculum import logps_under

    kept, chosen, rejected = logps_under(model_dir, pairs, max_length=max_length, device=device,
                                         batch_size=batch_size, text_format=text_format, chat_template=chat_template)
    scored = [pairs[i] for i in kept]
    missing = sorted({p.get("source") or "(none)" for p in pairs} - {p.get("source") or "(none)" for p in scored})
    if missing:
        raise ValueError(f"no pair of source(s) {', '.join(missing)} has a training signal at max_length={max_length} "
                         "(prompt fills it, or both answers are the same tokens); raise max_length to score sources")
    wins: dict[str, list[int]] = {}
    for pair, c, r in zip(scored, chosen, rejected, strict=True):
        wins.setdefault(pair.get("source") or "(none)", []).append(int(c - r > 0))
    return {source: sum(v) / len(v) for source, v in sorted(wins.items())}


def plan_chunks(out_dir: Path, base: Path, *, step_files, train_file, strategy, n_steps, seed, sizes,
                source_field, max_length, device, emit, text_format: str = "chat",
                chat_template: str | None = None) -> tuple[list[Path], dict]:
    """Write each step's chunk to out_dir/data and say how they were made."""
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if step_files:
        chunks = []
        for k, f in enumerate(step_files, start=1):
            target = data_dir / f"step-{k}.jsonl"
            write_pairs(load_pairs(f, source_field=source_field), target)
            chunks.append(target)
        return chunks, {"strategy": "files", "files": [str(Path(f).resolve()) for f in step_files]}

    pairs = load_pairs(train_file, source_field=source_field)
    info: dict = {"strategy": strategy, "n_steps": n_steps, "seed": seed, "train_file": str(Path(train_file).resolve())}
    scores = None
    if strategy in ("easy_to_hard", "hard_to_easy"):
        scores = score_sources(base, pairs, max_length=max_length, device=device, text_format=text_format,
                               chat_template=chat_template)
        info["source_scores"] = scores
        info["source_order"] = source_order(scores, strategy)
        emit({"event": "info", "phase": "source_scores", "scores": scores, "order": info["source_order"]})
    pair_scores = None
    if strategy in PAIR_CURRICULUM_STRATEGIES:
        from .curriculum import score_pairs

        scored = score_pairs(base, pairs, max_length=max_length, device=device, text_format=text_format,
                             chat_template=chat_template)
        pair_scores = scored["scores"]
        _write_scores(data_dir / "step-1.scores.json", scored, list(range(len(pairs))))
        emit({"event": "info", "phase": "pair_scores", "step": 1, "model": scored["model"],
              "pairs": len(pairs), "unscored": pair_scores.count(None)})
    index_chunks = partition(pairs, strategy, n_steps, seed=seed, sizes=sizes, source_scores=scores,
                             pair_scores=pair_scores)
    info["chunk_indices"] = index_chunks
    chunks = []
    for k, idx in enumerate(index_chunks, start=1):
        target = data_dir / f"step-{k}.jsonl"
        write_pairs([pairs[i] for i in idx], target)
        chunks.append(target)
    info["sizes"] = [len(c) for c in index_chunks]
    return chunks, info


def _write_scores(path: Path, scored: dict, indices: list[int]) -> None:
    """The scores that ordered a chunk: {"model": identity, "indices": into the train file, "scores"}."""
    path.write_text(json.dumps({"model": scored["model"], "indices": indices, "scores": scored["scores"]}))


def rescore_chunk(out_dir: Path, k: int, previous: Path, plan: dict, *, max_length: int, device: str,
                  source_field: str, text_format: str, chat_template: str | None, emit) -> Path:
    """`rescore`: step k's chunk made of the easiest pairs (by M_{k-1}'s gamma) not in steps 1..k-1.

    Chunk sizes stay those of the first partition; chunks k+1.. are rewritten too (the remaining
    pairs in M_{k-1}'s order) so that every pair is still trained once. The scores and the identity
    of the model that gave them go to data/step-k.scores.json.
    """
    from .curriculum import score_pairs

    data_dir = out_dir / "data"
    pairs = load_pairs(plan["train_file"], source_field=source_field)
    chunk_indices: list[list[int]] = plan["chunk_indices"]
    trained = {i for chunk in chunk_indices[: k - 1] for i in chunk}
    remaining = [i for i in range(len(pairs)) if i not in trained]
    scored = score_pairs(previous, [pairs[i] for i in remaining], max_length=max_length, device=device,
                         text_format=text_format, chat_template=chat_template)
    order = [remaining[j] for j in pair_order(scored["scores"], len(remaining))]
    _write_scores(data_dir / f"step-{k}.scores.json", scored, remaining)
    start = 0
    for later in range(k, len(chunk_indices) + 1):
        size = len(chunk_indices[later - 1])
        chunk_indices[later - 1] = order[start : start + size]
        start += size
        write_pairs([pairs[i] for i in chunk_indices[later - 1]], data_dir / f"step-{later}.jsonl")
    if start != len(remaining):  # pragma: no cover - the sizes partition the pairs
        raise PartitionError("rescoring lost pairs")
    # A re-run of the command partitions afresh from the base's scores; this keeps the rescored chunks.
    (data_dir / "chunk-indices.json").write_text(json.dumps(chunk_indices))
    emit({"event": "info", "phase": "pair_scores", "step": k, "model": scored["model"], "pairs": len(remaining),
          "unscored": scored["scores"].count(None)})
    return data_dir / f"step-{k}.jsonl"


def run_sdpo(model: str, out_dir: str | Path, *, step_files: list[str] | None = None, train_file: str | None = None,
             strategy: str | None = None, n_steps: int | None = None, sizes: list[int] | None = None,
             rescore: bool = False,
             eval_file: str | None = None, hyperparameters: dict | None = None, seed: int = 0,
             source_field: str = "source", lora: dict | None = None, device: str = "auto",
             text_format: str = "chat", chat_template: str | None = None, packing: bool = True,
             pad_to_multiple_of: int | None = None, activation_checkpointing: str = "auto",
             pack_tokens: int | None = None, attention: str = "auto", param_dtype: str = "auto",
             compile: str = "off", group_by_length: bool = False, reference_batch_size: int | None = None,
             emit: Callable[[dict], None] | None = None) -> dict:
    """Run a whole sDPO job in this process and return the summary (also written to summary.json).

    `packing`, `pack_tokens`, `pad_to_multiple_of`, `activation_checkpointing`, `attention`, `param_dtype`,
    `compile`, `group_by_length` and `reference_batch_size` go into every step's spec (protocol.StepSpec,
    which says what they do).

    Every input file is checked against the base model's tokenizer first (markup.check_pairs,
    naming the user's own lines): a file that cannot be trained as asked raises
    `step.TrainingDataError` before any chunk is written or any model trained.
    """
    from transformers import AutoTokenizer

    from .models import resolve_base_model
    from .step import check_training_text, run_step

    if bool(step_files) == bool(train_file):
        raise ValueError("give either step files (one per step) or a train file with a partition strategy")
    if train_file and strategy not in STRATEGIES:
        raise ValueError(f"partition strategy must be one of {', '.join(STRATEGIES)}")
    if rescore and strategy not in PAIR_CURRICULUM_STRATEGIES:
        raise ValueError(f"rescore applies to {', '.join(PAIR_CURRICULUM_STRATEGIES)} only")
    hyperparameters = {**(hyperparameters or {})}
    hyperparameters.setdefault("seed", seed)
    cfg = StepConfig.from_dict(hyperparameters)  # fail before any work on a bad value
    check_training_settings(device=device, packing=packing, pad_to_multiple_of=pad_to_multiple_of,
                            activation_checkpointing=activation_checkpointing, pack_tokens=pack_tokens,
                            attention=attention, param_dtype=param_dtype, compile=compile,
                            group_by_length=group_by_length, reference_batch_size=reference_batch_size)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    user_emit = emit or (lambda e: None)
    t0 = time.perf_counter()
    base = resolve_base_model(model, out_dir / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if chat_template:
        tokenizer.chat_template = chat_template
    for f in (step_files or []) + ([train_file] if train_file else []) + ([eval_file] if eval_file else []):
        check_training_text(f, tokenizer, text_format=text_format, source_field=source_field,
                            model_name=str(model))
    if eval_file:
        trained_on = (step_files or []) + ([train_file] if train_file else [])
        overlap = held_out_overlap(trained_on, eval_file, source_field=source_field)
        message = describe_held_out_overlap(overlap, f"The held-out file {eval_file}", ", ".join(map(str, trained_on)))
        if message is not None:
            user_emit({"event": "warning", "code": "validation_overlap", "message": message})

    metrics_path = out_dir / "metrics.jsonl"
    metrics_fh = metrics_path.open("a", encoding="utf-8")

    def relay(event: dict):
        if event.get("event") == "metrics":
            metrics_fh.write(json.dumps({k: v for k, v in event.items() if k != "event"}) + "\n")
            metrics_fh.flush()
        user_emit(event)

    try:
        chunks, plan = plan_chunks(out_dir, base, step_files=step_files, train_file=train_file, strategy=strategy,
                                   n_steps=n_steps, seed=seed, sizes=sizes, source_field=source_field,
                                   max_length=cfg.max_length, device=device, emit=relay,
                                   text_format=text_format, chat_template=chat_template)
        kept_chunks = out_dir / "data" / "chunk-indices.json"
        if rescore and train_file and kept_chunks.is_file():  # rescored in an earlier run of the same command
            plan["chunk_indices"] = json.loads(kept_chunks.read_text())
            all_pairs = load_pairs(train_file, source_field=source_field)
            for k, idx in enumerate(plan["chunk_indices"], start=1):
                write_pairs([all_pairs[i] for i in idx], chunks[k - 1])
        steps = []
        previous = base
        for k, chunk in enumerate(chunks, start=1):
            output = out_dir / f"step-{k}"
            manifest = read_manifest(output)
            if manifest is None and rescore and k > 1:
                chunk = rescore_chunk(out_dir, k, previous, plan, max_length=cfg.max_length, device=device,
                                      source_field=source_field, text_format=text_format,
                                      chat_template=chat_template, emit=relay)
            if manifest is None:
                summary = run_step({
                    "index": k, "policy_init": str(previous), "train_file": str(chunk),
                    "output_dir": str(output), "work_dir": str(out_dir / "work" / f"step-{k}"),
                    "hyperparameters": cfg.to_dict(), "eval_file": eval_file,
                    "eval_reference": str(base) if eval_file else None, "lora": lora, "device": device,
                    "source_field": source_field, "text_format": text_format, "chat_template": chat_template,
                    "packing": packing, "pad_to_multiple_of": pad_to_multiple_of,
                    "activation_checkpointing": activation_checkpointing, "pack_tokens": pack_tokens,
                    "attention": attention, "param_dtype": param_dtype, "compile": compile,
                    "group_by_length": group_by_length, "reference_batch_size": reference_batch_size,
                }, emit=relay)
            else:  # finished in an earlier run of the same command
                summary = {**manifest["metrics"], "reference": manifest["reference"],
                           "output": {"path": str(output), "sha256": manifest["checkpoint_sha256"]}}
                relay({"event": "info", "phase": "skip_finished_step", "step": k})
            steps.append(_step_row(k, chunk, summary))
            scores_file = out_dir / "data" / f"step-{k}.scores.json"
            if plan.get("strategy") in PAIR_CURRICULUM_STRATEGIES and scores_file.is_file():
                steps[-1]["scored_with"] = json.loads(scores_file.read_text())["model"]
            previous = output
            gc.collect()
    finally:
        metrics_fh.close()

    result = {
        "model": model,
        "base": str(base),
        "partition": {**plan, "rescore": rescore} if train_file else plan,
        "hyperparameters": cfg.to_dict(),
        "eval_file": str(Path(eval_file).resolve()) if eval_file else None,
        "steps": steps,
        "final_checkpoint": steps[-1]["output"]["path"],
        "seconds": time.perf_counter() - t0,
    }
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def _step_row(k: int, chunk: Path, summary: dict) -> dict:
    keys = ("first_loss", "mean_gamma_ref", "last_loss", "reward_accuracy", "reward_margin", "pairs",
            "pairs_used", "pairs_dropped", "train_seconds", "global_steps")
    row = {"index": k, "chunk": str(chunk), "reference": summary["reference"], "output": summary["output"],
           **{key: summary.get(key) for key in keys}}
    if "eval" in summary:
        row["eval"] = summary["eval"]
    return row
