"""The supervised warm start that turns a base model into the SFT model S (the paper starts from an SFT model).

A plain PyTorch loop: next-token loss on the chosen answers only (prompt tokens masked), AdamW,
linear warm-up and decay. Short on purpose: S should prefer the chosen answers more often than
chance, without having solved the preference task before DPO starts.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path


def _encode(tokenizer, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
    answer = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][0]["content"]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True)
    if hasattr(prompt_ids, "keys"):  # some tokenizers return a BatchEncoding
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    prompt_ids, full_ids = list(prompt_ids), list(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template's prompt is not a prefix of prompt + answer")
    full_ids = full_ids[:max_length]
    labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
    return full_ids, labels


def supervised_warm_start(model_dir: str | Path, rows: list[dict], out_dir: str | Path, *, epochs: int = 1,
                          learning_rate: float = 1e-3, batch_size: int = 16, max_length: int = 64,
                          seed: int = 0, log=None) -> dict:
    """Fine-tune `model_dir` on the chosen answers of `rows`; save to `out_dir`. Returns loss stats."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from sdpo_engine.step import load_policy

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer, model = load_policy(model_dir, "cpu")
    model.train()
    examples = [_encode(tokenizer, r, max_length) for r in rows]
    rng = random.Random(seed)
    n_batches = math.ceil(len(examples) / batch_size)
    total = n_batches * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, max(1, total // 10), total)
    pad = tokenizer.pad_token_id
    losses = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for b in range(n_batches):
            batch = [examples[i] for i in order[b * batch_size:(b + 1) * batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if log and (len(losses) % 50 == 0):
                log(f"sft step {len(losses)}/{total} loss {loss.item():.3f}")
    model.eval()
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"steps": total, "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.perf_counter() - t0}
