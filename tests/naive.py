"""A deliberately naive reference model of one guest_memfd.

Plain Python lists indexed by page, per-page loops, no numpy, no numba, and nothing
from ``gmemfast`` except the error classes (so that ``pytest.raises`` and exception
class comparisons work on both sides). It exists to be obviously correct, not fast: the
property tests run it side by side with the engine and compare complete state.

Semantics: docs/model.md sections 1-5, including the model decisions where
the kernel is silent (allocation widening, punch clamping, direct-map granularity, the
metadata limit, merge on to-private, the counters below). Each decision is written out
next to the code that makes it.

Only bulk *assignments* use list slices (``a[i:j] = [v] * n``); every decision is made
page by page or block by block, in the order docs/model.md lists the steps.
"""
from __future__ import annotations

import errno
import itertools
import numbers

try:  # the public package; fall back to the errors module while __init__ is missing
    from gmemfast import GmemError, SigBusError
except ImportError:  # pragma: no cover - only before the package exports exist
    from gmemfast.errors import GmemError, SigBusError

# Constants: values from the kernel uapi, written out again on purpose.
PAGE_SIZE = 4096
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GUEST_MEMFD_FLAG_NO_DIRECT_MAP = 1 << 2
GUEST_MEMFD_FLAG_HUGETLB = 1 << 3
KNOWN_FLAGS = (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
               | GUEST_MEMFD_FLAG_NO_DIRECT_MAP | GUEST_MEMFD_FLAG_HUGETLB)
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE = 1 << 0
KVM_SET_MEMORY_ATTRIBUTES2_ZERO = 1 << 1
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

PAGES_PER_2M = 512
PAGES_PER_1G = 512 * 512
HUGE_BYTES = {9: 2 << 20, 18: 1 << 30}
VM_TYPES = ("sw-protected", "snp", "tdx")
DIRECT_MAP_POLICIES = ("keep", "no-direct-map", "on-conversion")
ZERO_PAGE = bytes(PAGE_SIZE)

# The counters the reference computes; the engine's ``counters`` must agree on these.
COUNTERS = (
    "pages_allocated",
    "pages_freed",
    "pages_to_private",
    "pages_to_shared",
    "folio_splits_2m",
    "folio_splits_1g",
    "folio_merges_2m",
    "folio_merges_1g",
    "host_ptes_zapped",
)


def _int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    return int(value)


def _einval(message):
    return GmemError(errno.EINVAL, message)


def _parse_size(value):
    if isinstance(value, str):
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        text = value.strip().upper()
        if text[-1:] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    return _int(value, "size")


def _page_range(offset, size, nr_pages, what):
    """The range rule (docs/model.md §1): EINVAL for size 0, unaligned, overflow, past the end."""
    if size == 0:
        raise _einval(f"{what}: size is 0")
    if offset < 0 or size < 0:
        raise _einval(f"{what}: negative offset {offset} or size {size}")
    if offset % PAGE_SIZE:
        raise _einval(f"{what}: offset {offset:#x} is not page aligned")
    if size % PAGE_SIZE:
        raise _einval(f"{what}: size {size:#x} is not page aligned")
    end = offset + size
    if end >= 1 << 64:
        raise _einval(f"{what}: offset {offset:#x} + size {size:#x} overflows")
    if offset >= nr_pages * PAGE_SIZE:
        raise _einval(f"{what}: offset {offset:#x} is at or past the end")
    if end > nr_pages * PAGE_SIZE:
        raise _einval(f"{what}: end {end:#x} is past the end")
    return offset // PAGE_SIZE, end // PAGE_SIZE


def _runs(pages):
    """Maximal runs [start, end) of a sorted list of page indices."""
    runs = []
    for p in pages:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [(a, b) for a, b in runs]


class Pin:
    """A long-term GUP pin on whole pages; ``release()`` once."""

    def __init__(self, gmem, first, end):
        self.gmem = gmem
        self.first = first
        self.end = end
        self.released = False
        # pages whose folio this pin still holds in the file: a punch with 4 KiB backing
        # removes pinned pages from the file anyway, and the pin then holds an orphan
        self.in_file = set(range(first, end))

    @property
    def offset(self):
        return self.first * PAGE_SIZE

    @property
    def size(self):
        return (self.end - self.first) * PAGE_SIZE

    def release(self):
        if self.released:
            raise _einval(f"pin of offset {self.offset:#x} (+{self.size:#x}) already released")
        for p in range(self.first, self.end):
            if p in self.in_file:
                assert self.gmem.pins[p] > 0
                self.gmem.pins[p] -= 1
        self.released = True
        self.gmem.live_pins.remove(self)


class BatchResult:
    def __init__(self, errnos, error_offsets):
        self.errno = errnos
        self.error_offset = error_offsets


class GuestMemfd:
    """The reference guest_memfd. Same public names as the engine's GuestMemfd."""

    def __init__(self, size, flags=0, *, page_order=0, vm_type="sw-protected",
                 direct_map=None, metadata_limit=None, merge="eager", content_modes=True):
        size = _parse_size(size)
        flags = _int(flags, "flags")
        page_order = _int(page_order, "page_order")
        if flags & ~KNOWN_FLAGS or flags < 0:
            raise _einval(f"unknown flags {flags:#x}")
        if flags & GUEST_MEMFD_FLAG_HUGETLB:
            if page_order not in (9, 18):
                raise _einval(f"page_order {page_order} with HUGETLB (must be 9 or 18)")
            unit = HUGE_BYTES[page_order]
        else:
            if page_order != 0:
                raise _einval(f"page_order {page_order} without HUGETLB (must be 0)")
            unit = PAGE_SIZE
        if size <= 0 or size % unit:
            raise _einval(f"size {size:#x} is not a positive multiple of {unit:#x}")
        if vm_type not in VM_TYPES:
            raise ValueError(f"unknown vm_type {vm_type!r}")
        if direct_map is None:
            direct_map = "no-direct-map" if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP else "keep"
        if direct_map not in DIRECT_MAP_POLICIES:
            raise _einval(f"unknown direct_map policy {direct_map!r}")
        if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP and direct_map == "keep":
            raise _einval("NO_DIRECT_MAP with direct_map='keep'")
        if merge not in ("eager", "never"):
            raise ValueError(f"unknown merge policy {merge!r}")

        self.size = size
        self.flags = flags
        self.page_order = page_order
        self.vm_type = vm_type
        self.direct_map = direct_map
        self.metadata_limit = metadata_limit
        self.merge = merge
        self.content_modes = bool(content_modes)
        self.finalized = False      # the launch is finished (VM-level; tests set it)
        n = self.nr_pages = size // PAGE_SIZE

        shared = bool(flags & GUEST_MEMFD_FLAG_INIT_SHARED)
        self.private = [not shared] * n
        self.allocated = [False] * n
        self.host_mapped = [False] * n
        self.pins = [0] * n
        self.order = [-1] * n
        self.dmap_removed = [False] * n
        self.contents = {}          # page -> bytes (4096); absent means zero
        self.split_1g = set()       # 1 GiB blocks whose 1G direct-map entry is split
        self.split_2m = set()       # 2 MiB blocks whose 2M direct-map entry is split
        self.enomem = 0             # armed injected ENOMEM faults
        self.live_pins = []         # Pin objects not yet released
        self.counters = {name: 0 for name in COUNTERS}

    # ------------------------------------------------------------------ helpers
    @property
    def block_pages(self):
        return 1 << self.page_order

    def _blocks_touching(self, first, end):
        """Backing-order block starts touching pages [first, end)."""
        b = self.block_pages
        start = first - first % b
        return range(start, end, b)

    def _count_split(self, order):
        self.counters["folio_splits_2m" if order == 9 else "folio_splits_1g"] += 1

    def _count_merge(self, order):
        self.counters["folio_merges_2m" if order == 9 else "folio_merges_1g"] += 1

    def _is_one_huge_folio(self, bs):
        k = self.page_order
        return k > 0 and self.order[bs:bs + self.block_pages] == [k] * self.block_pages

    def _split_block(self, bs):
        """Split the huge folio at block ``bs`` into order-0 folios."""
        k = self.page_order
        for p in range(bs, bs + self.block_pages):
            assert self.order[p] == k
            self.order[p] = 0
        self._count_split(k)

    @property
    def attribute_ranges(self):
        """Maximal runs of pages with equal shareability."""
        return sum(1 for _run in itertools.groupby(self.private))

    # ---------------------------------------------------------- the direct map
    def _dmap_change(self, pages, removed):
        """Remove (or restore) the given pages from the direct map, as one operation.

        Only allocated pages whose state changes count. The kernel changes the direct map
        a folio at a time, so they are handled as pieces: maximal contiguous runs inside
        one folio. Each piece splits the 1G entry of every 1 GiB block it touches but does
        not wholly cover, then the 2M entry of every 2 MiB block (inside a split 1G block)
        it touches but does not wholly cover. Blocks are aligned physical blocks: a file
        smaller than a block never wholly covers it (the entry maps other memory too), so
        the last, partial block of a file splits whenever its pages change.
        """
        changing = []
        for p in sorted(pages):
            if self.allocated[p] and self.dmap_removed[p] != removed:
                changing.append(p)
        for p in changing:
            self.dmap_removed[p] = removed

        def folio(p):
            k = self.order[p]
            return (k, p >> k) if k > 0 else (0, p)

        pieces = []
        for a, b in _runs(changing):
            start = a
            for p in range(a + 1, b):
                if folio(p) != folio(p - 1):
                    pieces.append((start, p))
                    start = p
            pieces.append((start, b))
        for a, b in pieces:
            for g in range(a // PAGES_PER_1G, (b - 1) // PAGES_PER_1G + 1):
                gs, ge = g * PAGES_PER_1G, (g + 1) * PAGES_PER_1G
                if not (a <= gs and ge <= b):
                    self.split_1g.add(g)
            for m in range(a // PAGES_PER_2M, (b - 1) // PAGES_PER_2M + 1):
                ms, me = m * PAGES_PER_2M, (m + 1) * PAGES_PER_2M
                if (ms // PAGES_PER_1G) in self.split_1g and not (a <= ms and me <= b):
                    self.split_2m.add(m)

    def direct_map_entries(self):
        """Entries mapping the file's pages: 1G blocks unsplit, 2M blocks (of split 1G
        blocks, counting the file's partial last block) unsplit, 512 per split 2M block."""
        n = self.nr_pages
        n1g = (n + PAGES_PER_1G - 1) // PAGES_PER_1G
        two_m = 0
        for g in self.split_1g:
            gs, ge = g * PAGES_PER_1G, min((g + 1) * PAGES_PER_1G, n)
            blocks_2m = (ge - gs + PAGES_PER_2M - 1) // PAGES_PER_2M
            split_here = sum(1 for m in self.split_2m if m * PAGES_PER_2M // PAGES_PER_1G == g)
            two_m += blocks_2m - split_here
        return {"1G": n1g - len(self.split_1g), "2M": two_m, "4K": 512 * len(self.split_2m)}

    # --------------------------------------------------------------- allocation
    def _allocate(self, first, end):
        """Allocate every hole in the backing-order blocks touching pages [first, end)."""
        k = self.page_order
        new_pages = []
        for bs in self._blocks_touching(first, end):
            be = min(bs + self.block_pages, self.nr_pages)
            holes = [p for p in range(bs, be) if not self.allocated[p]]
            if not holes:
                continue
            if k > 0 and len(holes) == be - bs:
                if all(self.private[p] for p in range(bs, be)):
                    order = k            # one huge folio
                else:
                    order = 0            # allocated huge, split at once
                    self._count_split(k)
            else:
                order = 0
            for p in holes:
                self.allocated[p] = True
                self.order[p] = order
                # newly allocated pages are zero: a hole never holds contents
                assert p not in self.contents
            new_pages.extend(holes)
        self.counters["pages_allocated"] += len(new_pages)
        if self.direct_map == "no-direct-map":
            self._dmap_change(new_pages, True)
        elif self.direct_map == "on-conversion":
            self._dmap_change([p for p in new_pages if self.private[p]], True)

    def fallocate(self, mode, offset, size):
        mode = _int(mode, "mode")
        offset = _int(offset, "offset")
        size = _int(size, "size")
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise GmemError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} lacks FALLOC_FL_KEEP_SIZE")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise GmemError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} has unknown bits")
        if size <= 0 or offset < 0:
            raise _einval(f"fallocate: offset {offset} size {size}")
        if offset % PAGE_SIZE or size % PAGE_SIZE:
            raise _einval(f"fallocate: offset {offset:#x} or size {size:#x} not page aligned")
        if offset + size >= 1 << 64:
            raise _einval(f"fallocate: offset {offset:#x} + size {size:#x} overflows")
        first, end = offset // PAGE_SIZE, (offset + size) // PAGE_SIZE
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._punch(first, min(end, self.nr_pages))
        else:
            if end > self.nr_pages:
                raise _einval(f"fallocate: range {offset:#x}+{size:#x} is past the end")
            self._allocate(first, end)

    def _punch(self, first, end):
        if first >= end:
            return                       # clamped to the file: nothing to do
        k = self.page_order
        if any(self.pins[first:end]):
            if k > 0:
                # hugetlb: the folio must be restructured, and it is pinned
                for p in range(first, end):
                    if self.pins[p]:
                        raise GmemError(errno.EAGAIN, f"page {p} is pinned", p * PAGE_SIZE)
            else:
                # 4 KiB backing: a plain truncate; the pinned pages leave the file and the
                # pins hold orphans from now on
                for pin in self.live_pins:
                    pin.in_file -= set(range(first, end))
                self.pins[first:end] = [0] * (end - first)
        if k > 0:
            for bs in self._blocks_touching(first, end):
                inside = first <= bs and bs + self.block_pages <= end
                if not inside and self._is_one_huge_folio(bs):
                    self._split_block(bs)
        freed = [p for p in range(first, end) if self.allocated[p]]
        self.counters["host_ptes_zapped"] += self.host_mapped[first:end].count(True)
        self.host_mapped[first:end] = [False] * (end - first)
        self._dmap_change(freed, False)  # restored where it was removed
        for p in freed:
            self.allocated[p] = False
            self.order[p] = -1
            assert not self.dmap_removed[p]
        for p in [p for p in self.contents if first <= p < end]:
            del self.contents[p]
        self.counters["pages_freed"] += len(freed)

    # -------------------------------------------------------------- host access
    def _check_mmap(self):
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise GmemError(errno.ENODEV, "guest_memfd created without GUEST_MEMFD_FLAG_MMAP")

    def _fault_in(self, first, end):
        """Fault pages [first, end) into the host mapping (allocating holes)."""
        self._allocate(first, end)
        for p in range(first, end):
            self.host_mapped[p] = True

    def _host_access(self, first, end):
        """A host access touches pages first..end-1 in order, like memset/memcpy: every
        page before the first private page or the end of the file is faulted in. Returns
        the page where it stops and the SIGBUS to raise there (or None)."""
        if first < 0:
            raise _einval(f"negative offset {first * PAGE_SIZE}")
        for p in range(first, end):
            if p >= self.nr_pages:
                bus = SigBusError(f"offset {p * PAGE_SIZE:#x} is at or past the end", p * PAGE_SIZE)
            elif self.private[p]:
                bus = SigBusError(f"page at offset {p * PAGE_SIZE:#x} is private", p * PAGE_SIZE)
            else:
                continue
            if p > first:
                self._fault_in(first, p)
            return p, bus
        self._fault_in(first, end)
        return end, None

    def host_write(self, offset, data):
        offset = _int(offset, "offset")
        data = bytes(data)
        self._check_mmap()
        if not data:
            return None
        first = offset // PAGE_SIZE
        end = (offset + len(data) - 1) // PAGE_SIZE + 1
        stop, bus = self._host_access(first, end)
        pos = 0
        while pos < len(data):
            p, within = divmod(offset + pos, PAGE_SIZE)
            if p >= stop:
                break                    # the bytes from the faulting page on are not written
            chunk = min(PAGE_SIZE - within, len(data) - pos)
            page = bytearray(self.contents.get(p, ZERO_PAGE))
            page[within:within + chunk] = data[pos:pos + chunk]
            self.contents[p] = bytes(page)
            pos += chunk
        if bus is not None:
            raise bus
        return None

    def host_read(self, offset, size):
        offset = _int(offset, "offset")
        size = _int(size, "size")
        self._check_mmap()
        if size == 0:
            return b""
        first = offset // PAGE_SIZE
        end = (offset + size - 1) // PAGE_SIZE + 1
        stop, bus = self._host_access(first, end)
        if bus is not None:
            raise bus
        out = bytearray()
        for p in range(first, end):
            out += self.contents.get(p, ZERO_PAGE)
        start = offset - first * PAGE_SIZE
        return bytes(out[start:start + size])

    def pin(self, offset, size=PAGE_SIZE):
        offset = _int(offset, "offset")
        size = _int(size, "size")
        if size <= 0 or offset < 0 or offset % PAGE_SIZE or size % PAGE_SIZE:
            raise _einval(f"pin: offset {offset:#x} size {size:#x} must be page aligned, size > 0")
        if offset + size >= 1 << 64:
            raise _einval(f"pin: offset {offset:#x} + size {size:#x} overflows")
        self._check_mmap()               # (argument checks first, as the engine does)
        first, end = offset // PAGE_SIZE, (offset + size) // PAGE_SIZE
        for p in range(first, end):
            if p >= self.nr_pages or self.private[p]:
                raise GmemError(errno.EFAULT, f"pin: page at offset {p * PAGE_SIZE:#x} is "
                                f"{'past the end' if p >= self.nr_pages else 'private'}")
        self._fault_in(first, end)       # GUP pins all or nothing
        for p in range(first, end):
            self.pins[p] += 1
        pin = Pin(self, first, end)
        self.live_pins.append(pin)
        return pin

    # --------------------------------------------------------------- conversion
    def inject_enomem(self, n=1):
        self.enomem = _int(n, "n")

    def _validate_conversion(self, offset, size, attributes, flags):
        vm = getattr(self, "vm", None)
        if vm is not None and not vm.in_place:
            raise GmemError(errno.ENOTTY, "conversion on the file needs an in-place VM")
        offset = _int(offset, "offset")
        size = _int(size, "size")
        attributes = _int(attributes, "attributes")
        flags = _int(flags, "flags")
        if attributes & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise _einval(f"unknown attributes {attributes:#x}")
        if flags & ~(KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE | KVM_SET_MEMORY_ATTRIBUTES2_ZERO):
            raise _einval(f"unknown flags {flags:#x}")
        if flags & KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE and flags & KVM_SET_MEMORY_ATTRIBUTES2_ZERO:
            raise _einval(f"flags {flags:#x}: PRESERVE and ZERO together")
        first, end = _page_range(offset, size, self.nr_pages, "set_memory_attributes")
        # content modes a platform does not support: EOPNOTSUPP at the range's start
        to_private = bool(attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE)
        unsupported = False
        if flags and not self.content_modes:
            unsupported = True               # the policy turns content modes off
        elif flags == KVM_SET_MEMORY_ATTRIBUTES2_ZERO and to_private:
            unsupported = True               # ZERO on conversion to private: never
        elif flags == KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE and self.vm_type != "sw-protected":
            unsupported = not to_private or self.finalized   # only to private, while launching
        if unsupported:
            raise GmemError(errno.EOPNOTSUPP, f"flags {flags:#x} not supported here", offset)
        return offset, first, end, bool(attributes), flags

    def set_memory_attributes(self, offset, size, attributes, flags=0):
        offset, first, end, to_private, flags = self._validate_conversion(
            offset, size, attributes, flags)
        # Step 2: nothing to do.
        if self.private[first:end] == [to_private] * (end - first):
            return None
        # Step 3: metadata.
        if self.enomem > 0:
            self.enomem -= 1
            raise GmemError(errno.ENOMEM, f"injected: no memory for range {offset:#x}", offset)
        if self.metadata_limit is not None:
            after = self.private[:first] + [to_private] * (end - first) + self.private[end:]
            runs = 1 + sum(1 for p in range(1, len(after)) if after[p] != after[p - 1])
            if runs > self.metadata_limit:
                raise GmemError(errno.ENOMEM, f"{runs} attribute ranges exceed the limit", offset)
        # Step 4: to private: zap host mappings, then check folios.
        if to_private:
            self.counters["host_ptes_zapped"] += self.host_mapped[first:end].count(True)
            self.host_mapped[first:end] = [False] * (end - first)
            if any(self.pins[first:end]):
                for p in range(first, end):
                    if self.pins[p]:
                        raise GmemError(errno.EAGAIN, f"page at {p * PAGE_SIZE:#x} is pinned",
                                        p * PAGE_SIZE)
        # Steps 5-9: nothing fails from here on.
        changed = [p for p in range(first, end) if self.private[p] != to_private]
        k = self.page_order
        if not to_private and k > 0:
            for bs in self._blocks_touching(first, end):
                if self._is_one_huge_folio(bs):
                    self._split_block(bs)
        zero = bool(flags & KVM_SET_MEMORY_ATTRIBUTES2_ZERO) or (
            self.vm_type != "sw-protected" and not flags & KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)
        if zero:
            for p in changed:
                self.contents.pop(p, None)
        self.private[first:end] = [to_private] * (end - first)   # = every page in `changed`
        if to_private and k > 0 and self.merge == "eager":
            for bs in self._blocks_touching(first, end):
                block = range(bs, bs + self.block_pages)
                if (all(self.private[p] for p in block) and all(self.allocated[p] for p in block)
                        and not any(self.pins[p] for p in block)
                        and not self._is_one_huge_folio(bs)):
                    for p in block:
                        self.order[p] = k
                    self._count_merge(k)
        if self.direct_map == "on-conversion":   # after merging: removal is per folio
            self._dmap_change(changed, to_private)
        self.counters["pages_to_private" if to_private else "pages_to_shared"] += len(changed)
        return None

    def set_memory_attributes_many(self, offsets, sizes, attributes, flags=0):
        def as_list(v):
            if isinstance(v, numbers.Integral):
                return None
            return [int(x) for x in v]
        lists = [as_list(v) for v in (offsets, sizes, attributes, flags)]
        n = max((len(v) for v in lists if v is not None), default=1)
        cols = [v if v is not None else [int(s)] * n
                for v, s in zip(lists, (offsets, sizes, attributes, flags))]
        errnos, offs = [], []
        for o, s, a, f in zip(*cols):
            try:
                self.set_memory_attributes(o, s, a, f)
            except GmemError as e:
                errnos.append(e.errno)
                offs.append(-1 if e.error_offset is None else e.error_offset)
            else:
                errnos.append(0)
                offs.append(-1)
        return BatchResult(errnos, offs)

    # ------------------------------------------------------------------ queries
    def is_private(self, offset, size=PAGE_SIZE):
        first, end = _page_range(_int(offset, "offset"), _int(size, "size"),
                                 self.nr_pages, "is_private")
        return all(self.private[p] for p in range(first, end))

    def private_pages(self, offset=0, size=None):
        offset = _int(offset, "offset")
        if size is None:
            size = self.size - offset
        first, end = _page_range(offset, _int(size, "size"), self.nr_pages, "private_pages")
        return sum(1 for p in range(first, end) if self.private[p])

    def folio_order(self, offset):
        """Order of the folio holding byte ``offset`` (any byte of the file), -1 for a hole."""
        offset = _int(offset, "offset")
        if not 0 <= offset < self.size:
            raise _einval(f"folio_order: offset {offset:#x} is outside the file")
        return self.order[offset // PAGE_SIZE]

    def refcounts(self):
        """Per page: the reference count of the page's folio (0 for a hole)."""
        out = [1 + pins for pins in self.pins]      # as if every page were an order-0 folio
        p = 0
        for allocated, run in itertools.groupby(self.allocated):
            length = len(list(run))
            if not allocated:
                out[p:p + length] = [0] * length    # holes
            p += length
        k = self.page_order
        if k:
            for bs in range(0, self.nr_pages, self.block_pages):
                if self._is_one_huge_folio(bs):
                    count = 1 + sum(self.pins[bs:bs + self.block_pages])
                    out[bs:bs + self.block_pages] = [count] * self.block_pages
        return out

    def dump(self):
        return {
            "size": self.size,
            "page_order": self.page_order,
            "private": list(self.private),
            "allocated": list(self.allocated),
            "host_mapped": list(self.host_mapped),
            "pins": list(self.pins),
            "folio_order": list(self.order),
            "refcount": self.refcounts(),
            "direct_map_removed": list(self.dmap_removed),
            "contents": {p: c for p, c in sorted(self.contents.items()) if c != ZERO_PAGE},
            "direct_map_entries": self.direct_map_entries(),
            "attribute_ranges": self.attribute_ranges,
        }

    def dump_summary(self):
        """Totals of dump() (for comparisons that cannot afford every page every step)."""
        return {
            "private": self.private.count(True),
            "allocated": self.allocated.count(True),
            "host_mapped": self.host_mapped.count(True),
            "pins": sum(self.pins),
            "folio_order": {k: self.order.count(k) for k in (-1, 0, 9, 18)},
            "direct_map_removed": self.dmap_removed.count(True),
            "contents": {p: c for p, c in sorted(self.contents.items()) if c != ZERO_PAGE},
            "direct_map_entries": self.direct_map_entries(),
            "attribute_ranges": self.attribute_ranges,
        }

    def check(self):
        """The reference's own invariants (cheap sanity, not a substitute for review)."""
        k = self.page_order
        for p in range(self.nr_pages):
            if not self.allocated[p]:
                assert self.order[p] == -1 and not self.host_mapped[p] and not self.pins[p]
                assert not self.dmap_removed[p] and p not in self.contents
            if self.host_mapped[p] or self.pins[p]:
                assert not self.private[p]
        if k:
            for bs in range(0, self.nr_pages, self.block_pages):
                orders = set(self.order[bs:bs + self.block_pages])
                if k in orders:
                    assert orders == {k}, f"partial huge folio at block {bs}"
                    assert all(self.private[bs:bs + self.block_pages])


# ============================================================================ the VM
class MemoryFault(Exception):
    """Stand-in for the engine's exit classes in comparisons (kind, gpa, size, private)."""


class VM:
    """The reference VM: memslots (``KVM_SET_USER_MEMORY_REGION2``), the legacy per-GFN
    attributes, and guest reads and writes, page by page. No trusted entity: populate and
    acceptance are not modelled here."""

    MAX_SLOTS = 1 << 15
    MAX_GPA = 1 << 52

    def __init__(self, vm_type="sw-protected", *, in_place=True):
        if vm_type not in VM_TYPES:
            raise ValueError(f"unknown vm_type {vm_type!r}")
        self.vm_type = vm_type
        self.in_place = bool(in_place)
        self.slots = {}              # id -> {"gpa", "size", "gmem", "offset", "host": {page: bytes}}
        self.private_gfns = set()    # legacy mode: GFNs with the private attribute
        self.gmems = []

    def create_guest_memfd(self, size, flags=0, *, page_order=0):
        if not self.in_place and self.vm_type != "sw-protected":
            if flags & GUEST_MEMFD_FLAG_MMAP:
                raise _einval("a CoCo VM in legacy mode cannot mmap guest_memfd")
            if flags & GUEST_MEMFD_FLAG_INIT_SHARED:
                raise _einval("a CoCo VM in legacy mode cannot create a shared guest_memfd")
        g = GuestMemfd(size, flags, page_order=page_order, vm_type=self.vm_type)
        g.vm = self
        self.gmems.append(g)
        return g

    # ------------------------------------------------------------------ memslots
    def set_user_memory_region(self, slot, gpa, size, gmem, gmem_offset=0):
        """In the kernel's order (kvm_set_memory_region, then kvm_gmem_bind)."""
        slot, gpa, size, gmem_offset = (_int(v, n) for v, n in ((slot, "slot"), (gpa, "gpa"),
                                                                (size, "size"), (gmem_offset, "gmem_offset")))
        if not 0 <= slot < self.MAX_SLOTS:
            raise _einval(f"slot {slot} out of range")
        if gpa % PAGE_SIZE or size % PAGE_SIZE or gpa < 0 or size < 0 or gpa + size > self.MAX_GPA:
            raise _einval(f"gpa {gpa:#x} size {size:#x}: unaligned or outside the address space")
        old = self.slots.get(slot)
        if size == 0:                                   # delete
            if old is None:
                raise _einval(f"slot {slot} does not exist")
            del self.slots[slot]
            return None
        if old is not None:                             # modify an existing slot
            if gmem is not None or old["gmem"] is not None:
                raise _einval("a memslot with a guest_memfd can only be deleted")
            if size != old["size"]:
                raise _einval("resizing a memslot")
            if gpa == old["gpa"]:
                return None                             # nothing to change
        for other_id, other in self.slots.items():
            if other_id != slot and gpa < other["gpa"] + other["size"] and other["gpa"] < gpa + size:
                raise GmemError(errno.EEXIST, f"overlaps slot {other_id}")
        if gmem is not None:                            # kvm_gmem_bind
            if getattr(gmem, "vm", None) is not self:
                raise _einval("the guest_memfd belongs to another VM")
            if gmem_offset < 0 or gmem_offset % PAGE_SIZE or gmem_offset + size > gmem.size:
                raise _einval(f"guest_memfd range {gmem_offset:#x}+{size:#x} is not inside the file")
            for other_id, other in self.slots.items():
                if other["gmem"] is gmem and gmem_offset < other["offset"] + other["size"] \
                        and other["offset"] < gmem_offset + size:
                    raise _einval(f"the guest_memfd range is already bound to slot {other_id}")
        host = old["host"] if old is not None else {}   # a moved ordinary slot keeps its memory
        self.slots[slot] = {"gpa": gpa, "size": size, "gmem": gmem,
                            "offset": gmem_offset if gmem is not None else 0, "host": host}
        return None

    def memslot_list(self):
        return sorted((i, s["gpa"], s["size"], s["offset"]) for i, s in self.slots.items())

    def _slot_of(self, gpa):
        for i, s in self.slots.items():
            if s["gpa"] <= gpa < s["gpa"] + s["size"]:
                return s
        return None

    # ---------------------------------------------------------------- attributes
    def set_memory_attributes(self, gpa, size, attributes):
        attributes = _int(attributes, "attributes")
        gpa, size = _int(gpa, "gpa"), _int(size, "size")
        if attributes & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise _einval(f"unknown attributes {attributes:#x}")
        first, end = _page_range(gpa, size, self.MAX_GPA // PAGE_SIZE, "KVM_SET_MEMORY_ATTRIBUTES")
        if self.in_place:
            if attributes:
                raise _einval("PRIVATE on an in-place VM")
            return None
        for gfn in range(first, end):
            if attributes:
                self.private_gfns.add(gfn)
            else:
                self.private_gfns.discard(gfn)
        return None

    def is_private(self, gpa):
        gpa = _int(gpa, "gpa")
        if not self.in_place:
            return gpa // PAGE_SIZE in self.private_gfns
        s = self._slot_of(gpa)
        if s is None or s["gmem"] is None:
            return False
        return s["gmem"].private[(s["offset"] + gpa - s["gpa"]) // PAGE_SIZE]

    # -------------------------------------------------------------- guest access
    def _page_exit(self, page, access_start, private):
        """The exit the guest's access to ``page`` causes, or None if it goes through."""
        gfn = page // PAGE_SIZE
        s = self._slot_of(page)
        if s is None:
            if not self.in_place and gfn in self.private_gfns:
                return ("memory_fault", page, PAGE_SIZE, True)
            return ("mmio", max(page, access_start))
        if s["gmem"] is None:
            if private:
                return ("memory_fault", page, PAGE_SIZE, True)
            if not self.in_place and gfn in self.private_gfns:
                return ("memory_fault", page, PAGE_SIZE, False)
            return None
        if self.in_place:
            is_private = s["gmem"].private[(s["offset"] + page - s["gpa"]) // PAGE_SIZE]
        else:
            is_private = gfn in self.private_gfns
        if is_private != private:
            return ("memory_fault", page, PAGE_SIZE, private)
        return None

    def _check_access(self, gpa, size, private):
        if gpa < 0 or size < 0:
            raise _einval(f"guest access at {gpa:#x} of {size} bytes")
        page = gpa - gpa % PAGE_SIZE
        while page < gpa + size:
            ex = self._page_exit(page, gpa, bool(private))
            if ex is not None:
                raise MemoryFault(*ex)
            page += PAGE_SIZE

    def _page_bytes(self, page, private):
        s = self._slot_of(page)
        if s["gmem"] is not None and (private or self.in_place):
            g = s["gmem"]
            p = (s["offset"] + page - s["gpa"]) // PAGE_SIZE
            g._allocate(p, p + 1)            # the guest's fault allocates a hole
            return g, p
        return s["host"], (page - s["gpa"]) // PAGE_SIZE

    def guest_read(self, gpa, size, *, private):
        gpa, size = _int(gpa, "gpa"), _int(size, "size")
        self._check_access(gpa, size, private)
        out = bytearray()
        pos = gpa
        while pos < gpa + size:
            page = pos - pos % PAGE_SIZE
            where, key = self._page_bytes(page, private)
            data = where.contents.get(key, ZERO_PAGE) if isinstance(where, GuestMemfd) \
                else where.get(key, ZERO_PAGE)
            chunk = min(page + PAGE_SIZE, gpa + size) - pos
            out += data[pos - page:pos - page + chunk]
            pos += chunk
        return bytes(out)

    def guest_write(self, gpa, data, *, private):
        gpa = _int(gpa, "gpa")
        data = bytes(data)
        self._check_access(gpa, len(data), private)
        pos = gpa
        while pos < gpa + len(data):
            page = pos - pos % PAGE_SIZE
            where, key = self._page_bytes(page, private)
            store = where.contents if isinstance(where, GuestMemfd) else where
            chunk = min(page + PAGE_SIZE, gpa + len(data)) - pos
            buf = bytearray(store.get(key, ZERO_PAGE))
            buf[pos - page:pos - page + chunk] = data[pos - gpa:pos - gpa + chunk]
            store[key] = bytes(buf)
            pos += chunk
        return None
