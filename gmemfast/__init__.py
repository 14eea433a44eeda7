"""gmemfast: a fast, page-exact model of Linux KVM guest_memfd for confidential VMs."""
from .errors import GmemError, MemoryFaultExit, MmioExit, SigBusError
from .version import __version__
from .uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_HUGETLB,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
    KVM_SET_MEMORY_ATTRIBUTES2_ZERO,
    KVM_SEV_SNP_PAGE_TYPE_CPUID,
    KVM_SEV_SNP_PAGE_TYPE_NORMAL,
    KVM_SEV_SNP_PAGE_TYPE_SECRETS,
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
    KVM_SEV_SNP_PAGE_TYPE_ZERO,
    KVM_TDX_MEASURE_MEMORY_REGION,
)
from .gmem import BatchResult, GuestMemfd, HostMapping, Pin
from .units import PAGE_SIZE, format_size, parse_size
from .populate import GmemRange
from .vm import VM
from .platforms.snp import SnpLaunchUpdate
from .platforms.tdx import TdxRegion
from .launch import LaunchResult, snp_measure_ovmf, tdx_measure_ovmf
from .cost import CostModel, Estimate
from .sweep import sweep


__all__ = [
    "__version__",
    "PAGE_SIZE",
    "GUEST_MEMFD_FLAG_MMAP",
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_NO_DIRECT_MAP",
    "GUEST_MEMFD_FLAG_HUGETLB",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE",
    "KVM_SET_MEMORY_ATTRIBUTES2_ZERO",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "GmemError",
    "SigBusError",
    "MemoryFaultExit",
    "MmioExit",
    "GuestMemfd",
    "VM",
    "Pin",
    "HostMapping",
    "BatchResult",
    "GmemRange",
    "KVM_TDX_MEASURE_MEMORY_REGION",
    "KVM_SEV_SNP_PAGE_TYPE_NORMAL",
    "KVM_SEV_SNP_PAGE_TYPE_ZERO",
    "KVM_SEV_SNP_PAGE_TYPE_UNMEASURED",
    "KVM_SEV_SNP_PAGE_TYPE_SECRETS",
    "KVM_SEV_SNP_PAGE_TYPE_CPUID",
    "TdxRegion",
    "SnpLaunchUpdate",
    "LaunchResult",
    "snp_measure_ovmf",
    "tdx_measure_ovmf",
    "CostModel",
    "Estimate",
    "parse_size",
    "format_size",
    "sweep",
]
