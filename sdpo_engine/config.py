"""Hyperparameters of one DPO step: defaults, ranges and the errors users see.

Pure Python (no torch) on purpose: the API checks a job's hyperparameters with this same table
before anything is queued, and the engine checks them again before it trains, so the two can
never disagree about what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# TRL 1.16's DPOConfig.loss_type values (every one it has): each needs nothing beyond a policy and a
# reference. Several combine as a weighted sum (`loss_weights`), e.g. RPO = sigmoid + rpo_alpha * sft.
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
    "sigmoid_norm",
)

# The losses whose TRL 1.16 formula reads `label_smoothing` (dpo_trainer._compute_loss); the others ignore it.
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")

_REFERENCE_FREE_WHY = ("it is reference-free: it has no reference model, and sDPO's method is the reference chain "
                       "(step t's reference is step t-1's output, SDPO.md), which such a loss would ignore")
# Reference-free preference losses (TRL 1.16 has them in CPOTrainer and ORPOTrainer, not DPOTrainer), by the
# names users pass for them, with their hyperparameters: refused with the reason instead of "unknown".
REFERENCE_FREE_LOSSES = {"simpo": "SimPO", "cpo": "CPO", "alphapo": "AlphaPO", "orpo": "ORPO"}
REFERENCE_FREE_PARAMETERS = {"reference_free": "reference-free DPO", "dpo_reference_free": "reference-free DPO",
                             "simpo_gamma": "SimPO's target margin", "cpo_alpha": "CPO's NLL weight",
                             "orpo_alpha": "ORPO's odds-ratio weight"}

# Other names accepted for the loss settings, turned into StepConfig fields by `from_dict`:
# Together's `rpo_alpha` (RPO = sigmoid + rpo_alpha * sft).
ALIASES = ("rpo_alpha",)
MAX_LOSS_WEIGHT = 1000.0
MAX_RPO_ALPHA = 100.0


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
    high_inclusive: bool = True


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
    batch_size: int = field(default=2, metadata={"help": "Pairs per optimizer micro-step over all ranks (on N ranks each "
                                                         "takes batch_size / N).",
                                                 "range": Range(1, 1024, integer=True)})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-steps per optimizer step (global batch = batch_size x this, on any number of ranks).",
        "range": Range(1, 1024, integer=True)})
    max_length: int = field(default=512, metadata={
        "help": "Tokens of prompt + answer kept per sequence (TRL truncates keeping the start).",
        "range": Range(8, 131072, integer=True)})
    loss_type: str | list[str] = field(default="sigmoid", metadata={
        "help": f"TRL loss, or a list of them summed with `loss_weights`: {', '.join(LOSS_TYPES)}."})
    loss_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight (>= 0) per loss of `loss_type`; none: every weight 1 (TRL's default). "
                "`rpo_alpha` sets loss_type [sigmoid, sft] with weights [1, rpo_alpha]."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Probability that a preference label is flipped: robust (Robust DPO), aot and aot_unpaired; "
                "the epsilon of exo_pair (required there, the EXO paper uses 1e-3). Refused with other losses.",
        "range": Range(0.0, 0.5, high_inclusive=False)})
    ld_alpha: float | None = field(default=None, metadata={
        "help": "LD-DPO: weight of the completion tokens beyond the shorter answer's length in the log-probs "
                "(1 = plain sums, 0 = only the shared length); none: plain sums. sft ignores it.",
        "range": Range(0.0, 1.0)})
    discopop_tau: float = field(default=0.05, metadata={
        "help": "DiscoPOP's temperature (discopop loss only; the paper's 0.05).",
        "range": Range(0.0, 10.0, low_inclusive=False)})
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
            if key in REFERENCE_FREE_PARAMETERS:
                raise ConfigError(key, f"{REFERENCE_FREE_PARAMETERS[key]} is refused: {_REFERENCE_FREE_WHY}")
            if key not in known and key not in ALIASES:
                raise ConfigError(key, f"unknown hyperparameter; known: {', '.join(sorted([*known, *ALIASES]))}")
        _apply_rpo_alpha(values)
        for name, f in known.items():
            value = values.get(name, "auto")
            if _is_auto(value):
                value = (defaults or {}).get(name, f.default)
            merged[name] = _check(name, value, f)
        _check_loss_settings(merged, defaults_of={f.name: f.default for f in known.values()})
        return cls(**merged)

    @property
    def loss_types(self) -> list[str]:
        """`loss_type` as a list (TRL's DPOConfig form)."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value == "auto")


def _check(name: str, value, f):
    if name == "loss_type":
        return _check_loss_type(value)
    if name == "loss_weights":
        return None if value is None else _check_loss_weights(value)
    if value is None and f.default is None:  # an optional setting left off (ld_alpha)
        return None
    type_name = f.type if isinstance(f.type, str) else f.type.__name__
    expected = {"float": float, "int": int, "str": str}[type_name.replace(" | None", "")]
    # bool is an int in Python; a JSON true must not become batch_size 1.
    if isinstance(value, bool):
        raise ConfigError(name, f"must be a {expected.__name__} or \"auto\", got a boolean")
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {type(value).__name__}")
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
        try:
            value = float(value)
        except OverflowError:  # a JSON integer beyond float's range
            raise ConfigError(name, f"a number too large is out of range {_interval(rng)}") from None
    too_low = value < rng.low or (value == rng.low and not rng.low_inclusive)
    too_high = value > rng.high or (value == rng.high and not rng.high_inclusive)
    if too_low or too_high:
        raise ConfigError(name, f"{value} is out of range {_interval(rng)}")
    return value


def _interval(rng: Range) -> str:
    return f"{'[' if rng.low_inclusive else '('}{rng.low:g}, {rng.high:g}{']' if rng.high_inclusive else ')'}"


def _unknown_loss(name) -> ConfigError:
    if isinstance(name, str) and name.lower() in REFERENCE_FREE_LOSSES:
        return ConfigError("loss_type", f"{REFERENCE_FREE_LOSSES[name.lower()]} ({name!r}) is refused: "
                                        f"{_REFERENCE_FREE_WHY}")
    return ConfigError("loss_type", f"unknown loss type {name!r}; one of {', '.join(LOSS_TYPES)}")


def _check_loss_type(value) -> str | list[str]:
    """One TRL loss name, or a non-empty list of distinct ones; a one-name list becomes the name."""
    if isinstance(value, str):
        if value not in LOSS_TYPES:
            raise _unknown_loss(value)
        return value
    if not isinstance(value, list):
        raise ConfigError("loss_type", f"must be a loss name or a list of them, got {type(value).__name__}")
    if not value:
        raise ConfigError("loss_type", "the list of losses is empty")
    for name in value:
        if not isinstance(name, str) or name not in LOSS_TYPES:
            raise _unknown_loss(name)
    repeated = sorted({name for name in value if value.count(name) > 1})
    if repeated:
        raise ConfigError("loss_type", f"{', '.join(repeated)} given more than once; weight a loss with loss_weights")
    return list(value)


def _check_loss_weights(value) -> list[float]:
    if not isinstance(value, list):
        raise ConfigError("loss_weights", f"must be a list of numbers, got {type(value).__name__}")
    weights = []
    for i, w in enumerate(value):
        # isfinite on floats only: a huge JSON integer would overflow it (and fails the range check).
        if isinstance(w, bool) or not isinstance(w, (int, float)) or (isinstance(w, float) and not math.isfinite(w)):
            raise ConfigError("loss_weights", f"weight {i} must be a finite number, got {w!r}")
        if not 0 <= w <= MAX_LOSS_WEIGHT:
            raise ConfigError("loss_weights", f"weight {i} = {w} is out of range [0, {MAX_LOSS_WEIGHT:g}]")
        weights.append(float(w))
    if weights and not any(weights):
        raise ConfigError("loss_weights", "every weight is 0: the loss would be 0 and nothing would train")
    return weights


def _apply_rpo_alpha(values: dict) -> None:
    """Together's `rpo_alpha` (RPO, Pang et al. 2024: DPO plus rpo_alpha times the chosen answers' NLL) as
    TRL 1.16 spells it: loss_type ["sigmoid", "sft"], loss_weights [1, rpo_alpha]; 0 is plain sigmoid."""
    alpha = values.pop("rpo_alpha", "auto")
    if _is_auto(alpha):
        return
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or (isinstance(alpha, float) and not math.isfinite(alpha))):
        raise ConfigError("rpo_alpha", f"must be a finite number or \"auto\", got {alpha!r}")
    if not 0 <= alpha <= MAX_RPO_ALPHA:
        raise ConfigError("rpo_alpha", f"{alpha} is out of range [0, {MAX_RPO_ALPHA:g}]")
    loss_type, weights = values.get("loss_type", "auto"), values.get("loss_weights", "auto")
    if not (_is_auto(loss_type) or loss_type in ("sigmoid", ["sigmoid"])) or not _is_auto(weights):
        raise ConfigError("rpo_alpha", "rpo_alpha means loss_type [\"sigmoid\", \"sft\"] with loss_weights "
                                       "[1, rpo_alpha]; give either rpo_alpha or loss_type/loss_weights, not both")
    if alpha == 0:
        values["loss_type"] = "sigmoid"
    else:
        values["loss_type"], values["loss_weights"] = ["sigmoid", "sft"], [1.0, float(alpha)]


def _check_loss_settings(merged: dict, *, defaults_of: dict) -> None:
    """The checks between the loss fields: weights per loss, and no setting the chosen losses ignore."""
    losses = [merged["loss_type"]] if isinstance(merged["loss_type"], str) else merged["loss_type"]
    weights = merged["loss_weights"]
    if weights is not None and len(weights) != len(losses):
        raise ConfigError("loss_weights", f"{len(weights)} weight(s) for {len(losses)} loss(es) "
                                          f"({', '.join(losses)}): give one weight per loss")
    smoothing = merged["label_smoothing"]
    readers = [name for name in losses if name in LABEL_SMOOTHING_LOSSES]
    if smoothing > 0 and not readers:
        raise ConfigError("label_smoothing", f"{', '.join(losses)} ignore(s) it: only "
                          f"{', '.join(LABEL_SMOOTHING_LOSSES)} read it in TRL 1.16 (conservative DPO's smoothed "
                          "labels are loss_type robust, its unbiased form; TRL 1.16's sigmoid has no smoothing)")
    if "exo_pair" in losses and smoothing == 0:
        raise ConfigError("label_smoothing", "exo_pair needs label_smoothing > 0 (its epsilon; the EXO paper "
                                             "uses 1e-3)")
    if merged["ld_alpha"] is not None and losses == ["sft"]:
        raise ConfigError("ld_alpha", "sft ignores it (its NLL is a mean over tokens, not a log-ratio)")
    if merged["discopop_tau"] != defaults_of["discopop_tau"] and "discopop" not in losses:
        raise ConfigError("discopop_tau", f"only the discopop loss reads it; loss_type is {', '.join(losses)}")


def learning_rate_from_multiplier(multiplier, base_learning_rate: float) -> float:
    """OpenAI's `learning_rate_multiplier` scales the model's default rate; checked like the rest."""
    if (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))
            or (isinstance(multiplier, float) and not math.isfinite(multiplier))):
        raise ConfigError("learning_rate_multiplier", "must be a finite number or \"auto\"")
    if not 0 < multiplier <= 100:
        raise ConfigError("learning_rate_multiplier", f"{multiplier} is out of range (0, 100]")
    return float(multiplier) * base_learning_rate
