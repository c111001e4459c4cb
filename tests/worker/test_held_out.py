"""The warning a job gets when its validation file overlaps its training data (worker.checks.held_out_warning)."""

from __future__ import annotations

import json
from pathlib import Path

from worker.checks import held_out_warning


def _file(path: Path, rows: list[tuple[str, str, str]]) -> tuple[str, str]:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return f"file-{path.stem}", path.resolve().as_uri()


def test_the_warning_names_the_files_counts_and_lines(tmp_path):
    train = _file(tmp_path / "train", [(f"Q{i}?", "yes", "no") for i in range(20)])
    steps = _file(tmp_path / "step2", [("Greet Ada.", "Hello Ada!", "Go away.")])
    validation = _file(tmp_path / "val", [("q3?", "YES", "no"), ("New?", "a", "b"), ("Q4?", "maybe", "no"),
                                          *[(f"Q{i}?", "yes", "no") for i in range(5, 17)],
                                          ("Greet Ada.", "Hello Ada!", "Go away.")])
    message, data = held_out_warning([train, steps], validation, source_field="source")
    assert message == (
        "Validation file file-val overlaps the training data (file-train, file-step2): 14 of its 16 pairs are also in "
        "the training data (same prompt, chosen and rejected, ignoring case and whitespace; lines 1, 4, 5, 6, 7, 8, "
        "9, 10, 11, 12, …); 1 more has a training prompt with other answers (line 3). The held-out figures "
        "(heldout_acc, the eval margins, a quality gate) count these pairs as unseen.")
    assert data == {"code": "validation_overlap", "validation_file": "file-val", "validation_pairs": 16,
                    "same_pairs": 14, "same_pair_lines": [1, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                    "same_prompts": 1, "same_prompt_lines": [3]}
    # Only prompts shared; nothing shared.
    only_prompts = _file(tmp_path / "val2", [("Q1?", "a", "b"), ("Q2?", "c", "d")])
    message, _ = held_out_warning([train], only_prompts, source_field="source")
    assert ": 2 of its 2 pairs have a training prompt with other answers (lines 1, 2)." in message
    one = _file(tmp_path / "val4", [("Q1?", "yes", "no"), ("New?", "a", "b")])
    message, _ = held_out_warning([train], one, source_field="source")
    assert ": 1 of its 2 pairs is also in the training data (" in message and "; line 1)." in message
    assert held_out_warning([train], _file(tmp_path / "val3", [("New?", "a", "b")]), source_field="source") is None
