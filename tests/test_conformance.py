"""Kernel selftest behaviours, one test per case, named after the selftest it mirrors.

File-level cases (guest_memfd_test.c) run against the engine AND the naive reference
(so the reference is itself checked against the kernel's behaviour); the conversion cases
(guest_memfd_conversions_test.c) run on the engine through a sw-protected VM with the
guest_memfd at GPA 4 GiB, as the selftest sets them up.
"""
from __future__ import annotations

import errno

import pytest

import naive
from conftest import normalize_dump

gmemfast = pytest.importorskip("gmemfast")
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,  # noqa: E402
                      GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_INIT_SHARED,
                      GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
                      KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
                      PAGE_SIZE, VM, GmemError, MemoryFaultExit, MmioExit, SigBusError)

PS = PAGE_SIZE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE
MMAP = GUEST_MEMFD_FLAG_MMAP
SHARED = GUEST_MEMFD_FLAG_INIT_SHARED
GPA = 4 << 30


@pytest.fixture(params=["engine", "naive"])
def GM(request):
    """The GuestMemfd class under test: the engine's, or the reference's."""
    return gmemfast.GuestMemfd if request.param == "engine" else naive.GuestMemfd


def expect_errno(err, fn, *args, **kwargs):
    with pytest.raises(GmemError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"expected {errno.errorcode[err]}, got {info.value!r}"
    return info.value


def expect_sigbus(fn, *args):
    with pytest.raises(SigBusError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------- creation / file
def test_flags(GM):
    """Every known flag alone is valid (HUGETLB with its page order); unknown bits are EINVAL."""
    known = {MMAP, SHARED, GUEST_MEMFD_FLAG_NO_DIRECT_MAP}
    for bit in range(64):
        flag = 1 << bit
        if flag in known:
            g = GM(PS, flag)
            assert g.flags == flag
        elif flag == GUEST_MEMFD_FLAG_HUGETLB:
            expect_errno(errno.EINVAL, GM, PS, flag)           # needs page_order 9 or 18
            assert GM(2 << 20, flag, page_order=9).page_order == 9
        else:
            expect_errno(errno.EINVAL, GM, PS, flag)


def test_flags_in_any_combination(GM):
    """Every combination of the known flags creates a file; INIT_SHARED starts it shared,
    with or without MMAP; HUGETLB | INIT_SHARED blocks split when allocated."""
    import itertools
    flags = (MMAP, SHARED, GUEST_MEMFD_FLAG_NO_DIRECT_MAP, GUEST_MEMFD_FLAG_HUGETLB)
    for n in range(len(flags) + 1):
        for combo in itertools.combinations(flags, n):
            f = sum(combo)
            order = 9 if f & GUEST_MEMFD_FLAG_HUGETLB else 0
            g = GM(2 << 20, f, page_order=order)
            assert g.flags == f
            assert g.private_pages() == (0 if f & SHARED else 512)
    g = GM(2 << 20, GUEST_MEMFD_FLAG_HUGETLB | SHARED, page_order=9)
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 2 << 20)
    assert g.folio_order(0) == 0                  # a shared block is split at once
    g.set_memory_attributes(0, 2 << 20, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert g.folio_order(0) == 9                  # and merges when wholly private
    g = GM(PS, SHARED)                            # shared, but the host cannot map it
    with pytest.raises(GmemError) as info:
        g.host_read(0, 1)
    assert info.value.errno == errno.ENODEV


def test_invalid_sizes(GM):
    for size in range(1, PS):
        expect_errno(errno.EINVAL, GM, size)
    for size in (0, PS + 1, 2 * PS - 1):
        expect_errno(errno.EINVAL, GM, size)
    for size in (PS, 3 << 20, (1 << 20) - PS):
        expect_errno(errno.EINVAL, GM, size, GUEST_MEMFD_FLAG_HUGETLB, page_order=9)


def test_multiple(GM):
    a = GM(PS, MMAP | SHARED)
    b = GM(4 * PS, MMAP | SHARED)
    assert (a.size, b.size) == (PS, 4 * PS)
    assert (a.nr_pages, b.nr_pages) == (1, 4)
    b.host_write(0, b"\x5a" * PS)
    b.fallocate(KEEP, 0, 4 * PS)
    b.set_memory_attributes(PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert a.folio_order(0) == -1 and b.folio_order(0) == 0
    assert a.host_read(0, PS) == bytes(PS)
    assert not a.is_private(0) and b.is_private(PS) and not b.is_private(0)
    a.fallocate(KEEP | PUNCH, 0, PS)
    assert b.host_read(0, PS) == b"\x5a" * PS


def test_file_size(GM):
    for pages in (1, 3, 512, 4097):
        g = GM(pages * PS, MMAP)
        assert g.size == pages * PS
        assert g.nr_pages == pages
    assert PAGE_SIZE == 4096
    g = GM(2 << 20, GUEST_MEMFD_FLAG_HUGETLB, page_order=9)
    assert g.size == 2 << 20 and g.nr_pages == 512 and g.page_order == 9


def test_fallocate(GM):
    total = 4 * PS
    g = GM(total, MMAP)
    g.fallocate(KEEP, 0, total)
    expect_errno(errno.EOPNOTSUPP, g.fallocate, 0, 0, total)
    expect_errno(errno.EOPNOTSUPP, g.fallocate, PUNCH, 0, PS)
    expect_errno(errno.EINVAL, g.fallocate, KEEP | PUNCH, PS - 1, PS)
    expect_errno(errno.EINVAL, g.fallocate, KEEP | PUNCH, PS, PS - 1)
    expect_errno(errno.EINVAL, g.fallocate, KEEP, total, PS)
    expect_errno(errno.EINVAL, g.fallocate, KEEP, total + PS, PS)
    expect_errno(errno.EINVAL, g.fallocate, KEEP, total - PS, 2 * PS)
    g.fallocate(KEEP | PUNCH, total, PS)
    g.fallocate(KEEP | PUNCH, total + PS, PS)
    g.fallocate(KEEP | PUNCH, PS, PS)
    assert g.folio_order(PS) == -1 and g.folio_order(0) == 0
    g.fallocate(KEEP, PS, PS)
    assert g.folio_order(PS) == 0


def test_invalid_punch_hole(GM):
    g = GM(4 * PS, MMAP)
    cases = [(0, 1), (0, PS - 1), (0, PS + 1),
             (1, 1), (1, PS - 1), (1, PS), (1, PS + 1),
             (PS, 1), (PS, PS - 1), (PS, PS + 1)]
    for offset, length in cases:
        expect_errno(errno.EINVAL, g.fallocate, KEEP | PUNCH, offset, length)


def test_mmap_not_supported(GM):
    g = GM(4 * PS, 0)
    expect_errno(errno.ENODEV, g.host_read, 0, 1)
    expect_errno(errno.ENODEV, g.host_write, 0, b"x")
    if hasattr(g, "mmap"):
        expect_errno(errno.ENODEV, g.mmap)
    # a SIGBUS would be the wrong error: the mapping itself is refused
    with pytest.raises(GmemError) as info:
        g.host_read(0, PS)
    assert not isinstance(info.value, SigBusError)


# ------------------------------------------------------------------ host mapping
def test_mmap_supported(GM):
    total = 4 * PS
    g = GM(total, MMAP | SHARED)
    g.host_write(0, b"\xaa" * total)
    assert g.host_read(0, total) == b"\xaa" * total
    g.fallocate(KEEP | PUNCH, 0, PS)
    assert g.host_read(0, PS) == bytes(PS)
    assert g.host_read(PS, total - PS) == b"\xaa" * (total - PS)
    g.host_write(0, b"\xaa" * PS)
    assert g.host_read(0, total) == b"\xaa" * total


def test_fault_overflow(GM):
    total = 4 * PS
    g = GM(total, MMAP | SHARED)
    g.host_write(0, b"\xaa" * total)
    for offset in (total, total + 1, total + PS, 3 * total):
        assert expect_sigbus(g.host_write, offset, b"\x55").error_offset == offset - offset % PS
        assert expect_sigbus(g.host_read, offset, 1).error_offset == offset - offset % PS
    # an access straddling the end faults on the first page past it
    assert expect_sigbus(g.host_read, total - 8, 16).error_offset == total
    assert g.host_read(0, total) == b"\xaa" * total


def test_fault_private(GM):
    total = 4 * PS
    g = GM(total, MMAP)
    for page in range(4):
        assert expect_sigbus(g.host_read, page * PS, 1).error_offset == page * PS
        assert expect_sigbus(g.host_write, page * PS + 7, b"\x01").error_offset == page * PS
    assert all(not a for a in normalize_dump(g.dump())["allocated"])


# ------------------------------------------------------------------ conversions
@pytest.fixture(params=[0, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE], ids=["default", "preserve"])
def content_mode(request):
    return request.param


class Conv:
    """guest_memfd_conversions_test.c's fixture: sw-protected VM, gmem at GPA 4 GiB."""

    def __init__(self, nr_pages, flags, content_mode=0):
        self.vm = VM("sw-protected")
        self.gmem = self.vm.create_guest_memfd(nr_pages * PS, flags | MMAP)
        self.vm.set_user_memory_region(0, GPA, nr_pages * PS, self.gmem)
        self.nr_pages = nr_pages
        self.mode = content_mode

    def host_rmw(self, pgoff, expected, write, mem=None):
        mem = mem if mem is not None else self.gmem
        read = mem.host_read if mem is self.gmem else mem.read
        wr = mem.host_write if mem is self.gmem else mem.write
        assert read(pgoff * PS, 1) == bytes([expected]), f"host read of page {pgoff}"
        wr(pgoff * PS, bytes([write]))

    def guest_rmw(self, pgoff, expected, write, private):
        gpa = GPA + pgoff * PS
        assert self.vm.guest_read(gpa, 1, private=private) == bytes([expected]), \
            f"guest read of page {pgoff}"
        self.vm.guest_write(gpa, bytes([write]), private=private)

    def test_private(self, pgoff, starting, write):
        expect_sigbus(self.gmem.host_write, pgoff * PS, bytes([write]))
        self.guest_rmw(pgoff, starting, write, private=True)
        expect_sigbus(self.gmem.host_read, pgoff * PS, 1)

    def test_shared(self, pgoff, starting, host_write, write):
        self.host_rmw(pgoff, starting, host_write)
        self.guest_rmw(pgoff, host_write, write, private=False)
        assert self.gmem.host_read(pgoff * PS, 1) == bytes([write])

    def set_private(self, pgoff, npages=1):
        self.gmem.set_memory_attributes(pgoff * PS, npages * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                        self.mode)

    def set_shared(self, pgoff, npages=1):
        self.gmem.set_memory_attributes(pgoff * PS, npages * PS, 0, self.mode)

    def convert_to_private(self, pgoff, starting, write):
        self.set_private(pgoff)
        self.test_private(pgoff, starting, write)

    def convert_to_shared(self, pgoff, starting, host_write, write):
        self.set_shared(pgoff)
        self.test_shared(pgoff, starting, host_write, write)

    def convert_to_private_fails(self, pgoff, npages, expected_error_offset):
        err = expect_errno(errno.EAGAIN, self.set_private, pgoff, npages)
        assert err.error_offset == expected_error_offset


def test_init_private(content_mode):
    t = Conv(1, 0, content_mode)
    t.test_private(0, 0, ord("A"))
    t.convert_to_shared(0, ord("A"), ord("B"), ord("C"))
    t.convert_to_private(0, ord("C"), ord("E"))


def test_init_shared(content_mode):
    t = Conv(1, SHARED, content_mode)
    t.test_shared(0, 0, ord("A"), ord("B"))
    t.convert_to_private(0, ord("B"), ord("C"))
    t.convert_to_shared(0, ord("C"), ord("D"), ord("E"))


def test_indexing(content_mode):
    nr = 4
    for test_page in range(nr):
        t = Conv(nr, SHARED, content_mode)

        def c(x, n):
            return ((x << 4) + n) & 0xFF

        for i in reversed(range(nr)):
            t.test_shared(i, 0, c(i, 0), c(i, 2))
        t.convert_to_private(test_page, c(test_page, 2), c(test_page, 3))
        for i in range(nr):
            if i == test_page:
                t.test_private(i, c(i, 3), c(i, 4))
            else:
                t.test_shared(i, c(i, 2), c(i, 3), c(i, 4))
        t.convert_to_shared(test_page, c(test_page, 4), c(test_page, 5), c(test_page, 6))
        for i in range(nr):
            expected = c(test_page, 6) if i == test_page else c(i, 4)
            t.test_shared(i, expected, c(i, 7), c(i, 8))


def test_before_allocation_shared(content_mode):
    t = Conv(1, SHARED, content_mode)
    t.convert_to_private(0, 0, ord("A"))


def test_before_allocation_private(content_mode):
    t = Conv(1, 0, content_mode)
    t.convert_to_shared(0, 0, ord("A"), ord("B"))


def test_unallocated_folios(content_mode):
    nr, second = 8, 4
    A, B, C, D = (ord(x) for x in "ABCD")
    for test_page in range(nr):
        t = Conv(nr, SHARED, content_mode)
        t.host_rmw(test_page, 0, A)
        if test_page != second:
            t.host_rmw(second, 0, A)
        t.set_private(0, nr)
        for i in range(nr):
            t.test_private(i, A if i in (test_page, second) else 0, B)
        for i in range(nr):
            t.convert_to_shared(i, B, C, D)


def test_truncate(content_mode):
    A, B = ord("A"), ord("B")
    t = Conv(1, SHARED, content_mode)
    t.host_rmw(0, 0, A)
    t.gmem.fallocate(KEEP | PUNCH, 0, PS)
    t.host_rmw(0, 0, A)                         # punched: zero again, still shared
    t.convert_to_private(0, A, B)
    t.gmem.fallocate(KEEP | PUNCH, 0, PS)
    t.test_private(0, 0, A)                     # punched: zero again, still private
    assert t.gmem.is_private(0)


def test_forked_accesses(content_mode):
    t = Conv(1, SHARED, content_mode)
    child = t.gmem.mmap()                       # the forked child's mapping
    t.test_shared(0, 0, 0xA, 0xB)
    t.host_rmw(0, 0xB, 0xC, mem=child)          # the child maps the page too
    t.convert_to_private(0, 0xC, 0xD)
    assert expect_sigbus(child.read, 0, 1).error_offset == 0
    assert expect_sigbus(child.write, 0, b"\xdd").error_offset == 0
    assert not any(normalize_dump(t.gmem.dump())["host_mapped"])


def test_elevated_refcount(content_mode):
    nr = 4
    A, B, C, D = (ord(x) for x in "ABCD")
    for test_page in range(nr):
        t = Conv(nr, SHARED, content_mode)
        pin = t.gmem.pin(test_page * PS, PS)
        for i in range(nr):
            t.test_shared(i, 0, A, B)
        t.convert_to_private_fails(0, nr, test_page * PS)
        for i in range(nr):
            if i == test_page:
                t.convert_to_private_fails(i, 1, test_page * PS)
            else:
                t.convert_to_private(i, B, C)
        pin.release()
        t.set_private(0, nr)
        for i in range(nr):
            t.test_private(i, B if i == test_page else C, D)


def test_memory_fault_exits():
    t = Conv(4, SHARED)
    t.gmem.host_write(0, b"S" * (4 * PS))
    t.set_private(2)
    before = normalize_dump(t.gmem.dump())
    # the guest asks for private on a shared page
    with pytest.raises(MemoryFaultExit) as info:
        t.vm.guest_read(GPA + PS, 8, private=True)
    assert (info.value.gpa, info.value.private) == (GPA + PS, True)
    assert info.value.size >= 8
    # ... and for shared on a private page
    with pytest.raises(MemoryFaultExit) as info:
        t.vm.guest_write(GPA + 2 * PS + 16, b"x", private=False)
    # KVM reports the faulting gfn's address; the exact gpa is as good
    assert info.value.gpa in (GPA + 2 * PS + 16, GPA + 2 * PS) and not info.value.private
    # no memslot: MMIO
    for gpa in (GPA - PS, GPA + 4 * PS, 0):
        with pytest.raises(MmioExit) as info:
            t.vm.guest_read(gpa, 1, private=False)
        assert info.value.gpa == gpa
    assert normalize_dump(t.gmem.dump()) == before
    # matching views succeed
    assert t.vm.guest_read(GPA, 1, private=False) == b"S"
    t.vm.guest_write(GPA + 2 * PS, b"P", private=True)
    assert t.vm.guest_read(GPA + 2 * PS, 1, private=True) == b"P"


# ------------------------------------------------------------------ memslots and exits
@pytest.mark.parametrize("in_place", [True, False])
def test_private_access_memslot_deleted(in_place):
    """private_mem_kvm_exits_test: the guest's private page loses its memslot. In place
    the GPA is plain MMIO; in legacy mode the GFN is still private in the VM's attributes,
    and emulated MMIO on private memory is not allowed: a memory-fault exit."""
    vm = VM("sw-protected", in_place=in_place)
    g = vm.create_guest_memfd(4 * PS, MMAP)
    vm.set_user_memory_region(0, GPA, 4 * PS, g)
    if not in_place:
        vm.set_memory_attributes(GPA, 4 * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.guest_write(GPA + PS, b"p", private=True)
    vm.set_user_memory_region(0, GPA, 0, None)            # delete the slot
    if in_place:
        with pytest.raises(MmioExit) as info:
            vm.guest_read(GPA + PS + 8, 1, private=True)
        assert info.value.gpa == GPA + PS + 8
    else:
        with pytest.raises(MemoryFaultExit) as info:
            vm.guest_read(GPA + PS + 8, 1, private=True)
        assert (info.value.gpa, info.value.size, info.value.private) == (GPA + PS, PS, True)
        with pytest.raises(MemoryFaultExit) as info:       # whatever the guest asked for
            vm.guest_read(GPA + PS, 1, private=False)
        assert info.value.private


@pytest.mark.parametrize("in_place", [True, False])
def test_private_access_memslot_not_private(in_place):
    """private_mem_kvm_exits_test: a memslot without a guest_memfd is host memory, always
    shared; a private access there is a memory-fault exit, even when (legacy mode) the VM's
    attributes call the GFN private."""
    vm = VM("sw-protected", in_place=in_place)
    vm.set_user_memory_region(1, GPA, 2 * PS, None)
    vm.guest_write(GPA, b"shared", private=False)
    assert vm.guest_read(GPA, 6, private=False) == b"shared"
    with pytest.raises(MemoryFaultExit) as info:
        vm.guest_read(GPA + 10, 1, private=True)
    assert (info.value.gpa, info.value.size, info.value.private) == (GPA, PS, True)
    if not in_place:
        vm.set_memory_attributes(GPA, 2 * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)   # allowed
        with pytest.raises(MemoryFaultExit) as info:
            vm.guest_read(GPA, 1, private=True)
        assert info.value.private
        with pytest.raises(MemoryFaultExit) as info:
            vm.guest_read(GPA, 1, private=False)
        assert not info.value.private
    else:
        with pytest.raises(GmemError) as info:
            vm.set_memory_attributes(GPA, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        assert info.value.errno == errno.EINVAL


def test_set_user_memory_region_rules():
    """KVM_SET_USER_MEMORY_REGION2 as KVM checks it (kvm_set_memory_region, kvm_gmem_bind)."""
    vm = VM("sw-protected")
    g = vm.create_guest_memfd(16 * PS, MMAP | SHARED)
    other = VM("sw-protected").create_guest_memfd(16 * PS, MMAP)
    einval = [
        (1 << 15, GPA, PS, g, 0),                # slot id out of range
        (0, GPA + 1, PS, g, 0),                  # unaligned gpa
        (0, GPA, PS + 1, g, 0),                  # unaligned size
        (0, GPA, PS, g, 100),                    # unaligned file offset
        (0, GPA, 17 * PS, g, 0),                 # past the end of the file
        (0, GPA, 2 * PS, g, 15 * PS),
        (0, GPA, PS, other, 0),                  # another VM's file
        (0, GPA, 0, None, 0),                    # deleting a slot that does not exist
    ]
    for args in einval:
        expect_errno(errno.EINVAL, vm.set_user_memory_region, *args)
    assert vm.memslots == {}
    vm.set_user_memory_region(0, GPA, 8 * PS, g, 0)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 1, 2 * GPA, 4 * PS, g, 4 * PS)  # bound twice
    expect_errno(errno.EEXIST, vm.set_user_memory_region, 1, GPA + 4 * PS, 8 * PS, g, 8 * PS)  # overlap
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 2 * GPA, 8 * PS, g, 0)   # move
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, GPA, 4 * PS, g, 0)       # resize
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, GPA, 8 * PS, g, 0)       # re-issue
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, GPA, 8 * PS, None, 0)    # drop the file
    vm.set_user_memory_region(1, 2 * GPA, 8 * PS, g, 8 * PS)    # the rest of the file: fine
    # an ordinary memslot: re-issued unchanged it stays, with another GPA it moves with its memory
    vm.set_user_memory_region(2, 0, 2 * PS, None)
    vm.guest_write(PS, b"host", private=False)
    vm.set_user_memory_region(2, 0, 2 * PS, None)
    vm.set_user_memory_region(2, 16 * PS, 2 * PS, None)
    assert vm.guest_read(17 * PS, 4, private=False) == b"host"
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 2, 16 * PS, 4 * PS, None)   # resize
    expect_errno(errno.EEXIST, vm.set_user_memory_region, 2, GPA, 2 * PS, None)       # onto slot 0
    # size 0 deletes the slot and unbinds its range, which can then be bound again
    vm.set_user_memory_region(0, 0, 0, None)
    assert 0 not in vm.memslots
    vm.set_user_memory_region(3, 3 * GPA, 8 * PS, g, 0)
    assert sorted(vm.memslots) == [1, 2, 3]
