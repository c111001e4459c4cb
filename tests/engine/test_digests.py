"""DigestSet: the validator's duplicate counting, exact like a set, in bounded memory."""

from __future__ import annotations

import hashlib
import random

from sdpo_engine.digests import DigestSet


def _digest(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()[:16]


def test_answers_like_a_set_through_many_growths():
    rng = random.Random(0)
    digests = [_digest(rng.randrange(30_000)) for _ in range(50_000)]
    compact, reference = DigestSet(), set()
    for d in digests:
        assert (d in compact) == (d in reference)
        compact.add(d)
        reference.add(d)
    assert len(compact) == len(reference)
    assert all(_digest(i) in compact for i in range(30_000) if _digest(i) in reference)
    assert not any(_digest(i) in compact for i in range(30_000, 31_000))
    # At most half full, 8 bytes a slot: under 32 bytes per member (a set of bytes takes ~90).
    assert compact.nbytes <= 32 * len(compact)


def test_a_zero_prefix_is_a_member_too():
    compact = DigestSet()
    zero = bytes(16)
    assert zero not in compact
    compact.add(zero)
    assert zero in compact and len(compact) == 1


def test_past_max_entries_new_digests_are_not_remembered():
    compact = DigestSet(max_entries=100)
    for i in range(150):
        compact.add(_digest(i))
    assert len(compact) == 100 and compact.saturated
    assert _digest(0) in compact and _digest(99) in compact and _digest(149) not in compact
