"""The metadata limit on shareability ranges (``metadata_limit``, docs/model.md §4.4
step 3 and §8): a conversion that would leave the file with more maximal runs of equal
shareability than the limit fails with ``ENOMEM`` and changes nothing; one that leaves
exactly the limit succeeds. The engine counts the runs the conversion would leave from the
pages next to the range; the reference (tests/naive.py) counts them over the whole file
after the change. Conversions here start and end at the file's first and last pages, next
to them, and on both sides of 2 MiB and 1 GiB block boundaries."""
from __future__ import annotations

import random

import pytest

import naive
import gmemfast
from conftest import assert_same_counters, outcome
from gmemfast import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE

P = 4096
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def runs(private):
    """Maximal runs of equal shareability of a list of page states."""
    return 1 + sum(1 for a, b in zip(private, private[1:]) if a != b)


def test_runs_at_the_limit_by_hand():
    """64 pages, all private, limit 3: the counts below follow from the definition."""
    g = gmemfast.GuestMemfd(64 * P, GUEST_MEMFD_FLAG_MMAP, metadata_limit=3)
    g.set_memory_attributes(0, P, 0)                   # [S][P...]: 2 runs
    g.set_memory_attributes(63 * P, P, 0)              # [S][P...][S]: 3 runs
    assert g.attribute_ranges == 3
    with pytest.raises(gmemfast.GmemError) as e:       # [S][P..][S][P..][S] would be 5
        g.set_memory_attributes(10 * P, P, 0)
    assert e.value.errno == 12 and e.value.error_offset == 10 * P
    g.set_memory_attributes(P, P, 0)                   # widens the first run: still 3
    g.set_memory_attributes(62 * P, P, 0)              # widens the last run: still 3
    g.set_memory_attributes(0, 2 * P, PRIVATE)         # [P...][S S]: 2
    assert g.attribute_ranges == 2
    g.set_memory_attributes(0, P, 0)                   # the first page alone: 3
    with pytest.raises(gmemfast.GmemError):            # page 1 alone after it: 4
        g.set_memory_attributes(2 * P, P, 0)
    g.set_memory_attributes(P, 61 * P, 0)              # everything shared: 1
    assert g.attribute_ranges == 1
    assert g.counters["convert_enomem"] == 2


def _points(npages):
    """Page numbers where a conversion's edges matter: the file's ends, block boundaries."""
    pts = {0, 1, 2, npages - 2, npages - 1, npages}
    for b in (512, 262144):
        for k in range(b, npages, b):
            pts.update((k - 1, k, k + 1))
    return sorted(p for p in pts if 0 <= p <= npages)


CASES = [(npages, shared, limit) for npages, shared in ((64, False), (64, True), (4 * 512, False))
         for limit in (1, 2, 3, 4, 5)] + [(262144 + 1024, True, 3), (262144 + 1024, False, 5)]


@pytest.mark.parametrize("npages, init_shared, limit", CASES)
def test_conversions_under_a_limit_match_the_reference(npages, init_shared, limit):
    flags = GUEST_MEMFD_FLAG_MMAP | (GUEST_MEMFD_FLAG_INIT_SHARED if init_shared else 0)
    eng = gmemfast.GuestMemfd(npages * P, flags, metadata_limit=limit)
    ref = naive.GuestMemfd(npages * P, flags, metadata_limit=limit)
    rng = random.Random(f"range-limit-{npages}-{limit}-{init_shared}")
    pts = _points(npages)
    steps = 30 if npages > 100000 else 150
    for step in range(steps):
        p0 = rng.choice(pts) if rng.random() < 0.8 else rng.randrange(npages)
        p1 = rng.choice(pts) if rng.random() < 0.8 else rng.randrange(npages + 1)
        if p0 == p1:
            p1 = p0 + 1 if p0 < npages else p0 - 1
        p0, p1 = min(p0, p1), max(p0, p1)
        attr = rng.choice((0, PRIVATE))
        what = f"step {step}: [{p0}, {p1}) to {'private' if attr else 'shared'}"
        before = ref.private[:]
        got = outcome(eng.set_memory_attributes, p0 * P, (p1 - p0) * P, attr)
        want = outcome(ref.set_memory_attributes, p0 * P, (p1 - p0) * P, attr)
        assert got == want, what
        after = before[:p0] + [bool(attr)] * (p1 - p0) + before[p1:]
        assert (got[0] == "ok") == (runs(after) <= limit), what
        assert eng.attribute_ranges == runs(ref.private), what
        assert eng.private_pages() == ref.private.count(True), what
        for p in {max(p0 - 1, 0), p0, p1 - 1, min(p1, npages - 1)}:
            assert eng.is_private(p * P) == ref.private[p], (what, p)
    assert_same_counters(eng, ref, naive.COUNTERS, "at the end")
    eng.check()
