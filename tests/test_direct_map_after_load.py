"""Direct-map entry counts of a loaded file. The store keeps the counts by size as
conversions break entries up (docs/model.md §5, policy ``on-conversion``); a load
rebuilds them from the split flags of the saved entries. Expected counts are derived by
hand from §5: the kernel changes the direct map a folio at a time, so a change by a whole
2 MiB folio breaks the 1 GiB entry into 2 MiB entries and changes one of them, a change by
4 KiB folios also breaks that 2 MiB entry into 512 4 KiB entries; breaks never re-merge.
The loaded file's ``check()`` also compares the counts with a recount of the flags."""
from __future__ import annotations

import pytest

import gmemfast
from gmemfast import (FALLOC_FL_KEEP_SIZE, GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_INIT_SHARED,
                      GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE)

P = 4096
M2 = 2 << 20
G = 1 << 30
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
SHARED_FILE = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


def reloaded(g, tmp_path):
    g.save(tmp_path / "s.npz")
    back = gmemfast.GuestMemfd.load(tmp_path / "s.npz")
    back.check()
    return back


@pytest.mark.parametrize("tail_pages", [513, 2 * 512 - 1], ids=["one-page-in", "one-page-short"])
def test_counts_of_a_file_ending_inside_a_2m_block(tmp_path, tail_pages):
    """4 KiB pages, 3 GiB and ``tail_pages`` more: block 0 never broken; block 1 and block 2
    one 2 MiB entry each down to 4 KiB; the last block (the first table made, as its pages
    past the end differ from the rest) its last 2 MiB entry, which holds one page or all
    but one of the file, down to 4 KiB."""
    size = 3 * G + tail_pages * P
    g = gmemfast.GuestMemfd(size, SHARED_FILE, direct_map="on-conversion")
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, size)
    g.set_memory_attributes(2 * G + 7 * M2 + 3 * P, P, PRIVATE)
    g.set_memory_attributes(G + 5 * M2, M2, PRIVATE)      # 512 4 KiB folios: to 4 KiB too
    g.set_memory_attributes(size - P, P, PRIVATE)
    tail_2m = (tail_pages + 511) // 512                  # 2 MiB entries of the last block
    want = {"1G": 1, "2M": 511 + 511 + (tail_2m - 1), "4K": 3 * 512}
    assert g.direct_map_entries() == want
    back = reloaded(g, tmp_path)
    assert back.direct_map_entries() == want
    for f in (g, back):                                  # and on from there: block 0 broken
        f.set_memory_attributes(11 * M2 + P, P, PRIVATE)
    want = {"1G": 0, "2M": want["2M"] + 511, "4K": want["4K"] + 512}
    assert g.direct_map_entries() == want
    assert back.direct_map_entries() == want
    back.check()


def test_counts_of_a_block_broken_into_2m_entries_only(tmp_path):
    """2 MiB huge pages, 3 GiB: block 0 never broken; block 1 broken into 2 MiB entries
    by a whole 2 MiB folio, then made private whole (2 MiB folios again: no more breaks),
    so all its entries are alike and no table stays below it; block 2, after it, one
    page (a 4 KiB folio: shared pages are never huge) to private."""
    g = gmemfast.GuestMemfd(3 * G, SHARED_FILE | GUEST_MEMFD_FLAG_HUGETLB, page_order=9,
                            direct_map="on-conversion")
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 3 * G)
    g.set_memory_attributes(G + 5 * M2, M2, PRIVATE)
    g.set_memory_attributes(G, G, PRIVATE)
    g.set_memory_attributes(2 * G + 7 * M2 + 3 * P, P, PRIVATE)
    want = {"1G": 1, "2M": 512 + 511, "4K": 512}
    assert g.direct_map_entries() == want
    back = reloaded(g, tmp_path)
    assert back.direct_map_entries() == want
    for f in (g, back):                                  # one 2 MiB entry of block 1 to 4 KiB
        f.set_memory_attributes(G + 9 * M2 + P, P, 0)
    want = {"1G": 1, "2M": 512 + 511 - 1, "4K": 2 * 512}
    assert g.direct_map_entries() == want
    assert back.direct_map_entries() == want
    back.check()
