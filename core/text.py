r"""Cleaning the names users give things (file names, job suffixes, descriptions, key names).

A name is shown back in lists, logs, the dashboard and terminals. Invisible characters in it let a
user make one name look like another, or reorder what a reader sees: a right-to-left override
(U+202E) makes "photo\u202egpj.exe" display as "photoexe.jpg"; an escape (U+001B) drives a
terminal. So names keep only characters that show: Unicode categories Cc (controls: tab,
newline, escape, DEL, C1), Cf (format: bidirectional overrides and isolates, zero-width space and
joiners, the BOM, soft hyphen), Cs (unpaired surrogates, which are not text at all), Zl and Zp (line
and paragraph separators) are removed. Ordinary spaces inside a name stay; spaces at its ends go.
"""

from __future__ import annotations

import unicodedata

REMOVED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def clean_name(value: str) -> str:
    """`value` without control, format, surrogate and line/paragraph-separator characters
    (`REMOVED_CATEGORIES`), stripped of white space at both ends. May return "": callers refuse
    an empty name (400) or fall back to a default."""
    return "".join(ch for ch in value if unicodedata.category(ch) not in REMOVED_CATEGORIES).strip()


def clean_optional_name(value: str | None) -> str | None:
    """For a pydantic validator of an optional name: None and "" pass unchanged; otherwise the
    cleaned name, or ValueError (400 from the API's validation handler) if nothing visible is left."""
    if not value:
        return value
    cleaned = clean_name(value)
    if not cleaned:
        raise ValueError("nothing is left once control and format characters (Unicode Cc, Cf) are removed")
    return cleaned
