"""The contract between the worker (and the API) and the training process, in one place.

Standard library only: the API and the worker's light processes import it without torch. What
`python -m sdpo_engine step SPEC.json` exits with, the error codes its last error line carries, the
shapes of the JSON lines it prints, and the names both sides must agree on (partition strategies,
text formats). docs/CONTRACTS.md describes the same contract in prose.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Literal, TypedDict

__all__ = [
    "CURRICULUM_STRATEGIES",
    "ERROR_CODES",
    "PARTITION_STRATEGIES",
    "TEXT_FORMATS",
    "TRAINING_DATA_CODES",
    "ErrorEvent",
    "ExitCode",
    "InfoEvent",
    "MetricsEvent",
    "ResultEvent",
    "StoppedEvent",
    "WarningEvent",
]


class ExitCode(IntEnum):
    """Exit status of ``python -m sdpo_engine step`` (and ``run``)."""

    OK = 0
    FAILED = 1  # anything else; the worker retries up to SDPO_MAX_STEP_ATTEMPTS
    BAD_INPUT = 2  # bad spec or data (an error line says which); no retry helps
    NON_FINITE = 3  # a reference log-prob, loss, gradient norm or held-out metric is NaN or infinite
    STOPPED = 75  # EX_TEMPFAIL: stopped on request with a resumable trainer checkpoint in work_dir


# How one file is split into T steps (sdpo_engine.partition); the last two rank sources by the base
# model's difficulty scores (the paper's easy-to-hard curriculum).
PARTITION_STRATEGIES = ("random", "stratified", "easy_to_hard", "hard_to_easy")
CURRICULUM_STRATEGIES = ("easy_to_hard", "hard_to_easy")

# "chat": message lists through the chat template, markup inside text refused (sdpo_engine.markup);
# "raw": strings already formatted, trained exactly as given (sdpo_engine.tokens).
TEXT_FORMATS = ("chat", "raw")

# Codes of data that validated as a file but cannot be trained as asked on the model (exit 2); the
# worker makes them the job's error code.
TRAINING_DATA_CODES = ("special_tokens_in_text", "no_chat_template", "raw_needs_strings", "no_trainable_pairs")
# Every code an error line can carry.
ERROR_CODES = ("invalid_input", *TRAINING_DATA_CODES, "non_finite", "step_failed")


class MetricsEvent(TypedDict, total=False):
    """One per logged optimizer step: TRL's logged keys (``loss``, ``grad_norm``, ``rewards/*``,
    ``logps/*``, ``num_tokens``, …) plus these."""

    event: Literal["metrics"]
    step: int  # the sDPO step (1-based)
    global_step: int  # the optimizer step within this sDPO step
    max_steps: int
    tokens_per_second: float | None


class InfoEvent(TypedDict, total=False):
    """A phase of the step: ``start``, ``eval_reference``, ``pairs_dropped``, ``reference_logps``,
    ``memory``, ``resume``, ``train_end``, ``eval``; the other keys depend on the phase."""

    event: Literal["info"]
    phase: str
    step: int
    pairs_dropped: dict[str, Any]  # pairs_dropped: {reason: {"count", "lines"}}; reference_logps: {reason: count}


class WarningEvent(TypedDict, total=False):
    event: Literal["warning"]
    code: str  # e.g. first_loss_not_ln2
    message: str


class ErrorEvent(TypedDict, total=False):
    event: Literal["error"]
    code: str  # one of ERROR_CODES
    message: str
    param: str  # a hyperparameter, for invalid_input from StepConfig
    errors: list[dict[str, Any]]  # [{"line", "field", "reason"}] for data errors
    value: str  # non_finite: which value
    global_step: int  # non_finite: at which optimizer step


class ResultEvent(TypedDict):
    event: Literal["result"]
    step: int
    summary: dict[str, Any]


class StoppedEvent(TypedDict):
    event: Literal["stopped"]
    global_step: int
    checkpoint: str | None
