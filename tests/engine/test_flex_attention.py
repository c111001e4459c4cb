"""FlexAttention on the packed layout (the step spec's `attention: "flex"`, sdpo_engine/flex.py) keeps
the math of the dense-mask sdpa path and of TRL's two sequences.

Proven here on CPU, where torch runs `flex_attention` eagerly (its unfused reference implementation:
the score matrix masked by the BlockMask's mask_mod; the fused kernels need CUDA):
- the BlockMask is the dense mask, element by element, and skips the blocks of other pairs;
- in float64, token by token, the packed log-probs under FlexAttention are the two-sequence
  log-probs (1e-9), and so are their gradients, with one and several pairs per row, uneven lengths,
  truncation and rounded rows (llama and qwen3 here, qwen2 through the trainer: every family calls
  the attention interface the same way, and mistral's attention is llama's);
- in float32 through the trainer: per-pair reference log-probs within 1e-5, loss, metrics and every
  gradient of a training batch within 1e-4 of TRL's two-sequence path (test_perf_equivalence's
  tolerances), with one and with several pairs per row;
- every forward that is not packed (two sequences, generation) runs sdpa, unchanged;
- the spec refuses flex where it cannot run (no packing, CPU).

torch refuses `flex_attention`'s backward on CPU outright (a check before it runs; its compiled CPU
kernel has none). The gradient tests lift that check (`flex_backward_on_cpu`): torch's eager
implementation then differentiates its own math (the HOP's dense autograd, the reference its CUDA
kernels are tested against). The fused CUDA kernels themselves are compared in
`test_flex_on_cuda_trains_like_two_sequences` (CUDA only) and by the device script.
"""

from __future__ import annotations

import pytest
import torch

from sdpo_engine import flex, packing
from sdpo_engine.config import StepConfig
from sdpo_engine.data import load_pairs
from sdpo_engine.step import SpecError, StepSpec, build_trainer, dpo_config, load_policy, to_trl_rows
from tests.engine.test_perf_equivalence import (
    EDGE_EXAMPLES,
    _assert_same_training,
    _family_model,
    _two_sequence_logps64,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Uneven lengths, several pairs per row: EDGE_EXAMPLES plus pairs whose prompt and answers differ widely.
UNEVEN = EDGE_EXAMPLES + [
    {"prompt_ids": list(range(60, 80)), "chosen_ids": [81], "rejected_ids": list(range(82, 95))},
    {"prompt_ids": [100, 101], "chosen_ids": list(range(102, 120)), "rejected_ids": [121, 122]},
]
# (max_length, row_tokens, pad_to_multiple_of): one pair per row; several pairs in some rows (25) with
# truncation; every pair in one row; rows rounded up to 64 as on a GPU (padding tail in every row)
LAYOUTS = ((None, None, None), (12, 25, None), (None, 1000, None), (None, 40, 64))


@pytest.fixture()
def flex_backward_on_cpu(monkeypatch):
    """Let torch's eager flex_attention differentiate on CPU (see the module docstring)."""
    import torch.nn.attention.flex_attention as torch_flex

    checked = torch_flex._validate_device

    def validate(query, key, value):
        if query.device.type != "cpu":
            checked(query, key, value)

    monkeypatch.setattr(torch_flex, "_validate_device", validate)


def _flex_model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=flex.register()).eval()


def _packed_logps(model, examples, max_length, two_seq_mask, row_tokens, pad_to, impl=flex.FLEX_ATTENTION):
    """Per-token log-probs of the packed batch, in the two-sequence layout, under packing.block_mask's
    mask for `impl` (the flex-loaded model runs a dense "sdpa" mask through sdpa)."""
    packed = packing.pack_examples(examples, pad_token_id=0, max_length=max_length, row_tokens=row_tokens,
                                   pad_to_multiple_of=pad_to)
    ids = packed["packed_input_ids"]
    mask = packing.block_mask(packed["packed_segments"], impl, model.dtype)
    hidden = model.base_model(input_ids=ids, attention_mask=mask,
                              position_ids=packed["packed_position_ids"]).last_hidden_state
    src = packed["packed_src_row"] * ids.shape[1] + packed["packed_src_col"]
    logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[src])
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, ids.reshape(-1)[src + 1][:, None]).squeeze(-1)
    return torch.zeros(two_seq_mask.shape, dtype=per_token.dtype).masked_scatter(two_seq_mask, per_token), mask


def test_block_mask_is_the_dense_mask_and_skips_other_pairs():
    from torch.nn.attention.flex_attention import BlockMask

    for max_length, row_tokens, pad_to in LAYOUTS:
        packed = packing.pack_examples(UNEVEN, pad_token_id=0, max_length=max_length, row_tokens=row_tokens,
                                       pad_to_multiple_of=pad_to)
        segments = packed["packed_segments"]
        dense = packing.block_mask(segments, "sdpa", torch.float32)
        sparse = packing.block_mask(segments, flex.FLEX_ATTENTION, torch.float32)
        assert isinstance(sparse, BlockMask) and sparse.shape == dense.shape
        rows, length = segments.shape
        b = torch.arange(rows)[:, None, None]
        q, k = torch.arange(length)[None, :, None], torch.arange(length)[None, None, :]
        assert torch.equal(sparse.mask_mod(b, torch.zeros_like(b), q, k), dense[:, 0])
    # A long row of many pairs: the BlockMask visits fewer key blocks than a causal mask would (the
    # blocks of other pairs of the row are skipped, not computed and masked).
    many = [{"prompt_ids": list(range(10, 50)), "chosen_ids": list(range(50, 70)), "rejected_ids": list(range(70, 95))}
            for _ in range(12)]
    packed = packing.pack_examples(many, pad_token_id=0, max_length=None, row_tokens=4096)
    sparse = packing.block_mask(packed["packed_segments"], flex.FLEX_ATTENTION, torch.float32)
    blocks = -(-packed["packed_segments"].shape[1] // sparse.BLOCK_SIZE[0])
    visited = int((sparse.kv_num_blocks + sparse.full_kv_num_blocks).sum())
    assert visited < blocks * (blocks + 1) // 2


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_flex_log_probs_and_gradients_are_the_two_sequence_ones_in_float64(family, tiny_model, family_root,
                                                                           flex_backward_on_cpu):
    path = tiny_model if family == "llama" else _family_model(family_root, family, tiny_model)
    model = _flex_model(path, torch.float64)
    assert model.config._attn_implementation == flex.FLEX_ATTENTION
    assert packing.packing_unsupported(model, dpo_config(StepConfig(), str(family_root / "x"), "cpu")) is None
    params = [p for p in model.parameters() if p.requires_grad]
    two_sequences = {}  # max_length -> the two-sequence reference (it does not depend on the row layout)
    for max_length, row_tokens, pad_to in LAYOUTS:
        if max_length not in two_sequences:
            # the same weighted sum of per-token log-probs, differentiated on both layouts
            two_seq, mask = _two_sequence_logps64(model, UNEVEN, max_length)
            w = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            two_sequences[max_length] = (two_seq.detach(), mask, w,
                                         torch.autograd.grad((two_seq * w).sum(), params))
        two_seq, mask, w, grads_two = two_sequences[max_length]
        packed_lp, block = _packed_logps(model, UNEVEN, max_length, mask, row_tokens, pad_to)
        assert type(block).__name__ == "BlockMask"
        assert (two_seq - packed_lp).abs().max().item() < 1e-9
        grads_flex = torch.autograd.grad((packed_lp * w).sum(), params)
        dense_lp, dense = _packed_logps(model, UNEVEN, max_length, mask, row_tokens, pad_to, impl="sdpa")
        assert dense.dtype == torch.bool and (dense_lp - packed_lp).abs().max().item() < 1e-12
        grads_dense = torch.autograd.grad((dense_lp * w).sum(), params)
        # FlexAttention's gradients are the dense-mask sdpa path's (the same math)...
        assert max((a - b).abs().max().item() for a, b in zip(grads_flex, grads_dense, strict=True)) < 1e-12
        # ...and both are the two sequences' up to float32 rounding: RMSNorm computes in float32 even in a
        # float64 model, and a shared prompt token's gradient is rounded once for both branches instead
        # of once per sequence (measured: 2.8e-7 on gradients up to 4.7, in the embedding rows of prompts).
        worst = max((a - b).abs().max().item() for a, b in zip(grads_two, grads_flex, strict=True))
        assert worst < 1e-6, (max_length, row_tokens, pad_to)


def _trainer(path, rows_file, tmp_path, *, attention, pack=True, pack_tokens=0):
    """test_perf_equivalence's trainer, with the policy loaded under `attention` (load_policy's)."""
    from transformers import set_seed

    cfg = StepConfig.from_dict({"batch_size": 4, "max_length": 48, "learning_rate": 1e-3, "seed": 0})
    set_seed(0)
    tok, model = load_policy(path, "cpu", attention)
    args = dpo_config(cfg, str(tmp_path / f"t-{attention}-{pack}-{pack_tokens}"), "cpu")
    return build_trainer(model, tok, to_trl_rows(load_pairs(rows_file), tok), args, pack=pack,
                         pack_tokens=pack_tokens)


@pytest.mark.parametrize(("family", "pack_tokens"), [("llama", 4096), ("qwen2", 0)])
def test_flex_training_equals_two_sequence_training(family, pack_tokens, tiny_model, family_root, pairs_file,
                                                   tmp_path, flex_backward_on_cpu):
    """float32, through TRL's loss: every pair of a batch in one row (4096), one pair per row (0)."""
    path = tiny_model if family == "llama" else _family_model(family_root, family, tiny_model)
    flexed = _trainer(path, pairs_file, tmp_path, attention="flex", pack_tokens=pack_tokens)
    assert flexed.model.config._attn_implementation == flex.FLEX_ATTENTION
    batch = flexed.data_collator([flexed.train_dataset[i] for i in range(4)])
    assert batch["packed_input_ids"].shape[0] == (4 if pack_tokens == 0 else 1)
    _assert_same_training(flexed, _trainer(path, pairs_file, tmp_path, attention="auto", pack=False))


def test_unpacked_forwards_stay_on_sdpa(tiny_model):
    """The flex-loaded policy runs every forward without a BlockMask through sdpa: TRL's two sequences
    (padded) and generation with a KV cache give exactly the sdpa model's numbers."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    flexed = _flex_model(tiny_model, torch.float32)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    batch = DataCollatorForPreference(pad_token_id=0)(UNEVEN)
    with torch.no_grad():
        a = flexed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = sdpa(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    prompt = torch.tensor([[3, 40, 41, 42, 43]])
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(flexed.generate(prompt, **gen), sdpa.generate(prompt, **gen))


def test_spec_attention_setting(tiny_model, pairs_file, tmp_path):
    spec = {"index": 1, "policy_init": str(tiny_model), "train_file": str(pairs_file),
            "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work")}
    assert StepSpec.from_dict(spec).training_settings()["attention"] == "auto"
    assert StepSpec.from_dict({**spec, "attention": "flex", "device": "cuda"}).training_settings()["attention"] == "flex"
    for bad, why in (({"attention": "flash"}, "attention must be one of auto, sdpa, flex"),
                     ({"attention": "flex", "packing": False}, "needs packing"),
                     ({"attention": "flex", "device": "cpu"}, "CUDA")):
        with pytest.raises(SpecError, match=why):
            StepSpec.from_dict({**spec, **bad})
    assert flex.unavailable("cpu") and "backward" in flex.unavailable("cpu")
    # "sdpa" asks transformers for it; "auto" is today's default (sdpa for these models)
    assert load_policy(tiny_model, "cpu", "sdpa")[1].config._attn_implementation == "sdpa"
    assert load_policy(tiny_model, "cpu")[1].config._attn_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused FlexAttention kernels need CUDA")
def test_flex_on_cuda_is_the_two_sequence_path(tiny_model):
    """On CUDA (compiled flex_attention: the Triton kernels, no lifted check), float32 without TF32:
    per-token log-probs and their gradients against TRL's two sequences under sdpa, rows rounded to 64."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = _flex_model(tiny_model, torch.float32).cuda()
        params = [p for p in model.parameters() if p.requires_grad]
        for row_tokens in (None, 1000):
            batch = DataCollatorForPreference(pad_token_id=0)(UNEVEN)
            ids, attn = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
            logits = model(input_ids=ids, attention_mask=attn).logits
            two_seq = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = batch["completion_mask"][:, 1:].bool().cuda()
            two_seq = two_seq.masked_fill(~mask, 0)
            packed = {k: v.cuda() for k, v in packing.pack_examples(UNEVEN, pad_token_id=0, max_length=None,
                                                                   row_tokens=row_tokens, pad_to_multiple_of=64).items()}
            block = packing.block_mask(packed["packed_segments"], flex.FLEX_ATTENTION, torch.float32)
            hidden = model.base_model(input_ids=packed["packed_input_ids"], attention_mask=block,
                                      position_ids=packed["packed_position_ids"]).last_hidden_state
            src = packed["packed_src_row"] * packed["packed_input_ids"].shape[1] + packed["packed_src_col"]
            scored = torch.log_softmax(model.lm_head(hidden.reshape(-1, hidden.shape[-1])[src]), -1)
            per_token = scored.gather(-1, packed["packed_input_ids"].reshape(-1)[src + 1][:, None]).squeeze(-1)
            packed_lp = torch.zeros_like(two_seq).masked_scatter(mask, per_token)
            assert (two_seq - packed_lp).abs().max().item() < 1e-5
            grads_two = torch.autograd.grad(two_seq.sum(), params)
            grads_packed = torch.autograd.grad(packed_lp.sum(), params)
            assert max((a - b).abs().max().item() for a, b in zip(grads_two, grads_packed, strict=True)) < 1e-4
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
