"""Checking a job request and resolving it into what will be written: model, files, steps and
their full hyperparameters. Everything is checked here, before any row is added, so a refused
request leaves nothing behind.

Decisions:

- `method.type` is `dpo` (one step, OpenAI's shape) or `sdpo`. OpenAI's `supervised` and
  `reinforcement` are refused with `unsupported_method`. Without `method`, the job is `dpo` with
  the deprecated top-level `hyperparameters`.
- sdpo takes exactly one of `steps` (one uploaded file per step) and `partition` (split
  `training_file` into `n_steps` chunks). With `steps`, top-level `training_file` may be omitted
  (it is then the first step's file) and, if given, must be the first step's file.
- Hyperparameters: method level, then a step's own (a step's value, including either learning
  rate form, replaces the method's); "auto" or absent means the model's default, then
  StepConfig's. `learning_rate_multiplier` scales the model's default learning rate; giving it
  with `learning_rate` in the same object is a conflict. Ranges come from StepConfig.
- `model`: a registered model visible to the caller, one of the caller's fine-tuned models
  (`ft:…`), or one of the caller's checkpoints (`ftckpt-…`) to branch from any step.
- Another owner's file, model or checkpoint is reported exactly like an unknown one.
"""

from __future__ import annotations

import math
import re
import secrets
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from api.files import repository as files_repository
from api.jobs.schemas import GateSpec, JobCreate, MethodSpec, PartitionSpec, SamplesSettings
from api.models import repository as models_repository
from core.errors import InvalidRequest
from core.jobs import repository
from core.jobs.gates import GATE_ACTIONS, GATE_METRICS
from core.models import Checkpoint, File, FileStatus, ModelSource, RegisteredModel
from core.settings import Settings
from core.storage import LOCAL_SCHEME, make_storage
from sdpo_engine.config import (
    ALIASES,
    REFERENCE_FREE_PARAMETERS,
    ConfigError,
    StepConfig,
    learning_rate_from_multiplier,
)
from sdpo_engine.markup import TokenizerFiles, read_tokenizer_files
from sdpo_engine.protocol import (
    CURRICULUM_STRATEGIES,
    MAX_SAMPLE_NEW_TOKENS,
    MAX_SAMPLE_PROMPTS,
    PAIR_CURRICULUM_STRATEGIES,
    PARTITION_STRATEGIES,
    TEXT_FORMATS,
    PartitionPlan,
)

SUPPORTED_METHODS = ("dpo", "sdpo")
OPENAI_ONLY_METHODS = ("supervised", "reinforcement")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "input", "preferred_output", "non_preferred_output")
DEFAULT_SOURCE_FIELD = "source"  # the field the upload statistics count sources by

# `seed` is the job's, not a hyperparameter. ALIASES: Together's rpo_alpha (StepConfig turns it into the loss list).
HYPERPARAMETERS = (tuple(f.name for f in fields(StepConfig) if f.name != "seed") + ALIASES
                   + ("learning_rate_multiplier",))
MAX_SEED = 2**31 - 1
SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512  # OpenAI's; the number of pairs is a setting
FILE_PURPOSE = "fine-tune"
MAX_CHAT_TEMPLATE_BYTES = 64 * 1024


@dataclass
class StepPlan:
    index: int
    training_file: File | None  # None for a partitioned job (the worker writes the chunk)
    config: StepConfig


@dataclass
class JobPlan:
    model: RegisteredModel
    initial_checkpoint: Checkpoint | None
    training_file: File
    validation_file: File | None
    method_type: str
    method: dict[str, Any]  # echo with resolved hyperparameters
    hyperparameters: dict[str, Any]  # method level, resolved
    partition: PartitionPlan | None
    steps: list[StepPlan]
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None


def bad(message: str, param: str | None, code: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def build_plan(db: Session, owner: str, body: JobCreate, settings: Settings) -> JobPlan:
    # body.integrations: checked by api.jobs.integrations (the service calls it first).
    seed = _check_seed(body.seed)
    suffix = _check_suffix(body.suffix)
    metadata = _check_metadata(body.metadata, settings.max_metadata_pairs)
    method = _check_method_shape(body)
    method_hp = _hyperparameters_of(body, method)

    model, initial_checkpoint = _resolve_model(db, owner, body.model)
    resolver = _Resolver(model.default_hyperparameters or {}, seed)

    text = _check_text_options(method)
    if method.type == "dpo":
        training_file = _usable_file(db, owner, _require_training_file(body), "training_file")
        method_cfg = resolver.resolve([method_hp])
        steps = [StepPlan(1, training_file, method_cfg)]
        echo = {"type": "dpo", "dpo": {"hyperparameters": resolver.echo(method_cfg), **text}}
        partition = None
    else:
        sdpo = method.sdpo
        assert sdpo is not None
        method_cfg = resolver.resolve([method_hp])
        echo_sdpo: dict[str, Any] = {"hyperparameters": resolver.echo(method_cfg), **text}
        if sdpo.steps is not None:
            training_file, steps = _steps_form(db, owner, body, resolver, method_hp, settings)
            echo_sdpo["steps"] = [{"training_file": s.training_file.id if s.training_file else None,
                                   "hyperparameters": resolver.echo(s.config)} for s in steps]
            partition = None
        else:
            assert sdpo.partition is not None
            training_file = _usable_file(db, owner, _require_training_file(body), "training_file")
            partition = _check_partition(sdpo.partition, training_file, settings)
            steps = [StepPlan(k, None, method_cfg) for k in range(1, partition["n_steps"] + 1)]
            echo_sdpo["partition"] = partition
        if sdpo.gate is not None:
            echo_sdpo["gate"] = _check_gate(sdpo.gate, body.validation_file)
        echo = {"type": "sdpo", "sdpo": echo_sdpo}
    samples_spec = method.dpo.samples if method.type == "dpo" and method.dpo else (
        method.sdpo.samples if method.sdpo else None)
    if samples_spec is not None:
        echo[method.type]["samples"] = _check_samples(samples_spec, method.type, body.validation_file)

    validation_file = None
    if body.validation_file is not None:
        validation_file = _usable_file(db, owner, body.validation_file, "validation_file")
    _check_files_fit_model(model, initial_checkpoint, text, settings, [
        *((f"method.sdpo.steps[{s.index - 1}].training_file" if method.type == "sdpo" and partition is None
           else "training_file", s.training_file) for s in steps if s.training_file is not None),
        *([("training_file", training_file)] if partition is not None else []),
        *([("validation_file", validation_file)] if validation_file is not None else [])])

    return JobPlan(model=model, initial_checkpoint=initial_checkpoint, training_file=training_file,
                   validation_file=validation_file, method_type=method.type, method=echo,
                   hyperparameters=resolver.echo(method_cfg), partition=partition, steps=steps, seed=seed,
                   suffix=suffix, metadata=metadata)


# ------------------------------------------------------------------------------------------------
# Top-level values


def _check_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbelow(MAX_SEED + 1)  # OpenAI picks one too; it is stored and shown
    if not 0 <= seed <= MAX_SEED:
        raise bad(f"seed must be between 0 and {MAX_SEED}.", "seed", "invalid_value")
    return seed


def _check_suffix(suffix: str | None) -> str | None:
    if suffix is None:
        return None
    if not SUFFIX_RE.match(suffix):
        raise bad("suffix must be 1 to 64 characters of letters, digits, '-' or '_'.", "suffix", "invalid_value")
    return suffix


def _check_metadata(metadata: dict[str, Any] | None, max_pairs: int) -> dict[str, str] | None:
    """OpenAI's limits: at most 16 pairs (SDPO_MAX_METADATA_PAIRS), keys up to 64 characters, string
    values up to 512."""
    if metadata is None:
        return None
    if len(metadata) > max_pairs:
        raise bad(f"metadata may hold at most {max_pairs} pairs, got {len(metadata)}.", "metadata",
                  "invalid_metadata")
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY:
            raise bad(f"metadata keys must be 1 to {MAX_METADATA_KEY} characters.", "metadata", "invalid_metadata")
        if not isinstance(value, str):
            raise bad(f"metadata values must be strings; {key!r} is not.", f"metadata.{key}", "invalid_metadata")
        if len(value) > MAX_METADATA_VALUE:
            raise bad(f"metadata values must be at most {MAX_METADATA_VALUE} characters; {key!r} is longer.",
                      f"metadata.{key}", "invalid_metadata")
    return dict(metadata)


def _check_method_shape(body: JobCreate) -> MethodSpec:
    method = body.method
    if method is None:
        return MethodSpec(type="dpo")
    if body.hyperparameters is not None:
        raise bad("Give hyperparameters in method.<type>.hyperparameters or at the top level, not both.",
                  "hyperparameters", "conflicting_parameters")
    if method.type in OPENAI_ONLY_METHODS:
        raise bad(f"The {method.type!r} method is not supported here; use 'dpo' or 'sdpo'.", "method.type",
                  "unsupported_method")
    if method.type not in SUPPORTED_METHODS:
        raise bad(f"Unknown method type {method.type!r}; use 'dpo' or 'sdpo'.", "method.type", "unsupported_method")
    for other in ("dpo", "sdpo", *OPENAI_ONLY_METHODS):
        if other != method.type and getattr(method, other) is not None:
            raise bad(f"method.{other} does not belong to a {method.type!r} method.", f"method.{other}",
                      "conflicting_parameters")
    if method.type == "sdpo":
        sdpo = method.sdpo
        if sdpo is None:
            raise bad("An sdpo method needs method.sdpo with steps or a partition.", "method.sdpo",
                      "missing_required_parameter")
        if sdpo.steps is not None and sdpo.partition is not None:
            raise bad("Give either method.sdpo.steps or method.sdpo.partition, not both.",
                      "method.sdpo.partition", "conflicting_parameters")
        if sdpo.steps is None and sdpo.partition is None:
            raise bad("An sdpo method needs method.sdpo.steps (one file per step) or method.sdpo.partition.",
                      "method.sdpo.steps", "missing_required_parameter")
    return method


def _hyperparameters_of(body: JobCreate, method: MethodSpec) -> dict[str, tuple[Any, str]]:
    if body.method is None:
        return _Resolver.given(body.hyperparameters, "hyperparameters")
    spec = method.dpo if method.type == "dpo" else method.sdpo
    return _Resolver.given(spec.hyperparameters if spec else None, f"method.{method.type}.hyperparameters")


def _check_samples(samples: SamplesSettings, method_type: str, validation_file: str | None) -> dict[str, Any]:
    """Per-step samples as stored in the method echo (the worker reads them there, core.jobs.lifecycle).
    The prompts are the validation file's first n_prompts, so a validation file is needed."""
    p = f"method.{method_type}.samples"
    for name, top in (("n_prompts", MAX_SAMPLE_PROMPTS), ("max_new_tokens", MAX_SAMPLE_NEW_TOKENS)):
        value = getattr(samples, name)
        if not 1 <= value <= top:
            raise bad(f"{p}.{name} must be from 1 to {top}; got {value}.", f"{p}.{name}", "invalid_value")
    if validation_file is None:
        raise bad(f"{p} answers the validation file's first prompts after each step and needs a validation_file.",
                  "validation_file", "missing_validation_file")
    return {"n_prompts": samples.n_prompts, "max_new_tokens": samples.max_new_tokens}


def _check_gate(gate: GateSpec, validation_file: str | None) -> dict[str, Any]:
    """The gate as stored in the method echo (core/jobs/gates.py reads it there). It compares
    held-out metrics, so it needs a validation file."""
    p = "method.sdpo.gate"
    if gate.metric not in GATE_METRICS:
        raise bad(f"{p}.metric must be one of {', '.join(GATE_METRICS)}; got {gate.metric!r}.", f"{p}.metric",
                  "invalid_value")
    if gate.on_fail not in GATE_ACTIONS:
        raise bad(f"{p}.on_fail must be one of {', '.join(GATE_ACTIONS)}; got {gate.on_fail!r}.", f"{p}.on_fail",
                  "invalid_value")
    if not math.isfinite(gate.min_delta):
        raise bad(f"{p}.min_delta must be a finite number.", f"{p}.min_delta", "invalid_value")
    if gate.max_drift is not None and not (math.isfinite(gate.max_drift) and gate.max_drift > 0):
        raise bad(f"{p}.max_drift must be a positive number of nats per token.", f"{p}.max_drift", "invalid_value")
    if validation_file is None:
        raise bad(f"{p} compares held-out metrics after each step and needs a validation_file.",
                  "validation_file", "missing_validation_file")
    return {"metric": gate.metric, "min_delta": gate.min_delta, "on_fail": gate.on_fail, "max_drift": gate.max_drift}


def _check_text_options(method: MethodSpec) -> dict[str, Any]:
    """``text_format`` and ``chat_template`` of method.<type>, checked; echoed as given (defaults filled)."""
    spec = method.dpo if method.type == "dpo" else method.sdpo
    p = f"method.{method.type}"
    text_format = (spec.text_format if spec else None) or "chat"
    if text_format not in TEXT_FORMATS:
        raise bad(f"Unknown text_format {text_format!r}; one of {', '.join(TEXT_FORMATS)}.", f"{p}.text_format",
                  "invalid_value")
    template = spec.chat_template if spec else None
    if template is not None:
        if not template.strip():
            raise bad("chat_template must be a Jinja template, not empty.", f"{p}.chat_template", "invalid_value")
        if len(template.encode()) > MAX_CHAT_TEMPLATE_BYTES:
            raise bad(f"chat_template is longer than {MAX_CHAT_TEMPLATE_BYTES} bytes.", f"{p}.chat_template",
                      "invalid_value")
        if text_format == "raw":
            raise bad("text_format 'raw' trains strings exactly as given; a chat_template would not be used.",
                      f"{p}.chat_template", "conflicting_parameters")
    return {"text_format": text_format, "chat_template": template}


def _check_files_fit_model(model: RegisteredModel, checkpoint: Checkpoint | None, text: dict[str, Any],
                           settings: Settings, files: list[tuple[str, File]]) -> None:
    """Refuse, before anything is written, files whose format the model cannot train as asked.

    Message lists (conversational or OpenAI format) need a chat template: the job's or the model's
    (read from its tokenizer files; a GGUF model's is only known once converted, so the worker's
    preparation checks it). With text_format raw, only the standard string format is accepted.
    Markup inside the text needs the tokenizer and is checked when the job is prepared.
    """
    listed = [(param, f) for param, f in files if f.format in ("conversational", "openai")]
    if not listed:
        return
    param, file = listed[0]
    if text["text_format"] == "raw":
        raise bad(f"text_format 'raw' trains prompt/chosen/rejected strings exactly as given, but file '{file.id}' "
                  f"is in the {file.format} format (message lists, which only a chat template can render).", param,
                  "raw_needs_strings")
    if text["chat_template"]:
        return
    tokenizer = _model_tokenizer(model, checkpoint, settings)
    if tokenizer is not None and not tokenizer.chat_template:
        raise bad(f"The model '{model.id}' has no chat template, so the message lists of file '{file.id}' "
                  f"({file.format} format) cannot be rendered: roles would be dropped and turns glued together. "
                  "Give method's chat_template, use a model with a template, or upload prompt/chosen/rejected "
                  "strings.", param, "no_chat_template")


# A model's tokenizer files that decide its chat template (sdpo_engine.markup.read_tokenizer_files);
# tokenizer.json (megabytes) only counts by its presence there, so from an object store it is not read.
_TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")
_MAX_TEMPLATE_FILE_BYTES = 8 << 20


def _model_tokenizer(model: RegisteredModel, checkpoint: Checkpoint | None, settings: Settings) -> TokenizerFiles | None:
    """The chat template and special tokens of the model (or checkpoint) a job starts from, or None
    where the API cannot read them (a GGUF model, a path it does not see, no tokenizer files)."""
    uri = checkpoint.uri if checkpoint is not None else model.uri
    if uri.startswith("s3://"):  # core.s3_storage.S3_SCHEME (not imported: boto3 loads only with the store)
        return _stored_tokenizer(uri, settings)
    model_dir = _model_dir(model, checkpoint, settings)
    return read_tokenizer_files(model_dir) if model_dir is not None else None


def _stored_tokenizer(uri: str, settings: Settings) -> TokenizerFiles | None:
    """`read_tokenizer_files` for a model stored as a tree in the S3 store: its few small template
    files are read into a temporary folder (no weights are downloaded; tokenizer.json, when the
    tree has one, is stood in for by an empty one). None for a tree of another store, a file
    over 8 MiB, or no tokenizer files. Raises StorageUnavailable (503) when the store is away."""
    store = make_storage(settings.storage_dir, settings.storage_url, cache_bytes=settings.storage_cache_bytes)
    with tempfile.TemporaryDirectory(prefix="sdpo-tokenizer-") as tmp:
        try:
            for name in _TEMPLATE_FILES:
                try:
                    with store.open(f"{uri}/{name}") as f:
                        data = f.read(_MAX_TEMPLATE_FILE_BYTES + 1)
                except FileNotFoundError:
                    continue
                if len(data) > _MAX_TEMPLATE_FILE_BYTES:
                    return None
                Path(tmp, name).write_bytes(data)
            if store.exists(f"{uri}/tokenizer.json"):
                Path(tmp, "tokenizer.json").write_text("{}")
        except ValueError:  # not a URI of the configured store
            return None
        return read_tokenizer_files(tmp)


def _model_dir(model: RegisteredModel, checkpoint: Checkpoint | None, settings: Settings) -> str | None:
    """The local directory of a model's tokenizer files, or None where the API cannot read them."""
    uri = checkpoint.uri if checkpoint is not None else model.uri
    if model.source == ModelSource.GGUF and checkpoint is None:
        return None
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith(LOCAL_SCHEME):
        try:
            return str(make_storage(settings.storage_dir).local_path(uri))
        except ValueError:
            return None
    return uri if uri.startswith("/") else None


def _require_training_file(body: JobCreate) -> str:
    if body.training_file is None:
        raise bad("Missing required parameter: 'training_file'.", "training_file", "missing_required_parameter")
    return body.training_file


# ------------------------------------------------------------------------------------------------
# Lookups


def _resolve_model(db: Session, owner: str, name: str) -> tuple[RegisteredModel, Checkpoint | None]:
    not_found = bad(f"The model '{name}' does not exist or you do not have access to it.", "model",
                    "model_not_found")
    if name.startswith("ftckpt-"):
        checkpoint = repository.owned_checkpoint(db, owner, name)
        if checkpoint is None:
            raise not_found
        job = repository.get_job(db, checkpoint.job_id)
        model = repository.get_model(db, job.model_id) if job else None
        if model is None:
            raise not_found
        return model, checkpoint
    model = models_repository.get_visible(db, owner, name, for_share=True)
    if model is None:
        raise not_found
    checkpoint = None
    if model.source == ModelSource.CHECKPOINT:
        checkpoint = repository.get_checkpoint_by_id(db, model.checkpoint_id) if model.checkpoint_id else None
        if checkpoint is None:
            raise not_found
    return model, checkpoint


def _usable_file(db: Session, owner: str, file_id: str, param: str) -> File:
    row = files_repository.get_visible(db, owner, file_id, for_share=True)
    if row is None:
        raise bad(f"Invalid file '{file_id}': no such file.", param, "file_not_found")
    if row.purpose != FILE_PURPOSE:
        raise bad(f"File '{file_id}' was not uploaded with purpose '{FILE_PURPOSE}'.", param, "invalid_file_purpose")
    if row.status == FileStatus.ERROR:
        detail = f": {row.status_details}" if row.status_details else ""
        raise bad(f"File '{file_id}' failed validation and cannot be trained on{detail}.", param,
                  "file_not_processed")
    if row.status != FileStatus.PROCESSED:
        raise bad(f"File '{file_id}' is not processed yet (status {row.status}); retry once it is.", param,
                  "file_not_processed")
    return row


# ------------------------------------------------------------------------------------------------
# Steps and partition


def _steps_form(db: Session, owner: str, body: JobCreate, resolver: _Resolver,
                method_hp: dict[str, tuple[Any, str]],
                settings: Settings) -> tuple[File, list[StepPlan]]:
    specs = body.method.sdpo.steps  # type: ignore[union-attr]
    if not specs:
        raise bad("method.sdpo.steps must list at least one step.", "method.sdpo.steps", "invalid_value")
    if len(specs) > settings.max_steps:
        raise bad(f"A job may have at most {settings.max_steps} steps, got {len(specs)}.", "method.sdpo.steps",
                  "too_many_steps")
    if body.training_file is not None and body.training_file != specs[0].training_file:
        raise bad("With method.sdpo.steps, training_file (if given) must be the first step's file.",
                  "training_file", "conflicting_parameters")
    steps = []
    for i, spec in enumerate(specs):
        prefix = f"method.sdpo.steps[{i}]"
        file = _usable_file(db, owner, spec.training_file, f"{prefix}.training_file")
        step_hp = _Resolver.given(spec.hyperparameters, f"{prefix}.hyperparameters")
        config = resolver.resolve([method_hp, step_hp])
        steps.append(StepPlan(i + 1, file, config))
    return steps[0].training_file, steps  # type: ignore[return-value]


def _check_partition(spec: PartitionSpec, file: File, settings: Settings) -> PartitionPlan:
    p = "method.sdpo.partition"
    if spec.strategy not in PARTITION_STRATEGIES:
        raise bad(f"Unknown partition strategy {spec.strategy!r}; one of {', '.join(PARTITION_STRATEGIES)}.",
                  f"{p}.strategy", "unknown_partition_strategy")
    n = spec.n_steps
    if n < 1:
        raise bad("n_steps must be at least 1.", f"{p}.n_steps", "invalid_value")
    if n > settings.max_steps:
        raise bad(f"A job may have at most {settings.max_steps} steps, got {n}.", f"{p}.n_steps", "too_many_steps")
    rows = file.rows
    if n > rows:
        raise bad(f"n_steps is {n} but the training file has only {rows} pairs: every step needs at least one.",
                  f"{p}.n_steps", "too_many_steps")
    source_field = spec.source_field if spec.source_field is not None else DEFAULT_SOURCE_FIELD
    if not source_field or source_field in PREFERENCE_FIELDS:
        raise bad("source_field must name a field other than the preference fields.", f"{p}.source_field",
                  "invalid_value")
    sizes = spec.sizes
    if sizes is not None:
        if spec.strategy in CURRICULUM_STRATEGIES:
            raise bad(f"sizes cannot be given with {spec.strategy}: its chunks are whole sources.", f"{p}.sizes",
                      "conflicting_parameters")
        if len(sizes) != n or any(s < 1 for s in sizes) or sum(sizes) != rows:
            raise bad(f"sizes must be {n} positive numbers summing to the file's {rows} pairs.", f"{p}.sizes",
                      "invalid_value")
    stats = (file.report or {}).get("stats") or {}
    if spec.strategy in CURRICULUM_STRATEGIES and source_field == DEFAULT_SOURCE_FIELD and stats:
        # The upload's statistics count sources by the default field; another field is checked
        # by the worker when it builds the chunks.
        if stats.get("without_source"):
            raise bad(f"{spec.strategy} needs a source on every pair; {stats['without_source']} pairs have none.",
                      "training_file", "missing_source")
        n_sources = len(stats.get("sources") or {})
        if n_sources < n:
            raise bad(f"{spec.strategy} keeps each source in one step, so n_steps ({n}) cannot exceed the "
                      f"number of sources ({n_sources}).", f"{p}.n_steps", "too_many_steps")
    if spec.rescore and spec.strategy not in PAIR_CURRICULUM_STRATEGIES:
        raise bad(f"rescore orders the remaining pairs by the previous step's model; it applies to "
                  f"{', '.join(PAIR_CURRICULUM_STRATEGIES)}, not {spec.strategy}.", f"{p}.rescore",
                  "conflicting_parameters")
    plan = PartitionPlan(strategy=spec.strategy, n_steps=n, source_field=source_field,
                         sizes=list(sizes) if sizes is not None else None)
    if spec.strategy in PAIR_CURRICULUM_STRATEGIES:
        plan["rescore"] = bool(spec.rescore)
    return plan


# ------------------------------------------------------------------------------------------------
# Hyperparameters


class _Resolver:
    """Merges hyperparameter layers over the model's defaults and checks them with StepConfig,
    reporting a bad value at the dotted path where the user wrote it."""

    def __init__(self, defaults: dict[str, Any], seed: int):
        self.defaults = defaults
        self.seed = seed
        self.base_learning_rate = StepConfig.from_dict({}, defaults=defaults).learning_rate

    @staticmethod
    def given(values: dict[str, Any] | None, prefix: str) -> dict[str, tuple[Any, str]]:
        """The explicitly set values (not "auto") as {name: (value, dotted path)}, with unknown
        names and conflicts refused."""
        values = values or {}
        for name in values:
            if name in REFERENCE_FREE_PARAMETERS:  # StepConfig's refusal says why
                try:
                    StepConfig.from_dict({name: values[name]})
                except ConfigError as exc:
                    raise bad(f"Invalid hyperparameter {name}: {exc.message}.", f"{prefix}.{name}",
                              "invalid_hyperparameter") from None
            if name not in HYPERPARAMETERS:
                hint = " (the seed is a top-level job parameter)" if name == "seed" else ""
                raise bad(f"Unknown hyperparameter '{name}'{hint}; known: {', '.join(sorted(HYPERPARAMETERS))}.",
                          f"{prefix}.{name}", "unknown_parameter")
        given = {k: v for k, v in values.items() if not (v == "auto" or v is None)}
        if "learning_rate" in given and "learning_rate_multiplier" in given:
            raise bad("Give learning_rate or learning_rate_multiplier, not both.",
                      f"{prefix}.learning_rate_multiplier", "conflicting_parameters")
        return {k: (v, f"{prefix}.{k}") for k, v in given.items()}

    def resolve(self, layers: list[dict[str, tuple[Any, str]]]) -> StepConfig:
        """Later layers (a step's own values) override earlier ones (the method's)."""
        merged: dict[str, tuple[Any, str]] = {}
        for given in layers:
            if "learning_rate" in given or "learning_rate_multiplier" in given:
                merged.pop("learning_rate", None)
                merged.pop("learning_rate_multiplier", None)
            # rpo_alpha is a whole loss (sigmoid + rpo_alpha * sft): it and loss_type/loss_weights replace
            # each other across layers, as the learning rate and its multiplier do.
            if "rpo_alpha" in given:
                merged.pop("loss_type", None)
                merged.pop("loss_weights", None)
            if "loss_type" in given or "loss_weights" in given:
                merged.pop("rpo_alpha", None)
            merged.update(given)
        values = {k: v for k, (v, _path) in merged.items()}
        paths = {k: path for k, (_v, path) in merged.items()}
        if "learning_rate_multiplier" in values:
            multiplier = values.pop("learning_rate_multiplier")
            paths["learning_rate"] = paths.pop("learning_rate_multiplier")
            try:
                values["learning_rate"] = learning_rate_from_multiplier(multiplier, self.base_learning_rate)
            except ConfigError as exc:
                raise bad(f"Invalid learning_rate_multiplier: {exc.message}.", paths["learning_rate"],
                          "invalid_hyperparameter") from None
        values["seed"] = self.seed
        try:
            return StepConfig.from_dict(values, defaults=self.defaults)
        except ConfigError as exc:
            path = paths.get(exc.param) or _beside_loss_setting(paths, exc.param)
            derived = path.endswith("learning_rate_multiplier") and exc.param == "learning_rate"
            if derived:
                message = (f"Invalid learning_rate_multiplier: it gives a learning rate of "
                           f"{values['learning_rate']:g}, and learning_rate {exc.message.split(' ', 1)[1]}.")
            else:
                message = f"Invalid hyperparameter {exc.param}: {exc.message}."
            raise bad(message, path, "invalid_hyperparameter") from None

    def echo(self, config: StepConfig) -> dict[str, Any]:
        """Resolved values as shown to users: every StepConfig field but the seed (a job field),
        plus OpenAI's learning_rate_multiplier relative to the model's default rate."""
        out = config.to_dict()
        out.pop("seed", None)
        out["learning_rate_multiplier"] = float(f"{config.learning_rate / self.base_learning_rate:.10g}")
        return out


def _beside_loss_setting(paths: dict[str, str], name: str) -> str:
    """Where a missing loss setting belongs (exo_pair without label_smoothing): beside the loss the user
    chose, e.g. method.dpo.hyperparameters.label_smoothing; the bare name when no loss was given."""
    for key in ("loss_type", "rpo_alpha", "loss_weights"):
        if key in paths:
            return f"{paths[key].rsplit('.', 1)[0]}.{name}"
    return name
