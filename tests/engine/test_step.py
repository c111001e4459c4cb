"""One sDPO step on TRL: the invariants the method fixes, and equality with plain TRL DPO."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdpo_engine.config import StepConfig
from sdpo_engine.data import load_pairs
from sdpo_engine.manifest import file_hashes, read_manifest, verify_checkpoint
from sdpo_engine.sdpo import run_sdpo
from sdpo_engine.step import (
    build_trainer,
    dpo_config,
    gammas,
    load_policy,
    own_weights,
    pair_logps,
    run_step,
    to_trl_rows,
)

# Same values as tests/engine/conftest.py's TINY_HPARAMS (conftest modules are not importable).
TINY_HPARAMS = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 96, "beta": 0.1, "seed": 0}


LN2 = math.log(2)


def _spec(tmp_path, policy, train_file, index=1, **extra):
    return {"index": index, "policy_init": str(policy), "train_file": str(train_file),
            "output_dir": str(tmp_path / f"out-{index}"), "work_dir": str(tmp_path / f"work-{index}"),
            "hyperparameters": dict(TINY_HPARAMS), "device": "cpu", **extra}


def test_first_loss_is_ln2_with_zero_rewards_and_output_is_atomic_with_manifest(tmp_path, tiny_model, chunk_files):
    events = []
    summary = run_step(_spec(tmp_path, tiny_model, chunk_files[0]), emit=events.append)
    metrics = [e for e in events if e["event"] == "metrics"]
    assert metrics, "no metrics lines emitted"
    first = metrics[0]
    assert abs(first["loss"] - LN2) < 1e-4
    # Policy = reference at the first step, so the rewards are 0 up to float32 rounding: with several pairs
    # per packed row (the default) a pair shares its row with different neighbours in the reference pass
    # (length-sorted batches) than in training, which changes the summation order (seen: 9.5e-08).
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert abs(summary["first_loss"] - LN2) < 1e-4
    assert summary["last_loss"] < LN2, "the step did not learn anything"
    for m in metrics:
        assert {"step", "global_step", "loss"} <= set(m)
    out = tmp_path / "out-1"
    manifest = read_manifest(out)
    assert manifest["step"] == 1
    assert manifest["config"]["beta"] == TINY_HPARAMS["beta"]
    assert manifest["reference"]["path"] == str(tiny_model)
    assert len(manifest["data_sha256"]) == 64
    assert "model.safetensors" in manifest["files"]
    assert verify_checkpoint(out) == []
    # nothing but the final directory is left beside it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out-1")) == []


def test_one_step_equals_plain_trl_dpo_with_reference_in_memory(tmp_path, tiny_model, chunk_files):
    """T = 1 is plain DPO: same losses (1e-5) and final weights (1e-4) as TRL with a second model."""
    events = []
    run_step(_spec(tmp_path, tiny_model, chunk_files[0]), emit=events.append)
    our_losses = [e["loss"] for e in events if e["event"] == "metrics"]

    # Plain TRL as a user writes it: reference model loaded in memory, no precompute.
    from transformers import AutoModelForCausalLM, set_seed

    cfg = StepConfig.from_dict(TINY_HPARAMS)
    set_seed(cfg.seed)
    tokenizer, policy = load_policy(tiny_model, "cpu")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32")
    args = dpo_config(cfg, str(tmp_path / "plain"), "cpu", precompute_ref_log_probs=False)
    from datasets import Dataset
    from trl import DPOTrainer

    plain = DPOTrainer(model=policy, ref_model=ref, args=args,
                       train_dataset=Dataset.from_list(to_trl_rows(load_pairs(chunk_files[0]), tokenizer)),
                       processing_class=tokenizer)
    plain.train()
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]

    assert len(our_losses) == len(plain_losses) > 3
    assert max(abs(a - b) for a, b in zip(our_losses, plain_losses, strict=True)) < 1e-5

    ours_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out-1", dtype="float32")
    worst = max((a - b).abs().max().item() for a, b in
                zip(ours_model.state_dict().values(), plain.model.state_dict().values(), strict=True))
    assert worst < 1e-4


def test_step_two_reference_is_step_one_output(tmp_path, tiny_model, chunk_files):
    c1, c2, ev = chunk_files
    base_hashes = file_hashes(tiny_model)
    summary = run_sdpo(str(tiny_model), tmp_path / "run", step_files=[str(c1), str(c2)], eval_file=str(ev),
                       hyperparameters=TINY_HPARAMS, device="cpu")
    s1, s2 = summary["steps"]
    step1 = tmp_path / "run" / "step-1"
    assert s2["reference"]["path"] == str(step1)
    assert s2["reference"]["sha256"] == s1["output"]["sha256"]
    assert s1["reference"]["path"] == str(tiny_model)

    # mean gamma_ref of step 2 is gamma under the step-1 checkpoint on that chunk, not under the base
    pairs2 = load_pairs(tmp_path / "run" / "data" / "step-2.jsonl")
    tok1, m1 = load_policy(step1, "cpu")
    g1 = gammas(*pair_logps(m1, tok1, pairs2, max_length=TINY_HPARAMS["max_length"]))
    tok0, m0 = load_policy(tiny_model, "cpu")
    g0 = gammas(*pair_logps(m0, tok0, pairs2, max_length=TINY_HPARAMS["max_length"]))
    assert abs(s2["mean_gamma_ref"] - sum(g1) / len(g1)) < 1e-4
    assert abs(s2["mean_gamma_ref"] - sum(g0) / len(g0)) > 1e-2

    # the reference's files are unchanged; the policy's parameters changed
    assert verify_checkpoint(step1) == []
    assert file_hashes(tiny_model) == base_hashes
    _, m2 = load_policy(tmp_path / "run" / "step-2", "cpu")
    changed = any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(),
                                                           strict=True))
    assert changed
    for s in (s1, s2):
        assert abs(s["first_loss"] - LN2) < 1e-4
        assert 0 <= s["eval"]["reward_accuracy"] <= 1
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["index"] for s in written["steps"]] == [1, 2]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["step"] for line in lines} == {1, 2}


def test_lora_step_two_reference_differs_from_base(tmp_path, tiny_model, chunk_files):
    c1, c2, _ = chunk_files
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    hp = {**TINY_HPARAMS, "learning_rate": 5e-3}
    summary = run_sdpo(str(tiny_model), tmp_path / "run", step_files=[str(c1), str(c2)], hyperparameters=hp,
                       lora=lora, device="cpu")
    s1, s2 = summary["steps"]
    assert s2["reference"]["sha256"] == s1["output"]["sha256"]
    assert s2["reference"]["path"] != str(tiny_model)
    # the merged step-1 output is a plain model whose weights differ from the base
    _, base = load_policy(tiny_model, "cpu")
    _, merged = load_policy(tmp_path / "run" / "step-1", "cpu")
    assert set(merged.state_dict()) == set(base.state_dict()), "adapter was not merged into a plain model"
    assert any(not torch.equal(base.state_dict()[k], merged.state_dict()[k]) for k in base.state_dict())
    assert abs(s2["first_loss"] - LN2) < 1e-4


def test_bad_hyperparameters_and_existing_output_are_refused(tmp_path, tiny_model, chunk_files):
    from sdpo_engine.config import ConfigError
    from sdpo_engine.step import SpecError

    spec = _spec(tmp_path, tiny_model, chunk_files[0])
    with pytest.raises(ConfigError) as e:
        run_step({**spec, "hyperparameters": {"beta": -1}})
    assert e.value.param == "beta"
    (tmp_path / "out-1").mkdir()
    with pytest.raises(SpecError):
        run_step(spec)
    with pytest.raises(SpecError):
        run_step({**spec, "policy_init": str(tmp_path / "nope")})


def test_pair_logps_is_trl_reference_pass(tmp_path, tiny_model, chunk_files):
    """gamma from pair_logps equals the reference log-probs TRL trains against."""
    cfg = StepConfig.from_dict(TINY_HPARAMS)
    tok, model = load_policy(tiny_model, "cpu")
    pairs = load_pairs(chunk_files[0])
    c, r = pair_logps(model, tok, pairs, max_length=cfg.max_length)
    trainer = build_trainer(model, tok, to_trl_rows(pairs, tok), dpo_config(cfg, str(tmp_path / "t"), "cpu"))
    assert c == pytest.approx(list(trainer.train_dataset["ref_chosen_logps"]), abs=1e-5)
    assert r == pytest.approx(list(trainer.train_dataset["ref_rejected_logps"]), abs=1e-5)


def _in_file_mappings(model) -> int:
    """Parameters whose data lies in a memory mapping of a .safetensors file (/proc/self/maps: Linux)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) > 5 and parts[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    return sum(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in model.parameters())


def test_own_weights_takes_a_cpu_policy_out_of_its_checkpoints_mapping(tmp_path, tiny_model, chunk_files, monkeypatch):
    """transformers maps safetensors copy-on-write; a trained policy's weights are copied into the
    process's memory first (the first AdamW step otherwise takes a page fault per 4 KiB of weights):
    same values, ties kept, and run_step does it for a full-weight step on CPU only, not under LoRA."""
    _, model = load_policy(tiny_model, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = len(list(model.parameters()))
    assert _in_file_mappings(model) == n_params  # the premise: loaded weights are the file's pages
    assert own_weights(model) == sum(p.numel() * p.element_size() for p in model.parameters())
    assert _in_file_mappings(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tie_word_embeddings

    import sdpo_engine.step as step

    calls = []
    monkeypatch.setattr(step, "own_weights", lambda m: calls.append(_in_file_mappings(m)) or 0)
    run_step(_spec(tmp_path, tiny_model, chunk_files[0], hyperparameters={**TINY_HPARAMS, "n_epochs": 1}))
    assert calls == [n_params]
    run_step(_spec(tmp_path, tiny_model, chunk_files[0], index=2, lora={"r": 2, "alpha": 4}))
    assert calls == [n_params]


def test_preload_takes_the_first_from_pretrained_and_the_import_heap_off_the_step(monkeypatch):
    """`preload()` (the warm step process, `sdpo_engine run`) builds transformers' conversion tables and
    freezes the import-time heap, so the full collection the Trainer forces at train() start
    (accelerate's free_memory) no longer walks it. Undone afterwards: this is the test process."""
    import gc

    from transformers import conversion_mapping

    from sdpo_engine.step import preload

    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    gc.unfreeze()  # an earlier in-process `sdpo_engine run` (tests/engine/test_protocol.py) froze this heap
    assert gc.get_freeze_count() == 0
    try:
        preload()
        assert conversion_mapping._checkpoint_conversion_mapping_cache is not None
        # torch, transformers and TRL are imported: far more than 50,000 objects, now all frozen
        assert gc.get_freeze_count() > 50_000
        assert len(gc.get_objects()) < 1_000  # what a collection still walks: only what came after
    finally:
        gc.unfreeze()


def test_run_warns_when_the_held_out_file_overlaps_the_training_data(tmp_path, tiny_model, chunk_files):
    """`sdpo_engine run` (run_sdpo) with an eval file the training data holds: a validation_overlap warning
    before any step, naming both files."""
    from sdpo_engine.sample_data import write_jsonl

    c1, _c2, _ev = chunk_files
    pairs = load_pairs(c1)
    leaked = write_jsonl([{"prompt": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
                           "rejected": p["rejected"][0]["content"]} for p in pairs[:3]]
                         + [{"prompt": "Unseen?", "chosen": "yes", "rejected": "no"}], tmp_path / "leaked.jsonl")
    events: list[dict] = []
    run_sdpo(str(tiny_model), tmp_path / "run", step_files=[str(c1)], eval_file=str(leaked),
             hyperparameters={**TINY_HPARAMS, "n_epochs": 1}, device="cpu", emit=events.append)
    (warning,) = [e for e in events if e["event"] == "warning" and e["code"] == "validation_overlap"]
    assert warning["message"].startswith(f"The held-out file {leaked} overlaps the training data ({c1}): 3 of its 4 pairs")
    assert events.index(warning) < next(i for i, e in enumerate(events) if e["event"] == "metrics")
