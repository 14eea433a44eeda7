"""The benchmark baselines are correct: they agree with each other, and with the engine.

``benchmarks/baselines.py`` holds the two models the engine's speed is compared with
(a pyroaring model and a dense numpy model).  A ratio against a wrong baseline means
nothing, so here both run the same random conversion sequences (biased to 64-page,
block and file edges, with allocation and pins mixed in) and must give the same
answers after every step; when ``gmemfast`` is importable the engine runs alongside.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest

pytest.importorskip("pyroaring")
from gmemfast.bench.baselines import DenseModel, RoaringModel  # noqa: E402

try:
    import gmemfast
    from gmemfast import GuestMemfd  # noqa: F401
except Exception:  # engine not there yet
    gmemfast = None

PAGE = 4096

# (npages, page_order): 4 KiB backing, 2 MiB backing, 1 GiB backing (2 blocks).
CONFIGS = [(4096, 0), (8 * 512, 9), (2 << 18, 18)]


class EngineAdapter:
    """The engine behind the baselines' page-based interface."""

    def __init__(self, npages, page_order=0, init_private=True):
        g = gmemfast
        flags = g.GUEST_MEMFD_FLAG_MMAP
        if page_order:
            flags |= g.GUEST_MEMFD_FLAG_HUGETLB
        if not init_private:
            flags |= g.GUEST_MEMFD_FLAG_INIT_SHARED
        self.g = g.GuestMemfd(npages * PAGE, flags, page_order=page_order)
        self.order = page_order
        self.pins = {}
        self.last_error_page = -1

    def _call(self, fn, *args):
        try:
            fn(*args)
        except gmemfast.GmemError as e:
            if e.error_offset is not None:
                self.last_error_page = e.error_offset // PAGE
            return e.errno
        return 0

    def convert(self, first, n, private):
        attrs = gmemfast.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        return self._call(self.g.set_memory_attributes, first * PAGE, n * PAGE, attrs)

    def fallocate(self, first, n):
        return self._call(self.g.fallocate, gmemfast.FALLOC_FL_KEEP_SIZE, first * PAGE, n * PAGE)

    def pin(self, p):
        try:
            pin = self.g.pin(p * PAGE)
        except gmemfast.GmemError as e:
            return e.errno
        self.pins.setdefault(p, []).append(pin)
        return 0

    def unpin(self, p):
        lst = self.pins.get(p)
        if not lst:
            return errno.EINVAL
        lst.pop().release()
        return 0

    def private_pages(self, first=0, n=None):
        if n is None:
            return self.g.private_pages()
        return self.g.private_pages(first * PAGE, n * PAGE)

    def is_private(self, first, n=1):
        return self.g.is_private(first * PAGE, n * PAGE)

    def folio_order(self, p):
        return self.g.folio_order(p * PAGE)

    @property
    def splits(self):
        return self.g.counters["folio_splits_1g" if self.order == 18 else "folio_splits_2m"]

    @property
    def merges(self):
        return self.g.counters["folio_merges_1g" if self.order == 18 else "folio_merges_2m"]


def _edge_page(rng, npages, block):
    kind = rng.integers(5)
    if kind == 0:
        return int(rng.integers(npages))
    if kind == 1:
        return int(rng.choice([0, npages - 1, npages - 2]))
    step = [64, 512, block, block][kind - 2]
    base = int(rng.integers(npages // step + 1)) * step
    return int(min(max(base + int(rng.integers(-1, 2)), 0), npages - 1))


def _length(rng, first, npages, block):
    n = int(rng.choice([1, 1, 2, 63, 64, 65, 511, 512, 513, block, block + 1, npages]))
    return max(1, min(n, npages - first))


def random_ops(seed, npages, order, nops, pins=True):
    rng = np.random.default_rng(seed)
    block = 1 << order if order else 512
    ops = []
    for _ in range(nops):
        r = rng.random()
        first = _edge_page(rng, npages, block)
        if r < 0.12:
            ops.append(("fallocate", first, _length(rng, first, npages, block)))
        elif pins and r < 0.20:
            ops.append(("pin", first))
        elif pins and r < 0.26:
            ops.append(("unpin", None))
        else:
            ops.append(("convert", first, _length(rng, first, npages, block), bool(rng.integers(2))))
    return ops


def _probe_pages(npages, order, op):
    block = 1 << order if order else 512
    pages = set(range(0, npages, block)) | {npages - 1}
    if op[0] in ("convert", "fallocate"):
        pages |= {op[1], op[1] + op[2] - 1}
    elif op[1] is not None:
        pages.add(op[1])
    return sorted(p for p in pages if 0 <= p < npages)


def run_and_compare(models, ops, npages, order, check_counts=True):
    pinned = []                   # pages pinned, in order, for "unpin" ops
    for step, op in enumerate(ops):
        if op[0] == "unpin":
            if not pinned:
                continue
            p = pinned.pop(0)
            op = ("unpin", p)
        results = []
        for m in models:
            m.last_error_page = -1
            if op[0] == "convert":
                rc = m.convert(op[1], op[2], op[3])
            elif op[0] == "fallocate":
                rc = m.fallocate(op[1], op[2])
            elif op[0] == "pin":
                rc = m.pin(op[1])
            else:
                rc = m.unpin(op[1])
            results.append((rc, m.last_error_page if rc == errno.EAGAIN else -1))
        if op[0] == "pin" and results[0][0] == 0:
            pinned.append(op[1])
        names = [type(m).__name__ for m in models]
        where = f"step {step} op {op}"
        assert len(set(results)) == 1, f"{where}: results differ {dict(zip(names, results))}"
        ref = models[0]
        for m in models[1:]:
            assert m.private_pages() == ref.private_pages(), f"{where}: private_pages {type(m).__name__}"
            if op[0] == "convert":
                for first, n in ((op[1], op[2]), (max(op[1] - 1, 0), op[2] + 1)):
                    n = min(n, npages - first)
                    assert m.is_private(first, n) == ref.is_private(first, n), f"{where}: is_private({first},{n})"
                    assert m.private_pages(first, n) == ref.private_pages(first, n), f"{where}: private_pages({first},{n})"
            for p in _probe_pages(npages, order, op):
                assert m.folio_order(p) == ref.folio_order(p), (
                    f"{where}: folio_order({p}) {type(m).__name__}={m.folio_order(p)} "
                    f"{type(ref).__name__}={ref.folio_order(p)}")
            if check_counts and order:
                assert (m.splits, m.merges) == (ref.splits, ref.merges), (
                    f"{where}: splits/merges {type(m).__name__}={(m.splits, m.merges)} "
                    f"{type(ref).__name__}={(ref.splits, ref.merges)}")


def _models(npages, order, engine):
    ms = [RoaringModel(npages, order), DenseModel(npages, order)]
    if engine:
        ms.append(EngineAdapter(npages, order))
    return ms


needs_engine = pytest.mark.skipif(gmemfast is None, reason="gmemfast engine not importable")


@pytest.mark.parametrize("npages,order", CONFIGS)
@pytest.mark.parametrize("seed", range(6))
def test_baselines_agree(npages, order, seed):
    ops = random_ops(seed, npages, order, 80)
    run_and_compare(_models(npages, order, False), ops, npages, order)


@pytest.mark.parametrize("npages,order", CONFIGS)
@pytest.mark.parametrize("seed", range(6))
def test_baselines_agree_allocated_first(npages, order, seed):
    """The benchmark situation: everything allocated (huge folios) before converting."""
    models = _models(npages, order, False)
    ops = [("fallocate", 0, npages)] + random_ops(100 + seed, npages, order, 80)
    run_and_compare(models, ops, npages, order)


def test_per_page_methods_match_convert():
    """The SWIOTLB fast path (to_shared_page / to_private_page) is the 1-page convert."""
    npages, order = 2 << 18, 18
    a, b, d = RoaringModel(npages, order), RoaringModel(npages, order), DenseModel(npages, order)
    for m in (a, b, d):
        m.fallocate(0, npages)
    rng = np.random.default_rng(7)
    pages = rng.choice(npages, 3000, replace=False).tolist()
    pages += pages[:50]                       # repeats are no-ops
    for p in pages:
        assert a.to_shared_page(p) == b.convert(p, 1, False) == d.to_shared_page(p) == 0
    assert a.splits == b.splits == d.splits == 2
    assert a.folio_order(0) == d.folio_order(0) == 0
    b.pin(pages[5])
    a.pin(pages[5])
    assert a.to_private_page(pages[5]) == errno.EAGAIN and a.last_error_page == pages[5]
    for p in pages:
        ra, rb = a.to_private_page(p), b.convert(p, 1, True)
        assert ra == rb
        assert d.to_private_page(p) == 0
    a.unpin(pages[5])
    b.unpin(pages[5])
    assert a.to_private_page(pages[5]) == b.convert(pages[5], 1, True) == 0
    for m in (a, b, d):
        assert m.private_pages() == npages
        assert (m.splits, m.merges) == (2, 2)
        assert m.folio_order(0) == m.folio_order(npages - 1) == 18


def test_swiotlb_churn_roundtrip():
    """Every 1 GiB block splits on the way to shared and merges back on the way home."""
    npages, order = 4 << 18, 18
    rng = np.random.default_rng(3)
    pages = rng.choice(npages, 5000, replace=False).tolist()
    r = RoaringModel(npages, order)
    r.fallocate(0, npages)
    for p in pages:
        r.to_shared_page(p)
    assert r.splits == 4 and len(r.split) == 4 and r.private_pages() == npages - 5000
    for p in pages:
        r.to_private_page(p)
    assert r.merges == 4 and not r.split and r.private_pages() == npages


def test_64tib_roaring_uses_64bit_bitmap():
    npages = 1 << 34
    r = RoaringModel(npages, 18)
    r.fallocate(0, npages)
    assert r.private_pages() == npages
    assert r.folio_order(npages - 1) == 18
    assert r.convert(npages - (1 << 18), 1 << 18, False) == 0
    assert r.folio_order(npages - 1) == 0 and r.private_pages() == npages - (1 << 18)
    assert r.convert(npages - (1 << 18), 1 << 18, True) == 0
    assert r.folio_order(npages - 1) == 18 and (r.splits, r.merges) == (1, 1)


@needs_engine
@pytest.mark.parametrize("npages,order", CONFIGS)
@pytest.mark.parametrize("seed", range(4))
def test_engine_agrees_with_baselines(npages, order, seed):
    ops = random_ops(200 + seed, npages, order, 60)
    run_and_compare(_models(npages, order, True), ops, npages, order)


@needs_engine
@pytest.mark.parametrize("npages,order", CONFIGS)
@pytest.mark.parametrize("seed", range(4))
def test_engine_agrees_allocated_first(npages, order, seed):
    ops = [("fallocate", 0, npages)] + random_ops(300 + seed, npages, order, 60)
    run_and_compare(_models(npages, order, True), ops, npages, order)


@needs_engine
def test_engine_batched_churn_matches_roaring():
    """The benchmark's batched SWIOTLB workload, small: same end state as the model."""
    npages, order = 4 << 18, 18
    g = gmemfast.GuestMemfd(npages * PAGE, gmemfast.GUEST_MEMFD_FLAG_HUGETLB, page_order=order)
    g.fallocate(gmemfast.FALLOC_FL_KEEP_SIZE, 0, g.size)
    r = RoaringModel(npages, order)
    r.fallocate(0, npages)
    rng = np.random.default_rng(11)
    pages = rng.choice(npages, 5000, replace=False)
    res = g.set_memory_attributes_many(pages * PAGE, PAGE, 0)
    assert not np.asarray(res.errno).any()
    for p in pages.tolist():
        r.to_shared_page(p)
    assert g.private_pages() == r.private_pages()
    assert [g.folio_order(b << 30) for b in range(4)] == [r.folio_order(b << 18) for b in range(4)] == [0] * 4
    res = g.set_memory_attributes_many(pages * PAGE, PAGE, gmemfast.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert not np.asarray(res.errno).any()
    for p in pages.tolist():
        r.to_private_page(p)
    assert g.private_pages() == r.private_pages() == npages
    assert [g.folio_order(b << 30) for b in range(4)] == [18] * 4
    assert (g.counters["folio_splits_1g"], g.counters["folio_merges_1g"]) == (r.splits, r.merges)
