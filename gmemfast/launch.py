"""Launches: firmware (and kernel) images loaded and measured through the model's own
populate path (docs/model.md §4.7).

:class:`Loader` is the one loader, used by ``snp_measure_ovmf`` / ``tdx_measure_ovmf``
and by the scenarios. It loads each run of launch pages by the VM's flow and hands it to
the platform (``KVM_SEV_SNP_LAUNCH_UPDATE`` / ``KVM_TDX_INIT_MEM_REGION``, called again
until every page is done):

* ``"in-place"``: the host writes the data while the pages are shared, converts them to
  private with ``PRESERVE``, and populates with no source.
* ``"legacy"``: the VM keeps attributes per GFN; the data sits in separate host memory
  and populate copies it in (SNP in platform code, TDX in the TDX module).

Both give the same measurement and the same final page state; their counters differ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from .firmware import OvmfImage, snp_launch_plan, synthetic_ovmf, tdx_launch_plan
from .uapi import (FALLOC_FL_KEEP_SIZE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                   KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
                   KVM_TDX_MEASURE_MEMORY_REGION)
from .units import PAGE_SHIFT
from .vm import VM

__all__ = ["FLOWS", "LaunchResult", "LaunchRun", "Loader", "load_image", "launch_runs",
           "snp_measure_ovmf", "tdx_measure_ovmf"]

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


@dataclass(frozen=True)
class LaunchRun:
    """Consecutive launch pages of one kind: ``kind`` is the SNP page type, whether TDX
    measures them (``KVM_TDX_MEASURE_MEMORY_REGION``), or ``None`` on a VM without a
    trusted entity; ``contents`` is ``None`` where there is no source (SNP ZERO)."""
    gpa: int
    nr_pages: int
    contents: bytes | None
    kind: object


def load_image(ovmf) -> OvmfImage:
    """An :class:`OvmfImage` from a path, bytes, an image, or ``"synthetic"``/``None`` (a
    small generated image)."""
    if isinstance(ovmf, OvmfImage):
        return ovmf
    if ovmf is None or (isinstance(ovmf, str) and ovmf == "synthetic"):
        return OvmfImage.from_bytes(synthetic_ovmf())
    if isinstance(ovmf, (bytes, bytearray, memoryview)):
        return OvmfImage.from_bytes(bytes(ovmf))
    return OvmfImage.from_file(os.fspath(ovmf))


def launch_runs(vm_type: str, image: OvmfImage, vcpus: int = 1, vcpu_type: str = "EPYC-v4",
                vmm_type: str = "QEMU") -> tuple[list[LaunchRun], list]:
    """The runs of pages a launch of ``image`` loads on a ``vm_type`` VM, and the VMSAs
    (SNP) that ``SNP_LAUNCH_FINISH`` measures."""
    if vm_type == "snp":
        plan = snp_launch_plan(image, vcpus, vcpu_type, vmm_type)
        return [LaunchRun(r.gpa, r.nr_pages, r.contents, r.page_type) for r in plan.runs], plan.vmsas
    if vm_type == "tdx":
        plan = tdx_launch_plan(image)
        return [LaunchRun(r.gpa, r.nr_pages, r.contents, bool(r.measure)) for r in plan.runs], []
    return [LaunchRun(image.gpa, image.size >> PAGE_SHIFT, image.data, None)], []


class Loader:
    """Loads launch runs into a VM's memory by ``flow`` and populates them.

    ``mark_private``: in the legacy flow, mark each run private in the VM's per-GFN
    attributes first (a VMM that marked all memory private at start-up does not).
    ``share_first``: in the in-place flow, convert each run to shared before loading it
    (for memory created private). Subclasses may route conversions and writes elsewhere
    (the scenarios record them) by overriding :meth:`convert` and :meth:`write`.
    """

    def __init__(self, vm: VM, flow: str, *, mark_private: bool = True, share_first: bool = False):
        check_flow(flow)
        self.vm = vm
        self.flow = flow
        self.mark_private = mark_private
        self.share_first = share_first

    def convert(self, gmem, offset: int, size: int, attributes: int, flags: int = 0) -> None:
        gmem.set_memory_attributes(offset, size, attributes, flags)

    def write(self, gmem, offset: int, data) -> None:
        gmem.host_write(offset, data)

    def load_run(self, run: LaunchRun) -> None:
        """Load one run and hand every page of it to the platform."""
        self.populate(run, self.load(run))

    def _where(self, run: LaunchRun):
        ms = self.vm.memslot_for(run.gpa)
        if ms is None or ms.gmem is None:
            raise ValueError(f"launch page at gpa {run.gpa:#x} is outside guest memory")
        return ms.gmem, ms.gmem_offset + run.gpa - ms.gpa

    def load(self, run: LaunchRun):
        """Put a run's data where the flow wants it; returns the populate source."""
        g, off = self._where(run)
        length = run.nr_pages << PAGE_SHIFT
        if self.flow == "in-place":
            # (create or convert to) shared -> load while shared -> private with PRESERVE
            if self.share_first:
                self.convert(g, off, length, 0)
            if run.contents is not None:
                self.write(g, off, run.contents)
            self.convert(g, off, length, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                         KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)
            return None
        if self.mark_private and self.vm.vm_type != "sw-protected":
            self.vm.set_memory_attributes(run.gpa, length, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        return run.contents

    def populate(self, run: LaunchRun, source) -> None:
        """Hand a loaded run to the platform, calling again until every page is done."""
        vm = self.vm
        if vm.vm_type == "snp":
            upd = vm.snp_launch_update(run.gpa >> PAGE_SHIFT, source, run.nr_pages << PAGE_SHIFT,
                                       run.kind)
            while upd.len:
                upd = vm.snp_launch_update(upd.gfn_start, upd.uaddr, upd.len, upd.type)
        elif vm.vm_type == "tdx":
            flags = KVM_TDX_MEASURE_MEMORY_REGION if run.kind else 0
            region = vm.tdx_init_mem_region(source, run.gpa, run.nr_pages, flags)
            while region.nr_pages:
                region = vm.tdx_init_mem_region(region.source_addr, region.gpa, region.nr_pages, flags)
        elif source is not None:
            vm.guest_write(run.gpa, source, private=True)   # no trusted entity: the guest writes it
        elif run.contents is None:
            g, off = self._where(run)
            g.fallocate(FALLOC_FL_KEEP_SIZE, off, run.nr_pages << PAGE_SHIFT)

    def finish(self, vmsas=()) -> bytes | None:
        """Finish the launch: the measurement (SNP launch digest, TDX MRTD), or None."""
        if self.vm.vm_type == "snp":
            return self.vm.snp_launch_finish(vmsas)
        if self.vm.vm_type == "tdx":
            return self.vm.tdx_finalize()
        return None


def check_flow(flow: str) -> None:
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


def _launch(vm_type, ovmf, flow, vm, gmem, policies, **plan_args) -> LaunchResult:
    check_flow(flow)
    image = load_image(ovmf)
    runs, vmsas = launch_runs(vm_type, image, **plan_args)
    vm, gmem = _machine(vm_type, flow, vm, gmem, policies)
    loader = Loader(vm, flow)
    for run in runs:
        loader.load_run(run)
    digest = loader.finish(vmsas)
    return LaunchResult(digest, vm.counters, vm, gmem, flow,
                        sum(r.nr_pages for r in runs) + len(vmsas))


def snp_measure_ovmf(ovmf, *, vcpus=1, vcpu_type="EPYC-v4", vmm_type="QEMU", flow="in-place",
                     vm=None, gmem=None, **policies) -> LaunchResult:
    """Launch ``ovmf`` (a path, bytes or ``OvmfImage``) on an SNP VM; the digest equals
    what ``sev-snp-measure`` computes for the same image and options."""
    return _launch("snp", ovmf, flow, vm, gmem, policies, vcpus=vcpus, vcpu_type=vcpu_type,
                   vmm_type=vmm_type)


def tdx_measure_ovmf(ovmf, *, flow="in-place", vm=None, gmem=None, **policies) -> LaunchResult:
    """Build a TD from ``ovmf``'s TDVF sections (a synthetic TDVF layout when the image
    has none) and return MRTD."""
    return _launch("tdx", ovmf, flow, vm, gmem, policies)
