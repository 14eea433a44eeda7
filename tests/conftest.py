"""Shared test settings and the state-comparison helpers.

Scale: set ``GMEMFAST_TEST_SMALL=1`` (implied by ``NUMBA_DISABLE_JIT=1``, when every
kernel runs as plain Python) to shrink file sizes, example counts and step counts.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

SMALL = os.environ.get("GMEMFAST_TEST_SMALL", "") not in ("", "0") or \
    os.environ.get("NUMBA_DISABLE_JIT", "") not in ("", "0")

settings.register_profile(
    "gmemfast",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gmemfast"))

PER_PAGE_KEYS = ("private", "allocated", "host_mapped", "guest_mapped", "pins", "folio_order",
                 "refcount", "direct_map_removed", "te_state")
DUMP_KEYS = ("size", "page_order") + PER_PAGE_KEYS + (
    "contents", "direct_map_entries", "attribute_ranges")


def as_list(values):
    """A per-page column (numpy array or list) as a plain list (bools compare equal to 0/1)."""
    if isinstance(values, list):
        return values
    dtype = getattr(values, "dtype", None)
    if dtype is not None:                       # numpy: one C-level conversion
        return values.tolist() if dtype == bool else values.astype("int64").tolist()
    return list(values)


def normalize_dump(d):
    """Any dump (engine: numpy arrays; reference: lists) as plain comparable Python."""
    out = {}
    for key in DUMP_KEYS:
        if key not in d:
            raise AssertionError(f"dump() has no key {key!r} (keys: {sorted(d)})")
        v = d[key]
        if key in PER_PAGE_KEYS:
            out[key] = as_list(v)
        elif key == "contents":
            out[key] = {int(p): bytes(c) for p, c in dict(v).items()}
        elif key == "direct_map_entries":
            out[key] = {k: int(v[k]) for k in ("1G", "2M", "4K")}
        else:
            out[key] = int(v)
    return out


def _first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def dump_diff(engine_dump, ref_dump, keys=DUMP_KEYS):
    """A readable description of every difference between two normalized dumps."""
    problems = []
    for key in keys:
        e, r = engine_dump[key], ref_dump[key]
        if e == r:
            continue
        if key in PER_PAGE_KEYS:
            if len(e) != len(r):
                problems.append(f"{key}: engine has {len(e)} pages, reference {len(r)}")
                continue
            bad = [i for i in range(len(e)) if e[i] != r[i]]
            show = ", ".join(f"page {i}: engine={e[i]} ref={r[i]}" for i in bad[:6])
            problems.append(f"{key}: {len(bad)} pages differ (first pages {bad[0]}..{bad[-1]}): {show}")
        elif key == "contents":
            only_e = sorted(set(e) - set(r))
            only_r = sorted(set(r) - set(e))
            differ = sorted(p for p in set(e) & set(r) if e[p] != r[p])
            problems.append(f"contents: nonzero only in engine {only_e[:8]}, only in reference "
                            f"{only_r[:8]}, bytes differ on {differ[:8]}")
        else:
            problems.append(f"{key}: engine={e!r} reference={r!r}")
    return problems


def assert_same_state(engine, ref, context=""):
    """Engine and reference dumps must be identical, key by key."""
    e = normalize_dump(engine.dump())
    r = normalize_dump(ref.dump())
    problems = dump_diff(e, r)
    if problems:
        raise AssertionError(f"state differs {context}:\n  " + "\n  ".join(problems))


def assert_same_counters(engine, ref, names, context=""):
    ec = engine.counters
    bad = {n: (int(ec[n]), ref.counters[n]) for n in names if int(ec[n]) != ref.counters[n]}
    if bad:
        raise AssertionError(f"counters differ {context} (engine, reference): {bad}")


def outcome(fn, *args, **kwargs):
    """Run fn; return ("ok", value) or ("err", class, errno, error_offset)."""
    from gmemfast import GmemError

    try:
        value = fn(*args, **kwargs)
    except GmemError as e:
        return ("err", type(e).__name__, e.errno, e.error_offset)
    return ("ok", value)


@pytest.fixture
def small():
    return SMALL


def gigabyte_folio_with_bytes(data: bytes, page: int = 5, cls=None):
    """A 1 GiB hugetlb file holding one 1 GiB folio, one page of which (``page``) holds
    ``data``: written while shared, then private again, so the folio merged back and that
    page is an exception of its 2 MiB entry. ``cls``: the class to build (the engine's
    ``GuestMemfd`` by default, or the reference's)."""
    import gmemfast
    cls = cls or gmemfast.GuestMemfd
    g = cls(1 << 30, gmemfast.GUEST_MEMFD_FLAG_MMAP | gmemfast.GUEST_MEMFD_FLAG_HUGETLB, page_order=18)
    g.fallocate(gmemfast.FALLOC_FL_KEEP_SIZE, 0, 1 << 30)
    g.set_memory_attributes(page * 4096, 4096, 0)
    g.host_write(page * 4096, data)
    g.set_memory_attributes(page * 4096, 4096, gmemfast.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert g.folio_order(0) == 18
    return g
