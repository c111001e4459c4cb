"""Nothing dropped or rewritten silently (issue #13, kind 2): every input is either trained exactly as
the file says or refused with its line, field and reason.

Each case asserts the exact outcome: the normalised pair (what the engine trains), or the exact
errors (line, field, reason).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_engine.data import DataError, load_pairs, validate_file

CASES = Path(__file__).resolve().parents[3] / "shared" / "cases"


def _write(tmp_path: Path, lines: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def _msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


def _conv(prompt=None, chosen="Paris.", rejected="Lyon.", **extra):
    return {"prompt": prompt or [_msg("user", "Capital of France?")], "chosen": [_msg("assistant", chosen)],
            "rejected": [_msg("assistant", rejected)], **extra}


def _openai(messages=None, chosen="Paris.", rejected="Lyon.", **extra):
    return {"input": {"messages": messages or [_msg("user", "Capital of France?")]},
            "preferred_output": [_msg("assistant", chosen)], "non_preferred_output": [_msg("assistant", rejected)],
            **extra}


def _errors(path: Path) -> list[tuple[int, str | None, str]]:
    report = validate_file(path)
    assert not report["valid"]
    with pytest.raises(DataError):
        load_pairs(path)
    return [(e["line"], e["field"], e["reason"]) for e in report["errors"]]


PLAIN = {"prompt": [_msg("user", "Capital of France?")], "chosen": [_msg("assistant", "Paris.")],
         "rejected": [_msg("assistant", "Lyon.")], "source": None}

# --------------------------------------------------------------------------------------------------
# Duplicate keys: refused wherever they are (today the last value won without a word)


def test_a_repeated_top_level_key_is_refused_naming_the_key(tmp_path):
    line = '{"prompt": "Capital of France?", "chosen": "Paris.", "chosen": "Lyon!", "rejected": "Lyon."}'
    assert _errors(_write(tmp_path, [_conv(), line])) == [
        (2, None, "format differs from line 1's (conversational)"),
        (2, "chosen", "duplicate key 'chosen' in one JSON object: a reader keeps only one of the values without "
                      "saying so; keep exactly one"),
    ]


def test_a_repeated_key_inside_a_message_is_refused_with_its_path(tmp_path):
    line = ('{"input": {"messages": [{"role": "user", "content": "Capital of France?"}]}, '
            '"preferred_output": [{"role": "assistant", "content": "Paris.", "content": "Lyon!"}], '
            '"non_preferred_output": [{"role": "assistant", "content": "Lyon."}]}')
    errors = _errors(_write(tmp_path, [line]))
    assert [(line_no, field) for line_no, field, _ in errors] == [(1, "preferred_output[0].content")]
    assert errors[0][2].startswith("duplicate key 'content'")


def test_a_key_repeated_three_times_deep_in_metadata_is_one_error(tmp_path):
    # Even in a field that is ignored: the line itself is ambiguous JSON.
    line = ('{"prompt": "q", "chosen": "a", "rejected": "b", '
            '"meta": {"tags": [{"k": 1, "k": 2, "k": 3}]}}')
    errors = _errors(_write(tmp_path, [line]))
    assert [(line_no, field) for line_no, field, _ in errors] == [(1, "meta.tags[0].k")]


def test_repeated_messages_key_in_openai_input(tmp_path):
    line = ('{"input": {"messages": [{"role": "user", "content": "a?"}], "messages": [{"role": "user", '
            '"content": "b?"}]}, "preferred_output": [{"role": "assistant", "content": "x"}], '
            '"non_preferred_output": [{"role": "assistant", "content": "y"}]}')
    assert [field for _, field, _ in _errors(_write(tmp_path, [line]))] == ["input.messages"]


# --------------------------------------------------------------------------------------------------
# Message fields the engine does not train on: refused naming the field (null counts as absent)


@pytest.mark.parametrize(("key", "value", "reason_start"), [
    ("tool_calls", [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
     "tool calls are not supported"),
    ("function_call", {"name": "f", "arguments": "{}"}, "function calls are not supported"),
    ("tool_call_id", "c1", "tool results are not supported"),
    ("name", "alice", "message names are not trained on"),
    ("weight", 0, "per-message weights are not supported"),
    ("refusal", "I can't.", "a refusal field is not trained on"),
    ("audio", {"id": "a1"}, "audio is not supported"),
    ("mood", "happy", "unknown message field 'mood'"),
])
def test_a_message_field_that_would_be_dropped_is_refused(tmp_path, key, value, reason_start):
    row = _openai(chosen="Paris.")
    row["preferred_output"][0][key] = value
    [(line, field, reason)] = _errors(_write(tmp_path, [row]))
    assert (line, field) == (1, f"preferred_output[0].{key}")
    assert reason.startswith(reason_start), reason


def test_null_optional_message_fields_are_absent_and_the_pair_is_trained_as_is(tmp_path):
    # What chat exports write: nothing would be dropped.
    row = _conv([_msg("user", "Capital of France?", name=None, tool_calls=None)])
    row["chosen"][0].update({"refusal": None, "audio": None, "function_call": None, "tool_calls": None})
    path = _write(tmp_path, [row])
    assert validate_file(path)["valid"]
    assert load_pairs(path) == [PLAIN]


@pytest.mark.parametrize(("role", "reason_start"), [
    ("tool", "role 'tool' is not supported"),
    ("function", "role 'function' is not supported"),
    ("developer", "role 'developer' is not supported: the chat templates this service trains with have no "
                  "developer role; use 'system'"),
])
def test_roles_the_engine_cannot_render_are_refused(tmp_path, role, reason_start):
    messages = [_msg("user", "Weather?"), _msg("assistant", "Checking."), _msg(role, "sunny"), _msg("user", "So?")]
    [(line, field, reason)] = _errors(_write(tmp_path, [_openai(messages)]))
    assert (line, field) == (1, "input.messages[2].role")
    assert reason.startswith(reason_start)


def test_openai_tools_are_refused_unless_empty(tmp_path):
    with_tools = _openai()
    with_tools["input"]["tools"] = [{"type": "function", "function": {"name": "get_weather"}}]
    no_tools = _openai()
    no_tools["input"].update({"tools": [], "parallel_tool_calls": False})
    bad_flag = _openai()
    bad_flag["input"]["parallel_tool_calls"] = "yes"
    unknown = _openai()
    unknown["input"]["temperature"] = 0.2
    errors = _errors(_write(tmp_path, [with_tools, no_tools, bad_flag, unknown]))
    assert [(line, field) for line, field, _ in errors] == [
        (1, "input.tools"), (3, "input.parallel_tool_calls"), (4, "input.temperature")]
    assert errors[0][2].startswith("tool definitions are not supported")
    assert errors[1][2] == "expected a boolean, got a string"
    assert load_pairs(_write(tmp_path, [no_tools], name="ok.jsonl")) == [PLAIN]


@pytest.mark.parametrize(("key", "value", "reason_start"), [
    ("system", "You are terse.", "a top-level system prompt is not read: put it in the prompt as the first message"),
    ("tools", [{"type": "function"}], "tool definitions are not supported"),
    ("images", ["img.png"], "images are not supported"),
])
def test_top_level_fields_that_carry_content_are_refused(tmp_path, key, value, reason_start):
    [(line, field, reason)] = _errors(_write(tmp_path, [_conv(**{key: value})]))
    assert (line, field) == (1, key)
    assert reason.startswith(reason_start)


def test_other_top_level_fields_are_ignored_and_named_in_a_warning(tmp_path):
    rows = [_conv(id=1, score_chosen=8.5), _conv(chosen="Paris!", id=2), _conv(chosen="Paris", system=""),
            _conv(chosen="It is Paris.", id=None)]
    report = validate_file(_write(tmp_path, rows))
    assert report["valid"]
    [warning] = [w for w in report["warnings"] if w["code"] == "ignored_fields"]
    assert warning == {
        "code": "ignored_fields", "count": 3, "lines": [1, 2, 3],
        "message": "3 pairs: top-level fields not used for training were ignored: id (2 pairs), "
                   "score_chosen (1 pair), system (1 pair)",
    }
    assert [p["chosen"][0]["content"] for p in load_pairs(_write(tmp_path, rows, name="b.jsonl"))] == [
        "Paris.", "Paris!", "Paris", "It is Paris."]


# --------------------------------------------------------------------------------------------------
# Content parts: text parts joined with no separator, other part types refused naming the type


def test_text_parts_are_joined_with_no_separator(tmp_path):
    row = _openai([_msg("system", [{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}]),
                   _msg("user", [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}])],
                  chosen=[{"type": "text", "text": "Paris"}, {"type": "text", "text": "."}])
    [pair] = load_pairs(_write(tmp_path, [row]))
    assert pair == {"prompt": [_msg("system", "Be terse."), _msg("user", "Capital of France?")],
                    "chosen": [_msg("assistant", "Paris.")], "rejected": [_msg("assistant", "Lyon.")],
                    "source": None}


def test_the_sample_case_of_text_parts_is_accepted():
    pairs = load_pairs(CASES / "07-openai-text-content-parts.jsonl")
    assert [p["prompt"][-1]["content"] for p in pairs] == ["Name a planet.", "Name a fruit."]
    assert [p["chosen"][0]["content"] for p in pairs] == ["Mars is a planet.", "An apple."]


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
    {"type": "refusal", "refusal": "No."},
])
def test_a_part_that_is_not_text_is_refused_naming_its_type(tmp_path, part):
    row = _openai([_msg("user", [{"type": "text", "text": "What is this?"}, part])])
    [(line, field, reason)] = _errors(_write(tmp_path, [row]))
    assert (line, field) == (1, "input.messages[0].content[1].type")
    assert reason == (f"content part type {part['type']!r} is not supported: only text parts are trained on "
                      "(text-only training); remove the part")


def test_malformed_text_parts_are_each_reported(tmp_path):
    rows = [
        _openai([_msg("user", [])]),
        _openai([_msg("user", ["plain string"])]),
        _openai([_msg("user", [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}])]),
        _openai([_msg("user", [{"type": "text", "text": "  "}, {"type": "text", "text": "\n"}])]),
        _openai([_msg("user", [{"text": "no type"}])]),
        _openai([_msg("user", 42)]),
    ]
    assert [(line, field, reason.split(":")[0]) for line, field, reason in _errors(_write(tmp_path, rows))] == [
        (1, "input.messages[0].content", "is an empty list of content parts"),
        (2, "input.messages[0].content[0]", 'expected a content part {"type"'),
        (3, "input.messages[0].content[0].cache_control", "unknown field of a text part"),
        (4, "input.messages[0].content", "is empty or only whitespace"),
        (5, "input.messages[0].content[0].type", "missing"),
        (6, "input.messages[0].content", "expected a string or a list of text parts, got a number"),
    ]


def test_standard_format_strings_stay_strings(tmp_path):
    row = {"prompt": [{"type": "text", "text": "q"}], "chosen": "a", "rejected": "b"}
    # A list prompt beside string answers is a conversational prompt, so parts are not messages.
    errors = _errors(_write(tmp_path, [row]))
    assert errors[0][:2] == (1, "prompt")


# --------------------------------------------------------------------------------------------------
# The "same text" check compares the exact strings that are trained


def test_answers_equal_after_joining_parts_are_refused(tmp_path):
    row = _openai(chosen=[{"type": "text", "text": "Par"}, {"type": "text", "text": "is."}], rejected="Paris.")
    assert _errors(_write(tmp_path, [row])) == [(1, "non_preferred_output", "is the same text as preferred_output")]


def test_answers_that_differ_only_in_whitespace_or_case_are_trained_with_a_warning(tmp_path):
    rows = [_conv(chosen="Paris.", rejected="paris."), _conv(chosen="Paris.", rejected="Paris. "),
            _conv(chosen="Paris is  the capital.", rejected="Paris is the\ncapital."),
            _conv(chosen="Paris.", rejected="Lyon.")]
    path = _write(tmp_path, rows)
    report = validate_file(path)
    assert report["valid"], report["errors"]
    [warning] = [w for w in report["warnings"] if w["code"] == "answers_differ_only_in_whitespace_or_case"]
    assert (warning["count"], warning["lines"]) == (3, [1, 2, 3])
    # Trained exactly as written: nothing is stripped.
    assert [p["rejected"][0]["content"] for p in load_pairs(path)] == [
        "paris.", "Paris. ", "Paris is the\ncapital.", "Lyon."]


def test_exactly_equal_answers_are_refused_in_every_format(tmp_path):
    rows = [{"prompt": "q", "chosen": " same", "rejected": " same"}]
    assert _errors(_write(tmp_path, rows, name="s.jsonl")) == [(1, "rejected", "is the same text as chosen")]
    rows = [_conv(chosen="x\n", rejected="x\n")]
    assert _errors(_write(tmp_path, rows, name="c.jsonl")) == [(1, "rejected", "is the same text as chosen")]


def test_the_text_parts_case_validates_and_trains_through_the_engine_commands(tmp_path, tiny_model):
    """../shared/cases/07: `validate` accepts it; `run` trains a step on it, its step data holding the
    joined text, identical to the same pairs written with plain strings."""
    case = CASES / "07-openai-text-content-parts.jsonl"
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "validate", str(case)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["valid"], report["format"], report["rows"], report["warnings"]) == (True, "openai", 2, [])

    plain = _write(tmp_path, [_openai([_msg("user", "Name a planet.")], "Mars is a planet.", "The Moon."),
                              _openai([_msg("user", "Name a fruit.")], "An apple.", "A carrot.")], name="plain.jsonl")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "sdpo_engine", "run", "--model", str(tiny_model), "--step-file", str(case),
         "--out", str(out), "--learning-rate", "1e-3", "--batch-size", "2", "--max-length", "96", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_pairs(out / "data" / "step-1.jsonl") == load_pairs(plain)
    assert json.loads((out / "summary.json").read_text())["steps"][0]["index"] == 1
