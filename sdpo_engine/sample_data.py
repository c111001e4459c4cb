"""Seeded synthetic preference data with two sources of clearly different difficulty.

Used by the tiny-model builder (its tokenizer is trained on this vocabulary), the demo, the tests
and the experiments. Pure Python and deterministic for a seed.

- `greeting` (easy): the chosen answer greets politely with the name from the prompt, the rejected
  one is rude. One fixed template: a small model learns it in a few steps.
- `arithmetic` (hard): the chosen answer states the right sum, the rejected one a sum off by a
  small amount. Learning it means learning addition, which a tiny model mostly cannot.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jules", "Kai", "Lena",
         "Milo", "Nora", "Omar", "Pia", "Quin", "Rosa", "Sami", "Tara", "Uma", "Vik", "Wren", "Yara"]


def greeting_pair(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    return {
        "prompt": f"Greet {name}.",
        "chosen": f"Hello {name}, nice to meet you!",
        "rejected": f"Go away {name}.",
        "source": "greeting",
    }


def arithmetic_pair(rng: random.Random) -> dict:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    return {
        "prompt": f"What is {a} + {b}?",
        "chosen": f"{a} + {b} = {a + b}.",
        "rejected": f"{a} + {b} = {wrong}.",
        "source": "arithmetic",
    }


def make_pairs(n_per_source: int, seed: int = 0) -> list[dict]:
    """`n_per_source` pairs of each source, interleaved, deterministic for `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_source):
        rows.append(greeting_pair(rng))
        rows.append(arithmetic_pair(rng))
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the data's vocabulary plus plain English filler."""
    rng = random.Random(1234)
    lines = [json.dumps(make_pairs(1, seed=s)) for s in range(200)]
    lines += [" ".join(rng.choice(NAMES) for _ in range(8)) for _ in range(50)]
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "You are a helpful assistant. Answer the question briefly and politely.",
        "Thank you, please, hello, goodbye, yes, no, maybe, what, why, how, when, where, who.",
    ] * 20
    return lines
