"""One call over more 1 GiB blocks than the table pools keep free: with 4 KiB folios and
the ``on-conversion`` direct-map policy, allocating private memory breaks the direct map
under every block it touches (docs/model.md §5), so each block takes a table of 2 MiB
entries in that one call. The pools are made small here (as a file of hundreds of TiB
finds them after its first reservation), and each kind of call must still leave a sound
state with the direct map worked out by hand: every 1 GiB and 2 MiB entry over a removed
page broken, one 4 KiB entry per page of the file."""
from __future__ import annotations

import numpy as np
import pytest

import gmemfast
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_MMAP,
                      KVM_MEMORY_ATTRIBUTE_PRIVATE)

G = 1 << 30
PS = 4096
BLOCKS = 150                     # more than the 128 tables the small pools start with
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


@pytest.fixture
def small_pools(monkeypatch):
    from gmemfast import _store
    monkeypatch.setattr(_store, "_POOL_FIRST_BYTES", 0)
    monkeypatch.setattr(_store, "_L1_FIRST_BYTES", 0)


def every_entry_broken(g):
    assert g.direct_map_entries() == {"1G": 0, "2M": 0, "4K": BLOCKS * G // PS}
    g.check()


def whole_file(flags=GUEST_MEMFD_FLAG_MMAP):
    return gmemfast.GuestMemfd(BLOCKS * G, flags, direct_map="on-conversion")


@pytest.mark.parametrize("batched", [False, True])
def test_allocating_every_block_in_one_call(small_pools, batched):
    g = whole_file()
    if batched:
        r = g.fallocate_many(FALLOC_FL_KEEP_SIZE, [0, 5 * G], [BLOCKS * G, PS])
        assert r.errno.tolist() == [0, 0]
    else:
        g.fallocate(FALLOC_FL_KEEP_SIZE, 0, BLOCKS * G)
    assert g.allocated_pages() == BLOCKS * G // PS
    every_entry_broken(g)


@pytest.mark.parametrize("batched", [False, True])
def test_converting_every_block_in_one_call(small_pools, batched):
    """Allocated shared memory converted to private: each page removed from the direct map."""
    g = gmemfast.GuestMemfd(BLOCKS * G, GUEST_MEMFD_FLAG_MMAP | gmemfast.GUEST_MEMFD_FLAG_INIT_SHARED,
                            direct_map="on-conversion")
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, BLOCKS * G)
    assert g.direct_map_entries()["1G"] == BLOCKS            # shared: nothing removed yet
    if batched:
        r = g.set_memory_attributes_many(np.array([0, 7 * PS]), np.array([BLOCKS * G, PS]),
                                         KVM_MEMORY_ATTRIBUTE_PRIVATE)
        assert r.errno.tolist() == [0, 0]
    else:
        g.set_memory_attributes(0, BLOCKS * G, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert g.private_pages() == BLOCKS * G // PS
    every_entry_broken(g)


def test_a_range_just_under_the_bound_spans_at_most_the_reserve():
    """Ranges shorter than ``_ROOM_PAGES`` skip the count: none spans over RESERVE blocks."""
    from gmemfast import _kernels as K
    from gmemfast import _store
    blocks = lambda p0, p1: ((p1 - 1) >> K.S2) - (p0 >> K.S2) + 1   # noqa: E731
    for p0 in (0, 1, (1 << K.S2) - 1):
        assert blocks(p0, p0 + _store._ROOM_PAGES) <= K.RESERVE
    assert blocks((1 << K.S2) - 1, (1 << K.S2) - 1 + _store._ROOM_PAGES + 2) > K.RESERVE


def test_punching_and_allocating_again(small_pools):
    g = whole_file()
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, BLOCKS * G)
    g.fallocate(PUNCH, 0, BLOCKS * G)
    assert g.allocated_pages() == 0
    g.check()
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, BLOCKS * G)           # breaks stay broken (§5)
    every_entry_broken(g)


@pytest.mark.parametrize("batched", [False, True])
def test_accepting_every_block_in_one_call(small_pools, batched):
    vm = gmemfast.VM("tdx", direct_map="on-conversion")
    g = vm.create_guest_memfd(BLOCKS * G, GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region(0, 0, BLOCKS * G, g)
    if batched:
        r = vm.guest_accept_many([0, 0], [BLOCKS * G, G])
        assert r.errno.tolist() == [0, 0] and r.value.tolist() == [BLOCKS * 512, 0]
    else:
        assert vm.guest_accept(0, BLOCKS * G) == BLOCKS * 512   # one 2 MiB chunk each
    assert g.allocated_pages() == BLOCKS * G // PS
    every_entry_broken(g)


def test_room_for_counts_the_blocks_a_range_may_need(small_pools):
    """``room_for`` reserves one table per 1 GiB block without one, for ranges over more
    blocks than the kernels' reserve (64) only; the counts are worked out by hand."""
    from gmemfast import _kernels as K
    g = whole_file()
    st = g.store
    blk = 1 << K.S2                                            # pages per 1 GiB block
    assert st.room_for(0, 64 * blk) == 0                       # 64 blocks: the reserve covers it
    assert st.room_for(1, 64 * blk + 1) == 65                  # 65 blocks touched
    assert st.room_for(0, 100 * blk) == 100
    g.set_memory_attributes(3 * G + 5 * PS, PS, 0)             # block 3 gets a table
    assert st.room_for(0, 100 * blk) == 99
    assert st.room_for(4 * blk, 100 * blk) == 96
    # a batch: every item over more than 64 blocks counts, bounded by the file's bare blocks
    assert st.room_for(np.array([0, 10 * blk, 0]), np.array([70 * blk, 90 * blk, PS])) == 149
    assert st.room_for(np.array([0, 0]), np.array([70 * blk, 64 * blk])) == 70
    assert st.room_for(np.array([0, 5]), np.array([PS, 9])) == 0
    g.check()


def test_a_pool_used_to_its_last_table(small_pools):
    """The small pools start with 128 tables of 2 MiB entries: two calls over 64 blocks
    each (no more than the reserve, so nothing is reserved ahead) take every one of them,
    and a pool used to its last table is sound."""
    from gmemfast import _kernels as K
    g = gmemfast.GuestMemfd(128 * G, GUEST_MEMFD_FLAG_MMAP, direct_map="on-conversion")
    g.fallocate(FALLOC_FL_KEEP_SIZE, 0, 64 * G)
    g.fallocate(FALLOC_FL_KEEP_SIZE, 64 * G, 64 * G)
    meta = g.store._meta
    assert meta[K.M_USED1] == meta[K.M_CAP1] == 128 and meta[K.M_NFREE1] == 0
    g.check()
    assert g.direct_map_entries() == {"1G": 0, "2M": 0, "4K": 128 * G // PS}


def test_room_for_asks_nothing_when_the_pool_already_holds_a_table_per_block():
    """At its usual first size the pool holds a table for every 1 GiB block of a file of
    up to 128 TiB: a call over the whole file needs nothing more."""
    g = whole_file()
    blocks = BLOCKS << 18                                       # pages of the file
    assert g.store.room_for(0, blocks) == 0
    assert g.store.room_for(np.array([0, 7]), np.array([blocks, 9])) == 0
