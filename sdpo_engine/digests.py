"""A compact set of digests, for counting duplicate pairs in files of millions of rows.

A Python `set` of 16-byte `bytes` costs about 90 bytes per member (the object, its header, the
table's slot and spare room): 180 MB for the two sets the validator keeps over a 1,000,000-row
upload. `DigestSet` keeps the first 8 bytes of each digest as an unsigned 64-bit integer in one
`array('Q')` hash table (open addressing, linear probing, at most half full): 16 to 32 bytes per
member, one allocation, no per-member object.

Why not a Bloom filter (`rbloom`, `pybloom-live`)? It would be smaller still, but its false
positives would count unique pairs as duplicates; this set is exact for all practical purposes: two
different pairs share 64 bits of sha256 with probability about n^2 / 2^65 (3e-8 for a million
rows). It stays pure Python, as the validator must (the API imports it without numpy or torch).

Memory is bounded: past `max_entries` members a new digest is no longer remembered (`saturated`
turns True), so duplicates of it go uncounted and the duplicate count becomes a lower bound. The
default (4,194,304 members: a 64 MiB table) is four times the API's default row cap.
"""

from __future__ import annotations

from array import array

DEFAULT_MAX_ENTRIES = 1 << 22
_INITIAL_SLOTS = 1 << 10


class DigestSet:
    """`digest in s` and `s.add(digest)` for `bytes` digests of at least 8 uniformly random bytes
    (a sha256); only the first 8 bytes are kept."""

    __slots__ = ("_table", "_mask", "_count", "max_entries", "saturated")

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._table = array("Q", bytes(8 * _INITIAL_SLOTS))
        self._mask = _INITIAL_SLOTS - 1
        self._count = 0
        self.max_entries = max_entries
        self.saturated = False

    # The probe loop is written out in both methods: this runs once or twice per row of a
    # million-row file, and a helper call per probe doubles its cost.

    def __contains__(self, digest: bytes) -> bool:
        key = int.from_bytes(digest[:8], "little") or 1  # 0 marks an empty slot
        table, mask = self._table, self._mask
        index = key & mask
        while held := table[index]:
            if held == key:
                return True
            index = (index + 1) & mask
        return False

    def add(self, digest: bytes) -> None:
        key = int.from_bytes(digest[:8], "little") or 1
        table, mask = self._table, self._mask
        index = key & mask
        while held := table[index]:
            if held == key:
                return
            index = (index + 1) & mask
        if self._count >= self.max_entries:
            self.saturated = True
            return
        table[index] = key
        self._count += 1
        if 2 * self._count > len(table):
            self._grow()

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes of the table (the memory this set holds, within a few hundred bytes)."""
        return len(self._table) * self._table.itemsize

    def _grow(self) -> None:
        old = self._table
        size = 2 * len(old)
        table = array("Q", bytes(8 * size))
        mask = size - 1
        for key in old:
            if key:
                index = key & mask
                while table[index]:
                    index = (index + 1) & mask
                table[index] = key
        self._table, self._mask = table, mask
