"""The DPO loss family (#18): every loss StepConfig accepts trains a 2-step sDPO job whose first loss,
at every step, is the loss's value at policy = reference, and whose T = 1 losses are plain TRL's.

The expected first losses are computed here, independently of sdpo_engine/losses.py: the closed forms
at zero log-ratios, and for sft the reference's NLL per chosen token from a plain forward pass over
TRL's tokenisation. Each chunk is one batch (8 pairs, batch_size 8), so the first optimizer step's
batch is the whole chunk whatever the data order. The plain-TRL side gets its loss settings in TRL's
own spelling (DPOConfig kwargs), not through StepConfig, so a setting the engine dropped or renamed
(rpo_alpha, say) shows as a difference. The cases marked slow (about 100 s together) run with -m slow.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_engine.config import StepConfig
from sdpo_engine.data import load_pairs
from sdpo_engine.manifest import read_manifest
from sdpo_engine.sample_data import make_pairs, write_jsonl
from sdpo_engine.step import dpo_config, load_policy, run_step, to_trl_rows

LN2 = math.log(2)
BETA = 0.1
BASE = {"learning_rate": 1e-3, "batch_size": 8, "max_length": 96, "beta": BETA, "seed": 0, "n_epochs": 3}


def _case(case_id, hp, trl, slow=True):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(hp, trl, id=case_id, marks=marks)


# (id, our hyperparameters, the same loss in TRL 1.16's DPOConfig spelling)
CASES = [
    _case("sigmoid", {}, {"loss_type": ["sigmoid"]}),
    _case("hinge", {"loss_type": "hinge"}, {"loss_type": ["hinge"]}),
    _case("ipo", {"loss_type": "ipo"}, {"loss_type": ["ipo"]}),
    _case("exo_pair", {"loss_type": "exo_pair", "label_smoothing": 1e-3},
          {"loss_type": ["exo_pair"], "label_smoothing": 1e-3}),
    _case("nca_pair", {"loss_type": "nca_pair"}, {"loss_type": ["nca_pair"]}),
    _case("robust", {"loss_type": "robust", "label_smoothing": 0.1}, {"loss_type": ["robust"], "label_smoothing": 0.1}),
    _case("bco_pair", {"loss_type": "bco_pair"}, {"loss_type": ["bco_pair"]}),
    _case("sppo_hard", {"loss_type": "sppo_hard"}, {"loss_type": ["sppo_hard"]}),
    _case("aot", {"loss_type": "aot", "label_smoothing": 0.1}, {"loss_type": ["aot"], "label_smoothing": 0.1}),
    _case("aot_unpaired", {"loss_type": "aot_unpaired"}, {"loss_type": ["aot_unpaired"]}),
    _case("apo_zero", {"loss_type": "apo_zero"}, {"loss_type": ["apo_zero"]}),
    _case("apo_down", {"loss_type": "apo_down"}, {"loss_type": ["apo_down"]}),
    _case("discopop", {"loss_type": "discopop", "discopop_tau": 0.1}, {"loss_type": ["discopop"], "discopop_tau": 0.1}),
    _case("sft", {"loss_type": "sft"}, {"loss_type": ["sft"]}),
    _case("sigmoid_norm", {"loss_type": "sigmoid_norm"}, {"loss_type": ["sigmoid_norm"]}),
    _case("rpo_alpha", {"rpo_alpha": 0.5}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, slow=False),
    _case("mpo_weighted", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
          {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, slow=False),
    _case("ld_alpha", {"ld_alpha": 0.5}, {"loss_type": ["sigmoid"], "ld_alpha": 0.5}),
    # ld_alpha < 1 hides the plain reference sum from the engine, so it does not check this first loss
    # itself (first_loss_expected None); this test still does, from its own reference pass.
    _case("rpo_ld_alpha", {"rpo_alpha": 1.0, "ld_alpha": 0.5},
          {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "ld_alpha": 0.5}, slow=False),
]


def at_reference(name: str, *, label_smoothing: float, nll: float) -> float:
    """Each TRL 1.16 loss with every log-ratio 0 (dpo_trainer._compute_loss read with delta = 0)."""
    eps = label_smoothing
    return {
        "sigmoid": LN2, "sigmoid_norm": LN2, "aot": LN2, "aot_unpaired": LN2,
        "robust": ((1 - eps) * LN2 - eps * LN2) / (1 - 2 * eps),
        "hinge": 1.0, "ipo": (1 / (2 * BETA)) ** 2, "sppo_hard": 2 * (0.5 / BETA) ** 2,
        "exo_pair": 0.5 * (-LN2 - math.log(1 - eps)) + 0.5 * (-LN2 - math.log(eps)) if eps else math.nan,
        "nca_pair": 2 * LN2, "bco_pair": 2 * LN2, "apo_zero": 1.0, "apo_down": 1.0,
        "discopop": 0.5 * LN2 + 0.5 * math.exp(0), "sft": nll,
    }[name]


def reference_chosen_nll(model_dir, pairs_file, work_dir) -> float:
    """-sum log p_ref(chosen token) / chosen tokens over the chunk: a plain forward pass over TRL's
    tokenisation, truncated keep_start to max_length as TRL does."""
    from datasets import Dataset
    from trl import DPOTrainer

    tokenizer, model = load_policy(model_dir, "cpu")
    rows = to_trl_rows(load_pairs(pairs_file), tokenizer)
    args = dpo_config(StepConfig.from_dict(BASE), str(work_dir), "cpu", precompute_ref_log_probs=False)
    tokenized = DPOTrainer(model=model, ref_model=model.__class__.from_pretrained(model_dir), args=args,
                           train_dataset=Dataset.from_list(rows), processing_class=tokenizer).train_dataset
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for prompt, chosen in zip(tokenized["prompt_ids"], tokenized["chosen_ids"], strict=True):
            seq = (prompt + chosen)[: BASE["max_length"]]
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].double(), dim=-1)
            token_logp = logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
            total += token_logp[len(prompt) - 1:].sum().item()
            tokens += len(seq) - len(prompt)
    return -total / tokens


def expected_first_loss(hp_trl: dict, model_dir, pairs_file, work_dir) -> float:
    weights = hp_trl.get("loss_weights") or [1.0] * len(hp_trl["loss_type"])
    nll = reference_chosen_nll(model_dir, pairs_file, work_dir) if "sft" in hp_trl["loss_type"] else math.nan
    return sum(w * at_reference(name, label_smoothing=hp_trl.get("label_smoothing", 0.0), nll=nll)
               for name, w in zip(hp_trl["loss_type"], weights, strict=True))


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss-family")
    return write_jsonl(make_pairs(4, seed=11), root / "c1.jsonl"), write_jsonl(make_pairs(4, seed=12), root / "c2.jsonl")


def _step(tmp_path, index, policy, chunk, hp, events):
    return run_step({"index": index, "policy_init": str(policy), "train_file": str(chunk),
                     "output_dir": str(tmp_path / f"out-{index}"), "work_dir": str(tmp_path / f"work-{index}"),
                     "hyperparameters": {**BASE, **hp}, "device": "cpu"}, emit=events.append)


@pytest.mark.parametrize(("hp", "trl"), CASES)
def test_loss_starts_at_its_reference_value_every_step_and_t1_is_plain_trl(tmp_path, tiny_model, chunks, hp, trl):
    events: list[dict] = []
    s1 = _step(tmp_path, 1, tiny_model, chunks[0], hp, events)
    s2 = _step(tmp_path, 2, tmp_path / "out-1", chunks[1], hp, events)
    assert not [e for e in events if e["event"] == "warning"], "the engine's own first-loss check fired"

    for summary, reference, chunk in ((s1, tiny_model, chunks[0]), (s2, tmp_path / "out-1", chunks[1])):
        expected = expected_first_loss(trl, reference, chunk, tmp_path / f"nll-{summary['index']}")
        assert summary["first_loss"] == pytest.approx(expected, abs=1e-4), (summary["index"], expected)
        if summary["first_loss_expected"] is not None:  # the engine's own value, where it computes one
            assert summary["first_loss_expected"] == pytest.approx(expected, abs=1e-5)
    assert (s1["first_loss_expected"] is None) == ("sft" in trl["loss_type"] and trl.get("ld_alpha") is not None)
    assert s1["last_loss"] != s1["first_loss"], "the step did not train"

    manifest = read_manifest(tmp_path / "out-2")
    resolved = StepConfig.from_dict({**BASE, **hp})
    assert manifest["config"]["loss_type"] == resolved.loss_type and resolved.loss_types == trl["loss_type"]
    for key in ("loss_weights", "label_smoothing", "ld_alpha", "discopop_tau"):
        assert manifest["config"][key] == getattr(resolved, key)

    # T = 1 is plain TRL with the same loss: reference model in memory, no precompute, no packing.
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import DPOTrainer

    ours = [e["loss"] for e in events if e["event"] == "metrics" and e["step"] == 1]
    set_seed(BASE["seed"])
    tokenizer, policy = load_policy(tiny_model, "cpu")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32")
    args = dpo_config(StepConfig.from_dict(BASE), str(tmp_path / "plain"), "cpu", precompute_ref_log_probs=False,
                      **{"loss_weights": None, "label_smoothing": 0.0, "ld_alpha": None, "discopop_tau": 0.05,
                         **trl})
    plain = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_list(to_trl_rows(load_pairs(chunks[0]), tokenizer)))
    plain.train()
    theirs = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == BASE["n_epochs"]
    # 1e-5, relative above 1: sppo_hard starts at 1/(2 beta^2) = 50, where float32 steps by 3.8e-6.
    assert all(abs(a - b) < 1e-5 * max(1.0, abs(b)) for a, b in zip(ours, theirs, strict=True)), (ours, theirs)


def test_first_loss_check_uses_the_losss_reference_value():
    """The engine's check (step._callbacks) warns when the first loss is off the chosen loss's value at
    policy = reference, read when the first optimizer step has been logged, and is silent within 1e-3."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from sdpo_engine.step import _callbacks, _StopRequest, expected_first_loss

    cfg = StepConfig.from_dict({"loss_type": ["hinge", "sft"], "loss_weights": [2.0, 0.5]})
    recorder = SimpleNamespace(first_step_reference_nll=[])  # filled while the first step runs
    events: list[dict] = []
    guard = _callbacks(1, events.append, _StopRequest(None),
                       first_loss_expected=lambda: expected_first_loss(cfg, recorder))[1]
    recorder.first_step_reference_nll += [3.0, 5.0]  # two micro-batches: mean NLL 4
    expected = 2.0 * 1.0 + 0.5 * 4.0
    assert expected_first_loss(cfg, recorder) == pytest.approx(expected)
    state = TrainerState()
    state.global_step = 1
    guard.on_log(None, state, TrainerControl(), logs={"loss": expected + 5e-4})
    assert events == []
    guard.on_log(None, state, TrainerControl(), logs={"loss": expected + 0.01})
    [warning] = events
    assert (warning["code"], warning["expected"]) == ("first_loss_not_ln2", pytest.approx(expected))
    assert "off its value at policy = reference = 4.000000" in warning["message"]
    # Unknown (no sft NLL recorded, e.g. a resumed step or ld_alpha < 1): nothing to check against.
    assert expected_first_loss(cfg, SimpleNamespace(first_step_reference_nll=[None])) is None
    assert expected_first_loss(StepConfig.from_dict({"loss_type": "ipo", "beta": 0.5})) == pytest.approx(1.0)


@pytest.mark.parametrize(("flags", "words"), [
    (["--loss-type", "sigmoid,sft", "--loss-weights", "1"], "loss_weights: 1 weight(s) for 2 loss(es)"),
    (["--loss-type", "simpo"], "loss_type: SimPO ('simpo') is refused: it is reference-free"),
    (["--rpo-alpha", "0.5", "--loss-type", "ipo"], "rpo_alpha: rpo_alpha means loss_type"),
    (["--label-smoothing", "0.2"], "label_smoothing: sigmoid ignore(s) it"),
])
def test_cli_refuses_bad_loss_settings_with_stepconfigs_error(tmp_path, chunks, flags, words, capsys):
    """`python -m sdpo_engine run`'s entry point, in process (the flags parse, StepConfig refuses)."""
    from sdpo_engine.cli import main

    code = main(["run", "--model", str(tmp_path / "unused"), "--step-file", str(chunks[0]),
                 "--out", str(tmp_path / "out"), *flags])
    stderr = capsys.readouterr().err
    assert code == 2 and f"error: {words}" in stderr, stderr[-2000:]
    assert not (tmp_path / "out" / "step-1").exists()
