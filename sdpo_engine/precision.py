"""The optimizers behind the bf16 settings of the step spec's `param_dtype` (issue #19).

Every bf16 setting loads the policy in bf16 (step.load_policy) and runs its forward and backward, and the
reference pass, without autocast; they differ in where AdamW's update lands:

- "bfloat16" (pure bf16): the Trainer's AdamW updates the bf16 weights in place, its states in bf16 too. An
  update under half a bf16 spacing of the weight is lost: at DPO's learning rates most weights never move
  (step.bf16_frozen_share, the `bf16_updates_lost` warning).
- "bfloat16-master": `Float32MasterAdamW`, torch's AdamW over float32 master copies of the bf16 weights.
  The bf16 gradients are cast to float32 before the step, the update accumulates in the masters, and the bf16
  weights are refreshed from them (rounded to nearest) after every step: a small update adds up in the
  master until it moves the bf16 weight. Mixed precision as in Micikevicius et al. 2018 ("Mixed Precision
  Training", arXiv:1710.03740, float32 master weights), without autocast's casts of every weight per
  forward; weights 2 + masters 4 + states 8 bytes per parameter (autocast's float32 weights: 4 + 8, plus a
  bf16 copy of each weight while a forward runs).
- "bfloat16-sr": torchao's AdamW with bf16 stochastic rounding (`torchao.optim._AdamW(bf16_stochastic_round=
  True)`): the update is computed in float32 and rounded to bf16 up or down at random, with the probability
  that makes the rounding unbiased, so small updates move a weight in expectation. No master copy (2 + 4
  bytes per parameter: bf16 weights and bf16 states). Needs the `perf` extra (torchao); torchao compiles its
  per-tensor step with torch.compile (a compile per tensor shape at the first step).

Why our own master-weight optimizer: no kept library does this for a bf16 model on CPU and GPU. transformers'
Trainer `optim` choices keep the optimizer's states in low precision (adamw_torch_4bit/8bit, bitsandbytes),
use Kahan summation (stable_adamw: torch-optimi; adamw_anyprecision: torchdistx, unmaintained) or expect
float32 weights; accelerate's mixed precision is autocast over float32 weights; apex's and Transformer
Engine's FusedAdam(master_weights=True) are CUDA-only builds; FSDP2's MixedPrecisionPolicy keeps float32
shards and casts per forward (the autocast cost again) and needs the FSDP launcher; torchao offers only the
stochastic rounding above. The wrapper is torch's AdamW plus three copies.
"""

from __future__ import annotations

from typing import Any

import torch

from .protocol import TORCHAO_MISSING, SpecError

# The param_dtype settings that train bf16 weights, and which optimizer each one uses.
MASTER = "bfloat16-master"
STOCHASTIC_ROUNDING = "bfloat16-sr"
BF16_SETTINGS = ("bfloat16", MASTER, STOCHASTIC_ROUNDING)


class Float32MasterAdamW(torch.optim.AdamW):
    """torch's AdamW over float32 master copies of low-precision (bf16) parameters.

    `params`: the model's parameters (tensors or param groups, as for torch.optim.AdamW); the other
    arguments are AdamW's. A float32 parameter is its own master (no copy): a LoRA adapter, which PEFT keeps
    in float32, trains as under plain AdamW.

    `step()`: each master's gradient is the parameter's gradient cast to float32 (the Trainer has clipped
    it already), AdamW updates the masters, the parameters take the masters' values rounded to their dtype,
    and the masters' float32 gradients are freed. The parameters' own gradients are the Trainer's to zero.
    `param_groups` hold the masters: the learning-rate scheduler and the Trainer's logging see AdamW's groups.

    `state_dict()` adds "float32_masters" (one float32 tensor per copied parameter, in `param_groups` order;
    None for a float32 parameter), so a trainer checkpoint's optimizer.pt resumes with the masters exactly,
    not with the bf16 weights the model checkpoint rounds them to; `load_state_dict()` puts them back and
    refreshes the parameters from them.
    """

    def __init__(self, params, **kwargs: Any) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.Tensor] = []
        self.masters: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            masters = []
            for p in group["params"]:
                master = p if p.dtype == torch.float32 else p.detach().float()
                self.model_params.append(p)
                self.masters.append(master)
                masters.append(master)
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)

    def _copied(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, m) for p, m in zip(self.model_params, self.masters, strict=True) if m is not p]

    @torch.no_grad()
    def step(self, closure=None):
        copied = self._copied()
        for p, m in copied:
            m.grad = None if p.grad is None else p.grad.float()
        loss = super().step(closure)
        for p, m in copied:
            p.copy_(m)  # round to nearest
            m.grad = None  # 4 bytes per parameter held only during the step
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["float32_masters"] = [m if m is not p else None for p, m in zip(self.model_params, self.masters,
                                                                               strict=True)]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("float32_masters", None)
        super().load_state_dict(state_dict)
        if saved is None:  # an optimizer.pt without masters: keep the ones made from the loaded weights
            return
        if len(saved) != len(self.masters):
            raise ValueError(f"optimizer state has {len(saved)} master weights, the model {len(self.masters)}")
        with torch.no_grad():
            for p, m, s in zip(self.model_params, self.masters, saved, strict=True):
                if s is not None and m is not p:
                    m.copy_(s)
                    p.copy_(m)


def use_param_dtype_optimizer(trainer, param_dtype: str) -> None:
    """Give `trainer` (built, not yet trained) the optimizer of `param_dtype`: Float32MasterAdamW for
    "bfloat16-master", torchao's stochastic-rounding AdamW for "bfloat16-sr", the Trainer's own (args.optim,
    AdamW) otherwise. The learning rate, betas, eps and the weight-decay groups stay the Trainer's: only the
    class changes (the Trainer builds it at `train()`, `optimizer_cls_and_kwargs`)."""
    if param_dtype not in (MASTER, STOCHASTIC_ROUNDING):
        return
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if optimizer_cls is not torch.optim.AdamW:
        raise ValueError(f"param_dtype {param_dtype} replaces AdamW; the trainer's optim is {trainer.args.optim}")
    if param_dtype == MASTER:
        trainer.optimizer_cls_and_kwargs = (Float32MasterAdamW, kwargs)
        return
    try:
        from torchao.optim import _AdamW
    except ImportError as e:
        raise SpecError(TORCHAO_MISSING) from e

    kwargs = {k: v for k, v in kwargs.items() if k in ("lr", "betas", "eps")}  # no fused/foreach: torchao's own
    trainer.optimizer_cls_and_kwargs = (_AdamW, {**kwargs, "bf16_stochastic_round": True})
