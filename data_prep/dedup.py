"""Order-dependent de-duplication in the main process: the one "seen hash -> drop" rule.

A document is dropped as ``duplicate`` if its doc hash (clean.doc_hash) was seen before,
and, with a near-duplicate index (filters.NearDupIndex), as ``near_duplicate`` if its
MinHash band keys match an earlier kept document's. Documents must be offered in input
order: the first copy is kept. The seen-hash set is the one structure that grows with the
corpus (~70 bytes per kept document); ``clear()`` frees it after a pass.
"""
from __future__ import annotations


class Dedup:
    def __init__(self, dropped, index=None):
        """``dropped``: the Counter the drop reasons go to; ``index``: a NearDupIndex or None."""
        self.dropped, self.index = dropped, index
        self.seen: set[int] = set()

    def keep(self, h: int, keys=None) -> bool:
        """True for the first document with hash ``h`` that is no near-duplicate (``keys``:
        its band keys, or None); otherwise count why it is dropped and return False."""
        if h in self.seen:
            self.dropped["duplicate"] += 1
            return False
        self.seen.add(h)
        if keys is not None and self.index is not None and self.index.check_and_add(keys):
            self.dropped["near_duplicate"] += 1
            return False
        return True

    def clear(self) -> None:
        self.seen.clear()
