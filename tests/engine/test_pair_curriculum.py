"""The pair-level curriculum (partition ``pair_easy_to_hard``, sdpo_engine.curriculum): every pair
once, chunks ordered by gamma, and with ``rescore`` each later chunk ordered by M_{t-1} (by lineage)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from sdpo_engine.data import load_pairs
from sdpo_engine.partition import PartitionError, pair_order, partition
from sdpo_engine.sample_data import make_pairs, write_jsonl

HPARAMS = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 96, "beta": 0.1, "seed": 0}


def test_chunks_hold_every_pair_once_easiest_first():
    rng = random.Random(7)
    scores = [rng.uniform(-3, 3) for _ in range(23)] + [None, None]
    pairs = [{"prompt": f"p{k}"} for k in range(len(scores))]  # no source field at all
    chunks = partition(pairs, "pair_easy_to_hard", 4, seed=3, pair_scores=scores)
    assert sorted(i for c in chunks for i in c) == list(range(len(pairs)))
    assert [len(c) for c in chunks] == [7, 6, 6, 6]
    key = [float("-inf") if s is None else s for s in scores]
    for earlier, later in zip(chunks, chunks[1:], strict=False):
        assert min(key[i] for i in earlier) >= max(key[i] for i in later)
    assert set(chunks[-1]) >= {23, 24}  # no training signal: hardest


def test_pair_order_and_bad_scores():
    assert pair_order([0.5, 2.0, None, 2.0, -1.0], 5) == [1, 3, 0, 4, 2]
    with pytest.raises(PartitionError, match="pair_scores"):
        partition([{}] * 3, "pair_easy_to_hard", 2)
    with pytest.raises(PartitionError, match="2 entries"):
        partition([{}] * 3, "pair_easy_to_hard", 2, pair_scores=[1.0, 2.0])
    with pytest.raises(PartitionError, match="finite"):
        partition([{}] * 2, "pair_easy_to_hard", 2, pair_scores=[1.0, float("nan")])


@pytest.mark.slow
def test_run_with_rescore_orders_each_chunk_by_the_previous_checkpoint(tmp_path, tiny_model):
    """3 steps; step 1's chunk is ordered by the base, step t's (t > 1) by step t-1's checkpoint:
    its scores file names that checkpoint's sha256, and the scores are its gammas (recomputed here)."""
    from sdpo_engine.curriculum import score_pairs
    from sdpo_engine.manifest import checkpoint_identity
    from sdpo_engine.sdpo import run_sdpo

    rows = [{k: v for k, v in p.items() if k != "source"} for p in make_pairs(18, seed=5)]
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    out = tmp_path / "run"
    summary = run_sdpo(str(tiny_model), out, train_file=str(train), strategy="pair_easy_to_hard", n_steps=3,
                       rescore=True, hyperparameters=HPARAMS, device="cpu")
    pairs = load_pairs(train)
    chunks = [load_pairs(out / "data" / f"step-{k}.jsonl") for k in (1, 2, 3)]
    key = [json.dumps(p, sort_keys=True) for p in pairs]
    trained = sorted(json.dumps(p, sort_keys=True) for c in chunks for p in c)
    assert trained == sorted(key)  # every pair once

    base_id = checkpoint_identity(out / "base" if (out / "base").exists() else tiny_model)
    previous_sha = [base_id["sha256"]] + [summary["steps"][k]["output"]["sha256"] for k in (0, 1)]
    for k in (1, 2, 3):
        scored = json.loads((out / "data" / f"step-{k}.scores.json").read_text())
        assert scored["model"]["sha256"] == previous_sha[k - 1]
        assert summary["steps"][k - 1]["scored_with"]["sha256"] == previous_sha[k - 1]
        # the chunk is the easiest of what was left, by that model's gamma (a multiset: make_pairs repeats pairs)
        pool = [key[i] for i in scored["indices"]]
        easiest = [pool[j] for j in pair_order(scored["scores"], len(pool))][: len(chunks[k - 1])]
        assert Counter(easiest) == Counter(json.dumps(p, sort_keys=True) for p in chunks[k - 1])
    # The scores of step 3 are step 2's checkpoint's gammas, recomputed independently.
    scored3 = json.loads((out / "data" / "step-3.scores.json").read_text())
    again = score_pairs(out / "step-2", [pairs[i] for i in scored3["indices"]], max_length=96, device="cpu")
    assert again["scores"] == pytest.approx(scored3["scores"], abs=1e-5)
