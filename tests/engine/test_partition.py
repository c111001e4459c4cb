"""Tests for sdpo_engine.partition: coverage, determinism, stratification and curriculum order."""

from __future__ import annotations

import itertools
import random

import pytest

from sdpo_engine.partition import (
    STRATEGIES,
    PartitionError,
    describe,
    equal_sizes,
    partition,
    source_order,
)


def _pairs(counts: dict) -> list[dict]:
    """Pairs with the given rows per source (None for rows without one), sources interleaved."""
    pools = {source: n for source, n in counts.items()}
    pairs = []
    while any(pools.values()):
        for source in pools:
            if pools[source]:
                pools[source] -= 1
                pairs.append({"prompt": [], "chosen": [], "rejected": [], "source": source})
    return pairs


def _sources(pairs, chunk):
    return [pairs[i]["source"] for i in chunk]


def _assert_cover(chunks, n):
    flat = sorted(i for chunk in chunks for i in chunk)
    assert flat == list(range(n))
    assert all(chunks)


SCORES = {"easy": 0.9, "medium": 0.6, "hard": 0.2}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_pair_lands_in_exactly_one_chunk(strategy):
    pairs = _pairs({"easy": 7, "medium": 5, "hard": 9})
    chunks = partition(pairs, strategy, 3, seed=3, source_scores=SCORES,
                       pair_scores=[float(k % 5) for k in range(len(pairs))])
    assert len(chunks) == 3
    _assert_cover(chunks, len(pairs))


@pytest.mark.parametrize("strategy", ["random", "stratified"])
def test_same_seed_same_chunks_other_seed_other_chunks(strategy):
    pairs = _pairs({"a": 20, "b": 13, None: 4})
    first = partition(pairs, strategy, 4, seed=11)
    assert partition(pairs, strategy, 4, seed=11) == first
    assert partition(pairs, strategy, 4, seed=12) != first


def test_global_random_state_is_untouched():
    random.seed(5)
    state = random.getstate()
    partition(_pairs({"a": 10, "b": 10}), "stratified", 3, seed=1)
    partition(_pairs({"a": 10, "b": 10}), "random", 3, seed=1)
    assert random.getstate() == state


def test_equal_sizes_put_the_extra_rows_first():
    assert equal_sizes(10, 3) == [4, 3, 3]
    assert equal_sizes(9, 3) == [3, 3, 3]
    assert equal_sizes(5, 5) == [1, 1, 1, 1, 1]
    chunks = partition(_pairs({"a": 10}), "random", 3)
    assert [len(c) for c in chunks] == [4, 3, 3]


@pytest.mark.parametrize("strategy", ["random", "stratified"])
def test_given_sizes_are_honoured(strategy):
    pairs = _pairs({"a": 12, "b": 6})
    chunks = partition(pairs, strategy, 3, sizes=[2, 10, 6], seed=4)
    assert [len(c) for c in chunks] == [2, 10, 6]
    _assert_cover(chunks, len(pairs))


def test_stratified_keeps_every_sources_share_within_one_in_every_chunk():
    configs = 0
    for seed in range(300):
        rng = random.Random(seed)
        n_sources = rng.randint(1, 7)
        counts = {f"s{i}": rng.randint(1, 40) for i in range(n_sources)}
        if rng.random() < 0.3:
            counts[None] = rng.randint(1, 10)
        n = sum(counts.values())
        n_steps = rng.randint(1, min(n, 9))
        sizes = None
        if rng.random() < 0.5:
            # A random composition of n into n_steps positive parts.
            cuts = sorted(rng.sample(range(1, n), n_steps - 1))
            sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        pairs = _pairs(counts)
        rng.shuffle(pairs)
        chunks = partition(pairs, "stratified", n_steps, seed=seed, sizes=sizes)
        _assert_cover(chunks, n)
        expected_sizes = sizes or equal_sizes(n, n_steps)
        assert [len(c) for c in chunks] == expected_sizes
        for chunk in chunks:
            in_chunk = _sources(pairs, chunk)
            for source, count in counts.items():
                share_times_n = count * len(chunk)  # share = count * chunk size / n
                # |rows of source in chunk - share| < 1, in integers.
                assert abs(in_chunk.count(source) * n - share_times_n) < n, (seed, source, counts, sizes)
        configs += 1
    assert configs == 300


def test_stratified_without_sources_splits_evenly():
    chunks = partition(_pairs({None: 11}), "stratified", 4)
    assert [len(c) for c in chunks] == [3, 3, 3, 2]


def test_easy_to_hard_puts_one_source_per_step_easiest_first():
    pairs = _pairs({"hard": 5, "easy": 7, "medium": 4})
    chunks = partition(pairs, "easy_to_hard", 3, seed=1, source_scores=SCORES)
    assert [set(_sources(pairs, c)) for c in chunks] == [{"easy"}, {"medium"}, {"hard"}]
    assert [len(c) for c in chunks] == [7, 4, 5]
    reverse = partition(pairs, "hard_to_easy", 3, seed=1, source_scores=SCORES)
    assert [set(_sources(pairs, c)) for c in reverse] == [{"hard"}, {"medium"}, {"easy"}]
    # Rows within a chunk are shuffled, deterministically.
    assert chunks == partition(pairs, "easy_to_hard", 3, seed=1, source_scores=SCORES)
    assert sorted(chunks[0]) != chunks[0] or sorted(chunks[2]) != chunks[2]


def test_source_order_breaks_ties_by_name_and_reverses_exactly():
    scores = {"b": 0.5, "a": 0.5, "c": 0.9, "d": 0.1}
    assert source_order(scores, "easy_to_hard") == ["c", "a", "b", "d"]
    assert source_order(scores, "hard_to_easy") == ["d", "b", "a", "c"]
    with pytest.raises(PartitionError):
        source_order(scores, "random")
    with pytest.raises(PartitionError, match="finite"):
        source_order({"a": float("nan")}, "easy_to_hard")
    with pytest.raises(PartitionError, match="finite"):
        source_order({"a": True}, "easy_to_hard")


def _best_cost(weights, n_runs):
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), n_runs - 1):
        bounds = [0, *cuts, len(weights)]
        cost = sum(sum(weights[a:b]) ** 2 for a, b in itertools.pairwise(bounds))
        best = cost if best is None else min(best, cost)
    return best


def test_more_sources_than_steps_groups_consecutive_sources_evenly():
    for seed in range(40):
        rng = random.Random(seed)
        n_sources = rng.randint(2, 8)
        counts = {f"src{i}": rng.randint(1, 30) for i in range(n_sources)}
        scores = {name: rng.random() for name in counts}
        n_steps = rng.randint(1, n_sources)
        pairs = _pairs(counts)
        chunks = partition(pairs, "easy_to_hard", n_steps, seed=seed, source_scores=scores)
        _assert_cover(chunks, len(pairs))
        order = source_order(scores, "easy_to_hard")
        # Each chunk is a contiguous run of whole sources, in order.
        seen = []
        for chunk in chunks:
            run = sorted(set(_sources(pairs, chunk)), key=order.index)
            assert len(run) == sum(counts[s] > 0 for s in run)
            assert sum(counts[s] for s in run) == len(chunk)
            seen.extend(run)
        assert seen == order
        weights = [counts[name] for name in order]
        assert sum(len(c) ** 2 for c in chunks) == _best_cost(weights, n_steps)


def test_scores_of_absent_sources_are_ignored():
    pairs = _pairs({"easy": 3, "hard": 3})
    chunks = partition(pairs, "easy_to_hard", 2, source_scores={**SCORES, "unused": 1.0})
    assert [set(_sources(pairs, c)) for c in chunks] == [{"easy"}, {"hard"}]


@pytest.mark.parametrize(
    ("pairs", "strategy", "n_steps", "kwargs", "message"),
    [
        (_pairs({"a": 3}), "random", 0, {}, "at least 1"),
        (_pairs({"a": 3}), "random", 4, {}, "more than the number of pairs"),
        ([], "random", 1, {}, "more than the number of pairs"),
        (_pairs({"a": 3}), "random", True, {}, "must be an integer"),
        (_pairs({"a": 3}), "random", 1.5, {}, "must be an integer"),
        (_pairs({"a": 3}), "shuffled", 1, {}, "unknown partition strategy"),
        (_pairs({"a": 3}), "files", 1, {}, "one uploaded file per step"),
        (_pairs({"a": 6}), "random", 2, {"sizes": [3, 2]}, "sum to 5"),
        (_pairs({"a": 6}), "random", 2, {"sizes": [6, 0]}, "at least 1"),
        (_pairs({"a": 6}), "stratified", 2, {"sizes": [7, -1]}, "at least 1"),
        (_pairs({"a": 6}), "random", 2, {"sizes": [6]}, "1 entries but n_steps is 2"),
        (_pairs({"a": 6}), "random", 2, {"sizes": [3.0, 3]}, "integers"),
        (_pairs({"easy": 3, "hard": 3}), "easy_to_hard", 2, {}, "needs source_scores"),
        (
            _pairs({"easy": 3, "x": 3}),
            "easy_to_hard",
            2,
            {"source_scores": SCORES},
            "no score for source(s) 'x'",
        ),
        (
            _pairs({"easy": 3, None: 1}),
            "easy_to_hard",
            1,
            {"source_scores": SCORES},
            "1 pair(s) have no source",
        ),
        (
            _pairs({"easy": 3, "hard": 3}),
            "easy_to_hard",
            3,
            {"source_scores": SCORES},
            "2 source(s) for 3 steps",
        ),
        (
            _pairs({"easy": 3, "hard": 3}),
            "hard_to_easy",
            2,
            {"source_scores": SCORES, "sizes": [3, 3]},
            "sizes cannot be used",
        ),
    ],
)
def test_bad_arguments_raise_partition_error(pairs, strategy, n_steps, kwargs, message):
    with pytest.raises(PartitionError) as caught:
        partition(pairs, strategy, n_steps, **kwargs)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_describe_reports_rows_and_sources_per_chunk():
    pairs = _pairs({"easy": 2, "hard": 3, None: 1})
    chunks = partition(pairs, "stratified", 2, seed=0)
    described = describe(pairs, chunks)
    assert [d["step"] for d in described] == [1, 2]
    assert [d["rows"] for d in described] == [3, 3]
    assert sum(d["sources"].get("hard", 0) for d in described) == 3
    assert sum(d["without_source"] for d in described) == 1
    for d, chunk in zip(described, chunks, strict=True):
        assert sum(d["sources"].values()) + d["without_source"] == len(chunk)
