"""The shared cases of #13 (../shared/cases) through the engine's command line, as a user runs them:
`python -m sdpo_engine validate FILE --tokenizer MODEL [--max-length N]` and `python -m sdpo_engine run`.
(Through the API: tests/e2e/test_text_checks.py, tests/e2e/test_non_finite.py, tests/api/test_text_format.py,
tests/engine/test_data_faithful.py for 07.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).resolve().parents[2].parent / "shared" / "cases"


def _engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdpo_engine", *args], capture_output=True, text=True, timeout=600)


def _validate(case: str, model: Path, *extra: str) -> tuple[int, dict]:
    done = _engine("validate", str(CASES / case), "--tokenizer", str(model), *extra)
    return done.returncode, json.loads(done.stdout)


def test_02_pretemplated_markup_refused_by_validate_and_run_or_trained_raw(tiny_model, tmp_path):
    rc, report = _validate("02-pretemplated-standard.jsonl", tiny_model)
    assert rc == 1 and report["code"] == "special_tokens_in_text"
    assert [(e["line"], e["field"]) for e in report["errors"]][:2] == [(1, "prompt"), (1, "chosen")]
    rc, report = _validate("02-pretemplated-standard.jsonl", tiny_model, "--text-format", "raw")
    assert rc == 0 and report["valid"]
    done = _engine("run", "--model", str(tiny_model), "--step-file", str(CASES / "02-pretemplated-standard.jsonl"),
                   "--out", str(tmp_path / "raw"), "--text-format", "raw", "--learning-rate", "1e-3", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "raw" / "summary.json").read_text())["steps"][0]["pairs_used"] == 2


def test_04_message_lists_without_a_template_refused_by_validate_and_run(notemplate_model, tmp_path):
    rc, report = _validate("04-no-chat-template-multiturn.jsonl", notemplate_model)
    assert rc == 1 and report["code"] == "no_chat_template"
    assert "tiny-notemplate has no chat template" in report["errors"][0]["reason"]
    done = _engine("run", "--model", str(notemplate_model), "--step-file", str(CASES / "04-no-chat-template-multiturn.jsonl"),
                   "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "has no chat template" in done.stderr
    assert not (tmp_path / "run" / "step-1").exists()


def test_05_truncation_counted_by_validate_and_refused_by_run(tiny_model, tmp_path):
    rc, report = _validate("05-truncation-makes-identical.jsonl", tiny_model, "--max-length", "48")
    assert rc == 1 and report["code"] == "no_trainable_pairs"
    assert report["stats"]["pairs_dropped"] == {"identical_after_truncation": {"count": 4, "lines": [1, 2, 3, 4]}}
    done = _engine("run", "--model", str(tiny_model), "--step-file", str(CASES / "05-truncation-makes-identical.jsonl"),
                   "--out", str(tmp_path / "run"), "--max-length", "48")
    assert done.returncode == 2 and "no pair of the 4 has a training signal at max_length=48" in done.stderr
    assert not (tmp_path / "run" / "step-1").exists()
