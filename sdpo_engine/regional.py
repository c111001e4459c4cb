"""Regional compilation: `torch.compile` of each decoder layer, in place (the step spec's `compile: "layers"`).

A decoder-only model is N copies of one block. Compiling the block, not the whole model, compiles one
graph that every layer reuses (torch's "regional compilation" recipe; accelerate's `compile_regions`
does the same), so the compile time does not grow with depth, and the embedding, the final norm and
the engine's own LM head (packing.PackedForward, TRL's chunked log-prob kernel) stay eager.

Done with `nn.Module.compile`, which compiles a module's call in place, rather than `torch.compile(layer)`,
which wraps it in an `OptimizedModule`: the module tree and the state dict keep the model's own names
(no `_orig_mod.`), so the trainer, a PEFT adapter injected afterwards, `save_pretrained` and the next
step see the same model. Gradient checkpointing (transformers' `GradientCheckpointingLayer` wraps the
layer's `forward`) runs inside the compiled call.

Shapes: dynamo specialises on the first batch shape and makes a dimension dynamic once it changes
(`automatic_dynamic_shapes`), so a step compiles a handful of graphs (reference pass without gradients,
training with, checkpointing on) whatever its lengths; the padding to a multiple of 64 on a GPU
(step.pad_to_multiple_of) keeps the shapes few as well. All layers share the graphs because the layers
are inputs to them, not constants (`inline_inbuilt_nn_modules`). Equivalence with the eager model:
tests/engine/test_precision_compile.py.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["compile_layers", "compiled_layers", "decoder_layers"]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of `model`: the children of every `nn.ModuleList` whose modules are all of one
    class (a Llama-style model: `model.model.layers`, one per decoder layer). Works through PEFT and
    DDP wrappers (it walks the module tree). Empty when the model has no such list."""
    layers: list[torch.nn.Module] = []
    for module in model.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 0
                and all(type(child) is type(module[0]) for child in module)):
            layers.extend(module)
    return layers


def compile_layers(model: torch.nn.Module, **compile_kwargs: Any) -> int:
    """`torch.compile` each decoder layer of `model` in place (`decoder_layers`); the rest stays eager.

    Compilation itself happens lazily at each layer's first call (the reference pass). `compile_kwargs`
    go to `torch.compile` (default: inductor, no CUDA graphs). Returns the number of layers compiled.
    Raises ValueError when the model has no repeated blocks to compile.
    """
    from transformers.cache_utils import Cache

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no repeated decoder layers to compile")
    for layer in layers:
        layer.compile(**compile_kwargs)
        compiled, eager = layer._compiled_call_impl, layer._call_impl

        # Decoding (held-out samples, samples.py) passes a KV cache whose per-layer state dynamo guards on:
        # every layer would recompile until the recompile limit. It runs eager; training and the
        # reference pass (TRL and packing.PackedForward pass use_cache=False, no cache) run compiled.
        def call(*args, _compiled=compiled, _eager=eager, **kwargs):
            if any(isinstance(value, Cache) for value in kwargs.values()):
                return _eager(*args, **kwargs)
            return _compiled(*args, **kwargs)

        layer._compiled_call_impl = call
    return len(layers)


def compiled_layers(model: torch.nn.Module) -> int:
    """How many of `model`'s decoder layers run compiled (0: none)."""
    # nn.Module.compile keeps the compiled call here; Module.__call__ uses it when set.
    return sum(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(model))
