"""Split one set of preference pairs into the T chunks that sDPO trains on, one chunk per step.

Pure Python (stdlib only), so the worker can build and describe the chunks in-process without
loading torch. Every function is deterministic for a given seed: it uses its own
`random.Random(seed)`, never the global generator, so a job that is prepared twice (a redelivered
task) gets the same chunks.

Strategies:

- ``random``: shuffle, then cut into equal chunks (or the given `sizes`).
- ``stratified``: like random, but every chunk keeps the sources' mix: each source's row count in
  each chunk is within 1 of its proportional share.
- ``easy_to_hard``: the paper's curriculum. Sources are ordered from easiest (highest score, i.e.
  the share of the source's pairs that the initial model already prefers the chosen answer for) to
  hardest, and each chunk is a run of whole sources in that order.
- ``hard_to_easy``: the exact reverse order, as an ablation.
- ``pair_easy_to_hard``: a curriculum over *pairs*, not sources: every pair is scored by its gamma
  (log p(chosen) - log p(rejected) under the initial model, nats; higher = easier), pairs are
  sorted easiest first and cut into chunks of equal size (or the given `sizes`). Needs no source.

The ``files`` strategy (one uploaded file per step) needs no partitioning: the caller builds one
chunk per file, and `partition` refuses it.

Pairs are the normalised dicts of `sdpo_engine.data`; only their ``source`` key is read here.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

from .protocol import PARTITION_STRATEGIES

__all__ = [
    "STRATEGIES",
    "PartitionError",
    "describe",
    "equal_sizes",
    "pair_order",
    "partition",
    "source_order",
]

STRATEGIES = PARTITION_STRATEGIES
_CURRICULUM = ("easy_to_hard", "hard_to_easy")
_PAIR_CURRICULUM = "pair_easy_to_hard"


class PartitionError(ValueError):
    """The requested partition is impossible or its arguments are invalid."""


def partition(
    pairs: Sequence[dict[str, Any]],
    strategy: str,
    n_steps: int,
    *,
    seed: int = 0,
    sizes: Sequence[int] | None = None,
    source_scores: dict[str, float] | None = None,
    pair_scores: Sequence[float | None] | None = None,
) -> list[list[int]]:
    """Return `n_steps` chunks of indices into `pairs`; every index appears exactly once.

    No chunk is empty, and the rows within a chunk are shuffled with `seed`.

    - `sizes` (``random`` and ``stratified`` only) fixes each chunk's row count; they must be
      positive and sum to ``len(pairs)``. Without it the chunks are as equal as possible, the first
      ``len(pairs) % n_steps`` chunks one row larger (see `equal_sizes`).
    - ``stratified`` treats rows without a source as one more stratum, so a file without sources
      splits like ``random`` with equal sizes.
    - ``easy_to_hard`` / ``hard_to_easy`` need `source_scores` ({source: share of its pairs with
      gamma > 0 under the initial model}) for every source present; every row needs a source.
      With as many sources as steps, each step gets one source (the paper's setup). With more
      sources than steps, consecutive sources (in the order of `source_order`) are grouped so that
      the chunks' row counts are as even as possible (least sum of squares). Fewer sources than
      steps is an error: a source is never split across steps.
    - ``pair_easy_to_hard`` needs `pair_scores`, one gamma per pair (None: the pair has no training
      signal, it sorts last); chunk k holds the k-th run of `pair_order` (see `pair_order`).

    Raises `PartitionError` for any invalid argument or impossible request.
    """
    n_pairs = len(pairs)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise PartitionError(f"n_steps must be an integer, got {n_steps!r}")
    if n_steps < 1:
        raise PartitionError(f"n_steps must be at least 1, got {n_steps}")
    if n_steps > n_pairs:
        raise PartitionError(
            f"n_steps ({n_steps}) is more than the number of pairs ({n_pairs}); every step needs a pair"
        )
    if strategy == "files":
        raise PartitionError(
            "the files strategy uses one uploaded file per step; there is nothing to partition"
        )
    if strategy not in STRATEGIES:
        raise PartitionError(
            f"unknown partition strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    rng = random.Random(seed)

    if strategy in _CURRICULUM:
        if sizes is not None:
            raise PartitionError(f"sizes cannot be used with {strategy}: its chunks are whole sources")
        chunks = _by_source_order(pairs, strategy, n_steps, source_scores)
    else:
        chunk_sizes = (
            _check_sizes(sizes, n_steps, n_pairs) if sizes is not None else equal_sizes(n_pairs, n_steps)
        )
        if strategy in ("random", _PAIR_CURRICULUM):
            if strategy == _PAIR_CURRICULUM:
                order = pair_order(pair_scores, n_pairs)
            else:
                order = list(range(n_pairs))
                rng.shuffle(order)
            chunks = []
            start = 0
            for size in chunk_sizes:
                chunks.append(order[start : start + size])
                start += size
        else:
            chunks = _stratified(pairs, chunk_sizes, rng)

    for chunk in chunks:
        rng.shuffle(chunk)
    return chunks


def equal_sizes(n_pairs: int, n_steps: int) -> list[int]:
    """Chunk sizes as equal as possible: they differ by at most 1, the larger ones first."""
    if n_steps < 1:
        raise PartitionError(f"n_steps must be at least 1, got {n_steps}")
    base, extra = divmod(n_pairs, n_steps)
    return [base + 1 if i < extra else base for i in range(n_steps)]


def source_order(source_scores: dict[str, float], strategy: str) -> list[str]:
    """The order in which a curriculum strategy puts the sources, for callers to report.

    ``easy_to_hard``: score descending (the source the initial model already gets right most often
    first), ties broken by source name ascending. ``hard_to_easy``: exactly the reverse list.
    """
    if strategy not in _CURRICULUM:
        raise PartitionError(f"source_order applies to {' and '.join(_CURRICULUM)}, not {strategy!r}")
    if not source_scores:
        raise PartitionError(f"{strategy} needs source_scores: {{source: share of pairs with gamma > 0}}")
    for name, score in source_scores.items():
        if not isinstance(name, str):
            raise PartitionError(f"source names must be strings, got {name!r}")
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise PartitionError(f"the score of source {name!r} must be a finite number, got {score!r}")
    order = sorted(source_scores, key=lambda name: (-source_scores[name], name))
    if strategy == "hard_to_easy":
        order.reverse()
    return order


def pair_order(pair_scores: Sequence[float | None] | None, n_pairs: int) -> list[int]:
    """Indices of the pairs easiest first: gamma descending, a pair without a score (None: no
    training signal at the step's max_length) last, ties by index ascending.

    Raises `PartitionError` unless there is exactly one finite number (or None) per pair.
    """
    if pair_scores is None:
        raise PartitionError(f"{_PAIR_CURRICULUM} needs pair_scores: one gamma per pair")
    scores = list(pair_scores)
    if len(scores) != n_pairs:
        raise PartitionError(f"pair_scores has {len(scores)} entries but there are {n_pairs} pairs")
    for k, score in enumerate(scores):
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)
                                  or not math.isfinite(score)):
            raise PartitionError(f"the score of pair {k} must be a finite number or null, got {score!r}")
    return sorted(range(n_pairs), key=lambda k: (scores[k] is None, -(scores[k] or 0.0), k))


def describe(
    pairs: Sequence[dict[str, Any]], chunks: Sequence[Sequence[int]], source_field: str = "source"
) -> list[dict[str, Any]]:
    """Per-chunk statistics to store beside the chunks: ``step`` (1-based), ``rows``, ``sources``
    ({source: rows}, sorted by name) and ``without_source``."""
    described = []
    for step, chunk in enumerate(chunks, start=1):
        sources: dict[str, int] = {}
        without = 0
        for index in chunk:
            source = pairs[index].get(source_field)
            if source is None:
                without += 1
            else:
                sources[source] = sources.get(source, 0) + 1
        described.append(
            {
                "step": step,
                "rows": len(chunk),
                "sources": dict(sorted(sources.items())),
                "without_source": without,
            }
        )
    return described


# --------------------------------------------------------------------------------------------------


def _check_sizes(sizes: Sequence[int], n_steps: int, n_pairs: int) -> list[int]:
    sizes = list(sizes)
    if len(sizes) != n_steps:
        raise PartitionError(f"sizes has {len(sizes)} entries but n_steps is {n_steps}")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int):
            raise PartitionError(f"sizes must be integers, got {size!r}")
        if size < 1:
            raise PartitionError(f"every size must be at least 1, got {size}")
    if sum(sizes) != n_pairs:
        raise PartitionError(f"sizes sum to {sum(sizes)} but there are {n_pairs} pairs")
    return sizes


def _groups(pairs: Sequence[dict[str, Any]]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(pair.get("source"), []).append(index)
    return groups


def _stratified(pairs: Sequence[dict[str, Any]], sizes: list[int], rng: random.Random) -> list[list[int]]:
    """Deal each source's rows so that its count in chunk k is floor or ceil of its exact share.

    The exact share of source s in chunk k is c_s * z_k / N (c_s rows of s, z_k rows in chunk k,
    N rows in all). Rounding every share down leaves, per source and per chunk, a whole number of
    rows to place; these are placed one per (source, chunk) cell whose share has a fractional
    part. Such a placement always exists (the fractional parts themselves are a feasible
    fractional flow, so an integral one exists); a greedy pass places nearly all and augmenting
    paths place the rest. Rounding per chunk independently (largest remainder) would not keep
    every source's total, and correcting afterwards can break the within-1 bound.
    """
    n_pairs = sum(sizes)
    groups = _groups(pairs)
    names = sorted(groups, key=lambda name: (name is None, name or ""))
    n_chunks = len(sizes)
    counts = []  # counts[s][k]
    remainders = []  # numerators of the fractional parts, over n_pairs
    row_need = []
    for name in names:
        c = len(groups[name])
        row = []
        rem = []
        for z in sizes:
            q, r = divmod(c * z, n_pairs)
            row.append(q)
            rem.append(r)
        counts.append(row)
        remainders.append(rem)
        row_need.append(c - sum(row))
    col_need = [sizes[k] - sum(counts[s][k] for s in range(len(names))) for k in range(n_chunks)]
    extra = [[False] * n_chunks for _ in names]  # the cells that got the rounded-up row

    # Greedy: each source takes its largest fractional parts first, in a seeded source order so
    # no source is systematically favoured.
    source_indices = list(range(len(names)))
    rng.shuffle(source_indices)
    for s in source_indices:
        # largest remainder first; reverse=True keeps equal ones in chunk order (the sort is stable)
        for k in sorted(range(n_chunks), key=remainders[s].__getitem__, reverse=True):
            if row_need[s] == 0:
                break
            if remainders[s][k] and col_need[k] > 0:
                extra[s][k] = True
                row_need[s] -= 1
                col_need[k] -= 1

    # Augmenting paths for what greedy left: source s -> chunk k (an unused fractional cell) ->
    # source s' that holds an extra in k (give it up) -> another chunk ... -> a chunk with room.
    while any(row_need):
        path = _augmenting_path(row_need, col_need, remainders, extra)
        if path is None:  # pragma: no cover - impossible by the flow argument above
            raise AssertionError("stratified rounding found no augmenting path")
        s0 = path[0][0]
        for s, k, add in path:
            extra[s][k] = add
        row_need[s0] -= 1
        col_need[path[-1][1]] -= 1

    chunks: list[list[int]] = [[] for _ in sizes]
    for s, name in enumerate(names):
        rows = list(groups[name])
        rng.shuffle(rows)
        start = 0
        for k in range(n_chunks):
            take = counts[s][k] + (1 if extra[s][k] else 0)
            chunks[k].extend(rows[start : start + take])
            start += take
        assert start == len(rows)
    return chunks


def _augmenting_path(
    row_need: list[int], col_need: list[int], remainders: list[list[int]], extra: list[list[bool]]
) -> list[tuple[int, int, bool]] | None:
    """BFS for one augmenting path; returns the cell changes [(s, k, new value)] or None."""
    n_chunks = len(col_need)
    parent_of_chunk: dict[int, int] = {}  # chunk -> the source it was reached from
    parent_of_source: dict[int, int] = {}  # source -> the chunk it was reached from
    queue = deque(s for s, need in enumerate(row_need) if need > 0)
    seen_sources = set(queue)
    while queue:
        s = queue.popleft()
        for k in range(n_chunks):
            if k in parent_of_chunk or not remainders[s][k] or extra[s][k]:
                continue
            parent_of_chunk[k] = s
            if col_need[k] > 0:
                changes = []
                while True:
                    source = parent_of_chunk[k]
                    changes.append((source, k, True))
                    if source not in parent_of_source:
                        return list(reversed(changes))
                    k = parent_of_source[source]
                    changes.append((source, k, False))
            for s2 in range(len(row_need)):
                if extra[s2][k] and s2 not in seen_sources:
                    seen_sources.add(s2)
                    parent_of_source[s2] = k
                    queue.append(s2)
    return None


def _by_source_order(
    pairs: Sequence[dict[str, Any]], strategy: str, n_steps: int, source_scores: dict[str, float] | None
) -> list[list[int]]:
    groups = _groups(pairs)
    if None in groups:
        raise PartitionError(
            f"{len(groups[None])} pair(s) have no source; {strategy} orders the chunks by source, so every pair needs one"
        )
    if not source_scores:
        raise PartitionError(f"{strategy} needs source_scores: {{source: share of pairs with gamma > 0}}")
    missing = sorted(name for name in groups if name is not None and name not in source_scores)
    if missing:
        shown = ", ".join(repr(name) for name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise PartitionError(f"source_scores has no score for source(s) {shown}{more}")
    # Scores of sources absent from these pairs are ignored: they may come from a wider scoring run.
    order = [name for name in source_order(source_scores, strategy) if name in groups]
    if len(order) < n_steps:
        raise PartitionError(
            f"{strategy} puts whole sources in each step, but there are {len(order)} source(s) for "
            f"{n_steps} steps; use fewer steps or another strategy"
        )
    weights = [len(groups[name]) for name in order]
    chunks = []
    for start, end in _even_runs(weights, n_steps):
        chunk: list[int] = []
        for name in order[start:end]:
            chunk.extend(groups[name])
        chunks.append(chunk)
    return chunks


def _even_runs(weights: list[int], n_runs: int) -> list[tuple[int, int]]:
    """Cut `weights` into `n_runs` non-empty contiguous runs with the least sum of squared run
    totals (the most even split by rows). Dynamic programming, O(n_runs * len(weights)^2)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = math.inf
    # best[t][i]: least cost of cutting the first i weights into t runs; cut[t][i]: where run t starts.
    best = [[inf] * (n + 1) for _ in range(n_runs + 1)]
    cut = [[0] * (n + 1) for _ in range(n_runs + 1)]
    best[0][0] = 0
    for t in range(1, n_runs + 1):
        # Leave at least one weight for each later run.
        for i in range(t, n - (n_runs - t) + 1):
            for j in range(t - 1, i):
                if best[t - 1][j] == inf:
                    continue
                total = prefix[i] - prefix[j]
                cost = best[t - 1][j] + total * total
                if cost < best[t][i]:
                    best[t][i] = cost
                    cut[t][i] = j
    runs = []
    i = n
    for t in range(n_runs, 0, -1):
        j = cut[t][i]
        runs.append((j, i))
        i = j
    runs.reverse()
    return runs
