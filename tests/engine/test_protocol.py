"""sdpo_engine.protocol: the contract with the training process is standard library only, every spec field
has help text, bad settings are refused naming the key, and the operator's training settings reach the
checkpoint's manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from sdpo_engine import protocol
from sdpo_engine.manifest import read_manifest
from sdpo_engine.protocol import (
    ERROR_CODES,
    PARTITION_STRATEGIES,
    TRAINING_DATA_CODES,
    EventKind,
    ExitCode,
    InfoPhase,
    LoraSpec,
    SpecError,
    StepSpec,
)
from sdpo_engine.sample_data import make_pairs, write_jsonl


def test_protocol_imports_nothing_outside_the_standard_library():
    code = ("import sys; before = set(sys.modules); import sdpo_engine.protocol; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(m for m in new if m not in sys.stdlib_module_names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == ["sdpo_engine"]


def test_every_spec_field_has_help_text():
    for cls in (StepSpec, LoraSpec):
        missing = [f.name for f in fields(cls) if not f.metadata.get("help")]
        assert missing == [], f"{cls.__name__} fields without help: {missing}"


def test_names_both_sides_agree_on():
    from sdpo_engine import partition, step

    assert partition.STRATEGIES == PARTITION_STRATEGIES
    assert step.StepSpec is StepSpec and step.SpecError is SpecError  # moved, still importable from step
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 75]
    assert step.EXIT_STOPPED == ExitCode.STOPPED == 75 and step.EXIT_NON_FINITE == 3
    assert set(TRAINING_DATA_CODES) < set(ERROR_CODES)
    assert {"invalid_input", "non_finite", "step_failed"} < set(ERROR_CODES)


@pytest.fixture()
def spec_dict(tmp_path, tiny_model):
    data = write_jsonl(make_pairs(4, seed=7), tmp_path / "pairs.jsonl")
    return {"index": 1, "policy_init": str(tiny_model), "train_file": str(data),
            "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "hyperparameters": {"batch_size": 4, "max_length": 48, "learning_rate": 1e-3}, "device": "cpu"}


@pytest.mark.parametrize(("key", "value"), [
    ("packing", "off"), ("pad_to_multiple_of", -8), ("pad_to_multiple_of", 1.5),
    ("activation_checkpointing", "always"), ("device", "tpu"), ("text_format", "markdown"), ("lora", [8]),
])
def test_bad_settings_are_refused_naming_the_key(spec_dict, key, value):
    with pytest.raises(SpecError, match=key):
        StepSpec.from_dict({**spec_dict, key: value})


def test_unknown_key_is_refused(spec_dict):
    with pytest.raises(SpecError, match="unknown step spec keys: packnig"):
        StepSpec.from_dict({**spec_dict, "packnig": False})


def test_training_settings_come_from_the_spec_and_reach_the_manifest(spec_dict, monkeypatch):
    from sdpo_engine.step import run_step

    # The engine reads no environment variable for these any more: a stray one changes nothing.
    monkeypatch.setenv("SDPO_PACKING", "on")
    monkeypatch.setenv("SDPO_ACTIVATION_CHECKPOINTING", "off")
    events = []
    run_step({**spec_dict, "packing": False, "pad_to_multiple_of": 16, "activation_checkpointing": "on"},
             emit=events.append)
    memory = next(e for e in events if e.get("phase") == "memory")
    reference = next(e for e in events if e.get("phase") == "reference_logps")
    assert memory["activation_checkpointing"] is True
    assert reference["packing"].startswith("two_sequences: disabled")
    for event in events:
        _assert_has_its_declared_shape(event)
    manifest = read_manifest(spec_dict["output_dir"])
    assert manifest["training_settings"] == {"device": "cpu", "packing": False, "pad_to_multiple_of": 16,
                                             "activation_checkpointing": "on", "pack_tokens": None, "attention": "auto",
                                             "group_by_length": False, "reference_batch_size": None,
                                             "param_dtype": "auto", "compile": "off"}
    # not packed: no packed rows, whatever pack_tokens says
    assert manifest["training_applied"] == {"packing": reference["packing"], "pad_to_multiple_of": 16,
                                            "activation_checkpointing": True, "pack_tokens": None, "attention": "sdpa",
                                            "group_by_length": False, "reference_batch_size": 8,
                                            "param_dtype": "float32", "autocast": None, "compiled_layers": 0}


def _assert_has_its_declared_shape(event: dict) -> None:
    """The event's keys fit the protocol's TypedDict for its kind (and phase): every required key, and no
    undeclared one where the shape is closed (total)."""
    kind = EventKind(event["event"])
    if kind is EventKind.INFO:
        name = "".join(part.title() for part in InfoPhase(event["phase"]).value.split("_")) + "Info"
    else:
        name = kind.value.title() + "Event"
    shape = getattr(protocol, name)
    assert shape.__required_keys__ <= set(event), (name, sorted(shape.__required_keys__ - set(event)))
    if shape.__total__:
        assert set(event) <= set(shape.__annotations__), (name, sorted(set(event) - set(shape.__annotations__)))
    typed = {key: event[key] for key in ("step", "global_step") if key in shape.__annotations__ and key in event}
    assert all(isinstance(value, int) for value in typed.values()), (name, typed)


def test_a_step_prints_every_info_phase_with_its_declared_shape(spec_dict, tmp_path):
    from sdpo_engine.step import run_step

    events = []
    run_step({**spec_dict, "eval_file": spec_dict["train_file"], "eval_reference": spec_dict["policy_init"]},
             emit=events.append)
    seen = {event.get("phase") or event["event"] for event in events}
    assert {"start", "eval_reference", "reference_logps", "memory", "train_end", "eval", "metrics", "result"} <= seen
    for event in events:
        _assert_has_its_declared_shape(event)


def test_run_checks_the_training_settings_before_any_work(tmp_path, tiny_model, capsys):
    from sdpo_engine.cli import main

    data = write_jsonl(make_pairs(8, seed=2), tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model), "--train-file", str(data), "--partition", "random", "--steps", "1",
            "--out", str(out), "--device", "cpu", "--batch-size", "4", "--max-length", "48", "--quiet"]
    assert main([*argv, "--pad-to-multiple-of", "-1"]) == 2
    assert "pad_to_multiple_of must be null or a whole number from 0 to 4096" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--pack-tokens", "-1"]) == 2
    assert "pack_tokens must be null or a whole number from 0 to 65536" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--no-packing", "--pad-to-multiple-of", "8", "--activation-checkpointing", "off"]) == 0
    assert read_manifest(out / "step-1")["training_settings"] == {
        "device": "cpu", "packing": False, "pad_to_multiple_of": 8, "activation_checkpointing": "off",
        "pack_tokens": None, "attention": "auto", "group_by_length": False, "reference_batch_size": None,
        "param_dtype": "auto", "compile": "off"}
    assert main([*argv, "--out", str(tmp_path / "rows"), "--pack-tokens", "256"]) == 0
    manifest = read_manifest(tmp_path / "rows" / "step-1")
    assert manifest["training_settings"]["pack_tokens"] == manifest["training_applied"]["pack_tokens"] == 256


@pytest.mark.parametrize(("flag", "value"), [
    ("--attention", "eager"), ("--param-dtype", "float16"), ("--compile", "model"),
    ("--reference-batch-size", "0"), ("--reference-batch-size", "4097"), ("--reference-batch-size", "8.5"),
])
def test_run_refuses_a_bad_training_lever_naming_the_flag(tmp_path, flag, value, capsys):
    from sdpo_engine.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["run", "--model", "sdpo-tiny", "--step-file", "a.jsonl", "--out", str(tmp_path / "run"), flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_passes_the_step_spec_training_levers_to_every_step(tmp_path, tiny_model, capsys, monkeypatch):
    """attention, param_dtype, compile, group_by_length and reference_batch_size: the worker's step-spec keys,
    here flags of the same names, recorded in the manifest as asked and as applied."""
    from sdpo_engine import step
    from sdpo_engine.cli import main

    data = write_jsonl(make_pairs(8, seed=2), tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model), "--step-file", str(data), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--max-length", "48", "--quiet"]
    # Checked before any work, as in a spec: flex has no backward on CPU.
    assert main([*argv, "--attention", "flex"]) == 2
    assert "attention flex needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()

    assert main([*argv, "--attention", "sdpa", "--param-dtype", "bfloat16-master", "--group-by-length",
                 "--reference-batch-size", "16"]) == 0
    manifest = read_manifest(out / "step-1")
    assert manifest["training_settings"] == {
        "device": "cpu", "packing": True, "pad_to_multiple_of": None, "activation_checkpointing": "auto",
        "pack_tokens": None, "attention": "sdpa", "group_by_length": True, "reference_batch_size": 16,
        "param_dtype": "bfloat16-master", "compile": "off"}
    applied = manifest["training_applied"]
    assert (applied["attention"], applied["param_dtype"], applied["group_by_length"],
            applied["reference_batch_size"], applied["compiled_layers"]) == ("sdpa", "bfloat16-master", True, 16, 0)

    # compile layers (CPU inductor takes minutes to train): the step's spec is what the flag asked for.
    specs = []

    class SpecSeen(Exception):  # not one main() turns into an exit code: the run stops at the first step
        pass

    def spec_only(spec, emit=None):
        specs.append(spec)
        raise SpecSeen

    monkeypatch.setattr(step, "run_step", spec_only)
    with pytest.raises(SpecSeen):
        main([*argv, "--out", str(tmp_path / "compiled"), "--compile", "layers"])
    assert StepSpec.from_dict(specs[0]).training_settings()["compile"] == "layers"
