"""The VM's separate shared memory (docs/model.md §13): faulting it in and discarding it
memslot piece by memslot piece, its bytes as the guest reads and writes them at any
offset, the private-page queries over memslots, and the text of refused calls.

Counts are worked out by hand from §13 and the counter table (one ``shared_discards``
per memslot piece; per page held ``host_ptes_zapped`` and ``pages_freed``; one INVLPG
per page up to 33 pages, a full flush above); bytes are checked against a plain
``bytearray`` of the slot written the same way."""
from __future__ import annotations

import errno
import random
import re

import pytest

from gmemfast import GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM, GmemError

P = 4096
M1 = 1 << 20
M2 = 2 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def _delta(vm, before):
    after = dict(vm.counters)
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _ordinary_slots(*ranges):
    """A VM with one ordinary memslot (host memory only) per ``(gpa, size)``."""
    vm = VM("sw-protected")
    for slot, (gpa, size) in enumerate(ranges):
        vm.set_user_memory_region(slot, gpa, size, None)
    return vm


# ------------------------------------------------------------------ discard, slot by slot

def test_a_discard_over_three_memslots_frees_what_each_holds():
    # slots of 16 pages at 0, 16 and 32 pages; the first holds 2 pages, the middle none,
    # the last 4: one discard call per memslot piece, and every page held is freed
    vm = _ordinary_slots((0, 16 * P), (16 * P, 16 * P), (32 * P, 16 * P))
    assert vm.fault_shared(3 * P, 2 * P) == 2
    assert vm.fault_shared(40 * P, 4 * P) == 4
    before = dict(vm.counters)
    assert vm.discard_shared(0, 48 * P) == 6
    assert _delta(vm, before) == {"shared_discards": 3, "host_ptes_zapped": 6, "pages_freed": 6,
                                  "tlb_invlpg": 6, "tlb_shootdowns": 2}
    assert vm.shared_memory_pages() == 0
    # nothing left to free: the calls are still made and counted
    before = dict(vm.counters)
    assert vm.discard_shared(0, 48 * P) == 0
    assert _delta(vm, before) == {"shared_discards": 3}


def test_a_discard_frees_exactly_its_pages():
    vm = _ordinary_slots((M1, 16 * P))                  # a slot that does not start at 0
    image = bytearray(b"".join(bytes([k + 1]) * P for k in range(16)))
    vm.guest_write(M1, bytes(image), private=False)
    assert vm.shared_memory_pages() == 16
    assert vm.discard_shared(M1 + 4 * P, 4 * P) == 4     # pages 4..7
    image[4 * P:8 * P] = bytes(4 * P)                   # read as zeroes from now on
    assert vm.guest_read(M1, 16 * P, private=False) == bytes(image)
    assert vm.shared_memory_pages() == 12
    # the pages next to the discarded ones are still held: faulting them allocates nothing
    assert vm.fault_shared(M1 + 3 * P, P) == 0 and vm.fault_shared(M1 + 8 * P, P) == 0
    assert vm.fault_shared(M1 + 3 * P, 6 * P) == 4


@pytest.mark.parametrize("pages, flush", [(33, {"tlb_invlpg": 33}), (34, {"tlb_flush_full": 1})])
def test_a_discard_flushes_page_by_page_up_to_33_pages(pages, flush):
    vm = _ordinary_slots((0, 64 * P))
    vm.fault_shared(0, pages * P)
    before = dict(vm.counters)
    assert vm.discard_shared(0, 64 * P) == pages
    assert _delta(vm, before) == {"shared_discards": 1, "host_ptes_zapped": pages,
                                  "pages_freed": pages, "tlb_shootdowns": 1, **flush}


def test_fault_and_discard_across_memslots_of_both_kinds():
    # legacy VM: a guest_memfd memslot has separate shared memory too; an in-place one
    # does not, so only the ordinary memslot's pages are faulted there
    for in_place, expected in ((False, 24), (True, 8)):
        vm = VM("snp", in_place=in_place)
        g = vm.create_guest_memfd(M2, GUEST_MEMFD_FLAG_MMAP if in_place else 0)
        vm.set_user_memory_region(0, 0, M2, g)
        vm.set_user_memory_region(1, M2, M1, None)
        assert vm.fault_shared(M2 - 16 * P, 24 * P) == expected, in_place
        assert vm.shared_memory_pages() == expected
        assert vm.discard_shared(M2 - 16 * P, 24 * P) == expected
        assert vm.shared_memory_pages() == 0


# ------------------------------------------------------------------ refused calls

@pytest.mark.parametrize("call, what", [("fault_shared", "fault shared memory"),
                                        ("discard_shared", "discard shared memory")])
def test_refused_calls_on_separate_memory_name_the_call_and_the_value(call, what):
    vm = _ordinary_slots((0, 4 * P), (8 * P, 4 * P))    # a hole of 4 pages between them
    vm.fault_shared(0, P)
    fn = getattr(vm, call)
    with pytest.raises(TypeError) as err:
        fn("x", P)
    assert str(err.value) == "gpa must be an int, not str ('x')"
    with pytest.raises(TypeError) as err:
        fn(0, "x")
    assert str(err.value) == "size must be an int, not str ('x')"
    with pytest.raises(GmemError) as err:
        fn(0, 12 * P)                                   # over the hole
    assert err.value.errno == errno.EFAULT
    assert err.value.detail == f"{what} [0x0, +0xc000): no memslot at 0x4000"
    with pytest.raises(GmemError) as err:
        fn(4 * P, 8 * P)                                # starting in the hole
    assert err.value.errno == errno.EFAULT
    assert err.value.detail == f"{what} [0x4000, +0x8000): no memslot at 0x4000"
    with pytest.raises(GmemError) as err:
        fn(8 * P, 8 * P)                                # past the last memslot
    assert err.value.detail == f"{what} [0x8000, +0x8000): no memslot at 0xc000"
    with pytest.raises(GmemError) as err:
        fn(P + 1, P)
    assert err.value.errno == errno.EINVAL
    assert err.value.detail == f"{what}: offset {P + 1:#x} is not page aligned"
    # nothing changed by any refused call
    assert vm.shared_memory_pages() == 1


# ------------------------------------------------------------------ private pages and GFNs

def test_private_gfns_counts_the_legacy_attributes_of_a_range():
    vm = VM("snp", in_place=False)
    g = vm.create_guest_memfd(M2)
    vm.set_user_memory_region(0, 0, M2, g)
    vm.set_memory_attributes(4 * P, 8 * P, PRIVATE)     # GFNs 4..11
    vm.set_memory_attributes(20 * P, 2 * P, PRIVATE)    # GFNs 20, 21
    assert vm.private_gfns(0, 32 * P) == 10
    assert vm.private_gfns(8 * P, 16 * P) == 6           # 8..11 and 20, 21
    assert vm.private_gfns(0, 4 * P) == 0 and vm.private_gfns(12 * P, 8 * P) == 0
    assert vm.private_gfns(P << 20, P) == 0              # no memslot needed
    with pytest.raises(GmemError) as err:
        vm.private_gfns(P + 1, P)
    assert err.value.errno == errno.EINVAL
    assert err.value.detail == f"private_gfns: offset {P + 1:#x} is not page aligned"


@pytest.mark.parametrize("in_place", [True, False])
def test_private_pages_counts_only_guest_memfd_memslots(in_place):
    # an ordinary memslot first, then 256 pages bound from the middle of a 1024-page file
    vm = VM("snp", in_place=in_place)
    vm.set_user_memory_region(0, 0, M1, None)
    g = vm.create_guest_memfd(4 * M1, GUEST_MEMFD_FLAG_MMAP if in_place else 0)
    vm.set_user_memory_region(1, M1, M1, g, gmem_offset=M1)
    if in_place:
        assert vm.private_pages() == 256                # the file starts private
        g.set_memory_attributes(M1 + 16 * P, 16 * P, 0)  # 16 of the bound pages shared
        g.set_memory_attributes(3 * M1, P, 0)            # a page not bound: not counted
        assert vm.private_pages() == 240
    else:
        vm.set_memory_attributes(0, 2 * M1, PRIVATE)     # GFNs of both memslots
        assert vm.private_gfns(0, 2 * M1) == 512
        assert vm.private_pages() == 256                # those of the guest_memfd memslot
        vm.set_memory_attributes(M1, 16 * P, 0)
        assert vm.private_pages() == 240


# ------------------------------------------------------------------ bytes of host memory

def test_separate_memory_bytes_match_a_plain_buffer_at_any_offset():
    """Writes and reads at odd offsets and lengths, across page boundaries, over pages
    already holding other bytes: the same as a bytearray written the same way."""
    base, size = 3 * M1, 6 * P                          # a slot that does not start at 0
    vm = _ordinary_slots((base, size))
    shadow = bytearray(size)
    rnd = random.Random(5)
    pattern = bytes(range(251)) * 100                   # no period of a page
    vm.guest_write(base, pattern[:size], private=False)
    shadow[:] = pattern[:size]
    for k in range(40):
        off = rnd.randrange(size)
        n = rnd.randrange(1, min(size - off, 2 * P + 7) + 1)
        data = bytes(rnd.randrange(256) for _ in range(n))
        vm.guest_write(base + off, data, private=False)
        shadow[off:off + n] = data
        a = rnd.randrange(size)
        b = rnd.randrange(a + 1, size + 1)
        assert vm.guest_read(base + a, b - a, private=False) == bytes(shadow[a:b]), k
    assert vm.guest_read(base, size, private=False) == bytes(shadow)


def test_a_write_inside_a_page_changes_only_its_bytes():
    vm = _ordinary_slots((M2, 2 * P))
    page = bytes(range(256)) * 16
    vm.guest_write(M2, page, private=False)
    vm.guest_write(M2 + 10, b"\xff\xfe", private=False)
    assert vm.guest_read(M2, P, private=False) == page[:10] + b"\xff\xfe" + page[12:]
    assert vm.guest_read(M2 + P, P, private=False) == bytes(P)  # the next page: never written
    # a page never written reads as zeroes at any offset, and is allocated by the write only
    assert vm.guest_read(M2 + P + 5, 7, private=False) == bytes(7)
    assert vm.shared_memory_pages() == 1


# ------------------------------------------------------------------ repr

def test_vm_repr_names_type_mode_and_memslots():
    vm = VM("snp")
    vm.set_user_memory_region(0, 0, M1, None)
    r = repr(vm)
    assert "'snp'" in r and re.search(r"\bin-place\b", r) and "1 memslots" in r
    r = repr(VM("tdx", in_place=False))
    assert "'tdx'" in r and re.search(r"\blegacy\b", r) and "0 memslots" in r
