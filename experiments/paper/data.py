"""Seeded synthetic preference data with two sources of clearly different difficulty.

- ``polite`` (easy, a formatting/politeness rule): "Greet Bexoru." -> a polite greeting that uses
  the name is chosen, a rude one is rejected. The answer templates vary, the rule does not: any
  polite template beats any rude one, for any name.
- ``larger`` (hard, a reasoning rule): "Which is larger, 37 or 52?" -> "52 is larger." is chosen,
  "37 is larger." rejected. Both answers copy a number from the prompt; only comparing the two
  numbers tells them apart.

Both rules generalise to prompts never seen in training, and the held-out split is made of such
prompts only: its names are drawn from a pool disjoint from the training names, and its number
pairs {a, b} never occur in the SFT or DPO training data.

Everything is deterministic for a seed (own `random.Random`, never the global one).
`python -m experiments.paper.data --seed 0 --out DIR` writes the files of one seed.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from sdpo_engine.sample_data import write_jsonl

SOURCES = ("polite", "larger")

SYLLABLES = ["ba", "be", "bo", "da", "di", "fa", "fe", "ga", "ka", "ki", "ko", "la", "li", "lo", "ma", "mi",
             "na", "ne", "no", "pa", "ra", "ri", "ro", "sa", "se", "ta", "ti", "to", "va", "zu"]
GREET_PROMPTS = ["Greet {n}.", "Say hello to {n}.", "Welcome {n}.", "{n} just arrived. Say something."]
POLITE = ["Hello {n}, nice to meet you!", "Hi {n}, welcome!", "Good morning {n}, how are you?",
          "Welcome {n}, please come in!"]
RUDE = ["Go away {n}.", "{n}, leave me alone.", "Not now {n}.", "Who cares, {n}."]
LARGER_PROMPTS = ["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                  "Pick the larger number: {a}, {b}."]
LARGER_ANSWERS = ["{x} is larger.", "The larger one is {x}.", "{x}."]


def all_names() -> list[str]:
    """Every two-syllable name, capitalised (900 names)."""
    return [(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES]


def polite_pair(rng: random.Random, name: str) -> dict:
    return {"prompt": rng.choice(GREET_PROMPTS).format(n=name),
            "chosen": rng.choice(POLITE).format(n=name),
            "rejected": rng.choice(RUDE).format(n=name),
            "source": "polite"}


def larger_pair(rng: random.Random, a: int, b: int) -> dict:
    """a != b; the prompt shows them in the given order, the chosen answer names the larger one."""
    template = rng.choice(LARGER_ANSWERS)
    return {"prompt": rng.choice(LARGER_PROMPTS).format(a=a, b=b),
            "chosen": template.format(x=max(a, b)),
            "rejected": template.format(x=min(a, b)),
            "source": "larger"}


def make_splits(seed: int, *, n_sft: int, n_train: int, n_heldout: int) -> dict[str, list[dict]]:
    """`n_*` pairs *per source* for the SFT warm start, DPO training and the held-out test.

    SFT rows are pairs too (the SFT pass uses only their chosen answer). The held-out names and
    number pairs are disjoint from the SFT and training ones.
    """
    rng = random.Random(seed)
    names = all_names()
    rng.shuffle(names)
    heldout_names, train_names = names[: len(names) // 4], names[len(names) // 4:]
    number_pairs = [(a, b) for a in range(10, 100) for b in range(a + 1, 100)]  # 4005 unordered pairs
    rng.shuffle(number_pairs)
    heldout_numbers = number_pairs[:n_heldout]
    train_numbers = number_pairs[n_heldout:]

    def larger_rows(pool, n):
        rows = []
        for i in range(n):
            a, b = pool[i % len(pool)]
            if rng.random() < 0.5:
                a, b = b, a
            rows.append(larger_pair(rng, a, b))
        return rows

    def polite_rows(pool, n):
        return [polite_pair(rng, rng.choice(pool)) for _ in range(n)]

    # Training and SFT number pairs are drawn from the same (non-held-out) pool, without reuse.
    rng.shuffle(train_numbers)
    splits = {
        "sft": _interleave(polite_rows(train_names, n_sft), larger_rows(train_numbers[:n_sft], n_sft)),
        "train": _interleave(polite_rows(train_names, n_train),
                             larger_rows(train_numbers[n_sft:n_sft + n_train], n_train)),
        "heldout": _interleave(polite_rows(heldout_names, n_heldout), larger_rows(heldout_numbers, n_heldout)),
    }
    return splits


def _interleave(a: list[dict], b: list[dict]) -> list[dict]:
    out = []
    for x, y in zip(a, b, strict=True):
        out += [x, y]
    return out


def write_splits(seed: int, out_dir: str | Path, **sizes) -> dict[str, Path]:
    splits = make_splits(seed, **sizes)
    return {name: write_jsonl(rows, Path(out_dir) / f"{name}.jsonl") for name, rows in splits.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--n-sft", type=int, default=150)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-heldout", type=int, default=200)
    a = p.parse_args(argv)
    for name, path in write_splits(a.seed, a.out, n_sft=a.n_sft, n_train=a.n_train, n_heldout=a.n_heldout).items():
        print(name, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
