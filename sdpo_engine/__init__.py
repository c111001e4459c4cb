"""sdpo_engine: stepwise DPO (sDPO) on TRL, as a library and a command.

Importing this package is cheap and torch-free: `data`, `config` and `partition` are pure Python
(the API uses them). Training entry points are loaded on first use, so `import sdpo_engine` in a
process that never trains never pays for torch.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["run_sdpo", "run_step", "build_tiny_model", "StepConfig", "validate_file", "load_pairs"]

_LAZY = {
    "run_sdpo": "sdpo_engine.sdpo",
    "run_step": "sdpo_engine.step",
    "build_tiny_model": "sdpo_engine.tiny",
    "StepConfig": "sdpo_engine.config",
    "validate_file": "sdpo_engine.data",
    "load_pairs": "sdpo_engine.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdpo_engine' has no attribute {name!r}")
