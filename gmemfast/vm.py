"""VM: memslots, the legacy per-VM attribute store, and guest accesses (docs/model.md
§4.5, §4.6, §4.8, §4.9)."""
from __future__ import annotations

import bisect
import errno
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from ._layout import COUNTER_INDEX, COUNTER_NAMES, GMAP, NCOUNTERS, PRIV, RMP_VALIDATED, SEPT_MAPPED
from .errors import GmemError, MemoryFaultExit, MmioExit
from .gmem import BatchResult, GuestMemfd, int_array, int_column
from .platforms.snp import SnpPlatform
from .platforms.tdx import TdxPlatform
from .populate import GmemRange, advance_source
from .uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, VM_TYPES
from .units import PAGE_SHIFT, PAGE_SIZE, as_int, check_accept_chunk, check_range
from .units import check_count

__all__ = ["VM", "Memslot", "RangeSet", "GmemRange", "advance_source"]

_MAX_GPA = 1 << 52
_MAX_SLOTS = 1 << 15
_ACCEPTED_STATE = {"tdx": SEPT_MAPPED, "snp": RMP_VALIDATED}
_MAPPING_LEVELS = (4096, 2 << 20, 1 << 30)    # a private mapping: 4 KiB, 2 MiB or 1 GiB
_TLB_CEILING = 33       # tlb_single_page_flush_ceiling: above it, one full flush
_GMEM_POLICIES = ("direct_map", "merge", "metadata_limit", "content_modes")
_PLATFORM_POLICIES = ("populate_converts", "pages_per_populate")


def _check_mapping(mapping):
    """A private mapping level (4 KiB, 2 MiB or 1 GiB), or None; ``EINVAL`` otherwise."""
    if mapping is None:
        return None
    mapping = as_int(mapping, "mapping")
    if mapping not in _MAPPING_LEVELS:
        raise GmemError(errno.EINVAL, f"private mapping level {mapping:#x}: must be 4 KiB, 2 MiB or 1 GiB")
    return mapping


@dataclass(frozen=True)
class Memslot:
    """One memslot: ``[gpa, gpa+size)`` backed by ``[gmem_offset, ...)`` of ``gmem`` for
    private memory, and by host memory (``host``: page within the slot -> bytes) for
    shared memory where shared memory is separate (legacy mode, ordinary memslots).
    ``resident`` holds the pages of that separate memory the host has allocated (those
    with bytes and those only touched), as page ranges within the slot."""
    slot: int
    gpa: int
    size: int
    gmem: object
    gmem_offset: int
    host: dict = field(default_factory=dict, compare=False, repr=False)
    resident: "RangeSet" = field(default_factory=lambda: RangeSet(), compare=False, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


class RangeSet:
    """Disjoint, sorted, half-open ranges of integers (the legacy per-GFN attribute
    array, kept as ranges here; its cost is still counted per GFN)."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def covered(self, a: int, b: int) -> int:
        """How many integers of ``[a, b)`` are in the set."""
        total = 0
        i = max(bisect.bisect_right(self.ends, a), 0)
        while i < len(self.starts) and self.starts[i] < b:
            total += min(b, self.ends[i]) - max(a, self.starts[i])
            i += 1
        return total

    def first(self, a: int, b: int, present: bool) -> int:
        """First integer of ``[a, b)`` that is (``present``) or is not in the set, or -1."""
        i = bisect.bisect_right(self.ends, a)
        if present:
            if i < len(self.starts) and self.starts[i] < b:
                return max(a, self.starts[i])
            return -1
        x = a
        while i < len(self.starts) and self.starts[i] <= x < b:
            x = self.ends[i]
            i += 1
        return x if x < b else -1

    def __contains__(self, x: int) -> bool:
        i = bisect.bisect_right(self.starts, x) - 1
        return i >= 0 and x < self.ends[i]

    def assign(self, a: int, b: int, present: bool):
        lo = bisect.bisect_left(self.ends, a)     # first range ending at or after a
        hi = bisect.bisect_right(self.starts, b)  # ranges starting after b are untouched
        new_s, new_e = [], []
        if lo < hi:
            if self.starts[lo] < a:
                new_s.append(self.starts[lo])
                new_e.append(a)
            if self.ends[hi - 1] > b:
                new_s.append(b)
                new_e.append(self.ends[hi - 1])
        if present:
            s, e = a, b
            if lo < hi:
                s = min(s, self.starts[lo])
                e = max(e, self.ends[hi - 1])
            new_s, new_e = [s], [e]
        self.starts[lo:hi] = new_s
        self.ends[lo:hi] = new_e

    def __len__(self):
        return len(self.starts)

    def total(self) -> int:
        """How many integers the set holds."""
        return sum(self.ends) - sum(self.starts)

    def ranges(self) -> list[tuple[int, int]]:
        """The ranges, in order, as ``(start, end)`` pairs."""
        return list(zip(self.starts, self.ends))


class VM:
    """A KVM VM of type ``"sw-protected"``, ``"snp"`` or ``"tdx"``.

    ``in_place=True`` (default): shareability lives in each guest_memfd (per file), and
    conversion is ``KVM_SET_MEMORY_ATTRIBUTES2`` on the file. ``in_place=False``: the
    legacy mode, where KVM keeps the private attribute per GFN and shared memory is
    separate host memory. Policies given here apply to every guest_memfd it creates.
    """

    def __init__(self, vm_type="sw-protected", *, in_place=True, **policies):
        if vm_type not in VM_TYPES:
            raise ValueError(f"unknown vm_type {vm_type!r}: choose one of {', '.join(map(repr, VM_TYPES))}")
        self.vm_type = vm_type
        self.in_place = bool(in_place)
        self._gmem_policies = {k: policies.pop(k) for k in _GMEM_POLICIES if k in policies}
        self._platform_policies = {k: policies.pop(k) for k in _PLATFORM_POLICIES if k in policies}
        check_count(self._platform_policies.get("pages_per_populate"), "pages_per_populate", optional=True)
        if policies:
            raise TypeError(f"unknown policies {sorted(policies)}")
        ppp = self._platform_policies.get("pages_per_populate")
        if ppp is not None:
            if isinstance(ppp, bool) or not isinstance(ppp, numbers.Integral):
                raise ValueError(f"pages_per_populate must be an integer of at least 1 (or None), "
                                 f"not {ppp!r}")
            if ppp < 1:
                raise ValueError(f"pages_per_populate must be at least 1 (or None), not {ppp}")
            self._platform_policies["pages_per_populate"] = int(ppp)
        self.memslots: dict[int, Memslot] = {}
        self._slot_starts: list[tuple[int, int]] = []   # (gpa, slot) sorted
        self._attrs = RangeSet()                        # legacy: private GFNs
        self._counts = np.zeros(NCOUNTERS, np.int64)    # VM-level counters
        self.gmems: list = []
        self.finalized = False
        self.interrupt = None      # populate's signal check: callable(pages_done) -> bool
        self._platform = {"snp": SnpPlatform, "tdx": TdxPlatform}.get(vm_type, lambda vm: None)(self)

    @property
    def populate_converts(self) -> bool:
        return bool(self._platform_policies.get("populate_converts", False))

    @property
    def pages_per_populate(self):
        return self._platform_policies.get("pages_per_populate")

    # ---------------------------------------------------------------- files and slots
    def create_guest_memfd(self, size, flags=0, *, page_order=0):
        """``KVM_CREATE_GUEST_MEMFD`` on this VM."""
        g = GuestMemfd(size, flags, page_order=page_order, vm_type=self.vm_type, vm=self,
                       **self._gmem_policies)
        self.gmems.append(g)
        return g

    def set_user_memory_region(self, slot, gpa, size, gmem, gmem_offset=0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (docs/model.md §4.8): bind ``[gmem_offset,
        gmem_offset+size)`` of a guest_memfd to ``[gpa, gpa+size)``; ``gmem=None`` makes an
        ordinary memslot of host memory; size 0 deletes the slot and unbinds its range.

        As KVM checks it: unaligned values, a slot id out of range, a range past the file,
        a file of another VM, a file range bound by another memslot, and changing a slot
        that has a guest_memfd (memslots with one can only be deleted) are ``EINVAL``; a
        GPA range overlapping another memslot is ``EEXIST``. Re-issuing an ordinary
        memslot unchanged does nothing; with another GPA it moves it.
        """
        slot = as_int(slot, "slot")
        gpa = as_int(gpa, "gpa")
        size = as_int(size, "size")
        gmem_offset = as_int(gmem_offset, "gmem_offset")
        what = f"memslot {slot}"
        if slot < 0 or slot >= _MAX_SLOTS:
            raise GmemError(errno.EINVAL, f"memslot id {slot} is out of range (0 to {_MAX_SLOTS - 1})")
        if gpa % PAGE_SIZE or size % PAGE_SIZE or gpa < 0 or size < 0 or gpa + size > _MAX_GPA:
            raise GmemError(errno.EINVAL, f"{what}: gpa {gpa:#x} and size {size:#x} must be page "
                                          "aligned and inside the guest physical address space")
        old = self.memslots.get(slot)
        if size == 0:
            if old is None:
                raise GmemError(errno.EINVAL, f"{what} does not exist (size 0 deletes a slot)")
            self._remove_slot(old)
            return
        if old is not None:
            if gmem is not None or old.gmem is not None:
                raise GmemError(errno.EINVAL, f"{what} has a guest_memfd: such memslots cannot be "
                                              "moved, resized or changed, only deleted")
            if size != old.size:
                raise GmemError(errno.EINVAL, f"{what}: resizing a memslot ({old.size:#x} to "
                                              f"{size:#x}) is not supported; delete it first")
            if gpa == old.gpa:
                return                                   # nothing to change
        self._check_overlap(slot, gpa, size)
        if gmem is not None:
            self._check_bind(what, gmem, gmem_offset, size)
        host, resident = {}, RangeSet()
        if old is not None:
            self._remove_slot(old)                       # an ordinary memslot moves, its memory too
            host, resident = old.host, old.resident
        self.memslots[slot] = Memslot(slot, gpa, size, gmem, gmem_offset if gmem is not None else 0,
                                      host, resident)
        bisect.insort(self._slot_starts, (gpa, slot))

    def _remove_slot(self, ms: "Memslot") -> None:
        del self.memslots[ms.slot]
        self._slot_starts.remove((ms.gpa, ms.slot))

    def _check_overlap(self, slot: int, gpa: int, size: int) -> None:
        for other in self.memslots.values():
            if other.slot != slot and gpa < other.end and other.gpa < gpa + size:
                raise GmemError(errno.EEXIST, f"memslot {slot} [{gpa:#x}, {gpa + size:#x}) overlaps "
                                              f"memslot {other.slot} [{other.gpa:#x}, {other.end:#x})")

    def _check_bind(self, what: str, gmem, gmem_offset: int, size: int) -> None:
        """``kvm_gmem_bind``: the file is this VM's and the range is in it and unbound."""
        if not isinstance(gmem, GuestMemfd) or gmem.vm is not self:
            raise GmemError(errno.EINVAL, f"{what}: the guest_memfd belongs to another VM")
        check_range(gmem_offset, size, gmem.size, f"{what} guest_memfd range")
        for other in self.memslots.values():
            if other.gmem is gmem and gmem_offset < other.gmem_offset + other.size \
                    and other.gmem_offset < gmem_offset + size:
                raise GmemError(errno.EINVAL, f"{what}: guest_memfd range [{gmem_offset:#x}, "
                                              f"{gmem_offset + size:#x}) is already bound to memslot "
                                              f"{other.slot}")

    def memslot_for(self, gpa: int) -> Memslot | None:
        i = bisect.bisect_right(self._slot_starts, (gpa, _MAX_SLOTS)) - 1
        if i < 0:
            return None
        ms = self.memslots[self._slot_starts[i][1]]
        return ms if gpa < ms.end else None

    def _pieces(self, gpa: int, size: int):
        """Split a guest access into (memslot or None for a gap, gpa, size) pieces."""
        out = []
        end = gpa + size
        while gpa < end:
            ms = self.memslot_for(gpa)
            if ms is None:
                i = bisect.bisect_right(self._slot_starts, (gpa, _MAX_SLOTS))
                nxt = self._slot_starts[i][0] if i < len(self._slot_starts) else end
                n = min(end, nxt) - gpa
            else:
                n = min(end, ms.end) - gpa
            out.append((ms, gpa, n))
            gpa += n
        return out

    # ---------------------------------------------------------------- attributes
    @property
    def counters(self) -> Mapping[str, int]:
        """Work done by this VM: its own (legacy attribute store, firmware) plus its files'."""
        total = self._counts.copy()
        for g in self.gmems:
            total += g.store.counter_values()
        return MappingProxyType(dict(zip(COUNTER_NAMES, total.tolist())))

    def count_work(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the VM's own counter ``name`` (work not on any one file)."""
        self._counts[COUNTER_INDEX[name]] += n

    def set_finalized(self) -> None:
        """The launch is finished (``SNP_LAUNCH_FINISH``, ``TDX_FINALIZE_VM``): content
        modes that only a launching VM may use are refused from now on."""
        self.finalized = True
        for g in self.gmems:
            g.store.finalized = True

    def private_pages(self) -> int:
        """Private pages of guest memory as this VM tracks them: the per-GFN attributes in
        legacy mode (over its memslots), guest_memfd's shareability in place."""
        total = 0
        for ms in self.memslots.values():
            if ms.gmem is None:
                continue
            if self.in_place:
                total += ms.gmem.private_pages(ms.gmem_offset, ms.size)
            else:
                total += self._attrs.covered(ms.gpa >> PAGE_SHIFT, ms.end >> PAGE_SHIFT)
        return total

    def attribute_ranges(self) -> int:
        """Entries of the legacy per-GFN store, as maximal ranges of private GFNs."""
        return len(self._attrs)

    def private_gfn_ranges(self) -> list[tuple[int, int]]:
        """The legacy per-GFN store's private GFNs, as maximal ``(start, end)`` ranges."""
        return self._attrs.ranges()

    # ---------------------------------------------------------------- separate shared memory
    def _separate(self, ms) -> bool:
        """Shared accesses to this memslot go to its separate host memory."""
        return ms is not None and (ms.gmem is None or not self.in_place)

    def shared_memory_pages(self) -> int:
        """Pages of separate shared memory the host holds (docs/model.md §13): ordinary
        memslots' memory, and a legacy VM's shared copies of guest_memfd memory."""
        return sum(ms.resident.total() for ms in self.memslots.values())

    def _separate_pieces(self, gpa, size, what: str):
        gpa, size = as_int(gpa, "gpa"), as_int(size, "size")
        check_range(gpa, size, _MAX_GPA, what)
        ms = self.memslot_for(gpa)
        pieces = [(ms, gpa, size)] if ms is not None and gpa + size <= ms.end else self._pieces(gpa, size)
        gap = next((a for ms, a, _n in pieces if ms is None), None)
        if gap is not None:
            raise GmemError(errno.EFAULT, f"{what} [{gpa:#x}, +{size:#x}): no memslot at {gap:#x}")
        return [(ms, (a - ms.gpa) >> PAGE_SHIFT, (a + n - ms.gpa) >> PAGE_SHIFT)
                for ms, a, n in pieces if self._separate(ms)]

    def _make_resident(self, ms, q0: int, q1: int) -> int:
        """Allocate the pages of ``[q0, q1)`` (within the slot) its separate memory does not
        hold yet: each a page fault in the VMM, a page allocated and zeroed."""
        new = (q1 - q0) - ms.resident.covered(q0, q1)
        if new:
            ms.resident.assign(q0, q1, True)
            self.count_work("host_faults", new)
            self.count_work("pages_allocated", new)
            self.count_work("pages_zeroed", new)
            self.count_work("bytes_zeroed_4k", new * PAGE_SIZE)
        return new

    def fault_shared(self, gpa, size) -> int:
        """The VMM (or a device it pins memory for) touches the separate shared memory of
        ``[gpa, gpa+size)``: pages it does not hold yet are faulted in, allocated and
        zeroed. Memory shared in place (guest_memfd) is not separate and is left alone.
        ``EFAULT`` where no memslot covers the range. Returns the pages newly allocated."""
        return sum(self._make_resident(ms, q0, q1)
                   for ms, q0, q1 in self._separate_pieces(gpa, size, "fault shared memory"))

    def discard_shared(self, gpa, size) -> int:
        """The VMM discards the separate shared memory of ``[gpa, gpa+size)``
        (``madvise(MADV_DONTNEED)`` or a punch hole on its backing, as QEMU does when the
        guest converts memory to private): one call per memslot, the pages it held are
        unmapped from the VMM and freed, and read as zeroes. ``EFAULT`` where no memslot
        covers the range. Returns the pages freed."""
        freed = 0
        for ms, q0, q1 in self._separate_pieces(gpa, size, "discard shared memory"):
            self.count_work("shared_discards")
            n = ms.resident.covered(q0, q1)
            if not n:
                continue
            ms.resident.assign(q0, q1, False)
            for q in [q for q in ms.host if q0 <= q < q1]:
                del ms.host[q]
            self.count_work("host_ptes_zapped", n)
            self.count_work("pages_freed", n)
            if n > _TLB_CEILING:
                self.count_work("tlb_flush_full")
            else:
                self.count_work("tlb_invlpg", n)
            self.count_work("tlb_shootdowns")
            freed += n
        return freed

    def private_gfns(self, gpa, size) -> int:
        """How many GFNs of ``[gpa, gpa+size)`` the per-GFN attributes mark private."""
        g0, g1 = check_range(gpa, size, _MAX_GPA, "private_gfns")
        return self._attrs.covered(g0, g1)

    def set_memory_attributes(self, gpa, size, attributes) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` on the VM: the legacy per-GFN store.

        In in-place mode the private attribute lives in guest_memfd, so ``PRIVATE`` here is
        ``EINVAL``; clearing it is a no-op.
        """
        attributes = as_int(attributes, "attributes")
        gpa = as_int(gpa, "gpa")
        size = as_int(size, "size")
        if attributes & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise GmemError(errno.EINVAL, f"unknown memory attributes {attributes & ~8:#x}")
        g0, g1 = check_range(gpa, size, _MAX_GPA, "KVM_SET_MEMORY_ATTRIBUTES")
        if self.in_place:
            if attributes:
                raise GmemError(errno.EINVAL, "KVM_SET_MEMORY_ATTRIBUTES with PRIVATE on an in-place "
                                              "VM: convert through the guest_memfd instead")
            return
        self.count_work("vm_attr_calls")
        want = bool(attributes)
        have = self._attrs.covered(g0, g1)
        if have == (g1 - g0 if want else 0):
            return
        # the legacy store writes one xarray entry per GFN of the range
        self.count_work("attr_writes_page", g1 - g0)
        self._attrs.assign(g0, g1, want)
        if want:
            self.count_work("pages_to_private", g1 - g0 - have)
        else:
            self.count_work("pages_to_shared", have)
        for ms in self.memslots.values():
            lo = max(ms.gpa, gpa)
            hi = min(ms.end, gpa + size)
            if lo < hi and ms.gmem is not None:
                p0 = (ms.gmem_offset + lo - ms.gpa) >> PAGE_SHIFT
                ms.gmem.store.zap_guest(p0, p0 + ((hi - lo) >> PAGE_SHIFT))

    def is_private(self, gpa) -> bool:
        """Private as seen by this VM: guest_memfd's shareability in in-place mode, the
        per-GFN attribute in legacy mode. Ordinary memory and gaps are shared in place."""
        gpa = as_int(gpa, "gpa")
        if not self.in_place:
            return (gpa >> PAGE_SHIFT) in self._attrs
        ms = self.memslot_for(gpa)
        if ms is None or ms.gmem is None:
            return False
        return ms.gmem.is_private((ms.gmem_offset + gpa - ms.gpa) & ~(PAGE_SIZE - 1))

    # ---------------------------------------------------------------- platforms
    def _require(self, vm_type: str, what: str):
        if self.vm_type != vm_type:
            raise GmemError(errno.ENOTTY, f"{what} is for {vm_type} VMs; this VM is {self.vm_type}")
        return self._platform

    def tdx_init_mem_region(self, source, gpa, nr_pages, flags=0):
        """``KVM_TDX_INIT_MEM_REGION``: TDH.MEM.PAGE.ADD each page (and TDH.MR.EXTEND its
        chunks with ``KVM_TDX_MEASURE_MEMORY_REGION``). Returns the region advanced past
        the pages done; on error the raised ``GmemError`` carries it as ``.region``."""
        return self._require("tdx", "KVM_TDX_INIT_MEM_REGION").init_mem_region(source, gpa, nr_pages, flags)

    def tdx_finalize(self) -> bytes:
        """``KVM_TDX_FINALIZE_VM``: returns MRTD (48 bytes)."""
        return self._require("tdx", "KVM_TDX_FINALIZE_VM").finalize()

    def snp_launch_update(self, gfn_start, uaddr, length, page_type, flags=0):
        """``KVM_SEV_SNP_LAUNCH_UPDATE``; returns the parameters advanced past the pages
        done (loop until ``len == 0``)."""
        return self._require("snp", "KVM_SEV_SNP_LAUNCH_UPDATE").launch_update(
            gfn_start, uaddr, length, page_type, flags)

    def snp_launch_finish(self, vmsas=()) -> bytes:
        """``KVM_SEV_SNP_LAUNCH_FINISH``: measures each VMSA page; returns the digest."""
        return self._require("snp", "KVM_SEV_SNP_LAUNCH_FINISH").launch_finish(vmsas)

    def guest_accept(self, gpa, size, *, chunk=2 << 20, mapping=None, prefault=False) -> int:
        """The guest accepts (TDX ``TDG.MEM.PAGE.ACCEPT``) or validates (SNP ``PVALIDATE``)
        its private memory ``[gpa, gpa+size)`` in ``chunk``-sized pieces (4 KiB or 2 MiB).

        Pages are faulted in (allocated), mapped in the guest and moved to the trusted
        entity's accepted state; each chunk costs an exit and the platform's calls.
        Returns the chunks that did work. A shared page is a memory-fault exit.

        ``mapping`` is the level at which the host maps private memory (4 KiB, 2 MiB or
        1 GiB), bounded by the backing page order and, on SNP, by the RMP's 2 MiB; None
        maps at the chunk's level. ``prefault``: the VMM mapped the memory before the
        guest accepts it (``KVM_PRE_FAULT_MEMORY``), so no exit maps it. What each case
        costs is docs/model.md §4.9.
        """
        gpa = as_int(gpa, "gpa")
        size = as_int(size, "size")
        chunk = check_accept_chunk(chunk)
        mapping = _check_mapping(mapping)
        check_range(gpa, size, _MAX_GPA, "guest accept")
        if gpa % chunk or size % chunk:
            raise GmemError(errno.EINVAL, f"guest accept [{gpa:#x}, +{size:#x}) is not aligned to "
                                          f"the {chunk >> 10} KiB chunk")
        pieces = self._pieces(gpa, size)
        self._check_view(pieces, True)
        state = _ACCEPTED_STATE.get(self.vm_type, 0)
        total = 0
        for ms, a, n in pieces:
            p0 = (ms.gmem_offset + a - ms.gpa) >> PAGE_SHIFT
            map_pages = 0
            if mapping is not None:
                map_pages = min(mapping >> PAGE_SHIFT, 1 << ms.gmem.page_order)
                if self.vm_type == "snp":
                    map_pages = min(map_pages, 512)      # RMP entries are 4 KiB or 2 MiB
            total += ms.gmem.store.accept(p0, p0 + (n >> PAGE_SHIFT), chunk >> PAGE_SHIFT, state,
                                          map_pages, bool(prefault))
        return total

    def guest_accept_many(self, gpas, sizes, *, chunk=2 << 20, mapping=None,
                          prefault=False) -> BatchResult:
        """Many :meth:`guest_accept` calls in one: ``gpas`` and ``sizes`` are integer arrays
        (or scalars, broadcast), ``chunk``, ``mapping`` and ``prefault`` apply to every item.

        Applied in order, each with its own result: ``value`` is the chunks each accepted,
        ``errno`` is 0, the ``errno`` :meth:`guest_accept` raises (with its
        ``error_offset``), or ``EFAULT`` where it exits to the VMM (a shared page, ordinary
        memory or no memslot: ``error_offset`` is the GPA of the exit, as the exit's
        ``gpa``). A failed item changes nothing. ``chunk`` and ``mapping`` are checked once
        (a bad one raises, as the per-call form does, before any item)."""
        g = int_array(gpas, "gpas")
        n = g.shape[0] if g.ndim else 1
        g, sz = (int_column(v, name, n, "gpas") for v, name in ((g, "gpas"), (sizes, "sizes")))
        chunk = check_accept_chunk(chunk)
        mapping = _check_mapping(mapping)
        out_err = np.zeros(n, np.int32)
        out_off = np.full(n, -1, np.int64)
        chunks = np.zeros(n, np.int64)
        bad = (sz <= 0) | (g < 0) | (((g | sz) & (PAGE_SIZE - 1)) != 0) | (sz > _MAX_GPA - g)
        bad |= ((g | sz) & (chunk - 1)) != 0
        out_err[bad] = errno.EINVAL
        slow = np.flatnonzero(~bad).tolist() if self._accept_in_order(g, sz, bad) else []
        if slow:
            bad[:] = True          # items that may change a file's state across memslots
        # the memslot each item lies in wholly (an item over several is done on its own)
        starts = np.array([a for a, _ in self._slot_starts], np.int64)
        slots = [self.memslots[s] for _, s in self._slot_starts]
        k = np.searchsorted(starts, g, side="right") - 1
        ends = np.array([ms.end for ms in slots], np.int64)
        inside = (k >= 0) & (g + sz <= ends[np.maximum(k, 0)] if len(slots) else False)
        one = ~bad & inside
        if len(slots):
            one &= np.array([ms.gmem is not None for ms in slots])[np.maximum(k, 0)]
        state = _ACCEPTED_STATE.get(self.vm_type, 0)
        if not self.in_place:
            # the per-GFN attributes: the first GFN of each item that is not private
            f = self._first_not_private(g >> PAGE_SHIFT, (g + sz) >> PAGE_SHIFT)
            hit = one & (f >= 0)
            out_err[hit] = errno.EFAULT
            out_off[hit] = f[hit] << PAGE_SHIFT
            one &= ~hit
        for si, ms in enumerate(slots):
            mine = one & (k == si)
            if not mine.any():
                continue
            idx = np.flatnonzero(mine)
            p0s = (ms.gmem_offset + g[idx] - ms.gpa) >> PAGE_SHIFT
            p1s = p0s + (sz[idx] >> PAGE_SHIFT)
            map_pages = 0
            if mapping is not None:
                map_pages = min(mapping >> PAGE_SHIFT, 1 << ms.gmem.page_order)
                if self.vm_type == "snp":
                    map_pages = min(map_pages, 512)      # RMP entries are 4 KiB or 2 MiB
            e = np.zeros(len(idx), np.int32)
            o = np.full(len(idx), -1, np.int64)
            chunks[idx] = ms.gmem.store.accept_many(p0s, p1s, chunk >> PAGE_SHIFT, state, map_pages,
                                                    bool(prefault), self.in_place, e, o)
            out_err[idx] = e
            o = np.where(o >= 0, ms.gpa + (o << PAGE_SHIFT) - ms.gmem_offset, -1)
            out_off[idx] = o
        # the rest one by one: items over a gap or ordinary memory, which fail whatever the
        # others did (acceptance changes no view), or, in order, all of them
        for x in slow or np.flatnonzero(~bad & ~one & (out_err == 0)).tolist():
            try:
                chunks[x] = self.guest_accept(int(g[x]), int(sz[x]), chunk=chunk, mapping=mapping,
                                              prefault=prefault)
            except GmemError as exc:
                out_err[x] = exc.errno
                out_off[x] = -1 if exc.error_offset is None else exc.error_offset
            except (MemoryFaultExit, MmioExit) as exc:
                out_err[x] = errno.EFAULT
                out_off[x] = exc.gpa
        return BatchResult(out_err, out_off, chunks)

    def _accept_in_order(self, g, sz, bad) -> bool:
        """Whether an item spans memslots that all have a guest_memfd (it may succeed and
        its accepts then count against the others'): the batch then goes one by one."""
        if len(self._slot_starts) < 2:
            return False
        starts = np.array([a for a, _ in self._slot_starts], np.int64)
        k = np.searchsorted(starts, g, side="right")
        nxt = np.append(starts, np.iinfo(np.int64).max)[k]
        for x in np.flatnonzero(~bad & (g + sz > nxt)).tolist():
            pieces = self._pieces(int(g[x]), int(sz[x]))
            if all(ms is not None and ms.gmem is not None for ms, _a, _n in pieces):
                return True
        return False

    def _first_not_private(self, g0, g1) -> np.ndarray:
        """Per range ``[g0, g1)`` of GFNs, the first without the private attribute, or -1."""
        starts = np.array(self._attrs.starts, np.int64)
        ends = np.array(self._attrs.ends, np.int64)
        if not len(starts):
            return g0.copy()
        i = np.searchsorted(ends, g0, side="right")        # first range ending after g0
        ic = np.minimum(i, len(starts) - 1)
        covers = (i < len(starts)) & (starts[ic] <= g0)
        first = np.where(covers, ends[ic], g0)
        return np.where(first < g1, first, -1)

    def set_memory_attributes_many(self, gpas, sizes, attributes) -> BatchResult:
        """Many :meth:`set_memory_attributes` calls (``KVM_SET_MEMORY_ATTRIBUTES`` on the
        VM) in one, applied in order, each with its own result (``errno`` 0 where done,
        else the errno the per-call form raises). A failed item changes nothing.
        Arguments are integer arrays or scalars (broadcast)."""
        g = int_array(gpas, "gpas")
        n = g.shape[0] if g.ndim else 1
        g, sz, at = (int_column(v, name, n, "gpas")
                     for v, name in ((g, "gpas"), (sizes, "sizes"), (attributes, "attributes")))
        bad = ((at & ~KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0) | (sz <= 0) | (g < 0)
        bad |= (((g | sz) & (PAGE_SIZE - 1)) != 0) | (g >= _MAX_GPA) | (sz > _MAX_GPA - g)
        if self.in_place:
            bad |= at != 0
        out_err = np.where(bad, errno.EINVAL, 0).astype(np.int32)
        out_off = np.full(n, -1, np.int64)
        if self.in_place:
            return BatchResult(out_err, out_off)
        ok = np.flatnonzero(~bad)
        g0s = (g >> PAGE_SHIFT)[ok].tolist()
        g1s = ((g + sz) >> PAGE_SHIFT)[ok].tolist()
        wants = (at[ok] != 0).tolist()
        self.count_work("vm_attr_calls", len(ok))
        attrs = self._attrs
        slots = [ms for ms in self.memslots.values() if ms.gmem is not None]
        for g0, g1, want in zip(g0s, g1s, wants):
            have = attrs.covered(g0, g1)
            if have == (g1 - g0 if want else 0):
                continue
            self.count_work("attr_writes_page", g1 - g0)
            attrs.assign(g0, g1, want)
            if want:
                self.count_work("pages_to_private", g1 - g0 - have)
            else:
                self.count_work("pages_to_shared", have)
            a, b = g0 << PAGE_SHIFT, g1 << PAGE_SHIFT
            for ms in slots:
                lo = max(ms.gpa, a)
                hi = min(ms.end, b)
                if lo < hi:
                    p0 = (ms.gmem_offset + lo - ms.gpa) >> PAGE_SHIFT
                    ms.gmem.store.zap_guest(p0, p0 + ((hi - lo) >> PAGE_SHIFT))
        return BatchResult(out_err, out_off)

    # ---------------------------------------------------------------- guest access
    def _check_view(self, pieces, private: bool):
        """The guest's access, page by page in order: the first page that cannot be
        accessed as asked ends it with a VM exit (docs/model.md §4.6)."""
        for ms, gpa, n in pieces:
            first = gpa & ~(PAGE_SIZE - 1)
            last = (gpa + n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            if ms is None:
                # no memslot: emulated MMIO, except on a GFN the VM's attributes make
                # private (MMIO on private memory is not allowed)
                if not self.in_place and (first >> PAGE_SHIFT) in self._attrs:
                    raise MemoryFaultExit(first, PAGE_SIZE, True)
                raise MmioExit(gpa)
            if ms.gmem is None:
                # ordinary host memory: shared only
                if private:
                    raise MemoryFaultExit(first, PAGE_SIZE, True)
                if not self.in_place:
                    bad = self._attrs.first(first >> PAGE_SHIFT, last >> PAGE_SHIFT, True)
                    if bad >= 0:
                        raise MemoryFaultExit(bad << PAGE_SHIFT, PAGE_SIZE, False)
                continue
            if self.in_place:
                p0 = (ms.gmem_offset + first - ms.gpa) >> PAGE_SHIFT
                p1 = p0 + ((last - first) >> PAGE_SHIFT)
                cval = 0 if private else PRIV   # look for a page with the other view
                bad = ms.gmem.store.first(p0, p1, PRIV, cval)
                if bad >= 0:
                    raise MemoryFaultExit(ms.gpa + (bad << PAGE_SHIFT) - ms.gmem_offset, PAGE_SIZE, private)
            else:
                bad = self._attrs.first(first >> PAGE_SHIFT, last >> PAGE_SHIFT, not private)
                if bad >= 0:
                    raise MemoryFaultExit(bad << PAGE_SHIFT, PAGE_SIZE, private)

    def guest_read(self, gpa, size, *, private) -> bytes:
        """A guest read of ``size`` bytes, as private or shared; exits on a mismatch."""
        gpa = as_int(gpa, "gpa")
        size = as_int(size, "size")
        if size < 0 or gpa < 0:
            raise GmemError(errno.EINVAL, f"guest read at {gpa:#x} of {size} bytes")
        if size == 0:
            return b""
        pieces = self._pieces(gpa, size)
        self._check_view(pieces, bool(private))
        out = []
        for ms, a, n in pieces:
            if ms.gmem is not None and (private or self.in_place):
                out.append(self._gmem_read(ms.gmem, ms.gmem_offset + a - ms.gpa, n))
            else:
                out.append(self._host_read(ms, a, n))
        return b"".join(out)

    def guest_write(self, gpa, data, *, private) -> None:
        """A guest write, as private or shared; exits on a mismatch (nothing written)."""
        gpa = as_int(gpa, "gpa")
        mv = memoryview(data).cast("B")
        if gpa < 0:
            raise GmemError(errno.EINVAL, f"guest write at {gpa:#x}")
        if len(mv) == 0:
            return
        pieces = self._pieces(gpa, len(mv))
        self._check_view(pieces, bool(private))
        pos = 0
        for ms, a, n in pieces:
            if ms.gmem is not None and (private or self.in_place):
                self._gmem_write(ms.gmem, ms.gmem_offset + a - ms.gpa, mv[pos:pos + n])
            else:
                self._make_resident(ms, (a - ms.gpa) >> PAGE_SHIFT,
                                    (a + n - ms.gpa + PAGE_SIZE - 1) >> PAGE_SHIFT)
                self._host_write(ms, a, mv[pos:pos + n])
            pos += n

    @staticmethod
    def _gmem_read(g, offset: int, size: int) -> bytes:
        """The guest reads guest_memfd bytes: the pages are faulted into its mappings."""
        p0 = offset >> PAGE_SHIFT
        p1 = (offset + size + PAGE_SIZE - 1) >> PAGE_SHIFT
        g.store.fault_in(p0, p1, GMAP)
        return g.store.read_bytes(offset, size, p0, p1)

    @staticmethod
    def _gmem_write(g, offset: int, mv) -> None:
        p0 = offset >> PAGE_SHIFT
        p1 = (offset + len(mv) + PAGE_SIZE - 1) >> PAGE_SHIFT
        g.store.fault_in(p0, p1, GMAP)
        g.store.write_bytes(offset, mv, p0, p1)

    @staticmethod
    def _host_read(ms: Memslot, gpa: int, n: int) -> bytes:
        """The guest reads the memslot's host memory (shared, separate from guest_memfd)."""
        out = bytearray()
        end = gpa + n
        while gpa < end:
            q = (gpa - ms.gpa) >> PAGE_SHIFT
            s = gpa & (PAGE_SIZE - 1)
            k = min(end - gpa, PAGE_SIZE - s)
            page = ms.host.get(q)
            out += page[s:s + k] if page is not None else bytes(k)
            gpa += k
        return bytes(out)

    @staticmethod
    def _host_write(ms: Memslot, gpa: int, mv) -> None:
        end = gpa + len(mv)
        pos = 0
        while gpa < end:
            q = (gpa - ms.gpa) >> PAGE_SHIFT
            s = gpa & (PAGE_SIZE - 1)
            k = min(end - gpa, PAGE_SIZE - s)
            page = bytearray(ms.host.get(q, bytes(PAGE_SIZE)))
            page[s:s + k] = mv[pos:pos + k]
            ms.host[q] = bytes(page)
            gpa += k
            pos += k

    def __repr__(self):
        mode = "in-place" if self.in_place else "legacy"
        return f"VM({self.vm_type!r}, {mode}, {len(self.memslots)} memslots)"
