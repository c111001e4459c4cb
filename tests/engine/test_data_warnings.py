"""Data smells reported as warnings (issue #13, kind 6): the file stays valid, the report says what
looks wrong, how often, and where (the first 10 line numbers)."""

from __future__ import annotations

import json
from pathlib import Path

from sdpo_engine.data import WARNING_CODES, validate_file


def _write(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pair(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def _warnings(tmp_path: Path, rows: list[dict], **kwargs) -> dict[str, dict]:
    report = validate_file(_write(tmp_path, rows), **kwargs)
    assert report["valid"], report["errors"]
    assert all(set(w) == {"code", "message", "count", "lines"} for w in report["warnings"])
    assert [w["code"] for w in report["warnings"]] == [c for c in WARNING_CODES
                                                       if c in {w["code"] for w in report["warnings"]}]
    return {w["code"]: w for w in report["warnings"]}


def _varied(n: int, start: int = 0) -> list[dict]:
    """Pairs with nothing to warn about: distinct, rejected a little longer than chosen."""
    return [_pair(f"What is {i} times 3?", f"It is {3 * i}.", f"It is {3 * i + 1}, I think.")
            for i in range(start, start + n)]


def test_clean_data_has_no_warnings(tmp_path):
    assert _warnings(tmp_path, _varied(30)) == {}


# ---- both answers repeat the prompt


def test_both_answers_repeating_the_prompt_are_flagged(tmp_path):
    prompt = "Write a haiku about the sea."
    rows = [
        _pair(prompt, f"{prompt}\n\nWaves fold into foam", f"{prompt} The sea is big."),  # both repeat it
        _pair(prompt, "write a  HAIKU about the sea. Salt wind", f"{prompt} No."),  # normalised: both repeat
        _pair(prompt, f"{prompt} Blue.", "Gulls cry over waves."),  # only one does: fine
        _pair("Say hi.", "Say hi. Hi!", "Say hi. Hello."),  # prompt too short to tell
    ]
    warning = _warnings(tmp_path, rows)["answers_repeat_prompt"]
    assert (warning["count"], warning["lines"]) == (2, [1, 2])
    assert warning["message"].startswith("2 pairs: both answers begin with the prompt's text")


def test_repeat_check_uses_the_last_user_message_of_a_conversation(tmp_path):
    question = "And what is the capital of Italy?"
    rows = [{"prompt": [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "Capital of France?"},
                        {"role": "assistant", "content": "Paris."},
                        {"role": "user", "content": question}],
             "chosen": [{"role": "assistant", "content": f"{question} Rome."}],
             "rejected": [{"role": "assistant", "content": f"{question} Milan."}]}]
    assert _warnings(tmp_path, rows)["answers_repeat_prompt"]["lines"] == [1]


# ---- markup


def test_answers_with_chat_markup_or_turn_headers_are_flagged(tmp_path):
    rows = [
        _pair("Hello?", "Hi there.\n\nHuman: and then?\n\nAssistant: more", "Go away."),  # Anthropic HH style
        _pair("Hello?", "Hi.", "Hey<|im_end|>\n<|im_start|>user\nagain"),  # ChatML
        _pair("Hello?", "Hi.\n### Response: hi", "No."),  # Alpaca
        _pair("Hello?", "A human: someone who says hello.", "No."),  # not a header: fine
    ]
    warnings = _warnings(tmp_path, rows)
    assert (warnings["answers_contain_markup"]["count"], warnings["answers_contain_markup"]["lines"]) == (3, [1, 2, 3])
    assert "prompt_contains_markup" not in warnings


def test_prompts_with_chat_markup_are_flagged(tmp_path):
    rows = [
        _pair("<|im_start|>user\nHello?<|im_end|>", "Hi.", "Go away."),
        _pair("[INST] Hello? [/INST]", "Hi.", "Go away."),
        _pair("Human: Hello?", "Hi.", "Go away."),  # plain text in a prompt: a quoted dialogue is normal
    ]
    warning = _warnings(tmp_path, rows)["prompt_contains_markup"]
    assert (warning["count"], warning["lines"]) == (2, [1, 2])


# ---- length bias


def test_length_bias_is_flagged_above_80_percent_of_at_least_20_pairs(tmp_path):
    rows = [_pair(f"Q{i}?", f"A long and careful answer number {i}.", f"Short {i}.") for i in range(17)]
    rows += [_pair(f"R{i}?", f"No {i}.", f"A long and careful answer number {i}.") for i in range(3)]
    report = validate_file(_write(tmp_path, rows))
    length = report["stats"]["length"]
    assert length["unit"] == "characters"
    assert (length["chosen_longer"], length["chosen_longer_share"]) == (17, 0.85)
    expected_mean = sum(len(r["chosen"]) - len(r["rejected"]) for r in rows) / 20
    assert length["mean_difference"] == round(expected_mean, 2)
    [warning] = [w for w in report["warnings"] if w["code"] == "length_bias"]
    assert warning["count"] == 17 and warning["lines"] == list(range(1, 11))
    assert warning["message"] == (f"17 pairs: chosen is the longer answer, in 85% of the pairs (mean difference "
                                  f"{round(expected_mean, 2)} characters); DPO may learn that longer is better")


def test_no_length_bias_warning_at_80_percent_or_under_20_pairs(tmp_path):
    at_share = [_pair(f"Q{i}?", f"Longer answer {i}.", f"No {i}.") for i in range(16)]
    at_share += [_pair(f"R{i}?", f"No {i}.", f"Longer answer {i}.") for i in range(4)]
    assert "length_bias" not in _warnings(tmp_path, at_share)
    few = [_pair(f"Q{i}?", f"Longer answer {i}.", f"No {i}.") for i in range(19)]
    assert "length_bias" not in _warnings(tmp_path, few)


class _WordTokenizer:
    def encode(self, text, add_special_tokens=True):
        return text.split()


def test_length_bias_is_measured_in_tokens_with_a_tokenizer(tmp_path):
    # More characters in rejected, more words (tokens) in chosen.
    rows = [_pair(f"Q{i}?", f"a b c {i}", f"Supercalifragilistic {i}") for i in range(20)]
    report = validate_file(_write(tmp_path, rows), tokenizer=_WordTokenizer())
    assert report["stats"]["length"] == {"unit": "tokens", "chosen_longer": 20, "chosen_longer_share": 1.0,
                                         "mean_difference": 2.0}
    assert [w["code"] for w in report["warnings"]] == ["length_bias"]
    assert "(mean difference 2.0 tokens)" in report["warnings"][0]["message"]
    report = validate_file(_write(tmp_path, rows, name="chars.jsonl"))
    assert report["stats"]["length"]["chosen_longer"] == 0 and report["warnings"] == []


# ---- duplicates and near-duplicates


def test_exact_and_near_duplicates_are_counted_apart(tmp_path):
    rows = [
        _pair("What is 2+2?", "4", "5"),
        _pair("What is 2+2?", "4", "5", source="other"),  # exact duplicate (the source does not count)
        _pair("what is  2+2? ", "4", "5"),  # near-duplicate of line 1
        _pair("WHAT IS 2+2?", "4 ", "5"),  # near-duplicate again
        _pair("What is 3+3?", "6", "7"),  # different
    ]
    report = validate_file(_write(tmp_path, rows))
    assert (report["stats"]["duplicates"], report["stats"]["near_duplicates"]) == (1, 2)
    warnings = {w["code"]: w for w in report["warnings"]}
    assert (warnings["duplicate_pairs"]["count"], warnings["duplicate_pairs"]["lines"]) == (1, [2])
    assert (warnings["near_duplicate_pairs"]["count"], warnings["near_duplicate_pairs"]["lines"]) == (2, [3, 4])


def test_near_duplicates_across_formats_of_messages(tmp_path):
    def conv(system, question, chosen):
        return {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": "No idea."}]}

    rows = [conv("Be brief.", "Capital of France?", "Paris."), conv("be brief.", "Capital of  France?", "PARIS."),
            conv("Be verbose.", "Capital of France?", "Paris.")]  # another system prompt: not a duplicate
    warnings = _warnings(tmp_path, rows)
    assert warnings["near_duplicate_pairs"]["lines"] == [2] and "duplicate_pairs" not in warnings


def test_sample_lines_are_capped_at_ten_but_all_are_counted(tmp_path):
    rows = [_pair("Same question here?", "Yes.", "No.")] * 26
    warning = _warnings(tmp_path, rows)["duplicate_pairs"]
    assert warning["count"] == 25 and warning["lines"] == list(range(2, 12))
    assert warning["message"].startswith("25 pairs: the same prompt, chosen and rejected as an earlier pair")


def test_invalid_lines_do_not_feed_warnings(tmp_path):
    rows = [_pair("What is 2+2?", "4", "5"), _pair("What is 2+2?", "4", "4"), _pair("What is 2+2?", "4", "5")]
    report = validate_file(_write(tmp_path, rows))
    assert not report["valid"]
    assert [(w["code"], w["lines"]) for w in report["warnings"]] == [("duplicate_pairs", [3])]


def test_held_out_overlap_counts_the_validation_pairs_and_prompts_training_already_holds(tmp_path):
    """A validation file against the training files: same pairs (up to case and whitespace, any source),
    same prompts with other answers (every message of a conversation), lines named; invalid lines skipped;
    a Parquet validation file reads the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdpo_engine.data import held_out_overlap

    train_a = _write(tmp_path, [_pair("Greet Ada.", "Hello Ada!", "Go away.", source="easy"),
                                _pair("What is 2 + 2?", "4.", "5.")], "train_a.jsonl")
    train_b = _write(tmp_path, [_pair(f"Count to {i}.", "ok", "no") for i in range(30)], "train_b.jsonl")
    held_rows = [
        _pair("greet  ADA.", "hello ada!", " Go away. ", source="hard"),  # 1: the same pair, other case/space/source
        _pair("What is 2 + 2?", "Four.", "5."),  # 2: a training prompt, other answers
        _pair("What is 3 + 3?", "6.", "7."),  # 3: unseen
        *[_pair(f"Count to {i}.", "ok", "no") for i in range(12)],  # 4-15: in the second training file
    ]
    held = _write(tmp_path, held_rows, "held.jsonl")
    got = held_out_overlap([train_a, train_b], held)
    assert got == {"validation_pairs": 15, "same_pairs": 13, "same_pair_lines": [1, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                   "same_prompts": 1, "same_prompt_lines": [2]}
    # Invalid lines do not count and do not stop the scan.
    with open(held, "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps(_pair("Greet Ada.", "Hello Ada!", "Go away.")) + "\n")
    got = held_out_overlap([train_a, train_b], held)
    assert (got["validation_pairs"], got["same_pairs"]) == (16, 14)
    # No overlap at all; and a Parquet validation file against JSONL training.
    assert held_out_overlap([train_b], _write(tmp_path, held_rows[:3], "h2.jsonl"))["same_pairs"] == 0
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "source"} for r in held_rows[:3]])
    pq.write_table(table, tmp_path / "held.parquet")
    got = held_out_overlap([train_a], tmp_path / "held.parquet")
    assert (got["validation_pairs"], got["same_pairs"], got["same_prompts"]) == (3, 1, 1)

    # Conversations: the prompt is every message, not the last one.
    def chat(*turns: str) -> dict:
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return {"prompt": messages, "chosen": [{"role": "assistant", "content": "3"}],
                "rejected": [{"role": "assistant", "content": "4"}]}

    train_c = _write(tmp_path, [chat("Hi", "Hello!", "Add 1 and 2")], "train_c.jsonl")
    held_c = _write(tmp_path, [chat("Hey", "Hello!", "Add 1 and 2"), chat("Hi", "Hello!", "Add 1 and 2"),
                               {**chat("Hi", "Hello!", "Add 1 and 2"), "chosen": [{"role": "assistant", "content": "three"}]}],
                    "held_c.jsonl")
    got = held_out_overlap([train_c], held_c)
    assert (got["same_pairs"], got["same_pair_lines"], got["same_prompts"], got["same_prompt_lines"]) == (1, [2], 1, [3])


def test_the_bundled_sample_is_the_generators_and_has_no_repeat_or_leak():
    """sdpo demo's files: what `demo_sample` writes, no duplicate pair and no warning in either file, and no
    held-out pair or prompt in training (else the demo's heldout_acc would count trained pairs)."""
    from sdpo_engine.data import held_out_overlap
    from sdpo_engine.sample_data import demo_sample

    assets = Path(__file__).resolve().parents[2] / "sdpo_engine" / "assets"
    train, heldout = demo_sample()
    for rows, name in ((train, "sample_train.jsonl"), (heldout, "sample_heldout.jsonl")):
        assert [json.loads(line) for line in (assets / name).read_text().splitlines()] == rows
        report = validate_file(assets / name)
        assert report["valid"] and report["warnings"] == [], report["warnings"]
        assert {r["source"] for r in rows} == {"greeting", "arithmetic"}
    overlap = held_out_overlap([assets / "sample_train.jsonl"], assets / "sample_heldout.jsonl")
    assert overlap["validation_pairs"] == 24 and overlap["same_pairs"] == overlap["same_prompts"] == 0
