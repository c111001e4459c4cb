"""One DPO step: plain TRL as a user writes it (a), TRL tuned by hand (a'), and this engine's step (b).

    python bench/step_vs_trl.py --model tiny --epochs 1 2 --prompt-ratio 3 1
    python bench/step_vs_trl.py --model smollm2 --epochs 1 2 --pairs 16 --prompt-ratio 3 1
    python bench/step_vs_trl.py --model tiny --tuned --shapes short prompt3x multiturn skewed --repeats 3

(a) follows TRL's docs: the reference model loaded as a second model, DPOConfig defaults except
what a CPU needs (bf16=False) and logging every step (to compare the loss curves); TRL's default
gradient checkpointing stays on. With --tuned, (a') is TRL as a user who read its docs to the end
sets it up for this case: `precompute_ref_log_probs=True` (no second model) and gradient
checkpointing off, everything else as (a). (b) is `sdpo_engine.step.run_step` as the worker runs it: the
reference log-probs precomputed once by the initial policy, shared-prompt packing, and the
checkpoint saved and hashed (b's wall time includes that; a's has no save). Both sides import
everything before the clock starts; b's process also runs `sdpo_engine.step.preload()` first, as the
worker's warm step process does before its step arrives (transformers' conversion tables built, the
import-time heap frozen for the garbage collector): a user's own TRL script pays those two in its run.
Each variant runs in its own process (so peak RSS is its own) on the same data, seed and
hyperparameters, alternating a/b to spread machine noise; each ratio is the median over the
repeats of the ratio of an a run and the b run right after it. Prints ratios, never absolute
claims. Columns:
  wall a/b        whole step, model load to trained model (b: to the saved checkpoint)
  cpu a/b         the same span in CPU seconds (less sensitive to other load on the machine)
  tok/s b/a       train tokens per second of the training loop (TRL's num_tokens: both count the
                  same tokens, b's reference pass excluded)
  mem b/a         peak resident memory of the process
  |loss a-b|      largest difference between the two loss curves, step by step
  wall a'/b, mem b/a', |loss a'-b|   the same against (a') (with --tuned)
  floor a'/b      tokens each side's forward passes cover per unique token of the data (prompt +
                  answers after truncation, no padding): TRL runs the prompt twice, the engine once
                  plus one token per pair; padding comes on top of both
  run a'/b        tokens each side's forward passes did run per unique token and pass (reference pass +
                  each epoch), padding included: counted at the embedding in the timed runs, so the
                  FLOP-floor ratio as measured (1.00 = every unique token once per pass)
With --unpacked, (b2) is the engine with packing off (the spec's `packing: false`) (two sequences per pair, as TRL).
With --one-per-row, (b3) is the engine packing one pair per row (the spec's `pack_tokens: 0`, the layout
before issue #21's multi-pair rows): column `wall b3/b`. --pack-tokens N sets (b)'s `pack_tokens`
(default: the engine's, packing.DEFAULT_PACK_TOKENS). --group-by-length runs the engine's variants (b, b2,
b3) with the spec's `group_by_length: true` (micro-batches of pairs of similar length, sdpo_engine/batching.py):
the same pairs per epoch in another order, so `|loss a-b|` then compares two orders, not the same math.

Data shapes (--shapes; default: the prompt ratios of --prompt-ratio): `short` (prompt and answers of
about 10-20 tokens), `prompt3x` (prompts about 3x the answers), `multiturn` (three-turn prompts with
a system message), `skewed` (most pairs short, one in eight long: where padding dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # also when imported from elsewhere (gpu_profile.py)

from common import run_child  # noqa: E402

FILLER = ("The assistant reads the request carefully, keeps the answer short and polite, and "
          "checks any numbers before it replies. ")


def make_data(path: Path, n_pairs: int, prompt_ratio: float, seed: int) -> None:
    """Sample pairs whose prompts are about `prompt_ratio` times longer than the answers."""
    from sdpo_engine.sample_data import make_pairs, write_jsonl

    rows = make_pairs((n_pairs + 1) // 2, seed=seed)[:n_pairs]
    rng = random.Random(seed)
    for r in rows:
        answer_chars = (len(r["chosen"]) + len(r["rejected"])) / 2
        need = max(0, int(prompt_ratio * answer_chars) - len(r["prompt"]))
        context = (FILLER * (need // len(FILLER) + 1))[:need]
        r["prompt"] = (context + " " if context else "") + r["prompt"]
        rng.random()
    write_jsonl(rows, path)


def _long_prompt(prompt: str, answer: str, tokenizer, target_tokens: int) -> str:
    """`prompt` behind as many words of FILLER as bring prompt + `answer` to about `target_tokens` tokens
    of `tokenizer` (the chat template's few tokens on top)."""
    words = (FILLER * (4 * target_tokens // len(FILLER.split()) + 4)).split()

    def length(k: int) -> int:
        return len(tokenizer(" ".join(words[:k] + [prompt, answer]))["input_ids"])

    lo, hi = 0, len(words)  # the least k whose length reaches the target (length grows with k)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if length(mid) < target_tokens else (lo, mid)
    return " ".join(words[:lo] + [prompt])


def make_shape(path: Path, shape: str, n_pairs: int, seed: int, *, tokenizer=None,
               max_length: int | None = None) -> None:
    """Pairs of one of the data shapes of issue #21 (see the module docstring).

    `skewed` with `tokenizer` and `max_length`: its long pairs take 50-90 % of `max_length` in that
    tokenizer's tokens, so they are trained, not dropped, whatever the model. Without them the long
    prompts are FILLER x 3, which on a small vocabulary (the tiny models' 512 tokens: FILLER is 71 of
    them) is longer than a max_length of 128: TRL and the engine both drop such pairs (the prompt fills
    max_length), and the mix trained is not skewed at all."""
    from sdpo_engine.sample_data import make_pairs, write_jsonl

    if shape == "prompt3x":
        make_data(path, n_pairs, 3.0, seed)
        return
    rows = make_pairs((n_pairs + 1) // 2, seed=seed)[:n_pairs]
    rng = random.Random(seed)
    if shape == "multiturn":
        originals = [dict(r) for r in rows]
        for i, r in enumerate(rows):
            other = originals[(i + 1) % len(rows)]
            r["prompt"] = [{"role": "system", "content": "Answer briefly and politely."},
                           {"role": "user", "content": other["prompt"]},
                           {"role": "assistant", "content": other["chosen"]},
                           {"role": "user", "content": r["prompt"]}]
            r["chosen"] = [{"role": "assistant", "content": r["chosen"]}]
            r["rejected"] = [{"role": "assistant", "content": r["rejected"]}]
    elif shape == "skewed":
        for r in rows:
            if rng.random() < 0.125:
                if tokenizer is None or not max_length:
                    r["prompt"] = FILLER * 3 + r["prompt"]
                else:
                    answer = max(r["chosen"], r["rejected"], key=len)
                    r["prompt"] = _long_prompt(r["prompt"], answer, tokenizer, int(max_length * rng.uniform(0.5, 0.9)))
    elif shape != "short":
        raise SystemExit(f"unknown shape {shape}")
    write_jsonl(rows, path)


def floor_ratios(model_dir: str, data: Path, max_length: int) -> tuple[float, float, int]:
    """(TRL, engine) tokens computed per unique token, without padding (see the docstring), and the
    unique tokens of the pairs both train (a prompt that fills max_length drops its pair in both)."""
    from transformers import AutoTokenizer

    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import to_trl_rows
    from sdpo_engine.tokens import chat_tokenize

    tok = AutoTokenizer.from_pretrained(model_dir)
    trl = engine = unique = 0
    for row in to_trl_rows(load_pairs(data), tok):
        ids = chat_tokenize(tok, row)
        if len(ids["prompt_ids"]) >= max_length:
            continue
        p = len(ids["prompt_ids"])
        c, r = (min(len(ids[k]), max_length - p) for k in ("chosen_ids", "rejected_ids"))
        unique += p + c + r
        trl += 2 * p + c + r
        engine += p + 1 + c + r
    return trl / unique, engine / unique, unique


def count_forward_tokens() -> list[int]:
    """A one-item list that counts the token positions every forward pass of any model runs (the
    input_ids its input embedding looks up, padding included) from now on in this process."""
    import torch

    seen = [0]

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and args and isinstance(args[0], torch.Tensor) \
                and not args[0].is_floating_point():
            seen[0] += args[0].numel()

    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    return seen


def child(args) -> None:
    """Run one variant and print one JSON line of measurements."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Import everything first: both variants pay the same import cost, which is not the step's
    # (TRL loads its trainer lazily, so name it).
    from common import train_plain_trl
    from datasets import Dataset  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    from sdpo_engine.step import preload, run_step

    if args.child.startswith("engine"):
        # As the worker's warm step process (`python -m sdpo_engine warm`) before its step arrives:
        # the imports above, transformers' conversion tables, the import-time heap collected and frozen.
        preload()
    forward_tokens = count_forward_tokens()
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    hp = json.loads(args.hparams)
    reference_seconds = None
    if args.child in ("engine", "engine-unpacked", "engine-rows1"):
        events = []
        bench_tokens = os.environ.get("SDPO_BENCH_PACK_TOKENS")  # --pack-tokens, from the parent
        pack_tokens = 0 if args.child == "engine-rows1" else (int(bench_tokens) if bench_tokens else None)
        group_by_length = os.environ.get("SDPO_BENCH_GROUP_BY_LENGTH") == "1"  # --group-by-length
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_step({"index": 1, "policy_init": args.model_dir, "train_file": args.data,
                                "output_dir": f"{tmp}/out", "work_dir": f"{tmp}/work", "hyperparameters": hp,
                                "device": "cpu", "packing": args.child != "engine-unpacked",
                                "pack_tokens": pack_tokens, "group_by_length": group_by_length},
                               emit=events.append)
            wall = time.perf_counter() - t0
        losses = [e["loss"] for e in events if e["event"] == "metrics"]
        tokens = max((e.get("num_tokens") or 0) for e in events if e["event"] == "metrics")
        train_seconds = summary["train_seconds"]
        reference_seconds = next(e["seconds"] for e in events if e.get("phase") == "reference_logps")
    else:
        plain = train_plain_trl(args.model_dir, args.data, hp, tuned=args.child == "tuned")
        wall = time.perf_counter() - t0
        train_seconds, losses, tokens = plain["train_seconds"], plain["losses"], plain["tokens"]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    print(json.dumps({"variant": args.child, "wall": wall, "cpu": cpu, "train_seconds": train_seconds,
                      "reference_seconds": reference_seconds, "tokens": tokens, "peak_mb": r1.ru_maxrss / 1024,
                      "forward_tokens": forward_tokens[0],
                      "losses": losses}))


def model_dir_for(name: str, cache: Path) -> str:
    """tiny (160K parameters), tiny19m (the tiny model's architecture at hidden 512, 7 layers: the
    size issue #21 measured), smollm2 (135M, from its GGUF) or a model directory."""
    from sdpo_engine.models import resolve_base_model

    if name == "tiny19m":
        from sdpo_engine.tiny import build_tiny_model

        target = cache / "tiny-19m"
        if not (target / "config.json").is_file():
            build_tiny_model(target, hidden_size=512, num_layers=7, num_heads=8)
        return str(target)

    return str(resolve_base_model({"tiny": "sdpo-tiny", "smollm2": "smollm2-135m"}.get(name, name), cache))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["plain", "tuned", "engine", "engine-unpacked", "engine-rows1"],
                   help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hparams", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny", help="tiny, tiny19m, smollm2 or a model directory")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--prompt-ratio", type=float, nargs="+", default=[3.0], help="prompt length / answer length")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--repeats", type=int, default=1, help="a/b pairs per setting (alternated)")
    p.add_argument("--unpacked", action="store_true", help="also run b2: the engine without shared-prompt packing")
    p.add_argument("--one-per-row", action="store_true", help="also run b3: the engine packing one pair per row")
    p.add_argument("--pack-tokens", type=int, default=None, help="(b)'s pack_tokens (default: the engine's)")
    p.add_argument("--group-by-length", action="store_true",
                   help="the engine's variants with group_by_length: true (length-grouped micro-batches)")
    p.add_argument("--tuned", action="store_true", help="also run a': TRL tuned by hand (precompute, no checkpointing)")
    p.add_argument("--no-plain", action="store_true", help="skip (a), TRL's defaults (with --tuned)")
    p.add_argument("--shapes", nargs="+", choices=["short", "prompt3x", "multiturn", "skewed"],
                   help="data shapes instead of --prompt-ratio")
    p.add_argument("--cache", default=str(ROOT / ".sdpo" / "bench-models"))
    args = p.parse_args()
    if args.child:
        child(args)
        return

    model_dir = model_dir_for(args.model, Path(args.cache))
    grouped = {"SDPO_BENCH_GROUP_BY_LENGTH": "1"} if args.group_by_length else {}
    lr = args.learning_rate or (1e-3 if args.model.startswith("tiny") else 5e-6)
    print(f"model {args.model} ({model_dir}), {args.pairs} pairs, batch {args.batch_size}, "
          f"max_length {args.max_length}, lr {lr}, {args.repeats} repeat(s), median of paired ratios"
          + (", engine with group_by_length" if args.group_by_length else ""))
    header = (f"{'shape':>9} {'epochs':>6} {'wall a/b':>9} {'cpu a/b':>8} {'tok/s b/a':>10} {'mem b/a':>8} "
              f"{'|loss a-b|':>11} {'a wall s':>9} {'b wall s':>9} {'b ref s':>8} {'a MB':>6} {'b MB':>6}")
    if args.tuned:
        header += (f" {'wall a`/b':>10} {'cpu a`/b':>9} {'mem b/a`':>9} {'|loss a`-b|':>12} {'a` wall s':>10}"
                   f" {'floor a`':>8} {'floor b':>8} {'run a`':>7} {'run b':>6}")
    if args.unpacked:
        header += f" {'wall a/b2':>10} {'mem b2/a':>9}"
    if args.one_per_row:
        header += f" {'wall b3/b':>10} {'cpu b3/b':>9} {'mem b/b3':>9}"
    print(header)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # sizes the skewed mix's long pairs (make_shape)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes or args.prompt_ratio:
            data = Path(tmp) / f"pairs-{shape}.jsonl"
            if args.shapes:
                make_shape(data, shape, args.pairs, seed=0, tokenizer=tokenizer, max_length=args.max_length)
            else:
                make_data(data, args.pairs, shape, seed=0)
            floor = floor_ratios(model_dir, data, args.max_length) if args.tuned else None
            for epochs in args.epochs:
                hp = {"beta": 0.1, "learning_rate": lr, "n_epochs": epochs, "batch_size": args.batch_size,
                      "max_length": args.max_length, "warmup_ratio": 0.1, "seed": 0}
                runs = []
                for _ in range(args.repeats):
                    run = {}
                    if not args.no_plain:
                        run["a"] = run_child(__file__, "plain", model_dir, data, hp)
                    if args.tuned:
                        run["t"] = run_child(__file__, "tuned", model_dir, data, hp)
                    run["b"] = run_child(__file__, "engine", model_dir, data, hp, env={
                        **grouped, **({"SDPO_BENCH_PACK_TOKENS": str(args.pack_tokens)}
                                      if args.pack_tokens is not None else {})} or None)
                    if args.unpacked:
                        run["b2"] = run_child(__file__, "engine-unpacked", model_dir, data, hp, env=grouped or None)
                    if args.one_per_row:
                        run["b3"] = run_child(__file__, "engine-rows1", model_dir, data, hp, env=grouped or None)
                    runs.append(run)

                def med(f, runs=runs):
                    return statistics.median(f(r) for r in runs)

                def tps(x):
                    return x["tokens"] / x["train_seconds"]

                def run_ratio(x, unique, epochs):  # forward tokens per unique token and pass
                    return med(lambda one: one[x]["forward_tokens"] / (unique * (1 + epochs)))

                def loss_diff(x, runs=runs):
                    return max(max((abs(u - v) for u, v in zip(r[x]["losses"], r["b"]["losses"], strict=True)),
                                   default=float("nan")) for r in runs)

                if args.no_plain:
                    for r in runs:  # the (a) columns show a' then, and say so in the shape column
                        r["a"] = r["t"]
                diff = loss_diff("a")
                label = f"{shape}" if args.shapes else f"{shape:g}"
                line = (f"{label:>9} {epochs:>6} {med(lambda r: r['a']['wall'] / r['b']['wall']):>9.2f} "
                        f"{med(lambda r: r['a']['cpu'] / r['b']['cpu']):>8.2f} "
                        f"{med(lambda r: tps(r['b']) / tps(r['a'])):>10.2f} "
                        f"{med(lambda r: r['b']['peak_mb'] / r['a']['peak_mb']):>8.2f} {diff:>11.1e} "
                        f"{med(lambda r: r['a']['wall']):>9.1f} {med(lambda r: r['b']['wall']):>9.1f} "
                        f"{med(lambda r: r['b']['reference_seconds']):>8.1f} {med(lambda r: r['a']['peak_mb']):>6.0f} "
                        f"{med(lambda r: r['b']['peak_mb']):>6.0f}")
                if args.tuned:
                    line += (f" {med(lambda r: r['t']['wall'] / r['b']['wall']):>10.2f} "
                             f"{med(lambda r: r['t']['cpu'] / r['b']['cpu']):>9.2f} "
                             f"{med(lambda r: r['b']['peak_mb'] / r['t']['peak_mb']):>9.2f} {loss_diff('t'):>12.1e} "
                             f"{med(lambda r: r['t']['wall']):>10.1f} {floor[0]:>8.2f} {floor[1]:>8.2f}"
                             f" {run_ratio('t', floor[2], epochs):>7.2f} {run_ratio('b', floor[2], epochs):>6.2f}")
                if args.unpacked:
                    line += (f" {med(lambda r: r['a']['wall'] / r['b2']['wall']):>10.2f} "
                             f"{med(lambda r: r['b2']['peak_mb'] / r['a']['peak_mb']):>9.2f}")
                if args.one_per_row:
                    line += (f" {med(lambda r: r['b3']['wall'] / r['b']['wall']):>10.2f} "
                             f"{med(lambda r: r['b3']['cpu'] / r['b']['cpu']):>9.2f} "
                             f"{med(lambda r: r['b']['peak_mb'] / r['b3']['peak_mb']):>9.2f}")
                print(line, flush=True)


if __name__ == "__main__":
    main()
