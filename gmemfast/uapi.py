"""Every kernel ABI constant the model uses, with the kernel's names and values.

guest_memfd creation flags and memory attributes come from ``include/uapi/linux/kvm.h``
(``GUEST_MEMFD_FLAG_HUGETLB`` is the model's value for the hugetlb series' flag), the
content modes of ``KVM_SET_MEMORY_ATTRIBUTES2`` from the in-place conversion series,
``FALLOC_FL_*`` from ``include/uapi/linux/falloc.h``, the SNP page types from
``arch/x86/include/uapi/asm/kvm.h`` and the TDX measure flag from the same file.
"""
from __future__ import annotations

# ---- KVM_CREATE_GUEST_MEMFD flags
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GUEST_MEMFD_FLAG_NO_DIRECT_MAP = 1 << 2
GUEST_MEMFD_FLAG_HUGETLB = 1 << 3
GUEST_MEMFD_KNOWN_FLAGS = (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
                           | GUEST_MEMFD_FLAG_NO_DIRECT_MAP | GUEST_MEMFD_FLAG_HUGETLB)

# ---- memory attributes (KVM_SET_MEMORY_ATTRIBUTES, KVM_SET_MEMORY_ATTRIBUTES2)
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_KNOWN_ATTRIBUTES = KVM_MEMORY_ATTRIBUTE_PRIVATE
KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE = 1 << 0
KVM_SET_MEMORY_ATTRIBUTES2_ZERO = 1 << 1
KVM_SET_MEMORY_ATTRIBUTES2_KNOWN_FLAGS = (KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
                                          | KVM_SET_MEMORY_ATTRIBUTES2_ZERO)

# ---- fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_KNOWN_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

# ---- KVM_TDX_INIT_MEM_REGION
KVM_TDX_MEASURE_MEMORY_REGION = 1 << 0

# ---- KVM_SEV_SNP_LAUNCH_UPDATE page types (VMSA is the firmware's type 2, used by
# SNP_LAUNCH_FINISH for each vCPU's save area and not accepted by LAUNCH_UPDATE)
KVM_SEV_SNP_PAGE_TYPE_NORMAL = 1
KVM_SEV_SNP_PAGE_TYPE_VMSA = 2
KVM_SEV_SNP_PAGE_TYPE_ZERO = 3
KVM_SEV_SNP_PAGE_TYPE_UNMEASURED = 4
KVM_SEV_SNP_PAGE_TYPE_SECRETS = 5
KVM_SEV_SNP_PAGE_TYPE_CPUID = 6

SNP_PAGE_TYPE_NAMES = {
    KVM_SEV_SNP_PAGE_TYPE_NORMAL: "NORMAL",
    KVM_SEV_SNP_PAGE_TYPE_VMSA: "VMSA",
    KVM_SEV_SNP_PAGE_TYPE_ZERO: "ZERO",
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED: "UNMEASURED",
    KVM_SEV_SNP_PAGE_TYPE_SECRETS: "SECRETS",
    KVM_SEV_SNP_PAGE_TYPE_CPUID: "CPUID",
}
# The types KVM_SEV_SNP_LAUNCH_UPDATE accepts.
SNP_LAUNCH_UPDATE_TYPES = {t: n for t, n in SNP_PAGE_TYPE_NAMES.items()
                           if t != KVM_SEV_SNP_PAGE_TYPE_VMSA}

# ---- VM types, by the names the model uses (KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM,
# KVM_X86_TDX_VM)
VM_TYPES = ("sw-protected", "snp", "tdx")
