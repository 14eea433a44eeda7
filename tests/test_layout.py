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


def test_meta_bookkeeping_follows_the_counters():
    """Each bookkeeping slot of the store's ``meta`` array is its own, after every
    counter and inside the array; format 1's layout is the same one shifted down."""
    slots = [getattr(K, n) for n in dir(K) if n.startswith("M_") and n != "M_GCNT"]
    slots += [K.M_GCNT + k for k in range(len(L.COUNTED_BITS))]
    assert len(set(slots)) == len(slots)
    assert min(slots) == K.M_FREE1 >= L.NCOUNTERS
    assert max(slots) < K.META_SIZE
    assert K.M_FREE1 - K.META_V1_SHIFT == 64     # format 1: 64 counters, then the bookkeeping


def test_counter_names_unique():
    assert len(set(L.COUNTER_NAMES)) == len(L.COUNTER_NAMES)


def test_counted_bit_indices_agree():
    for name in ("K_ALLOC", "K_PRIV", "K_HMAP", "K_GMAP", "K_PIN", "K_DATA", "K_DMAP_OFF", "K_HUGE"):
        k = getattr(L, name)
        assert getattr(K, name) == k, name
        assert L.COUNTED_BITS[k] == getattr(L, name[2:]), name


def test_policy_codes_agree():
    assert L.VM_TYPE_CODES == {"sw-protected": K.VM_SW, "snp": K.VM_SNP, "tdx": K.VM_TDX}
    assert L.DIRECT_MAP_CODES == {"keep": K.DMAP_KEEP, "no-direct-map": K.DMAP_NONE,
                                  "on-conversion": K.DMAP_ONCONV}


def test_invariant_numbers_agree():
    numbers = {getattr(K, n) for n in dir(K) if n.startswith("INV_")}
    assert numbers == set(L.INVARIANTS)


def test_kernel_abi_literals_agree():
    from gmemfast import uapi
    from gmemfast.units import PAGE_SHIFT, PAGE_SIZE
    assert (K.PAGE_SHIFT, K.PAGE_BYTES) == (PAGE_SHIFT, PAGE_SIZE)
    assert K.COUNTED_MASK == (1 << len(L.COUNTED_BITS)) - 1
    assert set(uapi.VM_TYPES) == set(L.VM_TYPE_CODES)
