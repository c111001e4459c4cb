"""Shared-prompt packing: one sequence per preference pair instead of two.

TRL's DPOTrainer runs every pair as two sequences, prompt + chosen and prompt + rejected, so the
prompt goes through the model twice. Here each pair is one sequence

    shared prompt P[:-1] | P[-1] chosen | P[-1] rejected

with a block attention mask: the chosen branch sees the shared prompt and itself (causally), the
rejected branch sees the shared prompt and itself, never the chosen tokens, and the position ids of
both branches continue from the shared prompt (the rejected branch restarts where the chosen one
started). The last prompt token starts both branches: its hidden state predicts the first token of
either answer, so each branch carries its own copy (one extra token per pair) and every scored
token is predicted, as in TRL, by the token right before it. The math is TRL's: every scored
token attends to exactly the keys, at exactly the positions, it attends to in TRL's two sequences.

Several pairs share a row (`pack_tokens`, the step spec's; `pack_examples`' `row_tokens`): whole
pairs back to back, first-fit by decreasing length into rows of at most that many tokens, each under
its own diagonal block of the mask with positions restarting at 0, so a batch carries padding only at
the tail of a row. The step's collator treats `pack_tokens` as a cap and gives each batch the layout of
least estimated FLOPs (`layout_cost`): a dense mask makes a long packed row pay attention across all of
its pairs, so equal-length pairs stay one per row and uneven ones share rows. The batch's pairs, their order in TRL's layout and so the loss are unchanged: only
the tensors the model runs differ (bench/pack_floor.py: 1.01-1.03 tokens computed per unique token on
the benchmark's shapes, against 1.07-1.83 with one pair per row and 1.8-3.3 for TRL).

The packed forward is hidden behind a stand-in for the model: it takes the call TRL makes
(`model(input_ids, attention_mask, labels, fused_lm_head=True)`, two-sequence layout), runs the
packed sequences and returns per-token outputs laid out as TRL's two sequences would have them, so
TRL's own `_compute_loss` (every loss type, every metric) runs unchanged on top. The LM head
projects only the scored positions (TRL projects every position on CPU), and with tied input and
output embeddings the two gradients of the shared matrix are summed without a second
vocabulary-sized buffer (`_tied_head_weight`).

Packing is used only where it is proven identical (tests/engine/test_perf_equivalence.py): decoder
families whose attention takes a custom 4D mask and whose positions come from `position_ids` alone,
with the sdpa or eager attention (or FlexAttention with a BlockMask, flex.py), `keep_start`
truncation, no sliding window, and no prompt-learning adapter. Everything else runs TRL's two-sequence path.

Depends on TRL 1.16's collator output and on its chunked log-prob kernel (pinned in pyproject).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from . import flex

# Families proven identical by tests/engine/test_perf_equivalence.py (per-token log-probs equal to the
# two-sequence ones in float64; losses, metrics and gradients within 1e-4 in float32). Add a family only
# together with its test.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# flex.FLEX_ATTENTION: the spec's `attention: "flex"`, proven by tests/engine/test_flex_attention.py.
PACKABLE_ATTENTION = frozenset({"sdpa", "eager", flex.FLEX_ATTENTION})
# Config attributes that change the logits after the LM head; the compact head below does not apply them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")

# Packed row budget when the step spec leaves `pack_tokens` null: at most this many tokens per row, a
# cap within which each batch's layout is chosen by `layout_cost` (bench/README.md, issue #21: several
# per row won on short and skewed pairs, padding 1.83 -> 1.02 tokens per unique token on the skewed mix;
# one per row won where pairs are of a length). 2048 bounds a row's mask (rows x 2048^2) and holds a
# batch of 8 pairs of max_length 128 in one row. Not measured on a GPU.
DEFAULT_PACK_TOKENS = 2048

try:  # TRL's chunked log-prob kernel: the fused LM head without materialising the logits
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput
    _HAS_CHUNKED_LOGPROB = True
except ImportError:  # pragma: no cover - another TRL version: no packing, plain TRL
    _HAS_CHUNKED_LOGPROB = False


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _language_model(model):
    """The `...ForCausalLM` under a DDP wrapper (`.module`) and a PEFT wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if _is_peft(model) else model


def packing_unsupported(model, args) -> str | None:
    """None if the packed path is proven identical for this model and config, else why not."""
    if not _HAS_CHUNKED_LOGPROB:
        return "this TRL version lacks the chunked log-prob kernel"
    if _is_peft(model):
        peft_config = model.active_peft_config if hasattr(model, "active_peft_config") else None
        if peft_config is None or getattr(peft_config, "is_prompt_learning", False):
            return "prompt-learning adapters prepend virtual tokens"
    lm = _language_model(model)
    config = lm.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        return "multimodal model"
    if config.model_type not in PACKABLE_MODEL_TYPES:
        return f"model type {config.model_type!r} is not proven identical under packing"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKABLE_ATTENTION:
        return f"attention implementation {impl!r} takes no custom 4D mask"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if any(getattr(config, k, None) is not None for k in _LOGIT_TRANSFORMS):
        return "logit scaling or softcapping"
    if args.truncation_mode != "keep_start":
        return "keep_end truncation cuts the prompt differently in the chosen and rejected sequences"
    if getattr(args, "padding_free", False):
        return "padding_free"
    if getattr(args, "use_logits_to_keep", False):
        return "use_logits_to_keep"
    return None


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None):
    """TRL's keep_start truncation of prompt+chosen and prompt+rejected, both cut at max_length."""
    if max_length is None:
        return prompt, chosen, rejected
    prompt = prompt[:max_length]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def _first_fit(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Whole pairs first-fit by decreasing length into rows of at most `row_tokens` tokens (a longer
    pair gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for k, free in enumerate(room):
            if lengths[i] <= free:
                rows[k].append(i)
                room[k] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


def layout_cost(rows: list[list[int]], lengths: list[int], hidden_size: int, pad_to_multiple_of: int | None = None) -> float:
    """Estimated FLOPs of a layout, in units of (linear-layer FLOPs of one token): R rows padded to the
    longest, L tokens each, cost R * L * (1 + L / (6 * hidden)). Per layer a token costs ~12 h^2
    multiply-adds in its linear layers (attention projections 4 h^2, MLP ~8 h^2) and 2 L h in attention
    over a dense mask of L keys (scores and weighted values): the attention share is L / (6 h). The dense
    block mask makes a packed row pay attention over all of it, which is what several pairs per row trade
    against the padding they remove."""
    longest = max(sum(lengths[i] for i in row) for row in rows)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return len(rows) * longest * (1 + longest / (6 * hidden_size))


def _rows_for(lengths: list[int], row_tokens: int | None, *, hidden_size: int | None = None,
              pad_to_multiple_of: int | None = None) -> list[list[int]]:
    """Pair indices per row: one pair per row (`row_tokens` None or 0), else whole pairs first-fit by
    decreasing length into rows of at most `row_tokens` tokens.

    With `hidden_size` (the step's collator), `row_tokens` is a cap: the batch takes the layout of least
    `layout_cost` among one pair per row and first-fit rows capped at the longest pair, twice it, four
    times it, ... up to `row_tokens`. Measured on CPU (bench/README.md, issue #21): at prompts 3x the
    answers one pair per row (padding 1.07) ran 1.10x faster than one row of 8 pairs (padding 1.02), whose
    dense mask costs attention over the whole row; on short pairs, packing won (1.04x). The loss does not
    depend on the layout (tests/engine/test_perf_equivalence.py)."""
    one_per_row = [[i] for i in range(len(lengths))]
    if not row_tokens:
        return one_per_row
    if hidden_size is None:
        return _first_fit(lengths, row_tokens)
    best, best_cost = one_per_row, layout_cost(one_per_row, lengths, hidden_size, pad_to_multiple_of)
    cap = max(lengths)
    while cap <= row_tokens:
        rows = _first_fit(lengths, cap)
        cost = layout_cost(rows, lengths, hidden_size, pad_to_multiple_of)
        if cost < best_cost:
            best, best_cost = rows, cost
        if len(rows) == 1:
            break
        cap = min(2 * cap, row_tokens) if cap < row_tokens else row_tokens + 1
    return best


def pack_examples(examples: list[dict[str, Any]], *, pad_token_id: int, max_length: int | None,
                  pad_to_multiple_of: int | None = None, row_tokens: int | None = None,
                  hidden_size: int | None = None) -> dict[str, torch.Tensor]:
    """The packed tensors of a batch.

    row_tokens: None or 0 puts one pair per row (rows padded to the longest pair); N > 0 puts several
    whole pairs in a row of at most N tokens, back to back (padding-free but for each row's tail),
    each pair under its own block of the attention mask and its positions restarting at 0. With
    `hidden_size` (the model's), N is a cap and the batch takes the layout of least estimated FLOPs
    (`_rows_for`, `layout_cost`).

    packed_input_ids / packed_position_ids / packed_segments: (R, L); the segment of a token is
    3 * k + kind for the k-th pair of its row, kind 0 = shared prompt, 1 = chosen branch, 2 = rejected
    branch; -1 = padding.
    packed_src_row / packed_src_col: for every scored token, in the order of TRL's two-sequence
    layout (chosen rows first, then rejected rows, each left to right), the packed position whose
    hidden state predicts it; the token itself sits one position later.
    """
    pairs = [_truncate(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], max_length) for ex in examples]
    lengths = [len(p) + len(c) + len(r) + min(len(p), 1) for p, c, r in pairs]
    ids_rows: list[list[int]] = []
    pos_rows: list[list[int]] = []
    seg_rows: list[list[int]] = []
    # per pair: (row, offset in the row, first token index, end) of its chosen and of its rejected tokens
    src_chosen: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * len(pairs)
    src_rejected: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * len(pairs)
    for row, members in enumerate(_rows_for(lengths, row_tokens, hidden_size=hidden_size,
                                            pad_to_multiple_of=pad_to_multiple_of)):
        ids_row: list[int] = []
        pos_row: list[int] = []
        seg_row: list[int] = []
        for k, j in enumerate(members):
            prompt, chosen, rejected = pairs[j]
            p, c, r = len(prompt), len(chosen), len(rejected)
            shared = max(p - 1, 0)
            anchor = prompt[shared:]  # the last prompt token, copied at the start of each branch
            a = len(anchor)
            o = len(ids_row)  # where this pair starts in its row
            ids_row += list(prompt) + list(chosen) + list(anchor) + list(rejected)
            pos_row += list(range(p + c)) + list(range(shared, shared + a + r))
            seg_row += [3 * k] * shared + [3 * k + 1] * (a + c) + [3 * k + 2] * (a + r)
            # chosen token at t (t >= p) is predicted by packed position t - 1, as in TRL's prompt+chosen
            src_chosen[j] = (row, o, max(p, 1), p + c)
            # rejected token k sits at p + c + a + k; the position before it is the anchor copy or the previous token
            src_rejected[j] = (row, o + p + c + a, 0 if p >= 1 else 1, r)
        ids_rows.append(ids_row)
        pos_rows.append(pos_row)
        seg_rows.append(seg_row)
    src: list[tuple[int, int]] = []
    for spans in (src_chosen, src_rejected):  # TRL's order: chosen rows first, pair by pair
        for row, base, start, stop in spans:
            src += [(row, base + t - 1) for t in range(start, stop)]
    length = max(len(x) for x in ids_rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    n_rows = len(ids_rows)
    ids = torch.full((n_rows, length), pad_token_id, dtype=torch.long)
    pos = torch.zeros((n_rows, length), dtype=torch.long)
    seg = torch.full((n_rows, length), -1, dtype=torch.int32)
    for i, (ids_row, pos_row, seg_row) in enumerate(zip(ids_rows, pos_rows, seg_rows, strict=True)):
        ids[i, : len(ids_row)] = torch.tensor(ids_row, dtype=torch.long)
        pos[i, : len(pos_row)] = torch.tensor(pos_row, dtype=torch.long)
        seg[i, : len(seg_row)] = torch.tensor(seg_row, dtype=torch.int32)
    return {
        "packed_input_ids": ids,
        "packed_position_ids": pos,
        "packed_segments": seg,
        "packed_src_row": torch.tensor([s[0] for s in src], dtype=torch.long),
        "packed_src_col": torch.tensor([s[1] for s in src], dtype=torch.long),
    }


def truncated_lengths(example: dict[str, Any], max_length: int | None) -> tuple[int, int, int]:
    """Prompt, chosen and rejected lengths after TRL's keep_start truncation."""
    prompt, chosen, rejected = _truncate(example["prompt_ids"], example["chosen_ids"], example["rejected_ids"],
                                         max_length)
    return len(prompt), len(chosen), len(rejected)


def packed_length(example: dict[str, Any], max_length: int | None) -> int:
    """Tokens of the pair's packed sequence: prompt, chosen, the last prompt token again, rejected."""
    p, c, r = truncated_lengths(example, max_length)
    return p + c + r + min(p, 1)


@dataclass
class SharedPromptCollator:
    """TRL's preference collator plus the packed tensors (TRL's two-sequence tensors are kept: they
    are cheap, TRL's loss code reads their masks, and its token count stays comparable)."""

    base: Any  # trl.trainer.dpo_trainer.DataCollatorForPreference
    row_tokens: int | None = None  # pack_examples' row_tokens: None/0 one pair per row, N several pairs per row
    hidden_size: int | None = None  # the model's: N becomes a cap, the layout is chosen per batch by cost

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.base(examples)
        out.update(pack_examples(examples, pad_token_id=self.base.pad_token_id, max_length=self.base.max_length,
                                 pad_to_multiple_of=self.base.pad_to_multiple_of, row_tokens=self.row_tokens,
                                 hidden_size=self.hidden_size))
        return out


def attends(seg_q, seg_k, q_idx, kv_idx):
    """Whether query position q_idx (segment seg_q) attends to key position kv_idx (segment seg_k):
    causal, no padding keys, a pair never sees another pair of its row, a branch never sees the other
    branch of its pair; each padding query sees itself, so no softmax row is empty (its output is never
    used). Elementwise on broadcastable tensors: `block_mask`'s dense mask and, one element at a time,
    the FlexAttention BlockMask's mask_mod (flex.pair_block_mask) are this one rule."""
    same_pair = torch.div(seg_k, 3, rounding_mode="floor") == torch.div(seg_q, 3, rounding_mode="floor")
    return ((kv_idx <= q_idx) & (seg_k >= 0) & same_pair & ((seg_k % 3 == 0) | (seg_k == seg_q))) | (kv_idx == q_idx)


def block_mask(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """(R, 1, L, L) mask of a packed batch under `attends` (segments: pack_examples'): a bool tensor for
    sdpa (True = attend), an additive float tensor of `dtype` for eager, a FlexAttention BlockMask
    for flex.FLEX_ATTENTION (the step spec's `attention: "flex"`; no dense mask is built)."""
    if attn_implementation == flex.FLEX_ATTENTION:
        return flex.pair_block_mask(segments, attends)
    length = segments.shape[1]
    idx = torch.arange(length, device=segments.device)
    allowed = attends(segments[:, :, None], segments[:, None, :], idx[:, None], idx[None, :])[:, None]
    if attn_implementation == "eager":  # eager adds the mask to the scores
        zero = torch.zeros((), dtype=dtype, device=segments.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed  # sdpa: True = attend


# id() of the tied weights that already have the densify hook (one each, however many batches); an
# entry goes with its tensor (weakref.finalize), so a later tensor reusing the id gets its own hook.
# Not a WeakSet: that compares tensors with ==, which is elementwise.
_DENSIFY_HOOKED: set[int] = set()


def _tied_head_weight(weight: torch.Tensor) -> torch.Tensor:
    """A stand-in leaf for a weight tied between the input embedding and the LM head.

    With tied weights autograd gets two dense vocab x hidden gradients for one tensor, the head's
    and the embedding's, and holds both while it sums them: one such buffer more than needed, at
    the end of every backward (about 113 MB for SmolLM2). Here the head's gradient lands on this
    alias and is moved onto `weight.grad` as soon as it exists (early in the backward), and the
    embedding, run with `sparse=True` (`_sparse_embedding`), hands back only the rows the batch
    used, which autograd adds into that gradient in place. Same sum (in another order).
    """
    alias = weight.detach().requires_grad_()

    def move(a: torch.Tensor) -> None:
        grad, a.grad = a.grad, None
        if grad is None:  # the hook runs after accumulation, so there is one; nothing to move otherwise
            return
        if weight.grad is None:
            weight.grad = grad
        else:
            weight.grad.add_(grad)

    alias.register_post_accumulate_grad_hook(move)
    if id(weight) not in _DENSIFY_HOOKED:
        # Safety net: should a sparse embedding gradient ever arrive without the head's (it cannot while
        # the head scores the batch), make it dense for the optimizer.
        def densify(w: torch.Tensor) -> None:
            if w.grad is not None and w.grad.is_sparse:
                w.grad = w.grad.to_dense()

        weight.register_post_accumulate_grad_hook(densify)
        _DENSIFY_HOOKED.add(id(weight))
        weakref.finalize(weight, _DENSIFY_HOOKED.discard, id(weight))
    return alias


@contextlib.contextmanager
def _sparse_embedding(embedding: torch.nn.Embedding):
    embedding.sparse = True
    try:
        yield
    finally:
        embedding.sparse = False


class PackedForward:
    """Stands in for the model in TRL's `_compute_loss` / `compute_ref_log_probs`.

    Called as TRL calls the model (two-sequence tensors plus the packed ones from the collator), it
    runs one packed sequence per pair and returns a `FusedCausalLMOutput` whose per-token fields have
    the two-sequence shape (2B, S-1), zero where no completion token is scored, like TRL's.

    compact: call the backbone and project only the scored positions through the LM head (the
    model must be unwrapped: no DDP/FSDP/DeepSpeed wrapper); else go through the model's own
    forward with its fused LM head.
    """

    def __init__(self, model, *, outputs: tuple[str, ...], compact: bool, autocast=None):
        self.model = model
        self.outputs = outputs
        self.compact = compact
        self.autocast = autocast

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None,
                 packed_input_ids=None, packed_position_ids=None, packed_segments=None, packed_src_row=None,
                 packed_src_col=None, **kwargs):
        if not fused_lm_head:  # TRL's deprecated logits path: the plain two-sequence forward
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("packing does not support MoE router logits")
        lm = _language_model(self.model)
        shift_mask = labels[:, 1:] != -100
        width = packed_input_ids.shape[1]
        src = packed_src_row * width + packed_src_col
        if src.numel() != int(shift_mask.sum()):
            raise RuntimeError("packed batch does not match the two-sequence batch")
        targets = packed_input_ids.reshape(-1)[src + 1]
        impl = lm.config._attn_implementation
        param = lm.get_output_embeddings().weight
        mask = block_mask(packed_segments, impl, param.dtype)
        if self.compact:
            head = lm.get_output_embeddings()
            embedding = lm.get_input_embeddings()
            weight = head.weight
            tied = (torch.is_grad_enabled() and weight.requires_grad and isinstance(embedding, torch.nn.Embedding)
                    and embedding.weight is weight and not embedding.sparse)
            if tied:
                head_weight, sparse_embedding = _tied_head_weight(weight), True
            else:
                head_weight, sparse_embedding = weight, False
            with contextlib.ExitStack() as stack:
                if self.autocast is not None:
                    stack.enter_context(self.autocast)
                if sparse_embedding:
                    stack.enter_context(_sparse_embedding(embedding))
                hidden = lm.base_model(input_ids=packed_input_ids, attention_mask=mask,
                                       position_ids=packed_position_ids, use_cache=False).last_hidden_state
                chosen_hidden = hidden.reshape(-1, hidden.shape[-1])[src].to(weight.device)
                per_token = ChunkedLogProbFunction.apply(chosen_hidden, head_weight, head.bias,
                                                         targets.to(weight.device), 1.0,
                                                         _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, self.outputs)
        else:
            packed_labels = torch.full_like(packed_input_ids, -100)
            packed_labels.view(-1)[src + 1] = targets
            out = self.model(input_ids=packed_input_ids, attention_mask=mask, position_ids=packed_position_ids,
                             labels=packed_labels, fused_lm_head=True, **kwargs)
            flat = packed_src_row * (width - 1) + packed_src_col
            per_token = tuple(None if x is None else x.reshape(-1)[flat]
                              for x in (out.log_probs, out.entropy, out.log_sum_sq_probs, out.mean_logits,
                                        out.is_top1))
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(shift_mask.shape).masked_scatter(shift_mask.to(x.device), x)
            for x in per_token
        )
        return FusedCausalLMOutput(loss=None, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=shift_mask, aux_loss=None)
