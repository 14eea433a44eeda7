"""VM: memslots, the legacy per-VM attribute store, and guest accesses."""
from __future__ import annotations

import bisect
import errno
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from . import _kernels as K
from ._layout import COUNTER_INDEX, COUNTER_NAMES, NCOUNTERS
from ._layout import RMP_VALIDATED as _RMP_VALIDATED
from ._layout import SEPT_MAPPED as _SEPT_MAPPED
from .errors import GmemError, MemoryFaultExit, MmioExit
from .units import PAGE_SHIFT, PAGE_SIZE, as_int, check_range

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
_VM_TYPES = ("sw-protected", "snp", "tdx")
_MAX_GPA = 1 << 52


@dataclass(frozen=True)
class GmemRange:
    """A populate source in shared guest_memfd memory: ``gmem`` from byte ``offset``."""
    gmem: object
    offset: int = 0

    def advanced(self, nbytes: int) -> "GmemRange":
        return GmemRange(self.gmem, self.offset + nbytes)


def advance_source(source, nbytes: int):
    """A populate source moved ``nbytes`` on: bytes-like sources are sliced, a
    :class:`GmemRange` moves its offset, ``None`` (in place) stays ``None``."""
    if source is None:
        return None
    if isinstance(source, GmemRange):
        return source.advanced(nbytes)
    return memoryview(source).cast("B")[nbytes:]


@dataclass(frozen=True)
class Memslot:
    slot: int
    gpa: int
    size: int
    gmem: object
    gmem_offset: int

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


class VM:
    """A KVM VM of type ``"sw-protected"``, ``"snp"`` or ``"tdx"``.

    ``in_place=True`` (default): shareability lives in each guest_memfd (per file), and
    conversion is ``KVM_SET_MEMORY_ATTRIBUTES2`` on the file. ``in_place=False``: the
    legacy mode, where KVM keeps the private attribute per GFN and shared memory is
    separate host memory. Policies given here apply to every guest_memfd it creates.
    """

    def __init__(self, vm_type="sw-protected", *, in_place=True, **policies):
        if vm_type not in _VM_TYPES:
            raise ValueError(f"unknown vm_type {vm_type!r}: choose one of {', '.join(map(repr, _VM_TYPES))}")
        self.vm_type = vm_type
        self.in_place = bool(in_place)
        self._gmem_policies = {k: policies.pop(k) for k in
                               ("direct_map", "merge", "metadata_limit", "content_modes")
                               if k in policies}
        self._platform_policies = {}
        for k in ("populate_converts", "pages_per_populate"):
            if k in policies:
                self._platform_policies[k] = policies.pop(k)
        if policies:
            raise TypeError(f"unknown policies {sorted(policies)}")
        self.memslots: dict[int, Memslot] = {}
        self._slot_starts: list[tuple[int, int]] = []   # (gpa, slot) sorted
        self._attrs = RangeSet()                        # legacy: private GFNs
        self._shared_mem: dict[int, bytes] = {}         # legacy: separate shared memory per GFN
        self._meta = np.zeros(K.META_SIZE, np.int64)    # VM-level counters
        self.gmems: list = []
        self.finalized = False
        self.interrupt = None      # populate's signal check: callable(pages_done) -> bool
        self._platform = None
        if vm_type == "snp":
            from .platforms.snp import SnpPlatform
            self._platform = SnpPlatform(self)
        elif vm_type == "tdx":
            from .platforms.tdx import TdxPlatform
            self._platform = TdxPlatform(self)

    @property
    def populate_converts(self) -> bool:
        return bool(self._platform_policies.get("populate_converts", False))

    @property
    def pages_per_populate(self):
        return self._platform_policies.get("pages_per_populate")

    # ---------------------------------------------------------------- files and slots
    def create_guest_memfd(self, size, flags=0, *, page_order=0):
        """``KVM_CREATE_GUEST_MEMFD`` on this VM."""
        from .gmem import GuestMemfd
        g = GuestMemfd(size, flags, page_order=page_order, vm_type=self.vm_type, _vm=self,
                       **self._gmem_policies)
        self.gmems.append(g)
        return g

    def set_user_memory_region(self, slot, gpa, size, gmem, gmem_offset=0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` with a guest_memfd; size 0 deletes the slot."""
        slot = as_int(slot, "slot")
        gpa = as_int(gpa, "gpa")
        size = as_int(size, "size")
        gmem_offset = as_int(gmem_offset, "gmem_offset")
        if slot < 0 or slot >= 1 << 15:
            raise GmemError(errno.EINVAL, f"memslot id {slot} is out of range")
        if size == 0:
            if slot not in self.memslots:
                raise GmemError(errno.EINVAL, f"memslot {slot} does not exist (size 0 deletes a slot)")
            old = self.memslots.pop(slot)
            self._slot_starts.remove((old.gpa, slot))
            return
        if gpa % PAGE_SIZE or size % PAGE_SIZE or gpa < 0 or size < 0 or gpa + size > _MAX_GPA:
            raise GmemError(errno.EINVAL, f"memslot {slot}: gpa {gpa:#x} and size {size:#x} must be "
                                          "page aligned and inside the guest physical address space")
        if gmem is None or gmem._vm is not self:
            raise GmemError(errno.EINVAL, f"memslot {slot}: the guest_memfd belongs to another VM")
        check_range(gmem_offset, size, gmem.size, f"memslot {slot} guest_memfd range")
        if slot in self.memslots:
            raise GmemError(errno.EEXIST, f"memslot {slot} already exists (delete it first)")
        for other in self.memslots.values():
            if gpa < other.end and other.gpa < gpa + size:
                raise GmemError(errno.EEXIST, f"memslot {slot} [{gpa:#x}, {gpa + size:#x}) overlaps "
                                              f"memslot {other.slot}")
            if other.gmem is gmem and gmem_offset < other.gmem_offset + other.size \
                    and other.gmem_offset < gmem_offset + size:
                raise GmemError(errno.EBUSY, f"memslot {slot}: guest_memfd range is already bound "
                                             f"to memslot {other.slot}")
        ms = Memslot(slot, gpa, size, gmem, gmem_offset)
        self.memslots[slot] = ms
        bisect.insort(self._slot_starts, (gpa, slot))

    def memslot_for(self, gpa: int) -> Memslot | None:
        i = bisect.bisect_right(self._slot_starts, (gpa, 1 << 16)) - 1
        if i < 0:
            return None
        ms = self.memslots[self._slot_starts[i][1]]
        return ms if gpa < ms.end else None

    def _pieces(self, gpa: int, size: int):
        """Split a guest access into (memslot, gpa, size) pieces; MmioExit on a gap."""
        out = []
        end = gpa + size
        while gpa < end:
            ms = self.memslot_for(gpa)
            if ms is None:
                raise MmioExit(gpa)
            n = min(end, ms.end) - gpa
            out.append((ms, gpa, n))
            gpa += n
        return out

    # ---------------------------------------------------------------- attributes
    @property
    def counters(self) -> Mapping[str, int]:
        """Work done by this VM: its own (legacy attribute store, firmware) plus its files'."""
        total = self._meta[:NCOUNTERS].copy()
        for g in self.gmems:
            total += g._meta[:NCOUNTERS]
        return MappingProxyType(dict(zip(COUNTER_NAMES, total.tolist())))

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
        self._meta[K.C_VM_ATTR_CALLS] += 1
        want = bool(attributes)
        have = self._attrs.covered(g0, g1)
        if have == (g1 - g0 if want else 0):
            return
        # the legacy store writes one xarray entry per GFN of the range
        self._meta[K.C_ATTR_WRITES_PAGE] += g1 - g0
        self._attrs.assign(g0, g1, want)
        if want:
            self._meta[K.C_PAGES_TO_PRIVATE] += g1 - g0 - have
        else:
            self._meta[K.C_PAGES_TO_SHARED] += have
        for ms in self.memslots.values():
            lo = max(ms.gpa, gpa)
            hi = min(ms.end, gpa + size)
            if lo < hi:
                p0 = (ms.gmem_offset + lo - ms.gpa) >> PAGE_SHIFT
                g = ms.gmem
                n2, n1, w0, meta = g._state()
                K.zap_guest(n2, n1, w0, meta, p0, p0 + ((hi - lo) >> PAGE_SHIFT))

    def is_private(self, gpa) -> bool:
        """Private as seen by this VM: guest_memfd's shareability in in-place mode, the
        per-GFN attribute in legacy mode."""
        gpa = as_int(gpa, "gpa")
        if not self.in_place:
            return (gpa >> PAGE_SHIFT) in self._attrs
        ms = self.memslot_for(gpa)
        if ms is None:
            return False
        return ms.gmem.is_private((ms.gmem_offset + gpa - ms.gpa) & ~(PAGE_SIZE - 1))

    # ---------------------------------------------------------------- populate
    def _count(self, name: str, n: int = 1) -> None:
        self._meta[COUNTER_INDEX[name]] += n

    def _gmem_page(self, gpa: int):
        """(memslot, page index in its guest_memfd) for a page-aligned gpa, or None."""
        ms = self.memslot_for(gpa)
        if ms is None:
            return None
        return ms, (ms.gmem_offset + gpa - ms.gpa) >> PAGE_SHIFT

    def _private_for_populate(self, ms, p: int, gpa: int) -> bool:
        if self.in_place:
            return bool(K.get_word(ms.gmem._n2, ms.gmem._n1, ms.gmem._w0, p) & K.PRIV)
        return (gpa >> PAGE_SHIFT) in self._attrs

    def gmem_populate(self, gpa: int, nr_pages: int, source, post_populate, *, what: str) -> int:
        """``kvm_gmem_populate``: load ``nr_pages`` private pages from ``gpa`` through the
        platform's per-page ``post_populate(memslot, page, gpa, source_page)``.

        The destination must be private (as this VM tracks it: guest_memfd in place, the
        per-GFN store in legacy mode); populate never changes shareability, unless the
        ``populate_converts`` policy makes it convert first. ``source`` is a bytes-like
        buffer (separate shared memory), a :class:`GmemRange` (shared guest_memfd memory)
        or ``None`` (in place). The count is clamped to the memslot and to the
        ``pages_per_populate`` policy. Returns the pages done; raises if the first failed.
        """
        first = self._gmem_page(gpa)
        if first is None:
            raise GmemError(errno.EINVAL, f"{what}: no memslot with a guest_memfd covers gpa {gpa:#x}")
        ms, p0 = first
        nr = min(nr_pages, (ms.end - gpa) >> PAGE_SHIFT)
        if self.pages_per_populate:
            nr = min(nr, int(self.pages_per_populate))
        if self.populate_converts:
            self._populate_convert(ms, p0, nr, what)
        err, why = 0, ""
        done = 0
        for k in range(nr):
            g = gpa + (k << PAGE_SHIFT)
            p = p0 + k
            if not self._private_for_populate(ms, p, g):
                err, why = errno.EINVAL, f"destination gpa {g:#x} is not private"
                break
            if self.interrupt is not None and self.interrupt(done):
                err, why = errno.EINTR, f"interrupted after {done} pages"
                break
            try:
                src = self._source_page(source, k, g, what)
            except GmemError as exc:   # the source page cannot be read (GUP fails)
                err, why = exc.errno, exc.detail
                break
            err = post_populate(ms, p, g, src)
            if err:
                why = f"gpa {g:#x}: {os.strerror(err)}"
                break
            done += 1
        if done == 0 and err:
            raise GmemError(err, f"{what}: {why}")
        return done

    def _populate_convert(self, ms, p0: int, nr: int, what: str) -> None:
        """The design the seed argues against: populate converts shared to private
        itself, so conversion errors surface through the platform call."""
        if not self.in_place:
            raise GmemError(errno.EINVAL, f"{what}: populate_converts needs an in-place VM")
        g = ms.gmem
        if K.walk_count(g._n2, g._n1, g._w0, p0, p0 + nr, K.PRIV, K.PRIV):
            raise GmemError(errno.EINVAL, f"{what}: with populate_converts the destination must "
                                          "be shared")
        g.set_memory_attributes(p0 << PAGE_SHIFT, nr << PAGE_SHIFT, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                1)   # PRESERVE: keep what was loaded while shared

    def _source_page(self, source, k: int, gpa: int, what: str):
        """Page ``k`` of a populate source: bytes, or None for in place."""
        if source is None:
            return None
        if isinstance(source, GmemRange):
            off = source.offset + (k << PAGE_SHIFT)
            g = source.gmem
            if off % PAGE_SIZE or off + PAGE_SIZE > g.size:
                raise GmemError(errno.EFAULT, f"{what}: source guest_memfd offset {off:#x} is not a "
                                              "page inside the file")
            if K.get_word(g._n2, g._n1, g._w0, off >> PAGE_SHIFT) & K.PRIV:
                raise GmemError(errno.EFAULT, f"{what}: source guest_memfd page {off:#x} is private "
                                              "(the host cannot read it)")
            g._fault_in(off >> PAGE_SHIFT, (off >> PAGE_SHIFT) + 1, K.HMAP)
            return g._page_data(off >> PAGE_SHIFT)
        mv = memoryview(source).cast("B")
        a = k << PAGE_SHIFT
        if a + PAGE_SIZE > len(mv):
            raise GmemError(errno.EFAULT, f"{what}: source buffer ends at byte {len(mv)}, page {k} "
                                          "needs more")
        return bytes(mv[a:a + PAGE_SIZE])

    def _finalize(self) -> None:
        self.finalized = True
        for g in self.gmems:
            g._set_finalized()

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

    def guest_accept(self, gpa, size, *, chunk=2 << 20) -> int:
        """The guest accepts (TDX ``TDG.MEM.PAGE.ACCEPT``) or validates (SNP ``PVALIDATE``)
        its private memory ``[gpa, gpa+size)`` in ``chunk``-sized pieces (4 KiB or 2 MiB).

        Pages are faulted in (allocated), mapped in the guest and moved to the trusted
        entity's accepted state; each chunk costs an exit and the platform's calls.
        Returns the chunks that did work. A shared page is a memory-fault exit.
        """
        gpa = as_int(gpa, "gpa")
        size = as_int(size, "size")
        chunk = as_int(chunk, "chunk")
        if chunk not in (PAGE_SIZE, 2 << 20):
            raise GmemError(errno.EINVAL, f"accept chunk {chunk:#x}: must be 4 KiB or 2 MiB")
        check_range(gpa, size, _MAX_GPA, "guest accept")
        if gpa % chunk or size % chunk:
            raise GmemError(errno.EINVAL, f"guest accept [{gpa:#x}, +{size:#x}) is not aligned to "
                                          f"the {chunk >> 10} KiB chunk")
        pieces = self._pieces(gpa, size)
        self._check_view(pieces, True)
        state = {"tdx": _SEPT_MAPPED, "snp": _RMP_VALIDATED}.get(self.vm_type, 0)
        total = 0
        for ms, a, n in pieces:
            p0 = (ms.gmem_offset + a - ms.gpa) >> PAGE_SHIFT
            total += ms.gmem._accept(p0, p0 + (n >> PAGE_SHIFT), chunk >> PAGE_SHIFT, state)
        return total

    # ---------------------------------------------------------------- guest access
    def _check_view(self, pieces, private: bool):
        for ms, gpa, n in pieces:
            first = gpa & ~(PAGE_SIZE - 1)
            last = (gpa + n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            if self.in_place:
                g = ms.gmem
                p0 = (ms.gmem_offset + first - ms.gpa) >> PAGE_SHIFT
                p1 = p0 + ((last - first) >> PAGE_SHIFT)
                cval = 0 if private else K.PRIV   # look for a page with the other view
                bad = K.walk_first(g._n2, g._n1, g._w0, p0, p1, K.PRIV, cval)
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
            if private or self.in_place:
                off = ms.gmem_offset + a - ms.gpa
                out.append(ms.gmem._guest_read(off >> PAGE_SHIFT, off, n))
            else:
                out.append(self._shared_read(a, n))
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
            if private or self.in_place:
                ms.gmem._guest_write(ms.gmem_offset + a - ms.gpa, mv[pos:pos + n])
            else:
                self._shared_write(a, mv[pos:pos + n])
            pos += n

    def _shared_read(self, gpa: int, n: int) -> bytes:
        out = bytearray()
        end = gpa + n
        while gpa < end:
            gfn = gpa >> PAGE_SHIFT
            s = gpa & (PAGE_SIZE - 1)
            k = min(end - gpa, PAGE_SIZE - s)
            page = self._shared_mem.get(gfn)
            out += page[s:s + k] if page is not None else bytes(k)
            gpa += k
        return bytes(out)

    def _shared_write(self, gpa: int, mv) -> None:
        end = gpa + len(mv)
        pos = 0
        while gpa < end:
            gfn = gpa >> PAGE_SHIFT
            s = gpa & (PAGE_SIZE - 1)
            k = min(end - gpa, PAGE_SIZE - s)
            page = bytearray(self._shared_mem.get(gfn, bytes(PAGE_SIZE)))
            page[s:s + k] = mv[pos:pos + k]
            self._shared_mem[gfn] = bytes(page)
            gpa += k
            pos += k

    def __repr__(self):
        mode = "in-place" if self.in_place else "legacy"
        return f"VM({self.vm_type!r}, {mode}, {len(self.memslots)} memslots)"
