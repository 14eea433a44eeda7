"""gmemfast: a fast, page-exact model of Linux KVM guest_memfd for confidential VMs."""
from .errors import GmemError, MemoryFaultExit, MmioExit, SigBusError
from .gmem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_HUGETLB,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
    KVM_SET_MEMORY_ATTRIBUTES2_ZERO,
    BatchResult,
    GuestMemfd,
    HostMapping,
    Pin,
)
from .units import PAGE_SIZE, format_size, parse_size
from .vm import VM

__version__ = "0.1.0"

__all__ = [
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
    "parse_size",
    "format_size",
]
