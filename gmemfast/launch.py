"""Whole launches of firmware images through the model's own populate path.

``snp_measure_ovmf`` and ``tdx_measure_ovmf`` build a VM, place the image below 4 GiB
as QEMU does, load every page the launch measures through ``KVM_SEV_SNP_LAUNCH_UPDATE`` /
``KVM_TDX_INIT_MEM_REGION`` and return the launch measurement with the work it cost.

Two flows (the seed message's argument):

* ``"in-place"``: the guest_memfd starts shared; the host writes the image into it while
  shared, converts each range to private with ``PRESERVE``, and populates with no source.
* ``"legacy"``: the VM keeps attributes per GFN; the image sits in separate host memory
  and populate copies it in (SNP in platform code, TDX in the TDX module).

Both give the same measurement and the same final page state; their counters differ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from .firmware import OvmfImage, snp_launch_plan, tdx_launch_plan
from .gmem import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
)
from .platforms.tdx import KVM_TDX_MEASURE_MEMORY_REGION
from .units import PAGE_SHIFT, PAGE_SIZE
from .vm import VM

FLOWS = ("in-place", "legacy")
LOW_MEMORY = 4 << 30     # the image ends at 4 GiB; one guest_memfd covers [0, 4 GiB)


@dataclass
class LaunchResult:
    """A launch measurement (SNP launch digest or TDX MRTD) and what it cost."""
    digest: bytes
    counters: Mapping[str, int]
    vm: VM = field(repr=False)
    gmem: object = field(repr=False)
    flow: str = "in-place"
    pages: int = 0

    def hex(self) -> str:
        return self.digest.hex()


def _image(ovmf) -> OvmfImage:
    if isinstance(ovmf, OvmfImage):
        return ovmf
    if isinstance(ovmf, (bytes, bytearray, memoryview)):
        return OvmfImage.from_bytes(bytes(ovmf))
    return OvmfImage.from_file(os.fspath(ovmf))


def _check_flow(flow: str) -> None:
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}: choose 'in-place' or 'legacy'")


def _machine(vm_type: str, flow: str, vm, gmem, policies):
    """The VM and the guest_memfd covering low memory, made here unless given."""
    if vm is None:
        vm = VM(vm_type, in_place=flow == "in-place", **policies)
    elif vm.in_place != (flow == "in-place"):
        raise ValueError(f"flow {flow!r} does not match the given VM ({'in-place' if vm.in_place else 'legacy'})")
    if gmem is None:
        flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED if vm.in_place else 0
        gmem = vm.create_guest_memfd(LOW_MEMORY, flags)
        vm.set_user_memory_region(0, 0, LOW_MEMORY, gmem)
    return vm, gmem


def _load_in_place(vm: VM, gpa: int, contents, nr_pages: int) -> None:
    """In-place flow, steps 1-3: load while shared, convert to private keeping the data."""
    ms = vm.memslot_for(gpa)
    off = ms.gmem_offset + gpa - ms.gpa
    if contents is not None:
        ms.gmem.host_write(off, contents)
    ms.gmem.set_memory_attributes(off, nr_pages << PAGE_SHIFT, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                  KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)


def snp_measure_ovmf(ovmf, *, vcpus=1, vcpu_type="EPYC-v4", vmm_type="QEMU", flow="in-place",
                     vm=None, gmem=None, **policies) -> LaunchResult:
    """Launch ``ovmf`` (a path, bytes or ``OvmfImage``) on an SNP VM; the digest equals
    what ``sev-snp-measure`` computes for the same image and options."""
    _check_flow(flow)
    image = _image(ovmf)
    plan = snp_launch_plan(image, vcpus, vcpu_type, vmm_type)
    vm, gmem = _machine("snp", flow, vm, gmem, policies)
    pages = 0
    for run in plan.runs:
        length = run.nr_pages << PAGE_SHIFT
        if flow == "in-place":
            _load_in_place(vm, run.gpa, run.contents, run.nr_pages)
            source = None
        else:
            vm.set_memory_attributes(run.gpa, length, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            source = run.contents
        upd = vm.snp_launch_update(run.gpa >> PAGE_SHIFT, source, length, run.page_type)
        while upd.len:
            upd = vm.snp_launch_update(upd.gfn_start, upd.uaddr, upd.len, upd.type)
        pages += run.nr_pages
    digest = vm.snp_launch_finish(plan.vmsas)
    return LaunchResult(digest, vm.counters, vm, gmem, flow, pages + len(plan.vmsas))


def tdx_measure_ovmf(ovmf, *, flow="in-place", vm=None, gmem=None, **policies) -> LaunchResult:
    """Build a TD from ``ovmf``'s TDVF sections (a synthetic TDVF layout when the image
    has none) and return MRTD."""
    _check_flow(flow)
    image = _image(ovmf)
    plan = tdx_launch_plan(image)
    vm, gmem = _machine("tdx", flow, vm, gmem, policies)
    pages = 0
    for run in plan.runs:
        flags = KVM_TDX_MEASURE_MEMORY_REGION if run.measure else 0
        if flow == "in-place":
            _load_in_place(vm, run.gpa, run.contents, run.nr_pages)
            source = None
        else:
            vm.set_memory_attributes(run.gpa, run.nr_pages << PAGE_SHIFT, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            source = run.contents
        region = vm.tdx_init_mem_region(source, run.gpa, run.nr_pages, flags)
        assert region.nr_pages == 0
        pages += run.nr_pages
    digest = vm.tdx_finalize()
    return LaunchResult(digest, vm.counters, vm, gmem, flow, pages)


__all__ = ["FLOWS", "LaunchResult", "snp_measure_ovmf", "tdx_measure_ovmf", "PAGE_SIZE"]
