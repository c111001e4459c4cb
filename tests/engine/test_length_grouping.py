"""Length-grouped training batches (the step spec's `group_by_length`, sdpo_engine/batching.py) and a
larger reference-pass batch (`reference_batch_size`), issues #19 and #21.

- Off, the trainer deals the pairs in TRL's order exactly: the same index batches as TRL's own
  DPOTrainer on the same data and seed, epoch by epoch.
- On, every epoch is still every pair exactly once, in micro-batches of the same sizes, the order a
  function of the seed and the epoch only; on a skewed length mix (most pairs short, a few long) the
  tokens computed per unique token (one pair per packed row) are lower than in TRL's order.
- Under accelerate's shard for 2 ranks, the ranks' slices of each global micro-batch are the
  one-process micro-batch (the 2-gloo-rank step against one process is the slow test at the end).
- The reference log-probs do not depend on `reference_batch_size` (1e-6 relative, float32).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdpo_engine import packing
from sdpo_engine.batching import LengthGroupedOrder, length_grouped_order
from sdpo_engine.config import StepConfig
from sdpo_engine.data import load_pairs
from sdpo_engine.protocol import MAX_REFERENCE_BATCH_SIZE, SpecError, StepSpec, check_training_settings
from sdpo_engine.sample_data import make_pairs, write_jsonl
from sdpo_engine.step import build_trainer, dpo_config, load_policy, to_trl_rows

REPO = Path(__file__).resolve().parents[2]
FILLER = "Please read the whole context below with care before you answer the question at the end. "
HPARAMS = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 256, "beta": 0.1, "seed": 0, "n_epochs": 2}


@pytest.fixture()
def skewed_file(tmp_path):
    """24 pairs: most short, one in six with a long shared context (as bench/step_vs_trl.py's skewed shape)."""
    pairs = make_pairs(12, seed=7)
    rng = random.Random(3)
    for i in rng.sample(range(len(pairs)), 4):
        pairs[i]["prompt"] = FILLER * 3 + pairs[i]["prompt"]
    return write_jsonl(pairs, tmp_path / "skewed.jsonl")


def _trainer(model_dir, data, tmp, *, group_by_length=False, pack_tokens=0, **hp):
    cfg = StepConfig.from_dict({**HPARAMS, **hp})
    tok, model = load_policy(model_dir, "cpu")
    args = dpo_config(cfg, str(tmp), "cpu")
    return build_trainer(model, tok, to_trl_rows(load_pairs(data), tok), args, pack=True, pack_tokens=pack_tokens,
                         group_by_length=group_by_length)


def _epoch_batches(trainer, epoch: int) -> list[list[int]]:
    """The index batches the trainer's dataloader deals in `epoch` (what its sampler yields, batched)."""
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)
    return [list(map(int, b)) for b in loader.batch_sampler]


def _tokens_computed(trainer, batches: list[list[int]]) -> int:
    """Tokens of the packed tensors the collator builds for `batches` (padding included)."""
    return sum(trainer.data_collator([trainer.train_dataset[i] for i in b])["packed_input_ids"].numel()
               for b in batches)


# ---------------------------------------------------------------------------------------------
# The order itself (no model)


def test_grouped_order_is_a_seeded_permutation_with_the_same_batch_sizes():
    rng = random.Random(0)
    lengths = [rng.choice([20, 22, 25, 30]) if rng.random() < 0.85 else rng.randint(150, 300) for _ in range(203)]
    bs = 8
    for epoch in (0, 1, 2):
        order = length_grouped_order(lengths, bs, seed=5, epoch=epoch)
        assert sorted(order) == list(range(len(lengths)))  # every pair exactly once
        assert order == length_grouped_order(lengths, bs, seed=5, epoch=epoch)  # a function of seed and epoch
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        assert [len(b) for b in batches] == [bs] * 25 + [3]  # TRL's sizes: full batches, then the short one
        assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest pair first
    assert length_grouped_order(lengths, bs, seed=5, epoch=0) != length_grouped_order(lengths, bs, seed=5, epoch=1)
    assert length_grouped_order(lengths, bs, seed=5) != length_grouped_order(lengths, bs, seed=6)

    def padded(order):  # one pair per row: every row padded to the batch's longest
        return sum(len(b) * max(lengths[i] for i in b) for b in (order[i:i + bs] for i in range(0, len(order), bs)))

    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(5)).tolist()
    assert padded(length_grouped_order(lengths, bs, seed=5)) < 0.6 * padded(shuffled)
    # Corner cases: fewer pairs than a batch, exactly one batch, no pairs.
    assert sorted(length_grouped_order([3, 1, 2], 8, seed=0)) == [0, 1, 2]
    assert sorted(length_grouped_order(list(range(8)), 8, seed=0)) == list(range(8))
    assert length_grouped_order([], 8, seed=0) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_order([1, 2], 0, seed=0)


def test_two_ranks_slices_of_a_grouped_micro_batch_are_the_one_process_micro_batch():
    """accelerate's BatchSamplerShard (what `accelerator.prepare` wraps the sampler in on N ranks) gives
    rank r the per-rank batches r, r + N, ...: with the global batch as the grouping unit, the two ranks'
    batches of each micro-step together are the one-process micro-batch, on both epochs."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    lengths = [random.Random(i).randint(5, 200) for i in range(64)]
    one = LengthGroupedOrder(lengths, 8, seed=1)
    ranks = [LengthGroupedOrder(lengths, 8, seed=1) for _ in range(2)]
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        one_process = list(BatchSampler(one, 8, drop_last=False))
        shards = [list(BatchSamplerShard(BatchSampler(s, 4, drop_last=False), num_processes=2, process_index=r))
                  for r, s in enumerate(ranks)]
        assert len(shards[0]) == len(shards[1]) == len(one_process)
        for step, batch in enumerate(one_process):
            assert shards[0][step] + shards[1][step] == batch


def test_settings_are_checked_and_recorded(tiny_model, tmp_path):
    spec = {"index": 1, "policy_init": str(tiny_model), "train_file": str(write_jsonl(make_pairs(2), tmp_path / "d.jsonl")),
            "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work")}
    default = StepSpec.from_dict(spec).training_settings()
    assert default["group_by_length"] is False and default["reference_batch_size"] is None
    on = StepSpec.from_dict({**spec, "group_by_length": True, "reference_batch_size": 64}).training_settings()
    assert on["group_by_length"] is True and on["reference_batch_size"] == 64
    check_training_settings(reference_batch_size=MAX_REFERENCE_BATCH_SIZE)
    for bad in ("yes", 1, None):
        with pytest.raises(SpecError, match="group_by_length"):
            StepSpec.from_dict({**spec, "group_by_length": bad})
    for bad in (0, -1, MAX_REFERENCE_BATCH_SIZE + 1, True, "64", 2.0):
        with pytest.raises(SpecError, match="reference_batch_size"):
            StepSpec.from_dict({**spec, "reference_batch_size": bad})


# ---------------------------------------------------------------------------------------------
# Through the trainer (tiny model)


def test_off_deals_trls_order_exactly(tiny_model, skewed_file, tmp_path):
    """group_by_length false: the same index batches as TRL's own DPOTrainer (no engine code) on the same
    data, seed and batch size, on two epochs."""
    from datasets import Dataset
    from trl import DPOTrainer

    ours = _trainer(tiny_model, skewed_file, tmp_path / "ours")
    assert len(ours.train_dataset) == 24 and not ours.pairs_dropped
    tok, model = load_policy(tiny_model, "cpu")
    args = dpo_config(StepConfig.from_dict(HPARAMS), str(tmp_path / "trl"), "cpu")
    theirs = DPOTrainer(model=model, args=args, processing_class=tok,
                        train_dataset=Dataset.from_list(to_trl_rows(load_pairs(skewed_file), tok)))
    for epoch in (0, 1):
        mine = _epoch_batches(ours, epoch)
        assert mine == _epoch_batches(theirs, epoch)
        assert mine != sorted(mine)  # a shuffled order, not the file's
    assert _epoch_batches(ours, 0) != _epoch_batches(ours, 1)


def test_on_every_pair_once_same_batch_sizes_seeded_and_less_padding(tiny_model, skewed_file, tmp_path):
    off = _trainer(tiny_model, skewed_file, tmp_path / "off")
    on = _trainer(tiny_model, skewed_file, tmp_path / "on", group_by_length=True)
    again = _trainer(tiny_model, skewed_file, tmp_path / "again", group_by_length=True)
    other_seed = _trainer(tiny_model, skewed_file, tmp_path / "seed", group_by_length=True, seed=1)
    n = len(on.train_dataset)
    rows = on.train_dataset
    unique = sum(sum(packing.truncated_lengths({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, 256))
                 for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True))
    ratios = {"off": [], "on": []}
    for epoch in (0, 1):
        grouped = _epoch_batches(on, epoch)
        plain = _epoch_batches(off, epoch)
        assert sorted(i for b in grouped for i in b) == list(range(n))  # every pair exactly once
        assert [len(b) for b in grouped] == [len(b) for b in plain] == [4] * 6
        assert grouped == _epoch_batches(again, epoch)  # deterministic with the seed
        assert grouped != _epoch_batches(other_seed, epoch) and grouped != plain
        ratios["on"].append(_tokens_computed(on, grouped) / unique)
        ratios["off"].append(_tokens_computed(off, plain) / unique)
    assert _epoch_batches(on, 0) != _epoch_batches(on, 1)
    # One pair per row: a long pair pads every short row of its batch in TRL's order.
    for r_on, r_off in zip(ratios["on"], ratios["off"], strict=True):
        assert r_on < r_off, ratios
    assert sum(ratios["on"]) < 0.8 * sum(ratios["off"]), ratios


def test_reference_log_probs_do_not_depend_on_the_reference_batch(tiny_model, skewed_file, tmp_path):
    """The engine's reference pass (`_precompute_ref_logps`, the batch size `reference_batch_size` sets) with
    2 and 64 pairs per batch against the default 8 (max(batch_size, 8)), one pair per row and several: the
    same per-pair log-probs within 1e-6 of their value (float32)."""
    for pack_tokens in (0, None):
        trainer = _trainer(tiny_model, skewed_file, tmp_path / f"ref-{pack_tokens}", pack_tokens=pack_tokens)
        assert trainer.args.precompute_ref_batch_size == 8
        base = trainer.train_dataset
        bare = base.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
        for size in (2, 64):
            other = trainer._precompute_ref_logps(bare, "train", size)
            for col in ("ref_chosen_logps", "ref_rejected_logps"):
                a, b = torch.tensor(base[col]), torch.tensor(other[col])
                assert a.shape == b.shape == (24,) and a.dtype == torch.float32
                assert a.abs().min() > 1  # summed log-probs, not zeros
                # 1e-6 of the value: a float32 sum of magnitude 32-64 has a spacing (ulp) of 3.8e-6, and
                # another batch's padding width changes the matmul's blocking by an ulp or so (seen: 1 ulp).
                worst = ((a - b).abs() / a.abs()).max().item()
                assert worst <= 1e-6, (pack_tokens, size, col, worst)


def test_step_trains_grouped_with_a_larger_reference_batch_and_records_both(tiny_model, skewed_file, tmp_path):
    from sdpo_engine.manifest import read_manifest
    from sdpo_engine.step import run_step

    events: list[dict] = []
    run_step({"index": 1, "policy_init": str(tiny_model), "train_file": str(skewed_file),
              "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"), "device": "cpu",
              "hyperparameters": {**HPARAMS, "n_epochs": 1, "batch_size": 8}, "group_by_length": True,
              "reference_batch_size": 32},
             emit=events.append)
    losses = [e["loss"] for e in events if e["event"] == "metrics"]
    assert len(losses) == 3 and abs(losses[0] - math.log(2)) < 1e-3
    manifest = read_manifest(tmp_path / "out")
    assert manifest["training_settings"]["group_by_length"] is True
    assert manifest["training_settings"]["reference_batch_size"] == 32
    assert manifest["training_applied"]["group_by_length"] is True
    assert manifest["training_applied"]["reference_batch_size"] == 32


@pytest.mark.slow
def test_two_gloo_ranks_train_grouped_like_one_process(tiny_model, skewed_file, tmp_path):
    """The real launcher with 2 DDP ranks and group_by_length: every rank computes the same order, and the
    step's losses are the one-process grouped step's (1e-5), so the ranks dealt the same batches."""
    runs = {}
    for name, dist in (("one", None), ("two", {"num_processes": 2, "strategy": "ddp"})):
        spec = {"index": 1, "policy_init": str(tiny_model), "train_file": str(skewed_file),
                "output_dir": str(tmp_path / name / "out"), "work_dir": str(tmp_path / name / "work"),
                "device": "cpu", "hyperparameters": HPARAMS, "group_by_length": True, "distributed": dist}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(spec))
        out = subprocess.run([sys.executable, "-m", "sdpo_engine", "step", str(path)], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        runs[name] = [e["loss"] for e in lines if e.get("event") == "metrics"]
    assert len(runs["one"]) == len(runs["two"]) == 12
    assert max(abs(a - b) for a, b in zip(runs["one"], runs["two"], strict=True)) <= 1e-5, runs
