"""GPU check of issue #6: plain TRL (a) against the engine's step (b) on a random ~0.5B model, bf16.

    python bench/gpu_check.py                        # on the GPU machine: 0.5B Qwen2, bf16, sdpa
    python bench/gpu_check.py --size tiny --pairs 8 --prompt-tokens 48 --answer-tokens 16   # CPU smoke run

Nothing can be downloaded there, so the model is a randomly initialised Qwen2 (hidden 1536, 20
layers, GQA 12/2 heads, MLP 4096, vocabulary 32k, tied embeddings: ~0.54B parameters) with the
project's offline byte-level tokenizer (sdpo_engine.tiny), and the pairs are generated with prompts
`--prompt-tokens` long and answers `--answer-tokens` long (3:1 by default, the issue's case).
The GPU image has torch, transformers, accelerate and peft but not trl or datasets: install those
from wheels first (`pip install --no-deps trl-*.whl datasets-*.whl …`).

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
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocabulary
    "0.5b": (1536, 20, 12, 2, 4096, 32000),
    "tiny": (64, 2, 4, 2, 128, 512),
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
    """Pairs of random words, grown until the tokenizer gives the asked lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))))
        return " ".join(words)

    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": text(prompt_tokens), "chosen": text(answer_tokens),
                                 "rejected": text(answer_tokens)}) + "\n")


def child(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import run_step, to_trl_rows

    hp = json.loads(args.hparams)
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    if args.child == "engine":
        events: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_step({"index": 1, "policy_init": args.model_dir, "train_file": args.data,
                                "output_dir": f"{tmp}/out", "work_dir": f"{tmp}/work", "hyperparameters": hp,
                                "device": "cuda" if cuda else "cpu"}, emit=events.append)
        wall = time.perf_counter() - t0
        train_seconds = summary["train_seconds"]
        metrics = [e for e in events if e["event"] == "metrics"]
        losses = [e["loss"] for e in metrics]
        tokens = max((e.get("num_tokens") or 0) for e in metrics)
        packing = next((e.get("packing") for e in events if e.get("phase") == "reference_logps"), None)
    else:
        set_seed(hp["seed"])
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        dtype = torch.float32  # the trainer's bf16 autocast does the mixed precision, as in TRL's docs
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
        ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = DPOConfig(output_dir=tmp, bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda,
                            report_to="none", logging_steps=1, save_strategy="no", beta=hp["beta"],
                            learning_rate=hp["learning_rate"], num_train_epochs=1,
                            per_device_train_batch_size=hp["batch_size"], max_length=hp["max_length"],
                            seed=hp["seed"], data_seed=hp["seed"], disable_tqdm=True)
            trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, processing_class=tok,
                                 train_dataset=Dataset.from_list(to_trl_rows(load_pairs(args.data), tok)))
            t_train = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - t_train
        wall = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        losses = [h["loss"] for h in logs]
        tokens = max(h.get("num_tokens", 0) for h in logs)
        packing = None
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"variant": args.child, "wall": wall, "train_seconds": train_seconds, "tokens": tokens,
                      "peak_bytes": peak, "losses": losses, "packing": packing,
                      "device": torch.cuda.get_device_name() if cuda else "cpu"}))


def run_child(variant: str, model_dir: Path, data: Path, hp: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model-dir", str(model_dir), "--data", str(data),
           "--hparams", json.dumps(hp)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["plain", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hparams", help=argparse.SUPPRESS)
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=384)
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not an H100/H200/A100/L40S")
    args = p.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="sdpo-gpu-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        n_params = build_model(model_dir, args.size)
        data = tmp / "pairs.jsonl"
        make_pairs(data, model_dir, args.pairs, args.prompt_tokens, args.answer_tokens, seed=0)
        hp = {"beta": 0.1, "learning_rate": 1e-5, "n_epochs": 1, "batch_size": args.batch_size,
              "max_length": args.prompt_tokens + args.answer_tokens + 8, "seed": 0, "warmup_ratio": 0.0}
        print(f"random Qwen2 {args.size}: {n_params / 1e6:.0f}M parameters; {args.pairs} pairs, prompt "
              f"{args.prompt_tokens} / answers {args.answer_tokens} tokens, batch {args.batch_size}, 1 epoch", flush=True)
        a = run_child("plain", model_dir, data, hp)
        b = run_child("engine", model_dir, data, hp)
    device = a["device"]
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    print(f"device: {device}; engine packing: {b['packing']}")
    print(f"{'variant':8} {'wall s':>8} {'train s':>8} {'tok/s':>10} {'MFU':>6} {'peak GB':>8}")
    for name, r in (("(a) TRL", a), ("(b) ours", b)):
        tps = r["tokens"] / r["train_seconds"]
        mfu = f"{6 * n_params * tps / (peak_tflops * 1e12):.1%}" if peak_tflops else "-"
        print(f"{name:8} {r['wall']:8.1f} {r['train_seconds']:8.1f} {tps:10.0f} {mfu:>6} {r['peak_bytes'] / 1e9:8.2f}")
    loss_diff = max((abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=False)), default=float("nan"))
    print(f"wall a/b {a['wall'] / b['wall']:.2f}, tok/s b/a {(b['tokens'] / b['train_seconds']) / (a['tokens'] / a['train_seconds']):.2f}, "
          f"peak memory b/a {b['peak_bytes'] / a['peak_bytes']:.2f}, max |loss a-b| {loss_diff:.1e} "
          f"({len(a['losses'])} / {len(b['losses'])} logged steps)")


if __name__ == "__main__":
    main()
