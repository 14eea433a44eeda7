"""SEV-SNP adapter: ``KVM_SEV_SNP_LAUNCH_UPDATE`` / ``LAUNCH_FINISH`` and the RMP.

The RMP entry of each guest_memfd page is the page's trusted-entity state: hypervisor-
owned (``TE_NONE``) or guest-owned and validated (``RMP_VALIDATED``). It is kept apart
from guest_memfd's shareability and from the legacy per-GFN attributes. This adapter is
the platform's per-page ``post_populate`` callback plus the launch digest; the generic
populate loop (``populate.gmem_populate``) does the rest (docs/model.md §4.7).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from .._layout import RMP_VALIDATED, TE_NONE
from ..errors import GmemError
from ..populate import advance_source, check_source, gmem_populate
from ..uapi import (KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_VMSA,
                    KVM_SEV_SNP_PAGE_TYPE_ZERO, SNP_LAUNCH_UPDATE_TYPES)
from ..units import PAGE_SHIFT, PAGE_SIZE, as_int
from .measure import SNP_VMSA_GPA, SnpLaunchDigest

LAUNCH_UPDATE_TYPES = SNP_LAUNCH_UPDATE_TYPES


@dataclass(frozen=True)
class SnpLaunchUpdate:
    """``struct kvm_sev_snp_launch_update`` as returned: advanced past the pages done."""
    gfn_start: int
    uaddr: object      # bytes-like (advanced), GmemRange (advanced), or None (in place)
    len: int
    type: int
    flags: int = 0


class SnpPlatform:
    """Per-VM SNP state: the launch digest."""

    def __init__(self, vm):
        self.vm = vm
        self.digest = SnpLaunchDigest()

    def launch_update(self, gfn_start, uaddr, length, page_type, flags=0) -> SnpLaunchUpdate:
        vm = self.vm
        gfn_start = as_int(gfn_start, "gfn_start")
        length = as_int(length, "len")
        page_type = as_int(page_type, "type")
        flags = as_int(flags, "flags")
        what = "KVM_SEV_SNP_LAUNCH_UPDATE"
        if vm.finalized:
            raise GmemError(errno.EINVAL, f"{what}: the guest is already launched (LAUNCH_FINISH done)")
        if length <= 0 or length % PAGE_SIZE:
            raise GmemError(errno.EINVAL, f"{what}: len {length:#x} must be a positive multiple of 4 KiB")
        if flags:
            raise GmemError(errno.EINVAL, f"{what}: flags {flags:#x} must be 0")
        if page_type not in LAUNCH_UPDATE_TYPES:
            raise GmemError(errno.EINVAL, f"{what}: unknown page type {page_type} (valid: "
                                          f"{', '.join(f'{k} {v}' for k, v in LAUNCH_UPDATE_TYPES.items())})")
        if gfn_start < 0 or (gfn_start + (length >> PAGE_SHIFT)) << PAGE_SHIFT >= 1 << 52:
            raise GmemError(errno.EINVAL, f"{what}: gfn range {gfn_start:#x} + {length >> PAGE_SHIFT} "
                                          "pages is outside the guest physical address space")
        if uaddr is None and page_type != KVM_SEV_SNP_PAGE_TYPE_ZERO and not vm.in_place:
            raise GmemError(errno.EINVAL, f"{what}: type {LAUNCH_UPDATE_TYPES[page_type]} needs a "
                                          "source (uaddr) when the VM is not in-place")
        check_source(uaddr, what)
        legacy = uaddr is not None or not vm.in_place

        def post_populate(ms, p, gpa, src):
            store = ms.gmem.store
            if store.te_state(p) != TE_NONE:
                return errno.EEXIST   # RMP entry not hypervisor-owned: already in the guest
            store.allocate(p, p + 1)
            if page_type == KVM_SEV_SNP_PAGE_TYPE_ZERO:
                store.set_page_bytes(p, None)
            elif src is not None:
                # legacy flow: platform code copies the shared source into the private page
                store.set_page_bytes(p, src)
                store.count_work("bytes_copied", PAGE_SIZE)
            store.set_te(p, p + 1, RMP_VALIDATED)
            store.count_work("rmp_updates")
            store.count_work("snp_fw_launch_update")
            store.count_work("pages_populated_legacy" if legacy else "pages_populated_inplace")
            before = self.digest.hash_bytes
            measured = page_type == KVM_SEV_SNP_PAGE_TYPE_NORMAL
            self.digest.update(page_type, gpa, store.page_bytes(p) if measured else None)
            store.count_work("hash_bytes", self.digest.hash_bytes - before)
            return 0

        done = gmem_populate(vm, gfn_start << PAGE_SHIFT, length >> PAGE_SHIFT, uaddr,
                             post_populate, what=what)
        nbytes = done << PAGE_SHIFT
        new_uaddr = uaddr if page_type == KVM_SEV_SNP_PAGE_TYPE_ZERO else advance_source(uaddr, nbytes)
        return SnpLaunchUpdate(gfn_start + done, new_uaddr, length - nbytes, page_type, flags)

    def launch_finish(self, vmsas=()) -> bytes:
        vm = self.vm
        if vm.finalized:
            raise GmemError(errno.EINVAL, "KVM_SEV_SNP_LAUNCH_FINISH: the guest is already launched")
        pages = []
        for n, vmsa in enumerate(vmsas):
            b = bytes(memoryview(vmsa).cast("B"))
            if len(b) != PAGE_SIZE:
                raise GmemError(errno.EINVAL, f"KVM_SEV_SNP_LAUNCH_FINISH: VMSA {n} is {len(b)} bytes, "
                                              "not one 4 KiB page")
            pages.append(b)
        for b in pages:
            # each vCPU's VMSA: RMPUPDATE to guest-owned, then SNP_LAUNCH_UPDATE type VMSA
            before = self.digest.hash_bytes
            self.digest.update(KVM_SEV_SNP_PAGE_TYPE_VMSA, SNP_VMSA_GPA, b)
            vm.count_work("hash_bytes", self.digest.hash_bytes - before)
            vm.count_work("rmp_updates")
            vm.count_work("snp_fw_launch_update")   # a VMSA page is one more LAUNCH_UPDATE
        vm.count_work("snp_fw_launch_finish")
        vm.set_finalized()
        return self.digest.digest
