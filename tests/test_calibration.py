"""Calibration: the published end-to-end figures of docs/model.md §9, reproduced within a
factor of 2 by running the matching workload through the engine and pricing its
counters with the default profiles."""
import pytest

from gmemfast import (GUEST_MEMFD_FLAG_HUGETLB, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE, VM,
                      CostModel, GuestMemfd)

GIB = 1 << 30


def within_2x(estimate_ns, published_ns):
    return published_ns / 2 <= estimate_ns <= published_ns * 2


def guest(vm_type, size, **kw):
    vm = VM(vm_type, **kw)
    g = vm.create_guest_memfd(size)
    vm.set_user_memory_region(0, 0, size, g)
    return vm, g


def delta(before, after):
    return {k: after[k] - before[k] for k in after}


def test_per_gfn_attribute_store_over_a_terabyte_takes_about_26s():
    """KVM_SET_MEMORY_ATTRIBUTES over a ~1 TB SNP guest with the per-GFN xarray: ~26 s
    (the soft lockup that motivated range-based attribute stores)."""
    vm, _ = guest("snp", 1 << 40, in_place=False)
    before = dict(vm.counters)
    vm.set_memory_attributes(0, 1 << 40, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    est = CostModel.from_profile("snp").estimate(delta(before, vm.counters))
    assert within_2x(est.total_ns, 26e9), est.table()
    # in place, the same change is one range entry in the per-file store
    vm2, g2 = guest("snp", 1 << 40)
    b2 = dict(vm2.counters)
    g2.set_memory_attributes(0, 1 << 40, 0)
    g2.set_memory_attributes(0, 1 << 40, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    est2 = CostModel.from_profile("snp").estimate(delta(b2, vm2.counters))
    assert est2.total_ns < est.total_ns / 1000


@pytest.mark.parametrize("chunk,published_ns,bound", [(PAGE_SIZE, 57e9, "about"), (2 << 20, 1e9, "under")])
def test_snp_validating_64gib(chunk, published_ns, bound):
    """PVALIDATE of a 64 GiB SNP guest: ~57 s at 4 KiB, under 1 s at 2 MiB. The figure
    is the validation itself; zeroing newly allocated pages is priced separately."""
    vm, _ = guest("snp", 64 * GIB)
    before = dict(vm.counters)
    vm.guest_accept(0, 64 * GIB, chunk=chunk)
    est = CostModel.from_profile("snp").estimate(delta(before, vm.counters))
    validate = sum(ns for c, ns in est.by_counter.items() if c.startswith("snp_pvalidate"))
    if bound == "about":
        assert within_2x(validate, published_ns)
    else:
        assert validate < published_ns
    assert est.by_counter["bytes_zeroed_4k"] > 0, "allocation zeroing shows up beside it"


@pytest.mark.parametrize("order,flags,counter,gb_per_s", [
    (0, 0, "bytes_zeroed_4k", 13.7),
    (9, GUEST_MEMFD_FLAG_HUGETLB, "bytes_zeroed_2m", 15.1),
    (18, GUEST_MEMFD_FLAG_HUGETLB, "bytes_zeroed_1g", 38.0),
])
def test_zeroing_bandwidth_by_chunk_size(order, flags, counter, gb_per_s):
    """Zeroing 4 GiB as the backing allocates it: 13.7 GB/s in 4 KiB chunks, 15.1 GB/s at
    2 MiB, 38 GB/s at 1 GiB (AMD Milan)."""
    g = GuestMemfd(4 * GIB, flags, page_order=order, vm_type="snp")
    g.fallocate(1, 0, g.size)
    c = dict(g.counters)
    assert c[counter] == 4 * GIB
    est = CostModel.from_profile("snp").estimate(c)
    assert within_2x(est.by_counter[counter], 4 * GIB / gb_per_s)


def test_tdx_accept_fault_costs_about_8us_per_page():
    """A TDX accept fault (exit, TDH.MEM.PAGE.AUG, TDG.MEM.PAGE.ACCEPT) ~8 µs per 4 KiB."""
    vm, _ = guest("tdx", 64 << 20)
    n = 1000
    before = dict(vm.counters)
    for k in range(n):
        vm.guest_accept(k * PAGE_SIZE, PAGE_SIZE, chunk=PAGE_SIZE)
    est = CostModel.from_profile("tdx").estimate(delta(before, vm.counters))
    assert within_2x(est.total_ns / n, 8000), est.table()


def test_tlb_flush_switches_to_a_full_flush_above_33_pages():
    """A single-page INVLPG ~100 ns; above 33 pages the kernel flushes everything."""
    for npages, full in ((33, False), (34, True)):
        g = GuestMemfd(1 << 20, 3)
        g.host_write(0, bytes(npages * PAGE_SIZE))
        before = dict(g.counters)
        g.set_memory_attributes(0, npages * PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        d = delta(before, g.counters)
        assert (d["tlb_flush_full"], d["tlb_invlpg"]) == ((1, 0) if full else (0, npages))
        est = CostModel.from_profile("sw-protected").estimate(d)
        if not full:
            assert within_2x(est.by_counter["tlb_invlpg"], npages * 100)
