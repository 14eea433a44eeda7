"""GuestMemfd: one guest_memfd file, its pages, and the operations that change them."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from . import _kernels as K
from ._layout import COUNTER_INDEX as _COUNTER_INDEX
from ._layout import COUNTER_NAMES, NCOUNTERS
from .errors import GmemError, SigBusError
from .units import PAGE_SHIFT, PAGE_SIZE, as_int, check_range, format_size, parse_size

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GUEST_MEMFD_FLAG_NO_DIRECT_MAP = 1 << 2
GUEST_MEMFD_FLAG_HUGETLB = 1 << 3
_KNOWN_FLAGS = 0xF

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE = 1 << 0
KVM_SET_MEMORY_ATTRIBUTES2_ZERO = 1 << 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

VM_TYPES = {"sw-protected": K.VM_SW, "snp": K.VM_SNP, "tdx": K.VM_TDX}
DIRECT_MAP_POLICIES = {"keep": K.DMAP_KEEP, "no-direct-map": K.DMAP_NONE,
                       "on-conversion": K.DMAP_ONCONV}
MERGE_POLICIES = {"eager": 1, "never": 0}
_ZERO_PAGE = bytes(PAGE_SIZE)
_STATE_MAGIC = "gmemfast-guest-memfd-state"
_STATE_VERSION = 1
_POOL_FIRST_BYTES = 1 << 30   # address space first reserved per pool (see _grow)
_MAX_SIZE = 1 << 57     # 128 PiB: far beyond any guest, keeps page indices in int64


@dataclass(frozen=True)
class BatchResult:
    """One result per item of a batched call: ``errno`` 0 means done."""
    errno: np.ndarray          # int32
    error_offset: np.ndarray   # int64, -1 where the kernel reports no offset

    @property
    def ok(self) -> bool:
        return not self.errno.any()

    def __len__(self):
        return len(self.errno)


class Pin:
    """A long-term pin (GUP with FOLL_LONGTERM) on pages of a guest_memfd."""

    __slots__ = ("gmem", "offset", "size", "released")

    def __init__(self, gmem: "GuestMemfd", offset: int, size: int):
        self.gmem = gmem
        self.offset = offset
        self.size = size
        self.released = False

    def release(self) -> None:
        """Drop the pin; releasing twice is ``EINVAL``."""
        self.gmem._unpin(self)

    def __repr__(self):
        state = "released" if self.released else "held"
        return f"Pin(offset={self.offset:#x}, size={self.size:#x}, {state})"


class HostMapping:
    """One process's ``mmap`` of the file (a forked child has its own).

    Reads and writes fault pages in exactly like ``GuestMemfd.host_read``/``host_write``;
    conversion to private zaps every process's mappings.
    """

    def __init__(self, gmem: "GuestMemfd"):
        self.gmem = gmem

    def read(self, offset: int, size: int) -> bytes:
        return self.gmem.host_read(offset, size)

    def write(self, offset: int, data) -> None:
        self.gmem.host_write(offset, data)


def _policy(value, table, name):
    if value not in table:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(repr, table))}")
    return table[value]


class GuestMemfd:
    """One guest_memfd (``KVM_CREATE_GUEST_MEMFD``), modelled page by page.

    ``size`` accepts bytes or a human size (``"1T"``). ``flags`` are the kernel's
    ``GUEST_MEMFD_FLAG_*``; ``page_order`` is the backing folio order (0, or 9 / 18 with
    ``GUEST_MEMFD_FLAG_HUGETLB``). Policies (keyword arguments):

    ``direct_map``: ``"keep"`` (default), ``"no-direct-map"`` (default with
    ``GUEST_MEMFD_FLAG_NO_DIRECT_MAP``) or ``"on-conversion"``; ``merge``: ``"eager"``
    (huge folios re-merge on conversion to private) or ``"never"``; ``metadata_limit``:
    the most shareability ranges the per-file store may hold (``ENOMEM`` past it), or
    ``None``; ``content_modes``: whether ``PRESERVE``/``ZERO`` flags are accepted.
    """

    def __init__(self, size, flags=0, *, page_order=0, vm_type="sw-protected",
                 direct_map=None, merge="eager", metadata_limit=None, content_modes=True,
                 _vm=None, **vm_policies):
        size = parse_size(size)
        flags = as_int(flags, "flags")
        page_order = as_int(page_order, "page_order")
        vmt = _policy(vm_type, VM_TYPES, "vm_type")
        if flags & ~_KNOWN_FLAGS:
            raise GmemError(errno.EINVAL, f"unknown guest_memfd flags {flags & ~_KNOWN_FLAGS:#x}")
        hugetlb = bool(flags & GUEST_MEMFD_FLAG_HUGETLB)
        if hugetlb and page_order not in (9, 18):
            raise GmemError(errno.EINVAL, f"page_order {page_order} with HUGETLB: must be 9 (2 MiB) or 18 (1 GiB)")
        if not hugetlb and page_order != 0:
            raise GmemError(errno.EINVAL, f"page_order {page_order} needs GUEST_MEMFD_FLAG_HUGETLB (else 0)")
        unit = PAGE_SIZE << page_order
        if size <= 0 or size % unit or size > _MAX_SIZE:
            raise GmemError(errno.EINVAL, f"size {size:#x} is not a positive multiple of {format_size(unit)}"
                            + (" (the huge page size)" if hugetlb else ""))
        if flags & GUEST_MEMFD_FLAG_INIT_SHARED and not flags & GUEST_MEMFD_FLAG_MMAP:
            raise GmemError(errno.EINVAL, "GUEST_MEMFD_FLAG_INIT_SHARED needs GUEST_MEMFD_FLAG_MMAP")
        if hugetlb and flags & GUEST_MEMFD_FLAG_INIT_SHARED:
            raise GmemError(errno.EINVAL, "GUEST_MEMFD_FLAG_HUGETLB cannot be INIT_SHARED: huge folios are private")
        if direct_map is None:
            direct_map = "no-direct-map" if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP else "keep"
        dmap = _policy(direct_map, DIRECT_MAP_POLICIES, "direct_map policy")
        if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP and dmap == K.DMAP_KEEP:
            raise GmemError(errno.EINVAL, "GUEST_MEMFD_FLAG_NO_DIRECT_MAP contradicts direct_map='keep'")
        mrg = _policy(merge, MERGE_POLICIES, "merge policy")
        if metadata_limit is not None:
            metadata_limit = as_int(metadata_limit, "metadata_limit")
            if metadata_limit < 1:
                raise ValueError(f"metadata_limit {metadata_limit} must be at least 1 (or None)")
        if _vm is not None and not _vm.in_place and flags & GUEST_MEMFD_FLAG_MMAP and vmt != K.VM_SW:
            raise GmemError(errno.EINVAL, "a CoCo VM in legacy (not in-place) mode cannot mmap guest_memfd")
        own_vm = _vm is None
        if own_vm:
            from .vm import VM  # a file made directly behaves as bound to a VM of its type
            _vm = VM(vm_type, **vm_policies)
        elif vm_policies:
            raise TypeError(f"unexpected policies {sorted(vm_policies)}: set them on the VM")

        self.size = size
        self.flags = flags
        self.page_order = page_order
        self.vm_type = vm_type
        self.nr_pages = size >> PAGE_SHIFT
        self._coco = vmt != K.VM_SW     # converted pages read as zeroes by default
        self._vm = _vm
        self._policies = dict(direct_map=direct_map, merge=merge,
                              metadata_limit=metadata_limit, content_modes=bool(content_modes))
        nl2 = -(-self.nr_pages // K.N2)
        initw = K.PRIV if not flags & GUEST_MEMFD_FLAG_INIT_SHARED else 0
        self._n2 = np.zeros((nl2, K.NF), np.int64)
        self._n2[:, K.F_WORD] = initw
        self._n2[:, K.F_CHILD] = -1
        self._n2[:, K.F_CNT + 1] = K.N2 if initw else 0
        self._n1 = np.zeros((0, K.NF), np.int64)
        self._w0 = np.zeros(0, np.uint16)
        meta = np.zeros(K.META_SIZE, np.int64)
        meta[K.M_FREE1] = meta[K.M_FREE0] = -1
        meta[K.M_LIMIT] = -1 if metadata_limit is None else metadata_limit
        meta[K.M_NPAGES] = self.nr_pages
        meta[K.M_ORDER] = page_order
        meta[K.M_DMAP] = dmap
        meta[K.M_MERGE] = mrg
        meta[K.M_VMTYPE] = vmt
        meta[K.M_HUGETLB] = int(hugetlb)
        meta[K.M_CONTENT_MODES] = int(bool(content_modes))
        meta[K.M_TAIL] = nl2 * K.N2 - self.nr_pages
        meta[K.M_INITW] = initw
        meta[K.M_GCNT + 1] = nl2 * K.N2 if initw else 0
        self._meta = meta
        self._data: dict[int, bytes] = {}     # page -> 4096 bytes; valid only with DATA set
        self._pins: dict[int, int] = {}       # page -> long-term pins
        self._pin_handles: list[Pin] = []
        self._grow()
        if own_vm:
            _vm.gmems.append(self)

    # ---------------------------------------------------------------- pools
    def _grow(self):
        """Make sure every pool has ``RESERVE`` free tables (kernels never allocate).

        The first allocation reserves room for as many tables as the file could ever
        need, up to a bound: the pools are zero-filled with ``calloc``, so pages of them
        that are never used cost address space, not memory, and never need copying.
        """
        meta = self._meta
        f1, f0 = K.free_tables(meta)
        if f1 < K.RESERVE:
            cap = max(2 * int(meta[K.M_CAP1]), int(meta[K.M_USED1]) + 2 * K.RESERVE)
            if meta[K.M_CAP1] == 0:
                cap = max(cap, min(len(self._n2), _POOL_FIRST_BYTES // (K.N1 * K.NF * 8)) + K.RESERVE)
            n1 = np.zeros((cap * K.N1, K.NF), np.int64)
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

    def _state(self):
        self._grow()
        return self._n2, self._n1, self._w0, self._meta

    # ---------------------------------------------------------------- queries
    @property
    def counters(self) -> Mapping[str, int]:
        """Cumulative work done on this file, by counter name (SPEC section 6)."""
        return MappingProxyType(dict(zip(COUNTER_NAMES, self._meta[:NCOUNTERS].tolist())))

    @property
    def policies(self) -> Mapping[str, object]:
        return MappingProxyType(dict(self._policies))

    def _page_range(self, offset, size):
        return check_range(offset, size, self.size)

    def is_private(self, offset, size=PAGE_SIZE) -> bool:
        """True if every page of the range is private (as tracked by guest_memfd)."""
        p0, p1 = self._page_range(offset, size)
        return K.walk_count(self._n2, self._n1, self._w0, p0, p1, K.PRIV, K.PRIV) == p1 - p0

    def private_pages(self, offset=0, size=None) -> int:
        """Number of private pages in the range (the whole file by default)."""
        if size is None:
            size = self.size - as_int(offset, "offset")
        p0, p1 = self._page_range(offset, size)
        return int(K.walk_count(self._n2, self._n1, self._w0, p0, p1, K.PRIV, K.PRIV))

    def allocated_pages(self, offset=0, size=None) -> int:
        if size is None:
            size = self.size - as_int(offset, "offset")
        p0, p1 = self._page_range(offset, size)
        return int(K.walk_count(self._n2, self._n1, self._w0, p0, p1, K.ALLOC, K.ALLOC))

    def folio_order(self, offset) -> int:
        """Order of the folio holding ``offset`` (0, 9 or 18), or -1 for a hole."""
        offset = as_int(offset, "offset")
        if not 0 <= offset < self.size:
            raise GmemError(errno.EINVAL, f"offset {offset:#x} is outside the file (size {self.size:#x})")
        w = K.get_word(self._n2, self._n1, self._w0, offset >> PAGE_SHIFT)
        return _word_order(int(w))

    def huge_folios(self) -> int:
        """Number of huge folios (of the backing order) in the file."""
        if self.page_order == 0:
            return 0
        return int(K.gcount(self._meta, 7)) >> self.page_order

    @property
    def attribute_ranges(self) -> int:
        """Maximal runs of equal shareability: the entries of the per-file store."""
        return int(K.attribute_ranges(self._n2, self._n1, self._w0, self._meta))

    def direct_map_entries(self) -> dict:
        """Kernel direct-map entries covering the file, by size (fragmentation)."""
        e1g, e2m, e4k = K.dmap_entries(self._n2, self._n1, self.nr_pages)
        return {"1G": int(e1g), "2M": int(e2m), "4K": int(e4k)}

    def memory_footprint(self) -> int:
        """Bytes of page state held (summaries, tables in use, contents)."""
        m = self._meta
        return int(self._n2.nbytes + m[K.M_USED1] * K.N1 * K.NF * 8 + m[K.M_USED0] * K.N1 * 2
                   + len(self._data) * PAGE_SIZE)

    def page_words(self, offset=0, size=None) -> np.ndarray:
        """The raw state words (see ``gmemfast._layout``) of the pages of a range."""
        if size is None:
            size = self.size - as_int(offset, "offset")
        p0, p1 = self._page_range(offset, size)
        out = np.empty(p1 - p0, np.int64)
        K.get_words(self._n2, self._n1, self._w0, p0, p1, out)
        return out

    def dump(self) -> dict:
        """Complete observable state, page by page (for checking; O(pages))."""
        w = self.page_words()
        alloc = (w & K.ALLOC) != 0
        pins = np.zeros(self.nr_pages, np.int64)
        for p, c in self._pins.items():
            pins[p] = c
        order = np.where(alloc, np.where(w & K.GIG, 18, np.where(w & K.HUGE, 9, 0)), -1)
        refcount = np.where(alloc, 1 + pins, 0)   # pinned pages are always order-0 folios
        contents = {}
        for p in np.flatnonzero(w & K.DATA).tolist():
            b = self._data.get(p)
            if b is not None and any(b):
                contents[p] = b
        return {
            "size": self.size,
            "page_order": self.page_order,
            "private": (w & K.PRIV) != 0,
            "allocated": alloc,
            "host_mapped": (w & K.HMAP) != 0,
            "pins": pins,
            "folio_order": order,
            "refcount": refcount,
            "direct_map_removed": (w & K.DMAP_OFF) != 0,
            "contents": contents,
            "direct_map_entries": self.direct_map_entries(),
            "attribute_ranges": self.attribute_ranges,
        }

    def check(self) -> None:
        """Verify every invariant; raise ``AssertionError`` naming the broken one."""
        rule, page = K.check_tree(self._n2, self._n1, self._w0, self._meta)
        if rule:
            raise AssertionError(f"page-state invariant {rule} ({_RULES.get(rule, '?')}) "
                                 f"broken at page {page} (offset {page << PAGE_SHIFT:#x})")
        pinned = self.page_words() & K.PIN if self.nr_pages <= 1 << 22 else None
        if pinned is not None:
            bits = set(np.flatnonzero(pinned).tolist())
            if bits != {p for p, c in self._pins.items() if c > 0}:
                raise AssertionError("page-state invariant: PIN bits disagree with the pin counts")
        elif int(K.gcount(self._meta, 4)) != len(self._pins):
            raise AssertionError("page-state invariant: PIN bits disagree with the pin counts")
        held = {}
        for pin in self._pin_handles:
            for p in range(pin.offset >> PAGE_SHIFT, (pin.offset + pin.size) >> PAGE_SHIFT):
                held[p] = held.get(p, 0) + 1
        if held != self._pins:
            raise AssertionError("page-state invariant: pin handles disagree with the pin counts")
        for p in self._data:
            if p >= self.nr_pages:
                raise AssertionError(f"page-state invariant: contents stored past the end at page {p}")

    # ---------------------------------------------------------------- faults
    def inject_enomem(self, n: int = 1) -> None:
        """Make the next ``n`` metadata reservations (conversions) fail with ``ENOMEM``."""
        n = as_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        self._meta[K.M_ENOMEM] = n

    # ---------------------------------------------------------------- fallocate
    def fallocate(self, mode, offset, size) -> None:
        """``fallocate(2)``: allocate (``KEEP_SIZE``) or punch a hole (``KEEP_SIZE|PUNCH_HOLE``)."""
        mode = as_int(mode, "mode")
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise GmemError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} lacks FALLOC_FL_KEEP_SIZE")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise GmemError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} has unsupported bits "
                                              f"{mode & ~3:#x}")
        p0, p1 = check_range(offset, size, self.size, "fallocate", allow_past_end=True)
        if mode & FALLOC_FL_PUNCH_HOLE:
            p1 = min(p1, self.nr_pages)
            if p0 >= p1:
                return
            err, pg = K.punch(*self._state(), p0, p1)
            if err:
                raise GmemError(err, f"punch hole [{offset:#x}, {offset + size:#x}): page at "
                                     f"{pg << PAGE_SHIFT:#x} is pinned", pg << PAGE_SHIFT)
            self._gc_data()
            return
        if p1 > self.nr_pages:
            raise GmemError(errno.EINVAL, f"fallocate [{offset:#x}, {offset + size:#x}) goes past "
                                          f"the end ({self.size:#x})")
        self._meta[K.C_FALLOCATE_CALLS] += 1
        K.allocate(*self._state(), p0, p1)

    # ---------------------------------------------------------------- host access
    def _require_mmap(self):
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise GmemError(errno.ENODEV, "guest_memfd was created without GUEST_MEMFD_FLAG_MMAP: "
                                          "no host access")

    def _host_fault(self, offset: int, nbytes: int, what: str):
        """Check then fault in the pages of a host access; return its page range."""
        self._require_mmap()
        offset = as_int(offset, "offset")
        if offset < 0 or nbytes < 0:
            raise GmemError(errno.EINVAL, f"{what}: negative offset {offset} or size {nbytes}")
        p0 = offset >> PAGE_SHIFT
        p1 = (offset + nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
        inside = min(p1, self.nr_pages)
        if p0 < inside:
            f = K.walk_first(self._n2, self._n1, self._w0, p0, inside, K.PRIV, K.PRIV)
            if f >= 0:
                raise SigBusError(f"{what} at {offset:#x}: page {f << PAGE_SHIFT:#x} is private",
                                  f << PAGE_SHIFT)
        if p1 > self.nr_pages:
            bad = max(p0, self.nr_pages) << PAGE_SHIFT
            raise SigBusError(f"{what} at {offset:#x}: page {bad:#x} is at or past the end "
                              f"({self.size:#x})", bad)
        self._fault_in(p0, p1, K.HMAP)
        return p0, p1

    def _page_bytes(self, p: int, word: int) -> bytes:
        if word & K.DATA:
            return self._data.get(p, _ZERO_PAGE)
        return _ZERO_PAGE

    def host_write(self, offset, data) -> None:
        """Write through the host mapping; ``SigBusError`` if any page is private or past
        the end (then nothing is written)."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n == 0:
            self._require_mmap()
            return
        p0, p1 = self._host_fault(offset, n, "host write")
        self._store(offset, mv, p0, p1)

    def _store(self, offset: int, mv, p0: int, p1: int):
        words = np.empty(p1 - p0, np.int64)
        K.get_words(self._n2, self._n1, self._w0, p0, p1, words)
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
                page = bytearray(self._page_bytes(p, int(words[idx])))
                page[a - start:b - start] = mv[pos:pos + b - a]
                self._data[p] = bytes(page)
            pos += b - a
        K.walk_apply(*self._state(), p0, p1, K.DATA, 0, 0, K.DATA)
        self._gc_data()

    def host_read(self, offset, size) -> bytes:
        """Read through the host mapping; ``SigBusError`` on a private page or past the end."""
        size = as_int(size, "size")
        if size == 0:
            self._require_mmap()
            return b""
        p0, p1 = self._host_fault(offset, size, "host read")
        return self._load(offset, size, p0, p1)

    def _load(self, offset: int, size: int, p0: int, p1: int) -> bytes:
        words = np.empty(p1 - p0, np.int64)
        K.get_words(self._n2, self._n1, self._w0, p0, p1, words)
        if not (words & K.DATA).any():
            return bytes(size)
        buf = b"".join(self._page_bytes(p0 + i, int(words[i])) for i in range(p1 - p0))
        s = offset - (p0 << PAGE_SHIFT)
        return buf[s:s + size]

    def mmap(self) -> HostMapping:
        """A new host mapping of the file (another process, e.g. a forked child)."""
        self._require_mmap()
        return HostMapping(self)

    def _gc_data(self):
        """Drop stored bytes of pages that were zeroed or freed (their DATA bit is clear)."""
        live = int(K.gcount(self._meta, 5))
        if len(self._data) <= 2 * live + 64:
            return
        for p in list(self._data):
            if p >= self.nr_pages or not K.get_word(self._n2, self._n1, self._w0, p) & K.DATA:
                del self._data[p]

    # ---------------------------------------------------------------- pins
    def pin(self, offset, size=PAGE_SIZE) -> Pin:
        """Long-term pin (GUP ``FOLL_LONGTERM``): faults pages in and raises their folio's
        reference count. ``EFAULT`` on a private page or past the end."""
        offset = as_int(offset, "offset")
        size = as_int(size, "size")
        if size <= 0 or offset < 0 or offset % PAGE_SIZE or size % PAGE_SIZE:
            raise GmemError(errno.EINVAL, f"pin [{offset:#x}, +{size:#x}): offset and size must be "
                                          "page aligned and size positive")
        self._require_mmap()
        p0, p1 = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
        if p1 > self.nr_pages:
            raise GmemError(errno.EFAULT, f"pin [{offset:#x}, {offset + size:#x}) goes past the end "
                                          f"({self.size:#x})")
        f = K.walk_first(self._n2, self._n1, self._w0, p0, p1, K.PRIV, K.PRIV)
        if f >= 0:
            raise GmemError(errno.EFAULT, f"pin: page {f << PAGE_SHIFT:#x} is private")
        self._fault_in(p0, p1, K.HMAP)
        for p in range(p0, p1):
            self._pins[p] = self._pins.get(p, 0) + 1
        K.walk_apply(*self._state(), p0, p1, K.PIN, 0, 0, K.PIN)
        self._meta[K.C_PINS] += p1 - p0
        pin = Pin(self, offset, size)
        self._pin_handles.append(pin)
        return pin

    def _unpin(self, pin: Pin):
        if pin.released:
            raise GmemError(errno.EINVAL, f"pin [{pin.offset:#x}, +{pin.size:#x}) was already released")
        pin.released = True
        self._pin_handles.remove(pin)
        p0, p1 = pin.offset >> PAGE_SHIFT, (pin.offset + pin.size) >> PAGE_SHIFT
        for p in range(p0, p1):
            c = self._pins[p] - 1
            if c:
                self._pins[p] = c
            else:
                del self._pins[p]
                K.walk_apply(*self._state(), p, p + 1, K.PIN, K.PIN, K.PIN, 0)
        self._meta[K.C_UNPINS] += p1 - p0

    @property
    def pins(self) -> tuple:
        """The pins currently held (they survive ``save``/``load``)."""
        return tuple(self._pin_handles)

    # ---------------------------------------------------------------- conversion
    def _zero_mode(self, attributes, flags):
        """Validate content flags; return whether converted pages are zeroed."""
        if flags & ~(KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE | KVM_SET_MEMORY_ATTRIBUTES2_ZERO):
            raise GmemError(errno.EINVAL, f"unknown KVM_SET_MEMORY_ATTRIBUTES2 flags {flags & ~3:#x}")
        if flags == 3:
            raise GmemError(errno.EINVAL, "PRESERVE and ZERO together: at most one content mode")
        if flags and not self._policies["content_modes"]:
            raise GmemError(errno.EINVAL, f"content mode flags {flags:#x} are disabled by policy")
        if flags == KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE and self._meta[K.M_VMTYPE] != K.VM_SW:
            if not attributes:
                raise GmemError(errno.EINVAL, f"PRESERVE to shared is not allowed on {self.vm_type}: "
                                              "the host may never see guest plaintext")
            if self._meta[K.M_FINALIZED]:
                raise GmemError(errno.EINVAL, f"PRESERVE on {self.vm_type} is allowed only before "
                                              "the VM is finalized")
        if flags == KVM_SET_MEMORY_ATTRIBUTES2_ZERO:
            return True
        return flags == 0 and self._meta[K.M_VMTYPE] != K.VM_SW

    def set_memory_attributes(self, offset, size, attributes, flags=0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES2`` on this file (in-place conversion).

        ``attributes`` is ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` or 0. Raises ``GmemError``
        with ``EINVAL`` (bad arguments), ``ENOMEM`` or ``EAGAIN`` (with ``error_offset``);
        a failed call changes nothing but zapped host mappings.
        """
        if (type(offset) is int and type(size) is int and type(attributes) is int
                and flags == 0 and type(flags) is int and self._vm.in_place
                and not (offset | size) & 4095 and 0 <= offset < self.size
                and 0 < size <= self.size - offset and (attributes | 8) == 8):
            # the common case, validated inline: this call is the hot path of simulations
            err = -2
            if size == 4096:
                err, pg = K.convert_page(self._n2, self._n1, self._w0, self._meta, offset >> 12,
                                         attributes != 0, self._coco)
            if err == -2:
                err, pg = K.convert(self._n2, self._n1, self._w0, self._meta, offset >> 12,
                                    (offset + size) >> 12, attributes != 0, self._coco)
            if not err:
                return
            if err > 0:
                self._raise_convert(err, pg, offset, size, attributes)
        self._set_memory_attributes(offset, size, attributes, flags)

    def _set_memory_attributes(self, offset, size, attributes, flags):
        try:
            if not self._vm.in_place:
                raise GmemError(errno.ENOTTY, "guest_memfd conversion needs an in-place VM; this VM "
                                              "keeps attributes per GFN (KVM_SET_MEMORY_ATTRIBUTES)")
            attributes = as_int(attributes, "attributes")
            flags = as_int(flags, "flags")
            if attributes & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
                raise GmemError(errno.EINVAL, f"unknown memory attributes {attributes & ~8:#x}")
            p0, p1 = check_range(offset, size, self.size, "set_memory_attributes")
            zero = self._zero_mode(attributes, flags)
        except GmemError:
            self._meta[K.C_CONVERT_EINVAL] += 1
            raise
        n2, n1, w0, meta = self._state()
        err, pg = -2, -1
        if p1 == p0 + 1:
            err, pg = K.convert_page(n2, n1, w0, meta, p0, attributes != 0, zero)
        if err == -2:
            err, pg = K.convert(n2, n1, w0, meta, p0, p1, attributes != 0, zero)
        if err:
            self._raise_convert(err, pg, offset, size, attributes)
        if zero and len(self._data) > 64:
            self._gc_data()

    def _raise_convert(self, err, pg, offset, size, attributes):
        kind = "private" if attributes else "shared"
        if err == errno.EAGAIN:
            msg = (f"converting [{offset:#x}, {offset + size:#x}) to {kind}: folio at "
                   f"{pg << PAGE_SHIFT:#x} has extra references (pinned)")
        else:
            msg = (f"converting [{offset:#x}, {offset + size:#x}) to {kind}: out of memory for "
                   "attribute metadata")
        raise GmemError(int(err), msg, int(pg) << PAGE_SHIFT)

    def set_memory_attributes_many(self, offsets, sizes, attributes, flags=0) -> BatchResult:
        """Many conversions in one call, applied in order, each with its own result.

        Arguments are integer arrays (or scalars, broadcast). Never raises for a bad item:
        its ``errno`` says why. ``TypeError`` for non-integer input.
        """
        offs = _int_array(offsets, "offsets")
        n = offs.shape[0] if offs.ndim else 1
        offs = np.broadcast_to(offs, (n,))
        cols = [np.ascontiguousarray(np.broadcast_to(_int_array(v, name), (n,)))
                for v, name in ((sizes, "sizes"), (attributes, "attributes"), (flags, "flags"))]
        offs = np.ascontiguousarray(offs)
        out_err = np.zeros(n, np.int32)
        out_off = np.full(n, -1, np.int64)
        if not self._vm.in_place:
            out_err[:] = errno.ENOTTY
            self._meta[K.C_CONVERT_EINVAL] += n
            return BatchResult(out_err, out_off)
        preserve_ok = not self._meta[K.M_FINALIZED]
        x = 0
        while x < n:
            n2, n1, w0, meta = self._state()
            x = K.convert_many(n2, n1, w0, meta, offs, cols[0], cols[1], cols[2], x,
                               out_err, out_off, self.size, preserve_ok)
        if len(self._data) > 64:
            self._gc_data()
        return BatchResult(out_err, out_off)

    # ---------------------------------------------------------------- guest side
    def _fault_in(self, p0: int, p1: int, bit: int) -> None:
        """Fault ``[p0, p1)`` into the host (``HMAP``) or guest (``GMAP``) mappings,
        allocating holes first."""
        K.allocate(*self._state(), p0, p1)
        n = K.walk_apply(*self._state(), p0, p1, bit, 0, 0, bit)
        if bit == K.HMAP:
            self._meta[K.C_HOST_FAULTS] += n

    def _guest_fault(self, p0: int, p1: int):
        self._fault_in(p0, p1, K.GMAP)

    def _guest_read(self, p0: int, offset: int, size: int) -> bytes:
        p1 = (offset + size + PAGE_SIZE - 1) >> PAGE_SHIFT
        self._guest_fault(p0, p1)
        return self._load(offset, size, p0, p1)

    def _guest_write(self, offset: int, mv) -> None:
        p0 = offset >> PAGE_SHIFT
        p1 = (offset + len(mv) + PAGE_SIZE - 1) >> PAGE_SHIFT
        self._guest_fault(p0, p1)
        self._store(offset, mv, p0, p1)

    # ---------------------------------------------------------------- trusted entity
    # What the platform adapters (platforms/snp.py, platforms/tdx.py) use: they never
    # touch the store's arrays themselves.
    def te_states(self, offset=0, size=None) -> np.ndarray:
        """Trusted-entity state of each page of a range (``gmemfast._layout.TE_*``)."""
        return (self.page_words(offset, size) & K.TE_MASK) >> K.TE_SHIFT

    def _te_page(self, p: int) -> int:
        return (int(K.get_word(self._n2, self._n1, self._w0, p)) & K.TE_MASK) >> K.TE_SHIFT

    def _te_set(self, p0: int, p1: int, state: int, *, guest_mapped: bool = False) -> None:
        """Move allocated private pages of ``[p0, p1)`` to trusted-entity ``state``."""
        setb = (state << K.TE_SHIFT) | (K.GMAP if guest_mapped else 0)
        K.walk_apply(*self._state(), p0, p1, 0, 0, K.TE_MASK, setb)

    def _allocate(self, p0: int, p1: int) -> None:
        K.allocate(*self._state(), p0, p1)

    def _page_data(self, p: int) -> bytes:
        """A page's bytes as the platform (firmware, not the host) sees them."""
        return self._page_bytes(p, int(K.get_word(self._n2, self._n1, self._w0, p)))

    def _set_page_data(self, p: int, data) -> None:
        """Store a page's bytes (``None``: zero the page, counted as zeroing)."""
        if data is None:
            K.walk_apply(*self._state(), p, p + 1, K.DATA, K.DATA, K.DATA, 0)
            self._meta[K.C_PAGES_ZEROED] += 1
            self._meta[K.C_BYTES_ZEROED_4K] += PAGE_SIZE
            return
        self._data[p] = bytes(data)
        K.walk_apply(*self._state(), p, p + 1, K.DATA, 0, 0, K.DATA)

    def _count(self, name: str, n: int = 1) -> None:
        self._meta[_COUNTER_INDEX[name]] += n

    def _accept(self, p0: int, p1: int, chunk_pages: int, te_state: int) -> int:
        K.allocate(*self._state(), p0, p1)
        return int(K.accept(*self._state(), p0, p1, chunk_pages, te_state))

    def _set_finalized(self) -> None:
        self._meta[K.M_FINALIZED] = 1

    # ---------------------------------------------------------------- persistence
    def _arrays(self) -> dict:
        m = self._meta
        data_pages = np.array(sorted(p for p in self._data
                                     if K.get_word(self._n2, self._n1, self._w0, p) & K.DATA),
                              np.int64)
        blob = np.frombuffer(b"".join(self._data[p] for p in data_pages.tolist()), np.uint8)
        pin_list = np.array([[h.offset, h.size] for h in self._pin_handles], np.int64).reshape(-1, 2)
        return {
            "n2": self._n2,
            "n1": self._n1[: int(m[K.M_USED1]) * K.N1],
            "w0": self._w0[: int(m[K.M_USED0]) * K.N1],
            "meta": m,
            "data_pages": data_pages,
            "data_blob": blob,
            "pins": pin_list,
        }

    def _header(self) -> dict:
        return {"magic": _STATE_MAGIC, "version": _STATE_VERSION, "size": self.size,
                "flags": self.flags, "page_order": self.page_order, "vm_type": self.vm_type,
                "in_place": self._vm.in_place, "policies": self._policies}

    def __getstate__(self):
        return {"header": self._header(), "arrays": self._arrays(), "vm": self._vm}

    def __setstate__(self, state):
        self._restore(state["header"], state["arrays"], state.get("vm"))

    def save(self, path) -> None:
        """Save the whole state to one ``.npz`` file (exact round trip with ``load``)."""
        arrays = self._arrays()
        header = self._header()
        header["digest"] = _digest(arrays)
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "GuestMemfd":
        """Load a state saved by ``save``; a damaged or foreign file raises ``ValueError``."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                arrays = {k: z[k] for k in ("n2", "n1", "w0", "meta", "data_pages", "data_blob", "pins")}
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: not a gmemfast guest_memfd state file ({exc})") from None
        if not isinstance(header, dict) or header.get("magic") != _STATE_MAGIC:
            raise ValueError(f"{path}: not a gmemfast guest_memfd state file (wrong magic)")
        if header.get("version") != _STATE_VERSION:
            raise ValueError(f"{path}: state version {header.get('version')} is not supported "
                             f"(this gmemfast reads version {_STATE_VERSION})")
        if header.get("digest") != _digest(arrays):
            raise ValueError(f"{path}: state file is damaged (checksum mismatch)")
        obj = cls.__new__(cls)
        obj._restore(header, arrays, None)
        return obj

    def _restore(self, header, arrays, vm):
        try:
            fresh = GuestMemfd(header["size"], header["flags"], page_order=header["page_order"],
                               vm_type=header["vm_type"], **header["policies"])
        except (KeyError, TypeError, ValueError, GmemError) as exc:
            raise ValueError(f"state header is invalid: {exc}") from None
        self.__dict__.update(fresh.__dict__)
        if vm is not None:
            self._vm = vm
        else:
            self._vm.in_place = bool(header.get("in_place", True))
            self._vm.gmems[:] = [self]
        n2, n1, w0, meta = (np.array(arrays[k]) for k in ("n2", "n1", "w0", "meta"))
        ok = (n2.shape == self._n2.shape and n2.dtype == np.int64 and meta.shape == self._meta.shape
              and meta.dtype == np.int64 and n1.dtype == np.int64 and n1.ndim == 2
              and n1.shape[1] == K.NF and n1.shape[0] == meta[K.M_USED1] * K.N1
              and w0.dtype == np.uint16 and w0.shape[0] == meta[K.M_USED0] * K.N1)
        if not ok:
            raise ValueError("state arrays do not match the header (damaged file)")
        meta[K.M_CAP1] = meta[K.M_USED1]
        meta[K.M_CAP0] = meta[K.M_USED0]
        self._n2, self._n1, self._w0, self._meta = n2, n1, w0, meta
        blob = bytes(np.asarray(arrays["data_blob"], np.uint8))
        pages = np.asarray(arrays["data_pages"]).tolist()
        if len(blob) != len(pages) * PAGE_SIZE:
            raise ValueError("stored contents do not match their page list (damaged file)")
        self._data = {p: blob[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i, p in enumerate(pages)}
        self._pins = {}
        self._pin_handles = []
        for off, sz in np.asarray(arrays["pins"]).reshape(-1, 2).tolist():
            pin = Pin(self, off, sz)
            self._pin_handles.append(pin)
            for p in range(off >> PAGE_SHIFT, (off + sz) >> PAGE_SHIFT):
                self._pins[p] = self._pins.get(p, 0) + 1
        self._grow()
        try:
            self.check()
        except AssertionError as exc:
            raise ValueError(f"state is inconsistent (damaged file): {exc}") from None

    def __repr__(self):
        return (f"GuestMemfd(size={format_size(self.size)}, flags={self.flags:#x}, "
                f"page_order={self.page_order}, vm_type={self.vm_type!r})")


_RULES = {
    1: "host-mapped page must be allocated and shared",
    2: "pinned page must be allocated and shared",
    3: "contents, guest mapping and direct-map removal need an allocated page",
    4: "huge folio must be of the backing order, allocated, private and unpinned",
    5: "policy 'keep' never removes pages from the direct map",
    6: "policy 'no-direct-map' removes exactly the allocated pages",
    7: "policy 'on-conversion' removes exactly the allocated private pages",
    8: "trusted-entity state only on allocated private pages",
    10: "summary counts agree with the pages below them",
    11: "a huge folio covers its whole aligned block",
    12: "pages past the end never change",
    13: "a 2 MiB direct-map split lies under a split 1 GiB entry",
    14: "whole-file counts agree with the block summaries",
    15: "a 2 MiB entry's exception pages are distinct, in range and differ from its word",
}


def _word_order(w: int) -> int:
    if not w & K.ALLOC:
        return -1
    if w & K.GIG:
        return 18
    return 9 if w & K.HUGE else 0


def _int_array(value, name) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, not {arr.dtype}")
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array, not shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
