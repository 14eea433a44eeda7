"""Paths that ordinary runs rarely take, each run on purpose and compared with the
reference or with expectations worked out by hand: a batch that grows the pools half way,
the content-modes policy, batched conversion in legacy mode, populate sources that run
short, and accept chunks the guest cannot use."""
from __future__ import annotations

import errno

import numpy as np
import pytest

import naive
import gmemfast
from conftest import assert_same_counters, assert_same_state
from gmemfast import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                      KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE, KVM_SET_MEMORY_ATTRIBUTES2_ZERO,
                      KVM_SEV_SNP_PAGE_TYPE_NORMAL, VM, GmemError, GmemRange)

P = 4096
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


@pytest.fixture
def small_pools(monkeypatch):
    """Start every pool at its minimum, so a batch has to grow them on the way."""
    from gmemfast import _store
    monkeypatch.setattr(_store, "_POOL_FIRST_BYTES", 0)


def _scattered_batch(npages, nblocks, rng):
    """Six pages in each of ``nblocks`` 2 MiB blocks: every block needs a page table."""
    blocks = rng.choice(npages // 512, nblocks, replace=False)
    pages = (blocks[:, None] * 512 + rng.choice(512, 6, replace=False)[None, :]).ravel()
    return rng.permutation(pages).astype(np.int64)


def test_batch_that_grows_the_pools_half_way(small_pools):
    """Hundreds of page tables in one batch: the kernel stops, the pools grow, the batch
    resumes where it stopped. Every item's result and the final state match the
    reference applying the items one by one."""
    from gmemfast import _kernels as K
    size = 1 << 30
    eng = gmemfast.GuestMemfd(size, GUEST_MEMFD_FLAG_MMAP)
    ref = naive.GuestMemfd(size, GUEST_MEMFD_FLAG_MMAP)
    start_cap = int(eng.store._meta[K.M_CAP0])
    rng = np.random.default_rng(7)
    pages = _scattered_batch(size // P, 3 * start_cap, rng)
    offs = pages * P
    attrs = np.where(np.arange(len(offs)) % 7 == 3, PRIVATE, 0)    # a few no-ops among them
    offs[11] += 8                                                  # and one bad item
    e = eng.set_memory_attributes_many(offs, P, attrs)
    r = ref.set_memory_attributes_many(offs.tolist(), P, attrs.tolist())
    assert int(eng.store._meta[K.M_CAP0]) > start_cap, "the batch did not grow the pools"
    assert e.errno.tolist() == r.errno and e.error_offset.tolist() == r.error_offset
    assert e.errno[11] == errno.EINVAL and (e.errno == 0).sum() == len(offs) - 1
    assert_same_state(eng, ref, "after a batch that grew the pools")
    assert_same_counters(eng, ref, naive.COUNTERS)
    eng.check()


@pytest.mark.parametrize("batched", [False, True])
def test_content_modes_policy_off(batched):
    """content_modes=False: any content flag is EOPNOTSUPP at the range's start, nothing
    changes; without flags the conversion works."""
    kw = {"content_modes": False}
    eng = gmemfast.GuestMemfd(16 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, **kw)
    ref = naive.GuestMemfd(16 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, **kw)
    for g in (eng, ref):
        g.host_write(0, b"keep")
    for flags in (KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE, KVM_SET_MEMORY_ATTRIBUTES2_ZERO):
        for attrs in (PRIVATE, 0):
            if batched:
                results = [g.set_memory_attributes_many([0, 4 * P], [2 * P, P], attrs, flags)
                           for g in (eng, ref)]
                assert results[0].errno.tolist() == results[1].errno == [errno.EOPNOTSUPP] * 2
                assert results[0].error_offset.tolist() == results[1].error_offset == [0, 4 * P]
            else:
                for g in (eng, ref):
                    with pytest.raises(GmemError) as info:
                        g.set_memory_attributes(4 * P, 2 * P, attrs, flags)
                    assert info.value.errno == errno.EOPNOTSUPP and info.value.error_offset == 4 * P
    assert_same_state(eng, ref, "after refused content modes")
    assert_same_counters(eng, ref, naive.COUNTERS)
    assert eng.counters["convert_eopnotsupp"] == (8 if batched else 4)
    for g in (eng, ref):
        g.set_memory_attributes(0, 2 * P, PRIVATE)          # no flag: fine
    assert_same_state(eng, ref, "after a conversion without flags")


def test_batched_conversion_on_a_legacy_vm():
    """A legacy VM keeps attributes per GFN: every item of a batch on its file is ENOTTY,
    counted as a refused call, and nothing changes."""
    vm = VM("sw-protected", in_place=False)
    g = vm.create_guest_memfd(16 * P, GUEST_MEMFD_FLAG_MMAP)
    before = g.dump()
    r = g.set_memory_attributes_many(np.arange(0, 4 * P, P), P, 0)
    assert r.errno.tolist() == [errno.ENOTTY] * 4 and r.error_offset.tolist() == [-1] * 4
    assert g.counters["convert_calls"] == g.counters["convert_einval"] == 4
    assert (g.dump()["private"] == before["private"]).all()


def _snp_legacy(npages=8):
    vm = VM("snp", in_place=False)
    g = vm.create_guest_memfd(npages * P, 0)
    vm.set_user_memory_region(0, 0, npages * P, g)
    vm.set_memory_attributes(0, npages * P, PRIVATE)
    return vm, g


def test_snp_source_that_runs_short():
    """A source buffer shorter than the range: the pages it covers are populated, the call
    returns them done; the next call (first page past the source) is EFAULT."""
    vm, g = _snp_legacy()
    src = b"\x01" * (2 * P + 100)                    # two whole pages and a bit
    upd = vm.snp_launch_update(0, src, 4 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert (upd.gfn_start, upd.len) == (2, 2 * P)
    assert bytes(upd.uaddr) == b"\x01" * 100
    assert g.te_states(0, 2 * P).all() and not g.te_states(2 * P, 2 * P).any()
    with pytest.raises(GmemError) as info:
        vm.snp_launch_update(upd.gfn_start, upd.uaddr, upd.len, upd.type)
    assert info.value.errno == errno.EFAULT and "source buffer ends" in str(info.value)
    assert not g.te_states(2 * P, 2 * P).any()
    assert vm.counters["snp_fw_launch_update"] == 2


def test_snp_guest_memfd_source_that_runs_short():
    vm = VM("snp")
    g = vm.create_guest_memfd(8 * P, GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region(0, 0, 8 * P, g)
    src = vm.create_guest_memfd(2 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    upd = vm.snp_launch_update(0, GmemRange(src, P), 3 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert (upd.gfn_start, upd.len) == (1, 2 * P)   # one page of the source is left
    with pytest.raises(GmemError) as info:
        vm.snp_launch_update(upd.gfn_start, upd.uaddr, upd.len, upd.type)
    assert info.value.errno == errno.EFAULT and "not a page inside the file" in str(info.value)


def test_tdx_source_that_runs_short():
    """TDX loops until done or an error: the error carries the region advanced past the
    pages done."""
    vm = VM("tdx", in_place=False)
    g = vm.create_guest_memfd(8 * P, 0)
    vm.set_user_memory_region(0, 0, 8 * P, g)
    vm.set_memory_attributes(0, 8 * P, PRIVATE)
    with pytest.raises(GmemError) as info:
        vm.tdx_init_mem_region(b"\x02" * (3 * P), 0, 5)
    assert info.value.errno == errno.EFAULT
    region = info.value.region
    assert (region.gpa, region.nr_pages) == (3 * P, 2) and len(region.source_addr) == 0
    assert g.te_states(0, 3 * P).all() and not g.te_states(3 * P, 5 * P).any()
    assert vm.counters["tdx_seamcall_page_add"] == 3


@pytest.mark.parametrize("chunk", [0, 8192, 1 << 30, 3 << 20, -4096])
def test_accept_chunks_the_guest_cannot_use(chunk):
    for V in (VM, naive.VM):
        vm = V("tdx")
        g = vm.create_guest_memfd(4 << 20, GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region(0, 0, 4 << 20, g)
        with pytest.raises(GmemError) as info:
            vm.guest_accept(0, 4 << 20, chunk=chunk)
        assert info.value.errno == errno.EINVAL
        assert not any(vm.counters.values())


def test_accept_not_aligned_to_its_chunk():
    vm = VM("snp")
    g = vm.create_guest_memfd(4 << 20, GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region(0, 0, 4 << 20, g)
    for gpa, size in ((P, 2 << 20), (0, (2 << 20) + P)):
        with pytest.raises(GmemError) as info:
            vm.guest_accept(gpa, size, chunk=2 << 20)
        assert info.value.errno == errno.EINVAL and "2048 KiB chunk" in str(info.value)
    assert g.allocated_pages() == 0
