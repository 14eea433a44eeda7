"""``VM.guest_accept_many`` over a guest with several memslots, gaps, ordinary memory, a
1 GiB huge-folio file and shared pages: each item's result, the counters and every file's
state must be what the same items give one :meth:`VM.guest_accept` call at a time on a
twin VM (the batched form's fast paths against its plain definition)."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from conftest import normalize_dump
from gmemfast import (GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM,
                      GmemError, MemoryFaultExit, MmioExit)

P = 4096
M = 1 << 20
G = 1 << 30
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def guest(vm_type, in_place):
    """Ordinary memory at [4M, 8M); a 16M file at [16M, 24M) (its offset 0) and [32M, 40M)
    (its offset 8M); a 1 GiB huge-folio file at [1G, 2G). One page of each file shared."""
    vm = VM(vm_type, in_place=in_place)
    flags = GUEST_MEMFD_FLAG_MMAP if in_place else 0
    a = vm.create_guest_memfd(16 * M, flags)
    b = vm.create_guest_memfd(G, flags | GUEST_MEMFD_FLAG_HUGETLB, page_order=18)
    vm.set_user_memory_region(0, 4 * M, 4 * M, None)
    vm.set_user_memory_region(1, 16 * M, 8 * M, a)
    vm.set_user_memory_region(2, 32 * M, 8 * M, a, gmem_offset=8 * M)
    vm.set_user_memory_region(3, G, G, b)
    if in_place:
        a.set_memory_attributes(9 * M + 3 * P, P, 0)                  # gpa 33M + 3 pages
        b.set_memory_attributes(64 * M, P, 0)                        # gpa 1G + 64M
    else:
        for gpa, size in ((16 * M, 8 * M), (32 * M, 8 * M), (G, G)):
            vm.set_memory_attributes(gpa, size, PRIVATE)
        vm.set_memory_attributes(33 * M + 3 * P, P, 0)
        vm.set_memory_attributes(G + 64 * M, P, 0)
    return vm


ITEMS = [
    (0, 2 * M),                   # below every memslot
    (4 * M, 2 * M),               # ordinary memory
    (12 * M, 2 * M),              # a gap
    (16 * M, 4 * M),              # file a, first memslot
    (22 * M, 4 * M),              # runs past the memslot into a gap
    (16 * M + P, P),              # not chunk aligned (with 2 MiB chunks)
    (32 * M, 2 * M),              # file a, second memslot: holds a shared page
    (34 * M, 4 * M),
    (38 * M, 4 * M),              # runs past the second memslot
    (16 * M, 2 * M),              # again: already accepted
    (G, 8 * M),                   # the 1 GiB file
    (G + 64 * M, 2 * M),          # its shared page
    (2 * G - 2 * M, 4 * M),       # past its end
    (0, 0),                       # size 0
]


def one_by_one(vm, items, **kw):
    err, off, val = [], [], []
    for gpa, size in items:
        try:
            val.append(vm.guest_accept(gpa, size, **kw))
            err.append(0)
            off.append(-1)
        except GmemError as exc:
            err.append(exc.errno)
            off.append(-1 if exc.error_offset is None else exc.error_offset)
            val.append(0)
        except (MemoryFaultExit, MmioExit) as exc:
            err.append(errno.EFAULT)
            off.append(exc.gpa)
            val.append(0)
    return err, off, val


def same_guest(a, b):
    assert dict(a.counters) == dict(b.counters)
    for ga, gb in zip(a.gmems, b.gmems):
        assert normalize_dump(ga.dump()) == normalize_dump(gb.dump())


@pytest.mark.parametrize("vm_type, in_place", [("snp", True), ("tdx", True), ("snp", False), ("tdx", False)])
@pytest.mark.parametrize("chunk, mapping", [(2 * M, None), (P, None), (2 * M, G)])
def test_batch_matches_one_call_per_item(vm_type, in_place, chunk, mapping):
    batch, single = guest(vm_type, in_place), guest(vm_type, in_place)
    gpas = np.array([g for g, _ in ITEMS], np.int64)
    sizes = np.array([s for _, s in ITEMS], np.int64)
    res = batch.guest_accept_many(gpas, sizes, chunk=chunk, mapping=mapping)
    err, off, val = one_by_one(single, ITEMS, chunk=chunk, mapping=mapping)
    assert res.errno.tolist() == err
    assert res.error_offset.tolist() == off
    assert res.value.tolist() == val and res.value.dtype == np.int64
    assert err[:3] == [errno.EFAULT] * 3 and off[:3] == [0, 4 * M, 12 * M]
    assert err[4] == errno.EFAULT and off[4] == 24 * M
    if chunk == 2 * M:
        assert err[5] == errno.EINVAL
    assert err[6] == errno.EFAULT and off[6] == 33 * M + 3 * P
    assert err[-1] == errno.EINVAL
    same_guest(batch, single)


@pytest.mark.parametrize("vm_type, in_place", [("snp", True), ("tdx", False)])
def test_a_batch_wholly_in_a_later_memslot_is_accepted(vm_type, in_place):
    batch, single = guest(vm_type, in_place), guest(vm_type, in_place)
    items = [(G, 4 * M), (G + 16 * M, 2 * M)]
    res = batch.guest_accept_many([g for g, _ in items], [s for _, s in items])
    err, off, val = one_by_one(single, items)
    assert res.errno.tolist() == err == [0, 0]
    assert res.value.tolist() == val and min(val) > 0
    same_guest(batch, single)
