"""Pins a 4 KiB punch orphans at the edges of the punched range (docs/model.md §4.2), and
injected ``ENOMEM`` faults (armed, re-armed, disarmed, refused counts): engine and
reference (tests/naive.py) run the same calls and must agree on every page and counter."""
from __future__ import annotations

import errno

import numpy as np
import pytest

import naive
import gmemfast
from conftest import assert_same_state
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
                      GUEST_MEMFD_FLAG_MMAP, GmemError)

P = 4096
M2 = 2 << 20
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def both(size=M2, flags=SHARED):
    return gmemfast.GuestMemfd(size, flags), naive.GuestMemfd(size, flags)


def outcome(fn, *args):
    try:
        fn(*args)
    except GmemError as e:
        return e.errno
    return 0


# ------------------------------------------------------------------ orphaned pins

def test_pins_across_the_edges_of_a_punch_keep_their_pages_outside_it():
    """Pins [1, 3) and [7, 9) straddle the punch [2, 8): pages 2 and 7 leave the file,
    pages 1 and 8 stay pinned until their pin is released."""
    eng, ref = both()
    pins = {}
    for name, h in (("eng", eng), ("ref", ref)):
        h.fallocate(KEEP, 0, 16 * P)
        pins[name] = [h.pin(P, 2 * P), h.pin(7 * P, 2 * P), h.pin(4 * P, P)]
        h.fallocate(PUNCH, 2 * P, 6 * P)
    assert_same_state(eng, ref, "after the punch")
    d = eng.dump()
    assert [int(d["pins"][p]) for p in range(10)] == [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    # the punched range is allocated and pinned again: the orphans are not these pages
    for name, h in (("eng", eng), ("ref", ref)):
        h.fallocate(KEEP, 0, 16 * P)
        pins[name].append(h.pin(2 * P, 6 * P))
    assert_same_state(eng, ref, "pinned again")
    # releasing the straddling pins drops only pages 1 and 8
    for k in (0, 1, 2):
        pins["eng"][k].release()
        pins["ref"][k].release()
        assert_same_state(eng, ref, f"pin {k} released")
        eng.check()
    d = eng.dump()
    assert [int(d["pins"][p]) for p in range(10)] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    pins["eng"][3].release()
    pins["ref"][3].release()
    assert_same_state(eng, ref, "all released")
    assert eng.counters["unpins"] == ref.counters["unpins"] == 2 + 2 + 1 + 6
    assert sum(eng.dump()["pins"]) == 0 and eng.pins == ()


def test_two_pins_on_one_page_and_a_punch_of_that_page_only():
    eng, ref = both()
    pins = []
    for h in (eng, ref):
        h.fallocate(KEEP, 0, 8 * P)
        pins.append((h.pin(3 * P, 2 * P), h.pin(2 * P, 2 * P)))   # page 3 pinned twice
        h.fallocate(PUNCH, 3 * P, P)
    assert_same_state(eng, ref, "after the punch")
    for a, b in pins:
        a.release()
    assert_same_state(eng, ref, "one released")
    for a, b in pins:
        b.release()
    assert_same_state(eng, ref, "both released")
    eng.check()
    assert sum(eng.dump()["pins"]) == 0


# ------------------------------------------------------------------ injected ENOMEM

def test_injected_enomem_arms_one_fault_by_default():
    eng, ref = both(flags=GUEST_MEMFD_FLAG_MMAP)
    eng.inject_enomem()
    ref.inject_enomem()
    results = []
    for h in (eng, ref):
        results.append([outcome(h.set_memory_attributes, 0, P, 0),
                        outcome(h.set_memory_attributes, 0, P, 0)])
    assert results[0] == results[1] == [errno.ENOMEM, 0]
    assert eng.counters["convert_enomem"] == 1
    assert_same_state(eng, ref, "after the fault")


def test_injecting_zero_faults_disarms_them():
    eng, ref = both(flags=GUEST_MEMFD_FLAG_MMAP)
    for h in (eng, ref):
        h.inject_enomem(3)
        h.inject_enomem(0)                   # re-arming sets the count: none left
        assert outcome(h.set_memory_attributes, 0, P, 0) == 0
    assert eng.counters["convert_enomem"] == 0
    assert_same_state(eng, ref, "disarmed")


def test_injected_fault_counts_are_checked():
    g = gmemfast.GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP)
    with pytest.raises(ValueError) as err:
        g.inject_enomem(-1)
    assert str(err.value) == "n must be >= 0, not -1"
    with pytest.raises(TypeError) as err:
        g.inject_enomem("2")
    assert str(err.value) == "n must be an int, not str ('2')"
    g.inject_enomem(np.int64(2))              # numpy ints are ints too
    assert outcome(g.set_memory_attributes, 0, P, 0) == errno.ENOMEM
