"""Which huge blocks a conversion to private merges: only those touching its range
(docs/model.md §4.4 step 7). A block elsewhere that is wholly private and allocated but
still split (a hole punched and allocated again: allocation does not merge) keeps its 4 KiB
folios until a conversion reaches it. Every case is compared with the reference model
(tests/naive.py): folio orders, state and every counter."""
from __future__ import annotations

import numpy as np
import pytest

import naive
import gmemfast
from conftest import assert_same_counters, assert_same_state
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                      KVM_MEMORY_ATTRIBUTE_PRIVATE)

PS = 4096
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def split_first_block(order):
    """Two huge blocks, all private and allocated; block 0 split by a punched page that is
    allocated again, so it is mergeable but not merged."""
    block = PS << order
    files = (gmemfast.GuestMemfd(2 * block, GUEST_MEMFD_FLAG_HUGETLB, page_order=order),
             naive.GuestMemfd(2 * block, GUEST_MEMFD_FLAG_HUGETLB, page_order=order))
    for g in files:
        g.fallocate(KEEP, 0, 2 * block)
        g.fallocate(PUNCH, 5 * PS, PS)
        g.fallocate(KEEP, 5 * PS, PS)
    eng, ref = files
    assert eng.folio_order(0) == ref.folio_order(0) == 0
    assert eng.folio_order(block) == ref.folio_order(block) == order
    return eng, ref, block


def check_block_0_untouched(eng, ref, order, what):
    assert eng.folio_order(0) == 0, what
    assert eng.folio_order(5 * PS) == 0, what
    assert_same_counters(eng, ref, naive.COUNTERS, what)
    assert_same_state(eng, ref, what)
    eng.check()


@pytest.mark.parametrize("order", [9, 18])
def test_a_conversion_merges_only_the_blocks_it_touches(order):
    eng, ref, block = split_first_block(order)
    for g in (eng, ref):
        g.set_memory_attributes(block + 7 * PS, PS, 0)        # block 1 splits
        g.set_memory_attributes(block + 7 * PS, PS, PRIVATE)  # and merges again
    assert eng.folio_order(block) == order
    check_block_0_untouched(eng, ref, order, "after a round trip in block 1")
    merges = "folio_merges_1g" if order == 18 else "folio_merges_2m"
    assert eng.counters[merges] == 1
    # a conversion to private that reaches block 0 merges it (one that changes nothing
    # does not: it does no work)
    for g in (eng, ref):
        g.set_memory_attributes(0, PS, PRIVATE)
    assert eng.folio_order(0) == ref.folio_order(0) == 0
    for g in (eng, ref):
        g.set_memory_attributes(0, PS, 0)
        g.set_memory_attributes(0, PS, PRIVATE)
    assert eng.folio_order(0) == ref.folio_order(0) == order
    assert eng.counters[merges] == 2
    assert_same_counters(eng, ref, naive.COUNTERS, "after block 0 merges")


@pytest.mark.parametrize("order", [9, 18])
@pytest.mark.parametrize("n", [3, 100])
def test_a_batch_merges_only_the_blocks_it_touches(order, n):
    """Batches of one-page conversions in block 1 (few: one call each; many: grouped by
    block and converted in place)."""
    eng, ref, block = split_first_block(order)
    offs = block + PS * np.arange(8, 8 + n, dtype=np.int64)
    eng.set_memory_attributes_many(offs, PS, 0)
    ref.set_memory_attributes_many(offs.tolist(), PS, 0)
    r = eng.set_memory_attributes_many(offs, PS, PRIVATE)
    ref.set_memory_attributes_many(offs.tolist(), PS, PRIVATE)
    assert not r.errno.any()
    assert eng.folio_order(block) == order
    check_block_0_untouched(eng, ref, order, f"after a batch of {n} in block 1")
