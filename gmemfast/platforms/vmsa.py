"""SEV-SNP VMSAs: each vCPU's initial save area, as ``SNP_LAUNCH_FINISH`` measures it.

Byte-identical to sev-snp-measure's (IBM, Apache-2.0: ``vmsa.py``, ``vcpu_types.py``):
the register state QEMU, EC2 or GCE give a vCPU at reset, laid out as the SEV-ES save
area (AMD APM vol. 2, table B-4).
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from ..units import PAGE_SIZE

__all__ = ["CPU_SIGNATURES", "MAX_VCPUS", "VMM_TYPES", "vmsa_pages", "check_vcpus", "vmm_profile"]

#: The most vCPUs a VM may have: KVM_MAX_VCPUS at its largest x86 configuration
#: (CONFIG_KVM_MAX_NR_VCPUS=4096, arch/x86/kvm/Kconfig).
MAX_VCPUS = 4096

def _cpu_signature(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001_EAX from family, model and stepping (AMD CPUID spec #25481)."""
    family_low, family_high = (0xF, (family - 0xF) & 0xFF) if family > 0xF else (family, 0)
    return ((family_high << 20) | (((model >> 4) & 0xF) << 16) | (family_low << 8)
            | ((model & 0xF) << 4) | (stepping & 0xF))


_EPYC = _cpu_signature(23, 1, 2)
_ROME = _cpu_signature(23, 49, 0)
_MILAN = _cpu_signature(25, 1, 1)
_GENOA = _cpu_signature(25, 17, 0)

# QEMU's builtin x86 CPU models that sev-snp-measure knows, with their signatures.
CPU_SIGNATURES = {
    **{name: _EPYC for name in ("EPYC", "EPYC-v1", "EPYC-v2", "EPYC-IBPB", "EPYC-v3", "EPYC-v4")},
    **{name: _ROME for name in ("EPYC-Rome", "EPYC-Rome-v1", "EPYC-Rome-v2", "EPYC-Rome-v3")},
    **{name: _MILAN for name in ("EPYC-Milan", "EPYC-Milan-v1", "EPYC-Milan-v2")},
    **{name: _GENOA for name in ("EPYC-Genoa", "EPYC-Genoa-v1")},
    "EPYC-Turin": _cpu_signature(26, 0, 0),
}


class _VmmProfile(NamedTuple):
    """Initial register state that differs between VMMs (sev-snp-measure ``vmsa.py``)."""

    cs_attrib: int
    cs_attrib_bsp: int      # EC2 marks the BSP's CS not accessed
    ss_attrib: int
    tr_attrib: int
    rdx: int | None         # None: the vCPU signature
    mxcsr: int
    x87_fcw: int
    g_pat: int


_PAT_DEFAULT = 0x0007040600070406   # PAT MSR power-on value (AMD APM vol. 2, A.3)

VMM_TYPES = {
    "QEMU": _VmmProfile(0x9B, 0x9B, 0x93, 0x8B, None, 0x1F80, 0x37F, _PAT_DEFAULT),
    "EC2": _VmmProfile(0x9B, 0x9A, 0x92, 0x83, 0x600, 0, 0, _PAT_DEFAULT),
    "GCE": _VmmProfile(0x9B, 0x9B, 0x93, 0x8B, 0x600, 0, 0, 0x00070106),
}

_BSP_EIP = 0xFFFFFFF0

# Offsets in the SEV-ES save area (struct sev_es_save_area, AMD APM vol. 2 table B-4).
_SEG = struct.Struct("<HHIQ")   # selector, attrib, limit, base
_VMSA_SEGMENTS = {"es": 0x00, "cs": 0x10, "ss": 0x20, "ds": 0x30, "fs": 0x40, "gs": 0x50,
                  "gdtr": 0x60, "ldtr": 0x70, "idtr": 0x80, "tr": 0x90}
_VMSA_U64 = {"efer": 0xD0, "cr4": 0x148, "cr0": 0x158, "dr7": 0x160, "dr6": 0x168,
             "rflags": 0x170, "rip": 0x178, "g_pat": 0x268, "rdx": 0x310,
             "sev_features": 0x3B0, "xcr0": 0x3E8}
_VMSA_MXCSR = 0x408      # u32
_VMSA_X87_FCW = 0x410    # u16


def vmm_profile(vmm_type: str) -> _VmmProfile:
    profile = VMM_TYPES.get(str(vmm_type).upper())
    if profile is None:
        raise ValueError(f"unknown VMM type {vmm_type!r}: use one of {', '.join(VMM_TYPES)}")
    return profile


def _save_area(eip: int, sev_features: int, vcpu_sig: int, vmm: _VmmProfile) -> bytes:
    """The 4 KiB VMSA of a vCPU at reset with real-mode entry ``eip``."""
    page = bytearray(PAGE_SIZE)
    cs_attrib = vmm.cs_attrib_bsp if eip == _BSP_EIP else vmm.cs_attrib
    segments = {
        "es": (0, 0x93, 0xFFFF, 0), "cs": (0xF000, cs_attrib, 0xFFFF, eip & 0xFFFF0000),
        "ss": (0, vmm.ss_attrib, 0xFFFF, 0), "ds": (0, 0x93, 0xFFFF, 0),
        "fs": (0, 0x93, 0xFFFF, 0), "gs": (0, 0x93, 0xFFFF, 0),
        "gdtr": (0, 0, 0xFFFF, 0), "ldtr": (0, 0x82, 0xFFFF, 0),
        "idtr": (0, 0, 0xFFFF, 0), "tr": (0, vmm.tr_attrib, 0xFFFF, 0),
    }
    for name, seg in segments.items():
        _SEG.pack_into(page, _VMSA_SEGMENTS[name], *seg)
    registers = {
        "efer": 0x1000,          # KVM sets EFER.SVME
        "cr4": 0x40,             # KVM sets CR4.MCE
        "cr0": 0x10, "dr7": 0x400, "dr6": 0xFFFF0FF0, "rflags": 0x2,
        "rip": eip & 0xFFFF,
        "g_pat": vmm.g_pat,
        "rdx": vcpu_sig if vmm.rdx is None else vmm.rdx,
        "sev_features": sev_features,
        "xcr0": 0x1,
    }
    for name, value in registers.items():
        struct.pack_into("<Q", page, _VMSA_U64[name], value)
    struct.pack_into("<I", page, _VMSA_MXCSR, vmm.mxcsr)
    struct.pack_into("<H", page, _VMSA_X87_FCW, vmm.x87_fcw)
    return bytes(page)


def check_vcpus(vcpus) -> int:
    """``vcpus`` as an int from 1 to :data:`MAX_VCPUS`, else ``ValueError`` naming it."""
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
        raise ValueError(f"vcpus must be an int of at least 1, not {vcpus!r}")
    if vcpus > MAX_VCPUS:
        raise ValueError(f"vcpus {vcpus} is more than KVM allows: at most {MAX_VCPUS} "
                         "(KVM_MAX_VCPUS)")
    return vcpus


def vmsa_pages(ovmf, vcpus: int, vcpu_type: str = "EPYC-v4", vmm_type: str = "QEMU",
               guest_features: int = 0x1, *, vcpu_sig: int | None = None) -> list[bytes]:
    """The initial VMSA page of each vCPU, as measured by ``SNP_LAUNCH_FINISH``.

    The BSP starts at the reset vector ``0xFFFFFFF0``; each AP at the image's SEV-ES
    reset EIP. ``guest_features`` is the VMSA's SEV_FEATURES (bit 0: SNPActive);
    ``vcpu_sig`` (CPUID signature, loaded into RDX by QEMU) overrides the one of
    ``vcpu_type`` (a key of :data:`CPU_SIGNATURES`). ``vmm_type`` is QEMU, EC2 or GCE.
    Byte-identical to sev-snp-measure's SNP VMSAs.
    """
    vcpus = check_vcpus(vcpus)
    vmm = vmm_profile(vmm_type)
    if vcpu_sig is None:
        if vcpu_type not in CPU_SIGNATURES:
            raise ValueError(f"unknown vCPU type {vcpu_type!r}: use one of {', '.join(CPU_SIGNATURES)}")
        vcpu_sig = CPU_SIGNATURES[vcpu_type]
    pages = [_save_area(_BSP_EIP, guest_features, vcpu_sig, vmm)]
    if vcpus > 1:
        if not ovmf.sev_es_reset_eip:
            raise ValueError(
                f"{vcpus} vCPUs need an AP reset EIP, but the image has no SEV-ES reset block "
                "(OVMF footer entry 00f771de-1a7e-4fcb-890e-68c77e2fb44e)"
            )
        ap = _save_area(ovmf.sev_es_reset_eip, guest_features, vcpu_sig, vmm)
        pages += [ap] * (vcpus - 1)
    return pages
