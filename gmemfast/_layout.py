"""Names of the page-state bits, the policy codes, the invariants and the work counters.

The numba kernels in ``_kernels.py`` use the same numbers as literal constants defined in
that file (so that its compiled cache is invalidated whenever they change);
``tests/test_layout.py`` checks the two agree.
"""

# Per-page state word (uint16).
ALLOC = 1 << 0       # a folio backs this page
PRIV = 1 << 1        # private as tracked by guest_memfd (shareability)
HMAP = 1 << 2        # mapped into a host process (mmap fault-in)
GMAP = 1 << 3        # mapped in the guest's stage-2 page tables
PIN = 1 << 4         # holds at least one long-term pin
DATA = 1 << 5        # holds bytes (sparse contents); clear means the page reads as zeroes
DMAP_OFF = 1 << 6    # removed from the kernel direct map
HUGE = 1 << 7        # part of a huge folio (order 9 or 18)
GIG = 1 << 8         # ... and that folio is order 18 (1 GiB)
ORDER_MASK = HUGE | GIG
TE_SHIFT = 9         # 3 bits of trusted-entity state (SNP RMP or TDX secure EPT)
TE_MASK = 7 << TE_SHIFT

# Bits whose page counts every summary entry keeps (bit k is count k).
COUNTED_BITS = (ALLOC, PRIV, HMAP, GMAP, PIN, DATA, DMAP_OFF, HUGE)
# Their indices, for the store's whole-file counts.
K_ALLOC, K_PRIV, K_HMAP, K_GMAP, K_PIN, K_DATA, K_DMAP_OFF, K_HUGE = range(len(COUNTED_BITS))

# TDX secure-EPT states and SNP RMP states share the TE field; the VM type says which.
TE_NONE = 0          # no secure-EPT entry (TDX); hypervisor-owned RMP entry (SNP)
SEPT_MAPPED = 2      # secure-EPT entry mapped: added or accepted
RMP_VALIDATED = 5    # RMP entry assigned to the guest and validated (PVALIDATE)

# Policy and type codes kept in the store's meta array.
VM_TYPE_CODES = {"sw-protected": 0, "snp": 1, "tdx": 2}
DIRECT_MAP_CODES = {"keep": 0, "no-direct-map": 1, "on-conversion": 2}
MERGE_CODES = {"eager": 1, "never": 0}

# The invariants ``check_tree`` verifies, by the number it returns (docs/model.md §3).
INVARIANTS = {
    1: "host-mapped page must be allocated and shared",
    2: "pinned page must be allocated and shared",
    3: "contents, guest mapping and direct-map removal need an allocated page",
    4: "huge folio must be of the backing order, allocated, private and unpinned",
    5: "policy 'keep' never removes pages from the direct map",
    6: "policy 'no-direct-map' removes exactly the allocated pages",
    7: "policy 'on-conversion' removes exactly the allocated private pages",
    8: "trusted-entity state only on allocated private pages",
    10: "summary counts agree with the pages below them",
    11: "a huge folio covers its whole aligned block",
    12: "pages past the end never change",
    13: "a 2 MiB direct-map split lies under a split 1 GiB entry",
    14: "whole-file counts agree with the block summaries",
    15: "a 2 MiB entry's exception pages are distinct, in range and differ from its word",
    16: "a folio's order is kept by its 2 MiB entries, never in page tables or exceptions",
    17: "the direct-map entry counts agree with the entries broken up",
    18: "the table pools' free lists hold exactly the tables not in use, each once",
}

COUNTER_NAMES = (
    # host and guest mappings
    "host_faults",
    "host_ptes_zapped",
    "tlb_invlpg",
    "tlb_flush_full",
    "tlb_shootdowns",
    "guest_invalidations",
    "guest_ptes_zapped",
    # folios
    "folios_checked",
    "lru_drains",
    "folio_splits_2m",
    "folio_splits_1g",
    "folio_merges_2m",
    "folio_merges_1g",
    "vmemmap_pages_restored",
    "vmemmap_pages_freed",
    "pages_allocated",
    "pages_freed",
    "pins",
    "unpins",
    # contents
    "pages_zeroed",
    "bytes_zeroed_4k",
    "bytes_zeroed_2m",
    "bytes_zeroed_1g",
    "bytes_copied",
    # direct map
    "dmap_entries_changed",
    "dmap_splits_1g",
    "dmap_splits_2m",
    # attributes
    "attr_writes_page",
    "attr_writes_range",
    "pages_to_private",
    "pages_to_shared",
    # calls and their outcomes
    "convert_calls",
    "convert_noop",
    "convert_einval",
    "convert_enomem",
    "convert_eagain",
    "fallocate_calls",
    "punch_calls",
    "punch_eagain",
    "vm_attr_calls",
    # trusted entity / firmware (platform adapters)
    "rmp_updates",
    "psmash",
    "snp_fw_launch_update",
    "snp_pvalidate_4k",
    "snp_pvalidate_2m",
    "tdx_seamcall_page_add",
    "tdx_seamcall_mr_extend",
    "tdx_seamcall_page_aug",
    "tdx_seamcall_block",
    "tdx_seamcall_track",
    "tdx_seamcall_demote",
    "tdx_seamcall_page_remove",
    "tdx_accepts",
    "guest_exits",
    "hash_bytes",
    "pages_populated_inplace",
    "pages_populated_legacy",
    "snp_fw_launch_finish",
    "convert_eopnotsupp",
    # acceptance and the guest's side of it (docs/model.md §4.9, §10)
    "accept_fallbacks",
    "prefault_calls",
    "tdx_busy_retries",
    "accept_memory_calls",
    "guest_pages_touched",
    # the VMM's side: device assignment and separate shared memory (docs/model.md §13)
    "iommu_maps",
    "iommu_unmaps",
    "shared_discards",
)
COUNTER_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}
NCOUNTERS = len(COUNTER_NAMES)
