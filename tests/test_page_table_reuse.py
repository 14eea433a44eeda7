"""Page tables returned to their pool are taken again before the pool grows
(docs/model.md: a table whose pages become alike is folded into its entry and returned).
A file that makes twenty page tables, folds them all away and makes twenty more elsewhere
holds no more page-state memory than after the first twenty, and is the same state as
the reference (tests/naive.py)."""
from __future__ import annotations

import naive
import gmemfast
from conftest import assert_same_counters, assert_same_state
from gmemfast import GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE

P = 4096
M2 = 2 << 20


def tables(g, blocks):
    """Six scattered shared pages per 2 MiB block: more than an entry keeps as exceptions,
    so each block gets a page table."""
    for b in blocks:
        for k in range(6):
            g.set_memory_attributes(b * M2 + (11 * k + 1) * P, P, 0)


def test_freed_page_tables_are_reused():
    eng = gmemfast.GuestMemfd(64 * M2, GUEST_MEMFD_FLAG_MMAP)
    ref = naive.GuestMemfd(64 * M2, GUEST_MEMFD_FLAG_MMAP)
    for g in (eng, ref):
        tables(g, range(0, 20))
    first = eng.memory_footprint()
    for g in (eng, ref):
        for b in range(0, 20):                          # every table folded away
            g.set_memory_attributes(b * M2, M2, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    for round_, blocks in enumerate((range(30, 50), range(40, 60))):
        for g in (eng, ref):
            tables(g, blocks)
        assert eng.memory_footprint() == first, round_  # the twenty freed ones, taken again
        for g in (eng, ref):
            for b in blocks:
                g.set_memory_attributes(b * M2, M2, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        assert eng.memory_footprint() == first, round_
    tables(eng, range(0, 20))
    tables(ref, range(0, 20))
    assert eng.memory_footprint() == first
    assert_same_counters(eng, ref, naive.COUNTERS, "at the end")
    assert_same_state(eng, ref, "at the end")
    eng.check()
