"""Per-step samples: greedy answers of the step's model to K held-out prompts (issue #17).

A step with ``samples`` in its spec (protocol.SamplesSpec) takes the prompts of the first
`n_prompts` pairs of its ``eval_file`` (file order, so every step of a job answers the same
prompts) and generates with the policy already in memory, after training (no second model load);
with ``base`` (step 1) also before training, which is the job's initial model M_0. Decoding is
greedy (``do_sample=False``) after seeding torch with ``seed``, so the same checkpoint gives the
same text. The time goes into the step's own time and is reported as ``seconds``.
On N ranks rank 0 decodes alone (its whole model under DDP; under FSDP the full state dict
gathered for the checkpoint, `decoding_model`) while the other ranks wait for its answers
(distributed.on_main_rank): the same answers as one process.

Result (the step summary's and the manifest's ``samples``)::

    {"prompts": [str], "answers": [str], "base_answers": [str] | None,
     "max_new_tokens": int, "seed": int, "seconds": float, "base_seconds": float | None}
"""

from __future__ import annotations

import time
from typing import Any

from .data import load_pairs


def prompt_messages(eval_file: str, n_prompts: int, source_field: str = "source") -> list[list[dict]]:
    """The prompts (message lists) of the first `n_prompts` pairs of `eval_file`."""
    return [pair["prompt"] for pair in load_pairs(eval_file, source_field=source_field)[:n_prompts]]


def prompt_text(tokenizer, messages: list[dict], text_format: str = "chat") -> str:
    """What the model continues: the chat template with the generation prompt, or (raw / no template)
    the messages' text joined by newlines, as `step.to_trl_rows` flattens them for training."""
    if text_format != "raw" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def decoding_model(model, device: str):
    """(model, device) to decode with: `model` where its weights lie, or moved to `device`.

    In one process and under DDP the policy is on the step's device already. Under FSDP rank 0 decodes with
    the full state dict gathered for the checkpoint (distributed.saveable_policy), which lies in CPU memory:
    it moves to rank 0's GPU when that has 1.5x its bytes free (it sits beside rank 0's shard), else it
    decodes on the CPU (slow for a large model, but it never runs the GPU out of memory after training)."""
    import torch

    where = next(model.parameters()).device
    if where.type == "cuda" or device != "cuda" or not torch.cuda.is_available():
        return model, str(where)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if torch.cuda.mem_get_info()[0] >= 1.5 * size:
        return model.to(device), device
    return model, "cpu"


def generate_answers(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, seed: int,
                     device: str, text_format: str = "chat") -> tuple[list[str], float]:
    """Greedy answers of `model` (in memory, any mode) to each prompt, decoded without special
    tokens, and the seconds it took. The model is left in eval mode."""
    import torch

    started = time.perf_counter()
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    # fork_rng: the step's own random stream (LoRA init, data order) is the same with or without samples
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for messages in prompts:
            text = prompt_text(tokenizer, messages, text_format)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=text_format == "raw").to(device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new = output[0, inputs["input_ids"].shape[1]:]
            answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers, time.perf_counter() - started


def texts(tokenizer, prompts: list[list[dict]], text_format: str) -> list[str]:
    """The prompts as the dashboard shows them: the last user message's text."""
    return [messages[-1]["content"] if messages else "" for messages in prompts]


def result(prompts: list[str], answers: list[str], base: tuple[list[str], float] | None, seconds: float,
           spec: dict[str, Any]) -> dict[str, Any]:
    """The `samples` entry of a step's summary and manifest."""
    return {"prompts": prompts, "answers": answers, "base_answers": base[0] if base else None,
            "max_new_tokens": spec["max_new_tokens"], "seed": spec["seed"], "seconds": round(seconds, 3),
            "base_seconds": round(base[1], 3) if base else None}
