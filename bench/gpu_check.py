"""GPU check of issue #6: plain TRL (a) against the engine's step (b) on a random ~0.5B model, bf16.

    python bench/gpu_check.py                  # on the GPU machine: 0.5B Qwen2, bf16, sdpa
    python bench/gpu_check.py --size tiny --pairs 16 --batch-size 4 --shapes 48:16   # CPU smoke run

Nothing can be downloaded there, so the model is a randomly initialised Qwen2 (hidden 1536, 20
layers, GQA 12/2 heads, MLP 4096, vocabulary 32k, tied embeddings: ~0.54B parameters) with the
project's offline byte-level tokenizer (sdpo_engine.tiny), and the pairs are random words cut to the token
lengths of each `--shapes` entry (by default prompts 384 / answers 128, the issue's 3:1 case, and
256 / 256, the equal-length case).
The GPU image has torch, transformers, accelerate and peft but not trl or datasets: install those
from wheels first (`pip install --no-deps trl-*.whl datasets-*.whl …`; bench/device_run.sh does it).
Issue #19's levers (bf16 weights, FlexAttention, compile, …) against TRL's fastest configuration are
bench/gpu_levers.py, on this script's model and pairs, run by `bash bench/device_run.sh`.

(a) is TRL's DPOTrainer as its docs show it (reference model in memory, TRL defaults but bf16 on the
GPU); (b) is `sdpo_engine.step.run_step` (reference log-probs once by the initial policy, the
shared-prompt packed sequences on the model's attention, sdpa by default on GPU). Each runs in its
own process; both see the same pairs, seed and hyperparameters and run one epoch.
Prints per variant: wall seconds, trainer.train() seconds, train tokens/s (TRL's num_tokens, which
counts the prompt twice per pair for both variants, so the two are the same work), model FLOPs
utilisation = 6 x parameters x tokens/s / the card's peak dense bf16 FLOP/s (H100/H200 989 TFLOP/s;
--peak-tflops for another card), peak GPU memory; then b/a ratios and the largest loss difference
(bf16: expect ~1e-2, not the 1e-4 of float32).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # also when imported from elsewhere (gpu_profile.py)

from common import run_child  # noqa: E402

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocabulary
    "0.5b": (1536, 20, 12, 2, 4096, 32000),
    "tiny": (64, 2, 4, 2, 128, 512),
    "19m": (512, 7, 8, 8, 1024, 512),  # tiny19m's width and depth (issue #21's CPU model), as a Qwen2
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def build_model(out: Path, size: str) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdpo_engine.tiny import build_tokenizer

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=max(vocab, len(tok)), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_pairs(path: Path, model_dir: Path, n: int, prompt_tokens: int, answer_tokens: int, seed: int) -> None:
    """Pairs of random words, cut to the asked number of tokens (at least; a word may straddle the cut)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        # Grow in chunks of words (one tokenizer call per chunk, not per word), then drop words from
        # the end while the text stays long enough: a 1024-pair file in seconds, not a minute.
        words: list[str] = []
        while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
            words += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                      for _ in range(16)]
        while len(words) > 1 and len(tok(" ".join(words[:-1]), add_special_tokens=False)["input_ids"]) >= tokens:
            words.pop()
        return " ".join(words)

    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": text(prompt_tokens), "chosen": text(answer_tokens),
                                 "rejected": text(answer_tokens)}) + "\n")


def child(args) -> None:
    # Both sides' libraries imported before the clock starts (TRL loads its trainer lazily).
    import torch
    from common import train_plain_trl
    from datasets import Dataset  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    from sdpo_engine.step import run_step

    hp = json.loads(args.hparams)
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    if args.child in ("engine", "engine_nopad"):
        events: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_step({"index": 1, "policy_init": args.model_dir, "train_file": args.data,
                                "output_dir": f"{tmp}/out", "work_dir": f"{tmp}/work", "hyperparameters": hp,
                                "device": "cuda" if cuda else "cpu",
                                # engine_nopad: no GPU length rounding, to measure what it buys
                                "pad_to_multiple_of": 0 if args.child == "engine_nopad" else None},
                               emit=events.append)
        wall = time.perf_counter() - t0
        # TRL's train() includes its reference forwards; the engine's run before train(): count the
        # forward pass (not the tokenisation before it, which TRL does in __init__ for (a) too).
        ref = next((e for e in events if e.get("phase") == "reference_logps"), {})
        ref_seconds = ref.get("forward_seconds") or ref.get("seconds", 0.0)
        train_seconds = summary["train_seconds"] + ref_seconds
        metrics = [e for e in events if e["event"] == "metrics"]
        losses = [e["loss"] for e in metrics]
        tokens = max((e.get("num_tokens") or 0) for e in metrics)
        memory = next((e for e in events if e.get("phase") == "memory"), {})
        packing = f"{ref.get('packing')}; reference pass {ref_seconds:.1f} s, train() {summary['train_seconds']:.1f} s; " \
                  f"activation checkpointing {memory.get('activation_checkpointing', memory)}"
    else:
        # plain: TRL's default gradient checkpointing (on); plain_nogc: off, as a user who knows the card has room
        plain = train_plain_trl(args.model_dir, args.data, hp, on_gpu=cuda,
                                gradient_checkpointing=None if args.child == "plain" else False)
        wall = time.perf_counter() - t0
        train_seconds, losses, tokens = plain["train_seconds"], plain["losses"], plain["tokens"]
        packing = None
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"variant": args.child, "wall": wall, "train_seconds": train_seconds, "tokens": tokens,
                      "peak_bytes": peak, "losses": losses, "packing": packing,
                      "device": torch.cuda.get_device_name() if cuda else "cpu"}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["plain", "plain_nogc", "engine", "engine_nopad"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hparams", help=argparse.SUPPRESS)
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shapes", default="384:128,256:256",
                   help="prompt:answer token lengths, comma-separated; one (a)/(b) comparison each "
                        "(default: the issue's 3:1 case and the equal-length case)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not an H100/H200/A100/L40S")
    p.add_argument("--nogc-shapes", type=int, default=1,
                   help="also run (a) with gradient checkpointing off on the first N shapes (TRL defaults it on)")
    p.add_argument("--variants", default="plain,plain_nogc",
                   help="the baselines to run beside the engine: plain (TRL defaults), plain_nogc, engine_nopad "
                   "(the engine with pad_to_multiple_of 0)")
    p.add_argument("--json-out", help="also write every figure to this JSON file")
    args = p.parse_args()
    if args.child:
        child(args)
        return

    variants = args.variants.split(",")
    shapes = [tuple(int(x) for x in shape.split(":")) for shape in args.shapes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="sdpo-gpu-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        n_params = build_model(model_dir, args.size)
        print(f"random Qwen2 {args.size}: {n_params / 1e6:.0f}M parameters; {args.pairs} pairs, batch "
              f"{args.batch_size}, 1 epoch", flush=True)
        for prompt_tokens, answer_tokens in shapes:
            data = tmp / f"pairs-{prompt_tokens}-{answer_tokens}.jsonl"
            make_pairs(data, model_dir, args.pairs, prompt_tokens, answer_tokens, seed=0)
            hp = {"beta": 0.1, "learning_rate": 1e-5, "n_epochs": 1, "batch_size": args.batch_size,
                  "max_length": prompt_tokens + answer_tokens + 8, "seed": 0, "warmup_ratio": 0.0}
            runs = {}
            if "plain" in variants:
                runs["plain"] = run_child(__file__, "plain", model_dir, data, hp)
            if "plain_nogc" in variants and len(results) < args.nogc_shapes:
                runs["plain_nogc"] = run_child(__file__, "plain_nogc", model_dir, data, hp)
            if "engine_nopad" in variants:  # the engine without GPU length rounding, to measure what it buys
                runs["engine_nopad"] = run_child(__file__, "engine_nopad", model_dir, data, hp)
            runs["engine"] = run_child(__file__, "engine", model_dir, data, hp)
            results.append(report(prompt_tokens, answer_tokens, runs, n_params, args.peak_tflops))
            if args.json_out:  # after every shape: a run cut short keeps what it measured
                Path(args.json_out).write_text(json.dumps(
                    {"size": args.size, "parameters": n_params, "pairs": args.pairs, "batch_size": args.batch_size,
                     "results": results}, indent=1))


def report(prompt_tokens: int, answer_tokens: int, runs: dict, n_params: int, peak: float | None) -> dict:
    b = runs["engine"]
    device = b["device"]
    peak_tflops = peak or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    print(f"\nprompt {prompt_tokens} / answers {answer_tokens} tokens; device: {device}; engine packing: "
          f"{b['packing']}")
    print(f"{'variant':22} {'wall s':>8} {'step s':>8} {'tok/s':>10} {'MFU':>6} {'peak GB':>8}")
    out = {"prompt_tokens": prompt_tokens, "answer_tokens": answer_tokens, "device": device,
           "packing": b["packing"], "ratios": {}}
    names = {"plain": "(a) TRL defaults (gc)", "plain_nogc": "(a') TRL, gc off", "engine_nopad": "(b') ours, no rounding",
             "engine": "(b) ours"}
    for key, r in runs.items():
        tps = r["tokens"] / r["train_seconds"]
        mfu = 6 * n_params * tps / (peak_tflops * 1e12) if peak_tflops else None
        out[key] = {"wall": r["wall"], "step_seconds": r["train_seconds"], "tokens_per_s": tps, "mfu": mfu,
                    "peak_bytes": r["peak_bytes"], "losses": r["losses"]}
        print(f"{names[key]:22} {r['wall']:8.1f} {r['train_seconds']:8.1f} {tps:10.0f} "
              f"{(f'{mfu:.1%}' if mfu is not None else '-'):>6} {r['peak_bytes'] / 1e9:8.2f}")
    for key in ("plain", "plain_nogc", "engine_nopad"):
        if key not in runs:
            continue
        a = runs[key]
        loss_diff = max((abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=False)), default=float("nan"))
        ratios = {"wall_a_over_b": a["wall"] / b["wall"],
                  "step_a_over_b": a["train_seconds"] / b["train_seconds"],
                  "tokens_per_s_b_over_a": out["engine"]["tokens_per_s"] / out[key]["tokens_per_s"],
                  "peak_memory_b_over_a": b["peak_bytes"] / a["peak_bytes"], "max_loss_diff": loss_diff}
        out["ratios"][key] = ratios
        print(f"{key:10} vs ours: wall a/b {ratios['wall_a_over_b']:.2f}, step a/b {ratios['step_a_over_b']:.2f}, "
              f"tok/s b/a {ratios['tokens_per_s_b_over_a']:.2f}, peak memory b/a {ratios['peak_memory_b_over_a']:.2f}, "
              f"max |loss a-b| {loss_diff:.1e} ({len(a['losses'])} / {len(b['losses'])} logged steps)", flush=True)
    return out


if __name__ == "__main__":
    main()
