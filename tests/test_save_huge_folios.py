"""Save and load of huge folios whose pages differ in more than their folio: pages the
guest accepted one by one (trusted-entity state, guest mapping) inside 2 MiB and 1 GiB
folios, a few (kept as exceptions of their 2 MiB entry) and many (a page table). The
folio order is kept once per 2 MiB entry in the store and written into every page word in
a saved file (the format has always held complete words); the loaded file must be the
same state, every page and folio, and arrays that do not fit the file are refused with
their own message."""
from __future__ import annotations

import numpy as np
import pytest

import gmemfast
from conftest import assert_same_state, normalize_dump
from gmemfast import (FALLOC_FL_KEEP_SIZE, GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_INIT_SHARED,
                      GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM)
from gmemfast import _kernels as K

P = 4096
M2 = 2 << 20
G = 1 << 30


def accepted(order, size, gpas):
    vm = VM("tdx", in_place=True)
    g = vm.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB, page_order=order)
    vm.set_user_memory_region(0, 0, size, g)
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, size)
    for a in gpas:
        vm.guest_accept(a, P, chunk=P)
    return g


@pytest.mark.parametrize("order, size, gpas", [
    (9, 4 * M2, [M2 + 3 * P, M2 + 9 * P]),                                 # two exceptions
    (9, 4 * M2, [M2 + 7 * k * P for k in range(8)] + [3 * M2 + P]),        # a page table
    (18, G, [3 * M2 + 5 * P] + [9 * M2 + 11 * k * P for k in range(8)]),   # both, in a 1 GiB folio
], ids=["2m-exceptions", "2m-page-table", "1g"])
def test_huge_folios_with_accepted_pages_round_trip(tmp_path, order, size, gpas):
    g = accepted(order, size, gpas)
    huge = size >> (12 + order)
    assert g.huge_folios() == huge                    # accepting splits no folio
    g.save(tmp_path / "s.npz")
    back = gmemfast.GuestMemfd.load(tmp_path / "s.npz")
    assert back.huge_folios() == huge
    for a in gpas:
        assert back.folio_order(a) == order
    assert_same_state(back, g, "after a save and load")
    back.check()


def test_arrays_of_another_file_are_refused_and_change_nothing():
    g = gmemfast.GuestMemfd(4 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    for k in range(6):                                # a page table
        g.set_memory_attributes((9 + 5 * k) * P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    before = normalize_dump(g.dump())
    arrays = g.store.to_arrays()
    arrays["n1"] = np.concatenate([arrays["n1"], np.zeros((K.N1, K.NF), np.int64)])  # a table too many
    with pytest.raises(ValueError) as e:
        g.store.load_arrays(arrays)
    assert str(e.value) == "state arrays do not match the header (damaged file)"
    assert normalize_dump(g.dump()) == before
