"""The reproduction's synthetic data: seeded, two sources, and a held-out split of truly unseen prompts."""

from __future__ import annotations

import re

from experiments.paper.data import all_names, make_splits

SIZES = {"n_sft": 50, "n_train": 80, "n_heldout": 40}


def _names(rows):
    pool = set(all_names())
    words = {w for r in rows if r["source"] == "polite" for w in re.findall(r"[A-Z][a-z]+", r["prompt"])}
    return words & pool


def _numbers(rows):
    return {frozenset(int(x) for x in re.findall(r"\d+", r["prompt"])) for r in rows if r["source"] == "larger"}


def test_same_seed_same_data_other_seed_other_data():
    assert make_splits(3, **SIZES) == make_splits(3, **SIZES)
    assert make_splits(3, **SIZES)["train"] != make_splits(4, **SIZES)["train"]


def test_sizes_sources_and_rules():
    splits = make_splits(0, **SIZES)
    for name, n in (("sft", 50), ("train", 80), ("heldout", 40)):
        rows = splits[name]
        assert sum(r["source"] == "polite" for r in rows) == n
        assert sum(r["source"] == "larger" for r in rows) == n
    for r in splits["train"]:
        if r["source"] == "larger":
            a, b = (int(x) for x in re.findall(r"\d+", r["prompt"]))
            assert str(max(a, b)) in r["chosen"] and str(min(a, b)) in r["rejected"]
            assert r["chosen"] != r["rejected"]


def test_heldout_prompts_are_unseen():
    splits = make_splits(0, **SIZES)
    seen = splits["sft"] + splits["train"]
    assert _names(splits["heldout"]) and not _names(splits["heldout"]) & _names(seen)
    assert not _numbers(splits["heldout"]) & _numbers(seen)
