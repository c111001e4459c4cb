"""A deterministic, offline tiny Llama-style model with a byte-level BPE tokenizer and a chat template.

Tests, demos and CI need a real causal LM that trains in seconds on a CPU and never touches a hub.
Same arguments -> same tokenizer and the same weights, so checkpoints and fingerprints are
reproducible across machines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .sample_data import tokenizer_corpus

# ChatML-style template, the shape most instruct models use; `{% generation %}` markers are not
# needed because DPO masks by prompt length.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on the sample vocabulary; digits split one per token (helps arithmetic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def build_tiny_model(out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     vocab_size: int = 512, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny LlamaForCausalLM + tokenizer to `out_dir` (atomically). Returns the path.

    About 0.1M parameters at the defaults: a DPO step on a few dozen pairs takes about a second.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir).resolve()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        shutil.rmtree(out)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    # Seed a private generator state so building a model never disturbs a caller's RNG streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sdpo_model.json").write_text(json.dumps({
            "name": "sdpo-tiny", "builder": "sdpo_engine.tiny", "seed": seed, "hidden_size": hidden_size,
            "num_layers": num_layers, "num_heads": num_heads, "vocab_size": len(tokenizer),
            # Tiny random models barely move at the paper's 5e-7; the service uses these as "auto".
            "default_hyperparameters": {"learning_rate": 1e-3, "beta": 0.1, "batch_size": 4, "max_length": 128},
        }, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
