"""Chat markup and special tokens inside the text of preference pairs, found with the model's tokenizer.

A pair whose strings already carry chat markup (``<|im_start|>user\\n…<|im_end|>``, ``[INST]``,
``<|eot_id|>``, the model's BOS/EOS, …) is either a mistake or data that was formatted before it
was uploaded. Either way, training it through the chat template would wrap the markup in markup a
second time, and the tokenizer would read the literal strings as control tokens: the model would
learn on sequences it never sees at inference. So, with ``text_format="chat"`` (the default), such
a pair is refused, naming the line, the field and the token found. With ``text_format="raw"`` the
user says the strings are already formatted: they are trained exactly as given (see
`sdpo_engine.tokenize`), and only the standard string format is accepted then.

Message lists (the conversational and OpenAI formats) need a chat template to become one token
sequence: on a model without one (and no template supplied with the job) the roles would be
dropped and the turns glued together, so such a file is refused too.

Pure Python on purpose: the tokenizer is any object with the transformers attributes it uses
(``added_tokens_decoder``, ``all_special_tokens``, ``chat_template``), so this module imports
neither torch nor transformers and the checks can be tested without them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .protocol import TEXT_FORMATS

__all__ = ["TEXT_FORMATS", "MARKUP_MARKERS", "TokenizerFiles", "check_pairs", "find_markup", "markup_tokens",
           "read_tokenizer_files"]


# Markers of the common chat formats (ChatML, Llama 2/3, Gemma, Phi, Zephyr, Mistral), checked for
# on every model: data formatted for another model is as wrong as data formatted for this one.
# `<s>`/`</s>` are not here (they are HTML's strikethrough tag too); they count only where they are
# the model's own special tokens.
MARKUP_MARKERS = (
    "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>",
    "<|end|>",
)
# Bracketed markers written literally in a chat template, e.g. `'<|im_start|>' + message['role']`.
_TEMPLATE_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>")


@dataclass
class _AddedToken:
    content: str
    special: bool


@dataclass
class TokenizerFiles:
    """What `markup_tokens` and `check_pairs` read of a tokenizer, from its saved files alone.

    For processes that must not import transformers (the API, the light worker): the JSON files
    `save_pretrained` writes hold the special tokens and the chat template.
    """

    chat_template: str | None = None
    all_special_tokens: list[str] = field(default_factory=list)
    added_tokens_decoder: dict[int, _AddedToken] = field(default_factory=dict)


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_tokenizer_files(model_dir: str | os.PathLike[str]) -> TokenizerFiles | None:
    """The chat template and special tokens of a Hugging Face model directory, or None without a tokenizer.

    Reads ``tokenizer_config.json`` (``chat_template``, the named special tokens,
    ``added_tokens_decoder``), ``chat_template.jinja`` / ``chat_template.json`` (transformers 4.43+
    saves the template there) and ``tokenizer.json``'s ``added_tokens``, as transformers does.
    """
    model_dir = os.fspath(model_dir)
    config = _load_json(os.path.join(model_dir, "tokenizer_config.json"))
    backend = _load_json(os.path.join(model_dir, "tokenizer.json"))
    if not isinstance(config, dict) and not isinstance(backend, dict):
        return None
    config = config if isinstance(config, dict) else {}
    info = TokenizerFiles()
    template: Any = config.get("chat_template")
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            template = fh.read()
    elif isinstance(_load_json(os.path.join(model_dir, "chat_template.json")), dict):
        template = _load_json(os.path.join(model_dir, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # [{"name", "template"}, …]: named templates
        template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    info.chat_template = template if isinstance(template, str) and template.strip() else None
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            info.all_special_tokens.append(value)
    for token_id, added in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(added, dict) and isinstance(added.get("content"), str):
            info.added_tokens_decoder[int(token_id)] = _AddedToken(added["content"], bool(added.get("special")))
    for added in (backend or {}).get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            info.added_tokens_decoder.setdefault(added["id"], _AddedToken(added["content"], bool(added.get("special"))))
    return info


def markup_tokens(tokenizer: Any) -> list[str]:
    """The strings that must not occur inside a pair's text for `tokenizer`'s model, longest first.

    The tokenizer's special tokens (BOS, EOS, pad, and every added token marked special: the
    tokenizer turns such a string into its control token wherever it occurs), the markers its chat
    template writes, and `MARKUP_MARKERS`. Longest first so that the longest match is reported.
    """
    found: set[str] = set(MARKUP_MARKERS)
    for token in getattr(tokenizer, "all_special_tokens", None) or ():
        if isinstance(token, str) and token.strip():
            found.add(token)
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = getattr(added, "content", None)
        if getattr(added, "special", False) and isinstance(content, str) and content.strip():
            found.add(content)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (transformers accepts {"default": …, "tool_use": …})
        template = "\n".join(str(t) for t in template.values())
    if isinstance(template, str):
        found.update(_TEMPLATE_MARKER.findall(template))
    return sorted(found, key=lambda t: (-len(t), t))


def find_markup(text: str, tokens: Iterable[str]) -> str | None:
    """The first of `tokens` (in their order) that occurs in `text`, or None."""
    for token in tokens:
        if token in text:
            return token
    return None


def _fields(pair: dict[str, Any], fmt: str | None) -> Iterable[tuple[str, str]]:
    """(field path in the user's own format, text) of every string the pair trains on."""
    if fmt == "standard":
        yield "prompt", pair["prompt"][-1]["content"]
        yield "chosen", pair["chosen"][0]["content"]
        yield "rejected", pair["rejected"][0]["content"]
        return
    prompt, chosen, rejected = (("input.messages", "preferred_output", "non_preferred_output") if fmt == "openai"
                                else ("prompt", "chosen", "rejected"))
    for i, message in enumerate(pair["prompt"]):
        yield f"{prompt}[{i}].content", message["content"]
    yield f"{chosen}[0].content", pair["chosen"][0]["content"]
    yield f"{rejected}[0].content", pair["rejected"][0]["content"]


def check_pairs(
    numbered_pairs: Iterable[tuple[int, dict[str, Any]]],
    *,
    fmt: str | None,
    tokenizer: Any,
    text_format: str = "chat",
    has_chat_template: bool | None = None,
    model_name: str = "the model",
    max_errors: int = 50,
) -> dict[str, Any]:
    """Check normalised pairs against a model's tokenizer before anything trains on them.

    `numbered_pairs` is `sdpo_engine.data.load_numbered_pairs`'s ``[(line, pair)]``; `fmt` the
    file's format (``standard``, ``conversational`` or ``openai``, as `validate_file` reports it),
    which names the fields the way the user's file does. `has_chat_template` defaults to whether
    `tokenizer` has one (pass True when the job supplies its own template).

    Returns ``{"valid", "code", "errors": [{"line", "field", "reason"}], "error_count"}``; `code`
    is None when valid, else ``no_chat_template`` (message lists on a model without a template,
    reported once at line 0), ``raw_needs_strings`` (``text_format="raw"`` with message lists,
    reported once at line 0) or ``special_tokens_in_text`` (per line and field, naming the token).
    Raises ValueError for an unknown `text_format`.
    """
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format must be one of {', '.join(TEXT_FORMATS)}, got {text_format!r}")
    if has_chat_template is None:
        has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    errors: list[dict[str, Any]] = []
    if fmt in ("conversational", "openai"):
        if text_format == "raw":
            return _whole_file("raw_needs_strings", f"text_format 'raw' trains strings exactly as given, but this "
                               f"file is in the {fmt} format (message lists, which only a chat template can turn "
                               "into one sequence); upload prompt/chosen/rejected strings, or use text_format "
                               "'chat'")
        if not has_chat_template:
            return _whole_file("no_chat_template", f"{model_name} has no chat template, so the roles and turns of "
                               f"this {fmt}-format file (message lists) cannot be rendered: they would be dropped "
                               "and the turns glued together. Supply a template with the job (chat_template), use "
                               "a model that has one, or upload prompt/chosen/rejected strings")
    if text_format == "raw":
        return {"valid": True, "code": None, "errors": [], "error_count": 0}
    tokens = markup_tokens(tokenizer)
    count = 0
    for line, pair in numbered_pairs:
        for path, text in _fields(pair, fmt):
            token = find_markup(text, tokens)
            if token is None:
                continue
            count += 1
            if len(errors) < max_errors:
                errors.append({"line": line, "field": path, "reason": (
                    f"contains {token!r}, chat markup or a special token of {model_name}'s tokenizer: the chat "
                    "template adds the markup itself, so it would be there twice (and read as a control "
                    "token). Remove it, or, if the file is already formatted for this model, set "
                    "text_format 'raw' to train the strings exactly as given")})
    return {"valid": count == 0, "code": "special_tokens_in_text" if count else None, "errors": errors,
            "error_count": count}


def _whole_file(code: str, reason: str) -> dict[str, Any]:
    return {"valid": False, "code": code, "errors": [{"line": 0, "field": None, "reason": reason}], "error_count": 1}
