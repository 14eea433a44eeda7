"""Batches of one-page conversions with one attribute value (the SWIOTLB shape): the
engine converts them grouped by 1 GiB block, in place where it can, and falls back to its
general path where it must. Each case is compared with the reference model applying the
same items one call at a time, in order: every item's errno and error offset, then the
whole state and every counter. (tests/test_stateful.py drives the same path at random.)
"""
from __future__ import annotations

import numpy as np
import pytest

import gmemfast
import naive
from conftest import assert_same_counters, assert_same_state

PS = 4096
PRIVATE = gmemfast.KVM_MEMORY_ATTRIBUTE_PRIVATE
KEEP = gmemfast.FALLOC_FL_KEEP_SIZE
MMAP = gmemfast.GUEST_MEMFD_FLAG_MMAP
HUGETLB = gmemfast.GUEST_MEMFD_FLAG_HUGETLB


def _both(size, flags, **kw):
    return (gmemfast.GuestMemfd(size, flags, **kw), naive.GuestMemfd(size, flags, **kw))


def _batch(eng, ref, offsets, attr, flags=0, *, sizes=PS, expect_in_place=None):
    taken = []
    store = eng.store

    def spy(*args, _inner=store.convert_pages):
        taken.append(_inner(*args))
        return taken[-1]
    store.convert_pages = spy
    try:
        e = eng.set_memory_attributes_many(np.asarray(offsets, np.int64), sizes, attr, flags)
    finally:
        del store.convert_pages
    as_ref = [(v.tolist() if isinstance(v, np.ndarray) else v) for v in (sizes, attr, flags)]
    r = ref.set_memory_attributes_many(list(offsets), *as_ref)
    assert [int(x) for x in e.errno] == r.errno
    assert [int(x) for x in e.error_offset] == r.error_offset
    assert_same_state(eng, ref)
    assert_same_counters(eng, ref, naive.COUNTERS)
    eng.check()
    if expect_in_place is not None:
        assert (taken == [True]) == expect_in_place, taken
    return r


def _pages(rng, npages, n, *, repeat=0):
    pages = rng.choice(npages, n, replace=False)
    if repeat:
        pages = np.concatenate([pages, rng.choice(pages, repeat)])   # some pages twice
        rng.shuffle(pages)
    return pages


@pytest.mark.parametrize("order,vm_type,dmap", [
    (18, "sw-protected", "keep"),
    (18, "snp", "keep"),
    (18, "tdx", "on-conversion"),
    (9, "snp", "keep"),
    (0, "sw-protected", "no-direct-map"),
])
def test_random_pages_there_and_back(order, vm_type, dmap):
    """Random pages of a 2 GiB file (two 1 GiB blocks) to shared and back, more than once:
    huge folios split and merge, 2 MiB entries gain and lose exceptions and page tables."""
    size = 2 << 30
    flags = MMAP | (HUGETLB if order else 0)
    eng, ref = _both(size, flags, page_order=order, vm_type=vm_type, direct_map=dmap)
    for g in (eng, ref):
        g.fallocate(KEEP, 0, size)
    rng = np.random.default_rng(order + len(vm_type))
    npages = size // PS
    # dense in one 2 MiB block (a page table), sparse elsewhere (exceptions)
    pages = np.concatenate([_pages(rng, npages, 300, repeat=20), 512 * 77 + np.arange(0, 40, 3)])
    rng.shuffle(pages)
    for _ in range(2):
        _batch(eng, ref, pages * PS, 0, expect_in_place=True)
        _batch(eng, ref, pages * PS, PRIVATE, expect_in_place=True)
    _batch(eng, ref, pages[::2] * PS, 0, expect_in_place=True)
    _batch(eng, ref, pages * PS, 0, expect_in_place=True)          # half of them no-ops


def test_pins_host_mappings_and_stored_bytes():
    """Pinned pages (EAGAIN, each its own offset), host-mapped pages and pages holding bytes
    in a batch converted in place: those items take the general path, in their order."""
    size = 1 << 30
    eng, ref = _both(size, MMAP, page_order=0, vm_type="snp")     # converted pages zeroed
    pages = np.arange(5, 5 + 64 * 37, 37)
    for g in (eng, ref):
        g.fallocate(KEEP, 0, size)
        g.set_memory_attributes_many(list(pages * PS), PS, 0)
        g.host_write(int(pages[3]) * PS, b"bytes")
        g.host_read(int(pages[9]) * PS, 10)
    pins = [(g.pin(int(pages[p]) * PS)) for g in (eng, ref) for p in (4, 20)]
    r = _batch(eng, ref, np.concatenate([pages, pages[:5]]) * PS, PRIVATE, expect_in_place=True)
    assert r.errno.count(11) == 3       # EAGAIN: the two pinned pages, the first one twice
    for pin in pins:
        pin.release()
    _batch(eng, ref, pages * PS, PRIVATE, expect_in_place=True)


@pytest.mark.parametrize("case", ["limit", "enomem", "unaligned", "past_end"])
def test_batches_that_fall_back(case):
    """A metadata limit, injected ENOMEM or an invalid offset: the general path (the same
    results item by item), and in place again once nothing order-dependent is left."""
    size = 64 << 20
    kw = {"metadata_limit": 5} if case == "limit" else {}
    eng, ref = _both(size, MMAP, page_order=0, vm_type="snp", **kw)
    for g in (eng, ref):
        g.fallocate(KEEP, 0, size)
    pages = np.random.default_rng(3).choice(size // PS, 80, replace=False)
    offsets = pages * PS
    if case == "enomem":
        eng.inject_enomem(3)
        ref.inject_enomem(3)
    elif case == "unaligned":
        offsets[7] += 8
    elif case == "past_end":
        offsets[-1] = size
    r = _batch(eng, ref, offsets, 0, expect_in_place=False)
    failed = {"limit": 12, "enomem": 12, "unaligned": 22, "past_end": 22}[case]
    assert failed in r.errno                    # ENOMEM or EINVAL, for some items only
    assert 0 in r.errno
    _batch(eng, ref, pages * PS, PRIVATE, expect_in_place=case != "limit")


@pytest.mark.parametrize("shape,in_place", [
    ("arrays of one value", True),
    ("two sizes", False),
    ("two attributes", False),
    ("two flags", False),
    ("too few items", False),
])
def test_argument_shapes(shape, in_place):
    """Sizes, attributes and flags given as arrays holding one value take the same path as
    scalars; arrays of different values, or a batch below the grouping threshold, the
    general one. The same results either way."""
    size = 64 << 20
    eng, ref = _both(size, MMAP, page_order=0, vm_type="sw-protected")
    pages = np.random.default_rng(5).choice(size // PS, 100 if shape != "too few items" else 20,
                                            replace=False)
    n = len(pages)
    sizes, attrs, flags = np.full(n, PS), np.zeros(n, np.int64), np.zeros(n, np.int64)
    if shape == "two sizes":
        sizes[-1] = 2 * PS
    elif shape == "two attributes":
        attrs[0] = PRIVATE
    elif shape == "two flags":
        flags[50] = gmemfast.KVM_SET_MEMORY_ATTRIBUTES2_ZERO
    _batch(eng, ref, pages * PS, attrs, flags, sizes=sizes, expect_in_place=in_place)
    _batch(eng, ref, pages * PS, PRIVATE, expect_in_place=shape != "too few items")
