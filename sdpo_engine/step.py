"""One sDPO step on TRL's DPOTrainer. With `packing.py` and `trl_patches.py` (its helpers), the only
modules of the engine that import TRL.

Step t of sDPO starts its policy from checkpoint M_{t-1} *and* uses that same checkpoint, frozen,
as the reference. Because the reference is exactly the initial policy, its log-probs on the
step's chunk are computed once before training with the policy itself
(`precompute_ref_log_probs=True`, no `ref_model`): no second model sits in memory, and the first
loss of every step is ln 2 with zero rewards (checked by the tests).

The trainer is TRL's DPOTrainer with two changes that keep its math (tests/engine/
test_perf_equivalence.py): each pair runs as one sequence whose prompt is computed once for both
answers (`packing.py`, where proven identical for the model, else TRL's two sequences), and the
reference pass runs its batches sorted by length, without gradients, once per step.

`run_step(spec, emit)` reads top to bottom:
  check the spec -> held-out reference log-probs (fixed reference, e.g. the base model) ->
  load the policy -> build the trainer (precomputes the reference) -> train (resuming if a trainer
  checkpoint exists) -> held-out metrics -> save the output atomically with a manifest.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from . import distributed
from .config import ConfigError, StepConfig
from .data import DataError, fingerprint, load_numbered_pairs, load_pairs
from .drift import drift_metrics
from .manifest import CHECKPOINT_SHARD_SIZE, checkpoint_identity, write_checkpoint_atomically

# StepSpec, LoraSpec and SpecError are the contract's (protocol.py); re-exported for callers.
from .protocol import ExitCode, LoraSpec, SpecError, StepSpec  # noqa: F401
from .tokens import no_signal_reason, raw_tokenize

# The exit codes are the contract's (protocol.ExitCode); these names are kept for callers.
EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_BAD_INPUT = ExitCode.BAD_INPUT
EXIT_NON_FINITE = ExitCode.NON_FINITE
EXIT_STOPPED = ExitCode.STOPPED

Emit = Callable[[dict], None]


class TrainingDataError(DataError):
    """Data that validated as a file but cannot be trained as asked on this model. `code` names the
    kind (``special_tokens_in_text``, ``no_chat_template``, ``raw_needs_strings``,
    ``no_trainable_pairs``); `report` has the lines, fields and reasons."""

    def __init__(self, code: str, message: str, report: dict | None = None):
        super().__init__(message, report)
        self.code = code

    def __reduce__(self):
        return (type(self), (self.code, self.args[0], self.report))


class StepStopped(Exception):
    """Training stopped on SIGTERM or the stop file; a trainer checkpoint is in `work_dir`."""

    def __init__(self, global_step: int, checkpoint: str | None):
        super().__init__(f"stopped at global step {global_step}; resumable checkpoint: {checkpoint}")
        self.global_step = global_step
        self.checkpoint = checkpoint


class NonFiniteError(RuntimeError):
    """A number the step depends on is NaN or infinite; nothing was written.

    `value` names it ("reference log-prob", "loss", "grad_norm", ...), `global_step` is the optimizer
    step it appeared at (None before training). Retrying does not help: the same model, data and
    hyperparameters give the same numbers.
    """

    def __init__(self, message: str, *, value: str, global_step: int | None = None):
        super().__init__(message)
        self.value = value
        self.global_step = global_step


# ---------------------------------------------------------------------------------------------
# Building blocks


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("device cuda requested but no CUDA device is available")
    return device


def load_policy(path: str | Path, device: str, attention: str = "auto", param_dtype: str = "auto"):
    """Tokenizer and model from a local checkpoint directory, every dropout off. Never `trust_remote_code`.

    `attention`: the step spec's; "auto" leaves the choice to transformers (sdpa where the model has
    it), "sdpa" asks for it, "flex" loads with flex.FLEX_ATTENTION (FlexAttention on packed batches).

    `param_dtype`: the step spec's; the weights load in `param_torch_dtype(param_dtype)` (float32, or bfloat16).

    `model.sdpo_dropout_disabled` says what was turned off: {"config": {key: original value},
    "modules": number of dropout modules, "module_attributes": ["Class.attribute", ...]}.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Dropout off before the modules are built: many copy their probability from the config at
    # init (LlamaAttention.attention_dropout) or read it at forward time, and the Trainer's
    # model.train() turns them on again, so TRL's disable_dropout (nn.Dropout modules only) and
    # model.eval() are not enough. With dropout on, the policy's first forward differs from the
    # reference pass and the first loss is not ln 2.
    config = AutoConfig.from_pretrained(path)
    config_keys = _zero_dropout_in_config(config)
    # float32 weights by default: on CPU that is the only fast path; on GPU the trainer's bf16 autocast does
    # mixed precision while the optimizer keeps float32 master weights. The bf16 param_dtypes: bf16 weights
    # (precision.py: pure bf16, float32 masters in the optimizer, or stochastic rounding).
    impl: dict[str, str] = {}
    if attention == "sdpa":
        impl["attn_implementation"] = "sdpa"
    elif attention == "flex":
        from .flex import register

        impl["attn_implementation"] = register()
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=param_torch_dtype(param_dtype), **impl)
    # torch types Module.__setattr__'s value as Tensor | Module, though a plain attribute is allowed
    model.sdpo_dropout_disabled = {"config": config_keys, **_zero_dropout_in_modules(model)}  # type: ignore[assignment]
    # transformers wraps PreTrainedModel.to with functools.wraps, typed as unbound (_Wrapped): the
    # device would be checked against `self`
    return tokenizer, model.to(device)  # type: ignore[arg-type]


def own_weights(model) -> int:
    """Copy a CPU model's parameters out of the checkpoint file's memory mapping into the process's own
    memory, before a step trains them; returns the bytes copied.

    transformers loads safetensors memory-mapped, private (copy-on-write): on CPU the loaded weights ARE
    the file's pages, so the first optimizer step's writes take one copy-on-write page fault per 4 KiB
    page of weights. SmolLM2-135M on this 2-core machine: ~131,000 more faults, and the first optimizer
    step took 1.9-2.0 s against 1.0 s with the copy (`bench/own_weights.py`; bench/README.md "The
    weights' copy-on-write pages"); one clone per tensor costs ~0.13 s. Resident memory does not grow past the step's
    peak (the optimizer states come later): a mapped tensor's pages go with it. Tied weights stay tied
    (one Parameter, its data replaced). Not for a GPU (`.to(device)` already copied) nor under LoRA
    (the base weights are never written, so their pages stay shared with the page cache).
    """
    import torch

    copied = 0
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
            copied += param.numel() * param.element_size()
    return copied


def _is_dropout_name(name: str) -> bool:
    name = name.lower()
    return "dropout" in name or name.endswith("pdrop") or name == "layerdrop"


def _zero_dropout_in_config(config, prefix: str = "") -> dict[str, float]:
    """Set every dropout probability of a transformers config (sub-configs included) to 0, in place.

    A key counts when its name contains "dropout" or ends with "pdrop" (attention_dropout,
    hidden_dropout_prob, resid_pdrop, summary_first_dropout, ...) or is "layerdrop", and its value
    is a non-zero number. Returns the zeroed keys (dotted for sub-configs) with their original value.
    """
    from transformers import PretrainedConfig

    zeroed: dict[str, float] = {}
    for key in config.to_dict():
        value = getattr(config, key, None)
        if isinstance(value, PretrainedConfig):
            zeroed.update(_zero_dropout_in_config(value, f"{prefix}{key}."))
        elif (_is_dropout_name(key) and isinstance(value, (int, float)) and not isinstance(value, bool)
              and value != 0):
            setattr(config, key, 0.0)
            zeroed[prefix + key] = value
    return zeroed


def _zero_dropout_in_modules(model) -> dict:
    """p = 0 in every dropout module, and 0 in every float attribute of a module named like a
    dropout probability (some modules keep one hard-coded, not from the config)."""
    from torch.nn.modules.dropout import _DropoutNd

    modules, attributes = 0, set()
    for module in model.modules():
        if isinstance(module, _DropoutNd) and module.p != 0:
            module.p = 0.0
            modules += 1
        for name, value in list(vars(module).items()):
            if _is_dropout_name(name) and isinstance(value, float) and value != 0:
                setattr(module, name, 0.0)
                attributes.add(f"{type(module).__name__}.{name}")
    return {"modules": modules, "module_attributes": sorted(attributes)}


def _restore_dropout_config(model) -> None:
    """Put the config's own dropout values back before saving: the checkpoint keeps the user's
    config (the manifest records that training ran without dropout)."""
    for dotted, value in getattr(model, "sdpo_dropout_disabled", {}).get("config", {}).items():
        *parents, key = dotted.split(".")
        target = model.config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, key, value)


def to_trl_rows(pairs: list[dict], tokenizer, text_format: str = "chat") -> list[dict]:
    """The engine's normalised pairs in the form TRL reads.

    With a chat template the conversational form goes in as is (TRL applies the template). Without
    one, or with ``text_format="raw"``, messages are flattened to strings: a single-message prompt
    keeps its exact text, so a standard-format file trains exactly as the user wrote it. (Message
    lists on a model without a template are refused before a step runs: markup.check_pairs.)
    """
    if text_format != "raw" and getattr(tokenizer, "chat_template", None):
        return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]

    def flat(messages):
        return "\n".join(m["content"] for m in messages)

    return [{"prompt": flat(p["prompt"]), "chosen": flat(p["chosen"]), "rejected": flat(p["rejected"])}
            for p in pairs]


def dpo_config(cfg: StepConfig, output_dir: str, device: str, *, save_steps: int = 0,
               pad_to: int | None = None, param_dtype: str = "auto", **overrides):
    """TRL's DPOConfig for one step. Every value that differs from TRL's defaults says why.

    `param_dtype` is the spec's: "auto" keeps bf16 autocast on a GPU that has bf16, "float32" and the bf16
    settings (weights already bf16, load_policy) run without autocast.

    `pad_to` is the spec's `pad_to_multiple_of` (None: the device's default, see `pad_to_multiple_of`).
    """
    import torch
    from trl import DPOConfig

    on_gpu = device == "cuda"
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.n_epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        loss_type=cfg.loss_types,
        loss_weights=cfg.loss_weights,
        label_smoothing=cfg.label_smoothing,
        ld_alpha=cfg.ld_alpha,
        discopop_tau=cfg.discopop_tau,
        # transformers 5 reads a float in [0, 1) as a ratio of the step's optimizer steps.
        warmup_steps=cfg.warmup_ratio if cfg.warmup_ratio > 0 else 0,
        lr_scheduler_type="linear",
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # sDPO: the reference is the initial policy, so precompute it with the policy itself.
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=max(cfg.batch_size, 8),
        # CPU cannot run bf16 autocast and TRL defaults to it; on GPU use it when the card supports it,
        # unless the spec's param_dtype fixes the precision (float32 throughout, or bf16 weights).
        bf16=bool(on_gpu and param_dtype == "auto" and torch.cuda.is_bf16_supported()),
        use_cpu=not on_gpu,
        # Checkpointing trades compute for memory: off, and turned on by `plan_activation_checkpointing`
        # only when a batch's activations would not fit.
        gradient_checkpointing=False,
        logging_steps=1,
        logging_first_step=True,
        # transformers' default replaces a NaN/inf loss by the running mean before logging (a NaN
        # run then logs 0.0); the step must see the real value to fail on it (_NumericGuard).
        logging_nan_inf_filter=False,
        # TRL's own (nn.Dropout modules); load_policy also zeroes the config-level probabilities.
        disable_dropout=True,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        pad_to_multiple_of=pad_to_multiple_of(on_gpu, pad_to),
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def param_torch_dtype(param_dtype: str) -> str:
    """The dtype the weights load in for the spec's `param_dtype`: "bfloat16" for the bf16 settings
    ("bfloat16", "bfloat16-master", "bfloat16-sr": they differ only by the optimizer, precision.py), else
    "float32" ("auto" and "float32"; "auto" differs from "float32" only by the GPU's autocast, dpo_config)."""
    from .precision import BF16_SETTINGS

    return "bfloat16" if param_dtype in BF16_SETTINGS else "float32"


def bf16_frozen_share(model, learning_rate: float) -> float:
    """Share (0 to 1) of `model`'s trainable weights that an AdamW step of `learning_rate` cannot change
    because they are stored in bf16 (param_dtype bfloat16); 0 for float32 weights.

    AdamW moves each weight by about the learning rate (exactly lr at its first step), and a bf16 weight,
    8 significant bits, changes only by at least half its spacing: a weight of exponent e (|w| in
    [2^(e-1), 2^e)) needs a step over 2^(e-9). So every weight with |w| >= 2^(floor(log2 lr) + 9) keeps its
    value: at lr 1e-3 those of magnitude 0.5 and more (norm weights near 1), at DPO's usual 5e-7 those
    from 2.4e-4 up, nearly all of them. Pure bf16 training stalls there; float32 master weights do not.
    """
    import torch

    threshold = 2.0 ** (math.floor(math.log2(learning_rate)) + 9) if learning_rate > 0 else 0.0
    frozen = total = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        total += param.numel()
        if param.dtype == torch.bfloat16:
            frozen += int((param.detach().abs() >= threshold).sum())
    return frozen / total if total else 0.0


def pad_to_multiple_of(on_gpu: bool, setting: int | None = None) -> int | None:
    """Batch length rounded up to this: `setting` (the spec's `pad_to_multiple_of`; 0 = no rounding), or
    by default 64 on a GPU and none on CPU.

    Every batch has another longest pair, so unrounded every batch is a new tensor shape, and the
    GPU's attention kernels (cuDNN's sdpa on Hopper) build and cache a plan per shape; rounding keeps
    a step to a few shapes. The padding is masked, so the loss and gradients are unchanged
    (tests/engine/test_perf_equivalence.py); on CPU it would only add work.
    """
    if setting is not None:
        return setting or None
    return 64 if on_gpu else None


def build_trainer(model, tokenizer, rows: list[dict], args, *, callbacks=(), peft_config=None, pack: bool = True,
                  text_format: str = "chat", pack_tokens: int | None = None, group_by_length: bool = False):
    """TRL's trainer for `rows` (`to_trl_rows`). Pairs without training signal are dropped while TRL
    prepares the dataset, before the reference pass: `trainer.pairs_dropped` = {reason: [row indices]}.
    `pack`: the spec's `packing` (shared-prompt packing where proven identical); `pack_tokens`: the
    spec's (several pairs per packed row, at most that many tokens; 0: one pair per row);
    `group_by_length`: the spec's (False: TRL's sampler; True: batching.LengthGroupedOrder)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    trainer = _trainer_class()(
        text_format=text_format,
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
        pack=pack,
        pack_tokens=pack_tokens,
        group_by_length=group_by_length,
    )
    # Our Relay callback reports every log as a JSON line; the printer would repeat it on stdout.
    trainer.remove_callback(PrinterCallback)
    return trainer


_TRAINER_CLASS = None


def _trainer_class():
    """`SDPOTrainer`, defined on first use so that importing this module does not import TRL."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _define_trainer_class()
    return _TRAINER_CLASS


def preload() -> None:
    """Import what every step needs (torch, transformers, TRL, datasets: about 8 s of a 2-core
    machine) and define the trainer class, before the step is known: `python -m sdpo_engine warm`
    does this while the previous step still trains, so the next step starts without it.

    Then pay two more costs every step would pay, and move them off its path too:
    - transformers' table of checkpoint conversions, built on the first `from_pretrained` of a
      process (0.17 s here: thousands of regular expressions) and cached for the process;
    - the garbage collector's walk over the import-time heap: about 500,000 objects, which every full
      collection visits (0.45 s on 2 cores), and the Trainer forces one at the start of `train()`
      (accelerate's `free_memory`); `sdpo_engine run` another between steps. They are collected once
      here and frozen (`gc.freeze`): they live as long as the process, so later collections skip them.
    """
    import gc

    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    _trainer_class()
    try:  # transformers >= 5 (absent elsewhere: nothing to warm)
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        pass
    else:
        get_checkpoint_conversion_mapping("llama")  # builds the whole table, whatever the name
    gc.collect()
    gc.freeze()


def _define_trainer_class():
    import torch
    from datasets import Dataset, concatenate_datasets
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from . import packing
    from .trl_patches import NO_HASH, real_hash_module, reference_hash_skipped

    class SDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer, same loss and metrics, with

        - shared-prompt packing (packing.py) for training and the reference pass, where proven
          identical for the model; `packing` says why not otherwise (None = packed);
        - the reference pass in length-sorted batches (less padding; the log-probs of a pair do
          not depend on its batch), kept in memory instead of TRL's cache file;
        - with `group_by_length`, training batches of pairs of similar length (batching.py) instead
          of TRL's random order (the same pairs each epoch, the same batch sizes).
        """

        def __init__(self, *args, pack: bool = True, text_format: str = "chat", pack_tokens: int | None = None,
                     group_by_length: bool = False, **kwargs):
            self._pack_requested = pack
            self.group_by_length = group_by_length
            self._length_order: Any = None  # batching.LengthGroupedOrder once the train dataloader exists
            # None: the engine's default layout (packing.DEFAULT_PACK_TOKENS); 0: one pair per row
            self._pack_tokens = packing.DEFAULT_PACK_TOKENS if pack_tokens is None else pack_tokens
            self._text_format = text_format
            self.pairs_dropped: dict[str, list[int]] = {}
            self.first_step_reference_nll: list[float | None] = []
            self._packing_checked = False
            self.packing: str | None = "not checked"
            train_args = kwargs.get("args")
            # TRL hashes every weight to name its on-disk cache of the reference log-probs, which our
            # reference pass below (one process or sharded over the ranks) never reads: skip it there
            # (trl_patches.py); any path that falls back to TRL's pass computes it first (`_precompute_ref_logps`).
            own_pass = train_args is not None and not train_args.deepspeed
            with reference_hash_skipped(own_pass):
                super().__init__(*args, **kwargs)
            self._install_packing()

        def _install_packing(self):
            if self._packing_checked:
                return
            self._packing_checked = True
            reason: str | None
            if not self._pack_requested:
                reason = "disabled (packing=false in the step spec; the worker's SDPO_PACKING=off)"
            elif type(self.data_collator) is not DataCollatorForPreference:
                reason = "custom or vision collator"
            else:
                reason = packing.packing_unsupported(self.model, self.args)
            self.packing = reason
            if reason is None:
                # The model's width sets the attention share of a packed row's cost (packing.layout_cost).
                hidden = getattr(_language_model_of(self.model).config, "hidden_size", None)
                self.data_collator = packing.SharedPromptCollator(self.data_collator, row_tokens=self._pack_tokens,
                                                                  hidden_size=hidden)

        @property
        def packed(self) -> bool:
            return self.packing is None

        @property
        def pack_tokens(self) -> int | None:
            """Tokens per packed row (0: one pair per row); None when not packed."""
            return self._pack_tokens if self.packed else None

        def pair_length(self, row: dict) -> int:
            """Tokens `row` (prompt_ids, chosen_ids, rejected_ids) takes in a batch: its packed row when
            packed (packing.packed_length), else the longer of TRL's two sequences, after truncation."""
            max_length = cast(DPOConfig, self.args).max_length  # Trainer types args as TrainingArguments
            if self.packed:
                return packing.packed_length(row, max_length)
            longest = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
            return min(longest, max_length) if max_length else longest

        def _get_train_sampler(self, train_dataset=None):
            if not self.group_by_length:  # TRL's order exactly
                return super()._get_train_sampler(train_dataset)
            from .batching import LengthGroupedOrder

            ds = cast(Dataset, self.train_dataset)  # tokenised by _prepare_dataset
            lengths = [self.pair_length({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
                       for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)]
            # The global micro-batch: every rank computes the same order and takes its slices of each.
            global_batch = self.args.per_device_train_batch_size * max(1, self.args.world_size)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self._length_order = LengthGroupedOrder(lengths, global_batch, seed)
            return self._length_order

        def _run_epoch(self, model, epoch, *args, **kwargs):
            # The Trainer's set_epoch does not reach a sampler under accelerate's shard of a resumed
            # dataloader (three wrappers deep on N ranks): set it here, before the epoch's first batch.
            if self._length_order is not None:
                self._length_order.set_epoch(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """TRL's tokenisation ("chat") or the strings exactly as given ("raw", tokens.py), then every
            pair without training signal dropped and its row index kept by reason (tokens.no_signal_reason)."""
            if not isinstance(dataset, Dataset) or dataset_name != "train":
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            n_rows = len(dataset)
            dataset = dataset.add_column("sdpo_row", list(range(n_rows)))
            tokenizer = self._tokenizer
            if self._text_format == "raw":
                dataset = dataset.map(lambda row: raw_tokenize(tokenizer, row["prompt"], row["chosen"], row["rejected"]),
                                      desc="Tokenizing raw text")
            else:  # TRL's own; it drops the pairs whose prompt fills max_length itself
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            kept = set(dataset["sdpo_row"])
            dropped = {"prompt_fills_max_length": [i for i in range(n_rows) if i not in kept]}
            keep = []
            for row, p, c, r in zip(dataset["sdpo_row"], dataset["prompt_ids"], dataset["chosen_ids"],
                                    dataset["rejected_ids"], strict=True):
                reason = no_signal_reason(p, c, r, args.max_length)
                keep.append(reason is None)
                if reason is not None:
                    dropped.setdefault(reason, []).append(row)
            if not all(keep):
                dataset = dataset.select([i for i, k in enumerate(keep) if k])
            self.pairs_dropped = {k: sorted(v) for k, v in dropped.items() if v}
            return dataset.remove_columns("sdpo_row")

        def _packed_forward(self, model, outputs):
            unwrapped = self.accelerator.unwrap_model(model) is model
            # A model FSDP2 sharded during training (the held-out pass after it) is sharded here too.
            compact = (unwrapped and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
                       and not distributed.is_sharded(model))
            return packing.PackedForward(model, outputs=outputs, compact=compact, autocast=self.accelerator.autocast())

        def _compute_loss(self, model, inputs, return_outputs):
            if "packed_input_ids" in inputs:
                outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")
                if self.use_weighting:
                    outputs += ("log_sum_sq_probs",)
                model = self._packed_forward(model, outputs)
            if "sft" in self.loss_types and getattr(self.model, "training", False) and self.state.global_step == 0:
                # The first optimizer step's sft term at policy = reference (expected_first_loss).
                self.first_step_reference_nll.append(self._reference_chosen_nll(inputs))
            return super()._compute_loss(model, inputs, return_outputs)

        def _reference_chosen_nll(self, inputs) -> float | None:
            """The reference's mean NLL per chosen completion token of this micro-batch, as TRL's sft term
            takes it from the policy (averaged over ranks, as the logged loss is); None where the reference
            column is LD-weighted (ld_alpha < 1), which hides the plain sum the NLL needs."""
            if self.ld_alpha not in (None, 1.0):
                return None
            chosen_tokens = inputs["completion_mask"][..., 1:].chunk(2, dim=0)[0].sum().clamp(min=1)
            nll = -inputs["ref_chosen_logps"].sum() / chosen_tokens
            if self.accelerator.num_processes > 1:
                nll = self.accelerator.gather(nll[None]).mean()
            return float(nll)

        def compute_ref_log_probs(self, model, inputs):
            if "packed_input_ids" in inputs:
                model = self._packed_forward(model, ("log_probs",))
            return super().compute_ref_log_probs(model, inputs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._install_packing()
            # DDP and FSDP ranks run the same pass, dealt out by batch (distributed.reference_pass).
            if not isinstance(dataset, Dataset) or self.is_deepspeed_enabled:
                if self._precompute_model_hash is NO_HASH:
                    self._precompute_model_hash = real_hash_module(self.ref_model or self.model)
                return super()._precompute_ref_logps(dataset, name, batch_size)
            rows = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
            t_forward = time.perf_counter()
            order = sorted(range(len(rows)), key=lambda i: -self.pair_length(rows[i]))
            model = self.ref_model or self.model
            device = self.accelerator.device

            def score(idx):
                batch = self.data_collator([rows[i] for i in idx])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                return self.compute_ref_log_probs(model, batch)

            chosen, rejected = distributed.reference_pass(len(rows), order, batch_size, score)
            # The forward pass alone (TRL tokenised the data before): what the step pays per reference.
            self.reference_forward_seconds = time.perf_counter() - t_forward
            ref = Dataset.from_dict({"ref_chosen_logps": chosen.numpy(), "ref_rejected_logps": rejected.numpy()})
            return concatenate_datasets([dataset, ref], axis=1)

    return SDPOTrainer


def pair_logps(model, tokenizer, pairs: list[dict], *, max_length: int, batch_size: int = 8,
               device: str = "cpu", text_format: str = "chat", kept: list[int] | None = None,
               pack: bool = True, pad_to: int | None = None,
               lengths: list[tuple[int, int]] | None = None, param_dtype: str = "auto") -> tuple[list[float], list[float]]:
    """Summed completion log-probs (chosen, rejected) of each pair under `model`.

    Computed by TRL's own reference pass (same tokenization, truncation and masking as training),
    so a gamma computed here equals the gamma_ref a step trained against. Pairs without training
    signal (tokens.no_signal_reason) are left out, as in training; pass a list as `kept` to receive
    the indices into `pairs` of the pairs that were scored, in the order of the returned lists.
    `pack` and `pad_to` are the spec's `packing` and `pad_to_multiple_of` (the numbers do not depend on them);
    `param_dtype` the spec's (the model's weights are already in that dtype: load_policy).
    Pass a list as `lengths` to receive each scored pair's (chosen, rejected) token counts after
    truncation (the tokens the sums run over; drift.drift_metrics divides by them).
    """
    with tempfile.TemporaryDirectory(prefix="sdpo-logps-") as tmp:
        cfg = StepConfig(max_length=max_length, batch_size=batch_size)
        args = dpo_config(cfg, tmp, device, pad_to=pad_to, precompute_ref_batch_size=batch_size,
                          param_dtype=param_dtype)
        trainer = build_trainer(model, tokenizer, to_trl_rows(pairs, tokenizer, text_format), args,
                                pack=pack, text_format=text_format)
        ds = trainer.train_dataset
        if kept is not None:
            dropped = {i for rows in trainer.pairs_dropped.values() for i in rows}
            kept.extend(i for i in range(len(pairs)) if i not in dropped)
        if "ref_chosen_logps" not in ds.column_names:  # every pair dropped: no reference pass ran
            return [], []
        chosen, rejected = list(ds["ref_chosen_logps"]), list(ds["ref_rejected_logps"])
        if lengths is not None:
            from .packing import truncated_lengths

            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True):
                _, n_c, n_r = truncated_lengths({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, max_length)
                lengths.append((n_c, n_r))
    return chosen, rejected


def activation_bytes(trainer) -> int:
    """Activations the largest training batch keeps for backward without checkpointing (an estimate).

    Per token and decoder layer a Llama-style block keeps about 8 hidden-sized and 4
    intermediate-sized vectors (norm inputs, q/k/v, attention output, MLP gate/up/act/product); the
    largest batch is the batch size times the longest sequence of the data (packed or not).
    """
    from .packing import packed_length, truncated_lengths

    config = _language_model_of(trainer.model).config.get_text_config()
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    width = 2 if trainer.args.bf16 or trainer.args.fp16 else next(trainer.model.parameters()).element_size()
    per_token = layers * (8 * hidden + 4 * intermediate) * width
    ds = trainer.train_dataset
    max_length = trainer.args.max_length
    longest = 0
    for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True):
        row = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        if trainer.packed:
            longest = max(longest, packed_length(row, max_length))
        else:
            lp, lc, lr = truncated_lengths(row, max_length)
            longest = max(longest, 2 * (lp + max(lc, lr)))
    return per_token * longest * trainer.args.per_device_train_batch_size


def free_memory_bytes(device: str) -> int:
    """Memory free for this process's tensors: the GPU's free memory, else the host's MemAvailable."""
    import torch

    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume plenty


def plan_activation_checkpointing(trainer, device: str, setting: str = "auto") -> dict:
    """Turn activation checkpointing on only where memory needs it.

    Needed when the largest batch's activations exceed half of what stays free once the optimizer
    has its states and the gradients exist (Adam: 2 + 1 times the trainable parameters). Off
    otherwise: recomputing every layer's forward costs about a third more compute per step.
    `setting` (the spec's `activation_checkpointing`) "on" or "off" overrides.
    """
    trainable = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    # Per rank on N ranks: FSDP shards gradients and optimizer states, and CPU ranks share the host's memory.
    trainable //= distributed.state_shards(trainer)
    free = free_memory_bytes(device) // distributed.ranks_sharing_memory(device) - 3 * trainable
    estimate = activation_bytes(trainer)
    if setting in ("on", "off"):
        needed = setting == "on"
    else:
        needed = bool(trainer.args.gradient_checkpointing) or estimate > 0.5 * max(free, 0)
    if needed and not trainer.args.gradient_checkpointing:
        # The Trainer switches it on when training starts; a LoRA model needs input gradients for it.
        trainer.args.activation_checkpointing = trainer.args.gradient_checkpointing = True
        if hasattr(trainer.model, "enable_input_require_grads") and hasattr(trainer.model, "peft_config"):
            trainer.model.enable_input_require_grads()
    return {"activation_checkpointing": needed, "activation_estimate_mb": round(estimate / 2**20),
            "free_mb": round(max(free, 0) / 2**20)}


def _language_model_of(model):
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def gammas(chosen: list[float], rejected: list[float]) -> list[float]:
    """gamma = log p(chosen) - log p(rejected), the paper's per-pair preference."""
    return [c - r for c, r in zip(chosen, rejected, strict=True)]


def preference_metrics(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]],
                       beta: float) -> dict:
    """Held-out metrics against a fixed reference: implicit reward margin and its accuracy."""
    pc, pr = policy
    rc, rr = reference
    margins = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]
    n = len(margins)
    if n == 0:
        return {"pairs": 0}
    return {
        "pairs": n,
        "reward_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        # reference-free: does the policy itself prefer the chosen answer?
        "preference_accuracy": sum(g > 0 for g in gammas(pc, pr)) / n,
        "mean_gamma": sum(gammas(pc, pr)) / n,
    }


class _StopRequest:
    """Set by SIGTERM or by the stop file appearing; checked after every optimizer step."""

    def __init__(self, stop_file: str | None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.signalled = False

    def install(self):
        def handler(signum, frame):
            self.signalled = True

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. called from a test thread): stop file only
            pass

    @property
    def requested(self) -> bool:
        # On N ranks every rank asks at the same points, and all stop at the same optimizer step.
        return distributed.any_rank(self.signalled or bool(self.stop_file and self.stop_file.exists()))


def _callbacks(index: int, emit: Emit, stop: _StopRequest, *,
               first_loss_expected: float | Callable[[], float | None] | None = None):
    """`first_loss_expected`: the loss at policy = reference, or a function giving it once the first
    optimizer step has run (expected_first_loss; None: not checked)."""
    from transformers import TrainerCallback

    class Relay(TrainerCallback):
        """Turns every TRL log into one JSON metrics line, with tokens/s since the previous log."""

        def __init__(self):
            self.last_time = time.perf_counter()
            self.last_tokens = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_runtime" in logs:  # the trainer's closing summary, not a step
                emit({"event": "info", "phase": "train_end", "step": index, "global_step": state.global_step,
                      **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})
                return
            now = time.perf_counter()
            tokens = logs.get("num_tokens")
            tps = None
            if tokens is not None and self.last_tokens is not None and now > self.last_time:
                tps = (tokens - self.last_tokens) / (now - self.last_time)
            self.last_time, self.last_tokens = now, tokens
            emit({"event": "metrics", "step": index, "global_step": state.global_step,
                  "max_steps": state.max_steps, **logs, "tokens_per_second": tps})

    class NumericGuard(TrainerCallback):
        """Fails the step at the first non-finite loss or gradient norm (every optimizer step is
        logged), before the trainer saves anything; warns when the first loss is not the loss's value at
        policy = reference (ln 2 for sigmoid; losses.py)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "train_runtime" in logs:
                return
            for key in ("loss", "grad_norm"):
                value = logs.get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise NonFiniteError(
                        f"{key} is {_nonfinite_name(value)} at optimizer step {state.global_step} of {state.max_steps}; "
                        "nothing was saved (lower the learning rate, or check the model's weights)",
                        value=key, global_step=state.global_step)
            loss = logs.get("loss")
            if state.global_step != 1 or not isinstance(loss, (int, float)):
                return
            expected = first_loss_expected() if callable(first_loss_expected) else first_loss_expected
            if expected is not None and abs(loss - expected) > FIRST_LOSS_TOLERANCE:
                # The code keeps its first name (sigmoid's ln 2) for every loss: it is in the contract.
                emit({"event": "warning", "code": "first_loss_not_ln2", "step": index, "global_step": 1,
                      "first_loss": loss, "expected": expected,
                      "message": f"first loss {loss:.6f} is {abs(loss - expected):.6f} off "
                                 f"{'ln 2' if expected == math.log(2) else 'its value at policy = reference'} = "
                                 f"{expected:.6f} (tolerance {FIRST_LOSS_TOLERANCE:g}): the policy and its "
                                 "reference differ before the first update"})

    class Stopper(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                # transformers saves a full trainer checkpoint (weights, optimizer, RNG) at the last
                # step whenever save_strategy is "steps". Nothing ever resumes from a finished step:
                # its output is saved right after. Skipping it saved ~2 s of a 4.8 s SmolLM2 step.
                control.should_save = False
            elif stop.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

    return [Relay(), NumericGuard(), Stopper()]


FIRST_LOSS_TOLERANCE = 1e-3  # a first loss further than this from its policy = reference value is a warning


def expected_first_loss(cfg: StepConfig, trainer=None) -> float | None:
    """The first loss of a step whose policy is its reference (every log-ratio 0): each loss's value
    there, weighted as TRL sums them (losses.py; ln 2 for sigmoid). An sft term needs the reference NLL
    of the first optimizer step's batches, which `trainer` records while it runs that step (mean over
    its micro-batches, as the logged loss is); None before, on a resumed step, or with ld_alpha < 1."""
    from .losses import combined_loss_at_reference

    sft_nll = None
    if "sft" in cfg.loss_types:
        nlls = getattr(trainer, "first_step_reference_nll", None) or []
        if nlls and None not in nlls:
            sft_nll = sum(nlls) / len(nlls)
    return combined_loss_at_reference(cfg.loss_types, cfg.loss_weights, beta=cfg.beta,
                                      label_smoothing=cfg.label_smoothing, sft_nll=sft_nll)


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def check_finite_logps(chosen: list[float], rejected: list[float], what: str, labels: list[str] | None = None) -> None:
    """Raise NonFiniteError naming the first pair whose summed log-prob (`what`, e.g. "reference
    log-prob") is NaN or infinite. `labels[i]` names pair i for the user ("the pair at line 3");
    default "pair i+1"."""
    for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
        for answer, value in (("chosen", c), ("rejected", r)):
            if not math.isfinite(value):
                label = labels[i] if labels is not None else f"pair {i + 1}"
                bad = sum(1 for a, b in zip(chosen, rejected, strict=True)
                          if not (math.isfinite(a) and math.isfinite(b)))
                raise NonFiniteError(
                    f"{what} of the {answer} answer of {label} is {_nonfinite_name(value)} ({bad} of "
                    f"{len(chosen)} pairs non-finite); nothing was saved (check the model's weights)",
                    value=what)


def _held_out_labels(logps: tuple[list[float], list[float]], eval_pairs: list[dict]) -> list[str] | None:
    # TRL drops pairs whose prompt fills max_length; only without drops is row i the file's pair i.
    if len(logps[0]) != len(eval_pairs):
        return None
    return [f"held-out pair {i + 1}" for i in range(len(eval_pairs))]


def _summary_from_history(history: list[dict], n_epochs: int) -> dict:
    """first/last loss and the last epoch's mean reward accuracy and margin, from the trainer's log."""
    steps = [h for h in history if "loss" in h and "train_runtime" not in h]
    if not steps:
        return {}
    last_epoch_start = max(0.0, float(n_epochs) - 1.0)
    last_epoch = [h for h in steps if h.get("epoch", 0) > last_epoch_start] or steps[-1:]

    def mean(key):
        vals = [h[key] for h in last_epoch if key in h]
        return sum(vals) / len(vals) if vals else None

    return {
        "first_loss": steps[0]["loss"],
        "first_rewards_chosen": steps[0].get("rewards/chosen"),
        "first_rewards_rejected": steps[0].get("rewards/rejected"),
        "last_loss": steps[-1]["loss"],
        "reward_accuracy": mean("rewards/accuracies"),
        "reward_margin": mean("rewards/margins"),
        "global_steps": steps[-1].get("step"),
    }


# ---------------------------------------------------------------------------------------------
# The step


def check_training_text(path: str, tokenizer, *, text_format: str, source_field: str | None = "source",
                        model_name: str = "the model") -> list[tuple[int, dict]]:
    """Load a preference file and check its text against the model's tokenizer (markup.check_pairs).

    Returns `load_numbered_pairs`'s ``[(line, pair)]``. Raises DataError for an invalid file and
    TrainingDataError (code ``special_tokens_in_text``, ``no_chat_template`` or
    ``raw_needs_strings``) when the text cannot be trained as asked.
    """
    from .data import validate_file
    from .markup import check_pairs

    numbered = load_numbered_pairs(path, source_field=source_field)
    fmt = validate_file(path, source_field=source_field, max_errors=1)["format"]
    checked = check_pairs(numbered, fmt=fmt, tokenizer=tokenizer, text_format=text_format, model_name=model_name)
    if not checked["valid"]:
        first = checked["errors"][0]
        where = f"line {first['line']}, {first['field']}: " if first["line"] else ""
        raise TrainingDataError(checked["code"], f"{where}{first['reason']}"
                                + (f" (and {checked['error_count'] - 1} more)" if checked["error_count"] > 1 else ""),
                                {"valid": False, "errors": checked["errors"], "error_count": checked["error_count"]})
    return numbered


def dropped_summary(dropped: dict[str, list[int]], lines: list[int], max_lines: int = 10) -> dict:
    """``{reason: {"count", "lines": [first file lines]}}`` from a trainer's `pairs_dropped` row indices."""
    return {reason: {"count": len(rows), "lines": [lines[i] for i in rows[:max_lines]]}
            for reason, rows in dropped.items()}


def run_step(spec: StepSpec | dict, emit: Emit | None = None) -> dict:
    """Run one sDPO step. Returns the summary (also written into the output's manifest).

    Raises SpecError / ConfigError / DataError for bad input, StepStopped when stopped on request.
    """
    import torch
    from transformers import set_seed

    emit = emit or (lambda event: None)
    if isinstance(spec, dict):
        spec = StepSpec.from_dict(spec)
    cfg = StepConfig.from_dict(spec.hyperparameters)
    device = resolve_device(spec.device)
    if spec.attention == "flex":
        from .flex import unavailable

        if why := unavailable(device):
            raise SpecError(f"attention flex: {why}")
    out_dir = Path(spec.output_dir).resolve()
    if out_dir.exists():
        raise SpecError(f"output_dir {out_dir} already exists; a step never overwrites a checkpoint")
    stop = _StopRequest(spec.stop_file)
    stop.install()
    t_start = time.perf_counter()

    from transformers import AutoTokenizer

    # The text is checked against the model's tokenizer before anything loads a model: markup in the
    # text, message lists on a model without a chat template (markup.py).
    tokenizer = AutoTokenizer.from_pretrained(spec.policy_init)
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    numbered = check_training_text(spec.train_file, tokenizer, text_format=spec.text_format,
                                   source_field=spec.source_field, model_name=Path(spec.policy_init).name)
    lines = [line for line, _ in numbered]
    pairs = [pair for _, pair in numbered]
    data_sha256 = fingerprint(spec.train_file)
    reference = checkpoint_identity(spec.policy_init)
    emit({"event": "info", "phase": "start", "step": spec.index, "pairs": len(pairs), "device": device,
          "reference": reference, "data_sha256": data_sha256, "config": cfg.to_dict()})

    # Held-out reference log-probs first, so at most one model is in memory at any time.
    eval_pairs, eval_ref = None, None
    eval_lengths: list[tuple[int, int]] = []  # scored answer tokens per held-out pair (drift per token)
    if spec.eval_file:
        eval_pairs = load_pairs(spec.eval_file, source_field=spec.source_field)
        assert spec.eval_reference is not None  # StepSpec refuses an eval_file without it
        ref_tok, ref_model = load_policy(spec.eval_reference, device, param_dtype=spec.param_dtype)
        if spec.chat_template:
            ref_tok.chat_template = spec.chat_template
        eval_ref = pair_logps(ref_model, ref_tok, eval_pairs, max_length=cfg.max_length,
                              batch_size=max(cfg.batch_size, 8), device=device, text_format=spec.text_format,
                              pack=spec.packing, pad_to=spec.pad_to_multiple_of, lengths=eval_lengths,
                              param_dtype=spec.param_dtype)
        del ref_model
        check_finite_logps(*eval_ref, "held-out reference log-prob", _held_out_labels(eval_ref, eval_pairs))
        emit({"event": "info", "phase": "eval_reference", "step": spec.index, "pairs": len(eval_pairs)})

    # Seed before the model (and a LoRA adapter) exist: the Trainer seeds only later.
    set_seed(cfg.seed)
    tokenizer, model = load_policy(spec.policy_init, device, spec.attention, param_dtype=spec.param_dtype)
    if device == "cpu" and not spec.lora:  # LoRA never writes the base weights: their pages stay shared
        own_weights(model)
    if spec.chat_template:
        # Saved with the checkpoint's tokenizer: the next step, and inference, use the same template.
        tokenizer.chat_template = spec.chat_template
    sample_prompts, base_samples = _samples_before(spec, model, tokenizer, device)
    from .regional import compile_layers, compiled_layers

    if spec.compile == "layers":  # in place, after the base samples, before a LoRA adapter; compiled at first use
        compile_layers(model)
    # Pure bf16 only: float32 masters keep every update, stochastic rounding keeps it in expectation.
    if spec.param_dtype == "bfloat16" and not spec.lora and (frozen := bf16_frozen_share(model, cfg.learning_rate)) > 0.5:
        emit({"event": "warning", "code": "bf16_updates_lost", "step": spec.index, "frozen_share": frozen,
              "message": f"{frozen:.0%} of the bf16 weights cannot change under AdamW steps of learning_rate "
                         f"{cfg.learning_rate:g}: bf16 keeps 8 significant bits, so a weight w moves only by steps "
                         "of about |w| x 2^-8 or more. Use param_dtype bfloat16-master (float32 master weights), "
                         "auto or float32, or a larger learning rate"})
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                 target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    overrides = distributed.trainer_overrides(cfg, spec)
    if spec.reference_batch_size is not None:  # no gradients in the reference pass: a larger batch fits
        overrides["precompute_ref_batch_size"] = spec.reference_batch_size
    args = dpo_config(cfg, spec.work_dir, device, save_steps=spec.save_steps, pad_to=spec.pad_to_multiple_of, param_dtype=spec.param_dtype,
                      **overrides)
    if spec.attention == "flex":  # FlexAttention runs only the packed layout (flex.py)
        from .packing import packing_unsupported

        if why := packing_unsupported(model, args):
            raise SpecError(f"attention flex needs shared-prompt packing, which does not apply here: {why}")
    t_ref = time.perf_counter()
    trainer = build_trainer(model, tokenizer, to_trl_rows(pairs, tokenizer, spec.text_format), args,
                            callbacks=[*_callbacks(spec.index, emit, stop,
                                                   first_loss_expected=lambda: expected_first_loss(cfg, trainer)),
                                       distributed.checkpoint_seal(spec)],
                            peft_config=peft_config, pack=spec.packing, pack_tokens=spec.pack_tokens,
                            text_format=spec.text_format, group_by_length=spec.group_by_length)
    distributed.fsdp_on_cpu(trainer)
    from .precision import use_param_dtype_optimizer

    use_param_dtype_optimizer(trainer, spec.param_dtype)  # the bf16 settings' AdamW (precision.py)
    pairs_dropped = dropped_summary(trainer.pairs_dropped, lines)
    if pairs_dropped:
        emit({"event": "info", "phase": "pairs_dropped", "step": spec.index, "pairs": len(pairs),
              "max_length": cfg.max_length, "pairs_dropped": pairs_dropped})
    # With every pair dropped there is no reference pass (and no column) at all.
    has_ref = "ref_chosen_logps" in trainer.train_dataset.column_names
    ref_c = list(trainer.train_dataset["ref_chosen_logps"]) if has_ref else []
    ref_r = list(trainer.train_dataset["ref_rejected_logps"]) if has_ref else []
    dropped_rows = {row for rows in trainer.pairs_dropped.values() for row in rows}
    check_finite_logps(ref_c, ref_r, "reference log-prob",
                       [f"the pair at line {lines[k]}" for k in range(len(pairs)) if k not in dropped_rows])
    g = gammas(ref_c, ref_r)
    mean_gamma_ref = sum(g) / len(g) if g else float("nan")
    emit({"event": "info", "phase": "reference_logps", "step": spec.index, "mean_gamma_ref": mean_gamma_ref,
          "pairs_used": len(g), "pairs_dropped": {k: v["count"] for k, v in pairs_dropped.items()},
          "packing": "shared_prompt" if trainer.packed else f"two_sequences: {trainer.packing}",
          "seconds": time.perf_counter() - t_ref,
          "forward_seconds": getattr(trainer, "reference_forward_seconds", None)})
    if not g:
        why = "; ".join(f"{v['count']} {k.replace('_', ' ')} (lines {', '.join(map(str, v['lines']))})"
                        for k, v in pairs_dropped.items())
        raise TrainingDataError("no_trainable_pairs", f"no pair of the {len(pairs)} has a training signal at "
                                f"max_length={cfg.max_length}: {why}. Shorten the prompts, raise max_length, or "
                                "fix answers that are the same")
    memory = plan_activation_checkpointing(trainer, device, spec.activation_checkpointing)
    emit({"event": "info", "phase": "memory", "step": spec.index, **memory})

    resume_from = distributed.resume_point(spec, emit)  # sealed, same world size and strategy
    if resume_from:
        emit({"event": "info", "phase": "resume", "step": spec.index, "checkpoint": resume_from})
    if stop.requested:
        raise StepStopped(0, resume_from)
    t_train = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - t_train
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:
        checkpoint = distributed.last_sealed_checkpoint(spec.work_dir)
        raise StepStopped(trainer.state.global_step, checkpoint)

    policy = trainer.model
    if spec.lora:
        # Merge so the saved checkpoint is a plain model: the next step's reference is then really
        # this step's output, not the adapter-disabled base.
        policy = policy.merge_and_unload()
    policy.eval()

    summary = {
        "index": spec.index,
        "mean_gamma_ref": mean_gamma_ref,
        **_summary_from_history(trainer.state.log_history, cfg.n_epochs),
        "first_loss_expected": expected_first_loss(cfg, trainer),
        "pairs": len(pairs),
        "pairs_used": len(g),
        "pairs_dropped": {k: v["count"] for k, v in pairs_dropped.items()},
        "train_seconds": train_seconds,
        "resumed_from": resume_from,
    }
    if eval_pairs is not None and eval_ref is not None:  # both or neither (mypy: eval_ref is set with them)
        eval_policy = pair_logps(policy, tokenizer, eval_pairs, max_length=cfg.max_length,
                                 batch_size=max(cfg.batch_size, 8), device=device, text_format=spec.text_format,
                                 pack=spec.packing, pad_to=spec.pad_to_multiple_of, param_dtype=spec.param_dtype)
        check_finite_logps(*eval_policy, "held-out policy log-prob", _held_out_labels(eval_policy, eval_pairs))
        summary["eval"] = preference_metrics(eval_policy, eval_ref, cfg.beta)
        summary["drift"] = drift_metrics(eval_policy, eval_ref, eval_lengths, cfg.beta)  # eval_ref: the base
        emit({"event": "info", "phase": "eval", "step": spec.index, **summary["eval"], "drift": summary["drift"]})

    to_save = distributed.saveable_policy(trainer, policy)  # FSDP: gathered from the shards (every rank)
    if sample_prompts is not None:  # after training, with the policy in memory (samples.py); rank 0 on N ranks
        summary["samples"] = distributed.on_main_rank(
            lambda: _samples_after(spec, to_save, tokenizer, device, sample_prompts, base_samples, emit))

    manifest = {
        "format": "sdpo-checkpoint/1",
        "step": spec.index,
        "config": cfg.to_dict(),
        "lora": spec.lora.__dict__ if spec.lora else None,
        "text_format": spec.text_format,
        "chat_template": spec.chat_template,
        "data_sha256": data_sha256,
        "train_file": str(Path(spec.train_file).resolve()),
        "reference": reference,
        "metrics": summary,
        # What load_policy turned off for training (the saved config keeps its own values).
        "dropout_disabled": model.sdpo_dropout_disabled,
        # The operator's settings that change how the step trains, as asked and as applied.
        "training_settings": {**spec.training_settings(), "device": device},
        "training_applied": {"packing": "shared_prompt" if trainer.packed else f"two_sequences: {trainer.packing}",
                             "pad_to_multiple_of": args.pad_to_multiple_of,
                             "pack_tokens": trainer.pack_tokens,
                             "activation_checkpointing": memory["activation_checkpointing"],
                             # The weights' dtype; bf16 weights of a bf16 setting by that setting's name, the
                             # three differing only in the optimizer use_param_dtype_optimizer installed (it
                             # refuses rather than falls back).
                             "param_dtype": (spec.param_dtype if param_torch_dtype(spec.param_dtype) == "bfloat16"
                                             and next(model.parameters()).dtype == torch.bfloat16
                                             else str(next(model.parameters()).dtype).removeprefix("torch.")),
                             "autocast": "bfloat16" if args.bf16 else None,
                             "compiled_layers": compiled_layers(model),
                             "group_by_length": trainer.group_by_length,
                             "reference_batch_size": args.precompute_ref_batch_size,
                             "attention": model.config._attn_implementation},
        "distributed": distributed.manifest_entry(spec),
        "torch": torch.__version__,
        "samples": summary.get("samples"),
    }

    def write(tmp: Path):
        _restore_dropout_config(model)
        to_save.save_pretrained(tmp, safe_serialization=True, max_shard_size=CHECKPOINT_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)

    written = distributed.on_main_rank(lambda: write_checkpoint_atomically(out_dir, write, manifest))
    summary["output"] = {"path": str(out_dir), "sha256": written["checkpoint_sha256"]}
    summary["reference"] = reference
    summary["seconds"] = time.perf_counter() - t_start
    emit({"event": "result", "step": spec.index, "summary": summary})
    return summary


def _samples_before(spec: StepSpec, model, tokenizer, device: str):
    """The held-out prompts of `spec.samples` and, with `base`, policy_init's answers before training."""
    if spec.samples is None or spec.eval_file is None:
        return None, None
    from . import samples

    prompts = samples.prompt_messages(spec.eval_file, spec.samples.n_prompts, spec.source_field)
    if not spec.samples.base:
        return prompts, None
    options = spec.samples
    # On N ranks rank 0 decodes with its whole copy (nothing is sharded yet); the others wait for its answers.
    return prompts, distributed.on_main_rank(lambda: samples.generate_answers(
        model, tokenizer, prompts, max_new_tokens=options.max_new_tokens, seed=options.seed, device=device,
        text_format=spec.text_format))


def _samples_after(spec: StepSpec, policy, tokenizer, device: str, prompts, base, emit: Emit) -> dict:
    """The samples entry, decoded by `policy` (on N ranks: rank 0's whole model, `saveable_policy`)."""
    from . import samples

    assert spec.samples is not None
    policy, device = samples.decoding_model(policy, device)
    answers, seconds = samples.generate_answers(policy, tokenizer, prompts, max_new_tokens=spec.samples.max_new_tokens,
                                                seed=spec.samples.seed, device=device, text_format=spec.text_format)
    result = samples.result(samples.texts(tokenizer, prompts, spec.text_format), answers, base, seconds,
                            vars(spec.samples))
    emit({"event": "info", "phase": "samples", "step": spec.index, "prompts": len(prompts),
          "seconds": result["seconds"], "base_seconds": result["base_seconds"]})
    return result


def main_step(spec_path: str) -> int:
    """`python -m sdpo_engine step SPEC.json`: JSON lines on stdout, exit code per CONTRACTS.md."""
    import sys

    # TRL/transformers print to stdout; keep stdout for our JSON lines only.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    def emit(event: dict):
        if not distributed.is_main_rank():  # on N ranks rank 0 speaks for the step
            return
        out.write(json.dumps(_jsonable(event)) + "\n")
        out.flush()

    try:
        with open(spec_path) as fh:
            spec_dict = json.load(fh)
        spec = StepSpec.from_dict(spec_dict)
        if spec.launched and not distributed.is_rank_process():
            return distributed.launch(spec, spec_dict, out)
        if distributed.is_rank_process():
            if distributed.world_size() != spec.num_processes:
                raise SpecError(f"distributed.num_processes is {spec.num_processes} but the step runs on "
                                f"{distributed.world_size()} ranks")
            distributed.init_rank(resolve_device(spec.device))
        run_step(spec, emit)
        return EXIT_OK
    except StepStopped as e:
        emit({"event": "stopped", "global_step": e.global_step, "checkpoint": e.checkpoint})
        return EXIT_STOPPED
    except NonFiniteError as e:
        emit({"event": "error", "code": "non_finite", "message": str(e), "value": e.value,
              "global_step": e.global_step})
        return EXIT_NON_FINITE
    except (SpecError, ConfigError, DataError, json.JSONDecodeError, FileNotFoundError) as e:
        payload = {"event": "error", "code": getattr(e, "code", None) or "invalid_input", "message": str(e)}
        if isinstance(e, ConfigError):
            payload["param"] = e.param
        if isinstance(e, DataError) and e.report:
            payload["errors"] = e.report.get("errors", [])[:20]
        emit(payload)
        return EXIT_BAD_INPUT
    except Exception as e:  # the supervisor needs a line it can show, not only a traceback
        import traceback

        traceback.print_exc()
        emit({"event": "error", "code": "step_failed", "message": f"{type(e).__name__}: {e}"})
        return EXIT_FAILED


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
