"""The pair-level curriculum's scores (strategy ``pair_easy_to_hard``, partition.py).

A pair's score is its gamma, log p(chosen) - log p(rejected) summed over each answer's tokens
(nats), under a model: the initial model before step 1, and with ``rescore`` the previous step's
checkpoint M_{t-1} for the pairs not yet trained before step t. Higher gamma = the model already
prefers the chosen answer by more = easier. The numbers come from `step.pair_logps`, which is
TRL's reference pass itself, so the gamma used to order a pair equals the gamma_ref its step trains
against (for the pairs of step 1, and of step t when rescored with M_{t-1}).

`python -m sdpo_engine score-pairs --model DIR --file FILE` prints
``{"scores": [gamma | null per pair, in file order], "model": {checkpoint identity}}``: the worker
runs it before step 1 (and before each later step with ``rescore``), so the worker itself never
imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import checkpoint_identity


def logps_under(model_dir: str | Path, pairs: list[dict], *, max_length: int, device: str = "auto",
                batch_size: int = 8, text_format: str = "chat", chat_template: str | None = None,
                ) -> tuple[list[int], list[float], list[float]]:
    """Summed log-probs of each pair's chosen and rejected answer under the model in `model_dir`
    (step.pair_logps): ``(kept, chosen, rejected)``, `kept` the indices into `pairs` of the pairs that
    have a training signal at `max_length` (the others are dropped from training too), the two lists
    aligned with it. Shared by the pair-level (score_pairs) and source-level (sdpo.score_sources)
    curricula."""
    from .step import load_policy, pair_logps, resolve_device

    device = resolve_device(device)
    tokenizer, model = load_policy(model_dir, device)
    if chat_template:
        tokenizer.chat_template = chat_template
    kept: list[int] = []
    chosen, rejected = pair_logps(model, tokenizer, pairs, max_length=max_length, batch_size=batch_size,
                                  device=device, text_format=text_format, kept=kept)
    return kept, chosen, rejected


def score_pairs(model_dir: str | Path, pairs: list[dict], *, max_length: int, device: str = "auto",
                batch_size: int = 8, text_format: str = "chat", chat_template: str | None = None,
                ) -> dict[str, Any]:
    """Each pair's gamma under the model in `model_dir`.

    Returns ``{"scores": [float | None] (len(pairs), None where the pair has no training signal at
    `max_length` and is dropped from training too), "model": manifest.checkpoint_identity(model_dir)}``:
    the identity (a step checkpoint's manifest sha256) is what ties a chunk to the model that ordered it.
    """
    kept, chosen, rejected = logps_under(model_dir, pairs, max_length=max_length, device=device,
                                         batch_size=batch_size, text_format=text_format, chat_template=chat_template)
    scores: list[float | None] = [None] * len(pairs)
    for i, c, r in zip(kept, chosen, rejected, strict=True):
        scores[i] = float(c - r)
    return {"scores": scores, "model": checkpoint_identity(model_dir)}
