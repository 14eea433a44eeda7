"""Whole 1 GiB blocks: a block whose 2 MiB entries are all alike is kept as one uniform
summary entry with no table below it (README, "How it is fast"), so its page counts come
from the entry's word alone. These files are a few GiB, so every operation here leaves
such entries behind, and each step is compared with the reference (tests/naive.py):
state, counters, and the per-range page counts of every block."""
from __future__ import annotations

import pytest

import naive
import gmemfast
from conftest import assert_same_counters, assert_same_state
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                      GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE)

G = 1 << 30
M2 = 2 << 20
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def pair(size, flags, **kw):
    return gmemfast.GuestMemfd(size, flags, **kw), naive.GuestMemfd(size, flags, **kw)


def same_counts(eng, ref, what):
    """Counters, and the page counts of each 1 GiB block and of the whole file (cheap enough
    for every step; the whole state is compared at the end)."""
    assert_same_counters(eng, ref, naive.COUNTERS, what)
    per_block = G // 4096
    for off in range(0, eng.size, G):
        first = off // 4096
        assert eng.private_pages(off, G) == sum(ref.private[first:first + per_block]), (what, off)
        assert eng.allocated_pages(off, G) == sum(ref.allocated[first:first + per_block]), (what, off)
        assert eng.is_private(off, G) == ref.is_private(off, G), (what, off)
        assert eng.folio_order(off) == ref.folio_order(off), (what, off)
    assert eng.private_pages() == ref.private.count(True), what
    assert eng.allocated_pages() == ref.allocated.count(True), what
    assert eng.huge_folios() == ref.huge_folios(), what


STEPS = [
    ("allocate block 1", lambda g: g.fallocate(KEEP, G, G)),
    ("block 1 to shared", lambda g: g.set_memory_attributes(G, G, 0)),
    ("one 2 MiB piece of block 0 to shared", lambda g: g.set_memory_attributes(M2, M2, 0)),
    ("allocate both blocks", lambda g: g.fallocate(KEEP, 0, 2 * G)),
    ("block 0 back to private", lambda g: g.set_memory_attributes(0, G, PRIVATE)),
    ("punch block 1", lambda g: g.fallocate(PUNCH, G, G)),
    ("both blocks to shared", lambda g: g.set_memory_attributes(0, 2 * G, 0)),
    ("block 1 to private", lambda g: g.set_memory_attributes(G, G, PRIVATE)),
    ("allocate block 1 again", lambda g: g.fallocate(KEEP, G, G)),
]


@pytest.mark.parametrize("flags, kw", [
    (GUEST_MEMFD_FLAG_MMAP, {}),
    (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, {}),
    (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB, {"page_order": 18}),
], ids=["4k", "4k-shared", "1g"])
def test_whole_gigabyte_steps_match_the_reference(flags, kw):
    eng, ref = pair(2 * G, flags, **kw)
    same_counts(eng, ref, "new file")
    for what, step in STEPS:
        step(eng)
        step(ref)
        same_counts(eng, ref, what)
    assert_same_state(eng, ref, "at the end")
    eng.check()
