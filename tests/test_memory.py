"""Host memory per VM (docs/model.md §13): each figure against a count worked out by hand
on a small guest, from the rules and the per-byte figures of §13 (64 bytes of struct page
per 4 KiB, one vmemmap page kept per huge folio, 4 KiB page-table pages of 512 entries,
576-byte xarray nodes of 64 slots, 256-byte maple nodes holding about 11 ranges, 16-byte
RMP entries, a page pair of Dynamic PAMT per 2 MiB region); device assignment's pins and
IOMMU mappings on conversion; the discard policies' effect on resident memory and work.
"""
from __future__ import annotations

import numpy as np
import pytest

from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                      GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM, GmemError)
from gmemfast.memory import (Vfio, blocks_touched, host_memory, maple_nodes, range_blocks,
                             timeline_figures, xarray_nodes)
from gmemfast.scenarios import TRACE_SCENARIO, Runner, resolve_params, run_scenario
from gmemfast.scenarios.running import cost_model_for
from gmemfast.sweep import result_fields

P = 4096
M2 = 2 << 20
G1 = 1 << 30
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _vm(vm_type="snp", size=4 << 20, *, in_place=True, order=0, **policies):
    vm = VM(vm_type, in_place=in_place, **policies)
    flags = GUEST_MEMFD_FLAG_MMAP if in_place else 0
    if order:
        flags |= GUEST_MEMFD_FLAG_HUGETLB
    g = vm.create_guest_memfd(size, flags, page_order=order)
    vm.set_user_memory_region(0, 0, size, g)
    return vm, g


def _delta(vm, before):
    after = dict(vm.counters)
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# ------------------------------------------------------------------ resident and pinned

def test_resident_and_pinned_in_place_by_hand():
    vm, g = _vm("snp")                                  # 1024 pages, all private holes
    vm.guest_accept(0, M2, mapping=P)                   # pages 0..511 allocated, RMP-validated
    g.set_memory_attributes(0, 16 * P, 0)               # 16 shared (given back by the RMP)
    g.fallocate(PUNCH, 100 * P, 4 * P)                  # 4 private pages freed
    g.pin(0, 2 * P)                                     # 2 shared pages pinned
    mem = host_memory(vm, mapping=P)
    # allocated 512 - 4 = 508: 16 shared, 492 private; the RMP holds the 492
    assert mem["resident"] == {"shared": 16 * P, "private": 492 * P, "separate_shared": 0,
                               "doubly_allocated": 0, "unused_private": 0, "total": 508 * P}
    assert mem["pinned"] == {"shared": 2 * P, "private": 492 * P, "total": 494 * P}
    assert timeline_figures(vm) == {"resident_shared": 16 * P, "resident_private": 492 * P,
                                    "separate_shared": 0, "pinned_shared": 2 * P, "iommu_mappings": 0}


def test_sw_protected_memory_has_no_trusted_entity_pins_or_host_wide_tables():
    vm, g = _vm("sw-protected")
    vm.guest_accept(0, M2)
    mem = host_memory(vm)
    assert mem["resident"]["private"] == 512 * P and mem["pinned"]["private"] == 0
    assert mem["host_wide"] == {}


def test_legacy_separate_shared_memory_and_gfns_allocated_twice():
    vm, g = _vm("snp", in_place=False)
    vm.set_memory_attributes(0, 4 << 20, PRIVATE)
    vm.guest_accept(0, M2, mapping=P)                   # 512 private pages allocated
    vm.set_memory_attributes(0, 8 * P, 0)               # GFNs 0..7 shared, private pages kept
    vm.guest_write(0, b"x" * (3 * P), private=False)    # 3 separate shared pages written
    assert vm.fault_shared(0, 8 * P) == 5               # the other 5 touched: 8 in all
    mem = host_memory(vm, mapping=P)
    r = mem["resident"]
    assert r["separate_shared"] == r["shared"] == 8 * P
    assert r["private"] == 512 * P                      # guest_memfd: private memory only
    assert r["unused_private"] == 8 * P                 # private pages of GFNs now shared
    assert r["doubly_allocated"] == 8 * P               # both copies of GFNs 0..7
    assert r["total"] == 520 * P
    # the VMM discards its copies of GFNs 4..11: 4 were resident
    before = dict(vm.counters)
    assert vm.discard_shared(4 * P, 8 * P) == 4
    assert _delta(vm, before) == {"shared_discards": 1, "pages_freed": 4, "host_ptes_zapped": 4,
                                  "tlb_invlpg": 4, "tlb_shootdowns": 1}
    assert vm.shared_memory_pages() == 4
    assert vm.guest_read(P, 3, private=False) == b"xxx"
    g.fallocate(PUNCH, 0, 8 * P)                        # discard on share: the private pages go
    r = host_memory(vm, mapping=P)["resident"]
    assert (r["doubly_allocated"], r["unused_private"], r["private"]) == (0, 0, 504 * P)


def test_separate_memory_faults_count_allocation_and_gaps_are_efault():
    vm = VM("sw-protected")
    vm.set_user_memory_region(0, 0, 1 << 20, None)      # ordinary memslot: 256 pages
    before = dict(vm.counters)
    assert vm.fault_shared(0, 10 * P) == 10 and vm.fault_shared(5 * P, 10 * P) == 5
    assert _delta(vm, before) == {"host_faults": 15, "pages_allocated": 15, "pages_zeroed": 15,
                                  "bytes_zeroed_4k": 15 * P}
    with pytest.raises(GmemError) as info:
        vm.fault_shared(0, 2 << 20)                     # past the memslot
    assert info.value.errno == 14 and vm.shared_memory_pages() == 15
    assert host_memory(vm)["resident"]["shared"] == 15 * P
    # memory shared in place is guest_memfd memory, not separate
    vm2, _g = _vm("sw-protected")
    assert vm2.fault_shared(0, M2) == 0 and vm2.shared_memory_pages() == 0


# ------------------------------------------------------------------ metadata

def test_vmemmap_with_and_without_hvo_by_hand():
    vm, g = _vm("sw-protected", 8 << 20, order=9)       # four 2 MiB blocks
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 2 * M2)         # two huge folios
    m = host_memory(vm)["metadata"]
    assert (m["vmemmap"], m["vmemmap_without_hvo"]) == (2 * P, 1024 * 64)
    before = dict(vm.counters)
    g.set_memory_attributes(M2, P, 0)                   # block 1 splits to 512 4 KiB folios
    m = host_memory(vm)["metadata"]
    assert m["vmemmap"] == 512 * 64 + 1 * P             # block 1's struct pages, block 0's kept page
    assert m["vmemmap_without_hvo"] == 1024 * 64
    assert m["vmemmap"] - 2 * P == _delta(vm, before)["vmemmap_pages_restored"] * P


def test_vmemmap_of_a_1g_folio():
    vm, g = _vm("sw-protected", G1, order=18)
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, G1)
    m = host_memory(vm)["metadata"]
    assert (m["vmemmap"], m["vmemmap_without_hvo"]) == (P, (G1 // P) * 64)


def test_direct_map_page_tables_by_hand():
    vm, g = _vm("sw-protected", 2 * G1, direct_map="on-conversion")
    assert host_memory(vm)["metadata"]["direct_map_tables"] == 0
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, P)              # a private page leaves the direct map:
    m = host_memory(vm)["metadata"]                     # its 1G entry -> 2M, its 2M entry -> 4K
    assert m["direct_map_tables"] == 2 * P
    g.fallocate(FALLOC_FL_KEEP_SIZE, 5 * M2, P)         # another 2 MiB entry of the same 1 GiB
    assert host_memory(vm)["metadata"]["direct_map_tables"] == 3 * P
    c = vm.counters
    assert (c["dmap_splits_1g"] + c["dmap_splits_2m"]) * P == 3 * P


def test_snp_4k_rmp_entries_split_the_direct_map():
    """adjust_direct_map(): an RMPUPDATE at 4 KiB breaks the direct map around the page;
    a 2 MiB RMP entry does not."""
    vm, g = _vm("snp", 2 * G1)
    vm.guest_accept(0, M2, mapping=P)                   # 512 pages, 4 KiB RMP entries
    vm.guest_accept(G1, P, chunk=P, mapping=P)          # one page in the second 1 GiB block
    assert host_memory(vm, mapping=P)["metadata"]["direct_map_tables"] == (2 + 2) * P
    vm2, g2 = _vm("snp", 4 << 20, order=9)
    vm2.guest_accept(0, M2, mapping=M2)                 # a huge folio under a 2 MiB RMP entry
    assert host_memory(vm2, mapping=M2)["metadata"]["direct_map_tables"] == 0
    assert host_memory(vm2, mapping=P)["metadata"]["direct_map_tables"] == 2 * P


@pytest.mark.parametrize("private,nodes", [
    ([(0, 64)], 1),                       # one leaf, the root
    ([(0, 65)], 2 + 1),                   # two leaves under a root
    ([(0, 256)], 4 + 1),
    ([(0, 64), (128, 256)], 3 + 1),       # a leaf of shared GFNs holds nothing
    ([(1 << 18, (1 << 18) + 1)], 4),      # index 2^18 needs four levels: one node each
    ([(0, 1)], 0),                        # a lone entry at index 0 lives in the head
])
def test_legacy_xarray_nodes_by_hand(private, nodes):
    vm = VM("snp", in_place=False)
    for s, e in private:
        vm.set_memory_attributes(s * P, (e - s) * P, PRIVATE)
    assert xarray_nodes(vm.private_gfn_ranges()) == nodes
    assert host_memory(vm)["metadata"]["attributes"] == nodes * 576


def test_in_place_maple_tree_by_hand():
    vm, g = _vm("sw-protected", 1 << 20)                # 256 pages: one private range
    assert host_memory(vm)["metadata"]["attributes"] == 256
    for p in range(0, 128, 2):                          # 64 shared pages between private ones
        g.set_memory_attributes(p * P, P, 0)
    assert g.attribute_ranges == 128                    # shared 0, private 1, ..., private 127-255
    # 128 ranges: 12 leaves of up to 11, then 2 parents, then the root
    assert host_memory(vm)["metadata"]["attributes"] == (12 + 2 + 1) * 256
    assert maple_nodes(11) == 1 and maple_nodes(12) == 3 and maple_nodes(0) == 0


def test_tdx_dynamic_pamt_and_pamt_share_by_hand():
    vm, g = _vm("tdx", 8 << 20)
    vm.guest_accept(0, M2, mapping=P)                   # region 0
    vm.guest_accept(3 * M2, P, chunk=P, mapping=P)      # region 3
    mem = host_memory(vm, mapping=P)
    assert mem["metadata"]["dynamic_pamt"] == 2 * 2 * P
    assert mem["pinned"]["private"] == 513 * P          # the secure EPT maps 513 pages
    pages = (8 << 20) // P
    assert mem["host_wide"] == {"tdx_pamt": pages * 16 + 4 * 16 + 0,
                                "tdx_pamt_with_dynamic": 4 * 16 + pages // 8}


def test_snp_rmp_is_host_wide_not_in_the_vm_total():
    vm, g = _vm("snp", G1)
    mem = host_memory(vm)
    assert mem["host_wide"] == {"snp_rmp": (G1 // P) * 16}          # 4 MiB per GiB
    assert mem["total"] == mem["resident"]["total"] + mem["metadata"]["total"]


# ------------------------------------------------------------------ counting helpers

def _naive_blocks(hit: np.ndarray, p0: int, p1: int, block: int) -> int:
    return sum(1 for k in range(p0 // block, (p1 - 1) // block + 1)
               if hit[max(p0, k * block):min(p1, (k + 1) * block)].any())


@pytest.mark.parametrize("seed", range(6))
def test_blocks_touched_against_every_block(seed):
    rng = np.random.default_rng(seed)
    n = 3 * (1 << 18) + 1000
    hit = np.zeros(n, bool)
    kind = seed % 3
    if kind == 0:
        hit[rng.integers(0, n, 300)] = True                       # sparse
    elif kind == 1:
        hit[:] = True
        hit[rng.integers(0, n, 400)] = False                      # dense, a few missing
    else:
        for s in rng.integers(0, n, 20):                          # runs
            hit[s:s + int(rng.integers(1, 5000))] = True
    csum = np.concatenate([[0], np.cumsum(hit)])

    def count(a, b):
        return int(csum[b] - csum[a])
    for p0, p1 in ((0, n), (int(rng.integers(0, n // 2)), int(rng.integers(n // 2, n)))):
        for block in (512, 1 << 18):
            assert blocks_touched(count, p0, p1, block) == _naive_blocks(hit, p0, p1, block)


def test_range_blocks_and_xarray_nodes_against_sets():
    rng = np.random.default_rng(1)
    for _ in range(50):
        cuts = np.unique(rng.integers(0, 20000, 12))
        ranges = [(int(a), int(b)) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        members = {x for a, b in ranges for x in range(a, b)}
        for block in (64, 512, 4096):
            assert range_blocks(ranges, block) == len({x // block for x in members})
        if ranges and max(members) > 0:
            top, nodes, shift = max(members), 0, 6
            while True:
                nodes += len({x >> shift for x in members})
                if top >> shift == 0:
                    break
                shift += 6
            assert xarray_nodes(ranges) == nodes


# ------------------------------------------------------------------ VFIO

def test_vfio_pins_on_share_and_unpins_before_private_in_place():
    vm, g = _vm("snp")
    vm.guest_accept(0, M2, mapping=P)
    vfio = Vfio(vm)
    g.set_memory_attributes(0, 16 * P, 0)
    before = dict(vm.counters)
    assert vfio.map(0, 16 * P) == 16
    d = _delta(vm, before)
    assert (d["pins"], d["iommu_maps"]) == (16, 16)
    assert vfio.mappings == vfio.peak == 16 and vfio.map(0, 16 * P) == 0
    with pytest.raises(GmemError) as info:              # a pinned page cannot go private
        g.set_memory_attributes(3 * P, 2 * P, PRIVATE)
    assert info.value.errno == 11
    before = dict(vm.counters)
    assert vfio.unmap(3 * P, 2 * P) == [(3, 5)]
    g.set_memory_attributes(3 * P, 2 * P, PRIVATE)
    d = _delta(vm, before)
    # the pin over pages 0..15 is held as one; splitting it costs nothing beyond the 2 pages
    assert (d.get("pins", 0), d["unpins"], d["iommu_unmaps"]) == (0, 2, 2)
    assert vfio.mappings == 14 and vfio.peak == 16
    mem = host_memory(vm, mapping=P, vfio=vfio)
    assert mem["pinned"]["shared"] == 14 * P
    assert mem["vfio"]["iommu_mappings"] == 14
    # IOMMU tables: one leaf table (2 MiB of IOVA) and one table above it (1 GiB)
    assert mem["metadata"]["iommu_tables"] == 2 * P
    g.check()


def test_vfio_in_legacy_pins_separate_memory():
    vm, g = _vm("snp", in_place=False)
    vm.set_memory_attributes(0, 4 << 20, PRIVATE)
    vfio = Vfio(vm)
    vm.set_memory_attributes(0, 8 * P, 0)
    before = dict(vm.counters)
    vfio.map(0, 8 * P)                                  # the separate copies fault in, pinned
    d = _delta(vm, before)
    assert d == {"iommu_maps": 8, "pins": 8, "host_faults": 8, "pages_allocated": 8,
                 "pages_zeroed": 8, "bytes_zeroed_4k": 8 * P}
    before = dict(vm.counters)
    vfio.unmap(2 * P, 2 * P)
    assert _delta(vm, before) == {"iommu_unmaps": 2, "unpins": 2}
    mem = host_memory(vm, vfio=vfio)
    assert mem["pinned"]["shared"] == 6 * P and mem["resident"]["separate_shared"] == 8 * P


def test_vfio_mappings_against_vfio_limit():
    vm = VM("sw-protected")
    vm.set_user_memory_region(0, 0, 65536 * P, None)
    vfio = Vfio(vm)
    vfio.map(0, 65535 * P)
    v = host_memory(vm, vfio=vfio)["vfio"]
    assert (v["iommu_mappings"], v["over_limit"], v["dma_entry_limit"]) == (65535, False, 65535)
    vfio.map(65535 * P, P)
    v = host_memory(vm, vfio=vfio)["vfio"]
    assert v["over_limit"] and v["iommu_mappings_possible"] == 65536


# ------------------------------------------------------------------ the runner: policies

def _runner(**params):
    p = resolve_params(TRACE_SCENARIO, {"size": "64M", **params})
    return Runner(p, cost_model_for(p["platform"]))


def _run_delta(run, before):
    return _delta(run.vm, before)


def _counts(run):
    return dict(run.vm.counters)


@pytest.mark.parametrize("tracking", ["in-place", "legacy"])
def test_runner_vfio_on_conversion_by_hand(tracking):
    run = _runner(vfio=True, tracking=tracking)
    if tracking == "legacy":
        run.set_private_all()
    run.accept(0, run.size, M2)
    c0 = _counts(run)
    assert run.convert(0, M2, 0) == 0                  # 512 pages shared, mapped, pinned
    assert run.convert(10 * P, 2 * P, PRIVATE) == 0    # unmapped first, then private
    assert run.convert(10 * P, 2 * P, 0) == 0          # mapped again
    d = _run_delta(run, c0)
    assert (d["iommu_maps"], d["iommu_unmaps"], d["pins"], d["unpins"]) == (514, 2, 514, 2)
    mem = run.memory()
    assert mem["pinned"]["shared"] == 512 * P and mem["vfio"]["iommu_mappings_peak"] == 512
    assert not run.errors
    if tracking == "legacy":                             # the copies: 512, then 2 discarded, 2 back
        assert mem["resident"]["separate_shared"] == 512 * P
        # freed: the 512 private pages (discard on share), then 2 separate copies
        assert d["shared_discards"] == 1 and d["pages_freed"] == 512 + 2
    else:
        assert mem["resident"]["shared"] == 512 * P
        run.gmem.check()


def test_runner_discard_on_share_in_place_frees_and_counts():
    keep, punch = _runner(), _runner(discard_on_share=True)
    for run in (keep, punch):
        run.accept(0, run.size, M2)
    before = _counts(punch)
    punch.convert(0, M2, 0)
    keep.convert(0, M2, 0)
    d = _run_delta(punch, before)
    assert (d["punch_calls"], d["fallocate_calls"], d["pages_freed"]) == (1, 1, 512)
    assert keep.memory()["resident"]["shared"] == 512 * P
    assert punch.memory()["resident"]["shared"] == 0
    assert punch.memory()["resident"]["total"] == keep.memory()["resident"]["total"] - 512 * P


def test_runner_discard_on_share_with_vfio_refaults_the_pages():
    run = _runner(discard_on_share=True, vfio=True)
    run.accept(0, run.size, M2)
    before = _counts(run)
    run.convert(0, M2, 0)
    d = _run_delta(run, before)
    assert d["pages_freed"] == 512 and d["pages_allocated"] == 512 and d["host_faults"] == 512
    assert run.memory()["resident"]["shared"] == 512 * P


def test_runner_discard_on_private_in_place_leaves_holes_until_accepted():
    run = _runner(discard_on_private=True)
    run.accept(0, run.size, M2)
    run.convert(0, M2, 0)
    total = run.memory()["resident"]["total"]
    before = _counts(run)
    run.convert(0, M2, PRIVATE)
    assert _run_delta(run, before)["pages_freed"] == 512
    assert run.memory()["resident"]["total"] == total - 512 * P
    run.accept(0, M2, M2)
    assert run.memory()["resident"]["total"] == total


def test_runner_discard_keeps_preserved_contents():
    run = _runner(discard_on_private=True, platform="sw-protected")
    run.convert(0, P, 0)
    run.write(0, P, 0x5A)
    run.convert(0, P, PRIVATE, 1)                     # PRESERVE: the contents are wanted
    assert run.gmem.allocated_pages(0, P) == 1
    assert run.vm.guest_read(0, 4, private=True) == b"\x5a" * 4


@pytest.mark.parametrize("discard", [True, False])
def test_runner_legacy_discard_on_private(discard):
    run = _runner(tracking="legacy", discard_on_private=discard, vfio=True)
    run.set_private_all()
    run.accept(0, run.size, M2)
    run.convert(0, 4 * P, 0)                           # 4 shared copies (pinned by VFIO)
    before = _counts(run)
    run.convert(0, 4 * P, PRIVATE)
    run.accept(0, 4 * P, P)                            # the private pages come back
    d = _run_delta(run, before)
    r = run.memory()["resident"]
    if discard:
        assert d["shared_discards"] == 1 and r["separate_shared"] == 0 and r["doubly_allocated"] == 0
    else:
        assert "shared_discards" not in d
        assert r["separate_shared"] == 4 * P and r["doubly_allocated"] == 4 * P


@pytest.mark.parametrize("on_share", [True, False])
@pytest.mark.parametrize("on_private", [True, False])
def test_legacy_batches_match_one_item_at_a_time(on_share, on_private):
    """A batch of disjoint legacy conversions goes through the batched forms; with every
    discard policy it leaves what the same items one call at a time leave."""
    runs = [_runner(tracking="legacy", discard_on_share=on_share, discard_on_private=on_private)
            for _ in range(2)]
    rng = np.random.default_rng(7)
    offs = rng.choice(run_pages := runs[0].size // P, 64, replace=False) * P
    attrs = rng.integers(0, 2, 64) * PRIVATE
    for k, run in enumerate(runs):
        run.set_private_all()
        run.accept(0, run.size, M2)
        run.convert_many(offs, P, np.zeros(64, np.int64))      # every copy resident first
        run.write(int(offs[0]), P, 0x11)
        if k:                                                  # one call per item
            for off, a in zip(offs.tolist(), attrs.tolist()):
                assert run.convert(off, P, a) == 0
        else:
            assert not run.convert_many(offs, P, attrs).any()
    assert run_pages > 64
    a, b = runs
    assert _counts(a) == _counts(b)
    assert a.memory() == b.memory()
    assert a.vm.private_gfns(0, a.size) == b.vm.private_gfns(0, b.size)


def test_legacy_default_is_qemus_both_discards_and_in_place_none():
    legacy, in_place = _runner(tracking="legacy"), _runner()
    assert (legacy.discard_on_share, legacy.discard_on_private) == (True, True)
    assert (in_place.discard_on_share, in_place.discard_on_private) == (False, False)


# ------------------------------------------------------------------ results

def test_result_carries_memory_in_json_timeline_and_sweep_columns():
    res = run_scenario("swiotlb-churn", {"size": "256M", "conversions": 200, "in_flight": 8,
                                         "vfio": True})
    mem = res.memory
    d = res.to_dict()
    assert d["memory"]["resident"] == mem["resident"]
    last = res.timeline[-1]
    assert last["resident_shared"] == mem["resident"]["shared"]
    assert last["pinned_shared"] == mem["pinned"]["shared"]
    assert last["iommu_mappings"] == mem["vfio"]["iommu_mappings"] == 8
    row = result_fields(d)
    assert row["mem_total"] == mem["total"]
    assert row["mem_resident_private"] == mem["resident"]["private"]
    assert row["mem_vfio_iommu_mappings_peak"] == mem["vfio"]["iommu_mappings_peak"] >= 8
    c = res.counters
    assert c["iommu_maps"] - c["iommu_unmaps"] == 8


# ------------------------------------------------------------------ the command

def test_command_reports_host_memory(capsys):
    import json
    from gmemfast import cli
    assert cli.main(["run", "boot", "--size", "1G", "--vfio", "--json", "--no-progress"]) == 0
    d = json.loads(capsys.readouterr().out)
    v = d["memory"]["vfio"]
    # the SWIOTLB pool of a 1 GiB guest: 6% is below 64 MiB, so 64 MiB, one mapping per 4 KiB
    assert v["enabled"] and v["iommu_mappings"] == (64 << 20) // P and not v["over_limit"]
    assert d["params"]["vfio"] is True and d["params"]["discard_on_share"] is False
    assert cli.main(["run", "boot", "--size", "1G", "--legacy", "--no-discard-on-private",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "host memory" in out and "discard on share: yes, on private: no" in out
    assert cli.main(["compare", "boot", "--size", "1G", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "host memory (resident + metadata)" in out and "separate copies" in out


def test_command_refuses_a_bad_discard_value(capsys):
    from gmemfast import cli
    assert cli.main(["run", "boot", "--size", "1G", "-p", "discard_on_share=perhaps"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "discard_on_share" in err and "perhaps" in err
