"""TDX adapter: ``KVM_TDX_INIT_MEM_REGION`` / ``KVM_TDX_FINALIZE_VM`` and the secure EPT.

Each guest_memfd page's trusted-entity state is its secure-EPT entry: none, pending
(TDH.MEM.PAGE.AUG, not yet accepted), mapped or blocked. TDH.MEM.PAGE.ADD maps a page
straight into the mapped state and the TDX module copies the source into it; with
``KVM_TDX_MEASURE_MEMORY_REGION`` sixteen TDH.MR.EXTEND calls measure its 256-byte chunks
into MRTD. The generic populate loop (``populate.gmem_populate``) runs the per-page loop
(docs/model.md §4.7).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from .._layout import SEPT_MAPPED, TE_NONE
from ..errors import GmemError
from ..populate import GmemRange, advance_source, check_source, gmem_populate
from ..uapi import KVM_TDX_MEASURE_MEMORY_REGION
from ..units import PAGE_SHIFT, PAGE_SIZE, as_int
from .measure import TDX_MR_EXTEND_CHUNK, TdxMrtd


@dataclass(frozen=True)
class TdxRegion:
    """``struct kvm_tdx_init_mem_region`` as returned: advanced past the pages done."""
    source_addr: object   # bytes-like (advanced), GmemRange (advanced) or None (in place)
    gpa: int
    nr_pages: int


class TdxPlatform:
    """Per-TD state: MRTD and the build's progress."""

    def __init__(self, vm):
        self.vm = vm
        self.mrtd = TdxMrtd()

    def init_mem_region(self, source, gpa, nr_pages, flags=0) -> TdxRegion:
        vm = self.vm
        what = "KVM_TDX_INIT_MEM_REGION"
        gpa = as_int(gpa, "gpa")
        nr_pages = as_int(nr_pages, "nr_pages")
        flags = as_int(flags, "flags")
        if vm.finalized:
            raise GmemError(errno.EINVAL, f"{what}: the TD is finalized; no more initial memory")
        if flags & ~KVM_TDX_MEASURE_MEMORY_REGION:
            raise GmemError(errno.EINVAL, f"{what}: unknown flags {flags & ~1:#x}")
        if gpa % PAGE_SIZE or gpa < 0:
            raise GmemError(errno.EINVAL, f"{what}: gpa {gpa:#x} is not page aligned")
        if nr_pages <= 0:
            raise GmemError(errno.EINVAL, f"{what}: nr_pages is {nr_pages}")
        if gpa + (nr_pages << PAGE_SHIFT) > 1 << 52:
            raise GmemError(errno.EINVAL, f"{what}: gpa {gpa:#x} + {nr_pages} pages overflows the "
                                          "guest physical address space")
        if source is None:
            if not vm.in_place:
                raise GmemError(errno.EINVAL, f"{what}: a source is needed when the TD is not in-place")
        else:
            check_source(source, what)
            if isinstance(source, GmemRange) and source.offset % PAGE_SIZE:
                raise GmemError(errno.EINVAL, f"{what}: source offset {source.offset:#x} is not page aligned")
        measure = bool(flags & KVM_TDX_MEASURE_MEMORY_REGION)
        legacy = source is not None or not vm.in_place

        def post_populate(ms, p, g_addr, src):
            store = ms.gmem.store
            if store.te_state(p) != TE_NONE:
                return errno.EIO    # the secure-EPT entry is already present
            store.allocate(p, p + 1)
            if src is not None:
                store.set_page_bytes(p, src)   # the TDX module copies the source page
            store.set_te(p, p + 1, SEPT_MAPPED, guest_mapped=True)
            store.count_work("tdx_seamcall_page_add")
            store.count_work("pages_populated_legacy" if legacy else "pages_populated_inplace")
            before = self.mrtd.hash_bytes
            self.mrtd.page_add(g_addr)
            if measure:
                data = store.page_bytes(p)
                for off in range(0, PAGE_SIZE, TDX_MR_EXTEND_CHUNK):
                    self.mrtd.mr_extend(g_addr + off, data[off:off + TDX_MR_EXTEND_CHUNK])
                store.count_work("tdx_seamcall_mr_extend", PAGE_SIZE // TDX_MR_EXTEND_CHUNK)
            store.count_work("hash_bytes", self.mrtd.hash_bytes - before)
            return 0

        done = 0
        err = None
        # the kernel loops a page at a time until done, an error or a signal
        while done < nr_pages:
            try:
                n = gmem_populate(vm, gpa + (done << PAGE_SHIFT), nr_pages - done,
                                  advance_source(source, done << PAGE_SHIFT), post_populate, what=what)
            except GmemError as exc:
                err = exc
                break
            done += n
        region = TdxRegion(advance_source(source, done << PAGE_SHIFT), gpa + (done << PAGE_SHIFT),
                           nr_pages - done)
        if err is not None:
            err.region = region
            raise err
        return region

    def finalize(self) -> bytes:
        vm = self.vm
        if vm.finalized:
            raise GmemError(errno.EINVAL, "KVM_TDX_FINALIZE_VM: the TD is already finalized")
        vm.set_finalized()
        return self.mrtd.finalize()
