"""The worker's file-system work: where a step reads and writes, the starting model as a plain
folder, the chunks of a partitioned job, the trainer state handed from one attempt to the next,
and the checkpoint moved into the store. No database here: the flows pass in what they read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.storage import LOCAL_SCHEME
from sdpo_engine.data import load_pairs, pair_rows
from sdpo_engine.partition import pair_order, partition, source_order
from sdpo_engine.protocol import PAIR_CURRICULUM_STRATEGIES, TRAINER_CHECKPOINT_SEAL
from worker import db
from worker.supervisor import child_environment, engine_command

TRAINER_STATE = "trainer_state.json"  # transformers writes it last into a trainer checkpoint


def local_path(uri: str) -> Path:
    """A local path for a storage URI or a `file://` path of a registered model."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return db.storage().local_path(uri)


def checkpoint_dir(uri: str) -> tuple[Path, bool | None]:
    """(a local folder holding the stored checkpoint at `uri`, whether this host's cache had it:
    True/False for a remote store, None for the local folder store, which has no cache). A remote
    checkpoint is downloaded into the cache on a miss, every file checked against the sha256 in
    the store's index. Raises `core.storage.CorruptObject` (a file missing or changed),
    FileNotFoundError (no such checkpoint), `core.storage.StorageUnavailable` (after retries)."""
    store = db.storage()
    if uri.startswith("file://") or store.scheme == LOCAL_SCHEME:
        return local_path(uri), None
    return store.cached_tree(uri)


def job_work_dir(settings: Settings, job_id: str) -> Path:
    """The job's working folder (trainer state of its steps), removed when the job is over."""
    # In the store's folder, not the worker's: a resumed attempt may run on another host that
    # shares the store, and must find the trainer checkpoint there.
    return settings.storage_dir / "work" / job_id


def step_work_dir(settings: Settings, job_id: str, index: int) -> Path:
    """Step `index`'s working folder: one `attempt-<n>/` per attempt (its trainer state, output, log)."""
    return job_work_dir(settings, job_id) / f"step-{index}"


def model_dir(settings: Settings, base_model: tuple[str, str, str]) -> Path:
    """A plain HF directory for a starting model (source, id, uri): GGUF is converted once (outside
    any transaction, it takes a while) into the shared store, so every worker host reuses it.
    Raises RuntimeError when the conversion fails, OSError when the file cannot be read."""
    source, model_id, uri = base_model
    path = local_path(uri) if uri.startswith(("file://", "local://", "s3://")) else Path(uri)
    if source != "gguf":
        return path
    key = hashlib.sha256(f"{path}:{path.stat().st_size}".encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_id)
    out = settings.storage_dir / "models" / f"{safe}-{key}"
    if not (out / "config.json").is_file():
        done = subprocess.run(engine_command("base-model", str(path), str(out)), capture_output=True, text=True,
                              env=child_environment())
        if done.returncode != 0 and not (out / "config.json").is_file():
            raise RuntimeError(f"converting {path} failed: {done.stderr[-1000:]}")
    return out


def write_chunks(settings: Settings, job_id: str, train_path: Path, plan: dict[str, Any], base: Path | None,
                 max_length: int, seed: int,
                 text: tuple[str, str | None] = ("chat", None)) -> tuple[list[tuple[str, dict]], dict[str, Any]]:
    """Partition the training file into `plan["n_steps"]` chunks in storage, scoring the sources (or,
    for pair_easy_to_hard, every pair: `score-pairs`) with the `base` model first for the
    difficulty-ordered strategies. Returns ([(uri, stats)], the plan with `source_scores`/`source_order`
    or `pair_scores: {"1": the base's record}` added). Raises PartitionError or ValueError (scoring failed)."""
    source_field = plan.get("source_field") or "source"
    pairs = load_pairs(train_path, source_field=source_field)
    scores = None
    pair_scores = None
    if base is not None:
        text_format, chat_template = text
        extra = ["--text-format", text_format]
        if chat_template:
            template_file = job_work_dir(settings, job_id) / "chat_template.jinja"
            template_file.parent.mkdir(parents=True, exist_ok=True)
            template_file.write_text(chat_template, encoding="utf-8")
            extra += ["--chat-template-file", str(template_file)]
        by_pair = plan["strategy"] in PAIR_CURRICULUM_STRATEGIES
        done = subprocess.run(engine_command("score-pairs" if by_pair else "score-sources", "--model", str(base),
                                             "--file", str(train_path),
                                             "--max-length", str(max_length), "--source-field", source_field,
                                             "--device", settings.device, *extra),
                              capture_output=True, text=True, env=child_environment())
        if done.returncode != 0:
            raise ValueError(f"scoring the {'pairs' if by_pair else 'sources'} failed: "
                             f"{done.stderr.strip().splitlines()[-1:]}")
        scored = json.loads(done.stdout.strip().splitlines()[-1])
        if by_pair:
            pair_scores = scored["scores"]
            # the model that ordered the chunks (the lineage of a pair-level curriculum); per step with rescore
            plan = {**plan, "pair_scores": {"1": _scores_record(scored)}}
        else:
            scores = scored
            plan = {**plan, "source_scores": scores, "source_order": source_order(scores, plan["strategy"])}
    chunks = partition(pairs, plan["strategy"], plan["n_steps"], seed=seed, sizes=plan.get("sizes"),
                       source_scores=scores, pair_scores=pair_scores)
    out = []
    for k, idx in enumerate(chunks, start=1):
        rows = [pairs[i] for i in idx]
        # pair_rows: a chunk of a string file stays a string file (what the step's own checks read)
        body = (json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in pair_rows(rows))
        stored = db.storage().save_stream(f"chunks/{job_id}/step-{k}.jsonl", body)
        sources = Counter(r.get("source") or "(none)" for r in rows)
        out.append((stored.uri, {"rows": len(rows), "sources": dict(sorted(sources.items())),
                                 "sha256": stored.sha256, "bytes": stored.bytes}))
    return out, plan


def rescore_chunks(settings: Settings, job_id: str, index: int, model: Path, remaining: list[tuple[int, str, int]],
                   *, source_field: str, max_length: int,
                   text: tuple[str, str | None] = ("chat", None)) -> tuple[list[tuple[int, str, dict]], dict[str, Any]]:
    """``rescore`` before step `index`: the pairs of the chunks `remaining` [(step, URI, rows)] (steps
    index.., not trained yet) scored by `model` (M_{index-1}) with `python -m sdpo_engine score-pairs`,
    ordered easiest first (partition.pair_order) and cut again into chunks of the same sizes, stored
    under chunks/<job>/rescored-<index>/. Returns ([(step, URI, stats)], the model's record). Raises
    ValueError when scoring fails."""
    pairs: list[dict] = []
    for _, uri, _ in remaining:
        pairs.extend(load_pairs(local_path(uri), source_field=source_field))
    work = job_work_dir(settings, job_id)
    work.mkdir(parents=True, exist_ok=True)
    pool = work / f"rescore-{index}.jsonl"
    pool.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in pair_rows(pairs)))
    extra = ["--text-format", text[0]]
    if text[1]:
        template_file = work / "chat_template.jinja"
        template_file.write_text(text[1], encoding="utf-8")
        extra += ["--chat-template-file", str(template_file)]
    done = subprocess.run(engine_command("score-pairs", "--model", str(model), "--file", str(pool),
                                         "--max-length", str(max_length), "--source-field", source_field,
                                         "--device", settings.device, *extra),
                          capture_output=True, text=True, env=child_environment())
    if done.returncode != 0:
        raise ValueError(f"rescoring the pairs before step {index} failed: {done.stderr.strip().splitlines()[-1:]}")
    scored = json.loads(done.stdout.strip().splitlines()[-1])
    order = pair_order(scored["scores"], len(pairs))
    out, start = [], 0
    for k, _, rows in remaining:
        chunk = [pairs[i] for i in order[start : start + rows]]
        start += rows
        out.append((k, *_store_chunk(f"chunks/{job_id}/rescored-{index}/step-{k}.jsonl", chunk)))
    return out, _scores_record(scored)


def _store_chunk(key: str, rows: list[dict]) -> tuple[str, dict]:
    body = (json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in pair_rows(rows))
    stored = db.storage().save_stream(key, body)
    sources = Counter(r.get("source") or "(none)" for r in rows)
    return stored.uri, {"rows": len(rows), "sources": dict(sorted(sources.items())), "sha256": stored.sha256,
                        "bytes": stored.bytes}


def _scores_record(scored: dict[str, Any]) -> dict[str, Any]:
    """What the plan keeps of a `score-pairs` answer: the model's identity (sha256, step) and how many
    pairs it scored; the scores themselves stay in the chunks' order."""
    model = scored.get("model") or {}
    return {"sha256": model.get("sha256"), "step": model.get("step"), "pairs": len(scored["scores"]),
            "unscored": sum(s is None for s in scored["scores"])}


def new_attempt_dir(work: Path, attempt: int) -> Path:
    """An empty `attempt-<n>/` folder under the step's working folder (a leftover of a try is removed)."""
    attempt_dir = work / f"attempt-{attempt}"
    shutil.rmtree(attempt_dir, ignore_errors=True)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    return attempt_dir


def newest_trainer_checkpoint(work: Path) -> tuple[int, Path] | None:
    """(global step, folder) of the newest complete trainer checkpoint under a step's work folder
    (any attempt's), or None. Complete: it has `trainer_state.json` and the engine's seal
    (`TRAINER_CHECKPOINT_SEAL`, written after every rank saved), so one cut off by a kill never counts
    and none the engine would refuse to resume is handed over or stored."""
    best: tuple[int, Path] | None = None
    for folder in work.glob("attempt-*/trainer/checkpoint-*"):
        number = folder.name.rsplit("-", 1)[-1]
        if not number.isdigit() or not all((folder / name).is_file() for name in (TRAINER_STATE,
                                                                                   TRAINER_CHECKPOINT_SEAL)):
            continue
        if best is None or int(number) > best[0]:
            best = (int(number), folder)
    return best


def hand_over_trainer_state(work: Path, attempt: int) -> Path | None:
    """Seed this attempt's trainer folder with the newest complete trainer checkpoint of an earlier
    attempt on this host (paused, or its worker died); returns it, or None to start afresh.

    Each attempt trains in a folder of its own, so an attempt that was written off but still runs
    (its worker lost the database for longer than `step_stale_seconds`) never writes where the
    new attempt reads. The files are hard links: no copy of optimizer states, and the old folders
    can go at once. One written on another host comes from the store (`worker.trainer_state`).
    """
    best = newest_trainer_checkpoint(work)
    mine = work / f"attempt-{attempt}" / "trainer"
    if best is not None:
        mine.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(best[1], mine / best[1].name, copy_function=os.link)
        except OSError:  # a store without hard links
            shutil.rmtree(mine / best[1].name, ignore_errors=True)
            shutil.copytree(best[1], mine / best[1].name)
    for old in work.glob("attempt-*"):
        if old.name != f"attempt-{attempt}":
            shutil.rmtree(old, ignore_errors=True)
    return mine / best[1].name if best else None


def write_step_spec(attempt_dir: Path, spec: dict[str, Any]) -> Path:
    """The training process's input (`sdpo_engine step SPEC`): `spec.json` in the attempt's folder."""
    path = attempt_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def store_checkpoint(out_dir: Path, job_id: str, checkpoint_id: str) -> str:
    """Move a step's finished output folder into the store as `checkpoints/<job>/<checkpoint>`.
    Returns its uri. Raises OSError (after removing `out_dir`) when the store refuses it.

    The output folder is complete (the engine renamed it into place) and lives under the store's
    root, so it moves in by a rename, not a copy of the weights; a failed move leaves nothing under
    that name."""
    try:
        return db.storage().move_tree(out_dir, f"checkpoints/{job_id}/{checkpoint_id}")
    except OSError:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def describe_os_error(exc: OSError) -> str:
    """The reason of a failed write without the store's paths ("No space left on device")."""
    if exc.errno:
        return os.strerror(exc.errno)
    # shutil.copytree gathers the failed files into one shutil.Error: [(src, dst, "[Errno 28] …"), …]
    found = re.search(r"\[Errno (\d+)\]", str(exc.args[0] if exc.args else ""))
    return os.strerror(int(found.group(1))) if found else type(exc).__name__
