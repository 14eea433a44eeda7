"""Counters the reference model does not keep, checked against counts derived by hand on
small canonical operations; and the rule that every counter is checked somewhere.

The reference (tests/naive.py) keeps every counter of the kernel steps (``naive.COUNTERS``)
and the state machines compare them with the engine's after every step. The launch path
(populate, the firmware's measurement) and the scenarios' guest model count the rest
(``naive.NOT_MODELLED``); their expected values below are worked out from
docs/model.md §4.7, §4.9 and §10.3, not read off the engine.
"""
from __future__ import annotations

import pytest

import naive
import gmemfast
from gmemfast import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                      KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE, KVM_SEV_SNP_PAGE_TYPE_NORMAL,
                      KVM_SEV_SNP_PAGE_TYPE_SECRETS, KVM_SEV_SNP_PAGE_TYPE_ZERO,
                      KVM_TDX_MEASURE_MEMORY_REGION, VM)
from gmemfast._layout import COUNTER_NAMES

P = 4096
PAGE_INFO = 0x70            # bytes of one SNP PAGE_INFO hashed per measured page
MRTD_BLOCK = 128            # one TDX MRTD block per PAGE.ADD / MR.EXTEND header
MR_CHUNK = 256              # bytes measured per TDH.MR.EXTEND


def test_every_counter_is_checked_independently():
    """Each counter is kept by the reference or listed as checked by hand, not both."""
    kept, by_hand = set(naive.COUNTERS), set(naive.NOT_MODELLED)
    assert not kept & by_hand
    assert kept | by_hand == set(COUNTER_NAMES), sorted(set(COUNTER_NAMES) ^ (kept | by_hand))


def _delta(vm, before):
    after = dict(vm.counters)
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def _snp_in_place(npages=8):
    vm = VM("snp")
    g = vm.create_guest_memfd(npages * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region(0, 0, npages * P, g)
    return vm, g


def test_snp_in_place_populate_by_hand():
    """Two NORMAL pages, one ZERO page and one SECRETS page, loaded in place, then the
    launch finishes with two VMSAs."""
    vm, g = _snp_in_place()
    g.host_write(0, b"\x42" * (2 * P))
    g.set_memory_attributes(0, 4 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)
    before = dict(vm.counters)
    vm.snp_launch_update(0, None, 2 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    vm.snp_launch_update(2, None, P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    vm.snp_launch_update(3, None, P, KVM_SEV_SNP_PAGE_TYPE_SECRETS)
    d = _delta(vm, before)
    assert d["snp_fw_launch_update"] == 4                  # one firmware command per page
    assert d["rmp_updates"] == 4                           # each page made guest-owned
    assert d["pages_populated_inplace"] == 4
    assert "pages_populated_legacy" not in d and "bytes_copied" not in d   # no source: no copy
    assert d["hash_bytes"] == 2 * (P + PAGE_INFO) + 2 * PAGE_INFO   # contents only for NORMAL
    # pages 2 and 3 were holes: populate allocates (and zeroes) them; the ZERO page is
    # zeroed once more by its type
    assert d["pages_allocated"] == 2
    assert (d["pages_zeroed"], d["bytes_zeroed_4k"]) == (3, 3 * P)
    before = dict(vm.counters)
    vm.snp_launch_finish([bytes(P), bytes(P)])
    d = _delta(vm, before)
    assert d == {"snp_fw_launch_update": 2, "rmp_updates": 2, "snp_fw_launch_finish": 1,
                 "hash_bytes": 2 * (P + PAGE_INFO)}


def test_snp_legacy_populate_copies_by_hand():
    vm = VM("snp", in_place=False)
    g = vm.create_guest_memfd(8 * P, 0)
    vm.set_user_memory_region(0, 0, 8 * P, g)
    vm.set_memory_attributes(0, 8 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    before = dict(vm.counters)
    vm.snp_launch_update(0, b"\x17" * (3 * P), 3 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    d = _delta(vm, before)
    assert d["bytes_copied"] == 3 * P                      # platform code copies the source in
    assert d["pages_populated_legacy"] == 3 and "pages_populated_inplace" not in d
    assert d["snp_fw_launch_update"] == 3 and d["hash_bytes"] == 3 * (P + PAGE_INFO)
    assert d["pages_allocated"] == 3                       # populate faults the pages in


@pytest.mark.parametrize("flow", ["in-place", "legacy"])
def test_tdx_populate_by_hand(flow):
    """Two measured pages and one unmeasured page, then finalize."""
    in_place = flow == "in-place"
    vm = VM("tdx", in_place=in_place)
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED if in_place else 0
    g = vm.create_guest_memfd(8 * P, flags)
    vm.set_user_memory_region(0, 0, 8 * P, g)
    if in_place:
        g.host_write(0, b"\x5a" * (3 * P))
        g.set_memory_attributes(0, 3 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)
        src = None
    else:
        vm.set_memory_attributes(0, 3 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        src = b"\x5a" * (3 * P)
    before = dict(vm.counters)
    vm.tdx_init_mem_region(src, 0, 2, KVM_TDX_MEASURE_MEMORY_REGION)
    vm.tdx_init_mem_region(src if src is None else src[2 * P:], 2 * P, 1, 0)
    d = _delta(vm, before)
    assert d["tdx_seamcall_page_add"] == 3
    assert d["tdx_seamcall_mr_extend"] == 2 * (P // MR_CHUNK)         # sixteen per measured page
    assert d["hash_bytes"] == 3 * MRTD_BLOCK + 32 * (MRTD_BLOCK + MR_CHUNK)
    key = "pages_populated_inplace" if in_place else "pages_populated_legacy"
    assert d[key] == 3
    assert "bytes_copied" not in d                     # the TDX module copies, not the host
    before = dict(vm.counters)
    assert len(vm.tdx_finalize()) == 48
    assert _delta(vm, before) == {}                    # finalizing hashes what is already there


def test_prefault_calls_by_hand():
    """accept-drain on SNP with prefault: one KVM_PRE_FAULT_MEMORY per page-state-change
    request, none without prefault (docs/model.md §10.3)."""
    from gmemfast import scenarios as S
    base = {"size": "1G", "platform": "snp", "accept_chunk": "4K"}
    off = S.run_scenario("accept-drain", base)
    on = S.run_scenario("accept-drain", {**base, "prefault": True})
    assert off.counters.get("prefault_calls", 0) == 0
    d = on.phases["drain"]
    # a 4 MiB unit at 4 KiB is 1024 entries; a page-state-change request carries 64
    assert d["accept_memory_calls"] > 0
    assert d["prefault_calls"] == 16 * d["accept_memory_calls"]
