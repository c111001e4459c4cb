"""Per-step samples (issue #17): greedy answers to held-out prompts, generated in the step's own
process with the policy in memory, stored in the summary and the manifest, the same text every time."""

from __future__ import annotations

import pytest

from sdpo_engine.manifest import read_manifest
from sdpo_engine.protocol import SpecError, StepSpec
from sdpo_engine.sample_data import make_pairs, write_jsonl


@pytest.fixture()
def spec_dict(tmp_path, tiny_model):
    data = write_jsonl(make_pairs(8, seed=7), tmp_path / "pairs.jsonl")
    held = write_jsonl(make_pairs(5, seed=8), tmp_path / "held.jsonl")
    return {"index": 1, "policy_init": str(tiny_model), "train_file": str(data), "eval_file": str(held),
            "eval_reference": str(tiny_model), "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "hyperparameters": {"batch_size": 4, "max_length": 64, "learning_rate": 5e-3, "seed": 0}, "device": "cpu",
            "samples": {"n_prompts": 3, "max_new_tokens": 12, "seed": 1, "base": True}}


@pytest.mark.parametrize(("samples", "match"), [
    ({"n_prompts": 0}, "samples.n_prompts"), ({"n_prompts": 2, "max_new_tokens": 10_000}, "samples.max_new_tokens"),
    ({"n_prompts": True}, "samples.n_prompts"), ({"prompts": 2}, "unknown samples keys: prompts"), ([3], "samples"),
    ({"base": "yes"}, "samples.base"),
])
def test_bad_samples_are_refused_naming_the_key(spec_dict, samples, match):
    with pytest.raises(SpecError, match=match):
        StepSpec.from_dict({**spec_dict, "samples": samples})


def test_samples_need_an_eval_file(spec_dict):
    with pytest.raises(SpecError, match="samples needs eval_file"):
        StepSpec.from_dict({**spec_dict, "eval_file": None, "eval_reference": None})


@pytest.mark.slow  # a step and two more model loads: 30-80 s on 2 busy cores
def test_a_step_answers_held_out_prompts_before_and_after_training_the_same_every_time(spec_dict, tiny_model):
    from sdpo_engine import samples
    from sdpo_engine.data import load_pairs
    from sdpo_engine.step import load_policy, run_step

    events: list[dict] = []
    summary = run_step(spec_dict, emit=events.append)
    got = summary["samples"]
    held = load_pairs(spec_dict["eval_file"])
    assert got["prompts"] == [p["prompt"][-1]["content"] for p in held[:3]]
    assert len(got["answers"]) == len(got["base_answers"]) == 3
    assert got["seconds"] > 0 and got["base_seconds"] > 0
    assert read_manifest(spec_dict["output_dir"])["samples"] == got
    info = next(e for e in events if e.get("phase") == "samples")
    assert info["seconds"] == got["seconds"]

    # Same text again: the saved checkpoint, and the base, loaded afresh and decoded with the same seed.
    prompts = samples.prompt_messages(spec_dict["eval_file"], 3)
    for model_dir, expected in ((spec_dict["output_dir"], got["answers"]), (tiny_model, got["base_answers"])):
        tokenizer, model = load_policy(model_dir, "cpu")
        again, _ = samples.generate_answers(model, tokenizer, prompts, max_new_tokens=12, seed=1, device="cpu")
        assert again == expected
    assert got["answers"] != got["base_answers"]  # training moved the model (lr 5e-3 on the tiny model)
