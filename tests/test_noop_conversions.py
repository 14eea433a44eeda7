"""Conversions that change nothing: every page of the range already has the attribute
asked for. Such a call is counted as a call and a no-op and does no other work (no
zapping, no folio checks, no TLB flushes). Ranges at many offsets, inside and at the ends
of the file, one call at a time and batched; every counter is compared with the reference
model (tests/naive.py), and the no-op counts are worked out here."""
from __future__ import annotations

import pytest

import naive
import gmemfast
from conftest import assert_same_counters, assert_same_state
from gmemfast import (FALLOC_FL_KEEP_SIZE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                      KVM_MEMORY_ATTRIBUTE_PRIVATE)

PS = 4096
M = 1 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
SIZE = 8 * M
NPAGES = SIZE // PS
# (first page, pages): at the start, in the middle, ending at the end of the file, and
# ranges whose first page plus their end equals the file's page count
RANGES = [(0, 1), (3, 5), (100, 412), (NPAGES - 7, 7), (NPAGES // 4, NPAGES // 2),
          (NPAGES // 2 - 1, 2), (1, NPAGES - 2), (NPAGES // 3, NPAGES // 3)]


@pytest.mark.parametrize("to_private", [True, False])
def test_a_conversion_to_what_the_pages_already_are_is_a_counted_no_op(to_private):
    flags = GUEST_MEMFD_FLAG_MMAP | (0 if to_private else GUEST_MEMFD_FLAG_INIT_SHARED)
    eng, ref = gmemfast.GuestMemfd(SIZE, flags), naive.GuestMemfd(SIZE, flags)
    attr = PRIVATE if to_private else 0
    for g in (eng, ref):
        g.fallocate(FALLOC_FL_KEEP_SIZE, 0, SIZE)
        if not to_private:
            g.host_write(5 * PS, b"mapped")           # a host mapping a no-op must not zap
    before = dict(eng.counters)
    for first, n in RANGES:
        for g in (eng, ref):
            g.set_memory_attributes(first * PS, n * PS, attr)
    after = eng.counters
    changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert changed == {"convert_calls": len(RANGES), "convert_noop": len(RANGES)}, changed
    assert_same_counters(eng, ref, naive.COUNTERS, "after the no-op conversions")
    # batched, the same ranges
    offs = [first * PS for first, _ in RANGES]
    sizes = [n * PS for _, n in RANGES]
    r = eng.set_memory_attributes_many(offs, sizes, attr)
    ref.set_memory_attributes_many(offs, sizes, attr)
    assert not r.errno.any()
    assert eng.counters["convert_noop"] - before["convert_noop"] == 2 * len(RANGES)
    assert_same_counters(eng, ref, naive.COUNTERS, "after the batch")
    assert_same_state(eng, ref, "at the end")


@pytest.mark.parametrize("first, n", RANGES)
def test_a_range_partly_converted_already_is_not_a_no_op(first, n):
    """The control: the same ranges with their last page different do work."""
    eng, ref = (gmemfast.GuestMemfd(SIZE, GUEST_MEMFD_FLAG_MMAP),
                naive.GuestMemfd(SIZE, GUEST_MEMFD_FLAG_MMAP))
    for g in (eng, ref):
        g.set_memory_attributes((first + n - 1) * PS, PS, 0)
        g.set_memory_attributes(first * PS, n * PS, PRIVATE)
    assert_same_counters(eng, ref, naive.COUNTERS, "after the conversions")
    assert eng.private_pages() == NPAGES
    assert eng.counters["convert_noop"] == 0 and eng.counters["pages_to_private"] == 1
