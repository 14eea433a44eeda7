"""The kernels of the per-call conversion path are resolved on first use, once per
process (``_store._HotKernels``): a conversion through a fresh, unresolved set gives the
reference's result (tests/naive.py), one page and a range, and leaves the set resolved,
the same kernels used from then on. The other tests of the process find the set long
resolved; this one starts from a fresh one."""
from __future__ import annotations

import pytest

import naive
import gmemfast
from conftest import assert_same_counters, assert_same_state
from gmemfast import _store
from gmemfast import GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE

P = 4096


@pytest.fixture
def fresh_hot(monkeypatch):
    hot = _store._HotKernels()
    monkeypatch.setattr(_store, "_HOT", hot)
    return hot


def test_first_conversions_resolve_the_kernels_once(fresh_hot):
    assert not fresh_hot.ready
    eng = gmemfast.GuestMemfd(64 * P, GUEST_MEMFD_FLAG_MMAP)
    ref = naive.GuestMemfd(64 * P, GUEST_MEMFD_FLAG_MMAP)
    for g in (eng, ref):
        g.set_memory_attributes(5 * P, P, 0)                # one page: the single-page kernel
    assert fresh_hot.ready
    kernels = (fresh_hot.convert_page, fresh_hot.convert)
    for g in (eng, ref):
        g.set_memory_attributes(8 * P, 20 * P, 0)           # a range
        g.set_memory_attributes(9 * P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert fresh_hot.ready and (fresh_hot.convert_page, fresh_hot.convert) == kernels
    assert_same_counters(eng, ref, naive.COUNTERS, "after the conversions")
    assert_same_state(eng, ref, "after the conversions")
    assert eng.private_pages() == 64 - 1 - 20 + 1
