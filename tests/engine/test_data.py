"""Tests for sdpo_engine.data: format normalisation, line-by-line validation, statistics."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from sdpo_engine.data import (
    DataError,
    count_tokens,
    fingerprint,
    load_pairs,
    pair_key,
    validate_file,
    write_pairs,
)


def _write(tmp_path: Path, lines: list, name: str = "data.jsonl", newline: bytes = b"\n") -> Path:
    """Write lines (dicts become JSON, str is encoded, bytes are written as they are)."""
    parts = []
    for line in lines:
        if isinstance(line, dict | list):
            line = json.dumps(line, ensure_ascii=False)
        if isinstance(line, str):
            line = line.encode("utf-8")
        parts.append(line)
    path = tmp_path / name
    path.write_bytes(newline.join(parts) + (newline if parts else b""))
    return path


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _standard(prompt="What is 2+2?", chosen="4", rejected="5", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def _conversational(prompt="What is 2+2?", chosen="4", rejected="5", **extra) -> dict:
    prompt_messages = [_msg("user", prompt)] if isinstance(prompt, str) else prompt
    return {
        "prompt": prompt_messages,
        "chosen": [_msg("assistant", chosen)],
        "rejected": [_msg("assistant", rejected)],
        **extra,
    }


def _openai(prompt="What is 2+2?", chosen="4", rejected="5", **extra) -> dict:
    prompt_messages = [_msg("user", prompt)] if isinstance(prompt, str) else prompt
    return {
        "input": {"messages": prompt_messages},
        "preferred_output": [_msg("assistant", chosen)],
        "non_preferred_output": [_msg("assistant", rejected)],
        **extra,
    }


SIMPLE_PAIRS = [
    ("What is 2+2?", "4", "5", "math"),
    ("Name a colour.", "Blue.", "Seven.", "general"),
    ("Say hi in French. ", " Bonjour !", "Hola", None),  # surrounding spaces must survive
    ("Ünïcödé? 日本語", "はい", "いいえ", "math"),
]


def _rows(make, pairs):
    rows = []
    for prompt, chosen, rejected, source in pairs:
        extra = {} if source is None else {"source": source}
        rows.append(make(prompt, chosen, rejected, **extra))
    return rows


# --------------------------------------------------------------------------------------------------
# The three formats normalise to the same data


def test_three_formats_of_the_same_pairs_normalise_identically(tmp_path):
    loaded = {}
    for name, make in [("standard", _standard), ("conversational", _conversational), ("openai", _openai)]:
        path = _write(tmp_path, _rows(make, SIMPLE_PAIRS), name=f"{name}.jsonl")
        report = validate_file(path)
        assert report["valid"], report["errors"]
        assert report["format"] == name
        loaded[name] = load_pairs(path)
    assert loaded["standard"] == loaded["conversational"] == loaded["openai"]
    assert loaded["standard"][0] == {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
        "source": "math",
    }
    assert loaded["standard"][2]["source"] is None
    assert loaded["standard"][2]["chosen"][0]["content"] == " Bonjour !"


def test_multi_turn_prompt_with_system_message_is_identical_in_conversational_and_openai(tmp_path):
    prompt = [
        _msg("system", "You are terse."),
        _msg("user", "Hi."),
        _msg("assistant", "Hello."),
        _msg("user", "What is the capital of France?"),
    ]
    conversational = _write(tmp_path, [_conversational(prompt, "Paris.", "Lyon.")], name="c.jsonl")
    openai = _write(
        tmp_path,
        # No tools (an empty list) and parallel_tool_calls change nothing; unknown top-level fields
        # are ignored (and named in a warning).
        [
            {
                **_openai(prompt, "Paris.", "Lyon."),
                "input": {"messages": prompt, "tools": [], "parallel_tool_calls": True},
                "metadata": {"anything": 1},
            }
        ],
        name="o.jsonl",
    )
    assert load_pairs(conversational) == load_pairs(openai)
    assert load_pairs(openai)[0]["prompt"] == prompt


def test_write_pairs_round_trips_through_load_pairs(tmp_path):
    pairs = load_pairs(_write(tmp_path, _rows(_openai, SIMPLE_PAIRS)))
    out = tmp_path / "out.jsonl"
    write_pairs(pairs, out)
    assert load_pairs(out) == pairs
    # Every prompt is one user message, so the pairs are written in the standard string format.
    assert validate_file(out)["format"] == "standard"
    # No source key is written for a pair without one; nothing but the file is left behind.
    assert "source" not in json.loads(out.read_text(encoding="utf-8").splitlines()[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out.jsonl"]


def test_data_error_carries_its_report_and_survives_pickling(tmp_path):
    path = _write(tmp_path, [_standard(), "{bad"])
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    error = caught.value
    assert str(error).startswith("invalid preference data: 1 problem(s); first: line 2: invalid JSON")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.report == error.report == validate_file(path)
    assert str(copy) == str(error)
    plain = DataError("nothing to train on")  # the engine's own data errors have no report
    assert plain.report is None and str(plain) == "nothing to train on"
    assert pickle.loads(pickle.dumps(plain)).report is None


def test_data_module_imports_no_heavy_library():
    # The API imports this module; it must stay pure Python.
    code = (
        "import sys, sdpo_engine.data, sdpo_engine.partition; "
        "bad = {'torch', 'transformers', 'trl', 'datasets', 'tokenizers'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_fingerprint_is_the_sha256_of_the_bytes(tmp_path):
    path = _write(tmp_path, _rows(_standard, SIMPLE_PAIRS))
    assert fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_pair_key_ignores_format_and_source_but_not_content():
    a = {
        "prompt": [_msg("user", "p")],
        "chosen": [_msg("assistant", "c")],
        "rejected": [_msg("assistant", "r")],
    }
    assert pair_key({**a, "source": "x"}) == pair_key({**a, "source": None})
    assert pair_key(a) != pair_key({**a, "rejected": [_msg("assistant", "r2")]})


# --------------------------------------------------------------------------------------------------
# Bad lines: each is reported with its line number, field and reason

_DEEP = "[" * 100_000 + "]" * 100_000
BAD_LINES = [
    # (id, first valid line, bad line, field, reason fragment)
    ("invalid-json", _standard(), "{not json", None, "invalid JSON"),
    ("truncated-json", _standard(), '{"prompt": "p", "chosen": "c"', None, "invalid JSON"),
    (
        "not-utf8",
        _standard(),
        b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}',
        None,
        "not valid UTF-8",
    ),
    ("array-line", _standard(), "[1, 2]", None, "expected a JSON object, got an array"),
    ("string-line", _standard(), '"text"', None, "expected a JSON object, got a string"),
    (
        "nan",
        _standard(),
        '{"prompt": "p", "chosen": "c", "rejected": "r", "score": NaN}',
        None,
        "NaN is not valid JSON",
    ),
    (
        "infinity",
        _standard(),
        '{"prompt": "p", "chosen": "c", "rejected": "r", "s": -Infinity}',
        None,
        "-Infinity",
    ),
    (
        "too-deep",
        _standard(),
        '{"prompt": "p", "chosen": "c", "rejected": "r", "x": ' + _DEEP + "}",
        None,
        "nested too deeply",
    ),
    (
        "huge-int",
        _standard(),
        '{"prompt": "p", "chosen": "c", "rejected": "r", "n": ' + "9" * 5000 + "}",
        None,
        "invalid JSON",
    ),
    ("no-pair-fields", _standard(), {"question": "q"}, None, "not a preference pair"),
    ("mixed-keys", _standard(), {**_standard(), "preferred_output": []}, None, "use one format"),
    ("format-differs", _standard(), _conversational(), None, "format differs from line 1's (standard)"),
    ("format-differs-openai", _openai(), _standard(), None, "format differs from line 1's (openai)"),
    # standard
    ("missing-rejected", _standard(), {"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ("missing-prompt", _standard(), {"chosen": "c", "rejected": "r"}, "prompt", "missing"),
    (
        "prompt-number",
        _standard(),
        _standard(prompt=3),
        "prompt",
        "expected a string (standard format), got a number",
    ),
    ("chosen-null", _standard(), _standard(chosen=None), "chosen", "expected a string"),
    ("empty-prompt", _standard(), _standard(prompt=" \n\t"), "prompt", "empty or only whitespace"),
    ("empty-chosen", _standard(), _standard(chosen=""), "chosen", "empty or only whitespace"),
    ("identical", _standard(), _standard(chosen="same", rejected="same"), "rejected", "same text as chosen"),
    (
        "surrogate",
        _standard(),
        '{"prompt": "\\ud800", "chosen": "c", "rejected": "r"}',
        "prompt",
        "surrogate",
    ),
    # source
    (
        "source-float",
        _standard(),
        _standard(source=1.5),
        "source",
        "expected a string (or an integer), got a number",
    ),
    ("source-bool", _standard(), _standard(source=True), "source", "got a boolean"),
    ("source-list", _standard(), _standard(source=["a"]), "source", "got an array"),
    ("source-empty", _standard(), _standard(source=" "), "source", "is empty"),
    # conversational
    (
        "prompt-string-in-conversational",
        _conversational(),
        {**_conversational(), "prompt": "p"},
        "prompt",
        "expected a list of messages (conversational format), got a string",
    ),
    (
        "unknown-role",
        _conversational(),
        _conversational([_msg("wizard", "x"), _msg("user", "q")]),
        "prompt[0].role",
        "unknown role 'wizard'",
    ),
    ("role-missing", _conversational(), _conversational([{"content": "q"}]), "prompt[0].role", "missing"),
    (
        "role-number",
        _conversational(),
        _conversational([{"role": 1, "content": "q"}]),
        "prompt[0].role",
        "expected a string",
    ),
    (
        "content-missing",
        _conversational(),
        _conversational([{"role": "user"}]),
        "prompt[0].content",
        "missing",
    ),
    (
        "content-parts",
        _conversational(),
        _conversational([{"role": "user", "content": [{"type": "text"}]}]),
        "prompt[0].content[0].text",
        "missing",
    ),
    (
        "message-not-object",
        _conversational(),
        _conversational(["hello"]),
        "prompt[0]",
        "expected a message object",
    ),
    ("prompt-empty-list", _conversational(), _conversational([]), "prompt", "is empty"),
    (
        "prompt-ends-with-assistant",
        _conversational(),
        _conversational([_msg("user", "q"), _msg("assistant", "a")]),
        "prompt[1].role",
        "ends with an assistant message",
    ),
    (
        "prompt-no-user",
        _conversational(),
        _conversational([_msg("system", "be nice")]),
        "prompt",
        "no user message",
    ),
    (
        "chosen-two-messages",
        _conversational(),
        {**_conversational(), "chosen": [_msg("assistant", "a"), _msg("assistant", "b")]},
        "chosen",
        "exactly one assistant message, got 2",
    ),
    ("chosen-no-message", _conversational(), {**_conversational(), "chosen": []}, "chosen", "got 0"),
    (
        "chosen-user-role",
        _conversational(),
        {**_conversational(), "chosen": [_msg("user", "a")]},
        "chosen[0].role",
        "expected 'assistant', got 'user'",
    ),
    (
        "rejected-empty-content",
        _conversational(),
        {**_conversational(), "rejected": [_msg("assistant", "")]},
        "rejected[0].content",
        "empty",
    ),
    (
        "conversational-identical",
        _conversational(),
        _conversational(chosen="x", rejected="x"),
        "rejected",
        "same text",
    ),
    # openai
    ("input-missing", _openai(), {k: v for k, v in _openai().items() if k != "input"}, "input", "missing"),
    ("input-not-object", _openai(), {**_openai(), "input": []}, "input", "expected an object"),
    ("messages-missing", _openai(), {**_openai(), "input": {"tools": []}}, "input.messages", "missing"),
    (
        "openai-unknown-role",
        _openai(),
        _openai([_msg("system", "s"), _msg("user", "u"), _msg("developer", "d"), _msg("user", "q")]),
        "input.messages[2].role",
        "role 'developer' is not supported",
    ),
    (
        "openai-ends-with-assistant",
        _openai(),
        _openai([_msg("user", "q"), _msg("assistant", "a")]),
        "input.messages[1].role",
        "ends with an assistant message",
    ),
    ("preferred-empty", _openai(), _openai(chosen="  "), "preferred_output[0].content", "empty"),
    (
        "preferred-not-list",
        _openai(),
        {**_openai(), "preferred_output": _msg("assistant", "a")},
        "preferred_output",
        "expected a list of messages, got an object",
    ),
    (
        "non-preferred-missing",
        _openai(),
        {k: v for k, v in _openai().items() if k != "non_preferred_output"},
        "non_preferred_output",
        "missing",
    ),
    (
        "openai-identical",
        _openai(),
        _openai(chosen="x", rejected="x"),
        "non_preferred_output",
        "same text as preferred_output",
    ),
]


@pytest.mark.parametrize(
    ("first", "bad", "field", "reason"), [case[1:] for case in BAD_LINES], ids=[case[0] for case in BAD_LINES]
)
def test_bad_line_is_reported_with_line_number_field_and_reason(tmp_path, first, bad, field, reason):
    # A valid line, a blank line (counted, not reported), then the bad line: line 3.
    path = _write(tmp_path, [first, "", bad])
    report = validate_file(path)
    assert not report["valid"]
    assert report["rows"] == 2
    assert report["error_count"] == 1, report["errors"]
    (error,) = report["errors"]
    assert error["line"] == 3
    assert error["field"] == field
    assert reason in error["reason"]
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    assert caught.value.report == report
    assert "line 3" in str(caught.value)


def test_every_problem_of_a_line_is_reported(tmp_path):
    bad = {"prompt": [_msg("bot", "")], "chosen": [_msg("user", "a"), _msg("assistant", "b")], "source": 2.0}
    report = validate_file(_write(tmp_path, [bad]))
    assert [(e["field"], e["reason"].split(";")[0]) for e in report["errors"]] == [
        ("prompt[0].role", "unknown role 'bot'"),
        ("prompt[0].content", "is empty or only whitespace"),
        ("chosen", "expected exactly one assistant message, got 2 messages"),
        ("rejected", "missing"),
        ("source", "expected a string (or an integer), got a number"),
    ]


def test_fields_of_no_recognisable_format_are_each_reported(tmp_path):
    report = validate_file(_write(tmp_path, [{"prompt": 1, "chosen": 2}]))
    assert report["format"] is None
    assert [(e["field"], e["reason"]) for e in report["errors"]] == [
        ("prompt", "expected a string or a list of messages, got a number"),
        ("chosen", "expected a string or a list of messages, got a number"),
        ("rejected", "missing"),
    ]


def test_all_bad_lines_of_a_file_are_reported_in_order(tmp_path):
    lines = [_standard(), "{oops", _standard(chosen=""), _standard(), "", _standard(rejected="4"), "[]"]
    report = validate_file(_write(tmp_path, lines))
    assert [(e["line"], e["field"]) for e in report["errors"]] == [
        (2, None),
        (3, "chosen"),
        (6, "rejected"),
        (7, None),
    ]
    assert report["rows"] == 6
    assert report["stats"]["rows"] == 2  # statistics cover the lines that validated


def test_errors_are_capped_but_all_counted(tmp_path):
    path = _write(tmp_path, ["{bad"] * 10 + [_standard()])
    report = validate_file(path, max_errors=3)
    assert [e["line"] for e in report["errors"]] == [1, 2, 3]
    assert report["error_count"] == 10


def test_bom_is_rejected_at_line_1(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(_standard()).encode() + b"\n" + json.dumps(_standard()).encode()
    )
    report = validate_file(path)
    assert not report["valid"]
    assert report["errors"] == [
        {
            "line": 1,
            "field": None,
            "reason": "file starts with a UTF-8 byte order mark; save as UTF-8 without BOM",
        }
    ]
    assert report["format"] == "standard"  # the rest of line 1 is still read


def test_crlf_line_endings_and_blank_lines_are_accepted(tmp_path):
    path = _write(tmp_path, ["", *_rows(_standard, SIMPLE_PAIRS), "   ", ""], newline=b"\r\n")
    report = validate_file(path)
    assert report["valid"], report["errors"]
    assert report["rows"] == len(SIMPLE_PAIRS)
    lf = _write(tmp_path, _rows(_standard, SIMPLE_PAIRS), name="lf.jsonl")
    assert load_pairs(path) == load_pairs(lf)


def test_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "no-newline.jsonl"
    path.write_text(json.dumps(_standard()) + "\n" + json.dumps(_standard(chosen="3")), encoding="utf-8")
    assert len(load_pairs(path)) == 2


@pytest.mark.parametrize(
    "content", [b"", b"\n", b"\n  \n\r\n\t\n"], ids=["zero-bytes", "newline", "blank-lines"]
)
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    report = validate_file(path)
    assert not report["valid"]
    assert report["rows"] == 0
    assert report["format"] is None
    assert report["errors"] == [{"line": 0, "field": None, "reason": "file is empty"}]


def test_line_over_the_byte_limit_is_reported_and_reading_goes_on(tmp_path):
    ok = json.dumps(_standard())
    long_line = json.dumps(_standard(prompt="x" * 300))
    at_limit = json.dumps(_standard(prompt="y" * 100))
    limit = len(at_limit.encode())
    # CRLF endings must not count towards the limit; the over-long last line has no newline.
    content = "\r\n".join([ok, long_line, at_limit, "{bad", long_line]).encode()
    path = tmp_path / "long.jsonl"
    path.write_bytes(content)
    report = validate_file(path, max_line_bytes=limit)
    n = len(long_line.encode())
    assert report["errors"] == [
        {"line": 2, "field": None, "reason": f"line is {n} bytes; the limit is {limit}"},
        {
            "line": 4,
            "field": None,
            "reason": "invalid JSON: Expecting property name enclosed in double quotes at column 2",
        },
        {"line": 5, "field": None, "reason": f"line is {n} bytes; the limit is {limit}"},
    ]
    assert report["stats"]["rows"] == 2


def test_huge_line_is_not_held_in_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = b'{"prompt": "' + b"x" * (8 << 20) + b'", "chosen": "c", "rejected": "r"}'
    with path.open("wb") as f:
        f.write(huge + b"\n")
        f.write(json.dumps(_standard()).encode() + b"\n")
    tracemalloc.start()
    try:
        report = validate_file(path, max_line_bytes=1 << 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["errors"][0]["reason"].startswith(f"line is {len(huge)} bytes")
    assert peak < 2 << 20


# --------------------------------------------------------------------------------------------------
# Statistics


def test_stats_count_rows_duplicates_and_sources(tmp_path):
    lines = [
        _standard("p1", "a", "b", source="math"),
        _standard("p2", "a", "b", source="code"),
        _standard("p1", "a", "b", source="other"),  # duplicate content, different source
        _standard("p1", "a", "b"),  # duplicate again, no source
        _standard("p3", "a", "b", source=7),  # an integer source becomes "7"
        _standard("p4", "a", "b", source=None),  # null means no source
        _standard("p5", "a", "b", task="ignored"),
    ]
    report = validate_file(_write(tmp_path, lines))
    assert report["valid"]
    assert report["rows"] == 7
    stats = report["stats"]
    assert stats["rows"] == 7
    assert stats["duplicates"] == 2
    assert stats["sources"] == {"7": 1, "code": 1, "math": 1, "other": 1}
    assert stats["without_source"] == 3
    assert stats["tokens"] is None and stats["truncated"] is None


def test_source_field_can_be_renamed_or_ignored(tmp_path):
    lines = [_standard("p1", source="s", task="t1"), _standard("p2", source=1.5, task="t2")]
    path = _write(tmp_path, lines)
    assert [p["source"] for p in load_pairs(path, source_field="task")] == ["t1", "t2"]
    assert [p["source"] for p in load_pairs(path, source_field=None)] == [None, None]
    assert not validate_file(path)["valid"]  # with the default field the float is an error
    with pytest.raises(ValueError, match="preference field"):
        validate_file(path, source_field="chosen")


class _WordTokenizer:
    """Like a transformers tokenizer: encode(text, add_special_tokens=...) -> list of ids."""

    def encode(self, text, add_special_tokens=True):
        ids = list(range(len(text.split())))
        return [0, *ids] if add_special_tokens else ids


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class _EncodingTokenizer:
    """Like tokenizers.Tokenizer but with an encode() that takes no keyword."""

    def encode(self, text):
        return _Encoding(text.split())


def test_token_stats_with_a_tokenizer(tmp_path):
    lines = [
        _standard("one two three", "a b", "c", source="s"),
        _conversational([_msg("system", "be brief"), _msg("user", "one")], "a b c d", "e"),
        _standard("x", "y", "z w"),
    ]
    # Two formats in one file are an error, so check each half on its own file.
    path_a = _write(tmp_path, [lines[0], lines[2]], name="a.jsonl")
    path_b = _write(tmp_path, [lines[1]], name="b.jsonl")
    report = validate_file(path_a, tokenizer=_WordTokenizer(), max_length=4)
    tokens = report["stats"]["tokens"]
    assert tokens["prompt"] == {"min": 1, "mean": 2.0, "max": 3}
    assert tokens["chosen"] == {"min": 1, "mean": 1.5, "max": 2}
    assert tokens["rejected"] == {"min": 1, "mean": 1.5, "max": 2}
    assert tokens["prompt_plus_longer_answer"] == {"min": 3, "mean": 4.0, "max": 5}
    assert report["stats"]["truncated"] == 1
    assert report["stats"]["max_length"] == 4
    # A conversational prompt counts the tokens of all its messages' contents.
    report_b = validate_file(path_b, tokenizer=_EncodingTokenizer())
    assert report_b["stats"]["tokens"]["prompt"] == {"min": 3, "mean": 3.0, "max": 3}
    assert report_b["stats"]["truncated"] is None  # no max_length given


def test_count_tokens_supports_common_tokenizer_shapes():
    assert count_tokens(_WordTokenizer(), "a b c") == 3
    assert count_tokens(_EncodingTokenizer(), "a b c") == 3
    assert count_tokens(lambda text: {"input_ids": text.split()}, "a b") == 2
    assert count_tokens(lambda text: text.split(), "a b") == 2
    with pytest.raises(TypeError):
        count_tokens(object(), "a")


def test_token_stats_with_a_real_tokenizers_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "one": 1, "two": 2, "three": 3, "a": 4, "b": 5}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = _write(tmp_path, [_standard("one two three", "a b", "a")])
    report = validate_file(path, tokenizer=tokenizer, max_length=4)
    assert report["stats"]["tokens"]["prompt_plus_longer_answer"]["max"] == 5
    assert report["stats"]["truncated"] == 1
