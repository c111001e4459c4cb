"""Drift from the base (sdpo_engine/drift.py): the numbers by hand, 0 when the policy is the base
(through pair_logps on the tiny model, with its scored token counts), mismatched inputs refused."""

from __future__ import annotations

import pytest

from sdpo_engine.drift import DRIFT_KEYS, drift_metrics


def test_drift_by_hand():
    policy = ([-10.0, -20.0], [-30.0, -25.0])
    base = ([-12.0, -21.0], [-29.0, -27.0])
    lengths = [(4, 6), (6, 4)]
    d = drift_metrics(policy, base, lengths, beta=0.1)
    # chosen: +2, +1; rejected: -1, +2
    assert d["pairs"] == 2
    assert d["chosen_logratio"] == pytest.approx(1.5) and d["rejected_logratio"] == pytest.approx(0.5)
    assert d["chosen_logratio_per_token"] == pytest.approx(3 / 10)
    assert d["rejected_logratio_per_token"] == pytest.approx(1 / 10)
    assert d["reward_margin"] == pytest.approx(0.1 * ((2 - -1) + (1 - 2)) / 2)
    assert d["max_abs_per_token"] == pytest.approx(0.3)
    assert d["base_preference_accuracy"] == 1.0  # the base prefers chosen in both (-12 > -29, -21 > -27)
    assert set(d) == {"pairs", *DRIFT_KEYS}


def test_drift_refuses_mismatched_inputs_and_is_empty_without_pairs():
    with pytest.raises(ValueError, match="lengths 1"):
        drift_metrics(([1.0, 2.0], [1.0, 2.0]), ([1.0, 2.0], [1.0, 2.0]), [(1, 1)], beta=0.1)
    assert drift_metrics(([], []), ([], []), [], beta=0.1) == {"pairs": 0}


def test_no_drift_before_training(tiny_model):
    from sdpo_engine.sample_data import make_pairs
    from sdpo_engine.step import load_policy, pair_logps

    pairs = make_pairs(3, seed=5)
    tok, model = load_policy(tiny_model, "cpu")
    lengths: list[tuple[int, int]] = []
    base = pair_logps(model, tok, pairs, max_length=96, lengths=lengths)
    assert len(lengths) == len(pairs) and all(c > 0 and r > 0 for c, r in lengths)
    again = pair_logps(model, tok, pairs, max_length=96)
    d = drift_metrics(again, base, lengths, beta=0.1)
    assert all(d[k] == 0 for k in DRIFT_KEYS if k != "base_preference_accuracy"), d
