"""Conversion speed at terabyte scale: gmemfast next to its baselines, same run.

Targets (issue "Scale and speed"):
1. ``WholeFileConversion``: 1 TiB never-allocated file private -> shared -> private,
   >= 10x faster than a pyroaring ``BitMap`` doing remove_range + add_range.
2. ``GigabyteBlockConversion``: 1 TiB, 1 GiB backing, allocated, private; each 1 GiB
   block to shared and back (2048 calls): median <= 5 us per call, >= 8x the dense model.
3. ``SwiotlbChurnBatched`` / ``SwiotlbChurnPerCall``: 500,000 distinct random pages to
   shared one by one, then back (1,000,000 conversions; every 1 GiB folio splits and
   merges back): batched >= 10x the pyroaring model's throughput; per call >= 400,000/s.

Every benchmark's state returns to where setup left it, so repeats measure the same work,
and every benchmark checks in ``teardown`` that the work it timed was done (pages
converted, folios split and merged back, as many times as it was called), so a model
that skipped the work cannot look fast.
"""
from __future__ import annotations

import time

import numpy as np

from gmemfast.bench import workloads as W
from gmemfast.bench.baselines import DenseModel, RoaringModel

ENGINE = "gmemfast"
BITMAP = "pyroaring BitMap"
ROARING = "roaring model"
DENSE = "dense numpy"


def _median_call_us(calls):
    """Time each (fn, args) call separately; median in microseconds."""
    t = time.perf_counter_ns
    out = np.empty(len(calls), dtype=np.int64)
    for i, (fn, args) in enumerate(calls):
        t0 = t()
        fn(*args)
        out[i] = t() - t0
    return float(np.median(out)) / 1e3


def _check_churned(impl, m):
    """After churns: every page private again, and every 1 GiB folio split and merged
    back the same number of times, at least once."""
    if impl.startswith(ENGINE):
        c = m.counters
        splits, merges = c["folio_splits_1g"], c["folio_merges_1g"]
    else:
        splits, merges = m.splits, m.merges
    assert m.private_pages() == W.TIB_PAGES, f"{impl}: pages left shared"
    assert splits == merges and splits > 0, f"{impl}: {splits} splits, {merges} merges"


class WholeFileConversion:
    """Target 1: the whole of a never-allocated 1 TiB file, private -> shared -> private."""

    params = [[ENGINE, BITMAP, ROARING, DENSE]]
    param_names = ["impl"]
    timeout = 300
    repeat = (5, 51, 20.0)

    def setup(self, impl):
        n = W.TIB_PAGES
        self.calls = 0
        if impl == ENGINE:
            gm = W.warm_engine()
            g = W.engine_1t_unallocated()
            P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
            self.roundtrip = lambda: W.engine_whole_file_roundtrip(g, P)
            self.done = lambda: (g.counters["pages_to_shared"] == self.calls * n
                                 and g.counters["pages_to_private"] == self.calls * n
                                 and g.private_pages() == n)
        elif impl == BITMAP:
            from pyroaring import BitMap
            bm = BitMap()
            bm.add_range(0, n)
            seen = []

            def roundtrip():
                bm.remove_range(0, n)
                seen.append(len(bm))
                bm.add_range(0, n)
            self.roundtrip = roundtrip
            self.done = lambda: len(seen) == self.calls and not any(seen) and len(bm) == n
        else:
            m = (RoaringModel if impl == ROARING else DenseModel)(n, 0)

            def roundtrip():
                m.convert(0, n, False)
                m.convert(0, n, True)
            self.roundtrip = roundtrip
            self.done = lambda: m.private_pages() == n
        self.roundtrip()          # first-call costs (compilation, first allocations) out
        self.calls = 1

    def time_private_shared_private(self, impl):
        self.roundtrip()
        self.calls += 1

    def teardown(self, impl):
        assert self.done(), f"{impl}: the round trips were not all done"


class GigabyteBlockConversion:
    """Target 2: each 1 GiB block of an allocated 1 TiB file to shared and back."""

    params = [[ENGINE, DENSE, ROARING]]
    param_names = ["impl"]
    timeout = 600
    number = 1
    repeat = (3, 10, 30.0)
    warmup_time = 0

    def setup(self, impl):
        if impl == ENGINE:
            gm = W.warm_engine()
            g = W.engine_allocated()
            P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
            conv = g.set_memory_attributes
            self.calls = []
            for b in range(W.TIB // W.GIB):
                self.calls.append((conv, (b * W.GIB, W.GIB, 0)))
                self.calls.append((conv, (b * W.GIB, W.GIB, P)))
        else:
            m = W.dense_allocated() if impl == DENSE else W.roaring_allocated()
            conv = m.convert
            self.calls = []
            for b in range(W.TIB_PAGES // W.PAGES_1G):
                self.calls.append((conv, (b * W.PAGES_1G, W.PAGES_1G, False)))
                self.calls.append((conv, (b * W.PAGES_1G, W.PAGES_1G, True)))
            self.model = m
        if impl == ENGINE:
            self.model = g
        fn, args = self.calls[0]
        fn(*args)
        fn, args = self.calls[1]
        fn(*args)

    def teardown(self, impl):
        """Every block went shared (a split) and back (a merge) each sweep."""
        m = self.model
        if impl == ENGINE:
            c = m.counters
            splits, merges = c["folio_splits_1g"], c["folio_merges_1g"]
            assert m.private_pages() == W.TIB_PAGES and m.folio_order(W.TIB - W.PAGE) == 18
        else:
            splits, merges = m.splits, m.merges
            assert m.private_pages() == W.TIB_PAGES
        assert splits == merges and splits > 1 and (splits - 1) % (W.TIB // W.GIB) == 0, (splits, merges)

    def time_2048_calls(self, impl):
        for fn, args in self.calls:
            fn(*args)

    def track_median_us_per_call(self, impl):
        return _median_call_us(self.calls)

    track_median_us_per_call.unit = "us"


class SwiotlbChurnBatched:
    """Target 3, batched: 500k random pages to shared, then back (1M conversions).

    The engine gets the two arrays in two calls; the pyroaring model is called once per
    conversion (what a user of it would do).
    """

    params = [[ENGINE + " batched", ROARING + " per call"]]
    param_names = ["impl"]
    timeout = 900
    number = 1
    repeat = (2, 7, 60.0)
    warmup_time = 0

    def setup(self, impl):
        pages = W.swiotlb_pages()
        self.nconv = 2 * pages.size
        if impl.startswith(ENGINE):
            W.warm_engine()
            self.model = W.engine_allocated()
            churn = W.engine_churn(self.model, pages, batched=True)
        else:
            self.model, churn = W.roaring_churn(pages)
        self.churn = churn

    def teardown(self, impl):
        _check_churned(impl, self.model)

    def time_1M_conversions(self, impl):
        self.churn()

    def track_conversions_per_s(self, impl):
        t0 = time.perf_counter()
        self.churn()
        return self.nconv / (time.perf_counter() - t0)

    track_conversions_per_s.unit = "conversions/s"


class SwiotlbChurnPerCall:
    """Target 3, one call at a time, on a 50,000-page sample (100k conversions).

    Same file and same kind of pages (still every 1 GiB folio splits and merges back).
    """

    params = [[ENGINE + " per call", ROARING + " per call"]]
    param_names = ["impl"]
    timeout = 600
    number = 1
    repeat = (3, 10, 30.0)
    warmup_time = 0
    SAMPLE = 50_000

    def setup(self, impl):
        pages = W.swiotlb_pages()[: self.SAMPLE]
        self.nconv = 2 * pages.size
        if impl.startswith(ENGINE):
            W.warm_engine()
            self.model = W.engine_allocated()
            churn = W.engine_churn(self.model, pages, batched=False)
        else:
            self.model, churn = W.roaring_churn(pages)
        self.churn = churn

    def teardown(self, impl):
        _check_churned(impl, self.model)

    def time_100k_conversions(self, impl):
        self.churn()

    def track_us_per_conversion(self, impl):
        t0 = time.perf_counter()
        self.churn()
        return (time.perf_counter() - t0) / self.nconv * 1e6

    track_us_per_conversion.unit = "us"
