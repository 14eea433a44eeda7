"""Host memory per VM: what a confidential VM's memory costs its host (docs/model.md §13).

:func:`host_memory` turns the state of a VM (its guest_memfd files, memslots, legacy
attributes and separate shared memory) and of its VMM's device assignment
(:class:`Vfio`) into a plain dict of bytes:

- ``resident``: guest memory the host holds, shared and private, with the separate
  shared memory of legacy mode and the GFNs allocated twice (a shared copy beside the
  private page);
- ``pinned``: shared memory under long-term pins (the VMM's, and VFIO's for an assigned
  device) and private memory the trusted entity holds;
- ``vfio``: the IOMMU mappings device assignment needs, against VFIO's limit;
- ``metadata``: the attribute store, the vmemmap (with and without the hugetlb vmemmap
  optimisation), the page tables of the kernel direct map and of the IOMMU, and the
  trusted entity's per-VM tables (TDX Dynamic PAMT);
- ``host_wide``: tables that cover all host memory (SNP RMP, TDX PAMT), shown as this
  guest's memory's share and never added to the VM's total.

Every per-byte figure below cites its source in docs/model.md §13. The figures come from
page counts over ranges (the store's summaries), never from a loop over every page.
"""
from __future__ import annotations

import bisect

from ._layout import ALLOC, HUGE, K_ALLOC, K_HUGE, K_PIN, K_PRIV, PRIV, TE_MASK
from .units import PAGE_SHIFT, PAGE_SIZE
from .vm import RangeSet

__all__ = ["DMA_ENTRY_LIMIT", "Vfio", "allocated_private", "blocks_touched", "host_memory", "maple_nodes",
           "range_blocks", "timeline_figures", "xarray_nodes"]

# ---- per-byte figures (docs/model.md §13 gives each one's source) ----
STRUCT_PAGE = 64                # bytes of struct page per 4 KiB page (vmemmap)
HVO_KEPT = PAGE_SIZE            # vmemmap bytes HVO keeps per huge folio (one page)
TABLE_PAGE = PAGE_SIZE          # a page-table page: 512 entries of 8 bytes
PAGES_2M = 512
PAGES_1G = 1 << 18
XA_NODE = 576                   # sizeof(struct xa_node) on x86-64: 64 slots
XA_SHIFT = 6                    # XA_CHUNK_SHIFT
MAPLE_NODE = 256                # a maple tree node (maple_range_64: 16 slots)
MAPLE_FILL = 11                 # estimate: ranges (or children) per node, 16 slots ~69% full
RMP_ENTRY = 16                  # SNP RMP: bytes per 4 KiB of host memory
PAMT_ENTRY = 16                 # TDX PAMT entry, per 4 KiB (derived), per 2 MiB and 1 GiB (assumed)
DPAMT_PER_2M = 2 * PAGE_SIZE    # Dynamic PAMT: a page pair per 2 MiB region in use
DMA_ENTRY_LIMIT = 65535         # vfio_iommu_type1 dma_entry_limit default (U16_MAX)
_MAPPING_4K = PAGE_SIZE


# ============================================================================ counting helpers

def blocks_touched(count, p0: int, p1: int, block: int) -> int:
    """How many ``block``-page aligned blocks meeting ``[p0, p1)`` hold at least one page
    ``count(a, b)`` counts (the matching pages of ``[a, b)``). Counts whole 1 GiB spans
    first; a span missing fewer pages than its smallest block holds has them all."""
    total = 0
    a = p0
    while a < p1:
        b = min(p1, (a // PAGES_1G + 1) * PAGES_1G)
        n = count(a, b)
        if n:
            first, last = a // block, (b - 1) // block
            smallest = min(min(b, (first + 1) * block) - a, b - last * block, block)
            if (b - a) - n < smallest:
                total += last - first + 1
            else:
                for k in range(first, last + 1):
                    if count(max(a, k * block), min(b, (k + 1) * block)):
                        total += 1
        a = b
    return total


def range_blocks(ranges, block: int) -> int:
    """Distinct ``block``-aligned blocks the sorted, disjoint ``(start, end)`` ranges meet."""
    total, last = 0, -1
    for s, e in ranges:
        first, end = s // block, (e - 1) // block
        total += end - first + 1 - (first == last)
        last = end
    return total


def xarray_nodes(ranges) -> int:
    """``struct xa_node`` count of an xarray holding an entry at every index of the sorted,
    disjoint ``ranges`` (and nothing else): per level, the distinct 64-slot groups the
    entries fall in, up to the root; a lone entry at index 0 needs no node."""
    ranges = list(ranges)
    if not ranges or ranges[-1][1] <= 1:
        return 0
    top = ranges[-1][1] - 1
    nodes, shift = 0, XA_SHIFT
    while True:
        nodes += range_blocks(ranges, 1 << shift)
        if top >> shift == 0:
            return nodes
        shift += XA_SHIFT


def maple_nodes(nranges: int) -> int:
    """Estimated maple tree nodes holding ``nranges`` ranges: leaves of ``MAPLE_FILL``
    ranges, and parents of ``MAPLE_FILL`` children, up to one root."""
    if nranges <= 0:
        return 0
    level = -(-nranges // MAPLE_FILL)
    nodes = level
    while level > 1:
        level = -(-level // MAPLE_FILL)
        nodes += level
    return nodes


def _slot_pieces(vm, g0: int, g1: int):
    """(memslot, first GFN, end GFN) of each memslot meeting GFNs ``[g0, g1)``, in order."""
    out = []
    for ms in sorted(vm.memslots.values(), key=lambda m: m.gpa):
        a = max(g0, ms.gpa >> PAGE_SHIFT)
        b = min(g1, ms.end >> PAGE_SHIFT)
        if a < b:
            out.append((ms, a, b))
    return out


def _intersect(rs: RangeSet, a: int, b: int):
    """The ranges of ``[a, b)`` that ``rs`` holds."""
    i = bisect.bisect_right(rs.ends, a)
    out = []
    while i < len(rs.starts) and rs.starts[i] < b:
        out.append((max(a, rs.starts[i]), min(b, rs.ends[i])))
        i += 1
    return out


def _complement(rs: RangeSet, a: int, b: int):
    """The ranges of ``[a, b)`` that ``rs`` does not hold."""
    out, x = [], a
    for s, e in _intersect(rs, a, b):
        if s > x:
            out.append((x, s))
        x = e
    if x < b:
        out.append((x, b))
    return out


# ============================================================================ device assignment

class Vfio:
    """A VMM with a device assigned through VFIO (type1): every shared page of guest
    memory is mapped in the IOMMU, and so pinned, one 4 KiB mapping each, as QEMU maps
    each block its RamDiscardManager reports populated (docs/model.md §13).

    :meth:`map` after a conversion to shared, :meth:`unmap` before a conversion to
    private (a pinned page cannot become private). Shared memory in place is guest_memfd
    memory, pinned with ``GuestMemfd.pin``; separate shared memory (legacy mode, ordinary
    memslots) is faulted in and pinned by the VMM. Counted: ``iommu_maps`` and
    ``iommu_unmaps`` per page, ``pins`` and ``unpins`` per page (the VM's counters).
    """

    _CHUNK = PAGES_2M        # pages per guest_memfd pin held (a split re-pins at most this)

    def __init__(self, vm):
        self.vm = vm
        self.mapped = RangeSet()         # GFNs mapped in the IOMMU
        self.separate = RangeSet()       # ... of them, in separate shared memory
        self.peak = 0
        self._pins: dict[int, tuple[int, object]] = {}   # first GFN -> (end GFN, Pin)
        self._starts: list[int] = []
        self._count = 0                  # GFNs mapped now

    @property
    def mappings(self) -> int:
        """IOMMU mappings held now (one per 4 KiB page)."""
        return self._count

    def map(self, gpa: int, size: int) -> int:
        """Map (and pin) every page of ``[gpa, gpa+size)`` not mapped yet. Returns the pages
        newly mapped. A ``GmemError`` from a pin leaves the pages before it mapped."""
        before = self._count
        for ms, a, b in _slot_pieces(self.vm, gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT):
            for x, y in _complement(self.mapped, a, b):
                if ms.gmem is None or not self.vm.in_place:
                    self.vm.fault_shared(x << PAGE_SHIFT, (y - x) << PAGE_SHIFT)
                    self.vm.count_work("pins", y - x)
                    self.separate.assign(x, y, True)
                    self._add(x, y)
                    continue
                for s in range(x, y, self._CHUNK):
                    e = min(y, s + self._CHUNK)
                    self._pin(ms, s, e)
                    self._add(s, e)
        return self._count - before

    def _add(self, x: int, y: int) -> None:
        self.vm.count_work("iommu_maps", y - x)
        self.mapped.assign(x, y, True)
        self._count += y - x
        self.peak = max(self.peak, self._count)

    def unmap(self, gpa: int, size: int) -> list[tuple[int, int]]:
        """Unmap (and unpin) every mapped page of ``[gpa, gpa+size)``. Returns the GFN
        ranges unmapped (:meth:`remap` maps them back)."""
        g0, g1 = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        done = _intersect(self.mapped, g0, g1)
        for x, y in done:
            n_sep = self.separate.covered(x, y)
            if n_sep:
                self.vm.count_work("unpins", n_sep)
                self.separate.assign(x, y, False)
            if n_sep < y - x:
                self._release(x, y)
            self.vm.count_work("iommu_unmaps", y - x)
            self.mapped.assign(x, y, False)
            self._count -= y - x
        return done

    def remap(self, gfn_ranges) -> None:
        """Map GFN ranges again (those :meth:`unmap` returned, for a conversion that failed)."""
        for x, y in gfn_ranges:
            self.map(x << PAGE_SHIFT, (y - x) << PAGE_SHIFT)

    def _pin(self, ms, s: int, e: int) -> None:
        off = ms.gmem_offset + (s << PAGE_SHIFT) - ms.gpa
        pin = ms.gmem.pin(off, (e - s) << PAGE_SHIFT)
        self._pins[s] = (e, pin)
        bisect.insort(self._starts, s)

    def _release(self, x: int, y: int) -> None:
        """Release the guest_memfd pins over GFNs ``[x, y)``; a pin reaching outside keeps
        its other pages pinned (the kernel pins per page; the model holds pins per range,
        so it re-pins them and takes back the counts of that)."""
        i = max(0, bisect.bisect_right(self._starts, x) - 1)
        hit = []
        while i < len(self._starts) and self._starts[i] < y:
            s = self._starts[i]
            if self._pins[s][0] > x:
                hit.append(s)
            i += 1
        for s in hit:
            e, pin = self._pins.pop(s)
            self._starts.remove(s)
            ms = self.vm.memslot_for(s << PAGE_SHIFT)
            pin.release()
            for a, b in ((s, x), (y, e)):
                if a < b:
                    self._pin(ms, a, b)
                    self.vm.count_work("pins", -(b - a))
                    self.vm.count_work("unpins", -(b - a))


# ============================================================================ the accounting

def allocated_private(g) -> int:
    """Allocated private pages of a file, from the store's whole-file counts where they
    decide it (no shared page, or no hole), else counted over the file."""
    st, n = g.store, g.nr_pages
    alloc = st.total(K_ALLOC)
    shared = n - st.total(K_PRIV)
    if shared == 0:
        return alloc
    if alloc == n:
        return n - shared
    return st.count(0, n, ALLOC | PRIV, ALLOC | PRIV)


def _te_4k(store, mapping: int):
    """Pages the trusted entity holds at 4 KiB: with the host mapping private memory at
    4 KiB, every page with trusted-entity state; else those outside a huge folio."""
    if mapping <= _MAPPING_4K:
        return lambda a, b: (b - a) - store.count(a, b, TE_MASK, 0)
    return lambda a, b: store.count(a, b, HUGE, 0) - store.count(a, b, TE_MASK | HUGE, 0)


def _file_figures(g, mapping: int, platform: str) -> dict:
    """Counts of one guest_memfd file (pages and tables)."""
    st, n = g.store, g.nr_pages
    alloc = st.total(K_ALLOC)
    priv = allocated_private(g)
    huge = st.total(K_HUGE)
    dm = g.direct_map_entries()
    split_1g = -(-n // PAGES_1G) - dm["1G"]
    split_2m = dm["4K"] // PAGES_2M
    out = {"alloc": alloc, "private": priv, "pinned": st.total(K_PIN),
           "te": n - st.count(0, n, TE_MASK, 0), "huge_pages": huge, "huge_folios": g.huge_folios(),
           "pmd_tables": split_1g, "pte_tables": split_2m, "te4k_2m": 0, "te4k_1g": 0}
    if platform in ("snp", "tdx") and out["te"]:
        count = _te_4k(st, mapping)
        out["te4k_2m"] = blocks_touched(count, 0, n, PAGES_2M)
        if platform == "snp":
            out["te4k_1g"] = blocks_touched(count, 0, n, PAGES_1G)
    return out


def _legacy_split(vm):
    """Legacy mode: (allocated private pages on GFNs the VM marks shared, GFNs holding
    both a separate shared page and an allocated private page)."""
    unused = both = 0
    private = RangeSet()
    for s, e in vm.private_gfn_ranges():
        private.assign(s, e, True)
    for ms in vm.memslots.values():
        if ms.gmem is None:
            continue
        st, base = ms.gmem.store, ms.gmem_offset >> PAGE_SHIFT
        g0 = ms.gpa >> PAGE_SHIFT
        for a, b in _complement(private, g0, ms.end >> PAGE_SHIFT):
            unused += st.count(base + a - g0, base + b - g0, ALLOC, ALLOC)
        for q0, q1 in ms.resident.ranges():
            both += st.count(base + q0, base + q1, ALLOC, ALLOC)
    return unused, both


def host_memory(vm, *, mapping: int = _MAPPING_4K, vfio: Vfio | None = None,
                discard_on_share: bool | None = None, discard_on_private: bool | None = None) -> dict:
    """The host memory of ``vm``, in bytes (docs/model.md §13), as a plain dict.

    ``mapping`` is the level (bytes) at which the host maps private memory (it decides
    whether the trusted entity holds pages at 4 KiB); ``vfio`` the VMM's device
    assignment, if any; the discard policies are reported as given."""
    platform = vm.vm_type
    files = [_file_figures(g, mapping, platform) for g in vm.gmems]
    alloc = sum(f["alloc"] for f in files)
    separate = vm.shared_memory_pages()
    if vm.in_place:
        private = sum(f["private"] for f in files)
        shared = alloc - private + separate
        unused = both = 0
    else:
        private, shared = alloc, separate
        unused, both = _legacy_split(vm)
    resident = {"shared": shared * PAGE_SIZE, "private": private * PAGE_SIZE,
                "separate_shared": separate * PAGE_SIZE, "doubly_allocated": both * PAGE_SIZE,
                "unused_private": unused * PAGE_SIZE, "total": (shared + private) * PAGE_SIZE}
    pinned_shared = sum(f["pinned"] for f in files)
    if vfio is not None:
        pinned_shared += vfio.separate.total()
    pinned_private = sum(f["te"] for f in files) if platform in ("snp", "tdx") else 0
    pinned = {"shared": pinned_shared * PAGE_SIZE, "private": pinned_private * PAGE_SIZE,
              "total": (pinned_shared + pinned_private) * PAGE_SIZE}

    # metadata
    if vm.in_place:
        attributes = sum(maple_nodes(g.attribute_ranges) for g in vm.gmems) * MAPLE_NODE
    else:
        attributes = xarray_nodes(vm.private_gfn_ranges()) * XA_NODE
    huge_pages = sum(f["huge_pages"] for f in files)
    folios = sum(f["huge_folios"] for f in files)
    vmemmap_plain = (alloc + separate) * STRUCT_PAGE
    vmemmap = (alloc - huge_pages + separate) * STRUCT_PAGE + folios * HVO_KEPT
    pmd = sum(f["pmd_tables"] for f in files)
    pte = sum(f["pte_tables"] for f in files)
    if platform == "snp":
        # RMPUPDATE at 4 KiB breaks the direct map around the page (adjust_direct_map());
        # the larger of the two counts is a lower bound of their union
        pmd = sum(max(f["pmd_tables"], f["te4k_1g"]) for f in files)
        pte = sum(max(f["pte_tables"], f["te4k_2m"]) for f in files)
    direct_map = (pmd + pte) * TABLE_PAGE
    iommu = 0
    if vfio is not None and vfio.mappings:
        ranges = vfio.mapped.ranges()
        iommu = (range_blocks(ranges, PAGES_2M) + range_blocks(ranges, PAGES_1G)) * TABLE_PAGE
    dpamt = sum(f["te4k_2m"] for f in files) * DPAMT_PER_2M if platform == "tdx" else 0
    metadata = {"attributes": attributes, "vmemmap": vmemmap, "vmemmap_without_hvo": vmemmap_plain,
                "direct_map_tables": direct_map, "iommu_tables": iommu, "dynamic_pamt": dpamt}
    metadata["total"] = attributes + vmemmap + direct_map + iommu + dpamt

    guest = sum(ms.size for ms in vm.memslots.values())
    return {
        "vm_type": platform,
        "guest_bytes": guest,
        "resident": resident,
        "pinned": pinned,
        "vfio": _vfio_figures(vfio, guest),
        "metadata": metadata,
        "total": resident["total"] + metadata["total"],
        "host_wide": _host_wide(platform, guest),
        "discard": {"on_share": discard_on_share, "on_private": discard_on_private},
    }


def _vfio_figures(vfio, guest: int) -> dict:
    possible = guest >> PAGE_SHIFT
    if vfio is None:
        return {"enabled": False, "iommu_mappings": 0, "iommu_mappings_peak": 0,
                "iommu_mappings_possible": 0, "dma_entry_limit": DMA_ENTRY_LIMIT, "over_limit": False}
    return {"enabled": True, "iommu_mappings": vfio.mappings, "iommu_mappings_peak": vfio.peak,
            "iommu_mappings_possible": possible, "dma_entry_limit": DMA_ENTRY_LIMIT,
            "over_limit": vfio.peak > DMA_ENTRY_LIMIT}


def _host_wide(platform: str, guest: int) -> dict:
    """Tables covering all host memory, as the share of ``guest`` bytes of it."""
    pages = guest >> PAGE_SHIFT
    if platform == "snp":
        return {"snp_rmp": pages * RMP_ENTRY}
    if platform == "tdx":
        upper = (guest >> 21) * PAMT_ENTRY + (guest >> 30) * PAMT_ENTRY
        return {"tdx_pamt": pages * PAMT_ENTRY + upper,
                "tdx_pamt_with_dynamic": upper + pages // 8}
    return {}


def timeline_figures(vm, vfio: Vfio | None = None) -> dict:
    """The figures a timeline sample keeps, those the store's summaries count at once:
    resident and pinned shared bytes as :func:`host_memory` gives them, and the IOMMU
    mappings. (What the trusted entity holds, the attribute store and the tables need
    a walk of every page table of a fragmented file; :func:`host_memory` has them.)"""
    alloc = priv = pinned = 0
    for g in vm.gmems:
        st = g.store
        alloc += st.total(K_ALLOC)
        pinned += st.total(K_PIN)
        if vm.in_place:
            priv += allocated_private(g)
    separate = vm.shared_memory_pages()
    if not vm.in_place:
        priv = alloc
    if vfio is not None:
        pinned += vfio.separate.total()
    return {"resident_shared": (alloc - priv + separate) * PAGE_SIZE, "resident_private": priv * PAGE_SIZE,
            "separate_shared": separate * PAGE_SIZE, "pinned_shared": pinned * PAGE_SIZE,
            "iommu_mappings": vfio.mappings if vfio is not None else 0}
