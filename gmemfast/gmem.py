"""GuestMemfd: one guest_memfd file and the operations on it (docs/model.md §4).

The page state lives in a :class:`~gmemfast._store.PageStore`; this module validates
arguments (each rule once, here), turns the store's results into the kernel's errors,
and keeps what is per file but not per page: the long-term pins and their handles.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from . import persist
from ._layout import (ALLOC, DATA, DMAP_OFF, GIG, GMAP, HMAP, HUGE, INVARIANTS, K_PIN, PIN,
                      PRIV, TE_MASK, TE_SHIFT)
from ._store import ARRAY_NAMES, PageStore, upgrade_meta, word_order
from .errors import GmemError, SigBusError
from .uapi import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_KNOWN_MODES,
                   GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                   GUEST_MEMFD_FLAG_NO_DIRECT_MAP, GUEST_MEMFD_KNOWN_FLAGS,
                   KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_KNOWN_FLAGS,
                   KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE, KVM_SET_MEMORY_ATTRIBUTES2_ZERO, VM_TYPES)
from .units import PAGE_SHIFT, PAGE_SIZE, as_int, check_range, format_size, parse_size
from .units import broadcast_column, check_count

__all__ = ["BatchResult", "GuestMemfd", "HostMapping", "Pin", "conversion_errnos", "zeroes_contents"]

DIRECT_MAP_POLICIES = ("keep", "no-direct-map", "on-conversion")
MERGE_POLICIES = ("eager", "never")
VM_POLICIES = ("populate_converts", "pages_per_populate")   # policies of the VM, not the file
_MAX_SIZE = 1 << 57     # 128 PiB: far beyond any guest, keeps page indices in int64
_PAGE_MASK = PAGE_SIZE - 1
_PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
_PRESERVE = KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
_ZERO = KVM_SET_MEMORY_ATTRIBUTES2_ZERO


@dataclass(frozen=True)
class BatchResult:
    """One result per item of a batched call: ``errno`` 0 means done. ``value`` is what
    the per-call form returns for each item where it returns something (the chunks of
    ``VM.guest_accept_many``), else ``None``."""
    errno: np.ndarray          # int32
    error_offset: np.ndarray   # int64, -1 where the kernel reports no offset
    value: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return not self.errno.any()

    def __len__(self):
        return len(self.errno)


class Pin:
    """A long-term pin (GUP with FOLL_LONGTERM) on pages of a guest_memfd."""

    __slots__ = ("gmem", "offset", "size", "released", "_release")

    def __init__(self, gmem: "GuestMemfd", offset: int, size: int, release):
        self.gmem = gmem
        self.offset = offset
        self.size = size
        self.released = False
        self._release = release

    def release(self) -> None:
        """Drop the pin; releasing twice is ``EINVAL``."""
        self._release(self)

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


class StandaloneBinding:
    """The VM side of a guest_memfd made directly rather than by ``VM.create_guest_memfd``:
    it behaves as bound to an in-place VM of its type that lists only this file."""

    def __init__(self, vm_type: str, policies: dict):
        self.vm_type = vm_type
        self.in_place = True
        self.policies = dict(policies)
        self.gmems: list = []


def _choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(repr, choices))}")
    return value


def int_array(value, name) -> np.ndarray:
    """A batched call's argument as int64 (a scalar or a 1-D array of integers)."""
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, not {arr.dtype}")
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array, not shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def int_column(value, name, n: int, first: str = "offsets") -> np.ndarray:
    """A batched call's argument broadcast to ``n`` items (``units.broadcast_column``): a
    writable, contiguous int64 array (the kernels are compiled for exactly that)."""
    a = broadcast_column(int_array(value, name), n, name, first)
    return a if a.flags.writeable else a.copy()


def conversion_errnos(offsets, sizes, attributes, flags, *, file_size: int, coco: bool,
                      finalized: bool, content_modes: bool) -> np.ndarray:
    """The errno of each conversion's arguments (docs/model.md §4.4 step 1), 0 = valid:
    the vectorised form of :meth:`GuestMemfd.set_memory_attributes`'s checks."""
    o, s, a, f = offsets, sizes, attributes, flags
    einval = ((a & ~_PRIVATE) != 0) | ((f & ~KVM_SET_MEMORY_ATTRIBUTES2_KNOWN_FLAGS) != 0)
    einval |= f == (_PRESERVE | _ZERO)
    einval |= (s <= 0) | (o < 0) | (((o | s) & _PAGE_MASK) != 0) | (o >= file_size) | (s > file_size - o)
    unsupported = (f == _ZERO) & (a != 0)
    if not content_modes:
        unsupported |= f != 0
    if coco:
        unsupported |= (f == _PRESERVE) & ((a == 0) | finalized)
    return np.where(einval, errno.EINVAL, np.where(unsupported, errno.EOPNOTSUPP, 0)).astype(np.int32)


def zeroes_contents(flags, coco: bool):
    """Whether conversions with ``flags`` (an int or an array of them) zero the pages'
    contents (docs/model.md §4.4): ``ZERO`` asks for it, and with no content flag a
    confidential VM's converted pages read as zeroes."""
    return (flags == _ZERO) | ((flags == 0) & coco)


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

    Made directly, the file behaves as bound to an in-place VM of ``vm_type``; ``vm``
    is the VM that created it (``VM.create_guest_memfd``), or ``None``.
    """

    def __init__(self, size, flags=0, *, page_order=0, vm_type="sw-protected",
                 direct_map=None, merge="eager", metadata_limit=None, content_modes=True,
                 vm=None, **vm_policies):
        size = parse_size(size)
        flags = as_int(flags, "flags")
        page_order = as_int(page_order, "page_order")
        _choice(vm_type, VM_TYPES, "vm_type")
        if flags & ~GUEST_MEMFD_KNOWN_FLAGS:
            raise GmemError(errno.EINVAL, f"unknown guest_memfd flags {flags & ~GUEST_MEMFD_KNOWN_FLAGS:#x}")
        hugetlb = bool(flags & GUEST_MEMFD_FLAG_HUGETLB)
        if hugetlb and page_order not in (9, 18):
            raise GmemError(errno.EINVAL, f"page_order {page_order} with HUGETLB: must be 9 (2 MiB) or 18 (1 GiB)")
        if not hugetlb and page_order != 0:
            raise GmemError(errno.EINVAL, f"page_order {page_order} needs GUEST_MEMFD_FLAG_HUGETLB (else 0)")
        unit = PAGE_SIZE << page_order
        if size > _MAX_SIZE:
            raise GmemError(errno.EINVAL, f"size {size:#x} is larger than {format_size(_MAX_SIZE)} (2^57 "
                            "bytes), the largest file the model holds")
        if size <= 0 or size % unit:
            raise GmemError(errno.EINVAL, f"size {size:#x} is not a positive multiple of {format_size(unit)}"
                            + (" (the huge page size)" if hugetlb else ""))
        if direct_map is None:
            direct_map = "no-direct-map" if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP else "keep"
        _choice(direct_map, DIRECT_MAP_POLICIES, "direct_map policy")
        if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP and direct_map == "keep":
            raise GmemError(errno.EINVAL, "GUEST_MEMFD_FLAG_NO_DIRECT_MAP contradicts direct_map='keep'")
        _choice(merge, MERGE_POLICIES, "merge policy")
        if metadata_limit is not None:
            metadata_limit = as_int(metadata_limit, "metadata_limit")
            if metadata_limit < 1:
                raise ValueError(f"metadata_limit {metadata_limit} must be at least 1 (or None)")
        unknown = sorted(set(vm_policies) - set(VM_POLICIES))
        if unknown or (vm is not None and vm_policies):
            raise TypeError(f"unexpected policies {unknown or sorted(vm_policies)}"
                            + (": set them on the VM" if vm is not None else ""))
        check_count(vm_policies.get("pages_per_populate"), "pages_per_populate", optional=True)
        if vm is not None and not vm.in_place and vm_type != "sw-protected":
            # docs/model.md §4.1: in legacy mode shared memory is separate host memory
            if flags & GUEST_MEMFD_FLAG_MMAP:
                raise GmemError(errno.EINVAL, "a CoCo VM in legacy (not in-place) mode cannot mmap guest_memfd")
            if flags & GUEST_MEMFD_FLAG_INIT_SHARED:
                raise GmemError(errno.EINVAL, "a CoCo VM in legacy (not in-place) mode cannot create a "
                                              "shared guest_memfd (GUEST_MEMFD_FLAG_INIT_SHARED)")

        self.size = size
        self.flags = flags
        self.page_order = page_order
        self.vm_type = vm_type
        self.nr_pages = size >> PAGE_SHIFT
        self._coco = vm_type != "sw-protected"     # converted pages read as zeroes by default
        self._binding = vm if vm is not None else StandaloneBinding(vm_type, vm_policies)
        self._policies = dict(direct_map=direct_map, merge=merge,
                              metadata_limit=metadata_limit, content_modes=bool(content_modes))
        self._store = PageStore(self.nr_pages, page_order=page_order,
                                init_private=not flags & GUEST_MEMFD_FLAG_INIT_SHARED,
                                vm_type=vm_type, direct_map=direct_map, merge=merge,
                                hugetlb=hugetlb, metadata_limit=metadata_limit,
                                content_modes=bool(content_modes))
        self._pins: dict[int, int] = {}       # page -> long-term pins on the file's page
        # pin -> the pages it still holds in the file (a 4 KiB punch orphans pinned pages)
        self._pin_handles: dict[Pin, list[int]] = {}
        if vm is None:
            self._binding.gmems.append(self)

    # ---------------------------------------------------------------- binding
    @property
    def vm(self):
        """The VM this file was created on, or ``None`` if it was made directly."""
        return None if isinstance(self._binding, StandaloneBinding) else self._binding

    @property
    def store(self):
        """The page store: the verbs the VM and the platform adapters use."""
        return self._store

    @property
    def in_place(self) -> bool:
        """Whether shareability is tracked here (else per GFN on the VM, legacy mode)."""
        return self._binding.in_place

    # ---------------------------------------------------------------- queries
    @property
    def counters(self) -> Mapping[str, int]:
        """Cumulative work done on this file, by counter name (docs/model.md §6)."""
        return self._store.counters()

    @property
    def policies(self) -> Mapping[str, object]:
        return MappingProxyType(dict(self._policies))

    def _pages(self, offset, size):
        if size is None:
            size = self.size - as_int(offset, "offset")
        return check_range(offset, size, self.size)

    def is_private(self, offset, size=PAGE_SIZE) -> bool:
        """True if every page of the range is private (as tracked by guest_memfd)."""
        p0, p1 = self._pages(offset, size)
        return self._store.count(p0, p1, PRIV, PRIV) == p1 - p0

    def private_pages(self, offset=0, size=None) -> int:
        """Number of private pages in the range (the whole file by default)."""
        p0, p1 = self._pages(offset, size)
        return self._store.count(p0, p1, PRIV, PRIV)

    def allocated_pages(self, offset=0, size=None) -> int:
        p0, p1 = self._pages(offset, size)
        return self._store.count(p0, p1, ALLOC, ALLOC)

    def folio_order(self, offset) -> int:
        """Order of the folio holding ``offset`` (0, 9 or 18), or -1 for a hole."""
        offset = as_int(offset, "offset")
        if not 0 <= offset < self.size:
            raise GmemError(errno.EINVAL, f"offset {offset:#x} is outside the file (size {self.size:#x})")
        return word_order(self._store.word(offset >> PAGE_SHIFT))

    def huge_folios(self) -> int:
        """Number of huge folios (of the backing order) in the file."""
        return self._store.huge_folios()

    @property
    def attribute_ranges(self) -> int:
        """Maximal runs of equal shareability: the entries of the per-file store."""
        return self._store.attribute_ranges()

    def direct_map_entries(self) -> dict:
        """Kernel direct-map entries covering the file, by size (fragmentation)."""
        e1g, e2m, e4k = self._store.dmap_entries()
        return {"1G": e1g, "2M": e2m, "4K": e4k}

    def memory_footprint(self) -> int:
        """Bytes of page state held (summaries, tables in use, contents)."""
        return self._store.footprint()

    def page_words(self, offset=0, size=None) -> np.ndarray:
        """The raw state words (see ``gmemfast._layout``) of the pages of a range."""
        p0, p1 = self._pages(offset, size)
        return self._store.words(p0, p1)

    def te_states(self, offset=0, size=None) -> np.ndarray:
        """Trusted-entity state of each page of a range (``gmemfast._layout.TE_*``)."""
        return (self.page_words(offset, size) & TE_MASK) >> TE_SHIFT

    def dump(self) -> dict:
        """Complete observable state, page by page (for checking; O(pages))."""
        w = self.page_words()
        alloc = (w & ALLOC) != 0
        pins = np.zeros(self.nr_pages, np.int64)
        for p, c in self._pins.items():
            pins[p] = c
        order = np.where(alloc, np.where(w & GIG, 18, np.where(w & HUGE, 9, 0)), -1)
        refcount = np.where(alloc, 1 + pins, 0)   # pinned pages are always order-0 folios
        contents = {}
        for p in np.flatnonzero(w & DATA).tolist():
            b = self._store.page_bytes(p, int(w[p]))
            if any(b):
                contents[p] = b
        return {
            "size": self.size,
            "page_order": self.page_order,
            "private": (w & PRIV) != 0,
            "allocated": alloc,
            "host_mapped": (w & HMAP) != 0,
            "guest_mapped": (w & GMAP) != 0,
            "pins": pins,
            "folio_order": order,
            "refcount": refcount,
            "direct_map_removed": (w & DMAP_OFF) != 0,
            "te_state": (w & TE_MASK) >> TE_SHIFT,
            "contents": contents,
            "direct_map_entries": self.direct_map_entries(),
            "attribute_ranges": self.attribute_ranges,
        }

    def check(self) -> None:
        """Verify every invariant; raise ``AssertionError`` naming the broken one."""
        rule, page = self._store.check()
        if rule:
            where = f" at page {page} (offset {page << PAGE_SHIFT:#x})" if page >= 0 else ""
            raise AssertionError(f"page-state invariant {rule} ({INVARIANTS.get(rule, '?')}) broken{where}")
        held: dict[int, int] = {}
        for pages in self._pin_handles.values():
            for p in pages:
                held[p] = held.get(p, 0) + 1
        if held != self._pins:
            raise AssertionError("page-state invariant: pin handles disagree with the pin counts")
        if self.nr_pages <= 1 << 22:
            bits = set(np.flatnonzero(self.page_words() & PIN).tolist())
            if bits != set(self._pins):
                raise AssertionError("page-state invariant: PIN bits disagree with the pin counts")
        elif self._store.total(K_PIN) != len(self._pins):
            raise AssertionError("page-state invariant: PIN bits disagree with the pin counts")

    # ---------------------------------------------------------------- faults
    def inject_enomem(self, n: int = 1) -> None:
        """Make the next ``n`` metadata reservations (conversions) fail with ``ENOMEM``."""
        n = as_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        self._store.inject_enomem(n)

    # ---------------------------------------------------------------- fallocate
    def fallocate(self, mode, offset, size) -> None:
        """``fallocate(2)``: allocate (``KEEP_SIZE``) or punch a hole (``KEEP_SIZE|PUNCH_HOLE``).

        Every call is counted (``fallocate_calls``), refused ones included, and every punch
        that passes the checks (``punch_calls``), whatever its outcome."""
        mode = as_int(mode, "mode")
        offset, size = as_int(offset, "offset"), as_int(size, "size")
        self._store.count_work("fallocate_calls")
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise GmemError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} lacks FALLOC_FL_KEEP_SIZE")
        if mode & ~FALLOC_KNOWN_MODES:
            raise GmemError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} has unsupported bits "
                                              f"{mode & ~FALLOC_KNOWN_MODES:#x}")
        p0, p1 = check_range(offset, size, self.size, "fallocate", allow_past_end=True)
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._store.count_work("punch_calls")
            p1 = min(p1, self.nr_pages)
            if p0 >= p1:
                return
            err, pg = self._store.punch(p0, p1)
            if err:
                raise GmemError(err, f"punch hole [{offset:#x}, {offset + size:#x}): page at "
                                     f"{pg << PAGE_SHIFT:#x} is pinned", pg << PAGE_SHIFT)
            if self._pins and self.page_order == 0:
                self._orphan_pins(p0, p1)
            return
        if p1 > self.nr_pages:
            raise GmemError(errno.EINVAL, f"fallocate [{offset:#x}, {offset + size:#x}) goes past "
                                          f"the end ({self.size:#x})")
        self._store.allocate(p0, p1)

    # ---------------------------------------------------------------- host access
    def _require_mmap(self):
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise GmemError(errno.ENODEV, "guest_memfd was created without GUEST_MEMFD_FLAG_MMAP: "
                                          "no host access")

    def _host_fault(self, offset: int, nbytes: int, what: str):
        """Fault in the pages of a host access up to the first page it may not touch.

        Like ``memset``/``memcpy`` on the mapping (docs/model.md §4.3): the pages before
        the first private page or the end of the file are faulted in; returns
        ``(first_page, end_page, fault)`` where ``fault`` is the ``SigBusError`` to raise
        once the bytes before it are done, or ``None``.
        """
        self._require_mmap()
        offset = as_int(offset, "offset")
        if offset < 0 or nbytes < 0:
            raise GmemError(errno.EINVAL, f"{what}: negative offset {offset} or size {nbytes}")
        p0 = offset >> PAGE_SHIFT
        p1 = (offset + nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
        inside = min(p1, self.nr_pages)
        fault = None
        f = self._store.first(p0, inside, PRIV, PRIV) if p0 < inside else -1
        if f >= 0:
            fault = SigBusError(f"{what} at {offset:#x}: page {f << PAGE_SHIFT:#x} is private",
                                f << PAGE_SHIFT)
        elif p1 > self.nr_pages:
            f = max(p0, self.nr_pages)
            fault = SigBusError(f"{what} at {offset:#x}: page {f << PAGE_SHIFT:#x} is at or past "
                                f"the end ({self.size:#x})", f << PAGE_SHIFT)
        end = f if fault is not None else p1
        if end > p0:
            self._store.fault_in(p0, end, HMAP)
        return p0, end, fault

    def host_write(self, offset, data) -> None:
        """Write through the host mapping. ``SigBusError`` at the first private page or
        past the end; the pages before it hold what was written (like ``memset``)."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n == 0:
            self._require_mmap()
            return
        p0, end, fault = self._host_fault(offset, n, "host write")
        done = min(n, (end << PAGE_SHIFT) - offset)
        if done > 0:
            self._store.write_bytes(offset, mv[:done], p0, end)
        if fault is not None:
            raise fault

    def host_read(self, offset, size) -> bytes:
        """Read through the host mapping; ``SigBusError`` at the first private page or past
        the end (the pages before it were faulted in)."""
        size = as_int(size, "size")
        if size == 0:
            self._require_mmap()
            return b""
        p0, end, fault = self._host_fault(offset, size, "host read")
        if fault is not None:
            raise fault
        return self._store.read_bytes(offset, size, p0, end)

    def mmap(self) -> HostMapping:
        """A new host mapping of the file (another process, e.g. a forked child)."""
        self._require_mmap()
        return HostMapping(self)

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
        f = self._store.first(p0, p1, PRIV, PRIV)
        if f >= 0:
            raise GmemError(errno.EFAULT, f"pin: page {f << PAGE_SHIFT:#x} is private")
        self._store.fault_in(p0, p1, HMAP)
        for p in range(p0, p1):
            self._pins[p] = self._pins.get(p, 0) + 1
        self._store.apply(p0, p1, PIN, 0, 0, PIN)
        self._store.count_work("pins", p1 - p0)
        pin = Pin(self, offset, size, self._unpin)
        self._pin_handles[pin] = list(range(p0, p1))
        return pin

    def _unpin(self, pin: Pin):
        if pin.released:
            raise GmemError(errno.EINVAL, f"pin [{pin.offset:#x}, +{pin.size:#x}) was already released")
        pin.released = True
        for p in self._pin_handles.pop(pin):
            c = self._pins[p] - 1
            if c:
                self._pins[p] = c
            else:
                del self._pins[p]
                self._store.apply(p, p + 1, PIN, PIN, PIN, 0)
        self._store.count_work("unpins", pin.size >> PAGE_SHIFT)

    def _orphan_pins(self, p0: int, p1: int) -> None:
        """A 4 KiB punch took pinned pages of ``[p0, p1)`` out of the file: their pins keep
        the orphaned pages alive, and releasing them later changes nothing in the file
        (docs/model.md §4.2)."""
        for pin, pages in self._pin_handles.items():
            if pin.offset >> PAGE_SHIFT < p1 and (pin.offset + pin.size) >> PAGE_SHIFT > p0:
                self._pin_handles[pin] = [p for p in pages if not p0 <= p < p1]
        for p in [p for p in self._pins if p0 <= p < p1]:
            del self._pins[p]

    @property
    def pins(self) -> tuple:
        """The pins currently held (they survive ``save``/``load``)."""
        return tuple(self._pin_handles)

    # ---------------------------------------------------------------- conversion
    def _check_conversion(self, offset, size, attributes, flags):
        """Validate one conversion (docs/model.md §4.4 step 1; the batched form's twin is
        :func:`conversion_errnos`). Returns ``(first_page, end_page, zero)``."""
        if (type(offset) is int and type(size) is int and type(attributes) is int
                and flags == 0 and type(flags) is int and not attributes & ~_PRIVATE
                and not (offset | size) & _PAGE_MASK and 0 <= offset < self.size
                and 0 < size <= self.size - offset and self._binding.in_place):
            # the common valid call, decided without the checks below that name what is wrong
            return offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT, self._coco
        if not self._binding.in_place:
            raise GmemError(errno.ENOTTY, "guest_memfd conversion needs an in-place VM; this VM "
                                          "keeps attributes per GFN (KVM_SET_MEMORY_ATTRIBUTES)")
        attributes = as_int(attributes, "attributes")
        flags = as_int(flags, "flags")
        if attributes & ~_PRIVATE:
            raise GmemError(errno.EINVAL, f"unknown memory attributes {attributes & ~_PRIVATE:#x}")
        if flags & ~KVM_SET_MEMORY_ATTRIBUTES2_KNOWN_FLAGS:
            raise GmemError(errno.EINVAL, "unknown KVM_SET_MEMORY_ATTRIBUTES2 flags "
                                          f"{flags & ~KVM_SET_MEMORY_ATTRIBUTES2_KNOWN_FLAGS:#x}")
        if flags == _PRESERVE | _ZERO:
            raise GmemError(errno.EINVAL, "PRESERVE and ZERO together: at most one content mode")
        p0, p1 = check_range(offset, size, self.size, "set_memory_attributes")
        why = None
        if flags and not self._policies["content_modes"]:
            why = f"content mode flags {flags:#x} are disabled by policy"
        elif flags == _ZERO and attributes:
            why = "ZERO is not supported on conversion to private"
        elif flags == _PRESERVE and self._coco and not attributes:
            why = f"PRESERVE to shared is not supported on {self.vm_type}: the host may never see guest plaintext"
        elif flags == _PRESERVE and self._coco and self._store.finalized:
            why = f"PRESERVE on {self.vm_type} is supported only before the VM is finalized"
        if why is not None:
            raise GmemError(errno.EOPNOTSUPP, why, offset)
        return p0, p1, bool(zeroes_contents(flags, self._coco))

    def set_memory_attributes(self, offset, size, attributes, flags=0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES2`` on this file (in-place conversion).

        ``attributes`` is ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` or 0. Raises ``GmemError``
        with ``EINVAL`` (bad arguments), ``ENOMEM`` or ``EAGAIN`` (with ``error_offset``);
        a failed call changes nothing but zapped host mappings.
        """
        try:
            p0, p1, zero = self._check_conversion(offset, size, attributes, flags)
        except GmemError as exc:
            self._count_refused(exc.errno, 1)
            raise
        err, pg = self._store.convert(p0, p1, attributes != 0, zero)
        if err:
            kind = "private" if attributes else "shared"
            if err == errno.EAGAIN:
                why = f"folio at {pg << PAGE_SHIFT:#x} has extra references (pinned)"
            else:
                why = "out of memory for attribute metadata"
            raise GmemError(err, f"converting [{offset:#x}, {offset + size:#x}) to {kind}: {why}",
                            pg << PAGE_SHIFT)

    def set_memory_attributes_many(self, offsets, sizes, attributes, flags=0) -> BatchResult:
        """Many conversions in one call, applied in order, each with its own result.

        Arguments are integer arrays (or scalars, broadcast). Never raises for a bad item:
        its ``errno`` says why. ``TypeError`` for non-integer input.
        """
        offs = int_array(offsets, "offsets")
        n = offs.shape[0] if offs.ndim else 1
        if self._store.small_batch(n):
            return self._few_conversions(offs, n, sizes, attributes, flags)
        if offs.ndim and self._binding.in_place:
            res = self._page_conversions(offs, n, sizes, attributes, flags)
            if res is not None:
                return res
        offs, sizes, attrs, flags = (int_column(v, name, n)
                                     for v, name in ((offs, "offsets"), (sizes, "sizes"),
                                                     (attributes, "attributes"), (flags, "flags")))
        out_off = np.full(n, -1, np.int64)
        if not self._binding.in_place:
            self._count_refused(errno.ENOTTY, n)
            return BatchResult(np.full(n, errno.ENOTTY, np.int32), out_off)
        out_err = conversion_errnos(offs, sizes, attrs, flags, file_size=self.size, coco=self._coco,
                                    finalized=self._store.finalized,
                                    content_modes=self._policies["content_modes"])
        if out_err.any():
            for code in (errno.EINVAL, errno.EOPNOTSUPP):
                self._count_refused(code, int(np.count_nonzero(out_err == code)))
            unsupported = out_err == errno.EOPNOTSUPP
            out_off[unsupported] = offs[unsupported]     # EOPNOTSUPP reports the range's start
        zero = zeroes_contents(flags, self._coco)
        self._store.convert_many(offs >> PAGE_SHIFT, (offs + sizes) >> PAGE_SHIFT, attrs, zero,
                                 out_err, out_off)
        done = out_err != errno.EOPNOTSUPP
        np.left_shift(out_off, PAGE_SHIFT, out=out_off, where=done & (out_off >= 0))
        return BatchResult(out_err, out_off)

    def _page_conversions(self, offs, n, sizes, attributes, flags) -> BatchResult | None:
        """The common batch: ``n`` one-page conversions with one attribute value and one
        flags value (scalars, or arrays holding one value), validated and applied in one
        pass per step (the same results as the general path); ``None`` for any other
        batch, or one with an invalid item."""
        one = []
        for v, name in ((sizes, "sizes"), (attributes, "attributes"), (flags, "flags")):
            a = int_array(v, name)
            if a.ndim and (a.shape[0] != n or a[0] != a[-1] or (a != a[0]).any()):
                return None
            one.append(a.reshape(-1)[:1])
        s, a, f = one
        if int(s[0]) != PAGE_SIZE:
            return None
        # the checks of the arguments shared by every item, at a valid offset
        if conversion_errnos(np.zeros(1, np.int64), s, a, f, file_size=self.size, coco=self._coco,
                             finalized=self._store.finalized,
                             content_modes=self._policies["content_modes"])[0]:
            return None
        f = int(f[0])
        zero = bool(zeroes_contents(f, self._coco))
        out_err = np.zeros(n, np.int32)
        out_off = np.full(n, -1, np.int64)
        if not self._store.convert_pages(np.ascontiguousarray(offs), int(a[0]) != 0, zero, out_err, out_off):
            return None
        return BatchResult(out_err, out_off)

    def _few_conversions(self, offs, n, sizes, attributes, flags) -> BatchResult:
        """A batch of a few items, as the per-call form applies them one by one (the same
        results: validation, counting and conversion are the same steps), without the
        fixed cost of the vectorised path."""
        cols = [offs.tolist() if offs.ndim else [int(offs)] * n]
        for v, name in ((sizes, "sizes"), (attributes, "attributes"), (flags, "flags")):
            a = int_array(v, name)
            cols.append(broadcast_column(a, n, name).tolist() if a.ndim else [int(a)] * n)
        out_err = np.zeros(n, np.int32)
        out_off = np.full(n, -1, np.int64)
        for i, (o, z, a, f) in enumerate(zip(*cols)):
            try:
                self.set_memory_attributes(o, z, a, f)
            except GmemError as exc:
                out_err[i] = exc.errno
                if exc.error_offset is not None:
                    out_off[i] = exc.error_offset
        return BatchResult(out_err, out_off)

    def fallocate_many(self, modes, offsets, sizes) -> BatchResult:
        """Many ``fallocate`` calls in one, applied in order, each with its own result:
        ``errno`` (``EOPNOTSUPP`` for a mode, ``EINVAL`` for a range, a punch's ``EAGAIN``
        at a pinned page with its ``error_offset``), 0 where done. A failed item changes
        nothing; every item is counted as a call, as ``fallocate`` counts them. Arguments
        are integer arrays or scalars (broadcast); ``TypeError`` for anything else."""
        offs = int_array(offsets, "offsets")
        n = offs.shape[0] if offs.ndim else 1
        modes, offs, sizes = (int_column(v, name, n)
                              for v, name in ((modes, "modes"), (offs, "offsets"), (sizes, "sizes")))
        out_off = np.full(n, -1, np.int64)
        bad_mode = ((modes & FALLOC_FL_KEEP_SIZE) == 0) | ((modes & ~FALLOC_KNOWN_MODES) != 0)
        punch = (modes & FALLOC_FL_PUNCH_HOLE) != 0
        p0s = offs >> PAGE_SHIFT
        p1s = p0s + (sizes >> PAGE_SHIFT)
        einval = (sizes <= 0) | (offs < 0) | (((offs | sizes) & _PAGE_MASK) != 0)
        einval |= ~punch & (p1s > self.nr_pages)
        out_err = np.where(bad_mode, errno.EOPNOTSUPP, np.where(einval, errno.EINVAL, 0)).astype(np.int32)
        self._store.count_work("fallocate_calls", n)
        self._store.count_work("punch_calls", int(np.count_nonzero(punch & (out_err == 0))))
        p1s = np.where(punch, np.minimum(p1s, self.nr_pages), p1s)
        self._store.fallocate_many(punch, p0s, p1s, out_err, out_off)
        if self._pins and self.page_order == 0:
            for x in np.flatnonzero(punch & (out_err == 0) & (p0s < p1s)).tolist():
                self._orphan_pins(int(p0s[x]), int(p1s[x]))
        np.left_shift(out_off, PAGE_SHIFT, out=out_off, where=out_off >= 0)
        return BatchResult(out_err, out_off)

    def _count_refused(self, err: int, n: int) -> None:
        """Conversion calls refused before any work: each is still an ioctl call."""
        if n:
            self._store.count_work("convert_calls", n)
            self._store.count_work("convert_eopnotsupp" if err == errno.EOPNOTSUPP else "convert_einval", n)

    # ---------------------------------------------------------------- persistence
    def _header(self) -> dict:
        return {"size": self.size, "flags": self.flags, "page_order": self.page_order,
                "vm_type": self.vm_type, "in_place": self._binding.in_place,
                "policies": self._policies}

    def _arrays(self) -> dict:
        arrays = self._store.to_arrays()
        rows = []
        for pages in self._pin_handles.values():       # each run of held pages, in order
            for k, p in enumerate(pages):
                if k and p == pages[k - 1] + 1:
                    rows[-1][1] += PAGE_SIZE
                else:
                    rows.append([p << PAGE_SHIFT, PAGE_SIZE])
        arrays["pins"] = np.array(rows, np.int64).reshape(-1, 2)
        return arrays

    def __getstate__(self):
        return {"header": self._header(), "arrays": self._arrays(), "vm": self._binding}

    def __setstate__(self, state):
        self._restore(state["header"], state["arrays"], state.get("vm"))

    def save(self, path) -> None:
        """Save the whole state to one ``.npz`` file (exact round trip with ``load``)."""
        persist.save(path, self._header(), self._arrays())

    @classmethod
    def load(cls, path) -> "GuestMemfd":
        """Load a state saved by ``save``; a damaged or foreign file raises ``ValueError``."""
        header, arrays = persist.load(path, (*ARRAY_NAMES, "pins"))
        obj = cls.__new__(cls)
        try:
            obj.__setstate__({"header": header, "arrays": arrays, "vm": None})
        except ValueError as exc:
            raise persist.StateFileError(f"{path}: {exc}") from None
        return obj

    def _restore(self, header, arrays, binding):
        try:
            fresh = GuestMemfd(header["size"], header["flags"], page_order=header["page_order"],
                               vm_type=header["vm_type"], **header["policies"])
        except (KeyError, TypeError, ValueError, GmemError) as exc:
            raise ValueError(f"state header is invalid: {exc}") from None
        self.__dict__.update(fresh.__dict__)
        if binding is not None:
            self._binding = binding
        else:
            self._binding.in_place = bool(header.get("in_place", True))
            self._binding.gmems[:] = [self]
        version = header.get("version", persist.STATE_VERSION)
        if version != persist.STATE_VERSION:
            arrays = dict(arrays, meta=upgrade_meta(arrays["meta"], version))
        self._store.load_arrays(arrays)
        self._pins = {}
        self._pin_handles = {}
        for off, sz in np.asarray(arrays["pins"]).reshape(-1, 2).tolist():
            pages = list(range(off >> PAGE_SHIFT, (off + sz) >> PAGE_SHIFT))
            self._pin_handles[Pin(self, off, sz, self._unpin)] = pages
            for p in pages:
                self._pins[p] = self._pins.get(p, 0) + 1
        try:
            self.check()
        except AssertionError as exc:
            raise ValueError(f"state is inconsistent (damaged file): {exc}") from None

    def __repr__(self):
        return (f"GuestMemfd(size={format_size(self.size)}, flags={self.flags:#x}, "
                f"page_order={self.page_order}, vm_type={self.vm_type!r})")
