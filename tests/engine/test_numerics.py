"""Issue #13, kind 5: numerical health. A NaN or infinite reference log-prob, loss or gradient norm
fails the step with `non_finite` naming the value and the optimizer step, and nothing is written;
dropout of every spelling is off in policy and reference, so every step starts at ln 2.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdpo_engine.step as step_module
from sdpo_engine.sample_data import make_pairs, write_jsonl
from sdpo_engine.step import EXIT_NON_FINITE, NonFiniteError, check_finite_logps, load_policy, run_step

CASES = Path(__file__).resolve().parents[2].parent / "shared" / "cases"
HP = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 96, "beta": 0.1, "seed": 0}
LN2 = math.log(2)


def _strict_json(line: str):
    """json.loads that refuses NaN/Infinity literals: nothing may present a NaN as a number."""
    def refuse(token):
        raise AssertionError(f"non-finite number {token} in the engine's JSON output: {line}")

    return json.loads(line, parse_constant=refuse)


def _variant(tiny_model: Path, out: Path, edit) -> Path:
    """A copy of the tiny model with `edit(state_dict)` applied to its weights."""
    shutil.copytree(tiny_model, out)
    weights = load_file(out / "model.safetensors")
    edit(weights)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _with_config(tiny_model: Path, out: Path, **values) -> Path:
    shutil.copytree(tiny_model, out)
    config = json.loads((out / "config.json").read_text())
    config.update(values)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


@pytest.fixture(scope="module")
def variants(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("numerics-variants")

    def set_value(name, index, value):
        def edit(w):
            w[name][index] = value
        return edit

    def grad_only(w):
        # Hidden dimension 5 is multiplied by 0 on the way into the logits (its column of the tied
        # embedding is 0), so the forward pass and every log-prob stay exactly the tiny model's; the
        # final norm's weight 1e30 on it makes that column's gradient ~1e30 and its norm overflow.
        w["model.embed_tokens.weight"][:, 5] = 0.0
        w["model.norm.weight"][5] = 1e30

    return {
        # the shared case 18's model: one NaN in layer 1's MLP
        "nan_mlp": _variant(tiny_model, root / "nan-mlp", set_value("model.layers.1.mlp.down_proj.weight", (0, 0),
                                                                    float("nan"))),
        # an infinite attention weight: inf - inf in the scores
        "inf_attention": _variant(tiny_model, root / "inf-attn", set_value("model.layers.0.self_attn.q_proj.weight",
                                                                          (3, 7), float("inf"))),
        "grad_only": _variant(tiny_model, root / "grad-only", grad_only),
        "dropout": _with_config(tiny_model, root / "dropout", attention_dropout=0.5),
    }


def _spec(tmp_path: Path, model: Path, train_file: Path, **extra) -> dict:
    return {"index": 1, "policy_init": str(model), "train_file": str(train_file),
            "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "hyperparameters": dict(HP), "device": "cpu", **extra}


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists(), "an output directory was written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "a temporary output was left"
    work = tmp_path / "work"
    assert not work.exists() or not list(work.glob("checkpoint-*")), "a trainer checkpoint was saved"


# ------------------------------------------------------------------------------------------------
# Non-finite values


@pytest.mark.parametrize(("variant", "value"), [("nan_mlp", "nan"), ("inf_attention", "nan")])
def test_non_finite_weight_fails_at_the_reference_pass_naming_the_line(tmp_path, variants, variant, value):
    """Blank lines and a pair dropped for its too-long prompt come before: the named line is the file's."""
    pairs = make_pairs(6, seed=1)
    long_prompt = {**pairs[0], "prompt": " ".join(["Greet Pia please."] * 80)}  # fills max_length 96: dropped
    lines = ["", json.dumps(long_prompt), ""] + [json.dumps(p) for p in pairs[1:]]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    events: list[dict] = []
    with pytest.raises(NonFiniteError) as caught:
        run_step(_spec(tmp_path, variants[variant], train), events.append)
    err = caught.value
    assert (err.value, err.global_step) == ("reference log-prob", None)
    kept = len(pairs) - 1
    assert str(err).startswith(f"reference log-prob of the chosen answer of the pair at line 4 is {value} "
                               f"({kept} of {kept} pairs non-finite); nothing was saved"), str(err)
    assert not [e for e in events if e["event"] == "metrics"], "training started on a non-finite reference"
    _assert_nothing_written(tmp_path)


def test_infinite_gradient_norm_stops_at_the_first_optimizer_step_with_nothing_saved(tmp_path, variants):
    """The loss is finite (ln 2), only the gradient overflows; a trainer checkpoint would be saved at
    every step (save_steps=1) but none is."""
    train = write_jsonl(make_pairs(8, seed=1), tmp_path / "train.jsonl")
    events: list[dict] = []
    with pytest.raises(NonFiniteError) as caught:
        run_step(_spec(tmp_path, variants["grad_only"], train, save_steps=1), events.append)
    err = caught.value
    assert (err.value, err.global_step) == ("grad_norm", 1)
    assert str(err).startswith("grad_norm is inf at optimizer step 1 of 4; nothing was saved"), str(err)
    metrics = [e for e in events if e["event"] == "metrics"]
    assert len(metrics) == 1, "training went on after the non-finite gradient"
    assert abs(metrics[0]["loss"] - LN2) < 1e-6 and metrics[0]["grad_norm"] == math.inf
    _assert_nothing_written(tmp_path)


def test_nan_loss_after_resume_names_the_optimizer_step(tmp_path, tiny_model):
    """A trainer checkpoint whose Adam moments hold a NaN: optimizer step 7 (the first after the
    resume) still has a finite loss and gradient, its update makes the weights NaN, and step 8 fails."""
    train = write_jsonl(make_pairs(8, seed=1), tmp_path / "train.jsonl")  # 16 pairs
    spec = _spec(tmp_path, tiny_model, train, save_steps=2)
    spec["hyperparameters"]["n_epochs"] = 2  # 8 optimizer steps; trainer checkpoints at 2, 4, 6
    run_step(spec)
    checkpoint = tmp_path / "work" / "checkpoint-6"
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    first = next(iter(optimizer["state"].values()))
    first["exp_avg"].view(-1)[0] = float("nan")
    torch.save(optimizer, checkpoint / "optimizer.pt")

    events: list[dict] = []
    with pytest.raises(NonFiniteError) as caught:
        run_step({**spec, "output_dir": str(tmp_path / "out-resumed")}, events.append)
    err = caught.value
    assert (err.value, err.global_step) == ("loss", 8)
    assert str(err).startswith("loss is nan at optimizer step 8 of 8; nothing was saved"), str(err)
    resumed = [e for e in events if e["event"] == "metrics"]
    assert [e["global_step"] for e in resumed] == [7, 8]
    assert math.isfinite(resumed[0]["loss"]) and math.isfinite(resumed[0]["grad_norm"])
    assert not (tmp_path / "out-resumed").exists()


def test_nan_in_the_held_out_reference_fails_before_training(tmp_path, tiny_model, variants):
    train = write_jsonl(make_pairs(8, seed=1), tmp_path / "train.jsonl")
    held = write_jsonl(make_pairs(4, seed=3), tmp_path / "held.jsonl")
    events: list[dict] = []
    with pytest.raises(NonFiniteError) as caught:
        run_step(_spec(tmp_path, tiny_model, train, eval_file=str(held), eval_reference=str(variants["nan_mlp"])),
                 events.append)
    assert caught.value.value == "held-out reference log-prob"
    assert str(caught.value).startswith("held-out reference log-prob of the chosen answer of held-out pair 1 is nan")
    assert not [e for e in events if e["event"] == "metrics"]
    _assert_nothing_written(tmp_path)


def test_check_finite_logps_names_the_first_bad_pair_and_answer():
    check_finite_logps([-1.0, -2.0], [-3.0, -4.0], "reference log-prob")  # finite: no error
    with pytest.raises(NonFiniteError, match=r"^x of the rejected answer of the pair at line 9 is -inf \(1 of 3 "):
        check_finite_logps([-1.0, -2.0, -3.0], [-1.0, -math.inf, -3.0], "x",
                           ["the pair at line 2", "the pair at line 9", "the pair at line 10"])
    with pytest.raises(NonFiniteError, match=r"^x of the chosen answer of pair 1 is nan \(2 of 2 "):
        check_finite_logps([math.nan, math.inf], [-1.0, -1.0], "x")


def test_step_command_exits_3_with_a_non_finite_error_line_and_no_nan_literal(tmp_path, variants):
    train = write_jsonl(make_pairs(8, seed=1), tmp_path / "train.jsonl")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec(tmp_path, variants["grad_only"], train)))
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "step", str(spec_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == EXIT_NON_FINITE == 3, done.stderr[-3000:]
    lines = [_strict_json(line) for line in done.stdout.splitlines() if line.strip()]
    error = lines[-1]
    assert error["event"] == "error" and error["code"] == "non_finite", lines
    assert (error["value"], error["global_step"]) == ("grad_norm", 1)
    assert error["message"].startswith("grad_norm is inf at optimizer step 1 of 4")
    metrics = [e for e in lines if e["event"] == "metrics"]
    assert len(metrics) == 1 and metrics[0]["grad_norm"] is None  # inf is not a JSON number: null
    _assert_nothing_written(tmp_path)


def test_shared_case_18_through_the_run_command(tmp_path, variants):
    """../shared/cases/18-nan-loss.jsonl on its NaN model: exit 3, which value, nothing written."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "run", "--model", str(variants["nan_mlp"]),
                           "--step-file", str(CASES / "18-nan-loss.jsonl"), "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    assert ("error: non_finite: reference log-prob of the chosen answer of the pair at line 1 is nan "
            "(16 of 16 pairs non-finite)") in done.stderr
    assert not (out / "step-1").exists() and not (out / "summary.json").exists()
    assert "final checkpoint" not in done.stdout


# ------------------------------------------------------------------------------------------------
# Dropout


def _tiny_architecture(kind: str, tiny_model: Path, out: Path) -> Path:
    """A random-init tiny model of another architecture with dropout configured, on the tiny tokenizer."""
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    common = {"vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 3, "bos_token_id": 3}
    torch.manual_seed(0)
    if kind == "gpt2":  # nn.Dropout modules from *_pdrop
        model = GPT2LMHeadModel(GPT2Config(n_positions=256, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.3,
                                           embd_pdrop=0.3, attn_pdrop=0.3, summary_first_dropout=0.3, **common))
    elif kind == "gpt_neox":  # attention_dropout read as a float at forward time, hidden_dropout modules
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, max_position_embeddings=256,
                                                 hidden_dropout=0.3, attention_dropout=0.3, classifier_dropout=0.3,
                                                 **common))
    else:  # opt: functional dropout from float attributes, and layerdrop
        model = OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                         max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.3,
                                         attention_dropout=0.3, activation_dropout=0.3, layerdrop=0.3, **common))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(("kind", "keys"), [
    ("gpt2", ["attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout"]),
    ("gpt_neox", ["attention_dropout", "classifier_dropout", "hidden_dropout"]),
    ("opt", ["activation_dropout", "attention_dropout", "dropout", "layerdrop"]),
])
def test_dropout_of_every_spelling_is_off_and_the_first_loss_is_ln2(tmp_path, tiny_model, kind, keys):
    model_dir = _tiny_architecture(kind, tiny_model, tmp_path / kind)
    _, model = load_policy(model_dir, "cpu")
    disabled = model.sdpo_dropout_disabled
    assert sorted(disabled["config"]) == keys and set(disabled["config"].values()) == {0.3}
    model.train()  # as the Trainer does
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            assert module.p == 0
        for name, value in vars(module).items():
            if "dropout" in name.lower() or name.endswith("pdrop") or name == "layerdrop":
                assert not isinstance(value, float) or value == 0, f"{type(module).__name__}.{name} = {value}"

    train = write_jsonl(make_pairs(8, seed=1), tmp_path / "train.jsonl")
    events: list[dict] = []
    summary = run_step(_spec(tmp_path, model_dir, train), events.append)
    assert abs(summary["first_loss"] - LN2) < 1e-4
    assert not [e for e in events if e["event"] == "warning"]
    manifest = json.loads((tmp_path / "out" / "sdpo_manifest.json").read_text())
    assert sorted(manifest["dropout_disabled"]["config"]) == keys
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert all(saved[k] == 0.3 for k in keys), "the checkpoint's config lost the user's dropout values"


def test_shared_case_17_two_steps_start_at_ln2_through_the_run_command(tmp_path, variants):
    """../shared/cases/17 on a Llama with attention_dropout 0.5 in config.json (no dropout module)."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "run", "--model", str(variants["dropout"]),
                           "--train-file", str(CASES / "17-first-loss-dropout-model.jsonl"), "--partition", "random",
                           "--steps", "2", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning:" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [abs(s["first_loss"] - LN2) < 1e-4 for s in summary["steps"]] == [True, True], summary["steps"]
    for k in (1, 2):
        manifest = json.loads((out / f"step-{k}" / "sdpo_manifest.json").read_text())
        assert manifest["dropout_disabled"]["config"] == {"attention_dropout": 0.5}
        assert json.loads((out / f"step-{k}" / "config.json").read_text())["attention_dropout"] == 0.5


def test_dropout_left_on_is_a_first_loss_warning(tmp_path, variants, monkeypatch):
    """What case 17 did before: the config's attention_dropout on in training, off in the reference
    pass. The step still trains, and says its first loss is not ln 2."""
    monkeypatch.setattr(step_module, "_zero_dropout_in_config", lambda config, prefix="": {})
    monkeypatch.setattr(step_module, "_zero_dropout_in_modules", lambda model: {})
    train = tmp_path / "train.jsonl"
    shutil.copy(CASES / "17-first-loss-dropout-model.jsonl", train)
    events: list[dict] = []
    summary = run_step(_spec(tmp_path, variants["dropout"], train), events.append)
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert (w["code"], w["step"], w["global_step"]) == ("first_loss_not_ln2", 1, 1)
    assert abs(w["first_loss"] - summary["first_loss"]) < 1e-12 and abs(w["first_loss"] - LN2) > 1e-3
    assert re.match(r"first loss 0\.6\d{5} is 0\.\d{6} off ln 2 = 0\.693147 \(tolerance 0\.001\)", w["message"])

