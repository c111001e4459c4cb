"""Preference data: read, validate and normalise JSONL files of (prompt, chosen, rejected) pairs.

This module is pure Python (stdlib only) on purpose: the API validates uploads with it, and the API
must never import torch, transformers or trl. A file that `validate_file` accepts is therefore a
file that `load_pairs` (and so the engine) can read.

Three input formats are accepted, detected line by line:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``
- conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``
- OpenAI preference: ``{"input": {"messages": [...]}, "preferred_output": [messages],
  "non_preferred_output": [messages]}`` (``input.tools`` and ``input.parallel_tool_calls`` are
  accepted and ignored)

A message is ``{"role": "system" | "user" | "assistant", "content": str}``. Every format is
normalised to one shape (the conversational format plus a source)::

    {"prompt": [messages], "chosen": [one assistant message],
     "rejected": [one assistant message], "source": str | None}

A file must use one format throughout; a line whose format differs from the first line whose
format could be told is an error. Unknown top-level fields are ignored.

Validation streams the file in binary, one line at a time, so a very large upload needs little
memory; each line is decoded on its own so that a line that is not UTF-8 is reported with its own
line number. A file with any problem is rejected whole, and every problem is reported with its
1-based line number, a dotted field path (``input.messages[2].role``; ``None`` for a whole-line
problem) and a reason. Whole-file problems (an empty file) are reported at line 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "FORMATS",
    "ROLES",
    "DataError",
    "count_tokens",
    "fingerprint",
    "load_numbered_pairs",
    "load_pairs",
    "pair_key",
    "validate_file",
    "write_pairs",
]

FORMATS = ("standard", "conversational", "openai")
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any real pair, low enough to bound memory.

_BOM = b"\xef\xbb\xbf"
_TRL_KEYS = ("prompt", "chosen", "rejected")
_OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
# Field names per format: (prompt, chosen, rejected). Used in error paths and messages so that an
# OpenAI-format user reads the names of their own file.
_FIELD_NAMES = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "openai": ("input.messages", "preferred_output", "non_preferred_output"),
}


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
        where = f"line {first['line']}"
        if first.get("field"):
            where += f", {first['field']}"
        where = f"; first: {where}: {first['reason']}"
    return f"invalid preference data: {report.get('error_count', 0)} problem(s){where}"


# --------------------------------------------------------------------------------------------------
# Public API


def validate_file(
    path: str | os.PathLike[str],
    *,
    source_field: str | None = "source",
    tokenizer: Any = None,
    max_length: int | None = None,
    max_errors: int = 50,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> dict[str, Any]:
    """Validate a JSONL preference file and return a report (never raises for bad content).

    Report keys:

    - ``valid``: True when there is no problem at all.
    - ``format``: ``standard``, ``conversational`` or ``openai`` (the first line whose format
      could be told), or None when no line could be read as a pair.
    - ``rows``: the number of non-blank lines (pairs) in the file, valid or not.
    - ``errors``: at most `max_errors` of ``{"line", "field", "reason"}``, in file order;
      ``error_count`` is the total, so a caller can say "and 1,234 more".
    - ``stats``: computed over the lines that validated: ``rows``, ``duplicates`` (rows whose
      normalised prompt/chosen/rejected repeat an earlier row), ``sources`` ({source: rows}),
      ``without_source`` (rows with no source), and, when `tokenizer` is given, ``tokens``
      ({"prompt"|"chosen"|"rejected"|"prompt_plus_longer_answer": {"min", "mean", "max"}}) and,
      with `max_length` too, ``truncated`` (pairs whose prompt plus longer answer exceeds
      `max_length` tokens). Token counts ignore the chat template: a conversational prompt counts
      the sum of its messages' content tokens, so the numbers are a slight underestimate.

    `source_field` names the top-level field holding a pair's source (used by stratified and
    easy-to-hard partitioning); None ignores sources. Lines of more than `max_line_bytes` bytes
    (excluding the line ending) are reported without being parsed.
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
    """Read a preference file in any accepted format and return its pairs, normalised.

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
    """`load_pairs`, each pair with its 1-based line number in the file: ``[(line, pair), ...]``.

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


def write_pairs(pairs: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write normalised pairs as JSONL (conversational format, plus ``source`` when set).

    The output reads back with `load_pairs` using the default ``source_field="source"``. The file
    is written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for pair in pairs:
                row = {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
                if pair.get("source") is not None:
                    row["source"] = pair["source"]
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
# Scanning: bytes -> lines -> JSON -> one validated pair per line


@dataclass
class _LineResult:
    line: int  # 1-based; 0 for whole-file problems
    format: str | None = None
    pair: dict[str, Any] | None = None
    errors: list[tuple[str | None, str]] = field(default_factory=list)


class _RejectedConstant(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN, Infinity and -Infinity by default; they are not JSON, and other
    # readers (and the API's clients) would refuse the file.
    raise _RejectedConstant(f"{name} is not valid JSON")


# Built once: json.loads/json.dumps with options build a new decoder/encoder on every call, which is
# a measurable share of validating a large file.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_KEY_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))


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


def _scan(
    path: str | os.PathLike[str], *, source_field: str | None, max_line_bytes: int
) -> Iterator[_LineResult]:
    """Yield one `_LineResult` per non-blank line (and per whole-file problem)."""
    if source_field is not None and (source_field in _TRL_KEYS or source_field in _OPENAI_KEYS):
        raise ValueError(f"source_field {source_field!r} is a preference field, not a source field")
    if max_line_bytes < 1:
        raise ValueError("max_line_bytes must be at least 1")
    first_format: tuple[int, str] | None = None
    saw_pair = False
    with open(path, "rb") as f:
        for line_no, raw, length in _read_lines(f, max_line_bytes):
            result = _LineResult(line=line_no)
            if line_no == 1 and raw is not None and raw.startswith(_BOM):
                # Rejected rather than stripped (the API answers it with a 4xx): RFC 8259 forbids
                # writing a BOM before JSON, and other JSONL readers fail on such a first line.
                result.errors.append(
                    (None, "file starts with a UTF-8 byte order mark; save as UTF-8 without BOM")
                )
                raw = raw[len(_BOM) :]
            if raw is None:
                result.errors.append((None, f"line is {length} bytes; the limit is {max_line_bytes}"))
                saw_pair = True
                yield result
                continue
            if not raw.strip():
                if result.errors:  # a BOM on an otherwise blank first line
                    yield result
                continue
            saw_pair = True
            _check_line(raw, source_field, result)
            if result.format is not None:
                if first_format is None:
                    first_format = (line_no, result.format)
                elif result.format != first_format[1]:
                    result.errors.insert(
                        0,
                        (None, f"format differs from line {first_format[0]}'s ({first_format[1]})"),
                    )
                    result.pair = None
            if result.errors:
                result.pair = None
            yield result
    if not saw_pair:
        yield _LineResult(line=0, errors=[(None, "file is empty")])


def _check_line(raw: bytes, source_field: str | None, result: _LineResult) -> None:
    """Decode, parse and validate one line, filling `result` in place."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        result.errors.append(
            (None, f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line")
        )
        return
    try:
        obj = _DECODER.decode(text)
    except _RejectedConstant as exc:
        result.errors.append((None, f"invalid JSON: {exc}"))
        return
    except json.JSONDecodeError as exc:
        result.errors.append((None, f"invalid JSON: {exc.msg} at column {exc.colno}"))
        return
    except RecursionError:
        result.errors.append((None, "invalid JSON: nested too deeply"))
        return
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        result.errors.append((None, f"invalid JSON: {exc}"))
        return
    if not isinstance(obj, dict):
        result.errors.append((None, f"expected a JSON object, got {_json_type(obj)}"))
        return
    _check_pair(obj, source_field, result)


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

    if chosen is not None and rejected is not None:
        if chosen[0]["content"].strip() == rejected[0]["content"].strip():
            _, chosen_name, rejected_name = _FIELD_NAMES[fmt]
            errors.append((rejected_name, f"is the same text as {chosen_name}"))

    source = _check_source(obj, source_field, errors)
    if errors or prompt is None or chosen is None or rejected is None:
        return
    result.pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source}


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
    if not value.strip():
        errors.append((path, "is empty or only whitespace"))
        return None
    if not _encodable(value):
        # JSON allows "\ud800"; such a string cannot be written back as UTF-8 or tokenised.
        errors.append((path, "contains an unpaired UTF-16 surrogate escape"))
        return None
    return value


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
        role = message.get("role")
        role_ok = False
        if "role" not in message:
            errors.append((f"{item}.role", "missing"))
        elif not isinstance(role, str):
            errors.append((f"{item}.role", f"expected a string, got {_json_type(role)}"))
        elif role not in ROLES:
            errors.append((f"{item}.role", f"unknown role {role!r}; expected system, user or assistant"))
        else:
            role_ok = True
        content = _check_text(message, "content", f"{item}.content", errors)
        if messages is not None and role_ok and content is not None:
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
    # input.tools and input.parallel_tool_calls are allowed by OpenAI and ignored here: the
    # engine trains on the text of the messages only.
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
    return type(value).__name__  # pragma: no cover - json.loads makes nothing else


# --------------------------------------------------------------------------------------------------
# Aggregation: errors, statistics, and (for load_pairs) the pairs themselves


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
        self.format: str | None = None
        self.rows = 0
        self.valid_rows = 0
        self.duplicates = 0
        # 16-byte digests: enough to make a false "duplicate" vanishingly unlikely, small enough
        # that millions of rows fit in memory.
        self.seen: set[bytes] = set()
        self.sources: dict[str, int] = {}
        self.without_source = 0
        self.token_stats = {
            name: _RunningStat() for name in ("prompt", "chosen", "rejected", "prompt_plus_longer_answer")
        }
        self.truncated = 0

    def add(self, result: _LineResult) -> None:
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
        digest = bytes.fromhex(pair_key(pair))[:16]
        if digest in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(digest)
        if pair["source"] is None:
            self.without_source += 1
        else:
            self.sources[pair["source"]] = self.sources.get(pair["source"], 0) + 1
        if self.tokenizer is not None:
            self._add_tokens(pair)

    def _add_tokens(self, pair: dict[str, Any]) -> None:
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

    def report(self) -> dict[str, Any]:
        with_tokens = self.tokenizer is not None
        stats = {
            "rows": self.valid_rows,
            "duplicates": self.duplicates,
            "sources": dict(sorted(self.sources.items())),
            "without_source": self.without_source,
            "tokens": {k: v.summary() for k, v in self.token_stats.items()} if with_tokens else None,
            "max_length": self.max_length,
            "truncated": self.truncated if with_tokens and self.max_length is not None else None,
        }
        return {
            "valid": self.error_count == 0,
            "format": self.format,
            "rows": self.rows,
            "errors": self.errors,
            "error_count": self.error_count,
            "stats": stats,
        }
