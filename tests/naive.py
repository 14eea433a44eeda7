"""A deliberately naive reference model of guest_memfd files and the VM around them.

Plain Python lists indexed by page, per-page loops, no numpy, no numba, and nothing
from ``gmemfast`` except the error classes (so that ``pytest.raises`` and exception
class comparisons work on both sides). It exists to be obviously correct, not fast: the
property tests run it side by side with the engine and compare complete state and every
counter after every step.

Semantics: docs/model.md sections 1-6, including the model decisions where the kernel is
silent (allocation widening, punch clamping, direct-map granularity, the metadata limit,
merge on to-private). Counters follow the kernel steps of docs/model.md §4 and §6, each
written out next to the step that does the work. The launch counters (populate and the
firmware, ``NOT_MODELLED``) are left to tests with hand-derived expectations.

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
TLB_SINGLE_PAGE_FLUSH_CEILING = 33      # arch/x86/mm/tlb.c
HVO_FREED = {9: 7, 18: 4095}            # vmemmap pages HVO frees per huge folio
TE_ACCEPTED = {"snp": 5, "tdx": 2}      # RMP validated / secure EPT mapped (0: none)

# Every counter the reference keeps, in no particular order: the state machines compare
# each of them with the engine's after every step.
COUNTERS = (
    "host_faults", "host_ptes_zapped", "tlb_invlpg", "tlb_flush_full", "tlb_shootdowns",
    "guest_invalidations", "guest_ptes_zapped",
    "folios_checked", "lru_drains", "folio_splits_2m", "folio_splits_1g", "folio_merges_2m",
    "folio_merges_1g", "vmemmap_pages_restored", "vmemmap_pages_freed", "pages_allocated",
    "pages_freed", "pins", "unpins",
    "pages_zeroed", "bytes_zeroed_4k", "bytes_zeroed_2m", "bytes_zeroed_1g",
    "dmap_entries_changed", "dmap_splits_1g", "dmap_splits_2m",
    "attr_writes_page", "attr_writes_range", "pages_to_private", "pages_to_shared",
    "convert_calls", "convert_noop", "convert_einval", "convert_enomem", "convert_eagain",
    "convert_eopnotsupp", "fallocate_calls", "punch_calls", "punch_eagain", "vm_attr_calls",
    "rmp_updates", "psmash", "snp_pvalidate_4k", "snp_pvalidate_2m",
    "tdx_seamcall_page_aug", "tdx_seamcall_block", "tdx_seamcall_track",
    "tdx_seamcall_demote", "tdx_seamcall_page_remove", "tdx_accepts", "guest_exits",
    "accept_fallbacks",
)
# Counters of the launch path, which the reference does not model; each is checked by
# tests with expectations derived by hand (tests/test_counters.py).
NOT_MODELLED = {
    "bytes_copied": "legacy-flow populate copies the source (SNP platform code)",
    "snp_fw_launch_update": "one SNP_LAUNCH_UPDATE per populated page and per VMSA",
    "snp_fw_launch_finish": "one SNP_LAUNCH_FINISH per launch",
    "tdx_seamcall_page_add": "one TDH.MEM.PAGE.ADD per populated page",
    "tdx_seamcall_mr_extend": "sixteen TDH.MR.EXTEND per measured populated page",
    "hash_bytes": "bytes fed to SHA-384 by the launch measurement",
    "pages_populated_inplace": "pages populated with no source (in-place flow)",
    "pages_populated_legacy": "pages populated from a separate source (legacy flow)",
    "prefault_calls": "KVM_PRE_FAULT_MEMORY calls the scenarios' VMM makes",
    "tdx_busy_retries": "TDX_OPERAND_BUSY retries the scenarios count for splits on many vCPUs",
    "accept_memory_calls": "the guest kernel's accept_memory() calls in the scenarios",
    "guest_pages_touched": "pages the scenarios' guest workload touches",
    "iommu_maps": "4 KiB IOMMU mappings the VMM makes for an assigned device (tests/test_memory.py)",
    "iommu_unmaps": "4 KiB IOMMU mappings the VMM removes (tests/test_memory.py)",
    "shared_discards": "the VMM's discards of its separate shared memory (tests/test_memory.py)",
}


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
        self.gmem.counters["unpins"] += self.end - self.first
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
        self.finalized = False      # the launch is finished (set by the VM)
        self.vm = None              # the reference VM that made the file, if any
        n = self.nr_pages = size // PAGE_SIZE

        shared = bool(flags & GUEST_MEMFD_FLAG_INIT_SHARED)
        self.private = [not shared] * n
        self.allocated = [False] * n
        self.host_mapped = [False] * n
        self.guest_mapped = [False] * n
        self.pins = [0] * n
        self.order = [-1] * n
        self.dmap_removed = [False] * n
        self.te = [0] * n           # trusted-entity state: 0 none, else TE_ACCEPTED[vm_type]
        self.contents = {}          # page -> bytes (4096); absent means zero
        self.split_1g = set()       # 1 GiB blocks whose 1G direct-map entry is split
        self.split_2m = set()       # 2 MiB blocks whose 2M direct-map entry is split
        self.enomem = 0             # armed injected ENOMEM faults
        self.live_pins = []         # Pin objects not yet released
        self.counters = {name: 0 for name in COUNTERS}

    # ------------------------------------------------------------------ counting
    def _count(self, name, n=1):
        self.counters[name] += n

    def _tlb_flush(self, npages):
        """One flush of ``npages`` pages: INVLPG each up to the ceiling, else a full flush;
        either way one shootdown of the other CPUs."""
        if npages <= 0:
            return
        if npages <= TLB_SINGLE_PAGE_FLUSH_CEILING:
            self._count("tlb_invlpg", npages)
        else:
            self._count("tlb_flush_full")
        self._count("tlb_shootdowns")

    def _count_zeroed(self, npages, chunk_order):
        """``npages`` pages zeroed in chunks of the given order (0, 9 or 18)."""
        if npages <= 0:
            return
        self._count("pages_zeroed", npages)
        self._count({0: "bytes_zeroed_4k", 9: "bytes_zeroed_2m", 18: "bytes_zeroed_1g"}[chunk_order],
                    npages * PAGE_SIZE)

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
        self._count("folio_splits_2m" if order == 9 else "folio_splits_1g")
        self._count("vmemmap_pages_restored", HVO_FREED[order])   # HVO undone

    def _count_merge(self, order):
        self._count("folio_merges_2m" if order == 9 else "folio_merges_1g")
        self._count("vmemmap_pages_freed", HVO_FREED[order])      # HVO applied again

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

    def _folios_touching(self, first, end):
        """Allocated folios with a page in [first, end): order-0 pages and huge blocks."""
        n = 0
        for p in range(first, end):
            if self.allocated[p] and self.order[p] == 0:
                n += 1
        if self.page_order:
            for bs in self._blocks_touching(first, end):
                if self._is_one_huge_folio(bs):
                    n += 1
        return n

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

        Counted: each entry splitting, then the entries changed (a whole 1G or 2M entry
        counts one, a 4 KiB entry each), and one TLB flush of the pages changed.
        """
        changing = []
        for p in sorted(pages):
            if self.allocated[p] and self.dmap_removed[p] != removed:
                changing.append(p)
        if not changing:
            return
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
                if not (a <= gs and ge <= b) and g not in self.split_1g:
                    self.split_1g.add(g)
                    self._count("dmap_splits_1g")
            for m in range(a // PAGES_PER_2M, (b - 1) // PAGES_PER_2M + 1):
                ms, me = m * PAGES_PER_2M, (m + 1) * PAGES_PER_2M
                if ((ms // PAGES_PER_1G) in self.split_1g and not (a <= ms and me <= b)
                        and m not in self.split_2m):
                    self.split_2m.add(m)
                    self._count("dmap_splits_2m")
        entries = 0
        for g in sorted({p // PAGES_PER_1G for p in changing}):
            if g not in self.split_1g:
                entries += 1                       # the 1G entry itself
                continue
            in_g = [p for p in changing if p // PAGES_PER_1G == g]
            for m in sorted({p // PAGES_PER_2M for p in in_g}):
                if m in self.split_2m:
                    entries += sum(1 for p in in_g if p // PAGES_PER_2M == m)   # 4 KiB entries
                else:
                    entries += 1                   # the 2M entry
        self._count("dmap_entries_changed", entries)
        self._tlb_flush(len(changing))

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

    # ----------------------------------------------------------- mappings and TE
    def _zap_host(self, first, end):
        """Unmap the host's mappings of [first, end) (every process); one TLB flush."""
        zapped = sum(1 for p in range(first, end) if self.host_mapped[p])
        self.host_mapped[first:end] = [False] * (end - first)
        self._count("host_ptes_zapped", zapped)
        self._tlb_flush(zapped)

    def _zap_guest(self, first, end):
        """Invalidate the guest's mappings of [first, end): one invalidation, each leaf zapped."""
        self._count("guest_invalidations")
        zapped = sum(1 for p in range(first, end) if self.guest_mapped[p])
        self.guest_mapped[first:end] = [False] * (end - first)
        self._count("guest_ptes_zapped", zapped)

    def _te_release(self, first, end):
        """The trusted entity gives the pages of [first, end) back to the host: an
        RMPUPDATE each on SNP; on TDX a BLOCK, a TRACK and a PAGE.REMOVE each."""
        released = sum(1 for p in range(first, end) if self.te[p])
        self.te[first:end] = [0] * (end - first)
        if released:
            if self.vm_type == "snp":
                self._count("rmp_updates", released)
            elif self.vm_type == "tdx":
                self._count("tdx_seamcall_block", released)
                self._count("tdx_seamcall_track", released)
                self._count("tdx_seamcall_page_remove", released)
        return released

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
                self._count_zeroed(len(holes), k)     # zeroed as one huge folio
            else:
                order = 0
                self._count_zeroed(len(holes), 0)
            for p in holes:
                self.allocated[p] = True
                self.order[p] = order
                # newly allocated pages are zero: a hole never holds contents
                assert p not in self.contents
            new_pages.extend(holes)
        self._count("pages_allocated", len(new_pages))
        if self.direct_map == "no-direct-map":
            self._dmap_change(new_pages, True)
        elif self.direct_map == "on-conversion":
            self._dmap_change([p for p in new_pages if self.private[p]], True)

    def fallocate(self, mode, offset, size):
        mode = _int(mode, "mode")
        offset = _int(offset, "offset")
        size = _int(size, "size")
        self._count("fallocate_calls")           # every call is a syscall
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
            self._count("punch_calls")
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
                        self._count("punch_eagain")
                        raise GmemError(errno.EAGAIN, f"page {p} is pinned", p * PAGE_SIZE)
            else:
                # 4 KiB backing: a plain truncate; the pinned pages leave the file and the
                # pins hold orphans from now on
                for pin in self.live_pins:
                    pin.in_file -= set(range(first, end))
                self.pins[first:end] = [0] * (end - first)
        if not any(self.allocated):
            return                       # nothing in the file to unmap or free
        self._zap_host(first, end)
        self._zap_guest(first, end)
        self._te_release(first, end)
        if k > 0:
            for bs in self._blocks_touching(first, end):
                inside = first <= bs and bs + self.block_pages <= end
                if not inside and self._is_one_huge_folio(bs):
                    self._split_block(bs)
        freed = [p for p in range(first, end) if self.allocated[p]]
        self._dmap_change(freed, False)  # restored where it was removed
        for p in freed:
            self.allocated[p] = False
            self.order[p] = -1
            assert not self.dmap_removed[p]
        for p in [p for p in self.contents if first <= p < end]:
            del self.contents[p]
        self._count("pages_freed", len(freed))

    # -------------------------------------------------------------- host access
    def _check_mmap(self):
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise GmemError(errno.ENODEV, "guest_memfd created without GUEST_MEMFD_FLAG_MMAP")

    def _fault_in(self, first, end):
        """Fault pages [first, end) into the host mapping (allocating holes); a host fault
        is counted for each page newly mapped."""
        self._allocate(first, end)
        for p in range(first, end):
            if not self.host_mapped[p]:
                self.host_mapped[p] = True
                self._count("host_faults")

    def guest_fault_in(self, first, end):
        """Fault pages [first, end) into the guest's mappings (allocating holes)."""
        self._allocate(first, end)
        for p in range(first, end):
            self.guest_mapped[p] = True

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
        self._count("pins", end - first)
        pin = Pin(self, first, end)
        self.live_pins.append(pin)
        return pin

    def accept(self, first, end, chunk_pages, mapping_pages=0, prefault=False):
        """The guest accepts (TDX) / validates (SNP) pages [first, end) (allocated first),
        ``chunk_pages`` at a time: each page without trusted-entity state is mapped in the
        guest and moves to the accepted state. Returns the chunks (of newly accepted pages,
        rounded up) that did work.

        What it costs depends on the level the host maps private memory at
        (``mapping_pages``; 0: the chunk's) and on whether the VMM prefaulted it
        (docs/model.md §4.9): below the chunk's level the accept falls back to 4 KiB and
        every page is mapped and accepted on its own; at it, one of each per chunk; above
        it, TDX maps at the accept's level when the guest's exit asks (or, prefaulted,
        splits each entry: BLOCK, TRACK, DEMOTE, one exit each), SNP maps the large entry
        and PSMASHes it on the size-mismatch fault."""
        self._allocate(first, end)
        new = [p for p in range(first, end) if self.te[p] == 0]
        if not new:
            return 0
        for p in new:
            self.te[p] = TE_ACCEPTED.get(self.vm_type, 0)
            self.guest_mapped[p] = True
        n = len(new)
        chunks = (n + chunk_pages - 1) // chunk_pages
        if self.vm_type == "sw-protected":             # no accept instruction: an exit each
            self._count("guest_exits", chunks)
            return chunks
        tdx = self.vm_type == "tdx"
        level = mapping_pages or chunk_pages
        if level < chunk_pages:
            # the 2 MiB accept is refused (size mismatch): each page on its own
            self._count("accept_fallbacks", chunks)
            mapped = accepted = n
            exits = 0 if prefault else n
            accept_4k = True
        elif level == chunk_pages or (tdx and not prefault):
            mapped = accepted = chunks
            exits = 0 if prefault else chunks
            accept_4k = chunk_pages == 1
        else:
            entries = (n + level - 1) // level          # large mappings, split for the accept
            mapped, accepted, accept_4k = entries, chunks, chunk_pages == 1
            if tdx:
                splits = entries * (1 + PAGES_PER_2M) if (level == PAGES_PER_1G and chunk_pages == 1) \
                    else entries
                for name in ("tdx_seamcall_block", "tdx_seamcall_track", "tdx_seamcall_demote"):
                    self._count(name, splits)
                exits = splits
            else:
                self._count("psmash", entries)
                exits = entries if prefault else 2 * entries
        self._count("guest_exits", exits)
        if tdx:
            self._count("tdx_seamcall_page_aug", mapped)
            self._count("tdx_accepts", accepted)
        else:
            self._count("rmp_updates", mapped)
            self._count("snp_pvalidate_4k" if accept_4k else "snp_pvalidate_2m", accepted)
        return chunks

    # --------------------------------------------------------------- conversion
    def inject_enomem(self, n=1):
        self.enomem = _int(n, "n")

    def _validate_conversion(self, offset, size, attributes, flags):
        vm = self.vm
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
        return offset, first, end, to_private, flags

    def set_memory_attributes(self, offset, size, attributes, flags=0):
        # Step 1: arguments. A refused call is still a call (an ioctl).
        try:
            offset, first, end, to_private, flags = self._validate_conversion(
                offset, size, attributes, flags)
        except GmemError as e:
            self._count("convert_calls")
            self._count("convert_eopnotsupp" if e.errno == errno.EOPNOTSUPP else "convert_einval")
            raise
        self._count("convert_calls")
        # Step 2: nothing to do.
        if self.private[first:end] == [to_private] * (end - first):
            self._count("convert_noop")
            return None
        # Step 3: metadata.
        if self.enomem > 0:
            self.enomem -= 1
            self._count("convert_enomem")
            raise GmemError(errno.ENOMEM, f"injected: no memory for range {offset:#x}", offset)
        if self.metadata_limit is not None:
            after = self.private[:first] + [to_private] * (end - first) + self.private[end:]
            runs = 1 + sum(1 for p in range(1, len(after)) if after[p] != after[p - 1])
            if runs > self.metadata_limit:
                self._count("convert_enomem")
                raise GmemError(errno.ENOMEM, f"{runs} attribute ranges exceed the limit", offset)
        # Step 4: to private: zap host mappings, then check every folio of the range.
        if to_private:
            self._zap_host(first, end)
            self._count("folios_checked", self._folios_touching(first, end))
            if any(self.pins[first:end]):
                for p in range(first, end):
                    if self.pins[p]:
                        self._count("lru_drains")        # drained once before giving up
                        self._count("convert_eagain")
                        raise GmemError(errno.EAGAIN, f"page at {p * PAGE_SIZE:#x} is pinned",
                                        p * PAGE_SIZE)
        # Steps 5-9: nothing fails from here on.
        self._zap_guest(first, end)
        changed = [p for p in range(first, end) if self.private[p] != to_private]
        k = self.page_order
        if not to_private:
            # 6. the trusted entity gives the pages back; huge folios split
            released = self._te_release(first, end)
            nsplit = 0
            if k > 0:
                for bs in self._blocks_touching(first, end):
                    if self._is_one_huge_folio(bs):
                        self._split_block(bs)
                        nsplit += 1
            if released and nsplit:
                # the trusted entity's huge mapping breaks too: per 2 MiB piece
                pieces = nsplit * (1 if k == 9 else 512)
                if self.vm_type == "snp":
                    self._count("psmash", pieces)
                elif self.vm_type == "tdx":
                    self._count("tdx_seamcall_demote", pieces)
        # 8. contents of the pages whose shareability changes
        zero = bool(flags & KVM_SET_MEMORY_ATTRIBUTES2_ZERO) or (
            self.vm_type != "sw-protected" and not flags & KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)
        if zero:
            self._count_zeroed(sum(1 for p in changed if self.allocated[p]), 0)
            for p in changed:
                self.contents.pop(p, None)
        # 9. the attributes: one range entry in the per-file store
        self.private[first:end] = [to_private] * (end - first)   # = every page in `changed`
        self._count("attr_writes_range")
        self._count("pages_to_private" if to_private else "pages_to_shared", len(changed))
        # 7. to private: blocks now wholly private, allocated and safe merge back
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

    def huge_folios(self):
        k = self.page_order
        if not k:
            return 0
        return sum(1 for bs in range(0, self.nr_pages, self.block_pages) if self._is_one_huge_folio(bs))

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
            "guest_mapped": list(self.guest_mapped),
            "pins": list(self.pins),
            "folio_order": list(self.order),
            "refcount": self.refcounts(),
            "direct_map_removed": list(self.dmap_removed),
            "te_state": list(self.te),
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
            "guest_mapped": self.guest_mapped.count(True),
            "pins": sum(self.pins),
            "folio_order": {k: self.order.count(k) for k in (-1, 0, 9, 18)},
            "direct_map_removed": self.dmap_removed.count(True),
            "te_state": sum(1 for t in self.te if t),
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
                assert not self.guest_mapped[p] and not self.te[p]
            if self.host_mapped[p] or self.pins[p]:
                assert not self.private[p]
            if self.te[p]:
                assert self.private[p]
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
        self.own_counters = {name: 0 for name in COUNTERS}   # work on no one file

    @property
    def counters(self):
        """The VM's own work plus its files'."""
        total = dict(self.own_counters)
        for g in self.gmems:
            for name, n in g.counters.items():
                total[name] += n
        return total

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

    def shared_memory_pages(self):
        """Pages of separate shared memory held: here, those a shared guest write touched."""
        return sum(len(s["host"]) for s in self.slots.values())

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
        self.own_counters["vm_attr_calls"] += 1
        want = bool(attributes)
        if all((gfn in self.private_gfns) == want for gfn in range(first, end)):
            return None                                  # nothing changes
        # the legacy store writes one xarray entry per GFN of the range
        self.own_counters["attr_writes_page"] += end - first
        for gfn in range(first, end):
            if want and gfn not in self.private_gfns:
                self.private_gfns.add(gfn)
                self.own_counters["pages_to_private"] += 1
            elif not want and gfn in self.private_gfns:
                self.private_gfns.discard(gfn)
                self.own_counters["pages_to_shared"] += 1
        # the guest's mappings of the range are invalidated, memslot by memslot
        for s in self.slots.values():
            lo, hi = max(s["gpa"], gpa), min(s["gpa"] + s["size"], gpa + size)
            if lo < hi and s["gmem"] is not None:
                p0 = (s["offset"] + lo - s["gpa"]) // PAGE_SIZE
                s["gmem"]._zap_guest(p0, p0 + (hi - lo) // PAGE_SIZE)
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
            g.guest_fault_in(p, p + 1)       # the guest's fault maps it (allocating a hole)
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
            if store is where and key not in store:
                # separate shared memory: the page is faulted in, allocated and zeroed
                for name, n in (("host_faults", 1), ("pages_allocated", 1), ("pages_zeroed", 1),
                                ("bytes_zeroed_4k", PAGE_SIZE)):
                    self.own_counters[name] += n
            chunk = min(page + PAGE_SIZE, gpa + len(data)) - pos
            buf = bytearray(store.get(key, ZERO_PAGE))
            buf[pos - page:pos - page + chunk] = data[pos - gpa:pos - gpa + chunk]
            store[key] = bytes(buf)
            pos += chunk
        return None

    def guest_accept(self, gpa, size, *, chunk=2 << 20, mapping=None, prefault=False):
        """The guest accepts (TDX) / validates (SNP) private memory, ``chunk`` at a time:
        each page without trusted-entity state is mapped in the guest and moves to the
        accepted state; each chunk of such pages (rounded up) costs the platform's calls."""
        gpa, size, chunk = _int(gpa, "gpa"), _int(size, "size"), _int(chunk, "chunk")
        if chunk not in (PAGE_SIZE, 2 << 20):
            raise _einval(f"accept chunk {chunk:#x}")
        if mapping is not None and _int(mapping, "mapping") not in (PAGE_SIZE, 2 << 20, 1 << 30):
            raise _einval(f"mapping level {mapping:#x}")
        _page_range(gpa, size, self.MAX_GPA // PAGE_SIZE, "guest accept")
        if gpa % chunk or size % chunk:
            raise _einval(f"guest accept {gpa:#x}+{size:#x} not aligned to {chunk:#x}")
        self._check_access(gpa, size, True)
        chunk_pages = chunk // PAGE_SIZE
        total = 0
        for s in sorted(self.slots.values(), key=lambda s: s["gpa"]):
            lo, hi = max(s["gpa"], gpa), min(s["gpa"] + s["size"], gpa + size)
            if lo >= hi:
                continue
            p0 = (s["offset"] + lo - s["gpa"]) // PAGE_SIZE
            level = 0
            if mapping is not None:    # bounded by the backing folios, and on SNP by the RMP
                level = min(mapping // PAGE_SIZE, 1 << s["gmem"].page_order)
                if self.vm_type == "snp":
                    level = min(level, PAGES_PER_2M)
            chunks = s["gmem"].accept(p0, p0 + (hi - lo) // PAGE_SIZE, chunk_pages, level,
                                      bool(prefault))
            total += chunks
        return total
