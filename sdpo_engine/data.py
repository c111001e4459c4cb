"""Preference data: read, validate and normalise files of (prompt, chosen, rejected) pairs.

This module is pure Python on purpose: the API validates uploads with it, and the API must never
import torch, transformers or trl (pyarrow, for Parquet files, is imported only when a Parquet file
is read). A file that `validate_file` accepts is therefore a file that `load_pairs` (and so the
engine) can read.

Two file types, told apart by their bytes (never by the name): **Parquet** (starts with the magic
``PAR1``; one pair a row, read a batch of rows at a time with pyarrow, as Hugging Face ``datasets``
and most public preference sets ship) and **JSONL** (one pair a line). Three pair formats,
detected row by row:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``
- conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``
- OpenAI preference: ``{"input": {"messages": [...]}, "preferred_output": [messages],
  "non_preferred_output": [messages]}``

A message is ``{"role": "system" | "user" | "assistant", "content": str | [text parts]}``.
OpenAI's text content parts (``[{"type": "text", "text": "…"}, …]``) are joined with no separator,
as the official ``openai`` SDK joins the text parts of an answer (``Response.output_text``).
Every format is normalised to one shape (the conversational format plus a source)::

    {"prompt": [messages], "chosen": [one assistant message],
     "rejected": [one assistant message], "source": str | None}

Nothing is dropped or rewritten silently. What the engine cannot train faithfully is refused
with the line, the field and the reason: a key repeated in one JSON object, message fields other
than role and content (``tool_calls``, ``name``, ``weight``, …; null counts as absent), the roles
``tool``, ``function`` and ``developer``, content parts other than text, a non-empty
``input.tools``, and top-level fields that carry content the engine would not read (``system``,
``tools``, ``images``, …). Other top-level fields (``id``, ``score``, metadata) are ignored and
named in an ``ignored_fields`` warning. A file must use one format throughout; a line whose format
differs from the first line whose format could be told is an error.

Validation streams the file: JSONL in binary, one line at a time, each line decoded on its own so
that a line that is not UTF-8 is reported with its own line number; Parquet a batch of rows at a
time. A file with any problem is rejected whole, and every problem is reported with its 1-based
line (Parquet: row) number, a dotted field path (``input.messages[2].role``; ``None`` for a
whole-line problem) and a reason. Whole-file problems (an empty file) are reported at line 0.
Data smells that do not stop training are reported as ``warnings`` (see `validate_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sdpo_engine.digests import DigestSet

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "FILE_TYPES",
    "FORMATS",
    "ROLES",
    "WARNING_CODES",
    "DataError",
    "count_tokens",
    "fingerprint",
    "load_numbered_pairs",
    "load_pairs",
    "pair_rows",
    "parquet_rows",
    "pair_key",
    "validate_file",
    "write_pairs",
]

FORMATS = ("standard", "conversational", "openai")
FILE_TYPES = ("jsonl", "parquet")
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any real pair, low enough to bound memory.
# Warning codes, in the order a report lists them.
WARNING_CODES = (
    "ignored_fields",
    "duplicate_pairs",
    "near_duplicate_pairs",
    "answers_differ_only_in_whitespace_or_case",
    "answers_repeat_prompt",
    "answers_contain_markup",
    "prompt_contains_markup",
    "length_bias",
)
# Length bias: warn when chosen is the longer answer in more than this share of the pairs, over at
# least this many pairs (fewer say little about a systematic bias).
LENGTH_BIAS_SHARE = 0.8
LENGTH_BIAS_MIN_PAIRS = 20
# "Both answers repeat the prompt" needs a prompt this long (normalised) so that a short prompt
# that an answer naturally begins with ("Hi" -> "Hi! ...") is not flagged.
REPEAT_MIN_PROMPT_CHARS = 16
_SAMPLE_LINES = 10  # line numbers kept per warning

_BOM = b"\xef\xbb\xbf"
_PARQUET_MAGIC = b"PAR1"
_PARQUET_BATCH_ROWS = 256  # rows decoded at a time: a few hundred kB of text, whatever the file's size
_TRL_KEYS = ("prompt", "chosen", "rejected")
_OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
# Field names per format: (prompt, chosen, rejected). Used in error paths and messages so that an
# OpenAI-format user reads the names of their own file.
_FIELD_NAMES = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "openai": ("input.messages", "preferred_output", "non_preferred_output"),
}
_NO_TOOLS = (
    "the engine renders messages through the chat template without tools, so the model would train "
    "on answers without the tool definitions and calls they rely on"
)
# Message fields OpenAI's formats (and chat exports) carry that the engine does not train on: each
# is refused (when not null) with what to do instead.
_UNSUPPORTED_MESSAGE_FIELDS = {
    "tool_calls": f"tool calls are not supported: {_NO_TOOLS}; remove the tool-calling turns",
    "function_call": f"function calls are not supported: {_NO_TOOLS}; remove the function-calling turns",
    "tool_call_id": f"tool results are not supported: {_NO_TOOLS}; remove the tool turns",
    "name": "message names are not trained on (chat templates render them differently or drop them); "
    "remove the field, or write the name into the content",
    "weight": "per-message weights are not supported: DPO trains on the chosen and rejected answers only, "
    "never on prompt messages; remove the field",
    "refusal": "a refusal field is not trained on; put the refusal's text in content",
    "audio": "audio is not supported (text-only training); remove the field",
}
_UNSUPPORTED_ROLES = {
    "tool": f"role 'tool' is not supported: {_NO_TOOLS}; remove the tool turns",
    "function": f"role 'function' is not supported: {_NO_TOOLS}; remove the function turns",
    "developer": "role 'developer' is not supported: the chat templates this service trains with have no "
    "developer role; use 'system'",
}
# Top-level fields that carry content in other dataset formats: ignoring them would train on
# something other than what the file says.
_CONTENT_TOP_LEVEL_FIELDS = {
    "system": "a top-level system prompt is not read: put it in the prompt as the first message "
    '{"role": "system", "content": ...} (conversational or OpenAI format)',
    "tools": f"tool definitions are not supported: {_NO_TOOLS}; remove the field",
    "functions": f"function definitions are not supported: {_NO_TOOLS}; remove the field",
    "images": "images are not supported (text-only training); remove the field",
    "image": "images are not supported (text-only training); remove the field",
    "audio": "audio is not supported (text-only training); remove the field",
}
_MAX_IGNORED_NAMES = 64  # distinct ignored field names tracked (a hostile file could invent millions)
# Chat markup of the common templates (ChatML, Llama 2/3, Gemma, Phi, Zephyr, Mistral) and the
# plain-text turn headers of older datasets (Anthropic HH's "\n\nHuman:", Alpaca's "### Response:").
_MARKUP = re.compile(r"<\|[A-Za-z0-9_]+\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>")
_TURN_HEADER = re.compile(r"^[ \t]*(?:Human|Assistant|User|USER|ASSISTANT|### ?(?:Instruction|Response|Human|"
                          r"Assistant|Input))[ \t]*:", re.MULTILINE)


class DataError(ValueError):
    """Preference data that cannot be used. `report` is the `validate_file`-style report, or None.

    Raised by `load_pairs` with the full report (``DataError(report)``); the engine also raises it
    with a plain message for data problems found later (``DataError("nothing to train on")``).
    It pickles with its report, so it survives crossing a process boundary.
    """

    def __init__(self, report_or_message: dict[str, Any] | str, report: dict[str, Any] | None = None):
        if isinstance(report_or_message, dict):
            report = report_or_message
            message = _summarise(report)
        else:
            message = str(report_or_message)
        self.report = report
        super().__init__(message)

    def __reduce__(self):  # the default would call DataError(message) and lose the report
        return (type(self), (self.args[0], self.report))


def _summarise(report: dict[str, Any]) -> str:
    errors = report.get("errors") or []
    where = ""
    if errors:
        first = errors[0]
        unit = "row" if report.get("file_type") == "parquet" else "line"
        where = f"{unit} {first['line']}"
        if first.get("field"):
            where += f", {first['field']}"
        where = f"; first: {where}: {first['reason']}"
    return f"invalid preference data: {report.get('error_count', 0)} problem(s){where}"


# --------------------------------------------------------------------------------------------------
# Public API


def validate_file(
    path: str | os.PathLike[str] | BinaryIO,
    *,
    source_field: str | None = "source",
    tokenizer: Any = None,
    max_length: int | None = None,
    max_errors: int = 50,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> dict[str, Any]:
    """Validate a JSONL or Parquet preference file and return a report (never raises for bad content).

    Report keys:

    - ``valid``: True when there is no problem at all (warnings do not count).
    - ``file_type``: ``jsonl`` or ``parquet`` (told by the file's first bytes, ``PAR1``).
    - ``format``: ``standard``, ``conversational`` or ``openai`` (the first line whose format
      could be told), or None when no line could be read as a pair.
    - ``rows``: the number of non-blank lines (Parquet: rows), i.e. pairs, valid or not.
    - ``errors``: at most `max_errors` of ``{"line", "field", "reason"}``, in file order (for
      Parquet, ``line`` is the 1-based row number); ``error_count`` is the total, so a caller can
      say "and 1,234 more".
    - ``warnings``: data smells that do not stop training, each ``{"code", "message", "count",
      "lines"}`` (``count`` pairs; ``lines``: the first 10 of their line numbers), in the order of
      `WARNING_CODES`, only those that occur: ``ignored_fields`` (top-level fields not used for
      training, named in the message), ``duplicate_pairs`` (same prompt, chosen and rejected as an
      earlier pair), ``near_duplicate_pairs`` (the same after collapsing whitespace and case, but
      not exactly), ``answers_differ_only_in_whitespace_or_case``, ``answers_repeat_prompt`` (both
      answers begin with the prompt's last user message, normalised, of at least 16 characters),
      ``answers_contain_markup`` (chat markup such as ``<|im_start|>``, ``[INST]`` or a turn
      header such as ``\\n\\nHuman:`` inside an answer), ``prompt_contains_markup`` (chat markup in
      a prompt message: a job with the default text format refuses such pairs), ``length_bias``
      (chosen is the longer answer in more than 80% of at least 20 pairs; ``count`` pairs with the
      longer chosen; the measure is ``stats.length``).
    - ``stats``: computed over the lines that validated: ``rows``, ``duplicates`` (rows whose
      prompt/chosen/rejected repeat an earlier row exactly), ``near_duplicates``, ``sources``
      ({source: rows}), ``without_source`` (rows with no source), ``length`` (``{"unit":
      "tokens" | "characters", "chosen_longer": pairs, "chosen_longer_share": 0..1,
      "mean_difference": mean of chosen minus rejected length}``: tokens when `tokenizer` is given,
      else characters), and, when `tokenizer` is given, ``tokens``
      ({"prompt"|"chosen"|"rejected"|"prompt_plus_longer_answer": {"min", "mean", "max"}}) and,
      with `max_length` too, ``truncated`` (pairs whose prompt plus longer answer exceeds
      `max_length` tokens). Token counts ignore the chat template: a conversational prompt counts
      the sum of its messages' content tokens, so the numbers are a slight underestimate.

    `source_field` names the top-level field holding a pair's source (used by stratified and
    easy-to-hard partitioning); None ignores sources. Lines of more than `max_line_bytes` bytes
    (excluding the line ending) are reported without being parsed; a Parquet row is held to the
    same limit by the size of the row written as one compact JSON line.
    """
    collector = _Collector(max_errors=max_errors, tokenizer=tokenizer, max_length=max_length)
    for result in _scan(path, source_field=source_field, max_line_bytes=max_line_bytes):
        collector.add(result)
    return collector.report()


def load_pairs(
    path: str | os.PathLike[str],
    *,
    source_field: str | None = "source",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[dict[str, Any]]:
    """Read a preference file (JSONL or Parquet) in any accepted format and return its pairs, normalised.

    Raises `DataError` (carrying the same report `validate_file` gives) if the file has any
    problem: training never runs on a partly valid file.
    """
    collector = _Collector(max_errors=50, keep_pairs=True)
    for result in _scan(path, source_field=source_field, max_line_bytes=max_line_bytes):
        collector.add(result)
    report = collector.report()
    if not report["valid"]:
        raise DataError(report)
    return collector.pairs


def load_numbered_pairs(
    path: str | os.PathLike[str],
    *,
    source_field: str | None = "source",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[tuple[int, dict[str, Any]]]:
    """`load_pairs`, each pair with its 1-based line (Parquet: row) number: ``[(line, pair), ...]``.

    For checks that run after validation (against a model's tokenizer, at job preparation) and
    must name the user's line. Raises `DataError` like `load_pairs`.
    """
    collector = _Collector(max_errors=50, keep_pairs=True)
    for result in _scan(path, source_field=source_field, max_line_bytes=max_line_bytes):
        collector.add(result)
    report = collector.report()
    if not report["valid"]:
        raise DataError(report)
    return list(zip(collector.pair_lines, collector.pairs, strict=True))


def held_out_overlap(
    train_paths: Iterable[str | os.PathLike[str]],
    held_out_path: str | os.PathLike[str],
    *,
    source_field: str | None = "source",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> dict[str, Any]:
    """How much of a held-out (validation) file the training files already hold: held-out figures
    (heldout_acc, the eval margins, the quality gate) measured on pairs the policy trained on read
    as generalisation when they are memorisation. Texts compare as the duplicate check's
    ``near_duplicate_pairs`` does (whitespace runs collapsed, case folded); a pair's source does not
    count. Returns::

        {"validation_pairs": M,          # valid pairs in the held-out file
         "same_pairs": n,                # held-out pairs whose prompt, chosen and rejected are a training pair's
         "same_pair_lines": [...],       # their 1-based lines (Parquet: rows), the first 10
         "same_prompts": k,              # other held-out pairs whose prompt (every message) is a training prompt
         "same_prompt_lines": [...]}

    Streams each file once (invalid lines are skipped: the files were validated at upload); memory is
    two `DigestSet`s over the training pairs, 16-32 bytes each.
    """
    pairs, prompts = DigestSet(), DigestSet()

    def digests(pair: dict[str, Any]) -> tuple[bytes, bytes]:
        prompt = [(m["role"], _normalised(m["content"])) for m in pair["prompt"]]
        chosen, rejected = _normalised(pair["chosen"][0]["content"]), _normalised(pair["rejected"][0]["content"])
        return _pair_digest(prompt, chosen, rejected), _pair_digest(prompt, "", "")

    for path in train_paths:
        for result in _scan(path, source_field=source_field, max_line_bytes=max_line_bytes):
            if result.pair is not None:
                pair_digest, prompt_digest = digests(result.pair)
                pairs.add(pair_digest)
                prompts.add(prompt_digest)
    out: dict[str, Any] = {"validation_pairs": 0, "same_pairs": 0, "same_pair_lines": [], "same_prompts": 0,
                           "same_prompt_lines": []}
    for result in _scan(held_out_path, source_field=source_field, max_line_bytes=max_line_bytes):
        if result.pair is None:
            continue
        out["validation_pairs"] += 1
        pair_digest, prompt_digest = digests(result.pair)
        kind = "same_pair" if pair_digest in pairs else "same_prompt" if prompt_digest in prompts else None
        if kind is not None:
            out[f"{kind}s"] += 1
            if len(out[f"{kind}_lines"]) < _SAMPLE_LINES:
                out[f"{kind}_lines"].append(result.line)
    return out


def describe_held_out_overlap(overlap: dict[str, Any], validation: str, training: str) -> str | None:
    """One sentence for a `held_out_overlap` result, or None when nothing is shared. `validation` names
    the held-out file as the sentence's subject ("Validation file file-abc"), `training` the training
    files ("file-1, file-2")."""
    same, prompts, total = overlap["same_pairs"], overlap["same_prompts"], overlap["validation_pairs"]
    if not (same or prompts):
        return None

    def lines(key: str, count: int) -> str:
        shown = ", ".join(str(n) for n in overlap[key])
        return f"line{'s' if count > 1 else ''} {shown}{', …' if count > len(overlap[key]) else ''}"

    parts = []
    if same:
        parts.append(f"{same} of its {total} pairs {'are' if same > 1 else 'is'} also in the training data "
                     "(same prompt, chosen and rejected, "
                     f"ignoring case and whitespace; {lines('same_pair_lines', same)})")
    if prompts:
        whose = f"{prompts} more" if same else f"{prompts} of its {total} pairs"
        parts.append(f"{whose} {'have' if prompts > 1 else 'has'} a training prompt with other answers "
                     f"({lines('same_prompt_lines', prompts)})")
    return (f"{validation} overlaps the training data ({training}): {'; '.join(parts)}. The held-out figures "
            "(heldout_acc, the eval margins, a quality gate) count these pairs as unseen.")


def write_pairs(pairs: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write normalised pairs as JSONL, plus ``source`` when set.

    The standard string format when every prompt is a single user message (it reads back as the
    same normalised pairs, and a chunk of a string file stays a string file: what the model-side
    checks of `markup.check_pairs` and ``text_format="raw"`` look at), else the conversational
    format. The output reads back with `load_pairs` using the default ``source_field="source"``.
    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    rows = pair_rows(pairs)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def pair_rows(pairs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalised pairs as the JSON rows `write_pairs` writes (one format for all of them).

    The standard string format when every prompt is a single user message, else the conversational
    format; ``source`` when set. Either reads back with `load_pairs` as the same normalised pairs.
    """
    pairs = list(pairs)
    as_strings = all(len(p["prompt"]) == 1 and p["prompt"][0]["role"] == "user" for p in pairs)
    rows = []
    for pair in pairs:
        if as_strings:
            row = {"prompt": pair["prompt"][0]["content"], "chosen": pair["chosen"][0]["content"],
                   "rejected": pair["rejected"][0]["content"]}
        else:
            row = {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
        if pair.get("source") is not None:
            row["source"] = pair["source"]
        rows.append(row)
    return rows


def parquet_rows(path: str | os.PathLike[str] | BinaryIO) -> int | None:
    """The number of rows a Parquet file's footer declares, read without reading any row; None when
    the file is not Parquet (no ``PAR1`` magic) or its footer is unreadable (`validate_file` then
    says why). Lets a caller refuse a file with too many rows before validating it. `path` may be
    a seekable binary file object (an object in the store, read by ranged GETs); it stays open."""
    with _binary(path) as f:
        if f.read(len(_PARQUET_MAGIC)) != _PARQUET_MAGIC:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError, ValueError):
            return None


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Return the sha256 of the file's bytes as 64 hex digits (no ``sha256:`` prefix)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_key(pair: dict[str, Any]) -> str:
    """A stable key for a normalised pair's content (prompt, chosen, rejected; not the source).

    Two pairs with the same key are duplicates whatever format they were read from. Used for the
    ``duplicates`` statistic and available to callers that want to deduplicate or split by pair.
    """
    canonical = _KEY_ENCODER.encode([pair["prompt"], pair["chosen"], pair["rejected"]])
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def count_tokens(tokenizer: Any, text: str) -> int:
    """Count the tokens of `text` without special tokens, for any common tokenizer object.

    Supports a `tokenizers.Tokenizer` (``encode`` returns an ``Encoding`` with ``.ids``), a
    transformers tokenizer (``encode`` returns a list of ids), and a bare callable returning a list
    or a mapping with ``input_ids``. Special tokens are left out because the chat template, not the
    text, decides which ones the trainer adds.
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        try:
            out = encode(text, add_special_tokens=False)
        except TypeError:  # an encode() without that keyword
            out = encode(text)
    elif callable(tokenizer):
        out = tokenizer(text)
    else:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has neither encode() nor __call__()")
    ids = getattr(out, "ids", None)
    if ids is None and isinstance(out, dict):
        ids = out.get("input_ids")
    if ids is None and hasattr(out, "keys") and "input_ids" in out.keys():  # BatchEncoding
        ids = out["input_ids"]
    if ids is None:
        ids = out
    return len(ids)


# --------------------------------------------------------------------------------------------------
# Scanning: bytes -> rows (JSONL lines or Parquet rows) -> one validated pair per row


@dataclass
class _LineResult:
    line: int  # 1-based; 0 for whole-file problems
    file_type: str = "jsonl"
    format: str | None = None
    pair: dict[str, Any] | None = None
    errors: list[tuple[str | None, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # top-level fields not used for training


class _RejectedConstant(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN, Infinity and -Infinity by default; they are not JSON, and other
    # readers (and the API's clients) would refuse the file.
    raise _RejectedConstant(f"{name} is not valid JSON")


class _ObjectWithDuplicates(dict):
    """A JSON object in which a key occurred more than once (the last value is kept, as json does)."""

    duplicate_keys: list[str]


class _LineDecoder:
    """A JSON decoder that notices repeated keys, one per scan (its flag is per line, so it is not
    shared between threads validating different files)."""

    def __init__(self) -> None:
        self.saw_duplicates = False
        self.decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        self.saw_duplicates = True
        seen: set[str] = set()
        repeated: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in repeated:
                repeated.append(key)
            seen.add(key)
        flagged = _ObjectWithDuplicates(obj)
        flagged.duplicate_keys = repeated
        return flagged

    def decode(self, text: str) -> Any:
        self.saw_duplicates = False
        return self.decoder.decode(text)


# Built once: json.dumps with options builds a new encoder on every call, which is a measurable
# share of validating a large file.
_KEY_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))
# A Parquet row's size as a compact JSON line (what the line limit measures for JSONL); values
# JSON has no type for (dates, binary) are counted by their str().
_ROW_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def _read_lines(f: Any, max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (line number, content without line ending or None if too long, content length).

    Reads with a bounded readline so that a multi-gigabyte line (or a file with no newlines) never
    sits in memory whole: an over-long line is skipped in blocks and only its length is kept.
    """
    line_no = 0
    # +2 leaves room for "\r\n" after a line of exactly max_line_bytes.
    limit = max_line_bytes + 2
    while True:
        chunk = f.readline(limit)
        if not chunk:
            return
        line_no += 1
        if chunk.endswith(b"\n") or len(chunk) < limit:
            content = chunk[:-1] if chunk.endswith(b"\n") else chunk
            if content.endswith(b"\r"):  # CRLF line endings are fine
                content = content[:-1]
            if len(content) > max_line_bytes:
                yield line_no, None, len(content)
            else:
                yield line_no, content, len(content)
            continue
        # Over-long line: skip the rest of it without keeping it, remembering only its length and
        # its last two bytes (to leave a "\r\n" ending out of the length).
        length = len(chunk)
        tail = chunk[-2:]
        while True:
            block = f.readline(1 << 16)
            if not block:
                break
            length += len(block)
            tail = (tail + block)[-2:]
            if block.endswith(b"\n"):
                break
        if tail.endswith(b"\n"):
            length -= 2 if tail == b"\r\n" else 1
        yield line_no, None, length


@contextlib.contextmanager
def _binary(source: str | os.PathLike[str] | BinaryIO) -> Iterator[BinaryIO]:
    """A path opened for reading, or a caller's seekable binary file object from its start (left
    open: the caller owns it)."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield f
        return
    source.seek(0)
    yield source


def _scan(
    path: str | os.PathLike[str] | BinaryIO, *, source_field: str | None, max_line_bytes: int
) -> Iterator[_LineResult]:
    """Yield one `_LineResult` per non-blank line or Parquet row (and per whole-file problem)."""
    if source_field is not None and (source_field in _TRL_KEYS or source_field in _OPENAI_KEYS):
        raise ValueError(f"source_field {source_field!r} is a preference field, not a source field")
    if max_line_bytes < 1:
        raise ValueError("max_line_bytes must be at least 1")
    first_format: tuple[int, str] | None = None
    saw_pair = False
    with _binary(path) as f:
        # Told by the bytes, not the name: an upload's name is only the client's say-so.
        parquet = f.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC
        f.seek(0)
        file_type, unit = ("parquet", "row") if parquet else ("jsonl", "line")
        rows = _parquet_rows(f, max_line_bytes) if parquet else _jsonl_rows(f, max_line_bytes)
        for result, obj in rows:
            result.file_type = file_type
            if result.line == 0:  # a whole-file problem (an unreadable Parquet file)
                saw_pair = True
                yield result
                continue
            saw_pair = True
            if obj is not None:
                _check_pair(obj, source_field, result)
            if result.format is not None:
                if first_format is None:
                    first_format = (result.line, result.format)
                elif result.format != first_format[1]:
                    result.errors.insert(
                        0,
                        (None, f"format differs from {unit} {first_format[0]}'s ({first_format[1]})"),
                    )
            if result.errors:
                result.pair = None
            yield result
    if not saw_pair:
        yield _LineResult(line=0, file_type=file_type, errors=[(None, "file is empty")])


def _jsonl_rows(f: Any, max_line_bytes: int) -> Iterator[tuple[_LineResult, dict[str, Any] | None]]:
    """(result, parsed object or None) per non-blank line; problems so far are in result.errors."""
    decoder = _LineDecoder()
    for line_no, raw, length in _read_lines(f, max_line_bytes):
        result = _LineResult(line=line_no)
        if line_no == 1 and raw is not None and raw.startswith(_BOM):
            # Rejected rather than stripped (the API answers it with a 4xx): RFC 8259 forbids
            # writing a BOM before JSON, and other JSONL readers fail on such a first line.
            result.errors.append((None, "file starts with a UTF-8 byte order mark; save as UTF-8 without BOM"))
            raw = raw[len(_BOM) :]
        if raw is None:
            result.errors.append((None, f"line is {length} bytes; the limit is {max_line_bytes}"))
            yield result, None
            continue
        if not raw.strip():
            if result.errors:  # a BOM on an otherwise blank first line
                yield result, None
            continue
        yield result, _parse_line(raw, decoder, result)


def _parse_line(raw: bytes, decoder: _LineDecoder, result: _LineResult) -> dict[str, Any] | None:
    """Decode and parse one line; None after recording the problem in `result`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        result.errors.append(
            (None, f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line")
        )
        return None
    try:
        obj = decoder.decode(text)
    except _RejectedConstant as exc:
        result.errors.append((None, f"invalid JSON: {exc}"))
        return None
    except json.JSONDecodeError as exc:
        result.errors.append((None, f"invalid JSON: {exc.msg} at column {exc.colno}"))
        return None
    except RecursionError:
        result.errors.append((None, "invalid JSON: nested too deeply"))
        return None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        result.errors.append((None, f"invalid JSON: {exc}"))
        return None
    if not isinstance(obj, dict):
        result.errors.append((None, f"expected a JSON object, got {_json_type(obj)}"))
        return None
    if decoder.saw_duplicates:
        # JSON readers keep one of the values (Python's json: the last) without a word: the user
        # cannot know which answer would be trained.
        try:
            _duplicate_key_errors(obj, "", result.errors)
        except RecursionError:
            result.errors.append((None, "a key is repeated in one JSON object"))
    return obj


def _duplicate_key_errors(value: Any, path: str, errors: list) -> None:
    if isinstance(value, dict):
        for key in getattr(value, "duplicate_keys", ()):
            errors.append(
                (_join(path, key), f"duplicate key {key!r} in one JSON object: a reader keeps only one of "
                 "the values without saying so; keep exactly one")
            )
        for key, item in value.items():
            if isinstance(item, dict | list):
                _duplicate_key_errors(item, _join(path, key), errors)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                _duplicate_key_errors(item, f"{path}[{i}]", errors)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parquet_rows(f: Any, max_line_bytes: int) -> Iterator[tuple[_LineResult, dict[str, Any] | None]]:
    """(result, row as a dict or None) per Parquet row, a batch of rows decoded at a time.

    A Parquet column holds a value (maybe null) in every row, so null is how a row says "absent":
    null values are dropped (at any depth) before the row is checked, which makes a row read the
    same as the JSONL line that leaves those fields out.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a base dependency
        yield _LineResult(line=0, errors=[(None, "reading a Parquet file needs pyarrow (pip install pyarrow)")]), None
        return
    try:
        # Column chunks read a megabyte at a time rather than whole (a row group can hold the whole
        # file), and no reader threads: each keeps memory of its own (measured in bench/parquet_upload.py).
        parquet = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield _LineResult(line=0, errors=[(None, f"not a readable Parquet file: {exc}")]), None
        return
    repeated = _repeated_column(schema, pa)
    if repeated is not None:
        yield _LineResult(line=0, errors=[(repeated, "column or struct field name repeated: a reader keeps "
                                                     "only one of them; keep exactly one")]), None
        return
    row_no = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, use_threads=False):
            for row in batch.to_pylist():
                row_no += 1
                result = _LineResult(line=row_no)
                size = len(_ROW_ENCODER.encode(row).encode("utf-8", "surrogatepass"))
                if size > max_line_bytes:
                    result.errors.append((None, f"row is {size} bytes as a JSON line; the limit is {max_line_bytes}"))
                    yield result, None
                    continue
                yield result, _drop_nulls(row)
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield _LineResult(line=0, errors=[(None, f"Parquet data unreadable after row {row_no}: {exc}")]), None


def _repeated_column(schema: Any, pa: Any) -> str | None:
    """The dotted path of the first repeated column or struct field name, or None."""

    def walk(fields: Iterable[Any], path: str) -> str | None:
        seen: set[str] = set()
        for item in fields:
            name = _join(path, item.name)
            if item.name in seen:
                return name
            seen.add(item.name)
            found = walk_type(item.type, name)
            if found is not None:
                return found
        return None

    def walk_type(dtype: Any, path: str) -> str | None:
        if pa.types.is_struct(dtype):
            return walk((dtype.field(i) for i in range(dtype.num_fields)), path)
        if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
            return walk_type(dtype.value_type, f"{path}[]")
        return None

    return walk(schema, "")


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _check_pair(obj: dict[str, Any], source_field: str | None, result: _LineResult) -> None:
    errors = result.errors
    has_trl = any(k in obj for k in _TRL_KEYS)
    has_openai = any(k in obj for k in _OPENAI_KEYS)
    if has_trl and has_openai:
        errors.append(
            (
                None,
                "mixes prompt/chosen/rejected with OpenAI's input/preferred_output/"
                "non_preferred_output; use one format",
            )
        )
        return
    if not has_trl and not has_openai:
        errors.append(
            (
                None,
                "not a preference pair: expected prompt, chosen and rejected, or input, "
                "preferred_output and non_preferred_output",
            )
        )
        return

    _check_other_fields(obj, _OPENAI_KEYS if has_openai else _TRL_KEYS, source_field, result)
    fmt: str | None
    if has_openai:
        fmt = "openai"
        prompt = _check_openai_input(obj, errors)
        chosen = _check_answer(obj, "preferred_output", errors)
        rejected = _check_answer(obj, "non_preferred_output", errors)
    else:
        fmt = _detect_trl_format(obj)
        if fmt is None:
            for key in _TRL_KEYS:
                if key not in obj:
                    errors.append((key, "missing"))
                else:
                    errors.append(
                        (key, f"expected a string or a list of messages, got {_json_type(obj[key])}")
                    )
            return
        if fmt == "standard":
            prompt_text = _check_text(obj, "prompt", "prompt", errors, fmt)
            chosen_text = _check_text(obj, "chosen", "chosen", errors, fmt)
            rejected_text = _check_text(obj, "rejected", "rejected", errors, fmt)
            prompt = None if prompt_text is None else [{"role": "user", "content": prompt_text}]
            chosen = None if chosen_text is None else [{"role": "assistant", "content": chosen_text}]
            rejected = None if rejected_text is None else [{"role": "assistant", "content": rejected_text}]
        else:
            prompt = _check_prompt_messages(obj, "prompt", "prompt", errors, fmt)
            chosen = _check_answer(obj, "chosen", errors, fmt)
            rejected = _check_answer(obj, "rejected", errors, fmt)
    result.format = fmt

    # The exact strings the chat template receives: equal strings give equal tokens, so the pair
    # has no training signal. Strings that differ only in whitespace or case are trained (their
    # tokens differ) and reported as a warning instead.
    if chosen is not None and rejected is not None and chosen[0]["content"] == rejected[0]["content"]:
        _, chosen_name, rejected_name = _FIELD_NAMES[fmt]
        errors.append((rejected_name, f"is the same text as {chosen_name}"))

    source = _check_source(obj, source_field, errors)
    if errors or prompt is None or chosen is None or rejected is None:
        return
    result.pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source}


def _check_other_fields(obj: dict[str, Any], pair_keys: tuple[str, ...], source_field: str | None,
                        result: _LineResult) -> None:
    """Top-level fields besides the pair's own: content-bearing ones are refused, the rest ignored
    (named in the report's ``ignored_fields`` warning)."""
    for key, value in obj.items():
        if key in pair_keys or key == source_field or value is None:
            continue
        if key in _CONTENT_TOP_LEVEL_FIELDS and value not in ("", [], {}):
            result.errors.append((key, _CONTENT_TOP_LEVEL_FIELDS[key]))
        else:
            result.ignored.append(key)


def _detect_trl_format(obj: dict[str, Any]) -> str | None:
    # The answers decide (they are what differs between the formats); the prompt only when both
    # answers are missing or of a wrong type, so that one bad field does not hide the format.
    for key in ("chosen", "rejected", "prompt"):
        value = obj.get(key)
        if isinstance(value, str):
            return "standard"
        if isinstance(value, list):
            return "conversational"
    return None


def _expected(fmt: str | None, what: str) -> str:
    return f"expected {what} ({fmt} format)" if fmt in ("standard", "conversational") else f"expected {what}"


def _check_text(
    container: dict[str, Any], key: str, path: str, errors: list, fmt: str | None = None
) -> str | None:
    """Check a non-empty string field; return it, or None after recording the problem."""
    if key not in container:
        errors.append((path, "missing"))
        return None
    value = container[key]
    if not isinstance(value, str):
        errors.append((path, f"{_expected(fmt, 'a string')}, got {_json_type(value)}"))
        return None
    return _checked_string(value, path, errors)


def _checked_string(value: str, path: str, errors: list) -> str | None:
    if not value.strip():
        errors.append((path, "is empty or only whitespace"))
        return None
    if not _encodable(value):
        # JSON allows "\ud800"; such a string cannot be written back as UTF-8 or tokenised.
        errors.append((path, "contains an unpaired UTF-16 surrogate escape"))
        return None
    return value


def _check_content(message: dict[str, Any], path: str, errors: list) -> str | None:
    """A message's content: a string, or OpenAI's text content parts joined with no separator."""
    if "content" not in message or message["content"] is None:
        errors.append((path, "missing"))
        return None
    value = message["content"]
    if isinstance(value, str):
        return _checked_string(value, path, errors)
    if not isinstance(value, list):
        errors.append((path, f"expected a string or a list of text parts, got {_json_type(value)}"))
        return None
    if not value:
        errors.append((path, "is an empty list of content parts"))
        return None
    texts: list[str] | None = []
    for i, part in enumerate(value):
        item = f"{path}[{i}]"
        if not isinstance(part, dict):
            errors.append((item, f'expected a content part {{"type": "text", "text": ...}}, got {_json_type(part)}'))
            texts = None
            continue
        kind = part.get("type")
        if kind != "text":
            reason = ("missing" if "type" not in part else f"expected a string, got {_json_type(kind)}"
                      if not isinstance(kind, str) else
                      f"content part type {kind!r} is not supported: only text parts are trained on "
                      "(text-only training); remove the part")
            errors.append((f"{item}.type", reason))
            texts = None
            continue
        for key, extra in part.items():
            if key not in ("type", "text") and extra is not None:
                errors.append((f"{item}.{key}", "unknown field of a text part: it would not be trained on; a "
                               "text part has only type and text"))
                texts = None
        text = part.get("text")
        if not isinstance(text, str):
            errors.append((f"{item}.text", "missing" if text is None else f"expected a string, got {_json_type(text)}"))
            texts = None
        elif texts is not None:
            texts.append(text)
    if texts is None:
        return None
    return _checked_string("".join(texts), path, errors)


def _check_messages(value: Any, path: str, errors: list, fmt: str | None) -> list[dict[str, str]] | None:
    """Check a list of {role, content} messages; return them normalised, or None."""
    if not isinstance(value, list):
        errors.append((path, f"{_expected(fmt, 'a list of messages')}, got {_json_type(value)}"))
        return None
    messages: list[dict[str, str]] | None = []
    for i, message in enumerate(value):
        item = f"{path}[{i}]"
        if not isinstance(message, dict):
            errors.append(
                (item, f"expected a message object with role and content, got {_json_type(message)}")
            )
            messages = None
            continue
        n_before = len(errors)
        role = message.get("role")
        if "role" not in message:
            errors.append((f"{item}.role", "missing"))
        elif not isinstance(role, str):
            errors.append((f"{item}.role", f"expected a string, got {_json_type(role)}"))
        elif role in _UNSUPPORTED_ROLES:
            errors.append((f"{item}.role", _UNSUPPORTED_ROLES[role]))
        elif role not in ROLES:
            errors.append((f"{item}.role", f"unknown role {role!r}; expected system, user or assistant"))
        content = _check_content(message, f"{item}.content", errors)
        for key, extra in message.items():
            if key in ("role", "content") or extra is None:  # null: nothing would be dropped
                continue
            errors.append((f"{item}.{key}", _UNSUPPORTED_MESSAGE_FIELDS.get(
                key, f"unknown message field {key!r}: it would not be trained on; a message has only role "
                "and content")))
        # no new error means role is one of ROLES; isinstance says so to the type checker
        if messages is not None and len(errors) == n_before and isinstance(role, str) and content is not None:
            messages.append({"role": role, "content": content})
        else:
            messages = None
    return messages


def _check_prompt_messages(
    container: dict[str, Any], key: str, path: str, errors: list, fmt: str | None
) -> list[dict[str, str]] | None:
    if key not in container:
        errors.append((path, "missing"))
        return None
    value = container[key]
    n_before = len(errors)
    messages = _check_messages(value, path, errors, fmt)
    if not isinstance(value, list):
        return None
    if not value:
        errors.append((path, "is empty; expected at least one message"))
        return None
    # Role rules, checked on whatever roles are readable even if some other field is bad.
    roles = [m.get("role") if isinstance(m, dict) else None for m in value]
    if roles[-1] == "assistant":
        errors.append(
            (
                f"{path}[{len(value) - 1}].role",
                "the prompt ends with an assistant message; it must end with the user's turn",
            )
        )
    elif "user" not in roles and len(errors) == n_before:
        errors.append((path, "has no user message"))
    return messages if len(errors) == n_before else None


def _check_answer(
    container: dict[str, Any], key: str, errors: list, fmt: str | None = None
) -> list[dict[str, str]] | None:
    """Check an answer: a list holding exactly one assistant message."""
    if key not in container:
        errors.append((key, "missing"))
        return None
    value = container[key]
    n_before = len(errors)
    messages = _check_messages(value, key, errors, fmt)
    if not isinstance(value, list):
        return None
    if len(value) != 1:
        errors.append((key, f"expected exactly one assistant message, got {len(value)} messages"))
        return None
    # Checked on the raw message so a wrong role is reported even beside an empty content.
    role = value[0].get("role") if isinstance(value[0], dict) else None
    if role in ROLES and role != "assistant":
        errors.append((f"{key}[0].role", f"expected 'assistant', got {role!r}"))
    return messages if len(errors) == n_before else None


def _check_openai_input(obj: dict[str, Any], errors: list) -> list[dict[str, str]] | None:
    if "input" not in obj:
        errors.append(("input", "missing"))
        return None
    value = obj["input"]
    if not isinstance(value, dict):
        errors.append(("input", f"expected an object with messages, got {_json_type(value)}"))
        return None
    # OpenAI's input may also carry tools and parallel_tool_calls. No tools (absent, null or an
    # empty list) is what the engine trains; a tool definition it would drop is refused.
    tools = value.get("tools")
    if tools not in (None, []):
        errors.append(("input.tools", f"tool definitions are not supported: {_NO_TOOLS}; remove input.tools "
                       "(an empty list is accepted)"))
    parallel = value.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        errors.append(("input.parallel_tool_calls", f"expected a boolean, got {_json_type(parallel)}"))
    for key, extra in value.items():
        if key not in ("messages", "tools", "parallel_tool_calls") and extra is not None:
            errors.append((f"input.{key}", "unknown field of input: it would not be trained on; OpenAI's input "
                           "has messages, tools and parallel_tool_calls"))
    return _check_prompt_messages(value, "messages", "input.messages", errors, None)


def _check_source(obj: dict[str, Any], source_field: str | None, errors: list) -> str | None:
    if source_field is None or source_field not in obj or obj[source_field] is None:
        return None
    value = obj[source_field]
    # bool is an int in Python; true/false as a source is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, str | int):
        errors.append((source_field, f"expected a string (or an integer), got {_json_type(value)}"))
        return None
    if isinstance(value, int):
        return str(value)
    if not value.strip():
        errors.append((source_field, "is empty; leave the field out (or null) for a row without a source"))
        return None
    if not _encodable(value):
        errors.append((source_field, "contains an unpaired UTF-16 surrogate escape"))
        return None
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, bytes):
        return "binary data"
    return type(value).__name__  # a Parquet type JSON has no name for (a date, a decimal, ...)


# --------------------------------------------------------------------------------------------------
# Aggregation: errors, statistics, warnings, and (for load_pairs) the pairs themselves


class _RunningStat:
    __slots__ = ("count", "total", "low", "high")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.low: int | None = None
        self.high: int | None = None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

    def summary(self) -> dict[str, float | int | None]:
        mean = round(self.total / self.count, 2) if self.count else None
        return {"min": self.low, "mean": mean, "max": self.high}


def _has_markup(text: str) -> bool:
    # The substring tests are C-fast and rule out most texts before the regex runs (3x overall).
    return ("<" in text or "[" in text) and _MARKUP.search(text) is not None


def _pair_digest(prompt: list[tuple[str, str]], chosen: str, rejected: str) -> bytes:
    """16 bytes naming a pair's content (not its source). Each text is prefixed with its role and
    length, so no two different pairs give the same string to hash; blake2b, because this runs
    twice per row and is 2-3x cheaper than JSON-encoding the pair for `pair_key`."""
    parts = [f"{role}{len(text)}:{text}" for role, text in prompt]
    parts.append(f"chosen{len(chosen)}:{chosen}")
    parts.append(f"rejected{len(rejected)}:{rejected}")
    return hashlib.blake2b("".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _normalised(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped, case folded."""
    return " ".join(text.split()).casefold()


class _Collector:
    def __init__(
        self,
        *,
        max_errors: int,
        tokenizer: Any = None,
        max_length: int | None = None,
        keep_pairs: bool = False,
    ) -> None:
        self.max_errors = max_errors
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.keep_pairs = keep_pairs
        self.pairs: list[dict[str, Any]] = []
        self.pair_lines: list[int] = []
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self.file_type: str | None = None
        self.format: str | None = None
        self.rows = 0
        self.valid_rows = 0
        self.duplicates = 0
        # Digests of the pairs seen, exact and compact: 16 to 32 bytes per row instead of a set's ~90
        # (sdpo_engine/digests.py), so a million-row upload costs the API tens of MB, not hundreds.
        self.seen = DigestSet()
        self.seen_normalised = DigestSet()
        self.sources: dict[str, int] = {}
        self.without_source = 0
        self.token_stats = {
            name: _RunningStat() for name in ("prompt", "chosen", "rejected", "prompt_plus_longer_answer")
        }
        self.truncated = 0
        self.warning_counts = dict.fromkeys(WARNING_CODES, 0)
        self.warning_lines: dict[str, list[int]] = {code: [] for code in WARNING_CODES}
        self.ignored_names: dict[str, int] = {}
        self.chosen_longer = 0
        self.length_difference = 0

    def add(self, result: _LineResult) -> None:
        if self.file_type is None:
            self.file_type = result.file_type
        if result.line > 0:
            self.rows += 1
        if self.format is None and result.format is not None:
            self.format = result.format
        for field_path, reason in result.errors:
            self.error_count += 1
            if len(self.errors) < self.max_errors:
                self.errors.append({"line": result.line, "field": field_path, "reason": reason})
        pair = result.pair
        if pair is None:
            return
        self.valid_rows += 1
        if self.keep_pairs:
            self.pairs.append(pair)
            self.pair_lines.append(result.line)
        if pair["source"] is None:
            self.without_source += 1
        else:
            self.sources[pair["source"]] = self.sources.get(pair["source"], 0) + 1
        if self.tokenizer is not None:
            chosen_length, rejected_length = self._add_tokens(pair)
        else:
            chosen_length, rejected_length = len(pair["chosen"][0]["content"]), len(pair["rejected"][0]["content"])
        self._add_smells(result, pair, chosen_length, rejected_length)

    def _warn(self, code: str, line: int) -> None:
        self.warning_counts[code] += 1
        if len(self.warning_lines[code]) < _SAMPLE_LINES:
            self.warning_lines[code].append(line)

    def _add_smells(self, result: _LineResult, pair: dict[str, Any], chosen_length: int,
                    rejected_length: int) -> None:
        line = result.line
        if result.ignored:
            self._warn("ignored_fields", line)
            for name in result.ignored:
                if name in self.ignored_names or len(self.ignored_names) < _MAX_IGNORED_NAMES:
                    self.ignored_names[name] = self.ignored_names.get(name, 0) + 1
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        chosen_n, rejected_n = _normalised(chosen), _normalised(rejected)
        prompt_n = [(m["role"], _normalised(m["content"])) for m in pair["prompt"]]
        digest = _pair_digest([(m["role"], m["content"]) for m in pair["prompt"]], chosen, rejected)
        near = _pair_digest(prompt_n, chosen_n, rejected_n)
        if digest in self.seen:
            self.duplicates += 1
            self._warn("duplicate_pairs", line)
        else:
            self.seen.add(digest)
            if near in self.seen_normalised:
                self._warn("near_duplicate_pairs", line)
        self.seen_normalised.add(near)
        if chosen_n == rejected_n:
            self._warn("answers_differ_only_in_whitespace_or_case", line)
        last_user = next((text for role, text in reversed(prompt_n) if role == "user"), "")
        if (len(last_user) >= REPEAT_MIN_PROMPT_CHARS and chosen_n.startswith(last_user)
                and rejected_n.startswith(last_user)):
            self._warn("answers_repeat_prompt", line)
        if any(_has_markup(text) or (":" in text and _TURN_HEADER.search(text)) for text in (chosen, rejected)):
            self._warn("answers_contain_markup", line)
        if any(_has_markup(m["content"]) for m in pair["prompt"]):
            self._warn("prompt_contains_markup", line)
        if chosen_length > rejected_length:
            self.chosen_longer += 1
            if len(self.warning_lines["length_bias"]) < _SAMPLE_LINES:
                self.warning_lines["length_bias"].append(line)
        self.length_difference += chosen_length - rejected_length

    def _add_tokens(self, pair: dict[str, Any]) -> tuple[int, int]:
        prompt = sum(count_tokens(self.tokenizer, m["content"]) for m in pair["prompt"])
        chosen = count_tokens(self.tokenizer, pair["chosen"][0]["content"])
        rejected = count_tokens(self.tokenizer, pair["rejected"][0]["content"])
        total = prompt + max(chosen, rejected)
        self.token_stats["prompt"].add(prompt)
        self.token_stats["chosen"].add(chosen)
        self.token_stats["rejected"].add(rejected)
        self.token_stats["prompt_plus_longer_answer"].add(total)
        if self.max_length is not None and total > self.max_length:
            self.truncated += 1
        return chosen, rejected

    def _length(self) -> dict[str, Any]:
        n = self.valid_rows
        return {
            "unit": "tokens" if self.tokenizer is not None else "characters",
            "chosen_longer": self.chosen_longer,
            "chosen_longer_share": round(self.chosen_longer / n, 4) if n else None,
            "mean_difference": round(self.length_difference / n, 2) if n else None,
        }

    def _warnings(self, length: dict[str, Any]) -> list[dict[str, Any]]:
        biased = self.valid_rows >= LENGTH_BIAS_MIN_PAIRS and length["chosen_longer_share"] > LENGTH_BIAS_SHARE
        counts = {**self.warning_counts, "length_bias": self.chosen_longer if biased else 0}
        names = ", ".join(f"{name} ({n} pair{'s' if n != 1 else ''})"
                          for name, n in sorted(self.ignored_names.items(), key=lambda kv: (-kv[1], kv[0])))
        messages = {
            "ignored_fields": f"top-level fields not used for training were ignored: {names}",
            "duplicate_pairs": "the same prompt, chosen and rejected as an earlier pair (each copy is trained "
            "on again)",
            "near_duplicate_pairs": "the same as an earlier pair once whitespace and case are ignored",
            "answers_differ_only_in_whitespace_or_case": "chosen and rejected differ only in whitespace or "
            "case (the pair teaches formatting, not content)",
            "answers_repeat_prompt": "both answers begin with the prompt's text, as in data whose answers hold "
            "the whole conversation (the model would learn to repeat the prompt)",
            "answers_contain_markup": "an answer contains chat markup or a turn header (<|im_start|>, [INST], "
            "'Human:', '### Response:', ...), as if it carried the conversation's format or a next turn",
            "prompt_contains_markup": "the prompt contains chat markup (<|im_start|>, [INST], ...) that the chat "
            "template would wrap a second time; a job refuses such pairs unless the data is declared already "
            "formatted (raw text format)",
            "length_bias": f"chosen is the longer answer, in {length['chosen_longer_share'] or 0:.0%} of the "
            f"pairs (mean difference {length['mean_difference']} {length['unit']}); DPO may learn that longer "
            "is better",
        }
        warnings = []
        for code in WARNING_CODES:
            count = counts[code]
            if count:
                noun = "pair" if count == 1 else "pairs"
                warnings.append({"code": code, "message": f"{count} {noun}: {messages[code]}", "count": count,
                                 "lines": list(self.warning_lines[code])})
        return warnings

    def report(self) -> dict[str, Any]:
        with_tokens = self.tokenizer is not None
        length = self._length()
        stats = {
            "rows": self.valid_rows,
            "duplicates": self.duplicates,
            "near_duplicates": self.warning_counts["near_duplicate_pairs"],
            "sources": dict(sorted(self.sources.items())),
            "without_source": self.without_source,
            "length": length,
            "tokens": {k: v.summary() for k, v in self.token_stats.items()} if with_tokens else None,
            "max_length": self.max_length,
            "truncated": self.truncated if with_tokens and self.max_length is not None else None,
        }
        return {
            "valid": self.error_count == 0,
            "file_type": self.file_type,
            "format": self.format,
            "rows": self.rows,
            "errors": self.errors,
            "error_count": self.error_count,
            "warnings": self._warnings(length),
            "stats": stats,
        }
