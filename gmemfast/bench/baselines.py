"""The two models gmemfast is measured against.

``RoaringModel``
    What a careful user would write instead of gmemfast: a pyroaring bitmap of private
    pages (``add_range`` / ``remove_range`` for ranges, ``add`` / ``discard`` for single
    pages), a bitmap of allocated pages, the pins, and -- for huge-page backing -- the
    bookkeeping a user needs to know when a huge folio splits and when it can merge back:
    the set of split blocks and a per-block count of shared pages.

``DenseModel``
    numpy, one ``uint8`` state byte per page (private, allocated, pinned, folio-order
    code).  A conversion does the work the engine does on a huge-page-backed file:
    check the whole range (already has the attributes? any pinned page?), set or clear
    the private bit, split on the way to shared (write order code 0 over the block),
    and on the way to private check whether the block is now wholly private and
    allocated and merge it (write the backing order code over the block).

Both work in pages (``first_page``, ``npages``), not bytes, and answer the same
questions: ``private_pages``, ``is_private``, ``folio_order``, plus ``splits`` and
``merges`` counts.  A conversion returns 0 or an errno (``EAGAIN`` when a page of the
range is pinned, with ``last_error_page`` set); nothing changes on error.  Neither
takes shortcuts a real implementation could not take: they are checked against each
other and against the engine in ``tests/test_baselines.py``.

Model rules (docs/model.md §4.2-4.4, restricted to what the benchmarks use: no punch hole):
- allocating any page of a huge block allocates the whole block, as one huge folio if
  the block was a hole and is wholly private, else as 4 KiB folios (counted as a split);
- to shared: huge folios touching the range split to 4 KiB;
- to private: fails with EAGAIN at the first pinned page of the range; afterwards
  every allocated block touched that is wholly private merges back to the backing order
  (a pinned page is always shared, so "wholly private" implies "safe");
- a page can only be pinned while shared (EFAULT otherwise); pinning faults it in.
"""
from __future__ import annotations

import errno

import numpy as np
from pyroaring import BitMap, BitMap64

__all__ = ["RoaringModel", "DenseModel", "ORDER_CODE", "CODE_ORDER"]

EAGAIN = errno.EAGAIN
EFAULT = errno.EFAULT
EINVAL = errno.EINVAL

# Dense state byte.
PRIV = 1 << 0
ALLOC = 1 << 1
PIN = 1 << 2
ORDER_SHIFT = 3
ORDER_MASK = 3 << ORDER_SHIFT
ORDER_CODE = {0: 0, 9: 1, 18: 2}
CODE_ORDER = (0, 9, 18)
_NOT_PRIV = np.uint8(~PRIV & 0xFF)
_NOT_PIN = np.uint8(~PIN & 0xFF)
_NOT_ORDER = np.uint8(~ORDER_MASK & 0xFF)
_and = np.bitwise_and.reduce
_or = np.bitwise_or.reduce


def _check_order(page_order: int) -> None:
    if page_order not in ORDER_CODE:
        raise ValueError(f"page_order must be 0, 9 or 18, not {page_order}")


class RoaringModel:
    """Private pages in a roaring bitmap; split bookkeeping per huge block."""

    def __init__(self, npages: int, page_order: int = 0, init_private: bool = True):
        _check_order(page_order)
        if page_order and npages % (1 << page_order):
            raise ValueError("npages must be a multiple of the huge page size")
        bm = BitMap if npages <= 1 << 32 else BitMap64
        self.npages = npages
        self.order = page_order
        self.private = bm()
        if init_private:
            self.private.add_range(0, npages)
        self.allocated = bm()
        self.pinned = bm()          # pages with at least one pin
        self.pin_count = {}         # page -> number of pins
        self.split = set()          # allocated huge blocks held as 4 KiB folios
        nblocks = npages >> page_order if page_order else 0
        self.shared_in_block = [0 if init_private else 1 << page_order] * nblocks
        self.splits = 0
        self.merges = 0
        self.last_error_page = -1

    # -- conversion ------------------------------------------------------------------
    def convert(self, first: int, npages: int, private: bool) -> int:
        end = first + npages
        priv = self.private
        if private:
            if priv.contains_range(first, end):
                return 0
            if self.pin_count and self.pinned.range_cardinality(first, end):
                self.last_error_page = self.pinned.next_set_bit(first)
                return EAGAIN
        elif priv.range_cardinality(first, end) == 0:
            return 0
        if self.order:
            self._blocks(first, end, private)
        if private:
            priv.add_range(first, end)
        else:
            priv.remove_range(first, end)
        return 0

    def _blocks(self, first: int, end: int, private: bool) -> None:
        o = self.order
        size = 1 << o
        counts = self.shared_in_block
        for b in range(first >> o, ((end - 1) >> o) + 1):
            bs = b << o
            a, z = max(first, bs), min(end, bs + size)
            nprivate = self.private.range_cardinality(a, z)
            if private:
                n = counts[b] - ((z - a) - nprivate)
                counts[b] = n
                if n == 0 and b in self.split and self.allocated.contains_range(bs, bs + size):
                    self.split.discard(b)
                    self.merges += 1
            elif nprivate:
                if b not in self.split and bs in self.allocated:
                    self.split.add(b)
                    self.splits += 1
                counts[b] += nprivate

    def to_shared_page(self, p: int) -> int:
        """One page to shared: the per-conversion call of the SWIOTLB benchmark."""
        priv = self.private
        if p not in priv:
            return 0
        if self.order:
            b = p >> self.order
            n = self.shared_in_block[b]
            if n == 0 and b not in self.split and p in self.allocated:
                self.split.add(b)
                self.splits += 1
            self.shared_in_block[b] = n + 1
        priv.discard(p)
        return 0

    def to_private_page(self, p: int) -> int:
        """One page to private (EAGAIN if pinned), merging its block when it is whole."""
        priv = self.private
        if p in priv:
            return 0
        if self.pin_count and p in self.pinned:
            self.last_error_page = p
            return EAGAIN
        priv.add(p)
        o = self.order
        if o:
            b = p >> o
            n = self.shared_in_block[b] - 1
            self.shared_in_block[b] = n
            if n == 0 and b in self.split and self.allocated.contains_range(b << o, (b + 1) << o):
                self.split.discard(b)
                self.merges += 1
        return 0

    # -- allocation and pins -------------------------------------------------------
    def fallocate(self, first: int, npages: int) -> int:
        o = self.order
        if not o:
            self.allocated.add_range(first, first + npages)
            return 0
        size = 1 << o
        b0, b1 = first >> o, ((first + npages - 1) >> o) + 1
        s, e = b0 << o, b1 << o
        if self.allocated.range_cardinality(s, e) == 0 and self.private.contains_range(s, e):
            self.allocated.add_range(s, e)   # all holes, all private: huge folios
            return 0
        for b in range(b0, b1):
            bs = b << o
            have = self.allocated.range_cardinality(bs, bs + size)
            if have == size:
                continue
            self.allocated.add_range(bs, bs + size)
            if have == 0 and self.private.contains_range(bs, bs + size):
                continue
            if b not in self.split:
                self.split.add(b)
                if have == 0:
                    self.splits += 1   # placed huge, split at once
        return 0

    def pin(self, p: int) -> int:
        if p in self.private:
            return EFAULT
        if p not in self.allocated:
            self.fallocate(p, 1)
        self.pin_count[p] = self.pin_count.get(p, 0) + 1
        self.pinned.add(p)
        return 0

    def unpin(self, p: int) -> int:
        n = self.pin_count.get(p, 0)
        if not n:
            return EINVAL
        if n == 1:
            del self.pin_count[p]
            self.pinned.discard(p)
        else:
            self.pin_count[p] = n - 1
        return 0

    # -- questions -----------------------------------------------------------------
    def private_pages(self, first: int = 0, npages: int | None = None) -> int:
        if first == 0 and npages is None:
            return len(self.private)
        end = self.npages if npages is None else first + npages
        return self.private.range_cardinality(first, end)

    def is_private(self, first: int, npages: int = 1) -> bool:
        return self.private.contains_range(first, first + npages)

    def folio_order(self, p: int) -> int:
        if p not in self.allocated:
            return -1
        if not self.order or (p >> self.order) in self.split:
            return 0
        return self.order


class DenseModel:
    """One uint8 state byte per page, numpy operations over the range and its blocks."""

    def __init__(self, npages: int, page_order: int = 0, init_private: bool = True):
        _check_order(page_order)
        if page_order and npages % (1 << page_order):
            raise ValueError("npages must be a multiple of the huge page size")
        self.npages = npages
        self.order = page_order
        self.code = np.uint8(ORDER_CODE[page_order] << ORDER_SHIFT)
        # np.full writes every byte, so the array is faulted in here, not in a timed call.
        self.state = np.full(npages, PRIV if init_private else 0, dtype=np.uint8)
        self.pin_count = {}
        self.splits = 0
        self.merges = 0
        self.last_error_page = -1

    def convert(self, first: int, npages: int, private: bool) -> int:
        end = first + npages
        s = self.state[first:end]
        # One pass each, no temporaries: the AND of all state bytes has a bit set iff
        # every page has it, the OR iff some page has it.
        if private:
            if _and(s) & PRIV:
                return 0
            if self.pin_count and _or(s) & PIN:
                self.last_error_page = first + int(np.flatnonzero(s & PIN)[0])
                return EAGAIN
            s |= PRIV
        else:
            if not _or(s) & PRIV:
                return 0
            s &= _NOT_PRIV
        if self.order:
            o = self.order
            st = self.state
            for b in range(first >> o, ((end - 1) >> o) + 1):
                blk = st[b << o:(b + 1) << o]
                head = blk[0]
                if not head & ALLOC:
                    continue
                if not private:
                    if head & ORDER_MASK:
                        blk &= _NOT_ORDER                 # split to 4 KiB
                        self.splits += 1
                elif not head & ORDER_MASK:
                    if (_and(blk) & (PRIV | ALLOC)) == PRIV | ALLOC:
                        blk |= self.code                  # merge to the backing order
                        self.merges += 1
        return 0

    def to_shared_page(self, p: int) -> int:
        return self.convert(p, 1, False)

    def to_private_page(self, p: int) -> int:
        return self.convert(p, 1, True)

    def fallocate(self, first: int, npages: int) -> int:
        o = self.order
        st = self.state
        if not o:
            st[first:first + npages] |= ALLOC
            return 0
        for b in range(first >> o, ((first + npages - 1) >> o) + 1):
            blk = st[b << o:(b + 1) << o]
            if _and(blk) & ALLOC:
                continue
            hole = not _or(blk) & ALLOC
            blk |= ALLOC
            if hole:
                if _and(blk) & PRIV:
                    blk |= self.code                              # one huge folio
                else:
                    self.splits += 1                              # placed huge, split at once
        return 0

    def pin(self, p: int) -> int:
        st = self.state
        if st[p] & PRIV:
            return EFAULT
        if not st[p] & ALLOC:
            self.fallocate(p, 1)
        self.pin_count[p] = self.pin_count.get(p, 0) + 1
        st[p] |= PIN
        return 0

    def unpin(self, p: int) -> int:
        n = self.pin_count.get(p, 0)
        if not n:
            return EINVAL
        if n == 1:
            del self.pin_count[p]
            self.state[p] &= _NOT_PIN
        else:
            self.pin_count[p] = n - 1
        return 0

    def private_pages(self, first: int = 0, npages: int | None = None) -> int:
        end = self.npages if npages is None else first + npages
        return int(np.count_nonzero(self.state[first:end] & PRIV))

    def is_private(self, first: int, npages: int = 1) -> bool:
        return bool(_and(self.state[first:first + npages]) & PRIV)

    def folio_order(self, p: int) -> int:
        v = int(self.state[p])
        if not v & ALLOC:
            return -1
        return CODE_ORDER[(v & ORDER_MASK) >> ORDER_SHIFT]
