"""Fixtures for the engine tests: one tiny model per session and small seeded preference files."""

from __future__ import annotations

import pytest

from sdpo_engine.sample_data import make_pairs, write_jsonl

# Small enough (mirrored in test_step.py, since conftest modules are not importable) that a step takes about a second on two CPU cores, large enough to move the model.
TINY_HPARAMS = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 96, "beta": 0.1, "seed": 0}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from sdpo_engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture()
def chunk_files(tmp_path):
    """Two step chunks and a held-out file, each mixing the easy and the hard source."""
    return (
        write_jsonl(make_pairs(8, seed=1), tmp_path / "c1.jsonl"),
        write_jsonl(make_pairs(8, seed=2), tmp_path / "c2.jsonl"),
        write_jsonl(make_pairs(6, seed=3), tmp_path / "eval.jsonl"),
    )


@pytest.fixture(scope="session")
def notemplate_model(tiny_model, tmp_path_factory):
    """The tiny model without a chat template (as ../shared/cases/make_variants.py builds it)."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("variants") / "tiny-notemplate"
    shutil.copytree(tiny_model, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    """A folder per test module for the decoder families built from the tiny model (llama, qwen2, qwen3...)."""
    return tmp_path_factory.mktemp("families")


@pytest.fixture()
def pairs_file(tmp_path):
    """12 pairs mixing both sources, a long context on some prompts, so prompts and answers differ in length
    (the packing equivalence tests: test_perf_equivalence.py, test_flex_attention.py)."""
    pairs = make_pairs(6, seed=5)
    for i, p in enumerate(pairs):
        if i % 3 == 0:
            p["prompt"] = "Please answer politely and check your numbers. " + p["prompt"]
    return write_jsonl(pairs, tmp_path / "pairs.jsonl")
