"""Greedy answers of a model to a few prompts (the real-model demo's "before" and "after").

    python -m sdpo_engine.generate --model DIR --prompt "…" [--prompt "…"] [--max-new-tokens 48]

Prints one JSON line: {"model": DIR, "answers": [{"prompt", "answer"}, …], "seconds": …}. The
prompt goes through the tokenizer's chat template when it has one (SmolLM2-Instruct does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence


def generate(model_dir: str, prompts: Sequence[str], *, max_new_tokens: int = 48, device: str = "cpu") -> list[str]:
    """The model's greedy continuation of each prompt (as a user message), decoded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # transformers decorates PreTrainedModel.to with functools.wraps, which typeshed types as an
    # unbound callable (_Wrapped): mypy then checks `device` against `self`
    model = model.to(device).eval()  # type: ignore[arg-type]
    answers = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = prompt + "\n"
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers.append(tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip())
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo_engine.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory")
    parser.add_argument("--prompt", action="append", required=True, dest="prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    answers = generate(args.model, args.prompts, max_new_tokens=args.max_new_tokens, device=args.device)
    print(json.dumps({"model": args.model, "seconds": round(time.perf_counter() - started, 1),
                      "answers": [{"prompt": p, "answer": a} for p, a in zip(args.prompts, answers, strict=True)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
