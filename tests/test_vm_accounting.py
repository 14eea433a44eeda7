"""What a VM and its files report about themselves: the VM's private page count in both
tracking modes (per memslot, only what each memslot binds), and a file that crosses a
process boundary (pickle, as sweeps send results between workers) unchanged.

Expected counts are worked out page by page from ``is_private`` over each memslot, never
taken from the total under test."""
from __future__ import annotations

import pickle

import pytest

from conftest import normalize_dump
from gmemfast import GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM, GuestMemfd

P = 4096
M = 1 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def page_by_page(vm):
    """Private pages of every guest_memfd memslot, one is_private() per page."""
    return sum(vm.is_private(gpa) for ms in vm.memslots.values() if ms.gmem is not None
               for gpa in range(ms.gpa, ms.gpa + ms.size, P))


@pytest.mark.parametrize("vm_type, in_place", [("sw-protected", True), ("snp", True), ("snp", False),
                                               ("tdx", False)])
def test_vm_private_pages_counts_each_memslot_over_what_it_binds(vm_type, in_place):
    vm = VM(vm_type, in_place=in_place)
    flags = GUEST_MEMFD_FLAG_MMAP if in_place else 0
    g = vm.create_guest_memfd(8 * M, flags)
    # two memslots bind parts of the file (not from its start); an ordinary one has none
    vm.set_user_memory_region(0, 64 * M, 2 * M, g, gmem_offset=M)
    vm.set_user_memory_region(1, 128 * M, 3 * M, g, gmem_offset=4 * M)
    vm.set_user_memory_region(2, 0, 4 * M, None)
    if in_place:
        # the file starts private: the count is the bound pages, not the file's 2048
        assert vm.private_pages() == page_by_page(vm) == 5 * M // P

    def convert(gpa, size, attributes):
        """In place through the file (offset = gpa - slot gpa + gmem_offset), else the VM's store."""
        if in_place:
            ms = vm.memslot_for(gpa)
            g.set_memory_attributes(gpa - ms.gpa + ms.gmem_offset, size, attributes)
        else:
            vm.set_memory_attributes(gpa, size, attributes)

    convert(64 * M, 2 * M, 0)
    convert(128 * M, 3 * M, 0)
    convert(64 * M + 5 * P, 7 * P, PRIVATE)
    convert(128 * M + M, M, PRIVATE)
    assert vm.private_pages() == page_by_page(vm) == 7 + M // P
    if in_place:
        # pages of the file outside every memslot change nothing the VM counts
        g.set_memory_attributes(0, M, PRIVATE)
        assert vm.private_pages() == page_by_page(vm) == 7 + M // P
    vm.set_user_memory_region(1, 128 * M, 0, None)                 # delete a slot
    assert vm.private_pages() == page_by_page(vm) == 7


def test_a_file_survives_pickling_with_its_state_and_counters():
    g = GuestMemfd(4 * M, GUEST_MEMFD_FLAG_MMAP)
    g.fallocate(0x01, 0, 2 * M)                                    # FALLOC_FL_KEEP_SIZE
    g.set_memory_attributes(M, 8 * P, 0)
    g.host_write(M + P, b"kept across processes")
    copy = pickle.loads(pickle.dumps(g))
    assert normalize_dump(copy.dump()) == normalize_dump(g.dump())
    assert dict(copy.counters) == dict(g.counters)
    assert copy.host_read(M + P, 21) == b"kept across processes"
    copy.set_memory_attributes(M, 8 * P, PRIVATE)                  # the copy works on its own
    assert copy.private_pages() == 1024 and g.private_pages() == 1024 - 8
    copy.check()


def test_memory_footprint_grows_by_what_each_structure_holds():
    """A mixed 2 MiB block with more exception pages than its entry holds gets a table of
    512 two-byte page words (README, "How it is fast"); stored contents cost a page each."""
    def with_shared(n):
        g = GuestMemfd(4 * M, GUEST_MEMFD_FLAG_MMAP)
        for k in range(n):
            g.set_memory_attributes(M + 9 * k * P, P, 0)
        return g
    fresh = GuestMemfd(4 * M, GUEST_MEMFD_FLAG_MMAP).memory_footprint()
    four, five = with_shared(4), with_shared(5)
    assert four.memory_footprint() > fresh                  # the 1 GiB block now has its 2 MiB entries
    assert five.memory_footprint() - four.memory_footprint() == 512 * 2
    before = five.memory_footprint()
    five.host_write(M + 3, b"x")
    five.host_write(M + 9 * P, b"y" * P)
    five.host_write(M + 18 * P + 100, b"z")
    assert five.memory_footprint() - before == 3 * P
    assert type(five.memory_footprint()) is int
