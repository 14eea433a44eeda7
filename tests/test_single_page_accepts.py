"""One-page items of ``VM.guest_accept_many`` in backing blocks that are wholly allocated,
partly allocated (a page punched out of a huge folio) or holes, for every backing page
order and direct-map policy.

A one-page item skips the block-level work of an accept when its backing block is already
wholly allocated: every allocation widens to whole blocks of the backing order and
allocates their holes (docs/model.md §4.2), so allocating the page then does nothing;
otherwise it allocates the block's holes. Each item's result, the file's counters and
its state must be what the reference (tests/naive.py) gives for the same accepts one at a
time; the 1 GiB files are compared with one ``VM.guest_accept`` call per item on a twin
VM instead (the reference is too slow at that size)."""
from __future__ import annotations

import numpy as np
import pytest

import naive
from conftest import assert_same_counters, assert_same_state
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                      GUEST_MEMFD_FLAG_MMAP, VM)

P = 4096
M2 = 2 << 20
G = 1 << 30
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def engine_file(size, order, direct_map, vm_type="tdx"):
    flags = GUEST_MEMFD_FLAG_MMAP | (GUEST_MEMFD_FLAG_HUGETLB if order else 0)
    vm = VM(vm_type, in_place=True, direct_map=direct_map)
    g = vm.create_guest_memfd(size, flags, page_order=order)
    vm.set_user_memory_region(0, 0, size, g)
    return vm, g


def reference_file(size, order, direct_map, vm_type="tdx"):
    flags = GUEST_MEMFD_FLAG_MMAP | (GUEST_MEMFD_FLAG_HUGETLB if order else 0)
    return naive.GuestMemfd(size, flags, page_order=order, vm_type=vm_type, direct_map=direct_map)


def layout(g, order):
    """Block 0 wholly allocated, block 1 allocated but for six pages from its page 5 on
    (punched: more than a 2 MiB entry keeps as exceptions, so the block gets a page table),
    block 2 a hole, block 3 allocated but for its last page; a block is one backing page
    (2 MiB of 4 KiB pages when the order is 0)."""
    unit = max(P << order, M2)
    g.fallocate(KEEP, 0, unit)
    g.fallocate(KEEP, unit, unit)
    for k in range(6):
        g.fallocate(PUNCH, unit + (5 + 17 * k) * P, P)
    g.fallocate(KEEP, 3 * unit, unit)
    g.fallocate(PUNCH, 4 * unit - P, P)
    return unit


def items(unit):
    """Pages of every kind of block: allocated pages of a whole block; an allocated page of
    a partly allocated block (its accept allocates the block's holes), then a page that was
    punched; pages of a hole, again after the hole was filled by the first of them."""
    return [0, 7 * P, unit + 9 * P, unit + 5 * P, 2 * unit + 3 * P, 2 * unit + 3 * P,
            2 * unit + 4 * P, 3 * unit, 4 * unit - P, unit - P]


@pytest.mark.parametrize("direct_map", ["keep", "no-direct-map", "on-conversion"])
@pytest.mark.parametrize("order", [0, 9])
@pytest.mark.parametrize("batch", [True, False], ids=["one-batch", "batch-per-item"])
def test_one_page_accepts_match_the_reference(order, direct_map, batch):
    size = 16 * M2
    vm, eng = engine_file(size, order, direct_map)
    ref = reference_file(size, order, direct_map)
    unit = layout(eng, order)
    layout(ref, order)
    assert_same_state(eng, ref, "after the layout")
    gpas = items(unit)
    if batch:
        res = vm.guest_accept_many(gpas, P, chunk=P)
        assert res.errno.tolist() == [0] * len(gpas)
        want = [ref.accept(a // P, a // P + 1, 1) for a in gpas]
        assert res.value.tolist() == want
    else:
        # state and counters after each item: an item that skipped the block-level work it
        # should have done (allocating the block's holes) shows at once, before a later item
        # in the same block does that work
        for a in gpas:
            res = vm.guest_accept_many([a], P, chunk=P)
            assert res.errno.tolist() == [0]
            assert res.value.tolist() == [ref.accept(a // P, a // P + 1, 1)], hex(a)
            assert_same_counters(eng, ref, naive.COUNTERS, f"order {order}, {direct_map}, at {a:#x}")
            assert eng.allocated_pages() == ref.allocated.count(True), hex(a)
    assert_same_counters(eng, ref, naive.COUNTERS, f"order {order}, {direct_map}")
    assert_same_state(eng, ref, f"order {order}, {direct_map}")
    eng.check()


def _twins(size, order, direct_map, prepare):
    out = []
    for _ in range(2):
        vm, g = engine_file(size, order, direct_map)
        prepare(g)
        out.append((vm, g))
    return out


@pytest.mark.parametrize("order, prepare", [
    # one huge page punched out of a wholly allocated 1 GiB block of 2 MiB folios: the
    # block gets a table of 2 MiB entries while its summary entry still says allocated
    (9, lambda g: (g.fallocate(KEEP, 0, G), g.fallocate(PUNCH, 3 * M2, M2))),
    # the same with one 4 KiB page punched out (the 2 MiB folio splits)
    (9, lambda g: (g.fallocate(KEEP, 0, G), g.fallocate(PUNCH, 3 * M2 + 5 * P, P))),
    # a 1 GiB folio with one page punched out, and one wholly allocated
    (18, lambda g: (g.fallocate(KEEP, 0, 2 * G), g.fallocate(PUNCH, G + 3 * M2 + 5 * P, P))),
    # a hole of 1 GiB next to a whole 1 GiB folio
    (18, lambda g: g.fallocate(KEEP, G, G)),
], ids=["2m-huge-page-punched", "2m-page-punched", "1g-page-punched", "1g-hole"])
def test_one_page_accepts_in_gigabyte_blocks_match_single_calls(order, prepare):
    size = 2 * G
    (vm, eng), (twin_vm, twin) = _twins(size, order, "on-conversion", prepare)
    # allocated pages of blocks with holes first (their accepts fill the holes), then the
    # punched pages and pages of holes
    gpas = [G + 7 * P, G + 3 * M2 + 9 * P, 3 * M2 + 6 * P, 4 * M2, 7 * P, 3 * M2 + 5 * P,
            G + 3 * M2 + 5 * P, 2 * G - P]
    for a in gpas:
        # one item a batch, compared after each: a skipped allocation shows at once
        res = vm.guest_accept_many([a], P, chunk=P)
        assert res.errno.tolist() == [0]
        assert res.value.tolist() == [twin_vm.guest_accept(a, P, chunk=P)], hex(a)
        assert eng.allocated_pages() == twin.allocated_pages(), hex(a)
        assert {k: int(v) for k, v in eng.counters.items()} == \
            {k: int(v) for k, v in twin.counters.items()}, hex(a)
    for off in (0, 3 * M2, 4 * M2, G, G + 3 * M2, 2 * G - M2):
        assert eng.folio_order(off) == twin.folio_order(off), off
        assert eng.allocated_pages(off, M2) == twin.allocated_pages(off, M2), off
    assert eng.huge_folios() == twin.huge_folios()
    d, t = eng.dump(), twin.dump()
    for key in ("allocated", "folio_order", "te_state", "guest_mapped", "direct_map_removed"):
        assert np.array_equal(np.asarray(d[key]), np.asarray(t[key])), key
    eng.check()
