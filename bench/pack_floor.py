"""Tokens each layout computes per unique token of the data (the FLOP-floor ratio), padding included.

    python bench/pack_floor.py --model tiny19m --pairs 96 --batch-size 8 --max-length 128

For each data shape of bench/step_vs_trl.py, the pairs are dealt into batches of `--batch-size` in one
seeded random order (as a training epoch deals them), and for every batch the tokens of its tensors
are counted: TRL's two padded sequences per pair (2 x pairs x longest prompt+answer), the engine's
packed rows with one pair per row (`pack_tokens: 0`) and with several pairs per row (`--pack-tokens`,
default the engine's). Unique tokens: prompt + chosen + rejected after keep_start truncation. 1.00 is
the floor: every unique token through the model once. Columns `1/row g` and `multi g`: the same two
layouts with the step spec's `group_by_length: true`, the batches of the engine's length-grouped order
(sdpo_engine/batching.py, lengths `packing.packed_length`, seed 0, epoch 0) instead of the random one.
Tokenizes only; no model runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_vs_trl import make_shape, model_dir_for  # noqa: E402


def main() -> None:
    from transformers import AutoTokenizer

    from sdpo_engine import packing
    from sdpo_engine.batching import length_grouped_order
    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import to_trl_rows
    from sdpo_engine.tokens import chat_tokenize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny19m")
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--pack-tokens", type=int, default=packing.DEFAULT_PACK_TOKENS)
    p.add_argument("--cache", default=str(ROOT / ".sdpo" / "bench-models"))
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(model_dir_for(args.model, Path(args.cache)))
    ml, bs = args.max_length, args.batch_size
    print(f"{'shape':>10} {'TRL':>6} {'1/row':>6} {'multi':>6} {'1/row g':>8} {'multi g':>8}"
          "   (tokens computed / unique tokens)")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("short", "prompt3x", "multiturn", "skewed"):
            data = Path(tmp) / f"{shape}.jsonl"
            make_shape(data, shape, args.pairs, seed=0, tokenizer=tok, max_length=ml)
            examples = [chat_tokenize(tok, row) for row in to_trl_rows(load_pairs(data), tok)]
            lengths = [packing.truncated_lengths(e, ml) for e in examples]
            unique = sum(sum(x) for x in lengths)
            order = list(range(len(examples)))
            random.Random(0).shuffle(order)
            grouped = length_grouped_order([packing.packed_length(e, ml) for e in examples], bs, seed=0)

            def packed_tokens(order, row_tokens, examples=examples):
                return sum(packing.pack_examples([examples[j] for j in order[i:i + bs]], pad_token_id=0, max_length=ml,
                                                 row_tokens=row_tokens)["packed_input_ids"].numel()
                           for i in range(0, len(order), bs))

            trl = sum(2 * len(idx) * max(max(p + c, p + r) for p, c, r in (lengths[j] for j in idx))
                      for idx in (order[i:i + bs] for i in range(0, len(order), bs)))
            one, multi = packed_tokens(order, 0), packed_tokens(order, args.pack_tokens)
            one_g, multi_g = packed_tokens(grouped, 0), packed_tokens(grouped, args.pack_tokens)
            print(f"{shape:>10} {trl / unique:>6.2f} {one / unique:>6.2f} {multi / unique:>6.2f} "
                  f"{one_g / unique:>8.2f} {multi_g / unique:>8.2f}")


if __name__ == "__main__":
    main()
