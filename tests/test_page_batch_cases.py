"""Batches of one-page conversions in the cases the grouped, in-place path must get right
and random batches rarely make: items that are already converted among items that are
not, batches larger than the kept grouping scratch, a 1 GiB
block that merges while its 2 MiB entries still differ, and acceptance state given back
after earlier work was counted. Each is compared with the reference model applying the
items one call at a time (``_batch`` in tests/test_page_batches.py)."""
from __future__ import annotations

import numpy as np
import pytest

import gmemfast
import naive
from conftest import gigabyte_folio_with_bytes
from test_page_batches import MMAP, PRIVATE, PS, _batch, _both

M = 1 << 20
MMAP_SHARED = MMAP | gmemfast.GUEST_MEMFD_FLAG_INIT_SHARED


@pytest.mark.parametrize("first", [True, False])
def test_items_already_converted_among_the_others(first):
    """Pages already private (exceptions of their 2 MiB entry) in a batch to private: each
    is a counted no-op, and the items after it in the same block are still converted."""
    eng, ref = _both(8 * M, MMAP_SHARED)
    done = [3, 9, 700]
    for g in (eng, ref):
        for p in done:
            g.set_memory_attributes(p * PS, PS, PRIVATE)
    todo = [p for p in range(2, 130) if p not in done]
    pages = done + todo if first else todo[:40] + done + todo[40:]
    _batch(eng, ref, np.asarray(pages, np.int64) * PS, PRIVATE, expect_in_place=True)
    assert eng.counters["convert_noop"] == len(done)
    assert eng.private_pages() == len(done) + len(todo)


def test_a_batch_larger_than_the_kept_scratch(monkeypatch):
    """Batches past ``_KEYS_KEPT`` items group into a scratch array of their own."""
    from gmemfast import _store
    monkeypatch.setattr(_store, "_KEYS_KEPT", 64)
    eng, ref = _both(16 * M, MMAP_SHARED)
    rng = np.random.default_rng(7)
    pages = rng.choice(16 * M // PS, 150, replace=False)
    _batch(eng, ref, pages * PS, PRIVATE, expect_in_place=True)
    _batch(eng, ref, pages[:80] * PS, 0, expect_in_place=True)       # kept scratch again
    assert eng.private_pages() == 70


def test_a_gigabyte_block_merges_while_its_entries_differ():
    """A 1 GiB folio whose pages differ in more than shareability (stored bytes on one
    page) keeps a table of 2 MiB entries; converting the split pages back merges it all
    the same."""
    eng, ref = (gigabyte_folio_with_bytes(b"kept", cls=cls) for cls in (gmemfast.GuestMemfd, naive.GuestMemfd))
    # one page in each of 100 2 MiB entries: each an exception of its entry, so every item
    # takes the batch's own in-place step, and the last one completes the block
    pages = 17 + 512 * np.arange(1, 101, dtype=np.int64)
    _batch(eng, ref, pages * PS, 0, expect_in_place=True)
    assert eng.folio_order(0) == 0
    _batch(eng, ref, pages * PS, PRIVATE, expect_in_place=True)
    assert eng.folio_order(0) == 18 and eng.counters["folio_merges_1g"] == 2


@pytest.mark.parametrize("vm_type", ["snp", "tdx"])
def test_accepted_pages_given_back_after_earlier_work(vm_type):
    """Pages the guest accepted go back to shared in two batches: the trusted entity's work
    of each (RMP updates, SEAMCALLs) adds to what was counted before."""
    evm, rvm = gmemfast.VM(vm_type), naive.VM(vm_type)
    eng = evm.create_guest_memfd(8 * M, MMAP)
    ref = rvm.create_guest_memfd(8 * M, MMAP)
    for vm, g in ((evm, eng), (rvm, ref)):
        vm.set_user_memory_region(0, 0, 8 * M, g)
        vm.guest_accept(0, 4 * M, chunk=PS)
    pages = np.arange(0, 1024, 5, dtype=np.int64)
    for half in (pages[:100], pages[100:]):
        _batch(eng, ref, half * PS, 0, expect_in_place=True)
    work = "rmp_updates" if vm_type == "snp" else "tdx_seamcall_page_remove"
    assert eng.counters[work] > 0
