"""Integrity: damaged state files are refused, each kind with its own message, and
``check()`` names every broken invariant.

The state-file tests write valid ``.npz`` archives whose contents are wrong in one way
(an array changed, the header changed, a checksum changed, a state that breaks an
invariant), so they get past the zip layer and reach each check of ``persist.load`` and
``GuestMemfd.load``. The ``check()`` tests corrupt the page store directly (a test-only
reach into its arrays) and expect the invariant's number and text in the error.
"""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

import gmemfast
from conftest import gigabyte_folio_with_bytes
from gmemfast import _kernels as K
from gmemfast import persist
from gmemfast._layout import (ALLOC, DATA, DMAP_OFF, GIG, HMAP, HUGE, INVARIANTS, PIN, PRIV,
                              RMP_VALIDATED, TE_SHIFT)
from gmemfast.uapi import (FALLOC_FL_KEEP_SIZE, GUEST_MEMFD_FLAG_HUGETLB,
                           GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                           KVM_MEMORY_ATTRIBUTE_PRIVATE)

PS = 4096
MMAP_SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


# ------------------------------------------------------------------ state files
def _state(tmp_path):
    g = gmemfast.GuestMemfd(4 << 20, MMAP_SHARED)
    g.host_write(5 * PS, b"integrity")
    g.set_memory_attributes(64 * PS, 64 * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    g.pin(7 * PS)
    path = tmp_path / "g.npz"
    g.save(str(path))
    return g, path


def _read(path):
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(bytes(z["header"]).decode())
        arrays = {k: z[k] for k in z.files if k != "header"}
    return header, arrays


def _write(path, header, arrays, *, reseal=()):
    """Write a valid archive; ``reseal`` names the checksums to recompute first (so the
    file looks consistently written: only the deeper checks can catch it)."""
    header = dict(header)
    if "arrays" in reseal:
        header["array_digests"] = {k: persist._array_digest(k, a) for k, a in arrays.items()}
        header["digest"] = persist.arrays_digest(arrays)
    if "header" in reseal or "arrays" in reseal:
        header["header_digest"] = persist._header_digest(header)
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    path.write_bytes(buf.getvalue())
    assert zipfile.is_zipfile(path)          # past the zip layer


def _refused(path, *fragments):
    with pytest.raises(ValueError) as info:
        gmemfast.GuestMemfd.load(str(path))
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert str(path) in msg
    return msg


def test_round_trip_is_exact(tmp_path):
    g, path = _state(tmp_path)
    loaded = gmemfast.GuestMemfd.load(str(path))
    assert loaded.host_read(5 * PS, 9) == b"integrity"
    assert loaded.private_pages() == 64 and len(loaded.pins) == 1


def test_changed_array_is_named(tmp_path):
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    arrays["n2"] = arrays["n2"].copy()
    arrays["n2"][0, K.F_CNT] += 1
    _write(path, header, arrays)
    _refused(path, "array 'n2' does not match its checksum")


def test_changed_contents_are_named(tmp_path):
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    arrays["data_blob"] = arrays["data_blob"].copy()
    arrays["data_blob"][0] ^= 0xFF
    _write(path, header, arrays)
    _refused(path, "array 'data_blob' does not match its checksum")


def test_changed_header(tmp_path):
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    header["size"] = 8 << 20
    _write(path, header, arrays)
    _refused(path, "the header does not match its checksum")


def test_wrong_checksum(tmp_path):
    """Arrays and per-array checksums intact, the whole-state checksum wrong."""
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    header["digest"] = "0" * 64
    _write(path, header, arrays, reseal=("header",))
    _refused(path, "checksum mismatch")


def test_malformed_array_checksums(tmp_path):
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    header["array_digests"] = {"n2": "x"}
    _write(path, header, arrays, reseal=("header",))
    _refused(path, "array checksums are malformed")


def test_wrong_magic_and_version(tmp_path):
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    _write(path, {**header, "magic": "something-else"}, arrays, reseal=("header",))
    _refused(path, "wrong magic")
    _write(path, {**header, "version": 99}, arrays, reseal=("header",))
    _refused(path, "version 99 is not supported")


def test_a_format_1_file_loads_with_its_bookkeeping_moved(tmp_path):
    """Format 1 kept the store's bookkeeping 16 slots lower in ``meta``; written so by
    hand (counters first, then the bookkeeping from index 64), it loads as the same
    state, with the counters kept and the counters format 1 did not have at zero."""
    g, path = _state(tmp_path)
    header, arrays = _read(path)
    meta = arrays["meta"]
    old = np.zeros_like(meta)
    old[:64] = meta[:64]
    old[64:64 + K.META_SIZE - K.M_FREE1] = meta[K.M_FREE1:]
    assert not meta[64:K.M_FREE1].any()          # the new counters start at zero
    _write(path, {**header, "version": 1}, {**arrays, "meta": old}, reseal=("arrays",))
    loaded = gmemfast.GuestMemfd.load(str(path))
    assert loaded.host_read(5 * PS, 9) == b"integrity"
    assert loaded.private_pages() == 64 and loaded.allocated_pages() == g.allocated_pages()
    assert dict(loaded.counters) == dict(g.counters)
    loaded.check()


def test_arrays_that_do_not_fit_the_header(tmp_path):
    """Every checksum right (written that way), but the arrays belong to another file."""
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    arrays["n1"] = np.concatenate([arrays["n1"], np.zeros((K.N1, K.NF), np.int64)])  # one too many
    _write(path, header, arrays, reseal=("arrays",))
    _refused(path, "state arrays do not match the header")


def test_contents_that_do_not_fit_their_page_list(tmp_path):
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    arrays["data_blob"] = arrays["data_blob"][:100]
    _write(path, header, arrays, reseal=("arrays",))
    msg = _refused(path, "stored contents do not match their page list")
    assert msg.endswith(": stored contents do not match their page list (damaged file)"), msg


def test_a_state_that_breaks_an_invariant(tmp_path):
    """A well-formed, correctly checksummed file whose state is impossible."""
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    meta = arrays["meta"].copy()
    meta[K.M_GCNT + 0] += 1                   # the whole-file count of allocated pages
    arrays["meta"] = meta
    _write(path, header, arrays, reseal=("arrays",))
    _refused(path, "state is inconsistent", "invariant 14", INVARIANTS[14])


def test_pins_of_a_private_page(tmp_path):
    _g, path = _state(tmp_path)
    header, arrays = _read(path)
    arrays["pins"] = np.array([[64 * PS, PS]], np.int64)   # a pin on a private page
    _write(path, header, arrays, reseal=("arrays",))
    _refused(path, "state is inconsistent")


def test_files_written_before_the_extra_checksums_still_load(tmp_path):
    g, path = _state(tmp_path)
    header, arrays = _read(path)
    for key in ("array_digests", "header_digest"):
        header.pop(key)
    _write(path, header, arrays)
    assert gmemfast.GuestMemfd.load(str(path)).private_pages() == g.private_pages()


# ------------------------------------------------------------------ check() fires
def _tree(g):
    st = g.store
    return st._n2, st._n1, st._w0, st._meta


def _set_word(g, p, w):
    """Force page ``p``'s word to ``w``, keeping every count consistent (so only the word
    rules can fire)."""
    K.set_word(*_tree(g), p, w)


def _expect(g, rule):
    with pytest.raises(AssertionError) as info:
        g.check()
    msg = str(info.value)
    assert f"invariant {rule} " in msg and INVARIANTS[rule] in msg, msg


WORD_CASES = [
    # (invariant, policies, word)
    (1, {}, ALLOC | PRIV | HMAP),
    (2, {}, ALLOC | PRIV | PIN),
    (3, {}, DATA),
    (4, {}, ALLOC | PRIV | HUGE),
    (5, {}, ALLOC | DMAP_OFF),
    (6, {"direct_map": "no-direct-map"}, ALLOC | PRIV),
    (7, {"direct_map": "on-conversion"}, ALLOC | PRIV),
    (8, {}, ALLOC | (RMP_VALIDATED << TE_SHIFT)),
]


@pytest.mark.parametrize("rule,policies,word", WORD_CASES)
def test_check_names_each_page_rule(rule, policies, word):
    g = gmemfast.GuestMemfd(4 << 20, MMAP_SHARED, **policies)
    g.check()
    _set_word(g, 77, word)
    _expect(g, rule)
    page = 0 if rule == 4 else 77          # a wrong huge folio is named by its block's first page
    with pytest.raises(AssertionError, match=rf"broken at page {page} \(offset {page * PS:#x}\)"):
        g.check()


def _mixed_block(order=0):
    """A file whose first 1 GiB entry has a table and one 2 MiB entry holds exceptions."""
    flags = MMAP_SHARED if order == 0 else GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB
    g = gmemfast.GuestMemfd(4 << 20, flags, page_order=order)
    if order == 0:
        g.host_write(3 * PS, b"x")              # page 3 differs: an exception
    g.check()
    return g


def test_check_names_counts_that_disagree():
    g = _mixed_block()
    n2, n1, _w0, _meta = _tree(g)
    t = n2[0, K.F_CHILD]
    n1[t * K.N1, K.F_CNT + 0] += 1               # 2 MiB entry 0's count of allocated pages
    _expect(g, 10)


def test_check_names_a_partial_huge_folio():
    # A folio's order is kept per 2 MiB block, so the part of a folio that can lose it is
    # a 2 MiB block of a 1 GiB folio.
    g = gmemfast.GuestMemfd(1 << 30, GUEST_MEMFD_FLAG_HUGETLB, page_order=18)
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 1 << 30)     # one 1 GiB folio
    g.set_memory_attributes(PS, PS, 0)
    g.set_memory_attributes(PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert g.folio_order(0) == 18 and g.store.word(100) & (HUGE | GIG)
    _set_word(g, 100, g.store.word(100) & ~(HUGE | GIG))   # its first 2 MiB no longer huge
    _expect(g, 11)


def test_check_names_a_partial_huge_folio_with_exception_pages():
    """The same for a 2 MiB block of the folio whose entry holds an exception page (one
    page with stored bytes): the corruption helper keeps that entry's counts, so the rule
    named is the folio's, not the counts'."""
    g = gigabyte_folio_with_bytes(b"bytes")
    n2, n1, _w0, _meta = _tree(g)
    e = n2[0, K.F_CHILD] * K.N1
    assert n1[e, K.F_NX] == 1 and n1[e, K.F_CHILD] < 0
    g.check()
    _set_word(g, 100, g.store.word(100) & ~(HUGE | GIG))
    _expect(g, 11)


def test_check_names_an_order_in_a_page_table():
    g = _mixed_block(order=9)
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 2 << 20)     # one 2 MiB folio
    g.set_memory_attributes(PS, 8 * PS, 0)            # split: block 0 gets a page table
    n2, n1, w0, _meta = _tree(g)
    e = n2[0, K.F_CHILD] * K.N1
    u = n1[e, K.F_CHILD]
    assert u >= 0
    w0[u * K.N1 + 100] |= HUGE                        # a page word holding a folio order
    _expect(g, 16)


@pytest.mark.parametrize("past", [0, 5])
def test_check_names_pages_past_the_end(past):
    g = _mixed_block()
    _set_word(g, g.nr_pages + past, ALLOC)            # in the last 1 GiB block, past the file
    _expect(g, 12)


def test_check_names_a_misplaced_direct_map_split():
    g = _mixed_block()
    n2, n1, _w0, _meta = _tree(g)
    t = n2[0, K.F_CHILD]
    n1[t * K.N1 + 1, K.F_DSPLIT] = 1                  # 2 MiB split under an unsplit 1 GiB entry
    _expect(g, 13)


def test_check_names_whole_file_counts():
    g = _mixed_block()
    _n2, _n1, _w0, meta = _tree(g)
    meta[K.M_GCNT + 5] += 1                           # pages holding bytes
    _expect(g, 14)


def test_check_names_malformed_exceptions():
    g = gmemfast.GuestMemfd(4 << 20, MMAP_SHARED)
    g.set_memory_attributes(3 * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)   # one page: an exception
    g.check()
    n2, n1, _w0, _meta = _tree(g)
    e = n2[0, K.F_CHILD] * K.N1
    assert n1[e, K.F_NX] == 1 and n1[e, K.F_CHILD] < 0
    n1[e, K.F_X0] = 3 | (int(n1[e, K.F_WORD]) << K.XW_SHIFT)   # an exception equal to its entry
    _expect(g, 15)


def test_check_names_pin_bits_without_pins():
    g = gmemfast.GuestMemfd(4 << 20, MMAP_SHARED)
    g.host_write(9 * PS, b"p")
    _set_word(g, 9, ALLOC | PIN | DATA)               # a PIN bit no pin holds
    with pytest.raises(AssertionError, match="PIN bits disagree with the pin counts"):
        g.check()


def test_check_names_pin_bits_without_pins_in_a_large_file():
    """Past 16 GiB check() compares the PIN bits in total, not page by page."""
    g = gmemfast.GuestMemfd(32 << 30, MMAP_SHARED)
    g.host_write((20 << 30) + 9 * PS, b"p")
    g.check()
    _set_word(g, (20 << 30) // PS + 9, ALLOC | PIN | DATA)
    with pytest.raises(AssertionError, match="^page-state invariant: PIN bits disagree with the pin counts$"):
        g.check()


def test_check_names_pin_handles_without_pin_counts():
    g = gmemfast.GuestMemfd(4 << 20, MMAP_SHARED)
    g.pin(9 * PS)
    g._pins[9] += 1                                    # counts no handle explains
    with pytest.raises(AssertionError, match="pin handles disagree with the pin counts"):
        g.check()


def _freed_tables():
    """A file whose pools hold freed tables of both levels: page tables freed as 2 MiB
    entries become uniform again, then the 1 GiB entry's table as the whole file does."""
    g = gmemfast.GuestMemfd(8 << 20, MMAP_SHARED)
    for b in range(4):                                   # 4 x 2 MiB, six private pages each
        for k in range(6):
            g.set_memory_attributes(b * (2 << 20) + 11 * k * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    g.set_memory_attributes(0, 4 << 20, 0)               # entries 0 and 1 uniform again
    meta = g.store._meta
    assert meta[K.M_NFREE0] == 2 and meta[K.M_NFREE1] == 0
    g.check()
    return g


def _page_table_in_use(g):
    n2, n1, _w0, _meta = _tree(g)
    t = n2[0, K.F_CHILD]
    u = [int(n1[t * K.N1 + j, K.F_CHILD]) for j in range(K.N1) if n1[t * K.N1 + j, K.F_CHILD] >= 0]
    assert u
    return u[0]


def _link0(w0, u, nxt):
    """Point freed page table ``u``'s free-list link at ``nxt`` (-1: the end)."""
    v = nxt + 1
    for k in range(4):
        w0[u * K.N1 + k] = (v >> (16 * k)) & 0xFFFF


def test_check_names_a_free_count_that_disagrees():
    g = _freed_tables()
    g.store._meta[K.M_NFREE0] -= 1                       # one freed page table not counted
    _expect(g, 18)
    with pytest.raises(AssertionError) as info:          # about the pools: no page named
        g.check()
    assert str(info.value) == f"page-state invariant 18 ({INVARIANTS[18]}) broken"


def test_check_names_a_table_in_use_on_a_free_list():
    g = _freed_tables()
    _n2, _n1, w0, meta = _tree(g)
    head = int(meta[K.M_FREE0])
    u = _page_table_in_use(g)
    _link0(w0, head, u)                                  # the list runs on into a used table
    meta[K.M_NFREE0] += 1
    _expect(g, 18)


def test_check_names_a_free_list_that_loops():
    g = _freed_tables()
    _n2, _n1, w0, meta = _tree(g)
    head = int(meta[K.M_FREE0])
    _link0(w0, head, head)                               # a cycle: the check must still end
    _expect(g, 18)


def test_check_names_a_table_lost_to_the_pools():
    g = _freed_tables()
    _n2, _n1, w0, meta = _tree(g)
    head = int(meta[K.M_FREE0])
    _link0(w0, head, -1)                                 # the second freed table: neither used nor free
    meta[K.M_NFREE0] = 1
    _expect(g, 18)


@pytest.mark.parametrize("level", [1, 0])
def test_check_names_a_pool_count_past_its_arrays(level):
    """Tables in use counted past what the pool's arrays hold (its capacity claims more)."""
    g = _freed_tables()
    n2, n1, w0, meta = _tree(g)
    rows = (n1 if level == 1 else w0).shape[0] // K.N1
    meta[K.M_CAP1 if level == 1 else K.M_CAP0] = 10 * rows
    meta[K.M_USED1 if level == 1 else K.M_USED0] = rows + 1
    _expect(g, 18)


def test_check_names_freed_entry_tables_that_disagree():
    g = _freed_tables()
    g.set_memory_attributes(0, 8 << 20, 0)      # the whole file as it started: uniform
    _n2, _n1, _w0, meta = _tree(g)
    assert meta[K.M_NFREE1] == 1 and meta[K.M_NFREE0] == 4
    g.check()
    meta[K.M_NFREE1] = 0
    _expect(g, 18)
    meta[K.M_NFREE1] = 1
    meta[K.M_FREE1] = -1                                 # the freed table dropped from its list
    _expect(g, 18)


def test_check_counts_every_freed_entry_table():
    """Three 1 GiB entries get a table of 2 MiB entries and lose it again: three tables
    on the free list, counted as three."""
    g = gmemfast.GuestMemfd(4 << 30, MMAP_SHARED)
    for b in range(3):
        g.set_memory_attributes((b << 30) + 7 * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    meta = g.store._meta
    assert meta[K.M_USED1] == 3 and meta[K.M_NFREE1] == 0
    for b in range(3):
        g.set_memory_attributes((b << 30) + 7 * PS, PS, 0)
    assert meta[K.M_NFREE1] == 3
    g.check()
    g.set_memory_attributes(7 * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)   # one taken again
    assert meta[K.M_NFREE1] == 2 and meta[K.M_USED1] == 3
    g.check()


def test_a_state_file_with_broken_free_lists(tmp_path):
    g = _freed_tables()
    path = tmp_path / "g.npz"
    g.save(str(path))
    header, arrays = _read(path)
    meta = arrays["meta"].copy()
    meta[K.M_NFREE0] += 1
    arrays["meta"] = meta
    _write(path, header, arrays, reseal=("arrays",))
    _refused(path, "state is inconsistent", "invariant 18", INVARIANTS[18])


def test_check_passes_on_a_busy_healthy_file():
    """The control: the same operations without corruption pass check()."""
    g = gmemfast.GuestMemfd(8 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB,
                            page_order=9, direct_map="on-conversion")
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 8 << 20)
    g.set_memory_attributes(5 * PS, 3 * PS, 0)
    g.host_write(5 * PS, b"ok")
    pin = g.pin(6 * PS)
    g.check()
    pin.release()
    g.set_memory_attributes(5 * PS, 3 * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    g.check()


def test_check_names_direct_map_counts_that_disagree():
    g = _mixed_block()
    _n2, _n1, _w0, meta = _tree(g)
    meta[K.M_DSPLIT2] += 1                            # a 2 MiB direct-map entry never broken
    _expect(g, 17)
    with pytest.raises(AssertionError, match=r"broken at page 0 \(offset 0x0\)"):
        g.check()                                     # a whole-file count: named at page 0
