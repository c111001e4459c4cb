"""Hyperparameters of one DPO step: defaults, ranges and the errors users see.

Pure Python (no torch) on purpose: the API checks a job's hyperparameters with this same table
before anything is queued, and the engine checks them again before it trains, so the two can
never disagree about what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# TRL 1.16's DPOConfig.loss_type values that need nothing beyond a policy and a reference.
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
)


class ConfigError(ValueError):
    """A hyperparameter is missing, of the wrong type or out of range. `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric hyperparameter, with the reason a user reads on refusal."""

    low: float
    high: float
    low_inclusive: bool = True
    integer: bool = False


@dataclass
class StepConfig:
    """Hyperparameters of one sDPO step. Every field has a default and a range check."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature; the paper (following Zephyr) uses 0.1.",
                                               "range": Range(0.0, 10.0, low_inclusive=False)})
    learning_rate: float = field(default=5e-7, metadata={
        "help": "Peak learning rate (linear decay after warm-up). The paper uses 5e-7 on a 10.7B model; "
                "tiny models need 1e-4..1e-3.",
        "range": Range(0.0, 0.1, low_inclusive=False)})
    n_epochs: int = field(default=1, metadata={"help": "Passes over this step's chunk.",
                                               "range": Range(1, 100, integer=True)})
    batch_size: int = field(default=2, metadata={"help": "Pairs per device per optimizer micro-step.",
                                                 "range": Range(1, 1024, integer=True)})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-steps per optimizer step (global batch = batch_size x this x devices).",
        "range": Range(1, 1024, integer=True)})
    max_length: int = field(default=512, metadata={
        "help": "Tokens of prompt + answer kept per sequence (TRL truncates keeping the start).",
        "range": Range(8, 131072, integer=True)})
    loss_type: str = field(default="sigmoid", metadata={"help": f"TRL loss: one of {', '.join(LOSS_TYPES)}."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the step's optimizer steps spent warming up.",
                                                       "range": Range(0.0, 0.9)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the paper uses none).",
                                                       "range": Range(0.0, 1.0)})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.",
                                                        "range": Range(0.0, 1000.0, low_inclusive=False)})
    seed: int = field(default=0, metadata={"help": "Seed for data order, dropout and LoRA init.",
                                           "range": Range(0, 2**31 - 1, integer=True)})

    @classmethod
    def from_dict(cls, values: dict | None, *, defaults: dict | None = None) -> StepConfig:
        """Build a checked config. `"auto"` or a missing key means the default (model defaults first)."""
        values = dict(values or {})
        merged: dict = {}
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(key, f"unknown hyperparameter; known: {', '.join(sorted(known))}")
        for name, f in known.items():
            value = values.get(name, "auto")
            if value == "auto" or value is None:
                value = (defaults or {}).get(name, f.default)
            merged[name] = _check(name, value, f)
        return cls(**merged)

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, value, f):
    expected = f.type if isinstance(f.type, type) else {"float": float, "int": int, "str": str}[f.type]
    # bool is an int in Python; a JSON true must not become batch_size 1.
    if isinstance(value, bool):
        raise ConfigError(name, f"must be a {expected.__name__} or \"auto\", got a boolean")
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {type(value).__name__}")
        if name == "loss_type" and value not in LOSS_TYPES:
            raise ConfigError(name, f"unknown loss type {value!r}; one of {', '.join(LOSS_TYPES)}")
        return value
    if not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number or \"auto\", got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, "must be a finite number")
    rng: Range = f.metadata["range"]
    if rng.integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(name, f"must be an integer, got {value}")
            value = int(value)
    else:
        value = float(value)
    too_low = value < rng.low or (value == rng.low and not rng.low_inclusive)
    if too_low or value > rng.high:
        lo = "[" if rng.low_inclusive else "("
        raise ConfigError(name, f"{value} is out of range {lo}{rng.low:g}, {rng.high:g}]")
    return value


def learning_rate_from_multiplier(multiplier, base_learning_rate: float) -> float:
    """OpenAI's `learning_rate_multiplier` scales the model's default rate; checked like the rest."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise ConfigError("learning_rate_multiplier", "must be a finite number or \"auto\"")
    if not 0 < multiplier <= 100:
        raise ConfigError("learning_rate_multiplier", f"{multiplier} is out of range (0, 100]")
    return float(multiplier) * base_learning_rate
