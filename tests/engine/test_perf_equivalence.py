"""The engine's speedups keep TRL's math.

Shared-prompt packing (sdpo_engine/packing.py) runs a pair as one sequence (prompt once, then the
chosen and the rejected branch under a block mask, positions restarting after the prompt). Proven
here, for every model family it is enabled on:
- in float64, token by token, the packed log-probs are the two-sequence log-probs (1e-9; 1e-6 with
  the eager attention, whose softmax is float32): the same math, not an approximation;
- in float32 through the trainer: per-pair reference log-probs within 1e-5, and the loss, every
  logged metric and every gradient of a training batch within 1e-4 of TRL's two-sequence path
  (also with a LoRA adapter and with the eager attention);
- families or settings not proven fall back to TRL's two sequences.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_engine import packing
from sdpo_engine.config import StepConfig
from sdpo_engine.data import load_pairs
from sdpo_engine.step import build_trainer, dpo_config, load_policy, run_step, to_trl_rows

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Edge cases at the token level: one-token prompt, empty prompt, answers of different lengths, answers
# truncated by max_length (prompt 5 + answers up to 9 > 12), a chosen answer that is a prefix of the rejected.
EDGE_EXAMPLES = [
    {"prompt_ids": [5, 6, 7, 8, 9], "chosen_ids": [10, 11, 12], "rejected_ids": [13, 14, 15, 16, 17, 18, 19, 20, 21]},
    {"prompt_ids": [30], "chosen_ids": [31, 32, 33, 34], "rejected_ids": [35]},
    {"prompt_ids": [], "chosen_ids": [40, 41, 42], "rejected_ids": [43, 44]},
    {"prompt_ids": [50, 51, 52], "chosen_ids": [53, 54], "rejected_ids": [53, 54, 55, 56]},
]


def _family_model(root, family: str, tiny_model, *, attn: str = "sdpa"):
    """A tiny random model of `family` (GQA: 4 heads, 2 key/value heads) with the tiny tokenizer, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = root / f"{family}-{attn}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tiny_model)
    extra = {"sliding_window": None} if family == "mistral" else {}
    config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512, tie_word_embeddings=True,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _two_sequence_logps64(model, examples, max_length):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length)(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    return logp.masked_fill(~mask, 0), mask


def _packed_logps64(model, examples, max_length, two_seq_mask, row_tokens=None):
    packed = packing.pack_examples(examples, pad_token_id=0, max_length=max_length, row_tokens=row_tokens)
    ids = packed["packed_input_ids"]
    mask4d = packing.block_mask(packed["packed_segments"], model.config._attn_implementation, model.dtype)
    hidden = model.base_model(input_ids=ids, attention_mask=mask4d, position_ids=packed["packed_position_ids"]).last_hidden_state
    src = packed["packed_src_row"] * ids.shape[1] + packed["packed_src_col"]
    logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[src])
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, ids.reshape(-1)[src + 1][:, None]).squeeze(-1)
    return torch.zeros(two_seq_mask.shape, dtype=per_token.dtype).masked_scatter(two_seq_mask, per_token), packed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_log_probs_are_the_two_sequence_log_probs_in_float64(family, attn, tiny_model, family_root):
    from transformers import AutoModelForCausalLM

    path = tiny_model if (family, attn) == ("llama", "sdpa") else _family_model(family_root, family, tiny_model,
                                                                                  attn=attn)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation=attn).eval()
    assert packing.packing_unsupported(model, dpo_config(StepConfig(), str(family_root / "x"), "cpu")) is None
    # row_tokens None: one pair per row; 25: several pairs in some rows, one alone (a pair longer than
    # the budget); 1000: every pair in one row
    for max_length, row_tokens in ((None, None), (12, None), (None, 25), (12, 25), (None, 1000)):
        with torch.no_grad():
            two_seq, mask = _two_sequence_logps64(model, EDGE_EXAMPLES, max_length)
            packed_lp, packed = _packed_logps64(model, EDGE_EXAMPLES, max_length, mask, row_tokens)
        assert int(mask.sum()) == packed["packed_src_row"].numel() > 0
        if row_tokens:
            rows = packed["packed_input_ids"].shape[0]
            assert rows < len(EDGE_EXAMPLES) and (rows == 1) == (row_tokens == 1000)
            assert packed["packed_segments"].ge(0).sum(1).max() <= max(row_tokens, 18)
        # eager attention takes its softmax in float32 even for a float64 model: float32 rounding there
        assert (two_seq - packed_lp).abs().max().item() < (1e-9 if attn == "sdpa" else 1e-6)
        # the prompt is computed once: fewer tokens than the two sequences
        assert packed["packed_segments"].ge(0).sum() < sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"])
                                                              + len(e["rejected_ids"]) for e in EDGE_EXAMPLES)


def _trainer(path, rows_file, tmp_path, *, pack, lora=False, pack_tokens=0, **cfg_overrides):
    from transformers import set_seed

    cfg = StepConfig.from_dict({"batch_size": 4, "max_length": 48, "learning_rate": 1e-3, "seed": 0})
    set_seed(0)
    tok, model = load_policy(path, "cpu")
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = dpo_config(cfg, str(tmp_path / f"t-{pack}"), "cpu", **cfg_overrides)
    return build_trainer(model, tok, to_trl_rows(load_pairs(rows_file), tok), args, peft_config=peft_config, pack=pack,
                         pack_tokens=pack_tokens)


def _loss_metrics_grads(trainer, rows):
    trainer.model.train()
    trainer._metrics["train"].clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trainer.model.zero_grad(set_to_none=True)
    gathered = []
    gather = trainer.accelerator.gather
    trainer.accelerator.gather = lambda t: (gathered.append(t.detach().clone()), gather(t))[1]
    try:
        loss = trainer.compute_loss(trainer.model, batch)
    finally:
        trainer.accelerator.gather = gather
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    # TRL 1.16's _compute_loss gathers, last: chosen rewards, rejected rewards, accuracies, margins,
    # chosen log-probs, rejected log-probs
    chosen, rejected = gathered[-6], gathered[-5]
    assert chosen.shape == rejected.shape == (len(rows),)
    metrics["per_pair_margins"] = (chosen - rejected).tolist()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), metrics, grads


def _move_policy(trainer, seed: int = 1) -> None:
    """The same seeded nudge to both trainers' trainable weights, after the reference log-probs were
    taken. Untouched, the policy *is* the reference: every reward is 0 up to rounding, and
    rewards/accuracies (chosen reward > rejected reward) would compare rounding noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(trainer.model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.02)


def _assert_same_training(packed, plain):
    assert packed.packed and not plain.packed
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        a, b = torch.tensor(packed.train_dataset[col]), torch.tensor(plain.train_dataset[col])
        assert a.shape == b.shape and a.numel() > 0
        assert (a - b).abs().max().item() < 1e-5, col
    _move_policy(packed)
    _move_policy(plain)
    n = len(packed.train_dataset)
    for rows in (list(range(0, min(4, n))), list(range(max(0, n - 4), n))):
        loss_a, metrics_a, grads_a = _loss_metrics_grads(packed, rows)
        loss_b, metrics_b, grads_b = _loss_metrics_grads(plain, rows)
        assert abs(loss_a - loss_b) < 1e-4
        assert set(metrics_a) == set(metrics_b)
        margins_a, margins_b = metrics_a.pop("per_pair_margins"), metrics_b.pop("per_pair_margins")
        assert max(abs(x - y) for x, y in zip(margins_a, margins_b, strict=True)) < 1e-5
        # rewards/accuracies counts chosen reward > rejected reward: a pair whose two answers are cut
        # to the same tokens by max_length ties at 0, and rounding decides it. Compare it on the
        # pairs that are not ties; everything else must match as a whole.
        decided = [i for i, m in enumerate(margins_b) if abs(m) > 1e-5]
        assert [margins_a[i] > 0 for i in decided] == [margins_b[i] > 0 for i in decided]
        assert decided, "every pair tied: the comparison proves nothing"
        for key in metrics_a:
            if key == "rewards/accuracies" and len(decided) < len(margins_b):
                continue
            assert math.isclose(metrics_a[key], metrics_b[key], rel_tol=1e-4, abs_tol=1e-4), key
        assert set(grads_a) == set(grads_b) and grads_a
        worst = max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
        assert worst < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_training_equals_two_sequence_training(family, tiny_model, family_root, pairs_file, tmp_path):
    path = tiny_model if family == "llama" else _family_model(family_root, family, tiny_model)
    packed = _trainer(path, pairs_file, tmp_path, pack=True)
    plain = _trainer(path, pairs_file, tmp_path, pack=False)
    _assert_same_training(packed, plain)


def test_packed_training_equals_two_sequence_training_eager_and_lora(tiny_model, family_root, pairs_file, tmp_path):
    eager = _family_model(family_root, "llama", tiny_model, attn="eager")
    _assert_same_training(_trainer(eager, pairs_file, tmp_path, pack=True),
                          _trainer(eager, pairs_file, tmp_path, pack=False))
    _assert_same_training(_trainer(tiny_model, pairs_file, tmp_path, pack=True, lora=True),
                          _trainer(tiny_model, pairs_file, tmp_path, pack=False, lora=True))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_several_pairs_per_row_train_like_two_sequences(family, tiny_model, family_root, pairs_file, tmp_path):
    """Padding-free packing of several pairs per row (block-diagonal mask, positions restarting per
    pair): the same reference log-probs, loss, metrics and gradients as TRL's two sequences, with rows
    holding every pair of the batch (4096) and with a budget that splits the batch over rows (70)."""
    path = tiny_model if family == "llama" else _family_model(family_root, family, tiny_model)
    plain = _trainer(path, pairs_file, tmp_path / "plain", pack=False)
    for budget in (4096, 70):
        multi = _trainer(path, pairs_file, tmp_path / f"multi-{budget}", pack=True, pack_tokens=budget)
        batch = multi.data_collator([multi.train_dataset[i] for i in range(4)])
        rows, width = batch["packed_input_ids"].shape
        assert rows == 1 if budget == 4096 else 1 < rows < 4
        assert width <= max(budget, int(batch["packed_segments"].ge(0).sum(1).max()))
        _assert_same_training(multi, plain)
        plain = _trainer(path, pairs_file, tmp_path / f"plain-{budget}", pack=False)  # _move_policy moved it


def test_several_pairs_per_row_eager_and_lora(tiny_model, family_root, pairs_file, tmp_path):
    eager = _family_model(family_root, "llama", tiny_model, attn="eager")
    _assert_same_training(_trainer(eager, pairs_file, tmp_path / "e1", pack=True, pack_tokens=4096),
                          _trainer(eager, pairs_file, tmp_path / "e2", pack=False))
    _assert_same_training(_trainer(tiny_model, pairs_file, tmp_path / "l1", pack=True, lora=True, pack_tokens=4096),
                          _trainer(tiny_model, pairs_file, tmp_path / "l2", pack=False, lora=True))


def test_rounded_batch_length_trains_the_same(tiny_model, pairs_file, tmp_path):
    """On a GPU the engine rounds every batch's length up to a multiple of 64 (fewer tensor shapes for
    the attention kernels to plan); the padding is masked, so training is unchanged."""
    from sdpo_engine.step import SpecError, StepSpec, pad_to_multiple_of

    assert pad_to_multiple_of(True) == 64 and pad_to_multiple_of(False) is None
    assert pad_to_multiple_of(True, 0) is None and pad_to_multiple_of(False, 8) == 8
    # The setting comes from the step spec (the worker's SDPO_PAD_TO_MULTIPLE_OF), checked there.
    spec = {"index": 1, "policy_init": str(tiny_model), "train_file": str(pairs_file),
            "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work")}
    for bad in ("sixty", -1, 4097, True):
        with pytest.raises(SpecError, match="pad_to_multiple_of"):
            StepSpec.from_dict({**spec, "pad_to_multiple_of": bad})
    rounded = _trainer(tiny_model, pairs_file, tmp_path / "rounded", pack=True, pad_to_multiple_of=64)
    batch = rounded.data_collator([rounded.train_dataset[i] for i in range(4)])
    assert batch["packed_input_ids"].shape[1] % 64 == 0 and batch["input_ids"].shape[1] % 64 == 0
    _assert_same_training(rounded, _trainer(tiny_model, pairs_file, tmp_path / "plain", pack=False))


def test_not_proven_settings_fall_back_to_two_sequences(tiny_model, family_root, pairs_file, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    keep_end = _trainer(tiny_model, pairs_file, tmp_path, pack=True, truncation_mode="keep_end")
    assert not keep_end.packed and "keep_end" in keep_end.packing

    tok = AutoTokenizer.from_pretrained(tiny_model)
    gpt2 = family_root / "gpt2"
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    other = _trainer(gpt2, pairs_file, tmp_path, pack=True)
    assert not other.packed and "gpt2" in other.packing
    other.train()  # the two-sequence path still trains

    tok, model = load_policy(tiny_model, "cpu")
    off = build_trainer(model, tok, to_trl_rows(load_pairs(pairs_file), tok),
                        dpo_config(StepConfig(), str(tmp_path / "off"), "cpu"), pack=False)
    assert not off.packed and "SDPO_PACKING" in off.packing


def test_step_reports_packing_and_starts_at_ln2(tmp_path, tiny_model, pairs_file):
    events = []
    run_step({"index": 1, "policy_init": str(tiny_model), "train_file": str(pairs_file),
              "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
              "hyperparameters": {"batch_size": 4, "max_length": 48, "learning_rate": 1e-3}, "device": "cpu"},
             emit=events.append)
    ref = next(e for e in events if e.get("phase") == "reference_logps")
    assert ref["packing"] == "shared_prompt"
    first = next(e for e in events if e["event"] == "metrics")
    assert abs(first["loss"] - math.log(2)) < 1e-6
    # 0 up to float32 rounding: a pair's row neighbours differ between the length-sorted reference pass and
    # training with several pairs per row (as in test_step.py; seen 1.9e-07).
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


def test_activation_checkpointing_only_where_memory_needs_it(tmp_path, tiny_model, pairs_file, monkeypatch):
    """Off while the activations fit; on when they would not (same losses either way)."""
    from sdpo_engine import step as step_module

    def run(tag):
        events = []
        run_step({"index": 1, "policy_init": str(tiny_model), "train_file": str(pairs_file),
                  "output_dir": str(tmp_path / f"out-{tag}"), "work_dir": str(tmp_path / f"work-{tag}"),
                  "hyperparameters": {"batch_size": 4, "max_length": 48, "learning_rate": 1e-3}, "device": "cpu"},
                 emit=events.append)
        memory = next(e for e in events if e.get("phase") == "memory")
        return memory, [e["loss"] for e in events if e["event"] == "metrics"]

    roomy, losses = run("roomy")
    assert roomy["activation_checkpointing"] is False and 0 < roomy["activation_estimate_mb"] < roomy["free_mb"]
    monkeypatch.setattr(step_module, "free_memory_bytes", lambda device: 1 << 20)
    tight, tight_losses = run("tight")
    assert tight["activation_checkpointing"] is True
    assert max(abs(a - b) for a, b in zip(losses, tight_losses, strict=True)) < 1e-5


def test_the_collator_picks_the_cheaper_layout_per_batch():
    """With the model's width, pack_tokens is a cap: a batch of equal-length pairs (no padding to remove)
    stays one pair per row, whose rows are short; a batch of a few long and many short pairs puts the short
    ones together in rows no longer than the longest pair (nothing gets longer, rows go away). Without the
    width, first-fit into rows of pack_tokens as before."""
    even = [64] * 8
    assert packing._rows_for(even, 2048, hidden_size=512) == [[i] for i in range(8)]
    assert len(packing._rows_for(even, 2048)) == 1  # first-fit alone: one row of 512 tokens
    skewed = [120] + [12] * 7
    rows = packing._rows_for(skewed, 2048, hidden_size=512)
    assert len(rows) < len(skewed) and sorted(i for row in rows for i in row) == list(range(8))
    chosen = packing.layout_cost(rows, skewed, 512)
    assert chosen < packing.layout_cost([[i] for i in range(8)], skewed, 512)
    assert chosen <= packing.layout_cost(packing._first_fit(skewed, 2048), skewed, 512)
    assert max(sum(skewed[i] for i in row) for row in rows) <= 2048
    assert packing._rows_for(skewed, 0, hidden_size=512) == [[i] for i in range(8)]  # 0: one pair per row
