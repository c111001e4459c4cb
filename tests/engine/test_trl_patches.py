"""sdpo_engine/trl_patches.py: pinned to the TRL it was written for, and in effect only while a trainer is built."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from sdpo_engine.trl_patches import NO_HASH, TRL_VERSION, real_hash_module, reference_hash_skipped


def test_installed_trl_is_the_one_the_patches_were_written_for():
    assert version("trl") == TRL_VERSION, (
        f"TRL {version('trl')} is installed; sdpo_engine/trl_patches.py was written for {TRL_VERSION}. Check that "
        "trl.trainer.dpo_trainer still calls its module-level hash_module in DPOTrainer.__init__, then move the pin")


def test_the_patched_name_is_where_trl_reads_it():
    import inspect

    import trl.trainer.dpo_trainer as dpo_module

    assert callable(dpo_module.hash_module)
    # DPOTrainer.__init__ looks the name up in its module's globals: swapping the module attribute is enough.
    assert "hash_module(self.ref_model or self.model)" in inspect.getsource(dpo_module.DPOTrainer.__init__)


def test_swap_holds_only_inside_and_is_restored_after_an_error():
    import trl.trainer.dpo_trainer as dpo_module

    original = dpo_module.hash_module
    with reference_hash_skipped():
        assert dpo_module.hash_module(object()) == NO_HASH
    assert dpo_module.hash_module is original
    with pytest.raises(RuntimeError), reference_hash_skipped():
        raise RuntimeError("the trainer failed to build")
    assert dpo_module.hash_module is original
    with reference_hash_skipped(False):
        assert dpo_module.hash_module is original


def test_a_single_process_trainer_skips_the_weight_hash(tiny_model, tmp_path, monkeypatch):
    import trl.trainer.dpo_trainer as dpo_module

    from sdpo_engine.config import StepConfig
    from sdpo_engine.data import load_pairs
    from sdpo_engine.sample_data import make_pairs, write_jsonl
    from sdpo_engine.step import build_trainer, dpo_config, load_policy, to_trl_rows

    calls = []
    real = dpo_module.hash_module
    monkeypatch.setattr(dpo_module, "hash_module", lambda module: calls.append(module) or real(module))
    tok, model = load_policy(tiny_model, "cpu")
    pairs = load_pairs(write_jsonl(make_pairs(4, seed=3), tmp_path / "pairs.jsonl"))
    trainer = build_trainer(model, tok, to_trl_rows(pairs, tok),
                            dpo_config(StepConfig(batch_size=4, max_length=48), str(tmp_path / "work"), "cpu"))
    assert calls == [] and trainer._precompute_model_hash == NO_HASH
    assert "ref_chosen_logps" in trainer.train_dataset.column_names  # the in-memory reference pass ran
    assert real_hash_module(model) == real(model) != NO_HASH  # the real hash, where a fallback needs it
