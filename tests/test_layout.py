"""The kernels' literal constants agree with the names in ``_layout``."""
from gmemfast import _kernels as K
from gmemfast import _layout as L


def test_state_bits_agree():
    for name in ("ALLOC", "PRIV", "HMAP", "GMAP", "PIN", "DATA", "DMAP_OFF", "HUGE", "GIG",
                 "ORDER_MASK", "TE_SHIFT", "TE_MASK"):
        assert getattr(K, name) == getattr(L, name), name
    assert K.NCOUNTED == len(L.COUNTED_BITS)
    assert all(bit == 1 << k for k, bit in enumerate(L.COUNTED_BITS))


def test_counter_indices_agree():
    for i, name in enumerate(L.COUNTER_NAMES):
        assert getattr(K, "C_" + name.upper()) == i, name
    assert L.NCOUNTERS <= K.M_FREE1, "counters would overlap the meta bookkeeping"


def test_counter_names_unique():
    assert len(set(L.COUNTER_NAMES)) == len(L.COUNTER_NAMES)
