"""Per-operation latency of every public ``GuestMemfd`` and ``VM`` operation on a 1 TiB
guest (pytest-benchmark).

    pytest benchmarks --benchmark-only                       # run (not part of the test suite)
    pytest benchmarks --benchmark-only --benchmark-autosave  # keep the run in .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare   # against the last saved run

The guest: an SNP VM, direct map removed on conversion, one 1 TiB guest_memfd on 1 GiB
pages, all of it accepted at 2 MiB (a booted guest), and a legacy (per-GFN) VM of the
same size for the legacy attribute calls. Each benchmark leaves the state as it found it
(an operation and its inverse, or the inverse done untimed in ``setup``) and checks that
the work was done. ``dump`` is left out: it is a page-by-page copy of the state by design.
"""
from __future__ import annotations

import numpy as np
import pytest

gm = pytest.importorskip("gmemfast")
pytest.importorskip("pytest_benchmark")

from gmemfast.bench import workloads as W  # noqa: E402

TIB = 1 << 40
GIB = 1 << 30
PS = 4096
P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = gm.FALLOC_FL_KEEP_SIZE | gm.FALLOC_FL_PUNCH_HOLE
KEEP = gm.FALLOC_FL_KEEP_SIZE
SHARED_PAGE = 7 * PS                 # kept shared for host access and pins
PAGES = W.roundtrip_pages(1000, size=TIB)


@pytest.fixture(scope="module")
def guest():
    W.warm_engine()
    vm = gm.VM("snp", direct_map="on-conversion")
    g = vm.create_guest_memfd(TIB, gm.GUEST_MEMFD_FLAG_HUGETLB | gm.GUEST_MEMFD_FLAG_MMAP, page_order=18)
    vm.set_user_memory_region(0, 0, TIB, g)
    vm.guest_accept(0, TIB, chunk=2 << 20)
    g.set_memory_attributes(SHARED_PAGE, PS, 0)
    return vm, g


@pytest.fixture(scope="module")
def legacy():
    W.warm_engine()
    vm = gm.VM("snp", in_place=False)
    g = vm.create_guest_memfd(TIB, gm.GUEST_MEMFD_FLAG_HUGETLB, page_order=18)
    vm.set_user_memory_region(0, 0, TIB, g)
    vm.set_memory_attributes(0, TIB, P)
    return vm, g


def _delta(g, names, fn, *args):
    before = {n: g.counters[n] for n in names}
    fn(*args)
    return {n: g.counters[n] - before[n] for n in names}


# ------------------------------------------------------------------- GuestMemfd
def test_set_memory_attributes_4k_round_trip(benchmark, guest):
    _vm, g = guest
    off = int(PAGES[0])

    def rt():
        g.set_memory_attributes(off, PS, 0)
        g.set_memory_attributes(off, PS, P)
    benchmark(rt)
    d = _delta(g, ("folio_splits_1g", "folio_merges_1g"), rt)
    assert d == {"folio_splits_1g": 1, "folio_merges_1g": 1} and g.folio_order(off) == 18


def test_set_memory_attributes_1g_round_trip(benchmark, guest):
    _vm, g = guest

    def rt():
        g.set_memory_attributes(GIB, GIB, 0)
        g.set_memory_attributes(GIB, GIB, P)
    benchmark(rt)
    d = _delta(g, ("pages_to_shared", "pages_to_private"), rt)
    assert d == {"pages_to_shared": GIB // PS, "pages_to_private": GIB // PS}


def test_set_memory_attributes_many_1000_pages_round_trip(benchmark, guest):
    _vm, g = guest
    offs = PAGES

    def rt():
        a = g.set_memory_attributes_many(offs, PS, 0)
        b = g.set_memory_attributes_many(offs, PS, P)
        return a, b
    a, b = benchmark(rt)
    assert not a.errno.any() and not b.errno.any()
    assert g.is_private(int(offs[0])) and not g.is_private(SHARED_PAGE)


def test_fallocate_punch_and_allocate_1g(benchmark, guest):
    _vm, g = guest
    off = 5 * GIB

    def rt():
        g.fallocate(PUNCH, off, GIB)
        g.fallocate(KEEP, off, GIB)
    benchmark(rt)
    d = _delta(g, ("pages_freed", "pages_allocated"), rt)
    assert d == {"pages_freed": GIB // PS, "pages_allocated": GIB // PS} and g.folio_order(off) == 18


def test_fallocate_many_16_blocks(benchmark, guest):
    _vm, g = guest
    offs = np.arange(16, 32, dtype=np.int64) * GIB

    def rt():
        a = g.fallocate_many(PUNCH, offs, GIB)
        b = g.fallocate_many(KEEP, offs, GIB)
        return a, b
    a, b = benchmark(rt)
    assert not a.errno.any() and not b.errno.any() and g.allocated_pages(16 * GIB, 16 * GIB) == 16 * GIB // PS


def test_host_write_and_read_4k(benchmark, guest):
    _vm, g = guest
    data = b"\x5a" * PS

    def rw():
        g.host_write(SHARED_PAGE, data)
        return g.host_read(SHARED_PAGE, PS)
    assert benchmark(rw) == data


def test_pin_and_release(benchmark, guest):
    _vm, g = guest

    def pr():
        p = g.pin(SHARED_PAGE)
        p.release()
        return p
    assert benchmark(pr).released and not g.pins


@pytest.mark.parametrize("query", ["is_private", "private_pages", "allocated_pages", "folio_order",
                                   "huge_folios", "attribute_ranges", "direct_map_entries",
                                   "memory_footprint", "page_words_1m", "te_states_1m", "counters",
                                   "policies", "mmap", "inject_enomem_0"])
def test_query(benchmark, guest, query):
    _vm, g = guest
    calls = {
        "is_private": lambda: g.is_private(int(PAGES[1]), PS),
        "private_pages": lambda: g.private_pages(),
        "allocated_pages": lambda: g.allocated_pages(),
        "folio_order": lambda: g.folio_order(int(PAGES[2])),
        "huge_folios": lambda: g.huge_folios(),
        "attribute_ranges": lambda: g.attribute_ranges,
        "direct_map_entries": lambda: g.direct_map_entries(),
        "memory_footprint": lambda: g.memory_footprint(),
        "page_words_1m": lambda: g.page_words(0, 1 << 20),
        "te_states_1m": lambda: g.te_states(0, 1 << 20),
        "counters": lambda: g.counters,
        "policies": lambda: g.policies,
        "mmap": lambda: g.mmap(),
        "inject_enomem_0": lambda: g.inject_enomem(0),
    }
    got = benchmark(calls[query])
    want = {
        "is_private": True, "private_pages": TIB // PS - 1, "allocated_pages": TIB // PS,
        "folio_order": 18, "attribute_ranges": 3,
    }
    if query in want:
        assert got == want[query]
    elif query == "huge_folios":
        assert got == TIB // GIB - 1
    elif query in ("page_words_1m", "te_states_1m"):
        assert len(got) == 256
    elif query == "direct_map_entries":
        assert sum(got.values()) > TIB // GIB


def test_check(benchmark, guest):
    _vm, g = guest
    assert benchmark(g.check) is None


def test_save_and_load(benchmark, guest, tmp_path):
    _vm, g = guest
    path = str(tmp_path / "guest.npz")

    def sl():
        g.save(path)
        return gm.GuestMemfd.load(path)
    copy = benchmark(sl)
    assert copy.private_pages() == g.private_pages() and copy.huge_folios() == g.huge_folios()


# ------------------------------------------------------------------- VM
def test_guest_accept_4k_after_give_back(benchmark, guest):
    vm, g = guest
    off = int(PAGES[3])

    def give_back():              # untimed: the page goes shared and back, unaccepted
        g.set_memory_attributes(off, PS, 0)
        g.set_memory_attributes(off, PS, P)
    n = benchmark.pedantic(vm.guest_accept, args=(off, PS), kwargs={"chunk": PS},
                           setup=give_back, rounds=200)
    assert n == 1 and g.te_states(off, PS)[0] != 0


def test_guest_accept_many_1000_pages_after_give_back(benchmark, guest):
    vm, g = guest
    offs = PAGES

    def give_back():
        g.set_memory_attributes_many(offs, PS, 0)
        g.set_memory_attributes_many(offs, PS, P)
    r = benchmark.pedantic(vm.guest_accept_many, args=(offs, PS), kwargs={"chunk": PS},
                           setup=give_back, rounds=100)
    assert not r.errno.any() and (r.value == 1).all()


def test_guest_write_and_read_private_4k(benchmark, guest):
    vm, _g = guest
    gpa = int(PAGES[4])
    data = b"\xa5" * PS

    def rw():
        vm.guest_write(gpa, data, private=True)
        return vm.guest_read(gpa, PS, private=True)
    assert benchmark(rw) == data


def test_set_user_memory_region_add_and_delete(benchmark, guest):
    vm, _g = guest

    def ad():
        vm.set_user_memory_region(9, 2 * TIB, 1 << 20, None)
        vm.set_user_memory_region(9, 2 * TIB, 0, None)
    benchmark(ad)
    assert 9 not in vm.memslots


def test_create_guest_memfd_1t(benchmark, guest):
    vm, _g = guest
    files = len(vm.gmems)
    g = benchmark.pedantic(vm.create_guest_memfd, args=(TIB, gm.GUEST_MEMFD_FLAG_HUGETLB),
                           kwargs={"page_order": 18}, rounds=20)
    assert g.size == TIB and len(vm.gmems) == files + 20
    del vm.gmems[files:]


@pytest.mark.parametrize("query", ["is_private", "private_pages", "memslot_for", "counters",
                                   "attribute_ranges"])
def test_vm_query(benchmark, guest, query):
    vm, _g = guest
    calls = {
        "is_private": lambda: vm.is_private(int(PAGES[5])),
        "private_pages": lambda: vm.private_pages(),
        "memslot_for": lambda: vm.memslot_for(int(PAGES[5])),
        "counters": lambda: vm.counters,
        "attribute_ranges": lambda: vm.attribute_ranges(),
    }
    got = benchmark(calls[query])
    if query == "is_private":
        assert got is True
    elif query == "private_pages":
        assert got == TIB // PS - 1
    elif query == "memslot_for":
        assert got.slot == 0


def test_legacy_set_memory_attributes_4k_round_trip(benchmark, legacy):
    vm, _g = legacy
    gpa = int(PAGES[6])

    def rt():
        vm.set_memory_attributes(gpa, PS, 0)
        vm.set_memory_attributes(gpa, PS, P)
    benchmark(rt)
    assert vm.private_gfns(0, TIB) == TIB // PS


def test_legacy_set_memory_attributes_many_1000_pages_round_trip(benchmark, legacy):
    vm, _g = legacy

    def rt():
        a = vm.set_memory_attributes_many(PAGES, PS, 0)
        b = vm.set_memory_attributes_many(PAGES, PS, P)
        return a, b
    a, b = benchmark(rt)
    assert not a.errno.any() and not b.errno.any() and vm.private_gfns(0, TIB) == TIB // PS


def test_legacy_private_gfns(benchmark, legacy):
    vm, _g = legacy
    assert benchmark(vm.private_gfns, 0, TIB) == TIB // PS


@pytest.mark.parametrize("platform", ["snp", "tdx"])
def test_launch_synthetic_ovmf(benchmark, platform):
    """A whole launch: SNP_LAUNCH_UPDATE / TDX init_mem_region of each page, then
    LAUNCH_FINISH / finalize, through ``snp_measure_ovmf`` / ``tdx_measure_ovmf``."""
    from gmemfast.firmware import synthetic_ovmf
    W.warm_engine()
    image = synthetic_ovmf()
    measure = gm.snp_measure_ovmf if platform == "snp" else gm.tdx_measure_ovmf
    kw = {"vcpus": 2} if platform == "snp" else {}
    want = measure(image, **kw).digest
    assert benchmark(measure, image, **kw).digest == want
