"""The VM layer: the legacy per-GFN attribute store and its guest view."""
import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmemfast import VM, GmemError, KVM_MEMORY_ATTRIBUTE_PRIVATE, MemoryFaultExit, PAGE_SIZE
from gmemfast.vm import RangeSet

P = PAGE_SIZE
ops = st.lists(st.tuples(st.integers(0, 80), st.integers(1, 12), st.booleans()), max_size=12)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 90), st.integers(1, 25))
def test_rangeset_matches_a_plain_set(assignments, a, n):
    rs, ref = RangeSet(), set()
    for start, length, present in assignments:
        rs.assign(start, start + length, present)
        for x in range(start, start + length):
            (ref.add if present else ref.discard)(x)
    assert all(s < e for s, e in zip(rs.starts, rs.ends))
    assert all(e < s for e, s in zip(rs.ends, rs.starts[1:])), "ranges stay disjoint and merged"
    b = a + n
    assert rs.covered(a, b) == sum(1 for x in range(a, b) if x in ref)
    for present in (True, False):
        want = next((x for x in range(a, b) if (x in ref) == present), -1)
        assert rs.first(a, b, present) == want
    assert all((x in rs) == (x in ref) for x in range(a, b))


def test_legacy_store_counts_one_write_per_page_and_drives_the_guest_view():
    vm = VM("snp", in_place=False)
    g = vm.create_guest_memfd(1 << 30)
    vm.set_user_memory_region(0, 0, 1 << 30, g)
    vm.set_memory_attributes(0, 1 << 30, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vm.counters["attr_writes_page"] == (1 << 30) // P
    vm.set_memory_attributes(0, 1 << 30, KVM_MEMORY_ATTRIBUTE_PRIVATE)     # already: no work
    assert vm.counters["attr_writes_page"] == (1 << 30) // P
    vm.set_memory_attributes(5 * P, 2 * P, 0)
    assert not vm.is_private(5 * P) and vm.is_private(7 * P)
    with pytest.raises(MemoryFaultExit) as info:
        vm.guest_read(4 * P, 2 * P, private=True)
    assert (info.value.gpa, info.value.private) == (5 * P, True)
    vm.guest_write(5 * P, b"shared", private=False)       # separate shared memory
    assert vm.guest_read(5 * P, 6, private=False) == b"shared"
    assert g.allocated_pages() == 0, "shared accesses in legacy mode never touch guest_memfd"
    with pytest.raises(GmemError) as err:
        g.set_memory_attributes(0, P, 0)
    assert err.value.errno == errno.ENOTTY
    # accepting a terabyte-sized legacy range is checked by ranges, not page by page
    assert vm.guest_accept(2 << 20, (1 << 30) - (2 << 20), chunk=2 << 20) == 511
    with pytest.raises(MemoryFaultExit):
        vm.guest_accept(0, 2 << 20)
