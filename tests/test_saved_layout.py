"""The saved form of the 2 MiB entries: the store keeps them packed (counts two to an
int32 field), a state file holds them as it always has (``K.NF`` int64 fields, one count
a field), and a file written in that form by an earlier release loads unchanged.

``tests/data/state-v2-l1.npz`` was written by the release before the packed layout, from
``build_state()`` below; the test builds the same state now and compares.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

import gmemfast
from gmemfast import _kernels as K
from gmemfast import _store
from gmemfast.uapi import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                           GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE)

PS = 4096
FIXTURE = Path(__file__).parent / "data" / "state-v2-l1.npz"


def build_state():
    """A file with every kind of 2 MiB entry: uniform, with one to four exceptions, with
    a page table, with a broken direct-map entry, a freed page table, stored bytes."""
    g = gmemfast.GuestMemfd(16 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB,
                            page_order=9, direct_map="on-conversion")
    two = 2 << 20
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 16 << 20)
    for k in range(1, 5):                                   # entry k: k exceptions
        for j in range(k):
            g.set_memory_attributes(k * two + (7 + 13 * j) * PS, PS, 0)
    g.set_memory_attributes(5 * two + 3 * PS, 40 * PS, 0)          # a page table, folded
    g.set_memory_attributes(5 * two + 3 * PS, 40 * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    g.set_memory_attributes(6 * two + 100 * PS, 9 * PS, 0)          # a page table, kept
    g.host_write(6 * two + 101 * PS, b"saved layout")
    g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 7 * two, two)
    return g


def _saved_arrays(g, tmp_path):
    path = tmp_path / "s.npz"
    g.save(str(path))
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "header"}


def test_saved_entries_hold_one_count_a_field(tmp_path):
    """Each saved 2 MiB entry with exceptions or a page table holds, in field
    ``F_CNT + k``, the number of its pages whose word has bit ``k`` (read page by page)."""
    g = build_state()
    g.check()
    arrays = _saved_arrays(g, tmp_path)
    n1 = arrays["n1"]
    assert n1.dtype == np.int64 and n1.shape[1] == K.NF
    t = int(arrays["n2"][0, K.F_CHILD])
    assert t >= 0
    words = g.store.words(0, g.nr_pages)
    seen = 0
    for j in range(g.nr_pages // K.N1):
        e = n1[t * K.N1 + j]
        nx, child = e[K.F_CNT + K.NCOUNTED], e[K.F_CHILD]
        if child < 0 and nx == 0:
            continue
        seen += 1
        block = words[j * K.N1:(j + 1) * K.N1]
        for k in range(K.NCOUNTED):
            assert e[K.F_CNT + k] == np.count_nonzero(block & (1 << k)), (j, k)
    assert seen == 5                  # entries 1-4 (exceptions) and 6 (page table)


def test_counts_round_trip_through_the_packed_layout():
    rng = np.random.default_rng(7)
    saved = rng.integers(-5, 1 << 20, size=(300, K.NF), dtype=np.int64)
    saved[:, K.F_CNT:K.F_CNT + K.NCOUNTED] = rng.integers(0, K.N1 + 1, size=(300, K.NCOUNTED))
    kept = _store.kept_l1(saved)
    assert kept.dtype == np.int32 and kept.shape == (300, K.NF1)
    assert (_store.saved_l1(kept) == saved).all()


def test_a_count_that_does_not_fit_is_refused():
    saved = np.zeros((4, K.NF), np.int64)
    saved[2, K.F_CNT + 3] = K.N1 + 1
    try:
        _store.kept_l1(saved)
    except ValueError as e:
        assert "out of range" in str(e)
    else:
        raise AssertionError("a count of 513 was accepted")


def test_a_file_of_the_earlier_layout_loads_as_the_same_state(tmp_path):
    g = build_state()
    loaded = gmemfast.GuestMemfd.load(str(FIXTURE))
    loaded.check()
    assert (loaded.store.words(0, g.nr_pages) == g.store.words(0, g.nr_pages)).all()
    assert dict(loaded.counters) == dict(g.counters)
    assert loaded.host_read((12 << 20) + 101 * PS, 12) == b"saved layout"
    with np.load(FIXTURE, allow_pickle=False) as z:
        for name, a in _saved_arrays(loaded, tmp_path).items():
            if name == "meta":                  # pool capacities are the loader's own
                a, b = a[:K.M_FREE1], z[name][:K.M_FREE1]
            else:
                b = z[name]
            assert a.shape == b.shape and (a == b).all(), name
    # and it keeps working: fold the page tables back, convert more
    loaded.set_memory_attributes((12 << 20) + 100 * PS, 9 * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    loaded.set_memory_attributes(5 * PS, 3 * PS, 0)
    loaded.check()


def write_fixture(path) -> None:
    """Write ``build_state()`` to ``path``, its archive members compressed (what is
    stored, and so every checksum, is unchanged)."""
    g = build_state()
    buf = io.BytesIO()
    raw = Path(path).with_suffix(".raw")
    g.save(str(raw))
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    raw.unlink()
    Path(path).write_bytes(buf.getvalue())


def test_saved_exceptions_carry_their_folio_order(tmp_path):
    """A state file holds every page word complete: a page of a 1 GiB folio that is an
    exception of its 2 MiB entry (it holds bytes) is saved with the folio's order bits,
    and a file of that form loads as the same state."""
    from conftest import gigabyte_folio_with_bytes
    from gmemfast._layout import GIG, HUGE
    g = gigabyte_folio_with_bytes(b"one page with bytes")
    arrays = _saved_arrays(g, tmp_path)
    t = int(arrays["n2"][0, K.F_CHILD])
    assert t >= 0
    e = arrays["n1"][t * K.N1]                                  # the first 2 MiB entry
    nx = int(e[K.F_CNT + K.NCOUNTED])
    assert nx == 1 and e[K.F_CHILD] < 0
    v = int(e[K.F_CNT + K.NCOUNTED + 1])
    assert v & K.XQ_MASK == 5
    assert (v >> K.XW_SHIFT) & (HUGE | GIG) == HUGE | GIG
    assert e[K.F_WORD] & (HUGE | GIG) == HUGE | GIG
    back = gmemfast.GuestMemfd.load(str(tmp_path / "s.npz"))
    back.check()
    assert back.folio_order(5 * PS) == 18
    assert np.array_equal(back.page_words(), g.page_words())
