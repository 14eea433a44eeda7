"""The benchmark workloads, written once for the asv suite and for ``gmemfast bench``.

Every builder returns an object in its benchmark-ready state (arrays filled, kernels
compiled), so timed code only does the operation being measured.
"""
from __future__ import annotations

import os
import resource

import numpy as np

from .baselines import DenseModel, RoaringModel

PAGE = 4096
TIB = 1 << 40
GIB = 1 << 30
PAGES_1G = 1 << 18
PAGES_2M = 1 << 9
TIB_PAGES = TIB // PAGE                # 2**28
SWIOTLB_PAGES = 500_000                # target 3: distinct random pages
SWIOTLB_SEED = 20260601


def engine():
    """The gmemfast module, or NotImplementedError (asv then skips the benchmark)."""
    try:
        import gmemfast
    except ImportError as e:
        raise NotImplementedError(f"gmemfast engine not importable: {e}") from e
    return gmemfast


def warm_engine():
    """Call every engine entry point the benchmarks use once, on small files.

    Compiles (or loads from numba's cache) every kernel outside the timed region.
    """
    gm = engine()
    P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    for flags, order, size in ((0, 0, 4 << 20), (gm.GUEST_MEMFD_FLAG_HUGETLB, 18, 2 * GIB)):
        g = gm.GuestMemfd(size, flags, page_order=order)
        g.set_memory_attributes(0, size, 0)
        g.set_memory_attributes(0, size, P)
        g.fallocate(gm.FALLOC_FL_KEEP_SIZE, 0, size)
        g.set_memory_attributes(0, size // 2, 0)
        g.set_memory_attributes(0, size // 2, P)
        g.set_memory_attributes(PAGE, PAGE, 0)
        g.set_memory_attributes(PAGE, PAGE, P)
        offs = np.arange(0, size, size // 8, dtype=np.int64)
        for sizes, attrs in ((PAGE, 0), (PAGE, P), (np.full(offs.size, PAGE, np.int64), np.zeros(offs.size, np.int64)),
                             (np.full(offs.size, PAGE, np.int64), np.full(offs.size, P, np.int64))):
            g.set_memory_attributes_many(offs, sizes, attrs)
        g.folio_order(0)
        g.private_pages()
        g.is_private(0, PAGE)
        dict(g.counters)
    return gm


# -- target 1: whole-file conversion, 1 TiB never allocated --------------------------
def engine_1t_unallocated():
    gm = engine()
    g = gm.GuestMemfd(TIB, 0)
    return g


def engine_whole_file_roundtrip(g, P):
    g.set_memory_attributes(0, TIB, 0)
    g.set_memory_attributes(0, TIB, P)


# -- targets 2-4: 1 TiB (or more), 1 GiB backing, fully allocated, private ------------
def engine_allocated(size=TIB):
    gm = engine()
    g = gm.GuestMemfd(size, gm.GUEST_MEMFD_FLAG_HUGETLB, page_order=18)
    g.fallocate(gm.FALLOC_FL_KEEP_SIZE, 0, size)
    return g


def model_allocated(cls, npages=TIB_PAGES):
    m = cls(npages, 18)
    m.fallocate(0, npages)
    return m


def roaring_allocated(npages=TIB_PAGES):
    return model_allocated(RoaringModel, npages)


def roaring_churn(pages):
    """The pyroaring model's SWIOTLB churn, one call per conversion: every page of
    ``pages`` to shared, then each back. Returns ``(model, churn)``."""
    m = roaring_allocated()
    plist = pages.tolist()
    sh, pr = m.to_shared_page, m.to_private_page

    def churn():
        for p in plist:
            sh(p)
        for p in plist:
            pr(p)
    return m, churn


def engine_churn(g, pages, *, batched):
    """The engine's SWIOTLB churn on ``g``: every page of ``pages`` to shared, then each
    back, through the batched form (two calls) or one call per conversion."""
    P = engine().KVM_MEMORY_ATTRIBUTE_PRIVATE
    if batched:
        offs = pages * PAGE
        many = g.set_memory_attributes_many

        def churn():
            many(offs, PAGE, 0)
            many(offs, PAGE, P)
        return churn
    conv = g.set_memory_attributes
    olist = (pages * PAGE).tolist()

    def churn():
        for o in olist:
            conv(o, PAGE, 0)
        for o in olist:
            conv(o, PAGE, P)
    return churn


def dense_allocated(npages=TIB_PAGES):
    return model_allocated(DenseModel, npages)


def swiotlb_pages(n=SWIOTLB_PAGES, npages=TIB_PAGES, seed=SWIOTLB_SEED):
    """``n`` distinct pages in random order (a fixed seed: same pages for everyone)."""
    rng = np.random.default_rng(seed)
    return rng.choice(npages, n, replace=False).astype(np.int64)


def split_pages(npages=TIB_PAGES):
    """One page per 2 MiB block (its 2nd page): converting these to shared leaves every
    2 MiB block mixed and every 1 GiB folio split to 4 KiB."""
    return np.arange(1, npages, PAGES_2M, dtype=np.int64)


# -- memory ----------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS of this process (VmHWM: since exec, or since ``reset_peak_rss``).

    Not ``ru_maxrss``: after fork + exec that also counts the parent's RSS at fork time.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- target 5: split and merge in a booted guest ----------------------------------------
PLATFORMS = ("snp", "tdx", "sw-protected")
DIRECT_MAPS = ("keep", "no-direct-map", "on-conversion")
BOOTED_SIZE = 16 * GIB
BOOTED_SEED = 20260602


def booted_guest(platform, direct_map, size=BOOTED_SIZE, churn=20_000):
    """A booted guest of ``size`` on 1 GiB pages: ``VM(platform, direct_map=...)``, all
    memory accepted at 2 MiB, then ``churn`` random 4 KiB round trips (shared and back,
    not accepted again), so pages differ in trusted-entity and mapping state as in a
    running guest. Returns ``(vm, gmem)``."""
    gm = engine()
    vm = gm.VM(platform, direct_map=direct_map)
    g = vm.create_guest_memfd(size, gm.GUEST_MEMFD_FLAG_HUGETLB, page_order=18)
    vm.set_user_memory_region(0, 0, size, g)
    vm.guest_accept(0, size, chunk=2 << 20)
    if churn:
        offs = np.random.default_rng(BOOTED_SEED).integers(0, size // PAGE, churn) * PAGE
        for o in offs.tolist():
            g.set_memory_attributes(o, PAGE, 0)
            g.set_memory_attributes(o, PAGE, gm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return vm, g


def bare_file(size=BOOTED_SIZE):
    """The same file alone: 1 GiB pages, allocated, never in a VM (the baseline)."""
    return engine_allocated(size)


def roundtrip_pages(n, size=BOOTED_SIZE, seed=BOOTED_SEED + 1):
    """``n`` random page offsets for round trips."""
    return (np.random.default_rng(seed).integers(0, size // PAGE, n) * PAGE).astype(np.int64)


def split_merge_roundtrip(g, off, P):
    """A 4 KiB conversion to shared (splitting the 1 GiB folio) and back (merging it)."""
    g.set_memory_attributes(off, PAGE, 0)
    g.set_memory_attributes(off, PAGE, P)


# -- target 6: a lazily accepting guest touched at 4 KiB --------------------------------
def accept_guest(size):
    """A TDX guest of ``size`` (4 KiB pages), nothing accepted yet. Returns ``(vm, gmem)``."""
    gm = engine()
    vm = gm.VM("tdx")
    g = vm.create_guest_memfd(size)
    vm.set_user_memory_region(0, 0, size, g)
    return vm, g


def accept_every_page(vm, pages, batch=1 << 20):
    """Accept each page of ``pages`` (indices, any order) at 4 KiB through
    ``VM.guest_accept_many``, ``batch`` items a call. Returns the items that failed."""
    bad = 0
    for s in range(0, len(pages), batch):
        r = vm.guest_accept_many(pages[s:s + batch] << 12, PAGE, chunk=PAGE)
        bad += int(np.count_nonzero(r.errno))
    return bad
