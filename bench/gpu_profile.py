"""Where a training step's time goes on the GPU: packed against two-sequence, per micro-step.

    python bench/gpu_profile.py                      # on the GPU machine (the 0.5B model of gpu_check)
    python bench/gpu_profile.py --size tiny --pairs 16 --batch-size 4 --shape 48:16 --iters 2   # CPU smoke

The first GPU check (bench/gpu_check.py) found the engine's step no faster than TRL's on an H200
although the packed layout does about a third less work. This script times one batch through the
engine's own trainer in isolation, so the layouts can be compared without data loading, logging or
the optimizer in the way:

  fwd      the reference pass of one batch (no grad, bf16 autocast), as the engine's precompute runs it
  fwd+bwd  one training micro-step (`training_step`: loss and backward under the trainer's autocast)

for these variants of the same batch and weights:

  two_seq        TRL's layout (the spec's packing: false)
  packed         the engine's default: shared-prompt packing, compact LM head, sparse tied embedding
  packed_full    packing through the model's own forward and fused head (no compact head, no sparse trick)
  packed_float   packing with an additive bf16 mask instead of sdpa's bool mask
  packed_effattn packing with sdpa held to its memory-efficient kernel (the others let torch choose)

and, with --profile, the top CUDA kernels of two_seq and packed (torch.profiler).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="0.5b")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shape", default="384:128")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    import torch
    from gpu_check import build_model, make_pairs

    from sdpo_engine import packing
    from sdpo_engine.config import StepConfig
    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import build_trainer, dpo_config, load_policy, to_trl_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt_tokens, answer_tokens = (int(x) for x in args.shape.split(":"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    original_block_mask = packing.block_mask

    def float_mask(segments, impl, dtype):
        allowed = original_block_mask(segments, "sdpa", dtype)
        compute = torch.bfloat16 if device == "cuda" else torch.float32  # the autocast dtype of q/k/v
        zero = torch.zeros((), dtype=compute, device=segments.device)
        return torch.where(allowed, zero, torch.finfo(compute).min)

    with tempfile.TemporaryDirectory(prefix="sdpo-prof-") as tmp:
        tmp = Path(tmp)
        n_params = build_model(tmp / "model", args.size)
        make_pairs(tmp / "pairs.jsonl", tmp / "model", args.pairs, prompt_tokens, answer_tokens, seed=0)
        tok, model = load_policy(tmp / "model", device)
        rows = to_trl_rows(load_pairs(str(tmp / "pairs.jsonl")), tok)
        cfg = StepConfig(batch_size=args.batch_size, max_length=prompt_tokens + answer_tokens + 8)
        print(f"{device} {torch.cuda.get_device_name() if device == 'cuda' else ''}: {n_params / 1e6:.0f}M "
              f"parameters, batch {args.batch_size}, prompt {prompt_tokens} / answers {answer_tokens}; "
              f"sdpa backends: flash {torch.backends.cuda.flash_sdp_enabled()}, mem-efficient "
              f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, cudnn {torch.backends.cuda.cudnn_sdp_enabled()}",
              flush=True)
        results = {}
        for variant in ("two_seq", "packed", "packed_full", "packed_float", "packed_effattn"):
            trainer = build_trainer(model, tok, rows, dpo_config(cfg, str(tmp / variant), device),
                                    pack=variant != "two_seq")
            if variant == "packed_full":
                trainer._packed_forward = lambda m, outputs, t=trainer: packing.PackedForward(
                    m, outputs=outputs, compact=False, autocast=t.accelerator.autocast())
            packing.block_mask = float_mask if variant == "packed_float" else original_block_mask
            batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i]
                                                                   for i in range(args.batch_size)]))
            width = batch.get("packed_input_ids", batch["input_ids"]).shape
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1  # set by train(), which is not run here

            def fwd(trainer=trainer, batch=batch):
                with torch.no_grad():
                    trainer.compute_ref_log_probs(trainer.model, batch)

            def fwd_bwd(trainer=trainer, batch=batch):
                # train() has accelerate wrap the model's forward in bf16 autocast; not run here, so say it
                with trainer.accelerator.autocast():
                    trainer.training_step(trainer.model, batch)
                trainer.model.zero_grad(set_to_none=True)

            if variant == "packed_effattn" and device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
            else:
                backend = contextlib.nullcontext()
            timings = {}
            with backend:
                for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    for _ in range(2):
                        fn()
                    sync()
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        fn()
                    sync()
                    timings[name] = (time.perf_counter() - t0) / args.iters
                    timings[name + " peak GB"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
            results[variant] = timings
            print(f"{variant:13} tensor {tuple(width)}: fwd {timings['fwd'] * 1e3:7.1f} ms, fwd+bwd "
                  f"{timings['fwd+bwd'] * 1e3:7.1f} ms, peak {timings['fwd+bwd peak GB']:.1f} GB (packing: "
                  f"{trainer.packing})", flush=True)
            if args.profile and variant in ("two_seq", "packed") and device == "cuda":
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        fwd_bwd()
                    sync()
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
            del trainer, batch
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        packing.block_mask = original_block_mask
        base = results["two_seq"]
        for variant, t in results.items():
            print(f"{variant:13} two_seq/variant: fwd {base['fwd'] / t['fwd']:.2f}x, fwd+bwd "
                  f"{base['fwd+bwd'] / t['fwd+bwd']:.2f}x")


if __name__ == "__main__":
    main()
