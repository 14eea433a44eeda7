"""Batched calls with awkward items (bad modes, punches past the end or over pins,
unaligned or refused conversions) against the same items one call at a time on a twin:
each item's result, the counters and the state must agree."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from conftest import normalize_dump
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
                      GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM, GmemError, GuestMemfd)

P = 4096
M2 = 2 << 20
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def singly(call, items):
    err, off = [], []
    for item in items:
        try:
            call(*item)
            err.append(0)
            off.append(-1)
        except GmemError as exc:
            err.append(exc.errno)
            off.append(-1 if exc.error_offset is None else exc.error_offset)
    return err, off


def same(a, b):
    assert dict(a.counters) == dict(b.counters)
    assert normalize_dump(a.dump()) == normalize_dump(b.dump())


def pinned_file():
    g = GuestMemfd(4 * M2, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    g.fallocate(KEEP, 0, 4 * M2)
    pins = [g.pin(10 * P, 2 * P), g.pin(600 * P)]
    return g, pins


FALLOCATE_ITEMS = [
    (0, 0, P),                        # no KEEP_SIZE: EOPNOTSUPP
    (KEEP | 0x100, 0, P),             # an unknown mode bit
    (PUNCH, 3 * M2, 2 * M2),          # a punch past the end is cut at the end
    (KEEP, 3 * M2, 2 * M2),           # an allocation past the end is EINVAL
    (PUNCH, 8 * P, 8 * P),            # over a held pin
    (PUNCH, P + 1, P),                # unaligned
    (KEEP, 3 * M2, M2),               # allocates again what was punched
    (PUNCH, 512 * P, 512 * P),        # a whole 2 MiB block holding the other pin
]


def test_fallocate_many_matches_one_call_per_item():
    batch, batch_pins = pinned_file()
    single, single_pins = pinned_file()
    modes, offs, sizes = (np.array(c, np.int64) for c in zip(*FALLOCATE_ITEMS))
    res = batch.fallocate_many(modes, offs, sizes)
    err, off = singly(single.fallocate, FALLOCATE_ITEMS)
    assert res.errno.tolist() == err
    assert res.error_offset.tolist() == off
    assert err[:2] == [errno.EOPNOTSUPP] * 2 and err[3] == errno.EINVAL and err[5] == errno.EINVAL
    same(batch, single)
    # the pins the punches orphaned hold nothing in the file when released
    for pins, g in ((batch_pins, batch), (single_pins, single)):
        for pin in pins:
            pin.release()
    same(batch, single)
    assert sum(batch.dump()["pins"]) == 0


def test_refused_conversions_in_a_batch_are_each_a_call():
    batch = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP, vm_type="snp")
    single = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP, vm_type="snp")
    items = [(P + 1, P, 0), (0, P, 0), (M2, P, 0), (0, 0, 0), (2 * P, P, 0x10), (3 * P, P, 0)]
    offs, sizes, attrs = (np.array(c, np.int64) for c in zip(*items))
    res = batch.set_memory_attributes_many(offs, sizes, attrs)
    err, off = singly(single.set_memory_attributes, items)
    assert res.errno.tolist() == err
    assert err.count(errno.EINVAL) == 4
    assert batch.counters["convert_calls"] == len(items)
    assert batch.counters["convert_einval"] == 4
    same(batch, single)


def test_legacy_vm_attribute_batch_matches_one_call_per_item():
    def legacy():
        vm = VM("snp", in_place=False)
        vm.set_user_memory_region(0, 0, M2, vm.create_guest_memfd(M2))
        return vm
    batch, single = legacy(), legacy()
    items = [(0, 4 * P, PRIVATE), (P + 8, P, 0), (2 * P, P + 1, PRIVATE), (P, P, 0), (0, 0, PRIVATE),
             (1 << 60, P, PRIVATE), (8 * P, 4 * P, PRIVATE)]
    gpas, sizes, attrs = (np.array(c, np.int64) for c in zip(*items))
    res = batch.set_memory_attributes_many(gpas, sizes, attrs)
    err, off = singly(single.set_memory_attributes, items)
    assert res.errno.tolist() == err and res.errno.dtype == np.int32
    assert err.count(errno.EINVAL) >= 4
    assert batch.private_gfn_ranges() == single.private_gfn_ranges() == [(0, 1), (2, 4), (8, 12)]
    assert dict(batch.counters) == dict(single.counters)
    # a batch with every item refused
    res = batch.set_memory_attributes_many([P + 1, 3], P, 0)
    assert res.errno.tolist() == [errno.EINVAL] * 2 and res.errno.dtype == np.int32
    assert batch.private_gfn_ranges() == [(0, 1), (2, 4), (8, 12)]


def test_a_large_batch_with_one_injected_enomem_fails_the_item_it_would_one_by_one():
    """A batch large enough to be applied grouped by block must still fail exactly the
    conversion that fails when the items are applied in order."""
    rng = np.random.default_rng(3)
    pages = rng.permutation(np.arange(0, 8 * 512, 37))[:80]          # > GROUP_MIN items, out of order
    items = [(int(p) * P, P, 0) for p in pages]
    for k in (0, 5, 79):
        batch = GuestMemfd(8 * M2, GUEST_MEMFD_FLAG_MMAP)
        single = GuestMemfd(8 * M2, GUEST_MEMFD_FLAG_MMAP)
        for g in (batch, single):
            g.set_memory_attributes(items[k][0], P, 0)               # item k finds nothing to do
            g.inject_enomem(1)
        offs = np.array([o for o, _s, _a in items], np.int64)
        res = batch.set_memory_attributes_many(offs, P, 0)
        err, off = singly(single.set_memory_attributes, items)
        assert res.errno.tolist() == err, k
        assert err.count(errno.ENOMEM) == 1
        same(batch, single)


@pytest.mark.parametrize("flags", [0x1, 0x2])
def test_content_mode_flags_in_a_large_batch_are_refused_as_one_by_one(flags):
    from gmemfast import KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE, KVM_SET_MEMORY_ATTRIBUTES2_ZERO
    flag = (KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE, KVM_SET_MEMORY_ATTRIBUTES2_ZERO)[flags - 1]
    # enough items that the batch is checked as arrays, not call by call
    items = [(k * P, P, PRIVATE if k % 2 else 0, flag) for k in range(80)]
    for vm_type in ("sw-protected", "snp"):
        batch = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP, vm_type=vm_type)
        single = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP, vm_type=vm_type)
        offs, sizes, attrs, fl = (np.array(c, np.int64) for c in zip(*items))
        res = batch.set_memory_attributes_many(offs, sizes, attrs, fl)
        err, off = singly(single.set_memory_attributes, items)
        assert res.errno.tolist() == err, vm_type
        if flag == KVM_SET_MEMORY_ATTRIBUTES2_ZERO:
            assert err[1] == err[3] == errno.EOPNOTSUPP and err[0] == err[2] == 0
        same(batch, single)


def test_a_grouped_batch_on_a_file_ending_one_page_into_a_block():
    size = 3 * M2 + P                                                # 1537 pages: the last block holds one
    rng = np.random.default_rng(5)
    pages = rng.permutation(np.arange(size // P))[:100]
    pages[7] = size // P - 1
    items = [(int(p) * P, P, PRIVATE if k % 3 == 0 else 0) for k, p in enumerate(pages)]
    batch = GuestMemfd(size, GUEST_MEMFD_FLAG_MMAP)
    single = GuestMemfd(size, GUEST_MEMFD_FLAG_MMAP)
    offs, sizes, attrs = (np.array(c, np.int64) for c in zip(*items))
    res = batch.set_memory_attributes_many(offs, sizes, attrs)
    err, _off = singly(single.set_memory_attributes, items)
    assert res.errno.tolist() == err == [0] * len(items)
    assert not batch.is_private(size - P)
    same(batch, single)


def test_a_batched_punch_far_past_the_end_is_cut_at_the_end():
    items = [(PUNCH, 0, 4 << 30), (KEEP, 0, M2), (PUNCH, M2 - P, 1 << 40)]
    batch, single = GuestMemfd(4 * M2, GUEST_MEMFD_FLAG_MMAP), GuestMemfd(4 * M2, GUEST_MEMFD_FLAG_MMAP)
    for g in (batch, single):
        g.fallocate(KEEP, 0, 4 * M2)
    modes, offs, sizes = (np.array(c, np.int64) for c in zip(*items))
    res = batch.fallocate_many(modes, offs, sizes)
    err, _off = singly(single.fallocate, items)
    assert res.errno.tolist() == err == [0, 0, 0]
    assert batch.allocated_pages() == M2 // P - 1
    same(batch, single)


def scattered_shared(order=0):
    """A private, allocated 64 MiB file with three shared pages in each 2 MiB block (few
    enough to be exceptions of its entry, no page table): one pinned, one written through
    the host mapping."""
    from gmemfast import GUEST_MEMFD_FLAG_HUGETLB
    flags = GUEST_MEMFD_FLAG_MMAP | (GUEST_MEMFD_FLAG_HUGETLB if order else 0)
    g = GuestMemfd(32 * M2, flags, page_order=order)
    g.fallocate(KEEP, 0, 32 * M2)
    pages = np.array([b * 512 + q for b in range(32) for q in (7, 100, 300)])
    pages = pages[np.random.default_rng(7).permutation(len(pages))]
    for p in pages.tolist():
        g.set_memory_attributes(p * P, P, 0)
    pin = g.pin(int(pages[5]) * P)
    g.host_write(int(pages[9]) * P, b"host")
    return g, pages, pin


@pytest.mark.parametrize("order", [0, 9])
def test_one_page_batch_to_private_over_a_pinned_and_a_host_mapped_page(order):
    """A batch of one-page conversions to private meets a pinned page (EAGAIN, nothing
    changes there) and a host-mapped one (unmapped first): as one call per item."""
    batch, pages, _pin = scattered_shared(order)
    twin, _pages, _pin2 = scattered_shared(order)
    offs = pages * P
    r = batch.set_memory_attributes_many(offs, P, PRIVATE)
    err, off = singly(lambda o: twin.set_memory_attributes(o, P, PRIVATE), [(int(o),) for o in offs])
    assert list(r.errno) == err and list(r.error_offset) == off
    assert err[5] == errno.EAGAIN and err.count(0) == len(err) - 1
    assert not batch.is_private(int(offs[5])) and batch.is_private(int(offs[9]))
    same(batch, twin)


def test_a_batch_whose_items_all_span_blocks_keeps_their_order():
    """Items that each cross a 2 MiB boundary and overlap their neighbours, with opposite
    attributes, in descending order: the result is that of applying them in order."""
    from gmemfast import GUEST_MEMFD_FLAG_HUGETLB
    def make():
        g = GuestMemfd(160 * M2, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB, page_order=9)
        g.fallocate(KEEP, 0, 160 * M2)
        return g
    batch, twin = make(), make()
    k = np.arange(150, 0, -1)
    offs = k * M2 - M2 // 2                  # [2k-0.5, 2k+1.5) MiB: spans the boundary at 2k MiB
    sizes = np.full(len(k), M2 * 3 // 2)     # ... and overlaps the next item down by half a MiB
    attrs = np.where(k % 2 == 0, PRIVATE, 0)
    r = batch.set_memory_attributes_many(offs, sizes, attrs)
    for o, s, a in zip(offs.tolist(), sizes.tolist(), attrs.tolist()):
        twin.set_memory_attributes(o, s, a)
    assert not r.errno.any()
    same(batch, twin)
