"""Token ids of a preference pair as the trainer sees them, and which pairs carry no training signal.

Two text formats (a job's `text_format`):

- ``chat`` (default): TRL's own tokenisation. Message lists go through the chat template
  (`add_generation_prompt` for the prompt); plain strings (on a model without a template) are
  tokenised as they are, with EOS appended to each answer that does not end with it.
  `chat_tokenize` mirrors TRL 1.16's `DPOTrainer._prepare_dataset` for `validate --tokenizer`;
  training itself runs TRL's code.
- ``raw``: the strings were formatted before upload (chat markup included) and are trained
  exactly as given, never templated: ``prompt``, ``prompt + chosen`` and ``prompt + rejected``
  are tokenised without the tokenizer's automatic special tokens, then BOS is put in front only if
  the tokenizer normally adds one and the prompt does not already start with it, and EOS is
  appended only to an answer that does not already end with the EOS token (trailing whitespace
  after it allowed). So BOS and EOS are each added at most once.

In both, the answer starts where the tokenised prompt and prompt+answer diverge (TRL's
`common_prefix_length`), so a token that merges across the boundary is split the way TRL does.

A pair has no training signal (DPO's gradient is zero for it) when, after TRL's ``keep_start``
truncation to `max_length`, its prompt fills `max_length` (no answer token is left) or its two
answers are the same tokens. Such pairs are dropped before the reference pass and counted by
reason (`no_signal_reason`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["NO_SIGNAL_REASONS", "adds_bos", "chat_tokenize", "no_signal_reason", "raw_tokenize"]

NO_SIGNAL_REASONS = ("prompt_fills_max_length", "identical_after_truncation")


def no_signal_reason(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                     max_length: int | None) -> str | None:
    """Why a tokenised pair has no training signal under ``keep_start`` truncation, or None.

    ``prompt_fills_max_length``: ``len(prompt_ids) >= max_length`` (TRL drops these itself).
    ``identical_after_truncation``: the answers' first ``max_length - len(prompt_ids)`` tokens are
    equal (also when no truncation happens and the two answers tokenise the same).
    """
    if max_length is not None and len(prompt_ids) >= max_length:
        return "prompt_fills_max_length"
    room = None if max_length is None else max_length - len(prompt_ids)
    if list(chosen_ids[:room]) == list(rejected_ids[:room]):
        return "identical_after_truncation"
    return None


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text=text, add_special_tokens=special)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` puts its BOS token in front of a text by default (Llama-style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and _ids(tokenizer, "a", special=True)[:1] == [bos]


def _split(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int]) -> dict[str, list[int]]:
    n = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": chosen_full[n:], "rejected_ids": rejected_full[n:]}


def raw_tokenize(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of strings trained exactly as given (raw format)."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos_token, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)

    def with_bos(ids: list[int]) -> list[int]:
        return ids if bos and ids[:1] == bos else bos + ids

    def with_eos(answer: str, ids: list[int]) -> list[int]:
        if eos_id is None or (eos_token and answer.rstrip().endswith(eos_token)):
            return ids
        return ids + [eos_id]

    prompt_ids = with_bos(_ids(tokenizer, prompt, special=False))
    chosen_full = with_bos(_ids(tokenizer, prompt + chosen, special=False))
    rejected_full = with_bos(_ids(tokenizer, prompt + rejected, special=False))
    out = _split(prompt_ids, chosen_full, rejected_full)
    out["chosen_ids"] = with_eos(chosen, out["chosen_ids"])
    out["rejected_ids"] = with_eos(rejected, out["rejected_ids"])
    return out


def chat_tokenize(tokenizer: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    """TRL 1.16's tokenisation of one row (``to_trl_rows``'s shape), for counting outside a trainer."""
    if isinstance(row["prompt"], list):
        def templated(messages, **kw):
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

        prompt_ids = templated(row["prompt"], add_generation_prompt=True)
        chosen_full = templated(row["prompt"] + row["chosen"])
        rejected_full = templated(row["prompt"] + row["rejected"])
    else:
        eos = tokenizer.eos_token or ""
        chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
        rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
        prompt_ids = _ids(tokenizer, row["prompt"], special=True)
        chosen_full = _ids(tokenizer, row["prompt"] + chosen, special=True)
        rejected_full = _ids(tokenizer, row["prompt"] + rejected, special=True)
    return _split(prompt_ids, chosen_full, rejected_full)


def check_file(path: str, tokenizer: Any, *, text_format: str = "chat", max_length: int | None = None,
               source_field: str | None = "source", model_name: str = "the model", max_lines: int = 10) -> dict:
    """What a step would refuse or drop in a valid preference file, for `validate --tokenizer`.

    Returns ``{"code", "errors", "error_count", "pairs_dropped"}``: `errors` and `code` from
    `markup.check_pairs`; `pairs_dropped` (only when `max_length` is given and the text passed the
    check) is ``{reason: {"count", "lines": [first file lines]}}`` with the tokenisation the trainer
    uses (`chat_tokenize` mirrors TRL's, `raw_tokenize` is the engine's own).
    """
    from .data import load_numbered_pairs, validate_file
    from .markup import check_pairs
    from .step import to_trl_rows

    numbered = load_numbered_pairs(path, source_field=source_field)
    fmt = validate_file(path, source_field=source_field, max_errors=1)["format"]
    checked = check_pairs(numbered, fmt=fmt, tokenizer=tokenizer, text_format=text_format, model_name=model_name)
    out: dict[str, Any] = {"code": checked["code"], "errors": checked["errors"],
                           "error_count": checked["error_count"], "pairs_dropped": None}
    if max_length is None or not checked["valid"]:
        return out
    rows = to_trl_rows([pair for _, pair in numbered], tokenizer, text_format)
    dropped: dict[str, dict[str, Any]] = {}
    for (line, _), row in zip(numbered, rows, strict=True):
        ids = (raw_tokenize(tokenizer, row["prompt"], row["chosen"], row["rejected"]) if text_format == "raw"
               else chat_tokenize(tokenizer, row))
        reason = no_signal_reason(ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"], max_length)
        if reason is not None:
            entry = dropped.setdefault(reason, {"count": 0, "lines": []})
            entry["count"] += 1
            if len(entry["lines"]) < max_lines:
                entry["lines"].append(line)
    out["pairs_dropped"] = dropped
    return out
