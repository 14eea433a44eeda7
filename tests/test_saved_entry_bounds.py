"""The checks a saved state's 2 MiB entries and ``meta`` array go through on the way in
(``_store.kept_l1``, ``_store.upgrade_meta``): a count of a 2 MiB entry is at most 512
pages and never negative, every other field fits the int32 the store keeps it in, and
the refusal is one line naming the damage; values at the edges of those ranges are kept
exactly. A ``meta`` array of the current format is taken as it is; one of format 1 has
its bookkeeping moved up 16 slots."""
from __future__ import annotations

import numpy as np
import pytest

from gmemfast import _kernels as K
from gmemfast import _store

I32 = np.iinfo(np.int32)
MESSAGE = "state arrays hold values out of range (damaged file)"


def saved_entries(n=6):
    rng = np.random.default_rng(11)
    saved = rng.integers(-1000, 1000, size=(n, K.NF), dtype=np.int64)
    saved[:, K.F_CNT:K.F_CNT + K.NCOUNTED] = rng.integers(0, K.N1 + 1, size=(n, K.NCOUNTED))
    return saved


def test_no_entries_at_all():
    """A state with no table of 2 MiB entries (every 1 GiB block uniform)."""
    kept = _store.kept_l1(np.zeros((0, K.NF), np.int64))
    assert kept.shape == (0, K.NF1) and kept.dtype == np.int32


@pytest.mark.parametrize("field, value", [
    (K.F_CNT, 0), (K.F_CNT + 1, K.N1), (K.F_CNT + K.NCOUNTED - 1, K.N1),   # counts at the edges
    (K.F_WORD, I32.max), (K.F_CHILD, I32.min), (K.F_DSPLIT, I32.max),
    (K.F_CNT + K.NCOUNTED, I32.min),                                       # number of exceptions
    (K.F_CNT + K.NCOUNTED + 1, I32.max), (K.NF - 1, I32.min),              # exceptions
])
def test_values_at_the_edges_are_kept_exactly(field, value):
    saved = saved_entries()
    saved[3, field] = value
    kept = _store.kept_l1(saved)
    assert (_store.saved_l1(kept) == saved).all()


@pytest.mark.parametrize("field, value", [
    (K.F_CNT, -1),                                # a negative count, every other field fine
    (K.F_CNT + 4, K.N1 + 1),                      # a count above 512
    (K.F_CNT + K.NCOUNTED - 1, K.N1 + 1),
    (K.F_WORD, I32.max + 1),                      # another field above int32
    (K.F_CHILD, I32.min - 1),                     # ... below it
    (K.NF - 1, I32.min - 1),
    (K.F_CNT + K.NCOUNTED, I32.max + 1),
])
def test_a_value_out_of_range_is_refused_alone(field, value):
    saved = saved_entries()
    saved[4, field] = value
    with pytest.raises(ValueError) as e:
        _store.kept_l1(saved)
    assert str(e.value) == MESSAGE


def test_meta_of_the_current_format_is_taken_as_it_is():
    meta = np.arange(K.META_SIZE, dtype=np.int64) * 3 + 1
    assert np.array_equal(_store.upgrade_meta(meta.copy(), 2), meta)


def test_meta_of_format_1_has_its_bookkeeping_moved():
    old = np.arange(K.META_SIZE, dtype=np.int64) + 1000
    new = _store.upgrade_meta(old.copy(), 1)
    first = K.M_FREE1 - K.META_V1_SHIFT                  # 64: where format 1's bookkeeping began
    assert first == 64
    assert np.array_equal(new[:64], old[:64])            # the counters stay
    assert not new[64:K.M_FREE1].any()                   # the counters format 1 lacked: zero
    assert np.array_equal(new[K.M_FREE1:], old[64:64 + K.META_SIZE - K.M_FREE1])
    wrong = np.zeros(K.META_SIZE + 1, np.int64)           # the wrong shape: left to the loader
    assert _store.upgrade_meta(wrong, 1) is wrong
