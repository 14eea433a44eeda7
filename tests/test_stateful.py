"""The engine against the naive reference, driven by a hypothesis state machine.

One guest_memfd per example, created the same way in the engine and in ``naive.py``
(backing order 0, 9 or 18 x direct-map policy keep / no-direct-map / on-conversion; VM
type, MMAP, INIT_SHARED, merge policy and metadata limit drawn). Random operations go to
both: fallocate (allocate, punch, clamped punch, invalid modes and ranges), host writes and
reads, pins and releases (and double releases), conversions to private / shared with flags
0 / PRESERVE / ZERO, invalid conversions, batches, injected ENOMEM, save/load and pickle
round trips, and the queries. After every step the outcome must agree (same exception
class, errno and error_offset, or same return value), and so must the state, the
comparable counters (``naive.COUNTERS``) and the engine's own ``check()``.

Operation targets are drawn biased to the edges that break word- and block-based engines:
64-page word edges (+-1), 512-page (2 MiB) boundaries (+-1), the first and last page, one
past the end, and the first / last / an inner page of a run of pages in some state (shared,
private, allocated, hole, host-mapped, pinned), so pins land on shared pages and
conversions start on shareability boundaries.

Sizes and the comparison: order 0 uses 1..1537 pages (partial 64-page words and partial
2 MiB blocks included) and, in a separate case, 1 GiB + 2 MiB + 5 pages (two 1 GiB
direct-map blocks); order 9 uses 1..3 blocks; order 18 one 1 GiB block (262144 pages).
Up to 65536 pages the COMPLETE dump is compared after every step. Above that (order 18,
the 1 GiB-crossing case) a complete comparison costs ~0.1 s of per-page Python in the
reference, so after every step we compare the cheap, still complete-in-aggregate summary
(per-column totals, folio-order histogram, every nonzero page's bytes, direct-map entries,
attribute ranges, counters) and the complete per-page dump every FULL_EVERY steps and at
the end of each example. A wrong page therefore cannot escape; it is at worst reported a
few steps late, and hypothesis shrinks the example anyway.

Scale: ``GMEMFAST_TEST_SMALL=1`` (implied by ``NUMBA_DISABLE_JIT=1``) shrinks examples
and steps; the default run stays under a minute on two cores (warm numba cache).
``GMEMFAST_STATEFUL_SCALE=10`` multiplies the examples for a soak run;
``GMEMFAST_STATEFUL_STATS=1`` (with ``-s``) prints which outcomes the run exercised;
``GMEMFAST_STATEFUL_SKIP=rule,...`` leaves rules out to look past a known discrepancy.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

import naive
from conftest import SMALL, assert_same_counters, assert_same_state, outcome
from naive import (PAGES_PER_1G, PAGES_PER_2M, FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH,
                   GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_INIT_SHARED,
                   GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
                   KVM_MEMORY_ATTRIBUTE_PRIVATE as PRIVATE,
                   KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE as PRESERVE,
                   KVM_SET_MEMORY_ATTRIBUTES2_ZERO as ZERO, PAGE_SIZE)

gmemfast = pytest.importorskip("gmemfast")
from gmemfast import _store as STORE  # noqa: E402


@contextlib.contextmanager
def group_from(n):
    """Batches of ``n`` items or more are applied grouped by block (the store's threshold)."""
    old = STORE.GROUP_MIN
    STORE.GROUP_MIN = n
    try:
        yield
    finally:
        STORE.GROUP_MIN = old

# ---------------------------------------------------------------- page points
# A point is resolved against the file's page count N at run time, so the strategies
# can live at class level and the printed reproducer shows what was chosen.
_point = st.one_of(
    st.tuples(st.just("from_start"), st.sampled_from([0, 1, 2, 63, 64, 65, 127, 128,
                                                      511, 512, 513, 1023, 1024, 1025])),
    st.tuples(st.just("from_end"), st.sampled_from([0, 1, 2, 63, 64, 65, 511, 512, 513, -1])),
    st.tuples(st.just("word"), st.integers(0, 1 << 16), st.sampled_from([-1, 0, 1])),
    st.tuples(st.just("block"), st.integers(0, 1 << 10), st.sampled_from([-1, 0, 1])),
    st.tuples(st.just("any"), st.integers(0, 1 << 20)),
)
_ranges = st.tuples(_point, _point)
# Where an operation starts: an edge-biased point, or an edge (first page, last page, or
# a page inside) of a run of pages in some state, so operations hit the interesting pages
# (a pin on a shared page, a conversion starting at a shared/private boundary...).
_where = st.tuples(
    st.sampled_from(["point", "point", "shared", "shared", "private", "allocated", "hole",
                     "host_mapped", "pinned"]),
    st.integers(0, 1 << 16), st.sampled_from(["first", "last", "inside", "first"]),
    st.integers(0, 1 << 20), _point)
# Host accesses and pins mostly target shared pages (else they only test the SIGBUS path).
_where_shared = st.tuples(
    st.sampled_from(["shared", "shared", "shared", "shared", "host_mapped", "pinned", "point"]),
    st.integers(0, 1 << 16), st.sampled_from(["first", "last", "inside", "first"]),
    st.integers(0, 1 << 20), _point)
_length = st.one_of(
    st.sampled_from([1, 1, 2, 3, 63, 64, 65, 511, 512, 513, 1024]),
    st.sampled_from(["run", "file", "point"]))
_byte_delta = st.sampled_from([0, 0, 0, 1, 7, 2048, 4095])
_access_len = st.sampled_from([0, 1, 100, 4095, 4096, 4096, 4097, 8192, 3 * 4096 + 5,
                               513 * 4096])
_fill = st.one_of(st.integers(1, 255), st.just(0))   # zero bytes: stored, yet not 'contents'
_convert_flags = st.sampled_from([0, 0, PRESERVE, ZERO])


def resolve(point, n):
    """A page index in [0, n + 1]."""
    kind = point[0]
    if kind == "from_start":
        p = point[1]
    elif kind == "from_end":
        p = n - point[1]
    elif kind == "word":
        p = (point[1] % (n // 64 + 1)) * 64 + point[2]
    elif kind == "block":
        p = (point[1] % (n // 512 + 1)) * 512 + point[2]
    else:
        p = point[1] % (n + 1)
    return max(0, min(p, n + 1))


def page_range(rng, n):
    """Two points as a range; may reach one page past the end (for the error paths)."""
    a, b = sorted((resolve(rng[0], n), resolve(rng[1], n)))
    if a == b:
        b = a + 1
    return a, b


def runs_where(column, want):
    """Maximal runs [a, b) of pages whose column value is truthy == want."""
    out, p = [], 0
    for value, run in itertools.groupby(column):
        length = len(list(run))
        if bool(value) == want:
            out.append((p, p + length))
        p += length
    return out


def target(ref, where, length):
    """A valid page range [a, b) (inside the file) chosen from the reference's state."""
    n = ref.nr_pages
    kind, i, edge, j, point = where
    columns = {"shared": (ref.private, False), "private": (ref.private, True),
               "allocated": (ref.allocated, True), "hole": (ref.allocated, False),
               "host_mapped": (ref.host_mapped, True), "pinned": (ref.pins, True)}
    run = None
    if kind in columns:
        runs = runs_where(*columns[kind])
        if runs:
            run = runs[i % len(runs)]
    if run is None:
        a = min(resolve(point, n), n - 1)
        run_end = n
    else:
        ra, rb = run
        a = {"first": ra, "last": rb - 1, "inside": ra + j % (rb - ra)}[edge]
        run_end = rb
    if length == "run":
        b = run_end
    elif length == "file":
        b = n
    elif length == "point":
        b = resolve(point, n)
    else:
        b = a + length
    b = min(b, n)
    if b <= a:
        a, b = (b, a) if b < a else (a, a + 1)
    return a, b


# -------------------------------------------------------------- configuration
if SMALL:
    SIZES = {0: [1, 2, 63, 64, 65, 513, 1025], 9: [1, 2], 18: [1]}
    BUDGET = {0: (12, 20), 9: (10, 15), 18: (2, 6), "big": (2, 6)}  # (max_examples, steps)
else:
    SIZES = {0: [1, 2, 63, 64, 65, 511, 512, 513, 1000, 1024, 1537], 9: [1, 2, 3], 18: [1]}
    BUDGET = {0: (30, 40), 9: (30, 40), 18: (3, 12), "big": (4, 14)}

POLICIES = ["keep", "no-direct-map", "on-conversion"]
# GMEMFAST_STATEFUL_SCALE=10 runs ten times the examples (a soak run, minutes).
SCALE = float(os.environ.get("GMEMFAST_STATEFUL_SCALE", "1"))
LARGE = 1 << 16       # files above this many pages (order 18) use the sampled comparison
FULL_EVERY = 4


def assert_same_summary(engine, ref):
    """Per-column totals, nonzero contents, direct map and attribute ranges: the cheap
    part of a dump comparison (C-speed on the reference's lists)."""
    e = engine.dump()
    r = ref.dump_summary()
    got = {
        "private": int(np.count_nonzero(e["private"])),
        "allocated": int(np.count_nonzero(e["allocated"])),
        "host_mapped": int(np.count_nonzero(e["host_mapped"])),
        "guest_mapped": int(np.count_nonzero(e["guest_mapped"])),
        "te_state": int(np.count_nonzero(e["te_state"])),
        "pins": int(np.asarray(e["pins"]).sum()),
        "folio_order": {k: int(np.count_nonzero(np.asarray(e["folio_order"]) == k))
                        for k in (-1, 0, 9, 18)},
        "direct_map_removed": int(np.count_nonzero(e["direct_map_removed"])),
        "contents": {int(p): bytes(c) for p, c in dict(e["contents"]).items()},
        "direct_map_entries": {k: int(e["direct_map_entries"][k]) for k in ("1G", "2M", "4K")},
        "attribute_ranges": int(e["attribute_ranges"]),
    }
    bad = {k: (got[k], r[k]) for k in got if got[k] != r[k]}
    assert not bad, f"state summary differs (engine, reference): {bad}"


# Debugging aid: GMEMFAST_STATEFUL_SKIP="convert_many,pickle" leaves rules (or, for
# "pickle", the pickle half of save_load) out. Empty by default: every rule runs.
SKIP = {r for r in os.environ.get("GMEMFAST_STATEFUL_SKIP", "").split(",") if r}
STATS = collections.Counter()   # GMEMFAST_STATEFUL_STATS=1 (with -s) prints what ran


def _event(text):
    event(text)
    STATS[text] += 1


# The states each backing order's runs must reach (with or without the JIT); _run fails
# when a run never reached one of them.
REQUIRED = {
    0: {"pins held", "ENOMEM"},
    9: {"huge folio", "folio_splits_2m", "folio_merges_2m", "pins held",
        "ENOMEM where a merge was due"},
    18: {"huge folio", "folio_splits_1g", "folio_merges_1g", "pins held",
         "pin across a 2 MiB boundary", "ENOMEM where a merge was due"},
}
REACHED: dict = collections.defaultdict(set)


def _reach(machine, state):
    _event(f"reached: {state}")
    REACHED[type(machine).__name__].add(state)


def enabled(name):
    return precondition(lambda self: name not in SKIP)


class GmemComparison(RuleBasedStateMachine):
    ORDER = 0
    DMAP = "keep"
    SIZES = None          # file sizes in backing-order units; None: SIZES[ORDER]

    def __init__(self):
        super().__init__()
        self.tmpdir = tempfile.mkdtemp(prefix="gmemfast-stateful-")
        self.pins = []          # live (engine_pin, ref_pin)
        self.released = []      # released (engine_pin, ref_pin)
        self.eng = None
        self.ref = None
        self.steps = 0

    def teardown(self):
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.eng is not None and self.n > LARGE:
            assert_same_state(self.eng, self.ref, "at the end of the example")

    # ------------------------------------------------------------- creation
    @initialize(
        size_index=st.integers(0, 100),
        mmap=st.sampled_from([True, True, True, False]),
        init_shared=st.booleans(),
        dmap_by_flag=st.booleans(),
        vm_type=st.sampled_from(["sw-protected", "sw-protected", "snp", "tdx"]),
        merge=st.sampled_from(["eager", "eager", "never"]),
        metadata_limit=st.sampled_from([None, None, None, None, None, 3, 6]),
        tour=st.sampled_from([True, True, True, False]),
        tour_page=st.integers(0, 1 << 20),
    )
    def create(self, size_index, mmap, init_shared, dmap_by_flag, vm_type, merge,
               metadata_limit, tour, tour_page):
        tour = tour or self.ORDER == 18    # 1 GiB examples are few and slow: all of them tour
        if tour:        # the tour needs host mappings (pins), eager merges and no limit
            mmap, merge, metadata_limit = True, "eager", None
        k = self.ORDER
        sizes = self.SIZES if self.SIZES is not None else SIZES[k]
        units = sizes[size_index % len(sizes)]
        size = units * (PAGE_SIZE << k)
        flags = GUEST_MEMFD_FLAG_MMAP if mmap else 0
        if k:
            flags |= GUEST_MEMFD_FLAG_HUGETLB
        if init_shared:         # valid with any other flag, MMAP or HUGETLB or neither
            flags |= GUEST_MEMFD_FLAG_INIT_SHARED
        policies = {}
        if self.DMAP == "no-direct-map" and dmap_by_flag:
            flags |= GUEST_MEMFD_FLAG_NO_DIRECT_MAP
        elif self.DMAP != "keep":
            policies["direct_map"] = self.DMAP
        if merge != "eager":
            policies["merge"] = merge
        if metadata_limit is not None:
            policies["metadata_limit"] = metadata_limit
        note(f"GuestMemfd({size:#x}, {flags:#x}, page_order={k}, vm_type={vm_type!r}, "
             f"**{policies})")
        self.ref = naive.GuestMemfd(size, flags, page_order=k, vm_type=vm_type, **policies)
        self.eng = gmemfast.GuestMemfd(size, flags, page_order=k, vm_type=vm_type, **policies)
        self.n = self.ref.nr_pages
        if tour:
            self.tour(tour_page)

    # ------------------------------------------------------------- the tour
    def tour(self, page):
        """Visit the states that matter for this backing order, compared step by step:
        a huge folio, its split and merge, a pin across a 2 MiB boundary that keeps its
        block from merging, and ENOMEM where a merge was due."""
        ref, n, k = self.ref, self.n, self.ORDER
        bp = 1 << k if k else PAGES_PER_2M
        block = min(page % max(1, n // bp), max(0, n // bp - 1)) * bp if n >= bp else 0
        end = min(block + bp, n)
        self.both("set_memory_attributes", block * PAGE_SIZE, (end - block) * PAGE_SIZE, PRIVATE, 0)
        self.both("fallocate", KEEP, block * PAGE_SIZE, (end - block) * PAGE_SIZE)
        self._reached_now()
        p = block + page % (end - block)
        before = dict(ref.counters)
        self.both("set_memory_attributes", p * PAGE_SIZE, PAGE_SIZE, 0, 0)        # split
        self.both("set_memory_attributes", p * PAGE_SIZE, PAGE_SIZE, PRIVATE, 0)  # merge
        self.both("set_memory_attributes", p * PAGE_SIZE, PAGE_SIZE, 0, 0)
        self.eng.inject_enomem(1)
        self.ref.inject_enomem(1)
        self.both("set_memory_attributes", p * PAGE_SIZE, PAGE_SIZE, PRIVATE, 0)  # ENOMEM
        if ref.counters["convert_enomem"] > before["convert_enomem"] and all(
                ref.private[q] or q == p for q in range(block, end)):
            _reach(self, "ENOMEM where a merge was due")
        self.both("set_memory_attributes", p * PAGE_SIZE, PAGE_SIZE, PRIVATE, 0)
        if n > PAGES_PER_2M:
            # two pages across a 2 MiB boundary: shared and pinned, so converting them back
            # fails (EAGAIN) and their blocks cannot merge
            edge = max(PAGES_PER_2M, (p // PAGES_PER_2M) * PAGES_PER_2M)
            first, npages = edge - 1, 2
        else:
            first, npages = p, 1      # a pin inside the one block
        self.both("set_memory_attributes", first * PAGE_SIZE, npages * PAGE_SIZE, 0, 0)
        res = self.both("pin", first * PAGE_SIZE, npages * PAGE_SIZE)
        if res is not None:
            if npages == 2:
                _reach(self, "pin across a 2 MiB boundary")
            self.pins.append(res)
            self.both("set_memory_attributes", first * PAGE_SIZE, npages * PAGE_SIZE, PRIVATE, 0)

    def _reached_now(self):
        """Record the states the reference is in (for the per-order requirements)."""
        ref = self.ref
        c = ref.counters
        if ref.page_order and ref.huge_folios():
            _reach(self, "huge folio")
        for name in ("folio_splits_2m", "folio_splits_1g", "folio_merges_2m", "folio_merges_1g"):
            if c[name]:
                _reach(self, name)
        if any(ref.pins):
            _reach(self, "pins held")
        if c["convert_enomem"]:
            _reach(self, "ENOMEM")

    # ------------------------------------------------------------- helpers
    def both(self, name, *args):
        """Call name(*args) on both; outcomes must match. Returns both values, or None."""
        e = outcome(getattr(self.eng, name), *args)
        r = outcome(getattr(self.ref, name), *args)
        shown = [a if not isinstance(a, bytes) or len(a) < 8 else f"<{len(a)} bytes {a[:1]!r}..>"
                 for a in args]
        note(f"{name}({', '.join(map(str, shown))}): engine {e[0]}{e[1:] if e[0] == 'err' else ''}, "
             f"reference {r[0]}{r[1:] if r[0] == 'err' else ''}")
        _event(f"{name}: " + ("ok" if r[0] == "ok" else f"{r[1]} {errno.errorcode[r[2]]}"))
        if e[0] == "ok" and r[0] == "ok":
            return e[1], r[1]
        assert e == r, f"{name}{tuple(shown)}: engine {e} != reference {r}"
        return None

    # ------------------------------------------------------------- operations
    @enabled("fallocate")
    @rule(where=_where, length=_length, punch=st.sampled_from([False, True, True]))
    def fallocate(self, where, length, punch):
        a, b = target(self.ref, where, length)
        mode = KEEP | (PUNCH if punch else 0)
        self.both("fallocate", mode, a * PAGE_SIZE, (b - a) * PAGE_SIZE)

    @enabled("punch_clamped")
    @rule(rng=_ranges)
    def punch_clamped(self, rng):
        """Punch ranges that may run past the end (clamped) or lie wholly past it."""
        a, b = page_range(rng, self.n)
        self.both("fallocate", KEEP | PUNCH, a * PAGE_SIZE, (b - a + self.n) * PAGE_SIZE)

    @enabled("fallocate_invalid")
    @rule(rng=_ranges, how=st.sampled_from(["mode0", "punch_only", "unknown_bit", "unaligned_offset",
                                            "unaligned_size", "zero_size", "past_end"]),
          punch=st.booleans())
    def fallocate_invalid(self, rng, how, punch):
        a, b = page_range(rng, self.n)
        mode = KEEP | (PUNCH if punch else 0)
        off, size = a * PAGE_SIZE, (b - a) * PAGE_SIZE
        if how == "mode0":
            mode = 0
        elif how == "punch_only":
            mode = PUNCH
        elif how == "unknown_bit":
            mode |= 0x10
        elif how == "unaligned_offset":
            off += 512
        elif how == "unaligned_size":
            size += 1
        elif how == "zero_size":
            size = 0
        else:
            off, size = self.n * PAGE_SIZE - PAGE_SIZE, 2 * PAGE_SIZE
        self.both("fallocate", mode, off, size)

    @enabled("host_write")
    @rule(where=_where_shared, delta=_byte_delta, length=_access_len, fill=_fill)
    def host_write(self, where, delta, length, fill):
        a, _ = target(self.ref, where, 1)
        off = a * PAGE_SIZE + delta
        self.both("host_write", off, bytes([fill]) * length)

    @enabled("host_access_anywhere")
    @rule(point=_point, delta=_byte_delta, length=_access_len, write=st.booleans())
    def host_access_anywhere(self, point, delta, length, write):
        """Accesses at edge points, past the end included."""
        off = resolve(point, self.n) * PAGE_SIZE + delta
        if write:
            self.both("host_write", off, b"\x5a" * length)
        else:
            self.host_read_at(off, length)

    @enabled("host_read")
    @rule(where=_where_shared, delta=_byte_delta, length=_access_len)
    def host_read(self, where, delta, length):
        a, _ = target(self.ref, where, 1)
        self.host_read_at(a * PAGE_SIZE + delta, length)

    def host_read_at(self, off, length):
        res = self.both("host_read", off, length)
        if res is not None:
            e, r = res
            assert bytes(e) == r, f"host_read({off:#x}, {length}) returned different bytes"

    @enabled("host_access_partial")
    @rule(i=st.integers(0, 1 << 16), back=st.sampled_from([0, 1, 2]), into=st.sampled_from([1, 2, 5]),
          delta=_byte_delta, write=st.booleans(), fill=_fill)
    def host_access_partial(self, i, back, into, delta, write, fill):
        """An access from the last pages of a shared run into the private pages after it
        (or past the end): the pages before the fault are touched, like memset/memcpy."""
        runs = runs_where(self.ref.private, False)
        if not runs:
            return
        a, b = runs[i % len(runs)]
        start = max(a, b - 1 - back)
        off = start * PAGE_SIZE + delta
        length = (b - start + into) * PAGE_SIZE - delta
        _event("partial host access " + ("to the end" if b == self.n else "into private"))
        if write:
            self.both("host_write", off, bytes([fill]) * length)
        else:
            self.host_read_at(off, length)

    @enabled("pin")
    @rule(where=_where_shared, npages=st.sampled_from([1, 1, 1, 2, 3, 65]), anywhere=_point,
          past=st.sampled_from([False, False, False, True]))
    def pin(self, where, npages, anywhere, past):
        a, _ = target(self.ref, where, 1)
        if past:
            a = resolve(anywhere, self.n)
        res = self.both("pin", a * PAGE_SIZE, npages * PAGE_SIZE)
        if res is not None:
            self.pins.append(res)

    @precondition(lambda self: self.pins)
    @enabled("release")
    @rule(i=st.integers(0, 1 << 10))
    def release(self, i):
        pair = self.pins.pop(i % len(self.pins))
        e = outcome(pair[0].release)
        r = outcome(pair[1].release)
        assert e == r, f"release: engine {e} != reference {r}"
        self.released.append(pair)

    @precondition(lambda self: self.released)
    @enabled("release_twice")
    @rule(i=st.integers(0, 1 << 10))
    def release_twice(self, i):
        pair = self.released[i % len(self.released)]
        e = outcome(pair[0].release)
        r = outcome(pair[1].release)
        assert r[0] == "err" and r[2] == errno.EINVAL
        assert e == r, f"second release: engine {e} != reference {r}"

    @enabled("convert")
    @rule(where=_where, length=_length, private=st.booleans(), flags=_convert_flags)
    def convert(self, where, length, private, flags):
        a, b = target(self.ref, where, length)
        self.both("set_memory_attributes", a * PAGE_SIZE, (b - a) * PAGE_SIZE,
                  PRIVATE if private else 0, flags)

    @enabled("convert_to_shared")
    @rule(where=_where, length=_length, flags=st.sampled_from([0, ZERO]))
    def convert_to_shared(self, where, length, flags):
        a, b = target(self.ref, where, length)
        self.both("set_memory_attributes", a * PAGE_SIZE, (b - a) * PAGE_SIZE, 0, flags)

    @enabled("cycle")
    @rule(where=_where, length=_length, fill=_fill, flags=_convert_flags,
          touch=st.sampled_from(["first", "last", "all", "none"]))
    def cycle(self, where, length, fill, flags, touch):
        """The in-place flow: to shared, host writes, back to private (splits, then merges)."""
        a, b = target(self.ref, where, length)
        off, size = a * PAGE_SIZE, (b - a) * PAGE_SIZE
        self.both("set_memory_attributes", off, size, 0, 0)
        if touch == "first":
            self.both("host_write", off, bytes([fill]) * 100)
        elif touch == "last":
            self.both("host_write", off + size - 100, bytes([fill]) * 100)
        elif touch == "all":
            self.both("fallocate", KEEP, off, size)
            self.both("host_write", off + size // 2, bytes([fill]) * 5000)
        self.both("set_memory_attributes", off, size, PRIVATE, flags)

    @enabled("convert_invalid")
    @rule(rng=_ranges, how=st.sampled_from(["attr_bit", "flag_bit", "both_flags", "unaligned",
                                            "zero", "overflow", "past_end"]),
          private=st.booleans())
    def convert_invalid(self, rng, how, private):
        a, b = page_range(rng, self.n)
        off, size = a * PAGE_SIZE, (b - a) * PAGE_SIZE
        attr, flags = (PRIVATE if private else 0), 0
        if how == "attr_bit":
            attr |= 1
        elif how == "flag_bit":
            flags = 4
        elif how == "both_flags":
            flags = PRESERVE | ZERO
        elif how == "unaligned":
            off += 8
        elif how == "zero":
            size = 0
        elif how == "overflow":
            off, size = (1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE
        else:
            off, size = self.n * PAGE_SIZE - PAGE_SIZE, 2 * PAGE_SIZE
        self.both("set_memory_attributes", off, size, attr, flags)

    @enabled("convert_many")
    @rule(items=st.lists(st.tuples(_where, _length), min_size=1, max_size=4),
          private=st.booleans(), flags=_convert_flags, bad=st.sampled_from([None, None, 0, 1]),
          shape=st.sampled_from(["lists", "lists", "scalar_size", "numpy"]))
    def convert_many(self, items, private, flags, bad, shape):
        pairs = [target(self.ref, w, ln) for w, ln in items]
        offsets = [a * PAGE_SIZE for a, _ in pairs]
        sizes = [(b - a) * PAGE_SIZE for a, b in pairs]
        if bad is not None and bad < len(offsets):
            offsets[bad] += 8                    # one unaligned item: EINVAL for it alone
        attr = PRIVATE if private else 0
        if shape == "scalar_size":
            sizes = sizes[0]                     # broadcast: every item the same size
        elif shape == "numpy":
            offsets, sizes = np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.uint64)
        e = self.eng.set_memory_attributes_many(offsets, sizes, attr, flags)
        r = self.ref.set_memory_attributes_many(offsets, sizes, attr, flags)
        note(f"set_memory_attributes_many({offsets}, {sizes}, {attr}, {flags}): engine "
             f"{[int(x) for x in e.errno]} {[int(x) for x in e.error_offset]}, "
             f"reference {r.errno} {r.error_offset}")
        for err in r.errno:
            _event(f"set_memory_attributes_many item: {errno.errorcode.get(err, 'ok')}")
        assert [int(x) for x in e.errno] == r.errno
        assert [int(x) for x in e.error_offset] == r.error_offset

    @enabled("convert_many_grouped")
    @rule(items=st.lists(st.tuples(_point, st.booleans(), st.sampled_from([1, 1, 1, 2, 513])),
                         min_size=2, max_size=16),
          back=st.booleans(), flags=st.sampled_from([0, 0, ZERO]))
    def convert_many_grouped(self, items, back, flags):
        """A batch the engine applies grouped by block (its threshold lowered to 2 items):
        items in several blocks, the same page more than once, to shared and to private;
        ``back`` appends every item again the other way. The reference applies them one by
        one, in order: results, state and counters must agree."""
        offsets, sizes, attrs = [], [], []
        for point, private, npages in items:
            a = min(resolve(point, self.n), self.n - 1)
            b = min(a + npages, self.n)
            offsets.append(a * PAGE_SIZE)
            sizes.append((b - a) * PAGE_SIZE)
            attrs.append(PRIVATE if private else 0)
        if back:
            offsets, sizes = offsets * 2, sizes * 2
            attrs = attrs + [PRIVATE - a for a in attrs]
        shift = 18 if self.ORDER == 18 or (self.n >> 9) > 8 * len(offsets) else 9
        spans = any((o >> 12) >> shift != ((o + z >> 12) - 1) >> shift for o, z in zip(offsets, sizes))
        if self.ref.metadata_limit is None and self.ref.enomem == 0 and not spans:
            _event("batch applied grouped by block"
                   + (" (blocks reordered)" if len({o >> (12 + shift) for o in offsets}) > 1 else ""))
        with group_from(2):
            e = self.eng.set_memory_attributes_many(np.array(offsets, np.int64), np.array(sizes, np.int64),
                                                    np.array(attrs, np.int64), flags)
        r = self.ref.set_memory_attributes_many(offsets, sizes, attrs, flags)
        note(f"grouped set_memory_attributes_many({offsets}, {sizes}, {attrs}, {flags}): engine "
             f"{[int(x) for x in e.errno]} {[int(x) for x in e.error_offset]}, reference "
             f"{r.errno} {r.error_offset}")
        assert [int(x) for x in e.errno] == r.errno
        assert [int(x) for x in e.error_offset] == r.error_offset

    @enabled("convert_pages_batch")
    @rule(points=st.lists(_point, min_size=2, max_size=24), private=st.booleans(),
          back=st.booleans(), flags=st.sampled_from([0, 0, 0, ZERO, PRESERVE]),
          bad=st.sampled_from([None, None, None, "unaligned", "past_end"]))
    def convert_pages_batch(self, points, private, back, flags, bad):
        """A batch of one-page conversions with one attribute value and one flags value:
        the engine's own path for it (grouped by 1 GiB block, pages converted in place)
        where it applies, its general path where it must fall back (a metadata limit,
        injected ENOMEM, an invalid offset, pins, host mappings, direct-map changes...);
        the same page more than once, pages in several blocks and, with ``back``, a second
        batch the other way. The reference applies the items one by one, in order:
        results, state and counters must agree."""
        offsets = [min(resolve(pt, self.n), self.n - 1) * PAGE_SIZE for pt in points]
        if bad == "unaligned":
            offsets[len(offsets) // 2] += 8
        elif bad == "past_end":
            offsets[-1] = self.n * PAGE_SIZE
        attr = PRIVATE if private else 0
        store = self.eng.store
        taken = []

        def spy(*args, _inner=store.convert_pages):
            taken.append(_inner(*args))
            return taken[-1]
        store.convert_pages = spy
        try:
            for a in [attr, PRIVATE - attr] if back else [attr]:
                taken.clear()
                with group_from(2):
                    e = self.eng.set_memory_attributes_many(np.array(offsets, np.int64), PAGE_SIZE, a, flags)
                r = self.ref.set_memory_attributes_many(offsets, PAGE_SIZE, a, flags)
                _event("page batch: " + ("converted in place" if taken == [True] else
                                         "general path" if taken else "refused before grouping"))
                note(f"page batch set_memory_attributes_many({offsets}, {PAGE_SIZE}, {a}, {flags}): "
                     f"engine {[int(x) for x in e.errno]} {[int(x) for x in e.error_offset]}, "
                     f"reference {r.errno} {r.error_offset}")
                assert [int(x) for x in e.errno] == r.errno
                assert [int(x) for x in e.error_offset] == r.error_offset
        finally:
            del store.convert_pages

    @enabled("fallocate_many")
    @rule(items=st.lists(st.tuples(_where, _length, st.sampled_from(
        ["allocate", "punch", "punch", "punch_past", "past_end", "no_keep_size", "unknown_bit",
         "unaligned", "zero_size"])), min_size=1, max_size=6))
    def fallocate_many(self, items):
        """``fallocate_many`` against the reference's ``fallocate`` item by item: the same
        errno and error_offset per item, then the same state and counters."""
        modes, offsets, sizes = [], [], []
        for where, length, kind in items:
            a, b = target(self.ref, where, length)
            mode = KEEP | (PUNCH if kind.startswith("punch") else 0)
            off, size = a * PAGE_SIZE, (b - a) * PAGE_SIZE
            if kind == "punch_past":
                size += self.n * PAGE_SIZE
            elif kind == "past_end":
                off, size = self.n * PAGE_SIZE - PAGE_SIZE, 2 * PAGE_SIZE
            elif kind == "no_keep_size":
                mode = PUNCH
            elif kind == "unknown_bit":
                mode |= 0x10
            elif kind == "unaligned":
                off += 512
            elif kind == "zero_size":
                size = 0
            modes.append(mode)
            offsets.append(off)
            sizes.append(size)
        e = self.eng.fallocate_many(modes, offsets, sizes)
        want = [outcome(self.ref.fallocate, m, o, z) for m, o, z in zip(modes, offsets, sizes)]
        errnos = [0 if w[0] == "ok" else w[2] for w in want]
        offs = [-1 if w[0] == "ok" or w[3] is None else w[3] for w in want]
        note(f"fallocate_many({modes}, {offsets}, {sizes}): engine {[int(x) for x in e.errno]} "
             f"{[int(x) for x in e.error_offset]}, reference {errnos} {offs}")
        for err in errnos:
            _event(f"fallocate_many item: {errno.errorcode.get(err, 'ok')}")
        assert [int(x) for x in e.errno] == errnos
        assert [int(x) for x in e.error_offset] == offs

    @precondition(lambda self: self.ref.enomem == 0)
    @enabled("inject_enomem")
    @rule(times=st.integers(1, 2))
    def inject_enomem(self, times):
        self.eng.inject_enomem(times)
        self.ref.inject_enomem(times)

    @enabled("save_load")
    @rule(use_pickle=st.booleans())
    def save_load(self, use_pickle):
        if use_pickle and "pickle" not in SKIP:
            loaded = pickle.loads(pickle.dumps(self.eng))
        else:
            path = os.path.join(self.tmpdir, "gmem.save")
            self.eng.save(path)
            loaded = type(self.eng).load(path)
        loaded.check()
        assert_same_state(loaded, self.ref, "after save/load")
        assert_same_counters(loaded, self.ref, naive.COUNTERS, "after save/load")
        # Carry on with the loaded copy when nothing refers to the old one.
        if not self.pins and self.ref.enomem == 0:
            self.eng = loaded
            self.released = []

    @enabled("queries")
    @rule(where=_where, length=_length, point=_point)
    def queries(self, where, length, point):
        a, b = target(self.ref, where, length)
        p = resolve(point, self.n)
        for name, args in (("is_private", (a * PAGE_SIZE, (b - a) * PAGE_SIZE)),
                           ("private_pages", (a * PAGE_SIZE, (b - a) * PAGE_SIZE)),
                           ("folio_order", (a * PAGE_SIZE + 4095,)),
                           ("folio_order", (p * PAGE_SIZE,))):
            res = self.both(name, *args)
            if res is not None:
                assert res[0] == res[1], f"{name}{args}: engine {res[0]} != reference {res[1]}"
        assert int(self.eng.attribute_ranges) == self.ref.attribute_ranges

    # ------------------------------------------------------------- checks
    @invariant()
    def same_state(self):
        if self.eng is None:
            return
        self.eng.check()
        self._reached_now()
        self.steps += 1
        if self.n > LARGE and self.steps % FULL_EVERY:
            # a 1 GiB file: cheap aggregate comparison, the full dump every FULL_EVERY steps
            # and at the end of the example (teardown)
            assert_same_summary(self.eng, self.ref)
            assert_same_counters(self.eng, self.ref, naive.COUNTERS)
            return
        ref = self.ref
        k = ref.page_order
        if k and any(ref._is_one_huge_folio(b) for b in range(0, ref.nr_pages, ref.block_pages)):
            _event("state: has a huge folio")
        if any(ref.pins):
            _event("state: has pins")
        if ref.split_2m:
            _event("state: direct map split to 4K")
        for name in ("folio_splits_2m", "folio_splits_1g", "folio_merges_2m", "folio_merges_1g"):
            if ref.counters[name]:
                _event(f"state: {name} > 0")
        assert_same_state(self.eng, self.ref)
        assert_same_counters(self.eng, self.ref, naive.COUNTERS)


def _machine(order, dmap, sizes=None):
    attrs = {"ORDER": order, "DMAP": dmap}
    if sizes is not None:
        attrs["SIZES"] = sizes
    return type(f"GmemComparison_order{order}_{dmap.replace('-', '_')}", (GmemComparison,), attrs)


def _run(machine, examples, steps, label, required=()):
    examples = max(1, int(examples * SCALE))
    STATS.clear()
    REACHED.pop(machine.__name__, None)
    run_state_machine_as_test(
        machine, settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None))
    if os.environ.get("GMEMFAST_STATEFUL_STATS"):
        print(f"\n{label}:")
        for text, count in sorted(STATS.items()):
            print(f"  {count:6d}  {text}")
    missing = set(required) - REACHED[machine.__name__]
    assert not missing, f"{label}: the state machine never reached {sorted(missing)}"


@pytest.mark.parametrize("dmap", POLICIES)
@pytest.mark.parametrize("order", [0, 9, 18])
def test_engine_matches_reference(order, dmap):
    examples, steps = BUDGET[order]
    _run(_machine(order, dmap), examples, steps, f"order {order}, {dmap}", REQUIRED[order])


@pytest.mark.parametrize("dmap", ["no-direct-map", "on-conversion"])
def test_engine_matches_reference_across_1g(dmap):
    """4 KiB pages in a file just over 1 GiB: 2 MiB blocks and direct-map entries on both
    sides of a 1 GiB boundary, a partial last 2 MiB block, second-level summaries."""
    examples, steps = BUDGET["big"]
    _run(_machine(0, dmap, sizes=[PAGES_PER_1G + 512 + 5]), examples, steps,
         f"order 0 across 1 GiB, {dmap}", {"pin across a 2 MiB boundary"})


# ------------------------------------------------------------ worked examples
# A few sequences with the expected numbers worked out by hand from docs/model.md and the
# engine's documented decisions, run on BOTH models: if the two ever agreed on a
# misreading, these would still catch it.
@pytest.fixture(params=["engine", "naive"])
def GM(request):
    return gmemfast.GuestMemfd if request.param == "engine" else naive.GuestMemfd


def _entries(g):
    d = g.dump()["direct_map_entries"]
    return {k: int(d[k]) for k in ("1G", "2M", "4K")}


def test_worked_direct_map_no_direct_map(GM):
    # 4 KiB folios: the direct map changes a folio at a time, so every entry breaks to 4K
    g = GM(512 * PAGE_SIZE, GUEST_MEMFD_FLAG_MMAP, direct_map="no-direct-map")
    assert _entries(g) == {"1G": 1, "2M": 0, "4K": 0}
    g.fallocate(KEEP, 0, 512 * PAGE_SIZE)
    assert _entries(g) == {"1G": 0, "2M": 0, "4K": 512}
    d = g.dump()
    assert all(int(x) for x in d["direct_map_removed"])

    # a 2 MiB folio removes its whole 2 MiB entry: only the (partial) 1 GiB entry breaks
    g = GM(2 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB, page_order=9,
           direct_map="no-direct-map")
    g.fallocate(KEEP, 0, 2 << 20)
    assert _entries(g) == {"1G": 0, "2M": 1, "4K": 0}
    g.fallocate(KEEP | PUNCH, 0, PAGE_SIZE)
    # the folio splits and one 4 KiB page is restored: that 2 MiB entry breaks, for good
    assert _entries(g) == {"1G": 0, "2M": 0, "4K": 512}
    g.fallocate(KEEP, 0, PAGE_SIZE)
    assert _entries(g) == {"1G": 0, "2M": 0, "4K": 512}
    d = g.dump()
    assert all(int(x) for x in d["direct_map_removed"])
    c = g.counters
    assert (int(c["pages_allocated"]), int(c["pages_freed"])) == (513, 1)


def test_worked_huge_split_merge_on_conversion(GM):
    g = GM(4 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB, page_order=9,
           direct_map="on-conversion")
    g.fallocate(KEEP, 0, PAGE_SIZE)                 # widens to block 0: one 2 MiB folio
    assert [g.folio_order(0), g.folio_order(511 * PAGE_SIZE), g.folio_order(512 * PAGE_SIZE)] \
        == [9, 9, -1]
    assert _entries(g) == {"1G": 0, "2M": 2, "4K": 0}
    g.set_memory_attributes(5 * PAGE_SIZE, PAGE_SIZE, 0)    # to shared: split, restore 1 page
    assert g.folio_order(0) == 0 and g.folio_order(5 * PAGE_SIZE) == 0
    assert _entries(g) == {"1G": 0, "2M": 1, "4K": 512}
    g.host_write(5 * PAGE_SIZE, b"abc")
    g.set_memory_attributes(5 * PAGE_SIZE, PAGE_SIZE, PRIVATE)  # to private: merge back
    assert g.folio_order(5 * PAGE_SIZE) == 9
    d = g.dump()
    assert [int(x) for x in d["refcount"][:512]] == [1] * 512
    assert bytes(dict(d["contents"])[5][:3]) == b"abc"      # sw-protected keeps contents
    c = g.counters
    assert {k: int(c[k]) for k in ("folio_splits_2m", "folio_merges_2m", "pages_to_shared",
                                   "pages_to_private", "host_ptes_zapped")} == \
        {"folio_splits_2m": 1, "folio_merges_2m": 1, "pages_to_shared": 1,
         "pages_to_private": 1, "host_ptes_zapped": 1}
    # a shared page in a hole block: allocated huge, split at once
    g.set_memory_attributes(600 * PAGE_SIZE, PAGE_SIZE, 0)
    g.host_read(600 * PAGE_SIZE, 1)
    assert g.folio_order(512 * PAGE_SIZE) == 0 and g.folio_order(1023 * PAGE_SIZE) == 0
    assert int(g.counters["folio_splits_2m"]) == 2
    assert int(g.counters["pages_allocated"]) == 1024


def test_worked_pins_and_refcounts(GM):
    g = GM(8 * PAGE_SIZE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    p1 = g.pin(2 * PAGE_SIZE, 2 * PAGE_SIZE)
    p2 = g.pin(3 * PAGE_SIZE)
    d = g.dump()
    assert [int(x) for x in d["pins"]] == [0, 0, 1, 2, 0, 0, 0, 0]
    assert [int(x) for x in d["refcount"]] == [0, 0, 2, 3, 0, 0, 0, 0]
    assert [int(x) for x in d["host_mapped"]] == [0, 0, 1, 1, 0, 0, 0, 0]
    p1.release()
    p2.release()
    assert [int(x) for x in g.dump()["refcount"]] == [0, 0, 1, 1, 0, 0, 0, 0]
    g.fallocate(KEEP | PUNCH, 0, 8 * PAGE_SIZE)
    assert int(g.counters["host_ptes_zapped"]) == 2 and int(g.counters["pages_freed"]) == 2


@pytest.mark.parametrize("vm_type", ["sw-protected", "snp", "tdx"])
def test_round_trips_every_vm_type(vm_type, tmp_path):
    """save/load and pickle give back the same state (and keep working) for every VM type."""
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    eng = gmemfast.GuestMemfd(64 * PAGE_SIZE, flags, vm_type=vm_type)
    ref = naive.GuestMemfd(64 * PAGE_SIZE, flags, vm_type=vm_type)
    for g in (eng, ref):
        g.host_write(3 * PAGE_SIZE + 5, b"round trip")
        g.set_memory_attributes(8 * PAGE_SIZE, 8 * PAGE_SIZE, PRIVATE)
    path = tmp_path / "gmem.save"
    eng.save(str(path))
    for copy in (gmemfast.GuestMemfd.load(str(path)), pickle.loads(pickle.dumps(eng))):
        copy.check()
        assert_same_state(copy, ref, f"after a round trip ({vm_type})")
        copy.set_memory_attributes(0, PAGE_SIZE, PRIVATE)
        assert copy.is_private(0) and not eng.is_private(0)
