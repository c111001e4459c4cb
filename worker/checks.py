"""Checks before training: the text checks a job passes before any chunk or step (every file against
the model's tokenizer: markup in the text, message lists without a chat template), so a job that
cannot train as asked fails at preparation, not hours later; the held-out overlap a job is warned of
(`held_out_warning`: validation pairs the training data already holds); and the check a training worker passes
at start (`training_host_problem`), so a setting this host cannot train with stops the worker, not
every user's job at its first step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.settings import Settings
from sdpo_engine.data import (
    DataError,
    describe_held_out_overlap,
    held_out_overlap,
    load_numbered_pairs,
    validate_file,
)
from sdpo_engine.markup import check_pairs, read_tokenizer_files
from sdpo_engine.protocol import SpecError, check_training_settings
from worker.workdir import local_path

# Run in a child with the engine's environment (the worker's GPUs): torch is imported there, never in the
# worker. Exits 1 with the reason on its last stderr line.
_DEVICE_PROBE = """
import os
import sys
from sdpo_engine.protocol import SpecError
from sdpo_engine.step import resolve_device
if expected := int(sys.argv[3]):
    import torch
    if (seen := torch.cuda.device_count()) != expected:
        sys.exit(f"SDPO_WORKER_GPUS names {expected} GPU(s) but torch sees {seen} "
                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
try:
    device = resolve_device(sys.argv[1])
except SpecError as e:
    sys.exit(f"SDPO_DEVICE={sys.argv[1]}: {e}")
if sys.argv[2] == "flex":
    from sdpo_engine.flex import unavailable
    if why := unavailable(device):
        sys.exit(f"SDPO_ATTENTION=flex (SDPO_DEVICE={sys.argv[1]}, here {device}): {why}")
"""


def training_host_problem(settings: Settings, *, timeout: float = 300.0) -> str | None:
    """Why this host cannot train a step with the worker's training settings, or None.

    Every setting goes through the step spec's own check (protocol.check_training_settings: e.g.
    SDPO_ATTENTION=flex with SDPO_PACKING off, SDPO_PARAM_DTYPE=bfloat16-sr without torchao); where
    the answer depends on the host (SDPO_DEVICE=cuda, SDPO_ATTENTION=flex, SDPO_WORKER_GPUS), a child
    process with the engine's environment asks torch (a few seconds; nothing is imported here). Without
    this, the first two failed every job at its first step with the spec's error, and GPUs the host
    lacks (CUDA_VISIBLE_DEVICES naming none that exist) left `auto` training on the CPU, silently.
    """
    try:
        check_training_settings(**settings.training_settings())
    except SpecError as e:
        return f"the worker's training settings (SDPO_*): {e}"
    if settings.device != "cuda" and settings.attention != "flex" and not settings.worker_gpus:
        return None  # auto and cpu train on any host
    env = {**os.environ, **(settings.engine_environment() or {})}
    try:
        probe = subprocess.run([sys.executable, "-c", _DEVICE_PROBE, settings.device, settings.attention,
                                str(len(settings.worker_gpus))],
                               env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"the device check (torch) did not answer within {timeout:.0f} s"
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        return lines[-1] if lines else f"the device check exited {probe.returncode}"
    return None


def check_text(files: list[tuple[str, str]], base: Path, model_id: str, text_format: str,
               chat_template: str | None, *, source_field: str) -> tuple[str, str] | None:
    """(code, message) for the first of `files` ([(file id, storage URI)]) the model's tokenizer
    refuses (markup.check_pairs), or None.

    Reads the tokenizer's saved files only (no transformers in this process); the step checks again
    with the loaded tokenizer before it trains.
    """
    tokenizer = read_tokenizer_files(base)
    if tokenizer is None:
        return None  # no tokenizer files to read: the step's own check (with the loaded tokenizer) decides
    if chat_template:
        tokenizer.chat_template = chat_template
    for file_id, uri in files:
        path = local_path(uri)
        try:
            numbered = load_numbered_pairs(path, source_field=source_field)
        except DataError as e:
            return "invalid_training_data", f"File {file_id}: {e}"
        fmt = validate_file(path, source_field=source_field, max_errors=1)["format"]
        checked = check_pairs(numbered, fmt=fmt, tokenizer=tokenizer, text_format=text_format, model_name=model_id)
        if not checked["valid"]:
            first = checked["errors"][0]
            where = f"line {first['line']}, {first['field']}: " if first["line"] else ""
            more = checked["error_count"] - 1
            return checked["code"], (f"File {file_id} cannot be trained on {model_id}: {where}{first['reason']}"
                                     + (f" ({more} more problem(s) of this kind in the file)" if more > 0 else ""))
    return None


def held_out_warning(training: list[tuple[str, str]], validation: tuple[str, str], *,
                     source_field: str) -> tuple[str, dict] | None:
    """(message, data) for a warn event when the validation file ([file id, storage URI]) shares pairs or
    prompts with the `training` files (`sdpo_engine.data.held_out_overlap`), else None. A warning, not a
    refusal: some users hold out on purpose from the same prompts; everyone should know the held-out
    figures are then not measured on unseen data."""
    val_id, val_uri = validation
    overlap = held_out_overlap([local_path(uri) for _, uri in training], local_path(val_uri), source_field=source_field)
    message = describe_held_out_overlap(overlap, f"Validation file {val_id}", ", ".join(fid for fid, _ in training))
    return None if message is None else (message, {"code": "validation_overlap", "validation_file": val_id, **overlap})
