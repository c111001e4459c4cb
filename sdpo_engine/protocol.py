"""The contract between the worker (and the API) and the training process, in one place.

Standard library only: the API and the worker's light processes import it without torch. What
`python -m sdpo_engine step SPEC.json` exits with, the error codes its last error line carries, the
shapes of the JSON lines it prints, and the names both sides must agree on (partition strategies,
text formats). docs/CONTRACTS.md describes the same contract in prose.
"""

# No `from __future__ import annotations`: TypedDict reads Required[...] only from evaluated annotations.
import importlib.util
from dataclasses import dataclass, field, fields
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, Literal, NotRequired, Required, TypedDict

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "ATTENTION",
    "COMPILE_MODES",
    "CURRICULUM_STRATEGIES",
    "PAIR_CURRICULUM_STRATEGIES",
    "DEVICES",
    "DISTRIBUTED_STRATEGIES",
    "DistributedSpec",
    "ERROR_CODES",
    "ErrorEvent",
    "EvalInfo",
    "EvalReferenceInfo",
    "EventKind",
    "ExitCode",
    "InfoEvent",
    "InfoPhase",
    "LoraSpec",
    "MAX_PACK_TOKENS",
    "MAX_PAD_TO_MULTIPLE_OF",
    "MAX_REFERENCE_BATCH_SIZE",
    "MAX_SAMPLE_NEW_TOKENS",
    "MAX_SAMPLE_PROMPTS",
    "PARAM_DTYPES",
    "PairScoresInfo",
    "SamplesInfo",
    "SamplesSpec",
    "MemoryInfo",
    "MetricsEvent",
    "PARTITION_STRATEGIES",
    "PairsDroppedInfo",
    "PartitionPlan",
    "ReferenceLogpsInfo",
    "ResultEvent",
    "ResumeInfo",
    "SpecError",
    "StartInfo",
    "StepSpec",
    "StoppedEvent",
    "TEXT_FORMATS",
    "TORCHAO_MISSING",
    "TRAINING_DATA_CODES",
    "TRAINING_SETTINGS",
    "TrainEndInfo",
    "WarningEvent",
    "check_training_settings",
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
PARTITION_STRATEGIES = ("random", "stratified", "easy_to_hard", "hard_to_easy", "pair_easy_to_hard")
CURRICULUM_STRATEGIES = ("easy_to_hard", "hard_to_easy")
# Orders pairs (not sources) by their gamma under the model: the initial one, or with `rescore`
# M_{t-1} for the pairs not yet trained before step t. Needs no source field.
PAIR_CURRICULUM_STRATEGIES = ("pair_easy_to_hard",)


class PartitionPlan(TypedDict):
    """How a partitioned job's training file is split into its steps' chunks: written by the API
    (`jobs.partition`, echoed in the job's `method.sdpo.partition`), read by the worker."""

    strategy: str  # one of PARTITION_STRATEGIES
    n_steps: int  # T, the number of chunks
    source_field: str  # the field naming each pair's source
    sizes: list[int] | None  # rows per chunk (random/stratified), summing to the file's rows; None: even
    rescore: NotRequired[bool]  # pair_easy_to_hard: rescore the remaining pairs with M_{t-1} before step t

# "chat": message lists through the chat template, markup inside text refused (sdpo_engine.markup);
# "raw": strings already formatted, trained exactly as given (sdpo_engine.tokens).
TEXT_FORMATS = ("chat", "raw")

DEVICES = ("auto", "cpu", "cuda")
# In a trainer checkpoint: written last, by rank 0 after every rank saved its part (distributed.checkpoint_seal),
# with the layout {"world_size", "strategy"}. The engine resumes only a sealed checkpoint, so the worker hands
# over and stores only sealed ones (transformers' own trainer_state.json is written before the other ranks'
# RNG files are).
TRAINER_CHECKPOINT_SEAL = "sdpo-layout.json"
# How a step's N ranks split the work (sdpo_engine.distributed): "ddp" keeps a whole model, its gradients and
# optimizer states on every rank; "fsdp" (FSDP2, `fully_shard`) shards them across the ranks.
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")
MAX_PROCESSES = 1024
# "auto": on only where the largest batch's activations would not fit (step.plan_activation_checkpointing).
ACTIVATION_CHECKPOINTING = ("auto", "on", "off")
# The attention of the policy (step.load_policy). "auto": transformers' default for the model; "flex":
# FlexAttention on the packed pairs (sdpo_engine.flex), everything else on sdpa.
ATTENTION = ("auto", "sdpa", "flex")
# Weights of the policy and of its reference pass (step.load_policy, step.dpo_config). "auto": float32
# weights, with bf16 autocast on a GPU that supports it and plain float32 on CPU (the engine before #19);
# "float32": float32 weights and compute everywhere; "bfloat16": bf16 weights and compute (pure bf16, no
# autocast), AdamW's states in bf16 like the weights they follow; "bfloat16-master": bf16 weights and compute,
# AdamW over float32 master copies; "bfloat16-sr": bf16 weights and compute, torchao's AdamW with stochastic
# rounding (the `perf` extra). The optimizers: sdpo_engine.precision.
PARAM_DTYPES = ("auto", "float32", "bfloat16", "bfloat16-master", "bfloat16-sr")
TORCHAO_MISSING = "param_dtype bfloat16-sr needs torchao: pip install -e '.[perf]'"
# "layers": torch.compile of each decoder layer, in place (sdpo_engine.regional); "off": eager.
COMPILE_MODES = ("off", "layers")
MAX_PAD_TO_MULTIPLE_OF = 4096
# Largest packed row (pack_tokens): the block mask of a row is rows x tokens^2 booleans.
MAX_PACK_TOKENS = 65536
# Largest reference_batch_size: pairs per batch of the no-gradient reference pass.
MAX_REFERENCE_BATCH_SIZE = 4096

# Codes of data that validated as a file but cannot be trained as asked on the model (exit 2); the
# worker makes them the job's error code.
TRAINING_DATA_CODES = ("special_tokens_in_text", "no_chat_template", "raw_needs_strings", "no_trainable_pairs")
# Every code an error line can carry.
ERROR_CODES = ("invalid_input", *TRAINING_DATA_CODES, "non_finite", "step_failed")


class EventKind(StrEnum):
    """The `event` of a JSON line the step prints (a str: compares equal to the plain string)."""

    METRICS = "metrics"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    RESULT = "result"
    STOPPED = "stopped"


class InfoPhase(StrEnum):
    """The `phase` of an info line, in the order a step prints them (the last two: `run` only)."""

    START = "start"
    EVAL_REFERENCE = "eval_reference"
    PAIRS_DROPPED = "pairs_dropped"
    REFERENCE_LOGPS = "reference_logps"
    MEMORY = "memory"
    RESUME = "resume"
    TRAIN_END = "train_end"
    EVAL = "eval"
    SOURCE_SCORES = "source_scores"
    SKIP_FINISHED_STEP = "skip_finished_step"
    SAMPLES = "samples"  # seconds of the held-out samples' generation (samples.py), after eval
    PAIR_SCORES = "pair_scores"  # run with pair_easy_to_hard: the model that ordered step t's chunk


class MetricsEvent(TypedDict, total=False):
    """One per logged optimizer step: TRL's logged keys (``loss``, ``grad_norm``, ``rewards/*``,
    ``logps/*``, ``num_tokens``, …) plus these."""

    event: Required[Literal["metrics"]]
    step: Required[int]  # the sDPO step (1-based)
    global_step: Required[int]  # the optimizer step within this sDPO step
    max_steps: Required[int]
    loss: float | None  # None: not finite
    tokens_per_second: float | None


class StartInfo(TypedDict):
    event: Literal["info"]
    phase: Literal["start"]
    step: int
    pairs: int  # pairs in the step's file
    device: str  # as resolved: cpu or cuda
    reference: dict[str, Any]  # manifest.checkpoint_identity of policy_init: {"path", "manifest_sha256" | "sha256"}
    data_sha256: str
    config: dict[str, Any]  # StepConfig.to_dict()


class EvalReferenceInfo(TypedDict):
    event: Literal["info"]
    phase: Literal["eval_reference"]
    step: int
    pairs: int  # held-out pairs scored by the fixed reference


class PairsDroppedInfo(TypedDict):
    event: Literal["info"]
    phase: Literal["pairs_dropped"]
    step: int
    pairs: int
    max_length: int
    pairs_dropped: dict[str, dict[str, Any]]  # {reason: {"count": int, "lines": [first file lines]}}


class ReferenceLogpsInfo(TypedDict):
    event: Literal["info"]
    phase: Literal["reference_logps"]
    step: int
    mean_gamma_ref: float | None  # mean log p(chosen) - log p(rejected) under the reference, nats
    pairs_used: int
    pairs_dropped: dict[str, int]  # {reason: count}
    packing: str  # "shared_prompt" or "two_sequences: <why>"
    seconds: float
    forward_seconds: float | None


class MemoryInfo(TypedDict):
    event: Literal["info"]
    phase: Literal["memory"]
    step: int
    activation_checkpointing: bool
    activation_estimate_mb: int
    free_mb: int


class ResumeInfo(TypedDict):
    event: Literal["info"]
    phase: Literal["resume"]
    step: int
    checkpoint: str  # the trainer checkpoint in work_dir training resumes from


class TrainEndInfo(TypedDict, total=False):
    """The trainer's closing summary: ``train_runtime``, ``train_loss``, … (its numeric keys) plus these."""

    event: Required[Literal["info"]]
    phase: Required[Literal["train_end"]]
    step: Required[int]
    global_step: Required[int]


class EvalInfo(TypedDict, total=False):
    """Held-out metrics against the fixed reference (step.preference_metrics); only `pairs` when none scored."""

    event: Required[Literal["info"]]
    phase: Required[Literal["eval"]]
    step: Required[int]
    pairs: Required[int]
    reward_accuracy: float
    reward_margin: float
    preference_accuracy: float
    mean_gamma: float


class SamplesInfo(TypedDict):
    event: Literal["info"]
    phase: Literal["samples"]
    step: int
    prompts: int  # K held-out prompts answered
    seconds: float  # generation after training (in the step's time)
    base_seconds: float | None  # generation before training (samples.base), else None


class PairScoresInfo(TypedDict):
    """`python -m sdpo_engine run` with pair_easy_to_hard: the pairs left before step t were ordered by `model`."""

    event: Literal["info"]
    phase: Literal["pair_scores"]
    step: int
    model: dict[str, Any]  # manifest.checkpoint_identity: {"path", "sha256", "step"}
    pairs: int
    unscored: int  # pairs without a training signal (sorted last)


InfoEvent = (StartInfo | EvalReferenceInfo | PairsDroppedInfo | ReferenceLogpsInfo | MemoryInfo | ResumeInfo
             | TrainEndInfo | EvalInfo | SamplesInfo | PairScoresInfo)


class WarningEvent(TypedDict, total=False):
    event: Required[Literal["warning"]]
    code: Required[str]  # e.g. first_loss_not_ln2
    message: Required[str]


class ErrorEvent(TypedDict, total=False):
    """The last line of a step that exits 1, 2 or 3."""

    event: Required[Literal["error"]]
    code: Required[str]  # one of ERROR_CODES
    message: Required[str]
    param: str  # a hyperparameter, for invalid_input from StepConfig
    errors: list[dict[str, Any]]  # [{"line", "field", "reason"}] for data errors
    value: str  # non_finite: which value
    global_step: int | None  # non_finite: at which optimizer step (None: before training)


class ResultEvent(TypedDict):
    """The last line of a step that exits 0."""

    event: Literal["result"]
    step: int
    summary: dict[str, Any]


class StoppedEvent(TypedDict):
    """The last line of a step that exits 75."""

    event: Literal["stopped"]
    global_step: int
    checkpoint: str | None  # the resumable trainer checkpoint in work_dir


class SpecError(ValueError):
    """The step spec itself is wrong (missing key, bad path, bad value). No retry helps (exit 2)."""


# The operator's settings that change how a step trains: check_training_settings' arguments, StepSpec's
# fields of the same names (recorded in the manifest) and core.settings.Settings' fields (SDPO_*).
TRAINING_SETTINGS = ("device", "param_dtype", "compile", "packing", "pad_to_multiple_of", "activation_checkpointing",
                     "pack_tokens", "attention", "group_by_length", "reference_batch_size")


def check_training_settings(*, device: str = "auto", packing: bool = True, pad_to_multiple_of: int | None = None,
                            activation_checkpointing: str = "auto", pack_tokens: int | None = None,
                            attention: str = "auto", group_by_length: bool = False,
                            reference_batch_size: int | None = None,
                            param_dtype: str = "auto", compile: str = "off") -> None:
    """Raise SpecError naming the first of the operator's training settings (StepSpec's fields of the same
    names) that is out of range. `sdpo_engine run` checks them before any work."""
    if param_dtype not in PARAM_DTYPES:
        raise SpecError(f"param_dtype must be one of {', '.join(PARAM_DTYPES)}")
    if param_dtype == "bfloat16-sr" and importlib.util.find_spec("torchao") is None:
        raise SpecError(TORCHAO_MISSING)
    if compile not in COMPILE_MODES:
        raise SpecError(f"compile must be one of {', '.join(COMPILE_MODES)}")
    if device not in DEVICES:
        raise SpecError(f"device must be one of {', '.join(DEVICES)}")
    if not isinstance(packing, bool):
        raise SpecError("packing must be true or false")
    pad = pad_to_multiple_of
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= MAX_PAD_TO_MULTIPLE_OF):
        raise SpecError(f"pad_to_multiple_of must be null or a whole number from 0 to {MAX_PAD_TO_MULTIPLE_OF}")
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise SpecError(f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}")
    if pack_tokens is not None and (isinstance(pack_tokens, bool) or not isinstance(pack_tokens, int)
                                    or not 0 <= pack_tokens <= MAX_PACK_TOKENS):
        raise SpecError(f"pack_tokens must be null or a whole number from 0 to {MAX_PACK_TOKENS}")
    if attention not in ATTENTION:
        raise SpecError(f"attention must be one of {', '.join(ATTENTION)}")
    if attention == "flex" and packing is not True:
        raise SpecError("attention flex runs only the shared-prompt packed layout; it needs packing true")
    if attention == "flex" and device == "cpu":
        raise SpecError("attention flex needs a CUDA device: torch's FlexAttention has no backward on CPU")
    if not isinstance(group_by_length, bool):
        raise SpecError("group_by_length must be true or false")
    ref = reference_batch_size
    if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int) or not 1 <= ref <= MAX_REFERENCE_BATCH_SIZE):
        raise SpecError(f"reference_batch_size must be null or a whole number from 1 to {MAX_REFERENCE_BATCH_SIZE}")


@dataclass
class LoraSpec:
    """A LoRA adapter trained instead of the full weights, merged into the model after the step."""

    r: int = field(default=8, metadata={"help": "Adapter rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: list[str] | str = field(default="all-linear", metadata={
        "help": "Module names to adapt, or PEFT's \"all-linear\"."})


@dataclass
class DistributedSpec:
    """One step on N ranks of this host (sdpo_engine.distributed): `python -m sdpo_engine step` re-runs itself
    under `torch.distributed.run` with `num_processes` ranks (one per GPU; gloo ranks on CPU). The
    hyperparameters' `batch_size` stays the global batch of a micro-step: each rank takes batch_size / N."""

    num_processes: int = field(default=1, metadata={"help": "Ranks of the step (1: one process, no launcher)."})
    strategy: str = field(default="ddp", metadata={"help": "ddp (whole model on every rank) or fsdp (FSDP2: "
                                                           "weights, gradients and optimizer states sharded)."})


MAX_SAMPLE_PROMPTS = 32
MAX_SAMPLE_NEW_TOKENS = 512


@dataclass
class SamplesSpec:
    """Greedy answers to held-out prompts after the step (sdpo_engine.samples): the prompts of the
    first `n_prompts` pairs of the spec's eval_file."""

    n_prompts: int = field(default=4, metadata={"help": f"K held-out prompts, 1 to {MAX_SAMPLE_PROMPTS}."})
    max_new_tokens: int = field(default=48, metadata={"help": f"Answer length, 1 to {MAX_SAMPLE_NEW_TOKENS} tokens."})
    seed: int = field(default=0, metadata={"help": "torch's seed before decoding (greedy: same text every time)."})
    base: bool = field(default=False, metadata={
        "help": "Also answer before training, with policy_init (step 1: the job's base model)."})


@dataclass
class StepSpec:
    """What one step needs: the JSON object of ``python -m sdpo_engine step SPEC.json``.

    Paths are local; the worker downloads from storage before it runs. Every setting that changes how
    the step trains is a field here (the worker fills them from its `core.settings.Settings`), never an
    environment variable the engine reads, and each is recorded in the checkpoint's manifest.
    `from_dict` raises `SpecError` naming the key.
    """

    index: int = field(metadata={"help": "The sDPO step t, 1-based."})
    policy_init: str = field(metadata={
        "help": "Checkpoint directory M_{t-1} the policy starts from; it is also the frozen reference."})
    train_file: str = field(metadata={"help": "This step's preference pairs (JSONL or Parquet, any accepted "
                                              "format)."})
    output_dir: str = field(metadata={"help": "Where the step's checkpoint is written (atomically); must not "
                                              "exist."})
    work_dir: str = field(metadata={"help": "Trainer checkpoints for stop/resume; a rerun resumes from here."})
    hyperparameters: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "StepConfig's fields (sdpo_engine.config); missing keys take their defaults."})
    eval_file: str | None = field(default=None, metadata={
        "help": "Held-out pairs scored after training against eval_reference."})
    eval_reference: str | None = field(default=None, metadata={
        "help": "The fixed reference model for held-out metrics, normally the base model; needed with "
                "eval_file."})
    stop_file: str | None = field(default=None, metadata={
        "help": "A file whose appearance stops the step at the next optimizer step (exit 75)."})
    lora: LoraSpec | None = field(default=None, metadata={
        "help": "Null (full fine-tuning) or {\"r\", \"alpha\", \"dropout\", \"target_modules\"}."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    source_field: str = field(default="source", metadata={"help": "The field naming a pair's source dataset."})
    save_steps: int = field(default=0, metadata={
        "help": ">0: also save a trainer checkpoint every N optimizer steps (crash recovery)."})
    text_format: str = field(default="chat", metadata={
        "help": "chat: the chat template formats message lists (markup inside the text is refused, "
                "markup.py); raw: strings already formatted, trained exactly as given (tokens.py)."})
    chat_template: str | None = field(default=None, metadata={
        "help": "A Jinja chat template that replaces the tokenizer's own and is saved with the output."})
    packing: bool = field(default=True, metadata={
        "help": "Shared-prompt packing (each pair as one sequence, the prompt computed once) where proven "
                "identical for the model; false: TRL's two sequences per pair. Same loss either way."})
    pad_to_multiple_of: int | None = field(default=None, metadata={
        "help": f"Round each batch's length up to this (0: no rounding, at most {MAX_PAD_TO_MULTIPLE_OF}); "
                "null: 64 on a GPU, none on CPU. The padding is masked: the loss is unchanged."})
    activation_checkpointing: str = field(default="auto", metadata={
        "help": "auto: on only where the largest batch's activations would not fit in memory; on; off."})
    pack_tokens: int | None = field(default=None, metadata={
        "help": "With packing: several whole pairs per packed row, back to back under a block-diagonal mask, "
                f"rows of at most this many tokens (at most {MAX_PACK_TOKENS}); 0: one pair per row; null: "
                "the engine's default (step.pack_tokens_for). The batch's pairs and the loss are the same."})
    attention: str = field(default="auto", metadata={
        "help": "auto: the model's default attention (sdpa where transformers has it, else eager); sdpa; flex: "
                "torch's FlexAttention with a block-sparse mask on the packed pairs instead of a dense one "
                "(CUDA only; needs packing, refused where packing does not apply). Same loss either way."})
    group_by_length: bool = field(default=False, metadata={
        "help": "false: TRL's order of the pairs exactly; true: each epoch still deals every pair once in batches "
                "of the same size, but of pairs of similar packed length (less padding; sdpo_engine.batching)."})
    reference_batch_size: int | None = field(default=None, metadata={
        "help": f"Pairs per batch of the reference pass (no gradients, so larger fits; 1 to "
                f"{MAX_REFERENCE_BATCH_SIZE}); null: the engine's, max(batch_size, 8). Same log-probs."})
    param_dtype: str = field(default="auto", metadata={
        "help": "auto: float32 weights, bf16 autocast on a GPU that has bf16 and float32 on CPU; float32: float32 "
                "weights and compute; bfloat16: the policy, its reference pass and AdamW's states in bf16 (pure "
                "bf16: at DPO's learning rates most weights cannot move); bfloat16-master: bf16 weights and compute, "
                "AdamW over float32 master copies of them; bfloat16-sr: bf16 weights, AdamW's update rounded "
                "stochastically to bf16 (torchao, the perf extra). The checkpoint of each bf16 setting is saved in "
                "bf16."})
    compile: str = field(default="off", metadata={
        "help": "off; layers: torch.compile of each decoder layer (regional: one graph all layers share; the "
                "first batches pay the compile time). Same loss either way."})
    distributed: DistributedSpec | None = field(default=None, metadata={
        "help": "Null (one process) or {\"num_processes\": N, \"strategy\": \"ddp\" | \"fsdp\"}: the step on N "
                "ranks; hyperparameters.batch_size stays the global batch and must be a multiple of N."})
    samples: SamplesSpec | None = field(default=None, metadata={
        "help": "Null or {\"n_prompts\", \"max_new_tokens\", \"seed\", \"base\"}: greedy answers to the eval_file's "
                "first prompts after training (and before, with base), in the summary and the manifest."})

    @classmethod
    def from_dict(cls, d: dict) -> "StepSpec":
        """The spec from its JSON object, checked: required keys, no unknown keys, paths that exist,
        values in range. Raises SpecError."""
        if not isinstance(d, dict):
            raise SpecError("the step spec must be a JSON object")
        required = ("index", "policy_init", "train_file", "output_dir", "work_dir")
        missing = [k for k in required if k not in d]
        if missing:
            raise SpecError(f"step spec misses {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown step spec keys: {', '.join(unknown)}")
        d = dict(d)
        if d.get("lora"):
            if not isinstance(d["lora"], dict):
                raise SpecError("lora must be null or an object")
            try:
                d["lora"] = LoraSpec(**d["lora"])
            except TypeError as e:
                raise SpecError(f"lora: {e}") from None
        if d.get("distributed") is not None:
            d["distributed"] = _distributed_from(d["distributed"])
        if d.get("samples") is not None:
            d["samples"] = _samples_from(d["samples"], d.get("eval_file"))
        spec = cls(**d)
        if spec.distributed is not None and spec.distributed.strategy == "fsdp" and spec.lora is not None:
            raise SpecError("distributed.strategy fsdp cannot train a LoRA adapter yet; use ddp or lora null")
        if not isinstance(spec.index, int) or spec.index < 1:
            raise SpecError("index must be an integer >= 1")
        if not (Path(spec.policy_init) / "config.json").is_file():
            raise SpecError(f"policy_init {spec.policy_init} is not a model directory (no config.json)")
        if not Path(spec.train_file).is_file():
            raise SpecError(f"train_file {spec.train_file} does not exist")
        if spec.eval_file and not spec.eval_reference:
            raise SpecError("eval_file needs eval_reference (the fixed reference model, normally the base model)")
        if spec.text_format not in TEXT_FORMATS:
            raise SpecError(f"text_format must be one of {', '.join(TEXT_FORMATS)}")
        if spec.chat_template is not None and (not isinstance(spec.chat_template, str) or not spec.chat_template.strip()):
            raise SpecError("chat_template must be a non-empty Jinja template string")
        check_training_settings(**spec.training_settings())
        if spec.param_dtype in ("bfloat16-master", "bfloat16-sr") and spec.strategy == "fsdp":
            raise SpecError(f"param_dtype {spec.param_dtype} is not proven with distributed.strategy fsdp (sharded "
                            "master weights); use ddp, or param_dtype auto")
        if spec.compile != "off" and spec.strategy == "fsdp":
            raise SpecError("compile layers is not proven with distributed.strategy fsdp; use ddp or compile off")
        return spec

    def training_settings(self) -> dict[str, Any]:
        """The operator's settings that change how the step trains (recorded in the manifest)."""
        return {name: getattr(self, name) for name in TRAINING_SETTINGS}

    @property
    def num_processes(self) -> int:
        """Ranks of the step: 1 without `distributed`."""
        return self.distributed.num_processes if self.distributed else 1

    @property
    def strategy(self) -> str | None:
        """`distributed.strategy` of a step on more than one rank, and "fsdp" on one rank when asked for (one
        FSDP2 rank under the launcher: what FSDP costs against the plain step, bench/ranks.py); else None."""
        if self.distributed is None:
            return None
        if self.distributed.num_processes > 1 or self.distributed.strategy == "fsdp":
            return self.distributed.strategy
        return None

    @property
    def launched(self) -> bool:
        """True when the step runs under the launcher (torchrun): N > 1 ranks, or one FSDP2 rank."""
        return self.strategy is not None


def _samples_from(value: Any, eval_file: Any) -> SamplesSpec:
    if not isinstance(value, dict):
        raise SpecError("samples must be null or an object {\"n_prompts\", \"max_new_tokens\", \"seed\", \"base\"}")
    unknown = sorted(set(value) - {f.name for f in fields(SamplesSpec)})
    if unknown:
        raise SpecError(f"unknown samples keys: {', '.join(unknown)}")
    spec = SamplesSpec(**value)
    for name, top in (("n_prompts", MAX_SAMPLE_PROMPTS), ("max_new_tokens", MAX_SAMPLE_NEW_TOKENS)):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise SpecError(f"samples.{name} must be a whole number from 1 to {top}")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        raise SpecError("samples.seed must be a whole number")
    if not isinstance(spec.base, bool):
        raise SpecError("samples.base must be true or false")
    if not eval_file:
        raise SpecError("samples needs eval_file: the prompts are the held-out pairs' first prompts")
    return spec


def _distributed_from(value: Any) -> DistributedSpec:
    if not isinstance(value, dict):
        raise SpecError("distributed must be null or an object {\"num_processes\", \"strategy\"}")
    unknown = sorted(set(value) - {f.name for f in fields(DistributedSpec)})
    if unknown:
        raise SpecError(f"unknown distributed keys: {', '.join(unknown)}")
    spec = DistributedSpec(**value)
    n = spec.num_processes
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROCESSES:
        raise SpecError(f"distributed.num_processes must be a whole number from 1 to {MAX_PROCESSES}")
    if spec.strategy not in DISTRIBUTED_STRATEGIES:
        raise SpecError(f"distributed.strategy must be one of {', '.join(DISTRIBUTED_STRATEGIES)}")
    return spec
