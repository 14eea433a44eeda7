"""Saving and loading a file whose huge folios carry exception pages, a file of a legacy
(per-GFN) VM, held pins across a save, which pins a punch orphans, and an ordinary
memslot's host memory read and written at any byte (docs/model.md §4.8, §13).

Every expectation is the state before the save, the reference (tests/naive.py), or a
byte pattern written here."""
from __future__ import annotations

import errno

import pytest

import naive
import gmemfast
from conftest import assert_same_state, normalize_dump
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                      GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM, GmemError,
                      GuestMemfd)

P = 4096
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
M2 = 2 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def mixed_blocks(g):
    """Huge folios with a few pages unlike the rest of their 2 MiB block (exceptions),
    mapped and host-written pages, one block wholly shared."""
    g.fallocate(KEEP, 0, 4 * M2)
    for k, page in enumerate((3, 100, 511)):
        g.set_memory_attributes(M2 + page * P, P, 0)
        g.host_write(M2 + page * P + k, bytes([k + 1]) * 9)
    g.set_memory_attributes(2 * M2, M2, 0)
    g.host_read(2 * M2 + 5 * P, 1)                         # maps a page
    g.set_memory_attributes(3 * M2 + 7 * P, 2 * P, 0)


@pytest.mark.parametrize("page_order", [9, 18])
def test_huge_folio_file_with_exception_pages_round_trips(tmp_path, page_order):
    size = (1 << 30) if page_order == 18 else 8 * M2
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB
    g = GuestMemfd(size, flags, page_order=page_order)
    ref = naive.GuestMemfd(size, flags, page_order=page_order)
    mixed_blocks(g)
    mixed_blocks(ref)
    assert_same_state(g, ref, "before the save")
    g.save(tmp_path / "s.npz")
    back = GuestMemfd.load(tmp_path / "s.npz")
    assert_same_state(back, ref, "after a save and a load")
    assert normalize_dump(back.dump()) == normalize_dump(g.dump())
    assert [back.folio_order(o) for o in range(0, size, M2)] == [ref.folio_order(o) for o in range(0, size, M2)]
    back.check()
    # the loaded file goes on like the original
    for h in (back, ref):
        h.set_memory_attributes(M2, M2, PRIVATE)
    assert_same_state(back, ref, "converted after the load")


def test_a_legacy_file_loads_as_legacy_with_its_pins(tmp_path):
    vm = VM("sw-protected", in_place=False)
    g = vm.create_guest_memfd(4 * M2, SHARED)
    g.fallocate(KEEP, 0, M2)
    held = g.pin(3 * P, 2 * P)
    g.save(tmp_path / "legacy.npz")
    back = GuestMemfd.load(tmp_path / "legacy.npz")
    assert back.in_place is False
    with pytest.raises(GmemError) as err:
        back.set_memory_attributes(0, P, 0)
    assert err.value.errno == errno.ENOTTY
    (pin,) = back.pins
    assert (pin.offset, pin.size, pin.gmem, pin.released) == (3 * P, 2 * P, back, False)
    assert (held.gmem, held.size) == (g, 2 * P)
    pin.release()
    assert back.pins == ()


def test_an_in_place_file_loads_in_place(tmp_path):
    g = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP)
    g.save(tmp_path / "inplace.npz")
    back = GuestMemfd.load(tmp_path / "inplace.npz")
    assert back.in_place is True
    back.set_memory_attributes(0, P, 0)
    assert back.private_pages() == M2 // P - 1


def test_releasing_a_pin_twice_names_it():
    g = GuestMemfd(M2, SHARED)
    pin = g.pin(5 * P, 3 * P)
    pin.release()
    with pytest.raises(GmemError) as err:
        pin.release()
    assert err.value.errno == errno.EINVAL
    assert str(err.value).endswith("pin [0x5000, +0x3000) was already released")


@pytest.mark.parametrize("GM", [gmemfast.GuestMemfd, naive.GuestMemfd], ids=["engine", "naive"])
def test_a_punch_orphans_only_the_pins_it_overlaps(GM):
    g = GM(M2, SHARED)
    g.fallocate(KEEP, 0, M2)
    before = g.pin(0, 2 * P)                          # ends where the punch starts
    inside = g.pin(4 * P, P)
    after = g.pin(8 * P, P)                           # starts where the punch ends
    g.fallocate(PUNCH, 2 * P, 6 * P)
    dump = g.dump()
    assert [dump["allocated"][p] for p in (0, 1, 4, 8)] == [True, True, False, True]
    assert dump["pins"][0] == dump["pins"][1] == dump["pins"][8] == 1
    for pin in (before, inside, after):
        pin.release()
    assert sum(g.dump()["pins"]) == 0


def test_an_ordinary_memslot_reads_zeroes_until_written_at_any_byte():
    vm = VM("snp")
    vm.set_user_memory_region(0, 0, 4 * P, None)
    assert vm.guest_read(P + 10, 2 * P, private=False) == bytes(2 * P)
    data = bytes(range(256)) * 20                        # 5120 bytes across a page boundary
    vm.guest_write(P + 3, data, private=False)
    assert vm.guest_read(P + 3, len(data), private=False) == data
    assert vm.guest_read(P, 3, private=False) == bytes(3)
    assert vm.guest_read(P + 3 + len(data), 16, private=False) == bytes(16)
    assert vm.shared_memory_pages() == 2


def test_bad_argument_types_are_named():
    g = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP)
    vm = VM("snp")
    vm.set_user_memory_region(0, 0, 4 * P, None)
    for call, name in ((lambda: g.fallocate("x", 0, P), "mode"), (lambda: g.fallocate(KEEP, 0, "x"), "size"),
                       (lambda: g.fallocate(KEEP, "x", P), "offset"), (lambda: g.pin("x"), "offset"),
                       (lambda: vm.guest_write("x", b"1", private=False), "gpa")):
        with pytest.raises(TypeError) as err:
            call()
        assert str(err.value) == f"{name} must be an int, not str ('x')"


def test_batch_and_host_access_messages_name_what_is_wrong():
    g = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP)
    with pytest.raises(TypeError, match=r"^offsets must be integers, not <U1$"):
        g.fallocate_many(KEEP, "x", P)
    with pytest.raises(ValueError, match=r"^sizes has 3 items but offsets has 2: give arrays of the same length"):
        g.set_memory_attributes_many([0, P], [P] * 3, 0)
    with pytest.raises(ValueError, match=r"^sizes has 3 items but gpas has 2: give arrays of the same length"):
        VM("snp").guest_accept_many([0, P], [P] * 3)
    with pytest.raises(gmemfast.SigBusError, match=r"host write at 0x3000: page 0x3000 is private"):
        g.host_write(3 * P, b"x")
    with pytest.raises(TypeError, match=r"^gpa must be an int, not str \('x'\)$"):
        VM("snp").guest_accept("x", P)


def test_slot_and_flag_messages_name_what_is_wrong():
    with pytest.raises(GmemError, match=r"memslot 3 does not exist \(size 0 deletes a slot\)"):
        VM("snp").set_user_memory_region(3, 0, 0, None)
    g = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP)
    with pytest.raises(TypeError, match=r"^flags must be an int, not str \('x'\)$"):
        g.set_memory_attributes(0, P, 0, "x")


def test_a_save_holds_only_live_contents(tmp_path):
    """Bytes of pages punched since they were written are not live: a save holds only the
    pages whose contents are, and the loaded file reads the same everywhere."""
    g = GuestMemfd(M2, SHARED)
    g.fallocate(KEEP, 0, M2)
    for p in range(8):
        g.host_write(p * P, bytes([p + 1]) * P)
    g.fallocate(PUNCH, 2 * P, 3 * P)                         # pages 2-4 lose their contents
    assert g.store.data_pages() == [0, 1, 5, 6, 7]
    g.save(tmp_path / "g.npz")
    h = GuestMemfd.load(tmp_path / "g.npz")
    assert h.store.data_pages() == [0, 1, 5, 6, 7]
    assert normalize_dump(h.dump()) == normalize_dump(g.dump())
    g.fallocate(KEEP, 0, M2)
    h.fallocate(KEEP, 0, M2)
    assert h.host_read(0, 8 * P) == g.host_read(0, 8 * P) == (
        bytes([1]) * P + bytes([2]) * P + bytes(3 * P) + bytes([6]) * P + bytes([7]) * P + bytes([8]) * P)
