"""The edges of single calls: what an error says (the value and why, so a user can act on
it), what a call returns when its work spans memslots, batched calls given only scalars,
and the defaults a bare ``VM()`` starts with.

Expected texts are built from the arguments of each call, not copied from an output."""
from __future__ import annotations

import errno

import pytest

from conftest import normalize_dump
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                      GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                      KVM_MEMORY_ATTRIBUTE_PRIVATE, VM, GmemError, GuestMemfd, SigBusError)

PS = 4096
M = 1 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP_SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


def shared_file(size=4 * M):
    return GuestMemfd(size, MMAP_SHARED)


# ------------------------------------------------------------------ argument types
@pytest.mark.parametrize("call, name, value", [
    (lambda g, v: g.pin(0, v), "size", "x"),
    (lambda g, v: g.pin(v), "offset", 1.5),
    (lambda g, v: g.folio_order(v), "offset", "x"),
    (lambda g, v: GuestMemfd(4 * M, MMAP_SHARED, metadata_limit=v), "metadata_limit", "8"),
])
def test_a_value_of_the_wrong_type_is_named(call, name, value):
    g = shared_file()
    before = normalize_dump(g.dump())
    with pytest.raises(TypeError) as info:
        call(g, value)
    msg = str(info.value)
    assert msg.startswith(f"{name} must be an int"), msg
    assert type(value).__name__ in msg and repr(value) in msg, msg
    assert normalize_dump(g.dump()) == before


CONVERT = ("set_memory_attributes_many", {"offsets": [0, PS], "sizes": PS, "attributes": PRIVATE})
FALLOCATE = ("fallocate_many", {"modes": FALLOC_FL_KEEP_SIZE, "offsets": [0, PS], "sizes": PS})


@pytest.mark.parametrize("method, args, column, bad", [
    (*CONVERT, "offsets", ["a", "b"]), (*CONVERT, "sizes", ["a", "b"]),
    (*CONVERT, "attributes", [0.5, 1.5]),
    (*FALLOCATE, "modes", [0.5, 1.5]), (*FALLOCATE, "sizes", ["a", "b"]),
])
def test_a_batch_column_of_the_wrong_type_is_named(method, args, column, bad):
    g = shared_file()
    before = normalize_dump(g.dump())
    with pytest.raises(TypeError) as info:
        getattr(g, method)(*{**args, column: bad}.values())
    assert str(info.value).startswith(f"{column} must be integers"), str(info.value)
    assert normalize_dump(g.dump()) == before


@pytest.mark.parametrize("column", ["gpas", "sizes"])
def test_a_vm_batch_column_of_the_wrong_type_is_named(column):
    vm = VM("snp")
    g = vm.create_guest_memfd(4 * M, GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region(0, 0, 4 * M, g)
    args = {"gpas": [0, PS], "sizes": PS}
    args[column] = [0.5, 1.5]
    for call in (lambda: vm.set_memory_attributes_many(args["gpas"], args["sizes"], 0),
                 lambda: vm.guest_accept_many(args["gpas"], args["sizes"], chunk=PS)):
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value).startswith(f"{column} must be integers"), str(info.value)
    assert g.private_pages() == g.nr_pages


# ------------------------------------------------------------------ ranges and faults
def test_a_pin_past_the_end_names_its_range_and_the_end():
    g = shared_file()
    off, size = g.size - PS, 2 * PS
    with pytest.raises(GmemError) as info:
        g.pin(off, size)
    assert info.value.errno == errno.EFAULT
    assert f"pin [{off:#x}, {off + size:#x}) goes past the end ({g.size:#x})" in str(info.value)
    assert g.pins == ()


def test_a_host_read_of_a_private_page_names_the_access():
    g = shared_file()
    g.set_memory_attributes(3 * PS, PS, PRIVATE)
    with pytest.raises(SigBusError) as info:
        g.host_read(3 * PS + 8, 16)
    assert info.value.errno == errno.EFAULT
    msg = str(info.value)
    assert f"host read at {3 * PS + 8:#x}" in msg and "is private" in msg, msg
    with pytest.raises(SigBusError) as info:
        g.host_write(3 * PS, b"x")
    assert f"host write at {3 * PS:#x}" in str(info.value), str(info.value)


def test_an_empty_host_read_reads_nothing():
    g = shared_file()
    g.host_write(0, b"abc")
    assert g.host_read(0, 0) == b""
    assert g.host_read(PS, 0) == b""


def test_folio_order_outside_the_file_is_einval():
    g = shared_file()
    for off in (g.size, g.size + PS, -PS):
        with pytest.raises(GmemError) as info:
            g.folio_order(off)
        assert info.value.errno == errno.EINVAL
        assert f"offset {off:#x} is outside the file (size {g.size:#x})" in str(info.value)


def test_batch_columns_of_different_lengths_name_both():
    vm = VM("snp")
    g = vm.create_guest_memfd(4 * M, GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region(0, 0, 4 * M, g)
    for call in (lambda: vm.set_memory_attributes_many([0, PS], [PS, PS, PS], 0),
                 lambda: vm.guest_accept_many([0, PS], [PS, PS, PS], chunk=PS)):
        with pytest.raises(ValueError) as info:
            call()
        assert "sizes has 3 items but gpas has 2" in str(info.value), str(info.value)
    assert g.private_pages() == g.nr_pages
    with pytest.raises(ValueError) as info:
        g.set_memory_attributes_many([0, PS], [PS, PS, PS], 0)
    assert "sizes has 3 items but offsets has 2" in str(info.value), str(info.value)


def test_each_punch_refused_at_a_pin_is_counted():
    g = GuestMemfd(4 * M, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
                   | GUEST_MEMFD_FLAG_HUGETLB, page_order=9)
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 4 * M)
    pin = g.pin(3 * PS)
    for k in range(3):
        with pytest.raises(GmemError) as info:
            g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 2 * M)
        assert info.value.errno == errno.EAGAIN
        assert g.counters["punch_eagain"] == k + 1
    r = g.fallocate_many(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, [0, 2 * M], 2 * M)
    assert r.errno.tolist() == [errno.EAGAIN, 0]
    assert g.counters["punch_eagain"] == 4
    pin.release()
    g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 2 * M)
    assert g.counters["punch_eagain"] == 4 and g.allocated_pages() == 0


@pytest.mark.parametrize("slot, size, words", [
    (100_000, 4 * M, ["memslot id 100000 is out of range (0 to "]),
    (3, 8 * M, ["memslot 3 guest_memfd range", f"{8 * M:#x}", f"({4 * M:#x})"]),
])
def test_a_bad_memslot_is_named_with_why(slot, size, words):
    vm = VM()
    g = vm.create_guest_memfd(4 * M, GUEST_MEMFD_FLAG_MMAP)
    with pytest.raises(GmemError) as info:
        vm.set_user_memory_region(slot, 0, size, g)
    assert info.value.errno == errno.EINVAL
    assert all(w in str(info.value) for w in words), str(info.value)
    assert vm.memslots == {}


# ------------------------------------------------------------------ work over memslots
@pytest.mark.parametrize("vm_type", ["snp", "tdx"])
def test_guest_accept_over_two_memslots_returns_the_chunks_of_both(vm_type):
    vm = VM(vm_type, in_place=False)
    g = vm.create_guest_memfd(8 * M, 0)
    vm.set_user_memory_region(0, 0, 2 * M, g)                        # file [0, 2M)
    vm.set_user_memory_region(1, 2 * M, 4 * M, g, gmem_offset=4 * M)  # file [4M, 8M)
    vm.set_memory_attributes(0, 6 * M, PRIVATE)
    # one chunk of 2 MiB in the first memslot, two in the second
    assert vm.guest_accept(0, 6 * M) == 3
    assert (g.te_states(0, 2 * M) != 0).all() and (g.te_states(4 * M, 4 * M) != 0).all()
    assert not g.te_states(2 * M, 2 * M).any()
    # at 4 KiB: the pages of both
    vm2 = VM(vm_type, in_place=False)
    g2 = vm2.create_guest_memfd(2 * M, 0)
    vm2.set_user_memory_region(0, 0, M, g2)
    vm2.set_user_memory_region(1, M, M, g2, gmem_offset=M)
    vm2.set_memory_attributes(0, 2 * M, PRIVATE)
    assert vm2.guest_accept(M - 3 * PS, 5 * PS, chunk=PS) == 5


# ------------------------------------------------------------------ batches of scalars
def test_a_fallocate_batch_of_scalars_is_one_call():
    g, ref = shared_file(), shared_file()
    r = g.fallocate_many(FALLOC_FL_KEEP_SIZE, 2 * M, M)
    ref.fallocate(FALLOC_FL_KEEP_SIZE, 2 * M, M)
    assert r.errno.tolist() == [0] and r.error_offset.tolist() == [-1]
    assert g.counters["fallocate_calls"] == ref.counters["fallocate_calls"] == 1
    assert normalize_dump(g.dump()) == normalize_dump(ref.dump())


def test_a_conversion_batch_of_scalars_is_one_call():
    g, ref = shared_file(), shared_file()
    r = g.set_memory_attributes_many(M, 2 * PS, PRIVATE)
    ref.set_memory_attributes(M, 2 * PS, PRIVATE)
    assert r.errno.tolist() == [0]
    assert g.counters["convert_calls"] == ref.counters["convert_calls"] == 1
    assert normalize_dump(g.dump()) == normalize_dump(ref.dump())


# ------------------------------------------------------------------ defaults
def test_a_bare_vm_is_a_software_protected_vm_converting_in_place():
    vm = VM()
    assert vm.vm_type == "sw-protected"
    assert vm.in_place
    g = vm.create_guest_memfd(2 * M, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    g.host_write(0, b"kept")
    g.set_memory_attributes(0, PS, PRIVATE)
    g.set_memory_attributes(0, PS, 0)
    assert g.host_read(0, 4) == b"kept"       # sw-protected keeps contents both ways


# ------------------------------------------------------------------ unsafe folios
def test_each_conversion_refused_at_a_pin_drains_the_lru_once():
    """A pinned page makes its folio unsafe: the kernel drains the per-CPU LRU batches
    once, finds the pin still there and refuses with EAGAIN (docs/model.md §3)."""
    g = shared_file()
    g.host_write(9 * PS, b"pinned")
    pin = g.pin(9 * PS)
    for k in range(1, 4):
        with pytest.raises(GmemError) as info:
            g.set_memory_attributes(8 * PS, 4 * PS, PRIVATE)
        assert info.value.errno == errno.EAGAIN and info.value.error_offset == 9 * PS
        assert g.counters["lru_drains"] == k and g.counters["convert_eagain"] == k
    r = g.set_memory_attributes_many([9 * PS, 20 * PS], PS, PRIVATE)
    assert r.errno.tolist() == [errno.EAGAIN, 0]
    assert g.counters["lru_drains"] == 4
    pin.release()
    g.set_memory_attributes(8 * PS, 4 * PS, PRIVATE)
    assert g.counters["lru_drains"] == 4 and g.private_pages() == 5


# ------------------------------------------------------------------ files and VMs refused or large
def test_a_legacy_coco_vm_refuses_a_shared_file():
    for vm_type in ("snp", "tdx"):
        vm = VM(vm_type, in_place=False)
        for flags, why in ((GUEST_MEMFD_FLAG_MMAP, "cannot mmap guest_memfd"),
                           (GUEST_MEMFD_FLAG_INIT_SHARED, "cannot create a shared guest_memfd")):
            with pytest.raises(GmemError) as info:
                vm.create_guest_memfd(2 * M, flags)
            assert info.value.errno == errno.EINVAL
            assert f"legacy (not in-place) mode {why}" in str(info.value), str(info.value)


def test_a_file_of_terabytes_takes_its_first_tables():
    """The first page tables of a 4 TiB file: the pools' first size is bounded, not one
    table per 2 MiB of the file."""
    g = GuestMemfd(4 << 40, MMAP_SHARED)
    for off in (0, (3 << 40) + 5 * PS):
        g.set_memory_attributes(off, PS, PRIVATE)
        g.host_write(off + PS, b"x")
    assert g.private_pages() == 2
    assert g.host_read((3 << 40) + 6 * PS, 1) == b"x"
    g.check()
