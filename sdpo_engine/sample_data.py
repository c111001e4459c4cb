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


# More names for the demo's sample than NAMES (which the tiny tokenizer was trained on: changing it would
# change the tiny model): 60 greetings, each a different name, so no pair repeats and none held out is trained on.
SAMPLE_NAMES = NAMES + ["Alma", "Bo", "Cyd", "Dara", "Elio", "Faye", "Gil", "Hugo", "Iris", "Joel", "Kira", "Leo",
                        "Maya", "Nils", "Olga", "Paz", "Rafe", "Sven", "Theo", "Una", "Vera", "Wes", "Xena", "Yusuf",
                        "Zoe", "Arlo", "Bea", "Cruz", "Dina", "Emil", "Flor", "Gwen", "Hiro", "Ines", "Juno", "Lars"]
SAMPLE_TRAIN_PER_SOURCE, SAMPLE_HELDOUT_PER_SOURCE = 48, 12


def demo_sample(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The bundled sample (sdpo_engine/assets/sample_train.jsonl and sample_heldout.jsonl, what `sdpo demo`
    uploads): 48 training and 12 held-out pairs of each source, interleaved. Every pair differs from every
    other and no held-out prompt is a training prompt (a held-out figure measured on trained pairs would
    read memorisation as generalisation; the service warns of such a validation file)."""
    rng = random.Random(seed)
    total = SAMPLE_TRAIN_PER_SOURCE + SAMPLE_HELDOUT_PER_SOURCE
    names = rng.sample(SAMPLE_NAMES, total)
    sums = rng.sample([(a, b) for a in range(50) for b in range(50)], total)
    rows = []
    for name, (a, b) in zip(names, sums, strict=True):
        rows.append({"prompt": f"Greet {name}.", "chosen": f"Hello {name}, nice to meet you!",
                     "rejected": f"Go away {name}.", "source": "greeting"})
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                     "rejected": f"{a} + {b} = {wrong}.", "source": "arithmetic"})
    cut = 2 * SAMPLE_TRAIN_PER_SOURCE
    return rows[:cut], rows[cut:]


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
