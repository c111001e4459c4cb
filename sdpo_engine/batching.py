"""Length-grouped training batches: the step spec's `group_by_length` (issues #19, #21).

Off (the default), the trainer deals the pairs in TRL's order: accelerate's seeded random permutation
per epoch (`data_seed + epoch`). On, each epoch is still one permutation of the pairs (every pair
exactly once, the same micro-batch sizes, the same short last batch), but a micro-batch holds pairs
of similar packed length (`packing.packed_length`), so its rows carry little padding:

- the pairs are shuffled with `seed + epoch` and cut into megabatches of 50 micro-batches (the whole
  epoch when it has fewer), each sorted by length, longest first (transformers'
  `get_length_grouped_indices`, the scheme of its `LengthGroupedSampler`, which also moves the
  longest pair into the first micro-batch so that an out-of-memory shows at once). transformers cuts
  smaller data into 4 megabatches for randomness; on a chunk of 24 pairs in batches of 4 that leaves
  megabatches of one batch, nothing grouped. Here a small epoch is grouped as a whole: its batches
  hold about the same pairs every epoch (up to ties), their order changes;
- the micro-batches are cut from that order and, but for the first and a short last one, shuffled
  with the same generator, so the optimizer steps do not run from long to short within a megabatch.

transformers' own `LengthGroupedSampler` draws from torch's global generator and has no
`set_epoch`: its order would depend on everything that drew random numbers before the epoch, and a
resumed step would see another order. Here the order is a function of (lengths, batch size, seed,
epoch) alone, so every DDP/FSDP rank computes the same one (accelerate then gives rank r the
micro-batch slices r, r + N, ...; `batch_size` is the *global* micro-batch, so the ranks' slices
together are the one-process micro-batch whatever N) and a resumed epoch skips into the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["LengthGroupedOrder", "length_grouped_order"]


def length_grouped_order(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int = 0,
                         mega_batch_mult: int | None = None) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive slices of `batch_size` hold similar lengths.

    `lengths`: one number per pair (tokens of its packed row, `packing.packed_length`); `batch_size`:
    pairs per global micro-batch (the hyperparameters' batch_size); `seed`, `epoch`: the order is a
    function of these and of `lengths` only. `mega_batch_mult`: micro-batches per sorted megabatch
    (None: 50, or every micro-batch of a smaller epoch). Raises ValueError for a batch_size below 1.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(lengths)
    if n == 0:
        return []
    if mega_batch_mult is None:
        mega_batch_mult = min(50, max(1, n // batch_size))
    generator = torch.Generator().manual_seed(int(seed) + int(epoch))
    order = [int(i) for i in get_length_grouped_indices(list(lengths), batch_size, mega_batch_mult,
                                                        generator=generator)]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    full = len(batches) if len(batches[-1]) == batch_size else len(batches) - 1
    if full <= 2:
        return order
    # The first (holding the longest pair) stays first and a short last one stays last: the epoch's
    # micro-batch sizes are then exactly those of TRL's order.
    middle = batches[1:full]
    shuffled = [middle[k] for k in torch.randperm(len(middle), generator=generator).tolist()]
    return [i for batch in (batches[0], *shuffled, *batches[full:]) for i in batch]


class LengthGroupedOrder(Sampler[int]):
    """The training sampler of a step with `group_by_length`: `length_grouped_order` of the epoch set by
    `set_epoch` (the Trainer calls it before every epoch, also on resume). len() = number of pairs."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = [int(x) for x in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, seed=self.seed, epoch=self.epoch))
