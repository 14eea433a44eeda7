"""The page store of one guest_memfd: its state arrays, their growth, and the verbs that
``GuestMemfd``, the VM and the platform adapters call.

The store owns the three-level tree of page words (``_kernels.py`` explains its shape),
the pools behind it and their capacity guarantee (every mutating kernel finds
``RESERVE`` free tables of each level, so it never fails half way), the bytes of pages
that hold contents, and the work counters. It checks nothing about its callers'
arguments: page ranges reach it validated (``units.check_range``) and inside the file.
"""
from __future__ import annotations

from types import MappingProxyType

import numpy as np
from numba.core import types

from . import _kernels as K
from . import _warm
from ._layout import (ALLOC, COUNTER_INDEX, COUNTER_NAMES, DATA, DIRECT_MAP_CODES, GIG, HMAP,
                      HUGE, INVARIANTS, K_DATA, K_HUGE, MERGE_CODES, NCOUNTERS, PRIV, TE_MASK, TE_SHIFT,
                      VM_TYPE_CODES)
from .units import PAGE_SHIFT, PAGE_SIZE

ZERO_PAGE = bytes(PAGE_SIZE)
_POOL_FIRST_BYTES = 1 << 30   # address space first reserved for page tables (see reserve)
_L1_FIRST_BYTES = 3 << 30     # ... for tables of 2 MiB entries (24 KiB a 1 GiB block)
_ROOM_PAGES = int(K.RESERVE - 1) << int(K.S2)   # no shorter range spans over RESERVE 1 GiB blocks
_GC_SLACK = 64                # stored pages beyond twice the live ones before a sweep
GROUP_MIN = 64               # batches from this size on are applied grouped by block
_KEYS_KEPT = 1 << 20          # the largest batch whose grouping scratch is kept (8 MiB)
_SMALL = 16                   # batches below this size go one call at a time

_RC_GROW = K.RC_GROW
_RC_SLOW = K.RC_SLOW
# The tree arrays' numba types: (n2, n1, w0, meta).
_TREE_TYPES = (types.int64[:, ::1], types.int32[:, ::1], types.uint16[::1], types.int64[::1])


def _entry(kernel, *arg_types):
    """The compiled entry point of ``kernel`` for the tree arrays and ``arg_types``: the
    store calls its hot kernels there, without the dispatcher's per-call type matching.
    With the JIT disabled, the plain function."""
    if not hasattr(kernel, "overloads"):
        return kernel
    sig = (*_TREE_TYPES, *arg_types)
    kernel.compile(sig)
    return kernel.overloads[sig].entry_point


class _HotKernels:
    """The kernels of the per-call conversion path, resolved on first use."""

    def __init__(self):
        self.ready = False

    def resolve(self):
        self.convert_page = _entry(K.convert_page, types.int64, types.boolean, types.boolean)
        self.convert = _entry(K.convert, types.int64, types.int64, types.boolean, types.boolean)
        self.ready = True
        return self


_HOT = _HotKernels()

# The arrays a store is saved as (persist.py), in this order.
ARRAY_NAMES = ("n2", "n1", "w0", "meta", "data_pages", "data_blob")


def upgrade_meta(meta: np.ndarray, version: int) -> np.ndarray:
    """A saved ``meta`` array of state format ``version`` in the current layout: format 1
    kept 64 counters and the bookkeeping from index 64; format 2 keeps room for 80
    counters (the new ones start at zero in an old file)."""
    if version >= 2:
        return meta
    meta = np.asarray(meta)
    if meta.shape != (K.META_SIZE,):
        return meta                    # load_arrays refuses the wrong shape with its message
    out = np.zeros_like(meta)
    first = K.M_FREE1 - K.META_V1_SHIFT
    out[:first] = meta[:first]
    width = K.META_SIZE - K.M_FREE1
    out[K.M_FREE1:] = meta[first:first + width]
    return out


# A saved 2 MiB entry has ``K.NF`` int64 fields: word, child, direct-map split, the eight
# counts one to a field, the number of exceptions, the exceptions (the layout the state
# format has always had); the store keeps it in ``K.NF1`` int32 fields (see _kernels).
_SAVED_NX = 3 + int(K.NCOUNTED)
_SAVED_X0 = _SAVED_NX + 1


def saved_l1(n1: np.ndarray) -> np.ndarray:
    """2 MiB entries as the store keeps them, in their saved layout."""
    out = np.zeros((len(n1), K.NF), np.int64)
    kept = n1.astype(np.int64)
    out[:, :K.F_CNT] = kept[:, :K.F_CNT]
    for k in range(K.NCOUNTED):
        out[:, K.F_CNT + k] = (kept[:, K.F_CNT + (k >> 1)] >> ((k & 1) * 16)) & K.CNT_MASK
    out[:, _SAVED_NX] = kept[:, K.F_NX]
    out[:, _SAVED_X0:_SAVED_X0 + K.NX] = kept[:, K.F_X0:K.F_X0 + K.NX]
    return out


def kept_l1(saved: np.ndarray) -> np.ndarray:
    """Saved 2 MiB entries in the layout the store keeps; ``ValueError`` if a field does
    not fit it (a count outside ``[0, 512]``, another field outside int32)."""
    counts = saved[:, K.F_CNT:K.F_CNT + K.NCOUNTED]
    other = np.concatenate([saved[:, :K.F_CNT], saved[:, _SAVED_NX:]], axis=1)
    if len(saved) and (counts.min() < 0 or counts.max() > K.N1
                       or other.min() < np.iinfo(np.int32).min or other.max() > np.iinfo(np.int32).max):
        raise ValueError("state arrays hold values out of range (damaged file)")
    out = np.zeros((len(saved), K.NF1), np.int64)
    out[:, :K.F_CNT] = saved[:, :K.F_CNT]
    for k in range(K.NCOUNTED):
        out[:, K.F_CNT + (k >> 1)] |= counts[:, k] << ((k & 1) * 16)
    out[:, K.F_NX] = saved[:, _SAVED_NX]
    out[:, K.F_X0:K.F_X0 + K.NX] = saved[:, _SAVED_X0:_SAVED_X0 + K.NX]
    return out.astype(np.int32)


def word_order(w: int) -> int:
    """Folio order of a page word: 0, 9 or 18, or -1 for a hole."""
    if not w & ALLOC:
        return -1
    if w & GIG:
        return 18
    return 9 if w & HUGE else 0


class PageStore:
    """The state of every page of one file, and the work done on it.

    ``nr_pages`` pages, backed by folios of ``page_order``; ``init_private`` is the
    initial shareability. The policy arguments are the names of ``_layout``'s code
    tables (``vm_type``: ``"snp"``; ``direct_map``: ``"on-conversion"``; ``merge``:
    ``"eager"``); ``metadata_limit`` bounds the shareability ranges (``None``: no bound).
    """

    def __init__(self, nr_pages: int, *, page_order: int, init_private: bool, vm_type: str,
                 direct_map: str, merge: str, hugetlb: bool, metadata_limit: int | None,
                 content_modes: bool):
        _warm.ensure_compiled("run")
        self.nr_pages = nr_pages
        self.page_order = page_order
        nl2 = -(-nr_pages // K.N2)
        initw = PRIV if init_private else 0
        n2 = np.zeros((nl2, K.NF), np.int64)
        n2[:, K.F_WORD] = initw
        n2[:, K.F_CHILD] = -1
        n2[:, K.F_CNT + 1] = K.N2 if initw else 0
        meta = np.zeros(K.META_SIZE, np.int64)
        meta[K.M_FREE1] = meta[K.M_FREE0] = -1
        meta[K.M_LIMIT] = -1 if metadata_limit is None else metadata_limit
        meta[K.M_NPAGES] = nr_pages
        meta[K.M_ORDER] = page_order
        meta[K.M_DMAP] = DIRECT_MAP_CODES[direct_map]
        meta[K.M_MERGE] = MERGE_CODES[merge]
        meta[K.M_VMTYPE] = VM_TYPE_CODES[vm_type]
        meta[K.M_HUGETLB] = int(hugetlb)
        meta[K.M_CONTENT_MODES] = int(content_modes)
        meta[K.M_TAIL] = nl2 * K.N2 - nr_pages
        meta[K.M_INITW] = initw
        meta[K.M_GCNT + 1] = nl2 * K.N2 if initw else 0
        self._n2 = n2
        self._n1 = np.zeros((0, K.NF1), np.int32)
        self._w0 = np.zeros(0, np.uint16)
        self._meta = meta
        self._data: dict[int, bytes] = {}    # page -> 4096 bytes; valid only with DATA set
        self._keys = np.zeros(0, np.int64)     # scratch of convert_pages
        self.reserve()

    # ---------------------------------------------------------------- capacity
    def reserve(self, extra1: int = 0) -> None:
        """Make sure every pool has ``RESERVE`` free tables (kernels never allocate), and
        the pool of 2 MiB-entry tables ``extra1`` more (``room_for``).

        The first allocation reserves room for as many tables as the file could ever
        need, up to a bound: the pools are zero-filled with ``calloc``, so pages of them
        that are never used cost address space, not memory, and never need copying.
        """
        meta = self._meta
        f1, f0 = K.free_tables(meta)
        if f1 < K.RESERVE + extra1:
            cap = max(2 * int(meta[K.M_CAP1]), int(meta[K.M_USED1]) + 2 * K.RESERVE + extra1)
            if meta[K.M_CAP1] == 0:
                # one table per 1 GiB block at most: reserve them all (address space)
                cap = max(cap, min(len(self._n2), _L1_FIRST_BYTES // (K.N1 * K.NF1 * 4)) + K.RESERVE)
            n1 = np.zeros((cap * K.N1, K.NF1), np.int32)
            n1[: len(self._n1)] = self._n1
            self._n1 = n1
            meta[K.M_CAP1] = cap
        if f0 < K.RESERVE:
            cap = max(2 * int(meta[K.M_CAP0]), int(meta[K.M_USED0]) + 2 * K.RESERVE)
            if meta[K.M_CAP0] == 0:
                cap = max(cap, min(-(-self.nr_pages // K.N1), _POOL_FIRST_BYTES // (K.N1 * 2)) + K.RESERVE)
            w0 = np.zeros(cap * K.N1, np.uint16)
            w0[: len(self._w0)] = self._w0
            self._w0 = w0
            meta[K.M_CAP0] = cap

    def _tree(self, p0: int = 0, p1: int = 0, extra1: int = 0):
        """The arrays a kernel takes, its pools reserved first: ``RESERVE`` free tables,
        ``extra1`` more of 2 MiB entries, or what a call over ``[p0, p1)`` may take
        (``room_for``)."""
        if p1 - p0 > _ROOM_PAGES:
            extra1 = self.room_for(p0, p1)
        self.reserve(extra1)
        return self._n2, self._n1, self._w0, self._meta

    def room_for(self, p0s, p1s) -> int:
        """Tables of 2 MiB entries to reserve, beyond the ``RESERVE`` every kernel call can
        count on, for calls over the page ranges ``[p0s, p1s)`` (ints or arrays): a range
        over more 1 GiB blocks than that can give each block that has none a table of its
        own (a direct-map break under every block). 0 for ranges over at most ``RESERVE``
        blocks each, or where the pool already holds a free table for every block they
        touch; else the blocks without a table among them (counted)."""
        if not isinstance(p1s, np.ndarray):         # one range: plain ints, no arrays
            i0 = int(p0s) >> K.S2
            span = ((int(p1s) - 1) >> K.S2) - i0 + 1
            if span <= K.RESERVE:
                return 0
            if self._free1() >= K.RESERVE + span:
                return 0
            return int(np.count_nonzero(self._n2[i0:i0 + span, K.F_CHILD] < 0))
        p0s = np.asarray(p0s)
        if p1s.size == 0 or int((p1s - p0s).max()) <= _ROOM_PAGES:
            return 0            # the usual batch: one pass, no range long enough
        spans = (p1s - 1 >> K.S2) - (p0s >> K.S2) + 1
        need = int(spans[spans > K.RESERVE].sum())
        if need == 0 or self._free1() >= K.RESERVE + need:
            return 0
        return min(need, int(np.count_nonzero(self._n2[:, K.F_CHILD] < 0)))

    def _free1(self) -> int:
        """Free tables of 2 MiB entries (``K.free_tables``, read here without a kernel call)."""
        m = self._meta
        return int(m[K.M_CAP1] - m[K.M_USED1] + m[K.M_NFREE1])

    # ---------------------------------------------------------------- reading
    def word(self, p: int) -> int:
        """The state word of page ``p`` (bits: ``_layout``)."""
        return int(K.get_word(self._n2, self._n1, self._w0, p))

    def words(self, p0: int, p1: int) -> np.ndarray:
        """The state words of pages ``[p0, p1)``."""
        out = np.empty(p1 - p0, np.int64)
        K.get_words(self._n2, self._n1, self._w0, p0, p1, out)
        return out

    def count(self, p0: int, p1: int, cmask: int, cval: int) -> int:
        """Pages of ``[p0, p1)`` whose word ``w`` has ``w & cmask == cval``."""
        return int(K.walk_count(self._n2, self._n1, self._w0, p0, p1, cmask, cval))

    def first(self, p0: int, p1: int, cmask: int, cval: int) -> int:
        """The first such page, or -1."""
        return int(K.walk_first(self._n2, self._n1, self._w0, p0, p1, cmask, cval))

    def total(self, k: int) -> int:
        """Pages of the file with counted bit ``k`` (``_layout.K_*``) set."""
        return int(K.gcount(self._meta, k))

    def te_state(self, p: int) -> int:
        """Trusted-entity state of page ``p`` (``_layout.TE_*``, per the VM type)."""
        return (self.word(p) & TE_MASK) >> TE_SHIFT

    def huge_folios(self) -> int:
        if self.page_order == 0:
            return 0
        return self.total(K_HUGE) >> self.page_order

    def attribute_ranges(self) -> int:
        """Maximal runs of equal shareability: the entries of the per-file store."""
        return int(K.attribute_ranges(self._n2, self._n1, self._w0, self._meta))

    def dmap_entries(self) -> tuple[int, int, int]:
        """Kernel direct-map entries covering the file: (1 GiB, 2 MiB, 4 KiB)."""
        e1g, e2m, e4k = K.dmap_counts(self._n2, self._meta)
        return int(e1g), int(e2m), int(e4k)

    def footprint(self) -> int:
        """Bytes of page state held (summaries, tables in use, contents)."""
        m = self._meta
        return int(self._n2.nbytes + m[K.M_USED1] * K.N1 * K.NF1 * 4 + m[K.M_USED0] * K.N1 * 2
                   + len(self._data) * PAGE_SIZE)

    def check(self) -> tuple[int, int]:
        """``(rule, page)`` of the first broken invariant (``_layout.INVARIANTS``), or
        ``(0, -1)``; also that stored bytes lie inside the file."""
        _warm.ensure_compiled("state")
        rule, page = K.check_tree(self._n2, self._n1, self._w0, self._meta,
                                  np.zeros((3, K.NCOUNTED), np.int64))
        if rule:
            return int(rule), int(page)
        m = self._meta
        rule = K.check_pools(self._n2, self._n1, self._w0, m,
                             np.zeros(max(int(m[K.M_USED1]), 0), np.uint8),
                             np.zeros(max(int(m[K.M_USED0]), 0), np.uint8))
        if rule:
            return int(rule), -1        # about the pools, not a page
        if tuple(K.dmap_entries(self._n2, self._n1, self.nr_pages)) != tuple(K.dmap_counts(self._n2, self._meta)):
            return int(K.INV_DMAP_COUNTS), 0
        for p in self._data:
            if p >= self.nr_pages:
                return 12, p
        return 0, -1

    # ---------------------------------------------------------------- policy state
    @property
    def finalized(self) -> bool:
        return bool(self._meta[K.M_FINALIZED])

    @finalized.setter
    def finalized(self, value: bool) -> None:
        self._meta[K.M_FINALIZED] = int(bool(value))

    def inject_enomem(self, n: int) -> None:
        """The next ``n`` metadata reservations (conversions) fail with ``ENOMEM``."""
        self._meta[K.M_ENOMEM] = n

    # ---------------------------------------------------------------- counters
    def counter_values(self) -> np.ndarray:
        """A copy of the counters, in ``COUNTER_NAMES`` order."""
        return self._meta[:NCOUNTERS].copy()

    def counters(self):
        return MappingProxyType(dict(zip(COUNTER_NAMES, self._meta[:NCOUNTERS].tolist())))

    def count_work(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``: work done outside the kernels (firmware calls)."""
        self._meta[COUNTER_INDEX[name]] += n

    # ---------------------------------------------------------------- changing
    def apply(self, p0: int, p1: int, cmask: int, cval: int, clr: int, setb: int) -> int:
        """For pages of ``[p0, p1)`` with ``w & cmask == cval``: ``w = (w & ~clr) | setb``.
        Returns the pages changed."""
        return int(K.walk_apply(*self._tree(p0, p1), p0, p1, cmask, cval, clr, setb))

    def allocate(self, p0: int, p1: int) -> int:
        """Allocate every hole of ``[p0, p1)``, widened to whole backing-order blocks."""
        return int(K.allocate(*self._tree(p0, p1), p0, p1))

    def fault_in(self, p0: int, p1: int, bit: int) -> int:
        """Fault ``[p0, p1)`` into the host (``HMAP``) or guest (``GMAP``) mappings,
        allocating holes first. Returns the pages newly mapped."""
        self.allocate(p0, p1)
        n = self.apply(p0, p1, bit, 0, 0, bit)
        if bit == HMAP:
            self.count_work("host_faults", n)
        return n

    def set_te(self, p0: int, p1: int, state: int, *, guest_mapped: bool = False) -> None:
        """Move allocated private pages of ``[p0, p1)`` to trusted-entity ``state``."""
        setb = (state << TE_SHIFT) | (K.GMAP if guest_mapped else 0)
        self.apply(p0, p1, 0, 0, TE_MASK, setb)

    def accept(self, p0: int, p1: int, chunk_pages: int, te_state: int, map_pages: int = 0,
               prefault: bool = False) -> int:
        """The guest accepts ``[p0, p1)`` (allocated first) in chunks of ``chunk_pages``;
        returns the chunks that did work. ``map_pages``: the host's mapping level in
        pages (0: the chunk's); ``prefault``: the VMM mapped it beforehand."""
        self.allocate(p0, p1)
        return int(K.accept(*self._tree(p0, p1), p0, p1, chunk_pages, te_state, map_pages, bool(prefault)))

    def zap_guest(self, p0: int, p1: int) -> int:
        """Invalidate the guest (stage-2) mappings of ``[p0, p1)``."""
        return int(K.zap_guest(*self._tree(p0, p1), p0, p1))

    def punch(self, p0: int, p1: int) -> tuple[int, int]:
        """Punch a hole over ``[p0, p1)``: ``(0, -1)`` or ``(EAGAIN, pinned page)``."""
        err, pg = K.punch(*self._tree(p0, p1), p0, p1)
        if not err:
            self.gc_bytes()
        return int(err), int(pg)

    def convert(self, p0: int, p1: int, to_private: bool, zero: bool) -> tuple[int, int]:
        """Conversion of ``[p0, p1)`` (docs/model.md §4.4, steps 2-9): ``(0, -1)``, or
        ``(ENOMEM | EAGAIN, page)``. Nothing changes on error but zapped host mappings.
        ``to_private`` and ``zero`` are bools, ``p0``/``p1`` ints."""
        hot = _HOT if _HOT.ready else _HOT.resolve()
        err = _RC_SLOW
        if p1 - p0 == 1:
            err, pg = hot.convert_page(self._n2, self._n1, self._w0, self._meta, p0, to_private, zero)
        if err == _RC_SLOW:
            if p1 - p0 > _ROOM_PAGES:
                extra = self.room_for(p0, p1)
                if extra:
                    self.reserve(extra)
            err, pg = hot.convert(self._n2, self._n1, self._w0, self._meta, p0, p1, to_private, zero)
        while err == _RC_GROW:
            self.reserve()
            err, pg = hot.convert(self._n2, self._n1, self._w0, self._meta, p0, p1, to_private, zero)
        if zero and len(self._data) > _GC_SLACK:
            self.gc_bytes()
        return err, pg

    def convert_many(self, p0s, p1s, to_private, zero, out_err, out_page) -> None:
        """Conversions of validated page ranges; items whose ``out_err`` is set are
        skipped. Fills ``out_err`` (0 = done) and ``out_page`` (-1 = none), which must
        hold 0 and -1 for the items to do.

        The results are those of applying the items in order. A large batch is applied
        grouped by block (1 GiB with 1 GiB folios, else 2 MiB; the items of one block in
        their order) where that cannot change any result: conversions of different
        blocks touch disjoint state but for counters that add up. Where it could (a
        metadata limit, injected ``ENOMEM``, an item spanning blocks), in order."""
        n = len(p0s)
        meta = self._meta
        args = (p0s, p1s, to_private, zero, np.arange(n, dtype=np.int64), True)
        if n >= GROUP_MIN and meta[K.M_LIMIT] < 0 and meta[K.M_ENOMEM] <= 0:
            shift = K.S2 if self.page_order == 18 or (self.nr_pages >> K.S1) > 8 * n else K.S1
            nblocks = ((self.nr_pages - 1) >> shift) + 1
            order, g0, g1 = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
            gpriv, gzero = np.empty(n, to_private.dtype), np.empty(n, zero.dtype)
            m = int(K.group_items(p0s, p1s, to_private, zero, out_err, shift,
                                  np.zeros(nblocks + 1, np.int64), order, g0, g1, gpriv, gzero))
            if m >= 0:
                args = (g0[:m], g1[:m], gpriv[:m], gzero[:m], order[:m], False)
        x, n = 0, len(args[0])
        extra = self.room_for(args[0], args[1])
        while x < n:
            x = K.convert_many(*self._tree(extra1=extra), *args, x, out_err, out_page)
        if len(self._data) > _GC_SLACK:
            self.gc_bytes()

    def convert_pages(self, offs, to_private: bool, zero: bool, out_err, out_off) -> bool:
        """One-page conversions at byte offsets ``offs`` (int64, contiguous), all to
        ``to_private`` with ``zero``, with the results of applying them in order: fills
        ``out_err`` (0 = done) and ``out_off`` (a byte offset, -1 = none), which must hold 0
        and -1. Grouped by 1 GiB block (``convert_many`` says why that changes no
        result). Returns False, having done nothing, for a batch too small to group
        (``GROUP_MIN``), where the order could matter (a metadata limit, injected
        ``ENOMEM``) or where an offset is not a page of the file: the caller then takes
        the general path."""
        meta = self._meta
        n = len(offs)
        if n < GROUP_MIN or meta[K.M_LIMIT] >= 0 or meta[K.M_ENOMEM] > 0:
            return False
        _warm.ensure_compiled("pages")
        ends = np.zeros(((self.nr_pages - 1) >> K.S2) + 1, np.int64)
        if n <= _KEYS_KEPT:        # kept between calls: a new array costs its page faults
            if len(self._keys) < n:
                self._keys = np.empty(min(max(n, 2 * len(self._keys)), _KEYS_KEPT), np.int64)
            keys = self._keys[:n]
        else:
            keys = np.empty(n, np.int64)
        if K.group_pages(offs, self.nr_pages, ends, keys) < 0:
            return False
        x = 0
        while x < n:
            x, _ = K.convert_pages(*self._tree(), keys, ends, to_private, zero, x, out_err, out_off)
        if len(self._data) > _GC_SLACK:
            self.gc_bytes()
        return True

    @staticmethod
    def small_batch(n: int) -> bool:
        """Whether a batch of ``n`` conversions costs less applied one call at a time than
        through ``convert_many`` (never one that would be grouped by block)."""
        return n < min(_SMALL, GROUP_MIN)

    def accept_many(self, p0s, p1s, chunk_pages: int, te_state: int, map_pages: int,
                    prefault: bool, check: bool, out_err, out_page):
        """``accept`` of many page ranges in order (``accept_many`` in the kernels); returns
        the chunks of each item."""
        chunks = np.zeros(len(p0s), np.int64)
        x, n = 0, len(p0s)
        extra = self.room_for(p0s, p1s)
        while x < n:
            x = K.accept_many(*self._tree(extra1=extra), p0s, p1s, chunk_pages, te_state, map_pages,
                              bool(prefault), bool(check), x, out_err, out_page, chunks)
        return chunks

    def fallocate_many(self, punch_hole, p0s, p1s, out_err, out_page) -> None:
        """Allocations and punches of validated page ranges in order (empty punches do
        nothing); fills ``out_err`` and ``out_page``."""
        x, n = 0, len(p0s)
        extra = self.room_for(p0s, p1s)
        while x < n:
            x = K.fallocate_many(*self._tree(extra1=extra), punch_hole, p0s, p1s, x, out_err, out_page)
        self.gc_bytes()

    # ---------------------------------------------------------------- page bytes
    def page_bytes(self, p: int, word: int | None = None) -> bytes:
        """Page ``p``'s bytes as the platform (firmware, not the host) sees them."""
        if word is None:
            word = self.word(p)
        if word & DATA:
            return self._data.get(p, ZERO_PAGE)
        return ZERO_PAGE

    def set_page_bytes(self, p: int, data) -> None:
        """Store a page's bytes (``None``: zero the page, counted as zeroing)."""
        if data is None:
            self.apply(p, p + 1, DATA, DATA, DATA, 0)
            self.count_work("pages_zeroed")
            self.count_work("bytes_zeroed_4k", PAGE_SIZE)
            return
        self._data[p] = bytes(data)
        self.apply(p, p + 1, DATA, 0, 0, DATA)

    def write_bytes(self, offset: int, mv, p0: int, p1: int) -> None:
        """Store ``mv`` at byte ``offset`` (pages ``[p0, p1)``, already faulted in)."""
        words = self.words(p0, p1)
        pos = 0
        end = offset + len(mv)
        for idx in range(p1 - p0):
            p = p0 + idx
            start = p << PAGE_SHIFT
            a = max(offset, start)
            b = min(end, start + PAGE_SIZE)
            if a == start and b == start + PAGE_SIZE:
                self._data[p] = bytes(mv[pos:pos + PAGE_SIZE])
            else:
                page = bytearray(self.page_bytes(p, int(words[idx])))
                page[a - start:b - start] = mv[pos:pos + b - a]
                self._data[p] = bytes(page)
            pos += b - a
        self.apply(p0, p1, DATA, 0, 0, DATA)
        self.gc_bytes()

    def read_bytes(self, offset: int, size: int, p0: int, p1: int) -> bytes:
        """The ``size`` bytes at ``offset`` (pages ``[p0, p1)``)."""
        words = self.words(p0, p1)
        if not (words & DATA).any():
            return bytes(size)
        buf = b"".join(self.page_bytes(p0 + i, int(words[i])) for i in range(p1 - p0))
        s = offset - (p0 << PAGE_SHIFT)
        return buf[s:s + size]

    def data_pages(self) -> list[int]:
        """Pages whose stored bytes are live (their DATA bit is set), in order."""
        return sorted(p for p in self._data if self.word(p) & DATA)

    def gc_bytes(self) -> None:
        """Drop stored bytes of pages that were zeroed or freed (their DATA bit is clear)."""
        live = self.total(K_DATA)
        if len(self._data) <= 2 * live + _GC_SLACK:
            return
        for p in list(self._data):
            if p >= self.nr_pages or not self.word(p) & DATA:
                del self._data[p]

    # ---------------------------------------------------------------- persistence
    def to_arrays(self) -> dict:
        """The whole state as arrays (``ARRAY_NAMES``), for saving."""
        m = self._meta
        pages = self.data_pages()
        blob = np.frombuffer(b"".join(self._data[p] for p in pages), np.uint8)
        _warm.ensure_compiled("state")
        # saved with complete page words (the folio order in every page word), as the
        # format has always been; the kernels keep the order per 2 MiB entry
        n1 = self._n1[: int(m[K.M_USED1]) * K.N1].copy()
        w0 = self._w0[: int(m[K.M_USED0]) * K.N1].copy()
        K.order_bits_to_pages(self._n2, n1, w0, m, True)
        n1 = saved_l1(n1)            # saved as int64, as it has always been
        return {
            "n2": self._n2,
            "n1": n1,
            "w0": w0,
            "meta": m,
            "data_pages": np.array(pages, np.int64),
            "data_blob": blob,
        }

    def load_arrays(self, arrays: dict) -> None:
        """Replace the state with saved arrays; ``ValueError`` if they do not fit this
        store's shape (the invariants are checked by the caller, with ``check``)."""
        _warm.ensure_compiled("state")
        n2, n1, w0, meta = (np.array(arrays[k]) for k in ("n2", "n1", "w0", "meta"))
        ok = (n2.shape == self._n2.shape and n2.dtype == np.int64
              and meta.shape == self._meta.shape and meta.dtype == np.int64
              and n1.dtype == np.int64 and n1.ndim == 2 and n1.shape[1] == K.NF
              and n1.shape[0] == meta[K.M_USED1] * K.N1
              and w0.dtype == np.uint16 and w0.shape[0] == meta[K.M_USED0] * K.N1)
        if not ok:
            raise ValueError("state arrays do not match the header (damaged file)")
        blob = bytes(np.asarray(arrays["data_blob"], np.uint8))
        pages = np.asarray(arrays["data_pages"]).tolist()
        if len(blob) != len(pages) * PAGE_SIZE:
            raise ValueError("stored contents do not match their page list (damaged file)")
        n1 = kept_l1(n1)             # saved as int64 fields, kept packed in int32
        meta[K.M_CAP1] = meta[K.M_USED1]
        meta[K.M_CAP0] = meta[K.M_USED0]
        rule, page = K.order_bits_to_pages(n2, n1, w0, meta, False)
        if rule:
            raise ValueError(f"state is inconsistent (damaged file): page-state invariant {rule} "
                             f"({INVARIANTS[rule]}) broken at page {page}")
        self._n2, self._n1, self._w0, self._meta = n2, n1, w0, meta
        K.count_dsplits(n2, n1, meta)
        self._data = {p: blob[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i, p in enumerate(pages)}
        self.reserve()
