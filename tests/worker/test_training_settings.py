"""The worker's training settings (core.settings): read from SDPO_* once, checked at start-up, and passed to
every step in its spec (sdpo_engine.protocol.StepSpec) instead of through the environment."""

from __future__ import annotations

from dataclasses import fields

import pytest
from pydantic import ValidationError

from core.settings import Settings
from sdpo_engine.protocol import (
    ACTIVATION_CHECKPOINTING,
    ATTENTION,
    DEVICES,
    MAX_PACK_TOKENS,
    MAX_PAD_TO_MULTIPLE_OF,
    MAX_REFERENCE_BATCH_SIZE,
    SpecError,
    StepSpec,
    check_training_settings,
)

TRAINING_SETTINGS = ("device", "packing", "pad_to_multiple_of", "activation_checkpointing", "pack_tokens",
                     "group_by_length", "reference_batch_size", "attention")


@pytest.mark.parametrize(("env", "expected"), [
    ({}, {"device": "auto", "packing": True, "pad_to_multiple_of": None, "activation_checkpointing": "auto",
          "pack_tokens": None, "group_by_length": False, "reference_batch_size": None, "attention": "auto"}),
    ({"SDPO_ATTENTION": "sdpa"}, {"attention": "sdpa"}),
    ({"SDPO_ATTENTION": "flex", "SDPO_DEVICE": "cuda"}, {"attention": "flex", "device": "cuda"}),
    ({"SDPO_GROUP_BY_LENGTH": "true"}, {"group_by_length": True}),
    ({"SDPO_REFERENCE_BATCH_SIZE": "64"}, {"reference_batch_size": 64}),
    ({"SDPO_REFERENCE_BATCH_SIZE": ""}, {"reference_batch_size": None}),
    ({"SDPO_PACK_TOKENS": "0"}, {"pack_tokens": 0}),
    ({"SDPO_PACK_TOKENS": "auto"}, {"pack_tokens": None}),
    ({"SDPO_PACK_TOKENS": "4096"}, {"pack_tokens": 4096}),
    # "auto" was SDPO_PACKING's documented default; off/0/false/no turned packing off.
    ({"SDPO_PACKING": "auto"}, {"packing": True}),
    ({"SDPO_PACKING": "off"}, {"packing": False}),
    ({"SDPO_PACKING": "0"}, {"packing": False}),
    ({"SDPO_PACKING": "no"}, {"packing": False}),
    ({"SDPO_PAD_TO_MULTIPLE_OF": "0"}, {"pad_to_multiple_of": 0}),
    ({"SDPO_PAD_TO_MULTIPLE_OF": ""}, {"pad_to_multiple_of": None}),
    ({"SDPO_PAD_TO_MULTIPLE_OF": "128"}, {"pad_to_multiple_of": 128}),
    ({"SDPO_ACTIVATION_CHECKPOINTING": "on", "SDPO_DEVICE": "cpu"}, {"activation_checkpointing": "on", "device": "cpu"}),
])
def test_settings_read_the_training_variables(monkeypatch, tmp_path, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(home=tmp_path)
    assert {key: getattr(settings, key) for key in expected} == expected
    check_training_settings(**{key: getattr(settings, key) for key in TRAINING_SETTINGS})  # the spec accepts them


@pytest.mark.parametrize(("name", "value"), [
    ("SDPO_PAD_TO_MULTIPLE_OF", "sixty"), ("SDPO_PAD_TO_MULTIPLE_OF", "-1"), ("SDPO_PAD_TO_MULTIPLE_OF", "4097"),
    ("SDPO_PACK_TOKENS", "-1"), ("SDPO_PACK_TOKENS", "65537"), ("SDPO_PACK_TOKENS", "many"),
    ("SDPO_REFERENCE_BATCH_SIZE", "0"), ("SDPO_REFERENCE_BATCH_SIZE", "4097"), ("SDPO_GROUP_BY_LENGTH", "often"),
    ("SDPO_PACKING", "sometimes"), ("SDPO_ACTIVATION_CHECKPOINTING", "always"), ("SDPO_DEVICE", "tpu"), ("SDPO_ATTENTION", "flash"),
])
def test_a_bad_training_variable_stops_the_process_at_start_up(monkeypatch, tmp_path, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("SDPO_").lower()):
        Settings(home=tmp_path)


def test_settings_and_the_step_spec_agree_on_names_and_choices():
    spec_fields = {f.name for f in fields(StepSpec)}
    assert set(TRAINING_SETTINGS) <= spec_fields and set(TRAINING_SETTINGS) <= set(Settings.model_fields)
    assert Settings.model_fields["device"].annotation.__args__ == DEVICES
    assert Settings.model_fields["activation_checkpointing"].annotation.__args__ == ACTIVATION_CHECKPOINTING
    assert Settings.model_fields["attention"].annotation.__args__ == ATTENTION
    # The same bound on both sides: what the settings accept, the spec accepts.
    Settings(pad_to_multiple_of=MAX_PAD_TO_MULTIPLE_OF)
    check_training_settings(pad_to_multiple_of=MAX_PAD_TO_MULTIPLE_OF)
    with pytest.raises(ValidationError):
        Settings(pad_to_multiple_of=MAX_PAD_TO_MULTIPLE_OF + 1)
    with pytest.raises(SpecError, match="pad_to_multiple_of"):
        check_training_settings(pad_to_multiple_of=MAX_PAD_TO_MULTIPLE_OF + 1)
    Settings(pack_tokens=MAX_PACK_TOKENS)
    check_training_settings(pack_tokens=MAX_PACK_TOKENS)
    with pytest.raises(ValidationError):
        Settings(pack_tokens=MAX_PACK_TOKENS + 1)
    for bad in (MAX_PACK_TOKENS + 1, -1, True, "2048"):
        with pytest.raises(SpecError, match="pack_tokens"):
            check_training_settings(pack_tokens=bad)
    Settings(reference_batch_size=MAX_REFERENCE_BATCH_SIZE)
    check_training_settings(reference_batch_size=MAX_REFERENCE_BATCH_SIZE)
    with pytest.raises(ValidationError):
        Settings(reference_batch_size=MAX_REFERENCE_BATCH_SIZE + 1)


def test_the_worker_start_check_asks_torch_only_for_host_dependent_settings(monkeypatch, tmp_path):
    """worker.checks.training_host_problem: the spec's own rules without a child; a child (torch) only for
    SDPO_DEVICE=cuda or SDPO_ATTENTION=flex. The worker process itself never imports torch."""
    import subprocess

    from worker import checks

    calls: list[list[str]] = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "Traceback...\nSDPO_DEVICE=cuda: no CUDA here\n")

    monkeypatch.setattr(checks.subprocess, "run", fake_run)
    for env in ({}, {"device": "cpu"}, {"attention": "sdpa", "packing": False}, {"device": "auto", "compile": "layers"}):
        assert checks.training_host_problem(Settings(home=tmp_path, **env)) is None
    assert calls == []
    problem = checks.training_host_problem(Settings(home=tmp_path, attention="flex", packing=False))
    assert problem is not None and "needs packing true" in problem and calls == []
    problem = checks.training_host_problem(Settings(home=tmp_path, attention="flex", device="cpu"))
    assert problem is not None and "needs a CUDA device" in problem and calls == []
    # The child's last stderr line is the reason.
    assert checks.training_host_problem(Settings(home=tmp_path, device="cuda")) == "SDPO_DEVICE=cuda: no CUDA here"
    assert calls[-1][-3:] == ["cuda", "auto", "0"]
    checks.training_host_problem(Settings(home=tmp_path, worker_gpus="0,1"))  # GPUs the host may lack
    assert calls[-1][-3:] == ["auto", "auto", "2"]
