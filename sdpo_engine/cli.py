"""`python -m sdpo_engine …`: the engine without a server.

  tiny-model OUT_DIR              build the offline tiny model
  base-model NAME_OR_PATH OUT_DIR a plain trainable directory from a built-in name or GGUF file
  run …                           a whole sDPO job in this process
  step SPEC.json                  one step (what a worker runs in a child process)
  score-sources --model --file    the easy-to-hard scores of a file's sources (JSON)
  score-pairs --model --file      every pair's gamma under a model, the pair-level curriculum (JSON)
  validate FILE                   the validation report as JSON (exit 0 only when valid)

The command names and flags are a contract (see docs/CONTRACTS.md): the worker, the README and
the benchmarks call them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from .protocol import (
    ACTIVATION_CHECKPOINTING,
    ATTENTION,
    COMPILE_MODES,
    DEVICES,
    MAX_REFERENCE_BATCH_SIZE,
    PARAM_DTYPES,
    PARTITION_STRATEGIES,
    TEXT_FORMATS,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdpo_engine", description="Stepwise DPO (sDPO) on TRL")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="build the deterministic tiny Llama-style model offline")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("base-model", help="materialise sdpo-tiny, smollm2-135m or a .gguf as a plain HF directory")
    b.add_argument("model")
    b.add_argument("out_dir")

    r = sub.add_parser("run", help="run a whole sDPO job in this process")
    r.add_argument("--model", required=True,
                   help="a model directory, a .gguf file, sdpo-tiny, smollm2-135m, or a hub id (needs network)")
    r.add_argument("--step-file", action="append", dest="step_files",
                   help="one preference file per step, in order (repeat)")
    r.add_argument("--train-file", help="one file to partition into --steps chunks")
    r.add_argument("--partition", choices=list(PARTITION_STRATEGIES))
    r.add_argument("--steps", type=int, help="number of steps T for --partition")
    r.add_argument("--sizes", help="comma-separated chunk sizes for --partition random")
    r.add_argument("--rescore", action="store_true",
                   help="pair_easy_to_hard: before step t, order the pairs not yet trained by M_{t-1}'s gamma")
    r.add_argument("--eval-file", help="held-out pairs; metrics against the base model after every step")
    r.add_argument("--out", required=True, help="output directory (re-running continues where it stopped)")
    r.add_argument("--beta", type=float)
    r.add_argument("--learning-rate", type=float)
    r.add_argument("--epochs", type=int, dest="n_epochs")
    r.add_argument("--batch-size", type=int)
    r.add_argument("--gradient-accumulation-steps", type=int)
    r.add_argument("--max-length", type=int)
    r.add_argument("--loss-type", type=_names_or_name,
                   help="a TRL loss (sigmoid, ipo, robust, ...) or several comma-separated, summed with --loss-weights")
    r.add_argument("--loss-weights", type=_numbers, help="comma-separated, one weight per loss of --loss-type")
    r.add_argument("--rpo-alpha", type=float, help="RPO: --loss-type sigmoid,sft with weights 1,RPO_ALPHA")
    r.add_argument("--label-smoothing", type=float, help="robust, aot, aot_unpaired, exo_pair (required there)")
    r.add_argument("--ld-alpha", type=float, help="LD-DPO weight of the tokens beyond the shorter answer (0..1)")
    r.add_argument("--discopop-tau", type=float, help="discopop loss temperature")
    r.add_argument("--warmup-ratio", type=float)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--source-field", default="source")
    r.add_argument("--lora-r", type=int, help="train a LoRA adapter of this rank (merged after every step)")
    r.add_argument("--text-format", choices=list(TEXT_FORMATS), default="chat",
                   help="chat (default): message lists through the chat template, markup in text refused; "
                        "raw: strings already formatted, trained exactly as given (BOS/EOS added at most once)")
    r.add_argument("--chat-template-file", help="a Jinja chat template to use instead of the model's own")
    r.add_argument("--device", default="auto", choices=list(DEVICES))
    # The settings a server's worker takes from SDPO_PACKING, SDPO_PAD_TO_MULTIPLE_OF and
    # SDPO_ACTIVATION_CHECKPOINTING (core.settings); here flags, recorded in every step's manifest.
    r.add_argument("--no-packing", dest="packing", action="store_false",
                   help="TRL's two sequences per pair instead of shared-prompt packing (same loss, slower)")
    r.add_argument("--pad-to-multiple-of", type=int, metavar="N",
                   help="round each batch's length up to N (0: no rounding; default 64 on a GPU, none on CPU)")
    r.add_argument("--pack-tokens", type=int, metavar="N",
                   help="several pairs per packed row of at most N tokens (0: one pair per row; default: the engine's)")
    r.add_argument("--activation-checkpointing", choices=list(ACTIVATION_CHECKPOINTING), default="auto",
                   help="auto (default): only where a batch's activations would not fit in memory")
    # The step spec's other training levers, with its names and values (the worker's SDPO_ATTENTION,
    # SDPO_PARAM_DTYPE, SDPO_COMPILE, SDPO_GROUP_BY_LENGTH and SDPO_REFERENCE_BATCH_SIZE).
    r.add_argument("--attention", choices=list(ATTENTION), default="auto",
                   help="auto (default): the model's own (sdpa where transformers has it); sdpa; flex: FlexAttention "
                        "over the packed rows (CUDA and packing only)")
    r.add_argument("--param-dtype", choices=list(PARAM_DTYPES), default="auto",
                   help="auto (default): float32 weights, bf16 autocast on a GPU that has it; float32; bfloat16 (pure "
                        "bf16, small updates lost); bfloat16-master (bf16 weights, AdamW over float32 masters); "
                        "bfloat16-sr (bf16 weights, torchao's stochastic rounding: the perf extra)")
    r.add_argument("--compile", choices=list(COMPILE_MODES), default="off",
                   help="off (default): eager; layers: torch.compile of each decoder layer (same loss)")
    r.add_argument("--group-by-length", action="store_true",
                   help="batches of pairs of similar length (every pair once per epoch, same batch sizes, less "
                        "padding) instead of TRL's order")
    r.add_argument("--reference-batch-size", type=_reference_batch_size, metavar="N",
                   help=f"pairs per batch of the reference pass, 1..{MAX_REFERENCE_BATCH_SIZE} (no gradients: larger "
                        "fits; default: the engine's, max(batch size, 8)); same reference log-probs")
    r.add_argument("--quiet", action="store_true", help="print only the final table")

    s = sub.add_parser("step", help="run one step from a JSON spec (JSON lines on stdout)")
    s.add_argument("spec")

    # Internal (the worker's warm process): import everything, then read one order from stdin.
    sub.add_parser("warm", help=argparse.SUPPRESS)

    # The two scoring passes (curriculum.logps_under) take the same model, file and text flags.
    for name, help_text in (("score-sources", "each source's share of pairs the model already prefers (JSON)"),
                            ("score-pairs", "every pair's gamma under the model, for pair_easy_to_hard (JSON)")):
        sc = sub.add_parser(name, help=help_text)
        sc.add_argument("--model", required=True)
        sc.add_argument("--file", required=True)
        sc.add_argument("--max-length", type=int, default=512)
        sc.add_argument("--source-field", default="source")
        sc.add_argument("--device", default="auto", choices=list(DEVICES))
        sc.add_argument("--text-format", choices=list(TEXT_FORMATS), default="chat")
        sc.add_argument("--chat-template-file", help="a Jinja chat template to use instead of the model's own")

    v = sub.add_parser("validate", help="validate a preference file; prints the report as JSON")
    v.add_argument("file")
    v.add_argument("--source-field", default="source")
    v.add_argument("--tokenizer", help="model directory whose tokenizer counts tokens and checks the text "
                                      "(chat markup and special tokens, message lists without a chat template)")
    v.add_argument("--max-length", type=int, help="with --tokenizer: count the pairs a step would drop (no "
                                                 "training signal after truncation to this many tokens)")
    v.add_argument("--text-format", choices=list(TEXT_FORMATS), default="chat",
                   help="chat (default): message lists through the chat template, markup in text refused; "
                        "raw: strings already formatted, trained exactly as given")
    v.add_argument("--chat-template-file", help="a Jinja chat template to use instead of the tokenizer's")
    return p


HPARAM_FLAGS = ("beta", "learning_rate", "n_epochs", "batch_size", "gradient_accumulation_steps", "max_length",
                "loss_type", "loss_weights", "rpo_alpha", "label_smoothing", "ld_alpha", "discopop_tau",
                "warmup_ratio")


def _names_or_name(text: str) -> str | list[str]:
    """`sigmoid` -> "sigmoid"; `sigmoid,sft` -> ["sigmoid", "sft"] (StepConfig checks the names)."""
    return [name.strip() for name in text.split(",")] if "," in text else text


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def _reference_batch_size(text: str) -> int:
    """`--reference-batch-size`: a whole number in the spec's range (protocol.check_training_settings)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_REFERENCE_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_REFERENCE_BATCH_SIZE}, got {text!r}")
    return value


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def print_table(summary: dict, file: TextIO | None = None) -> None:
    """The per-step table a person reads: lineage and the numbers the method predicts (to `file`,
    default the current `sys.stdout`)."""
    # sys.stdout read at call time, not bound as a default at import: a replaced stdout (pytest's
    # capture, a redirect) closed since the import would otherwise be written to.
    file = file or sys.stdout
    print(f"{'step':>4}  {'reference -> output':<44} {'first_loss':>10} {'gamma_ref':>10} {'last_loss':>10} "
          f"{'rew_acc':>7} {'margin':>8} {'heldout_acc':>11}", file=file)
    for s in summary["steps"]:
        ref = s["reference"]["path"].rsplit("/", 1)[-1]
        out = s["output"]["path"].rsplit("/", 1)[-1]
        held = s.get("eval", {}).get("reward_accuracy")
        print(f"{s['index']:>4}  {ref + ' -> ' + out:<44} {_fmt(s['first_loss'])!s:>10} "
              f"{_fmt(s['mean_gamma_ref'], '.3f'):>10} {_fmt(s['last_loss']):>10} {_fmt(s['reward_accuracy'], '.3f'):>7} "
              f"{_fmt(s['reward_margin'], '.3f'):>8} {_fmt(held, '.3f'):>11}", file=file)
    print(f"final checkpoint: {summary['final_checkpoint']}", file=file)


def main_warm() -> int:
    """`python -m sdpo_engine warm`: a step process started before its step is known.

    It imports torch, transformers and TRL, then blocks on one line of stdin: a JSON order
    `{"argv": ["step", "SPEC.json"], "log": PATH}`. Its stderr then goes to PATH (appended) and it
    runs `argv` exactly as `python -m sdpo_engine ARGV` would. End of input (the worker went away or
    does not need it) exits 0. See worker/supervisor.py for who starts it and when it is used.
    """
    import os

    from .step import preload

    preload()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    order = json.loads(line)
    fd = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    argv = [str(a) for a in order["argv"]]
    if argv[:1] == ["warm"]:
        raise SystemExit("a warm process cannot be ordered to wait again")
    return main(argv)


def quiet_known_import_noise() -> None:
    """Drop two kinds of log lines that every engine process printed while importing transformers, and that
    read as failures in a step's log and in `sdpo up`'s terminal, though neither concerns the step:

    - transformers imports torchao when it is installed (the `perf` extra, for `bfloat16-sr`). On a
      CPU-only torch, torchao warns once per CUDA kernel library it cannot load (`Failed to load
      .../_C_mxfp8...so`). Its errors still show.
    - torch 2.13 logs a deprecation for each Enum that torchao registers with pytree.
    """
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    quiet_known_import_noise()
    args = _parser().parse_args(argv)
    if args.command == "warm":
        return main_warm()
    if args.command == "step":
        from .step import main_step

        return main_step(args.spec)

    if args.command == "validate":
        from .data import validate_file

        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            if args.chat_template_file:
                with open(args.chat_template_file, encoding="utf-8") as fh:
                    tokenizer.chat_template = fh.read()
        report = validate_file(args.file, source_field=args.source_field, tokenizer=tokenizer,
                               max_length=args.max_length)
        if tokenizer is not None and report["valid"]:
            # What a step on this model would refuse (markup, no template) or drop (no signal).
            from pathlib import Path

            from .tokens import check_file

            checked = check_file(args.file, tokenizer, text_format=args.text_format, max_length=args.max_length,
                                 source_field=args.source_field, model_name=Path(args.tokenizer).name)
            report["valid"] = checked["code"] is None
            report["code"] = checked["code"]
            report["errors"] = checked["errors"]
            report["error_count"] = checked["error_count"]
            report["stats"]["pairs_dropped"] = checked["pairs_dropped"]
            dropped = sum(v["count"] for v in (checked["pairs_dropped"] or {}).values())
            if report["valid"] and report["stats"]["rows"] and dropped == report["stats"]["rows"]:
                report["valid"], report["code"], report["error_count"] = False, "no_trainable_pairs", 1
                report["errors"] = [{"line": 0, "field": None, "reason": f"no pair has a training signal at "
                                     f"max_length={args.max_length}: every one would be dropped"}]
        print(json.dumps(report, indent=2))
        return 0 if report["valid"] else 1

    if args.command in ("score-sources", "score-pairs"):
        from .curriculum import score_pairs
        from .data import load_pairs
        from .sdpo import score_sources

        pairs = load_pairs(args.file, source_field=args.source_field)
        template = None
        if args.chat_template_file:
            with open(args.chat_template_file, encoding="utf-8") as fh:
                template = fh.read()
        score = score_sources if args.command == "score-sources" else score_pairs
        scores = score(args.model, pairs, max_length=args.max_length, device=args.device,
                       text_format=args.text_format, chat_template=template)
        print(json.dumps(scores))
        return 0

    if args.command == "tiny-model":
        from .tiny import build_tiny_model

        print(build_tiny_model(args.out_dir, seed=args.seed, overwrite=args.overwrite))
        return 0

    if args.command == "base-model":
        from pathlib import Path

        from .models import convert_gguf, resolve_base_model, smollm2_gguf_path
        from .tiny import build_tiny_model

        if args.model == "sdpo-tiny":
            print(build_tiny_model(args.out_dir))
        elif args.model == "smollm2-135m":
            print(convert_gguf(smollm2_gguf_path(), args.out_dir))
        elif args.model.endswith(".gguf"):
            print(convert_gguf(args.model, args.out_dir))
        else:
            print(resolve_base_model(args.model, Path(args.out_dir).parent))
        return 0

    # run
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .partition import PartitionError
    from .sdpo import run_sdpo
    from .step import EXIT_NON_FINITE, NonFiniteError

    if args.train_file and not (args.partition and args.steps):
        print("error: --train-file needs --partition and --steps", file=sys.stderr)
        return 2
    hyper = {k: getattr(args, k) for k in HPARAM_FLAGS if getattr(args, k) is not None}
    chat_template = None
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as fh:
            chat_template = fh.read()

    from .step import preload

    preload()  # once for all steps: among others, the import-time heap frozen (later collections skip it)

    def emit(event):
        if args.quiet:
            return
        if event.get("event") == "metrics":
            print(f"step {event['step']} [{event['global_step']}/{event.get('max_steps')}] "
                  f"loss={event.get('loss', float('nan')):.4f} acc={event.get('rewards/accuracies', 0):.2f} "
                  f"margin={event.get('rewards/margins', 0):.3f}", file=sys.stderr)
        elif event.get("event") == "info" and event.get("phase") in ("reference_logps", "eval", "source_scores",
                                                                          "pair_scores"):
            print(json.dumps(event), file=sys.stderr)
        elif event.get("event") == "warning":
            where = f"step {event['step']}: " if event.get("step") is not None else ""
            print(f"warning: {where}{event.get('code')}: {event.get('message')}", file=sys.stderr)

    try:
        summary = run_sdpo(
            args.model, args.out, step_files=args.step_files, train_file=args.train_file, strategy=args.partition,
            n_steps=args.steps, rescore=args.rescore, sizes=[int(x) for x in args.sizes.split(",")] if args.sizes else None,
            eval_file=args.eval_file, hyperparameters=hyper, seed=args.seed, source_field=args.source_field,
            lora={"r": args.lora_r, "alpha": 2 * args.lora_r} if args.lora_r else None, device=args.device,
            text_format=args.text_format, chat_template=chat_template, packing=args.packing,
            pad_to_multiple_of=args.pad_to_multiple_of, activation_checkpointing=args.activation_checkpointing,
            pack_tokens=args.pack_tokens, attention=args.attention, param_dtype=args.param_dtype,
            compile=args.compile, group_by_length=args.group_by_length,
            reference_batch_size=args.reference_batch_size, emit=emit)
    except (ConfigError, DataError, ModelError, PartitionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, DataError) and e.report:
            for err in e.report.get("errors", [])[:20]:
                print(f"  line {err['line']}: {err.get('field') or '-'}: {err['reason']}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: non_finite: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    print_table(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
