"""Every change the engine makes to TRL's module globals, in one place, for the TRL version it was written for.

TRL's `DPOTrainer.__init__` (trl/trainer/dpo_trainer.py, `self._precompute_model_hash =
hash_module(...)`) hashes every weight of the model (a copy of each to CPU, then sha256) to name its
on-disk cache of the reference log-probs. The engine's single-process reference pass
(`SDPOTrainer._precompute_ref_logps` in step.py) keeps the log-probs in memory and never reads that
cache, so for the length of the trainer's construction the module's `hash_module` is swapped for one
that returns `NO_HASH`; any path that falls back to TRL's own pass computes the real hash first.

The swap depends on a private name of TRL's module, so `tests/engine/test_trl_patches.py` fails when
the installed TRL is not `TRL_VERSION` (pinned in pyproject.toml): check the swap still holds, then
move the pin. The subclass overrides of SDPOTrainer (step.py) are ordinary subclassing, not patches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NO_HASH", "TRL_VERSION", "reference_hash_skipped", "real_hash_module"]

TRL_VERSION = "1.16.0"  # the TRL these patches were written for and tested on
NO_HASH = "sdpo-engine: reference log-probs kept in memory, no TRL cache"


def _no_hash(module) -> str:
    return NO_HASH


@contextmanager
def reference_hash_skipped(skip: bool = True) -> Iterator[None]:
    """While inside, TRL's `dpo_trainer.hash_module` returns `NO_HASH` (when `skip`); restored on exit,
    exceptions included. Use around `DPOTrainer(...)` only in a single-process run."""
    import trl.trainer.dpo_trainer as dpo_module

    original = dpo_module.hash_module
    if skip:
        dpo_module.hash_module = _no_hash
    try:
        yield
    finally:
        dpo_module.hash_module = original


def real_hash_module(module) -> str:
    """TRL's own hash of `module`'s weights (what its reference log-prob cache is named by)."""
    import trl.trainer.dpo_trainer as dpo_module

    return dpo_module.hash_module(module)
