"""The guest kernel's SWIOTLB bounce-buffer pool, and I/O driving it (docs/model.md §11).

The pool follows ``kernel/dma/swiotlb.c`` of Linux 6.6 (the version with
``CONFIG_SWIOTLB_DYNAMIC`` and ``MAX_ORDER``):

* slots of 2 KiB (``IO_TLB_SHIFT`` 11) in segments of 128 (``IO_TLB_SEGSIZE``); a mapping
  takes contiguous slots inside one segment, so at most 256 KiB;
* ``nareas`` areas per pool, one lock each: the number of possible CPUs rounded up to a
  power of two; CPU *c* starts its search in area ``c & (nareas - 1)`` and walks the
  others in turn; each area remembers where its last search ended (``area->index``);
* the free list is the kernel's: ``list[i]`` counts the free slots from *i* to the end
  of its free run, never past the segment end (``swiotlb_area_find_slots()``,
  ``swiotlb_release_slots()``); mappings of 4 KiB or more start on a page;
* the default size is 6% of memory clamped to [64 MiB, 1 GiB]
  (``mem_encrypt_setup_arch()``), rounded up to a power of two of slots once the areas
  are known (``round_up_default_nslabs()``), below 4 GiB (``memblock_alloc_low()``);
* with ``CONFIG_SWIOTLB_DYNAMIC``, a mapping no pool can hold schedules the growth
  worker (``swiotlb_dyn_alloc()``: a new pool of the default size, at most
  ``SLABS_PER_PAGE << MAX_ORDER`` = 4 MiB, halved on failure down to 1 MiB, converted
  to shared with ``set_memory_decrypted()``, added at the head of the pool list) and
  tries a *transient* pool of exactly its size; in a confidential guest that comes from
  the DMA atomic pools, which are shared already and grow in the background
  (``kernel/dma/pool.c``); a transient pool is freed at unmap.

:class:`SwiotlbMem` is the allocator (no time, no guest memory);
:mod:`gmemfast.scenarios.swiotlb_io` drives it with I/O.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..units import PAGE_SIZE, format_size, parse_size

__all__ = ["IO_TLB_SHIFT", "IO_TLB_SIZE", "IO_TLB_SEGSIZE", "IO_TLB_MIN_SLABS", "MAX_MAPPING",
           "DYN_POOL_MAX", "AtomicPools", "Mapping", "Pool", "SwiotlbMem", "atomic_pool_size",
           "default_nslabs", "limit_nareas", "nareas_for", "nr_slots", "parse_duration", "parse_io_size",
           "parse_pool", "parse_rate", "parse_release", "pow2_ceil", "Duration", "Rate"]

IO_TLB_SHIFT = 11
IO_TLB_SIZE = 1 << IO_TLB_SHIFT                 # 2 KiB slot
IO_TLB_SEGSIZE = 128                            # most contiguous slots per mapping
MAX_MAPPING = IO_TLB_SIZE * IO_TLB_SEGSIZE      # swiotlb_max_mapping_size(): 256 KiB
IO_TLB_DEFAULT_SIZE = 64 << 20
IO_TLB_MIN_SLABS = (1 << 20) >> IO_TLB_SHIFT    # 1 MiB
DYN_POOL_MAX = 4 << 20                          # SLABS_PER_PAGE << MAX_ORDER slots
ONE_GIB = 1 << 30
FOUR_GIB = 1 << 32
MAX_ORDER_BYTES = 4 << 20                       # MAX_ORDER_NR_PAGES pages


def nr_slots(nbytes: int) -> int:
    return -(-int(nbytes) // IO_TLB_SIZE)


def pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def nareas_for(cpus: int) -> int:
    """``swiotlb_adjust_nareas(num_possible_cpus())``: a power of two, at least 1."""
    return pow2_ceil(max(1, int(cpus)))


def limit_nareas(nareas: int, nslots: int) -> int:
    return nslots // IO_TLB_SEGSIZE if nslots < nareas * IO_TLB_SEGSIZE else nareas


def default_nslabs(memory: int, cpus: int, size=None) -> int:
    """Slots of the default pool of a confidential guest with ``memory`` bytes and ``cpus``
    possible CPUs. ``size`` is ``swiotlb=`` given on the command line (bytes), else the
    kernel's own choice: 6% of memory clamped to [64 MiB, 1 GiB]
    (``mem_encrypt_setup_arch()``). Either is aligned to whole segments, then rounded up
    to a power of two once the areas are set (``round_up_default_nslabs()``)."""
    if size is None:
        size = min(max(int(memory) * 6 // 100, IO_TLB_DEFAULT_SIZE), ONE_GIB)
    size = -(-int(size) // IO_TLB_SIZE) * IO_TLB_SIZE
    nslabs = -(-(size >> IO_TLB_SHIFT) // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE
    nareas = nareas_for(cpus)
    if nslabs < IO_TLB_SEGSIZE * nareas:
        nslabs = IO_TLB_SEGSIZE * nareas
    return pow2_ceil(nslabs)


def atomic_pool_size(memory: int) -> int:
    """Each DMA atomic pool's size: 128 KiB per GiB of memory, at least 128 KiB, at most
    ``MAX_ORDER_NR_PAGES`` pages (4 MiB) (``dma_atomic_pool_init()``)."""
    pages = (int(memory) >> 12) // (ONE_GIB // (128 << 10))
    pages = min(pages, MAX_ORDER_BYTES >> 12)
    return max(pages << 12, 128 << 10)


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(ns|us|µs|ms|s)?\s*$", re.I)
_UNIT_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}


class Duration(int):
    """A time in ns that prints as a person writes it (``20us``, ``1ms``)."""

    def __str__(self) -> str:
        for unit, ns in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
            if self >= ns:
                return f"{self / ns:g}{unit}"
        return f"{int(self)}ns"


class Rate(int):
    """A rate in bytes per second that prints as ``2.2GB/s``."""

    def __str__(self) -> str:
        return f"{self / 1e9:g}GB/s"


def parse_duration(value) -> Duration:
    """``"20us"``, ``"1.5ms"``, ``"2s"``, ``"500ns"`` or a number of ns -> ns."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 20us or 1ms, not {value!r}")
    if isinstance(value, (int, float)):
        ns = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"expected a duration like 20us or 1ms, not {value!r}")
        ns = float(m.group(1)) * _UNIT_NS[(m.group(2) or "ns").lower()]
    if not math.isfinite(ns) or ns < 0:
        raise ValueError(f"duration {value!r} must be finite and >= 0")
    return Duration(round(ns))


# ---------------------------------------------------------------------------- one pool

class Pool:
    """One ``io_tlb_pool``: ``nslabs`` slots in ``nareas`` areas of ``area_nslabs`` each.

    ``offset`` is where the pool sits in guest memory (bytes into the guest_memfd), for
    the conversions that make it shared; ``kind`` is ``default``, ``dynamic`` or
    ``transient``.
    """

    def __init__(self, nslabs: int, nareas: int, *, offset: int = -1, kind: str = "default"):
        if nslabs <= 0 or nslabs % IO_TLB_SEGSIZE and kind != "transient":
            raise ValueError(f"a pool needs whole segments of {IO_TLB_SEGSIZE} slots, not {nslabs}")
        nareas = max(1, nareas)
        self.nslabs = int(nslabs)
        self.nareas = int(nareas)
        self.area_nslabs = self.nslabs // self.nareas
        self.offset = offset
        self.kind = kind
        i = np.arange(self.nslabs, dtype=np.int32)
        self.list = (IO_TLB_SEGSIZE - (i % IO_TLB_SEGSIZE)).astype(np.int32)
        if kind == "transient":
            # swiotlb_init_io_tlb_pool() with nslabs not a whole segment: the list still
            # counts to the segment end; the search never looks past nslabs
            self.list = np.minimum(self.list, self.nslabs - i).astype(np.int32)
        self.index = [0] * self.nareas
        self.used_area = [0] * self.nareas
        self.used = 0
        self.sizes: dict[int, int] = {}          # first slot -> slots of each mapping

    @property
    def nbytes(self) -> int:
        return self.nslabs << IO_TLB_SHIFT

    def find(self, cpu: int, nbytes: int) -> int:
        """``swiotlb_pool_find_slots()``: the first slot of a new mapping of ``nbytes``,
        searched from CPU ``cpu``'s area, or -1."""
        start = cpu & (self.nareas - 1)
        a = start
        while True:
            slot = self.area_find(a, nbytes)
            if slot >= 0:
                return slot
            a += 1
            if a >= self.nareas:
                a = 0
            if a == start:
                return -1

    def area_find(self, a: int, nbytes: int) -> int:
        """``swiotlb_area_find_slots()`` on area ``a`` (buffers page aligned)."""
        n = nr_slots(nbytes)
        N = self.area_nslabs
        if n > N - self.used_area[a]:
            return -1
        base = a * N
        lst = self.list[base:base + N]
        ok = lst >= n
        idx = self.index[a]
        if nbytes >= PAGE_SIZE:
            # page aligned: even slots only; an odd start steps one slot first
            ok[1::2] = False
            idx += idx & 1
            if idx >= N:
                idx = 0
        j = int(ok[idx:].argmax()) + idx if idx < N else N
        if j >= N or not ok[j]:
            j = int(ok[:idx].argmax()) if idx else 0
            if not (idx and ok[j]):
                return -1
        p = j
        lst[p:p + n] = 0
        seg0 = p - p % IO_TLB_SEGSIZE
        s = self._run_start(lst, seg0, p)
        if s < p:
            lst[s:p] = np.arange(p - s, 0, -1, dtype=np.int32)
        nxt = p + n
        self.index[a] = 0 if nxt >= N else nxt
        self.used_area[a] += n
        self.used += n
        slot = base + p
        self.sizes[slot] = n
        return slot

    @staticmethod
    def _run_start(lst, seg0: int, p: int) -> int:
        """The first slot of the free run ending just before ``p`` (within the segment)."""
        if p <= seg0:
            return p
        zeros = np.flatnonzero(lst[seg0:p] == 0)
        return seg0 + (int(zeros[-1]) + 1 if len(zeros) else 0)

    def release(self, slot: int) -> int:
        """``swiotlb_release_slots()``: frees the mapping that starts at ``slot``; returns
        its slots."""
        n = self.sizes.pop(slot)
        lst = self.list
        seg_end = slot - slot % IO_TLB_SEGSIZE + IO_TLB_SEGSIZE
        count = int(lst[slot + n]) if slot + n < min(seg_end, self.nslabs) else 0
        lst[slot:slot + n] = count + np.arange(n, 0, -1, dtype=np.int32)
        count += n
        seg0 = slot - slot % IO_TLB_SEGSIZE
        s = self._run_start(lst, seg0, slot)
        if s < slot:
            lst[s:slot] = count + np.arange(slot - s, 0, -1, dtype=np.int32)
        self.used_area[slot // self.area_nslabs] -= n
        self.used -= n
        return n


# ---------------------------------------------------------------------------- atomic pools

class AtomicPools:
    """The DMA atomic pools of ``kernel/dma/pool.c`` (kernel, DMA32, DMA, tried in that
    order by ``dma_guess_pool()``), counted in pages; placement inside a pool is not
    modelled. Each starts at :func:`atomic_pool_size`; after an allocation leaves one
    with less than that free, the background work grows every such pool by its own
    size, at most 4 MiB (``atomic_pool_resize()``)."""

    NAMES = ("kernel", "dma32", "dma")

    def __init__(self, memory: int):
        self.size0 = atomic_pool_size(memory)
        self.capacity = [self.size0] * 3
        self.used = [0] * 3

    @staticmethod
    def _round(nbytes: int) -> int:
        return -(-int(nbytes) // PAGE_SIZE) * PAGE_SIZE

    def alloc(self, nbytes: int) -> int:
        """The pool the allocation came from, or -1."""
        n = self._round(nbytes)
        for i in range(3):
            if self.capacity[i] - self.used[i] >= n:
                self.used[i] += n
                return i
        return -1

    def free(self, i: int, nbytes: int) -> None:
        self.used[i] -= self._round(nbytes)

    def low(self) -> bool:
        return any(c - u < self.size0 for c, u in zip(self.capacity, self.used))

    def expansions(self) -> list[tuple[int, int]]:
        """(pool, bytes) the resize work would add now."""
        out = []
        for i in range(3):
            if self.capacity[i] - self.used[i] < self.size0:
                out.append((i, min(pow2_ceil(self.capacity[i] >> 12) << 12, MAX_ORDER_BYTES)))
        return out

    def grow(self, i: int, nbytes: int) -> None:
        self.capacity[i] += nbytes

    @property
    def total(self) -> int:
        return sum(self.capacity)


# ---------------------------------------------------------------------------- the allocator

@dataclass
class Mapping:
    """A mapping's slots: ``pool`` and first ``slot``; ``atomic`` is the atomic pool a
    transient pool came from (-1: not transient)."""
    pool: Pool
    slot: int
    nbytes: int
    atomic: int = -1


class SwiotlbMem:
    """``io_tlb_mem``: the pools, searched newest first, and (``dynamic``) growth."""

    def __init__(self, default: Pool | None, *, dynamic: bool = False, atomic: AtomicPools | None = None,
                 nareas: int = 1, default_slabs: int = 0):
        self.pools: list[Pool] = [default] if default is not None else []
        self.dynamic = dynamic
        self.atomic = atomic
        self.nareas = nareas
        self.default_slabs = default_slabs or (default.nslabs if default else IO_TLB_MIN_SLABS)
        self.maps = 0
        self.failed = 0
        self.transient = 0
        self.used = 0
        self.hiwater = 0

    @property
    def nslabs(self) -> int:
        return sum(p.nslabs for p in self.pools)

    def map(self, cpu: int, nbytes: int):
        """Map ``nbytes`` for CPU ``cpu`` (``swiotlb_find_slots()``). Returns (mapping or
        None, growth asked): with ``dynamic``, a mapping no pool holds asks for growth
        and tries a transient pool from the atomic pools."""
        if nbytes > MAX_MAPPING or nbytes <= 0:
            raise ValueError(f"a mapping is 1 byte to {format_size(MAX_MAPPING)}, not {nbytes}")
        self.maps += 1
        for pool in self.pools:
            slot = pool.find(cpu, nbytes)
            if slot >= 0:
                self._take(pool.sizes[slot])
                return Mapping(pool, slot, nbytes), False
        if not self.dynamic:
            self.failed += 1
            return None, False
        n = nr_slots(nbytes)
        i = self.atomic.alloc(n << IO_TLB_SHIFT) if self.atomic is not None else -1
        if i < 0:
            self.failed += 1
            return None, True
        pool = Pool(n, 1, kind="transient")
        slot = pool.find(0, nbytes)
        self.transient += 1
        self._take(n)
        return Mapping(pool, slot, nbytes, i), True

    def _take(self, n: int) -> None:
        self.used += n
        self.hiwater = max(self.hiwater, self.used)

    def unmap(self, m: Mapping) -> None:
        n = m.pool.release(m.slot)
        self.used -= n
        if m.atomic >= 0:
            self.atomic.free(m.atomic, m.pool.nbytes)

    def add_pool(self, pool: Pool) -> None:
        """``add_mem_pool()``: ``list_add_rcu()`` puts it first."""
        self.pools.insert(0, pool)

    def remove_pool(self, pool: Pool) -> None:
        self.pools.remove(pool)


def parse_pool(value):
    """``auto`` (the kernel's size), ``off`` (no SWIOTLB: the device reaches memory
    directly) or a size (``swiotlb=`` on the command line)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "default")):
        return "auto"
    if isinstance(value, str) and value.strip().lower() in ("off", "none", "0"):
        return "off"
    n = parse_size(value)
    if n < IO_TLB_MIN_SLABS << IO_TLB_SHIFT:
        raise ValueError(f"pool {value!r}: at least 1M (IO_TLB_MIN_SLABS), or 'auto' or 'off'")
    return n


parse_pool.choices = ("auto", "off", "SIZE")


def parse_release(value):
    """``never`` (the kernel: a dynamic pool stays) or how long a dynamic pool must be
    unused before it is released."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("never", "no", "off")):
        return "never"
    return parse_duration(value)


parse_release.choices = ("never", "TIME")
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gb/s|gbit/s|gbps|mb/s|mbit/s)?\s*$", re.I)
_RATE_UNIT = {"gb/s": 1e9, "gbit/s": 1e9 / 8, "gbps": 1e9 / 8, "mb/s": 1e6, "mbit/s": 1e6 / 8}


def parse_rate(value) -> Rate:
    """A device rate: ``"2.2GB/s"``, ``"17.6Gbit/s"``, ``"500MB/s"`` or a number of GB/s
    -> bytes per second."""
    if isinstance(value, bool):
        raise ValueError(f"expected a rate like 2.2GB/s or 17.6Gbit/s, not {value!r}")
    if isinstance(value, (int, float)):
        r = float(value) * 1e9
    else:
        m = _RATE.match(str(value))
        if not m:
            raise ValueError(f"expected a rate like 2.2GB/s or 17.6Gbit/s, not {value!r}")
        r = float(m.group(1)) * _RATE_UNIT[(m.group(2) or "gb/s").lower()]
    if not math.isfinite(r) or r < 1:
        raise ValueError(f"rate {value!r} must be positive")
    return Rate(round(r))


def parse_io_size(value) -> int:
    """Bytes per request: a positive size (``1500``, ``4K``, ``1M``)."""
    n = parse_size(value)
    if n <= 0 or n > (1 << 30):
        raise ValueError(f"request size {value!r} must be from 1 byte to 1G")
    return n
