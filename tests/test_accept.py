"""What a guest's acceptance costs at each host mapping level, with and without
prefaulting (docs/model.md §4.9): the counts of small canonical cases, worked out by hand
from the kernel paths the docs cite."""
from __future__ import annotations

import errno

import pytest

from gmemfast import GUEST_MEMFD_FLAG_HUGETLB, VM, GmemError

K4, M2, G1 = 4096, 2 << 20, 1 << 30
ACCEPT_COUNTERS = ("guest_exits", "tdx_seamcall_page_aug", "tdx_accepts", "rmp_updates",
                   "snp_pvalidate_4k", "snp_pvalidate_2m", "accept_fallbacks", "psmash",
                   "tdx_seamcall_block", "tdx_seamcall_track", "tdx_seamcall_demote")


def accept(vm_type, size, *, order=0, **kw):
    vm = VM(vm_type)
    flags = GUEST_MEMFD_FLAG_HUGETLB if order else 0
    g = vm.create_guest_memfd(max(size, 1 << (12 + order)), flags, page_order=order)
    vm.set_user_memory_region(0, 0, g.size, g)
    before = dict(vm.counters)
    chunks = vm.guest_accept(0, size, **kw)
    after = vm.counters
    return chunks, {c: int(after[c] - before[c]) for c in ACCEPT_COUNTERS if after[c] != before[c]}


TDX_CASES = [
    # (backing order, chunk, mapping, prefault): counts for 4 MiB, by hand
    ("chunk level (default)", 0, M2, None, False,
     {"guest_exits": 2, "tdx_seamcall_page_aug": 2, "tdx_accepts": 2}),
    # KVM maps TD memory at 4 KiB: each 2 MiB accept is refused, then 512 accepts of 4 KiB,
    # each a TD exit and a PAGE.AUG (the 2 MiB attempt's own exit maps the first page)
    ("4K host, 2M accept", 0, M2, K4, False,
     {"accept_fallbacks": 2, "guest_exits": 1024, "tdx_seamcall_page_aug": 1024, "tdx_accepts": 1024}),
    ("4K host prefaulted, 2M accept", 0, M2, K4, True,
     {"accept_fallbacks": 2, "tdx_seamcall_page_aug": 1024, "tdx_accepts": 1024}),
    ("2M host, 2M accept", 9, M2, M2, False,
     {"guest_exits": 2, "tdx_seamcall_page_aug": 2, "tdx_accepts": 2}),
    # the exit carries the 4 KiB accept level, so KVM maps at 4 KiB: no split
    ("2M host, 4K accept", 9, K4, M2, False,
     {"guest_exits": 1024, "tdx_seamcall_page_aug": 1024, "tdx_accepts": 1024}),
    # prefaulted at 2 MiB: the first 4 KiB accept exits and KVM splits the 2 MiB entry
    ("2M host prefaulted, 4K accept", 9, K4, M2, True,
     {"guest_exits": 2, "tdx_seamcall_page_aug": 2, "tdx_accepts": 1024, "tdx_seamcall_block": 2,
      "tdx_seamcall_track": 2, "tdx_seamcall_demote": 2}),
    ("2M host prefaulted, 2M accept", 9, M2, M2, True, {"tdx_seamcall_page_aug": 2, "tdx_accepts": 2}),
    ("1G asked on 4K backing", 0, M2, G1, False,
     {"accept_fallbacks": 2, "guest_exits": 1024, "tdx_seamcall_page_aug": 1024, "tdx_accepts": 1024}),
]


@pytest.mark.parametrize("what,order,chunk,mapping,prefault,expect", TDX_CASES, ids=[c[0] for c in TDX_CASES])
def test_tdx_accept_counts(what, order, chunk, mapping, prefault, expect):
    chunks, got = accept("tdx", 4 << 20, order=order, chunk=chunk, mapping=mapping, prefault=prefault)
    assert got == expect
    assert chunks == (4 << 20) // chunk


def test_tdx_1g_prefaulted_split_to_4k_costs_513_demotions():
    # 1 GiB entry -> 512 entries of 2 MiB -> each to 512 of 4 KiB: 1 + 512 splits
    _chunks, got = accept("tdx", G1, order=18, chunk=K4, mapping=G1, prefault=True)
    assert got["tdx_seamcall_demote"] == got["guest_exits"] == 513
    assert got["tdx_seamcall_page_aug"] == 1 and got["tdx_accepts"] == 262144


SNP_CASES = [
    ("chunk level (default)", 0, M2, None, False,
     {"guest_exits": 2, "rmp_updates": 2, "snp_pvalidate_2m": 2}),
    # 4 KiB folios, 4 KiB RMP entries: PVALIDATE 2M fails with FAIL_SIZEMISMATCH and the
    # guest validates 512 pages, each mapped by its own nested page fault
    ("4K host, 2M validate", 0, M2, K4, False,
     {"accept_fallbacks": 2, "guest_exits": 1024, "rmp_updates": 1024, "snp_pvalidate_4k": 1024}),
    ("4K host prefaulted, 2M validate", 0, M2, K4, True,
     {"accept_fallbacks": 2, "rmp_updates": 1024, "snp_pvalidate_4k": 1024}),
    ("2M host, 2M validate", 9, M2, M2, False, {"guest_exits": 2, "rmp_updates": 2, "snp_pvalidate_2m": 2}),
    # mapped (and RMPUPDATEd) at 2 MiB, then a 4 KiB PVALIDATE faults on the size mismatch
    # and KVM PSMASHes the entry
    ("2M host, 4K validate", 9, K4, M2, False,
     {"guest_exits": 4, "rmp_updates": 2, "psmash": 2, "snp_pvalidate_4k": 1024}),
    ("2M host prefaulted, 4K validate", 9, K4, M2, True,
     {"guest_exits": 2, "rmp_updates": 2, "psmash": 2, "snp_pvalidate_4k": 1024}),
    # RMP entries are at most 2 MiB: a 1 GiB policy maps at 2 MiB
    ("1G asked on 1G backing", 18, M2, G1, False, {"guest_exits": 2, "rmp_updates": 2, "snp_pvalidate_2m": 2}),
]


@pytest.mark.parametrize("what,order,chunk,mapping,prefault,expect", SNP_CASES, ids=[c[0] for c in SNP_CASES])
def test_snp_accept_counts(what, order, chunk, mapping, prefault, expect):
    chunks, got = accept("snp", 4 << 20, order=order, chunk=chunk, mapping=mapping, prefault=prefault)
    assert got == expect
    assert chunks == (4 << 20) // chunk


@pytest.mark.parametrize("mapping", [None, K4, M2])
def test_sw_protected_counts_an_exit_per_chunk_whatever_the_mapping(mapping):
    _chunks, got = accept("sw-protected", 4 << 20, order=9, chunk=M2, mapping=mapping)
    assert got == {"guest_exits": 2}


def test_accepted_again_costs_nothing_and_partial_chunks_round_up():
    vm = VM("tdx")
    g = vm.create_guest_memfd(8 << 20)
    vm.set_user_memory_region(0, 0, g.size, g)
    vm.guest_accept(0, 4096, chunk=K4, mapping=K4)
    before = dict(vm.counters)
    assert vm.guest_accept(0, M2, chunk=M2, mapping=K4) == 1        # 511 new pages: one chunk
    d = {c: vm.counters[c] - before[c] for c in ACCEPT_COUNTERS}
    assert d["accept_fallbacks"] == 1 and d["tdx_accepts"] == d["guest_exits"] == 511
    assert vm.guest_accept(0, M2, chunk=M2, mapping=K4) == 0


@pytest.mark.parametrize("mapping", [8192, 4 << 20, 3, -4096])
def test_bad_mapping_level_is_einval_and_changes_nothing(mapping):
    vm = VM("snp")
    g = vm.create_guest_memfd(4 << 20)
    vm.set_user_memory_region(0, 0, g.size, g)
    before = dict(vm.counters)
    with pytest.raises(GmemError) as e:
        vm.guest_accept(0, M2, mapping=mapping)
    assert e.value.errno == errno.EINVAL and "mapping level" in str(e.value)
    assert dict(vm.counters) == before and g.allocated_pages() == 0
    with pytest.raises(GmemError) as e:                      # the batched form, checked once
        vm.guest_accept_many([0, M2], M2, mapping=mapping)
    assert e.value.errno == errno.EINVAL and "mapping level" in str(e.value)
    assert dict(vm.counters) == before and g.allocated_pages() == 0
