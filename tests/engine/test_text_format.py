"""Issue #13, kinds 1, 3 and 4: what the model's tokenizer says about a file before it trains.

1. Chat markup or special tokens inside text: refused naming line, field and token
   (text_format "chat"), or trained exactly as given (text_format "raw"; token ids asserted).
3. Pairs without training signal after truncation: dropped and counted by reason; none left fails.
4. Message lists on a model without a chat template: refused, unless the job supplies a template.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_engine.data import DataError, load_numbered_pairs, load_pairs, validate_file
from sdpo_engine.markup import check_pairs, markup_tokens, read_tokenizer_files
from sdpo_engine.tokens import no_signal_reason, raw_tokenize

CASES = Path(__file__).resolve().parents[2].parent / "shared" / "cases"
HP = {"learning_rate": 1e-3, "batch_size": 2, "max_length": 96, "beta": 0.1, "seed": 0}
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _check(path: Path, tokenizer, **kw) -> dict:
    fmt = validate_file(path)["format"]
    return check_pairs(load_numbered_pairs(path), fmt=fmt, tokenizer=tokenizer, model_name="tiny", **kw)


def _step(model, train_file, tmp_path, **spec):
    from sdpo_engine.step import run_step

    events: list[dict] = []
    summary = run_step({"index": 1, "policy_init": str(model), "train_file": str(train_file),
                        "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
                        "hyperparameters": {**HP, **spec.pop("hp", {})}, "device": "cpu", **spec}, events.append)
    return summary, events


def _pair(prompt, chosen, rejected) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": None}


def _trl_ids(model_dir, pairs: list[dict], text_format: str, chat_template: str | None = None, max_length: int = 96):
    """The token ids TRL's trainer receives for normalised `pairs` (its prepared train dataset)."""
    import tempfile

    from sdpo_engine.config import StepConfig
    from sdpo_engine.step import build_trainer, dpo_config, load_policy, to_trl_rows

    tok, model = load_policy(model_dir, "cpu")
    if chat_template:
        tok.chat_template = chat_template
    with tempfile.TemporaryDirectory() as tmp:
        args = dpo_config(StepConfig(max_length=max_length, batch_size=2), tmp, "cpu")
        trainer = build_trainer(model, tok, to_trl_rows(pairs, tok, text_format), args, text_format=text_format)
        ds = trainer.train_dataset
        return tok, list(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)), trainer


# ---------------------------------------------------------------------------------------------
# Kind 1: markup and special tokens inside text


@pytest.mark.parametrize("row, line, field, token", [
    # ChatML markup in a standard string prompt (the shared case's kind), on line 2
    ({"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "chosen": "Hello.",
      "rejected": "Go away."}, 2, "prompt", "<|im_start|>"),
    # Llama 2 markup inside a conversational answer: data formatted for another model
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "[INST] Hello."}],
      "rejected": [{"role": "assistant", "content": "Go away."}]}, 2, "chosen[0].content", "[INST]"),
    # the model's own EOS at the end of an OpenAI-format answer
    ({"input": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
      "preferred_output": [{"role": "assistant", "content": "Hello.<|im_end|>"}],
      "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}, 2, "preferred_output[0].content",
     "<|im_end|>"),
    # Llama 3 header markup in a system message
    ({"prompt": [{"role": "system", "content": "<|start_header_id|>system<|end_header_id|> Be kind."},
                 {"role": "user", "content": "Hi"}],
      "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "No."}]},
     2, "prompt[0].content", "<|start_header_id|>"),
])
def test_markup_in_text_is_refused_naming_line_field_and_token(tmp_path, tokenizer, row, line, field, token):
    # line 1 is the same shape without any markup, so only line 2 is named (once: its first token found)
    text = json.dumps(row)
    for marker in markup_tokens(tokenizer):
        text = text.replace(json.dumps(marker)[1:-1], "")
    path = tmp_path / "data.jsonl"
    path.write_text(text + "\n" + json.dumps(row) + "\n")
    result = _check(path, tokenizer)
    assert result["code"] == "special_tokens_in_text"
    assert result["error_count"] == 1
    (error,) = result["errors"]
    assert (error["line"], error["field"]) == (line, field)
    assert repr(token) in error["reason"] and "text_format 'raw'" in error["reason"]


def test_a_special_token_added_to_the_tokenizer_is_found_by_the_loaded_and_the_saved_tokenizer(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    tok.save_pretrained(tmp_path / "tok")
    saved = read_tokenizer_files(tmp_path / "tok")
    assert "<tool_call>" in markup_tokens(tok) and markup_tokens(saved) == markup_tokens(tok)
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Call it", "chosen": "<tool_call>f()", "rejected": "no"}])
    for t in (tok, saved):
        assert _check(path, t)["errors"][0]["field"] == "chosen"


def test_html_s_tag_is_not_markup_on_a_model_whose_tokens_it_is_not(tmp_path, tokenizer):
    # `<s>` is Llama 2's BOS but also HTML's strikethrough: only the model's own special tokens count.
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Strike it", "chosen": "<s>old</s> new", "rejected": "new"}])
    assert _check(path, tokenizer)["valid"]


def test_the_shared_pretemplated_case_is_refused_by_a_step_and_by_run(tiny_model, tmp_path):
    from sdpo_engine.step import TrainingDataError

    with pytest.raises(TrainingDataError) as info:
        _step(tiny_model, CASES / "02-pretemplated-standard.jsonl", tmp_path)
    assert info.value.code == "special_tokens_in_text"
    assert "line 1, prompt" in str(info.value) and "'<|im_start|>'" in str(info.value)
    assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "run", "--model", str(tiny_model), "--step-file",
                           str(CASES / "02-pretemplated-standard.jsonl"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "line 1: prompt: contains '<|im_start|>'" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "step-1").exists()


def test_raw_text_trains_the_pretemplated_strings_exactly_as_given(tiny_model, tmp_path):
    pairs = load_pairs(CASES / "02-pretemplated-standard.jsonl")
    tok, ids, _ = _trl_ids(tiny_model, pairs, "raw")
    for pair, (p, c, r) in zip(pairs, ids, strict=True):
        prompt, chosen, rejected = (pair["prompt"][0]["content"], pair["chosen"][0]["content"],
                                    pair["rejected"][0]["content"])
        # never templated: the ids are exactly the strings' own (the tiny tokenizer adds no BOS), and the
        # answers already end with the EOS token (before a newline), so no second EOS is appended
        assert p + c == tok(prompt + chosen, add_special_tokens=False)["input_ids"]
        assert p + r == tok(prompt + rejected, add_special_tokens=False)["input_ids"]
        assert tok.decode(p + c) == prompt + chosen
        assert c.count(tok.eos_token_id) == 1 and r.count(tok.eos_token_id) == 1
    summary, _ = _step(tiny_model, CASES / "02-pretemplated-standard.jsonl", tmp_path, text_format="raw")
    assert abs(summary["first_loss"] - 0.693147) < 1e-4 and summary["pairs_used"] == 2


def test_raw_text_adds_eos_once_when_an_answer_lacks_it(tiny_model):
    pairs = [_pair("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello.", "Go away.<|im_end|>")]
    tok, [(p, c, r)], _ = _trl_ids(tiny_model, pairs, "raw")
    eos = tok.eos_token_id
    assert c == tok("Hello.", add_special_tokens=False)["input_ids"] + [eos]
    assert r == tok("Go away.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert r.count(eos) == 1


class _BosTokenizer:
    """A Llama-style tokenizer stand-in (one id per character, BOS added by default), for BOS rules."""

    bos_token, bos_token_id, eos_token, eos_token_id = "<s>", 1, "</s>", 2

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            for special, sid in (("<s>", 1), ("</s>", 2)):
                if text.startswith(special, i):
                    ids.append(sid)
                    i += len(special)
                    break
            else:
                ids.append(100 + ord(text[i]))
                i += 1
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_raw_text_puts_bos_in_front_at_most_once():
    tok = _BosTokenizer()
    plain = raw_tokenize(tok, "Q:", "A</s>", "B")
    assert plain["prompt_ids"] == [1, 100 + ord("Q"), 100 + ord(":")]
    assert plain["chosen_ids"] == [100 + ord("A"), 2] and plain["rejected_ids"] == [100 + ord("B"), 2]
    already = raw_tokenize(tok, "<s>Q:", "A", "B")
    assert already["prompt_ids"] == plain["prompt_ids"], "a prompt that starts with BOS gets no second one"


# ---------------------------------------------------------------------------------------------
# Kind 3: pairs without training signal after tokenisation


def test_no_signal_reasons():
    assert no_signal_reason([1, 2, 3], [4], [5], max_length=3) == "prompt_fills_max_length"
    assert no_signal_reason([1, 2], [4, 5, 6], [4, 5, 7], max_length=4) == "identical_after_truncation"
    assert no_signal_reason([1, 2], [4, 5, 6], [4, 5, 7], max_length=5) is None
    assert no_signal_reason([1], [4, 5], [4, 5], max_length=None) == "identical_after_truncation"


def test_the_shared_truncation_case_drops_every_pair_and_the_step_fails_clearly(tiny_model, tmp_path):
    from sdpo_engine.step import TrainingDataError

    with pytest.raises(TrainingDataError) as info:
        _step(tiny_model, CASES / "05-truncation-makes-identical.jsonl", tmp_path, hp={"max_length": 48})
    assert info.value.code == "no_trainable_pairs"
    assert "4 identical after truncation (lines 1, 2, 3, 4)" in str(info.value)
    assert not (tmp_path / "out").exists()
    # the same file with room for the answers' last tokens trains every pair
    summary, _ = _step(tiny_model, CASES / "05-truncation-makes-identical.jsonl", tmp_path / "b",
                       hp={"max_length": 128})
    assert summary["pairs_used"] == 4 and summary["pairs_dropped"] == {}


def test_some_pairs_dropped_are_counted_by_reason_with_their_lines(tiny_model, tmp_path, tokenizer):
    long_prompt = "Tell me about " + "the sea and the sky " * 12
    same_start = "Let me think about this very carefully and then answer the question that you asked: "
    rows = [
        {"prompt": "What is 2 + 3?", "chosen": "5.", "rejected": "6."},                     # line 1: kept
        {"prompt": long_prompt, "chosen": "Blue.", "rejected": "Green."},                 # line 2: prompt fills
        {"prompt": "What is 4 + 4?", "chosen": same_start + "8.", "rejected": same_start + "9."},  # 3: identical
        {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."},                     # line 4: kept
    ]
    path = _jsonl(tmp_path / "mixed.jsonl", rows)
    summary, events = _step(tiny_model, path, tmp_path / "s", hp={"max_length": 40})
    assert summary["pairs_dropped"] == {"prompt_fills_max_length": 1, "identical_after_truncation": 1}
    assert summary["pairs_used"] == 2 and summary["pairs"] == 4
    (dropped,) = [e for e in events if e.get("phase") == "pairs_dropped"]
    assert dropped["pairs_dropped"] == {"prompt_fills_max_length": {"count": 1, "lines": [2]},
                                        "identical_after_truncation": {"count": 1, "lines": [3]}}
    # exactly the two pairs with signal reach TRL
    _, ids, trainer = _trl_ids(tiny_model, load_pairs(path), "chat", max_length=40)
    assert len(ids) == 2 and trainer.pairs_dropped == {"prompt_fills_max_length": [1], "identical_after_truncation": [2]}
    # validate --tokenizer --max-length counts the same, with the file's lines
    done = subprocess.run([sys.executable, "-m", "sdpo_engine", "validate", str(path), "--tokenizer", str(tiny_model),
                           "--max-length", "40"], capture_output=True, text=True)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["stats"]["pairs_dropped"] == dropped["pairs_dropped"]


# ---------------------------------------------------------------------------------------------
# Kind 4: message lists on a model without a chat template


@pytest.mark.parametrize("rows", [
    [{"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi."}],
      "rejected": [{"role": "assistant", "content": "No."}]}],
    [{"input": {"messages": [{"role": "user", "content": "Say hi."}]},
      "preferred_output": [{"role": "assistant", "content": "Hi."}],
      "non_preferred_output": [{"role": "assistant", "content": "No."}]}],
    [{"prompt": [{"role": "system", "content": "French only."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Salut."}, {"role": "user", "content": "Thanks"}],
      "chosen": [{"role": "assistant", "content": "Merci."}], "rejected": [{"role": "assistant", "content": "Thanks."}]}],
], ids=["conversational-single-turn", "openai", "multi-turn"])
def test_message_lists_on_a_model_without_a_template_are_refused(notemplate_model, tmp_path, rows):
    from transformers import AutoTokenizer

    path = _jsonl(tmp_path / "d.jsonl", rows)
    result = _check(path, AutoTokenizer.from_pretrained(notemplate_model))
    assert result["code"] == "no_chat_template" and result["errors"][0]["line"] == 0
    assert result == _check(path, read_tokenizer_files(notemplate_model))


def test_the_shared_multiturn_case_is_refused_by_a_step_and_trains_with_a_supplied_template(notemplate_model, tmp_path):
    from sdpo_engine.step import TrainingDataError

    case = CASES / "04-no-chat-template-multiturn.jsonl"
    with pytest.raises(TrainingDataError) as info:
        _step(notemplate_model, case, tmp_path / "a")
    assert info.value.code == "no_chat_template" and "tiny-notemplate has no chat template" in str(info.value)
    summary, _ = _step(notemplate_model, case, tmp_path / "b", chat_template=TEMPLATE)
    assert abs(summary["first_loss"] - 0.693147) < 1e-4
    # the template trained with is the one saved with the checkpoint
    assert (tmp_path / "b" / "out" / "chat_template.jinja").read_text() == TEMPLATE
    # and the ids TRL received are the template's rendering of the turns
    pairs = load_pairs(case)
    tok, ids, _ = _trl_ids(notemplate_model, pairs, "chat", chat_template=TEMPLATE)
    (p, c, _r) = ids[0]
    rendered = tok.apply_chat_template(pairs[0]["prompt"] + pairs[0]["chosen"], tokenize=False)
    assert tok.decode(p + c) == rendered and "<|im_start|>system\nAnswer in French only." in rendered


def test_strings_on_a_model_without_a_template_train_exactly_as_written(notemplate_model, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2 + 3?\nA:", "chosen": " 5", "rejected": " 6"}])
    assert _check(path, read_tokenizer_files(notemplate_model))["valid"]
    tok, [(p, c, r)], _ = _trl_ids(notemplate_model, load_pairs(path), "chat")
    assert tok.decode(p + c) == "Q: 2 + 3?\nA: 5" + tok.eos_token


def test_raw_text_refuses_message_lists(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "Hi"}],
                                          "chosen": [{"role": "assistant", "content": "Hi."}],
                                          "rejected": [{"role": "assistant", "content": "No."}]}])
    assert _check(path, tokenizer, text_format="raw")["code"] == "raw_needs_strings"


def test_a_training_data_error_survives_a_process_boundary():
    import pickle

    from sdpo_engine.step import TrainingDataError

    e = pickle.loads(pickle.dumps(TrainingDataError("no_chat_template", "msg", {"errors": []})))
    assert (e.code, str(e), e.report) == ("no_chat_template", "msg", {"errors": []})
    assert isinstance(e, DataError)
