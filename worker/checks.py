"""The text checks a job passes before any chunk or step: every file against the model's tokenizer
(markup in the text, message lists without a chat template), so a job that cannot train as asked
fails at preparation, not hours later."""

from __future__ import annotations

from pathlib import Path

from sdpo_engine.data import DataError, load_numbered_pairs, validate_file
from sdpo_engine.markup import check_pairs, read_tokenizer_files
from worker.workdir import local_path


def check_text(files: list[tuple[str, str]], base: Path, model_id: str, text_format: str,
               chat_template: str | None, *, source_field: str) -> tuple[str, str] | None:
    """(code, message) for the first of `files` ([(file id, storage URI)]) the model's tokenizer
    refuses (markup.check_pairs), or None.

    Reads the tokenizer's saved files only (no transformers in this process); the step checks again
    with the loaded tokenizer before it trains.
    """
    tokenizer = read_tokenizer_files(base)
    if tokenizer is None:
        return None  # no tokenizer files to read: the step's own check (with the loaded tokenizer) decides
    if chat_template:
        tokenizer.chat_template = chat_template
    for file_id, uri in files:
        path = local_path(uri)
        try:
            numbered = load_numbered_pairs(path, source_field=source_field)
        except DataError as e:
            return "invalid_training_data", f"File {file_id}: {e}"
        fmt = validate_file(path, source_field=source_field, max_errors=1)["format"]
        checked = check_pairs(numbered, fmt=fmt, tokenizer=tokenizer, text_format=text_format, model_name=model_id)
        if not checked["valid"]:
            first = checked["errors"][0]
            where = f"line {first['line']}, {first['field']}: " if first["line"] else ""
            more = checked["error_count"] - 1
            return checked["code"], (f"File {file_id} cannot be trained on {model_id}: {where}{first['reason']}"
                                     + (f" ({more} more problem(s) of this kind in the file)" if more > 0 else ""))
    return None
