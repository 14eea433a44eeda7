"""VM: memslots, the legacy per-VM attribute store, and guest accesses."""
from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from . import _kernels as K
from ._layout import COUNTER_NAMES, NCOUNTERS
from .errors import GmemError, MemoryFaultExit, MmioExit
from .units import PAGE_SHIFT, PAGE_SIZE, as_int, check_range

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
_VM_TYPES = ("sw-protected", "snp", "tdx")
_MAX_GPA = 1 << 52


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
                for page in range(first >> PAGE_SHIFT, last >> PAGE_SHIFT):
                    if (page in self._attrs) != private:
                        raise MemoryFaultExit(page << PAGE_SHIFT, PAGE_SIZE, private)

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
