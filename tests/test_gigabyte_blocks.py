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
    # six scattered pages of one 2 MiB block: a page table under a 1 GiB folio's entry
    ("six pages of block 1 to shared", lambda g: [g.set_memory_attributes(G + 3 * M2 + 37 * k * 4096, 4096, 0)
                                                   for k in range(6)]),
    ("block 1 wholly private again", lambda g: g.set_memory_attributes(G, G, PRIVATE)),
    ("three pages of block 0 to shared", lambda g: [g.set_memory_attributes(M2 * 7 + 5 * k * 4096, 4096, 0)
                                                     for k in range(3)]),
    ("block 0 wholly private again", lambda g: g.set_memory_attributes(0, G, PRIVATE)),
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
        eng.check()
    assert_same_state(eng, ref, "at the end")
    eng.check()


def test_direct_map_splits_in_a_file_ending_inside_a_gigabyte_block(tmp_path):
    """The last 1 GiB block holds only two 2 MiB blocks: splitting it makes two 2 MiB
    entries, not 512, live and when the counts are rebuilt by a load."""
    size = G + 2 * M2
    eng, ref = pair(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, direct_map="on-conversion")
    for g in (eng, ref):
        g.fallocate(KEEP, 0, size)
        g.set_memory_attributes(G + M2 + 4096, 2 * 4096, PRIVATE)  # the tail block: 1G -> 2M -> 4K
        g.set_memory_attributes(5 * M2, 4096, PRIVATE)             # and one page of block 0
    assert_same_counters(eng, ref, naive.COUNTERS, "after the splits")
    assert eng.direct_map_entries() == ref.direct_map_entries()
    assert eng.direct_map_entries() == {"1G": 0, "2M": 511 + 1, "4K": 512 + 512}
    eng.save(tmp_path / "s.npz")
    back = gmemfast.GuestMemfd.load(tmp_path / "s.npz")
    assert back.direct_map_entries() == ref.direct_map_entries()
    for g in (back, ref):
        g.set_memory_attributes(3 * M2, 4096, PRIVATE)             # one more 2 MiB entry split
    assert back.direct_map_entries() == ref.direct_map_entries()
    back.check()


def test_page_tables_freed_and_reused_while_the_pools_grow(monkeypatch):
    """Single conversions that need more page tables than the pools hold (the pools grow
    during the call), tables freed by merges and taken again: the same as the reference."""
    from gmemfast import _store
    monkeypatch.setattr(_store, "_POOL_FIRST_BYTES", 0)
    monkeypatch.setattr(_store, "_L1_FIRST_BYTES", 0)
    eng, ref = pair(G, GUEST_MEMFD_FLAG_MMAP)
    for round_ in range(3):
        blocks = range(round_ * 40, round_ * 40 + 40)
        for g in (eng, ref):
            for b in blocks:                                            # six pages: a page table each
                for k in range(6):
                    g.set_memory_attributes(b * M2 + (11 * k + round_) * 4096, 4096, 0)
        same_counts(eng, ref, f"round {round_}: tables made")
        eng.check()
        for g in (eng, ref):
            for b in list(blocks)[::2]:                                 # half of them merge again
                g.set_memory_attributes(b * M2, M2, PRIVATE)
        same_counts(eng, ref, f"round {round_}: half merged")
        eng.check()
    assert_same_state(eng, ref, "at the end")


def test_attribute_ranges_across_whole_uniform_blocks():
    """Whole 1 GiB blocks alternately private and shared, each one uniform entry: every
    boundary between them starts a new range (worked out by hand), and so does a metadata
    limit counting them."""
    eng = gmemfast.GuestMemfd(4 * G, GUEST_MEMFD_FLAG_MMAP)        # private from the start
    assert eng.attribute_ranges == 1
    eng.set_memory_attributes(G, G, 0)                             # P S P P
    assert eng.attribute_ranges == 3
    eng.set_memory_attributes(3 * G, G, 0)                         # P S P S
    assert eng.attribute_ranges == 4
    eng.set_memory_attributes(2 * G, G, 0)                         # P S S S
    assert eng.attribute_ranges == 2
    lim = gmemfast.GuestMemfd(4 * G, GUEST_MEMFD_FLAG_MMAP, metadata_limit=2)
    lim.set_memory_attributes(3 * G, G, 0)                         # P P P S: 2 ranges
    with pytest.raises(gmemfast.GmemError) as info:
        lim.set_memory_attributes(G, G, 0)                         # would make 4
    assert info.value.errno == 12
    lim.set_memory_attributes(2 * G, G, 0)                         # P P S S: still 2
    assert lim.attribute_ranges == 2
