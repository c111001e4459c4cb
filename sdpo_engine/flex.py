"""FlexAttention for the shared-prompt packed layout: the pairs' block structure as a `BlockMask`
instead of a dense (R, 1, L, L) mask (issue #19; the step spec's `attention: "flex"`).

With "flex" the policy is loaded with the attention implementation `FLEX_ATTENTION`, registered here
in transformers' AttentionInterface. It dispatches on the mask it is given:
- a `BlockMask` (the packed forward, packing.PackedForward via packing.block_mask): torch's
  `flex_attention`, which visits only the key blocks some query of the block attends to (a pair's
  own blocks, never another pair's of the row nor the padding tail) and needs no dense mask;
- anything else (TRL's two-sequence path, generation with a KV cache, masks built by transformers
  from a 2D padding mask): transformers' sdpa, exactly what `attention: "auto"` runs.

Why not transformers' own "flex_attention" implementation: it compiles `flex_attention` on every
device (Inductor's C++ kernels on CPU, one compile per shape), and it turns every other call's 2D
mask into a BlockMask too (generation: a new shape per decoded token). Dispatching on the mask
keeps every path but the packed one on today's proven sdpa, and an activation-checkpointing
recomputation takes the same path as its forward (it sees the same mask).

On CUDA `flex_attention` runs compiled (Triton, fused, block-sparse); elsewhere eagerly (torch's
unfused reference implementation: the same math on a materialised score matrix, used by the CPU
equivalence tests). torch refuses `flex_attention`'s backward on CPU (torch 2.13:
"FlexAttention does not support backward on CPU"), so a step refuses "flex" off CUDA (`unavailable`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# The name the model is loaded with. It contains "flex_attention" on purpose: transformers then checks
# that the model class supports flex attention (`_supports_flex_attn`) when it loads.
FLEX_ATTENTION = "sdpo_flex_attention"

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    _HAS_FLEX = True
except ImportError:  # pragma: no cover - torch < 2.5
    _HAS_FLEX = False


def unavailable(device: str) -> str | None:
    """None if a step on `device` ("cpu" / "cuda", resolved) can train with FlexAttention, else why not."""
    if not _HAS_FLEX:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:  # pragma: no cover - transformers < 4.48
        return "this transformers version has no AttentionInterface to register an attention implementation"
    if device != "cuda":
        return f"torch's FlexAttention has no backward on {device} (it trains on CUDA only)"
    return None


def register() -> str:
    """Register `FLEX_ATTENTION` with transformers (idempotent) and return the name to load a model with.

    The mask interface gets transformers' sdpa mask: a 2D padding mask becomes what sdpa takes, a
    4D mask (dense or BlockMask) passes through unchanged (masking_utils._preprocess_mask_arguments).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLEX_ATTENTION, attention_forward)
    AttentionMaskInterface.register(FLEX_ATTENTION, sdpa_mask)
    return FLEX_ATTENTION


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface call: query (B, Hq, L, D), key/value (B, Hkv, L, D) ->
    ((B, L, Hq, D), None). A BlockMask goes to `flex_attention` (grouped-query heads shared without
    copying the keys), anything else to transformers' sdpa with the same arguments.

    Raises ValueError for what the BlockMask path does not do: attention dropout, a sliding window,
    softcapping, attention sinks (packing.packing_unsupported keeps such models off the packed path).
    """
    if not (_HAS_FLEX and isinstance(attention_mask, BlockMask)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError("FlexAttention path: attention dropout is not supported (the engine turns dropout off)")
    for name in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"FlexAttention path: {name} is not supported")
    # Compiled on CUDA (the fused kernel); inside an outer torch.compile the call is traced as is.
    run = _compiled_flex() if query.device.type == "cuda" and not torch.compiler.is_compiling() else flex_attention
    out = run(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def pair_block_mask(segments: torch.Tensor, attends) -> BlockMask:
    """The BlockMask of a packed batch. segments: (R, L) int, packing.pack_examples' (3 * pair + kind,
    -1 = padding); attends(seg_q, seg_k, q_idx, kv_idx) -> bool: packing.attends, the same rule the
    dense mask is built from. Returns a BlockMask of shape (R, 1, L, L) on the segments' device (its
    mask_mod reads `segments`, so the batch's tensor must stay alive while the mask is used)."""
    rows, length = segments.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return attends(segments[b, q_idx], segments[b, kv_idx], q_idx, kv_idx)

    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=segments.device)
