"""Every error path of the public API.

Each case checks the exception class, ``errno``, ``error_offset``, that the message names
the bad value, and that ``dump()`` is identical before and after (an error never leaves
partial state; the one exception, by design, is a failed conversion to private, whose
host mappings of the range stay zapped). GuestMemfd-level cases also run against the
naive reference, which must agree.
"""
from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest

import naive
from conftest import normalize_dump

gmemfast = pytest.importorskip("gmemfast")
from gmemfast import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,  # noqa: E402
                      GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_INIT_SHARED,
                      GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
                      KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
                      KVM_SET_MEMORY_ATTRIBUTES2_ZERO, PAGE_SIZE, VM, GmemError,
                      SigBusError)

PS = PAGE_SIZE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE
MMAP = GUEST_MEMFD_FLAG_MMAP
SHARED = GUEST_MEMFD_FLAG_INIT_SHARED
HUGETLB = GUEST_MEMFD_FLAG_HUGETLB
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
PRESERVE = KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
ZERO = KVM_SET_MEMORY_ATTRIBUTES2_ZERO
NPAGES = 8
SIZE = NPAGES * PS


def spellings(value):
    """The ways a message may name a value."""
    if isinstance(value, str):
        return {value}
    out = {str(value), hex(value), f"{value:#X}"}
    if value > 0 and value % 1024 == 0:
        for unit, mult in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
            if value % mult == 0:
                out.add(f"{value // mult}{unit}")
    return out


def assert_names(exc, *alternatives):
    """The message names at least one of the alternatives (each value in any spelling)."""
    if not alternatives:
        return
    msg = str(exc)
    for alt in alternatives:
        if any(s in msg for s in spellings(alt)):
            return
    raise AssertionError(f"message {msg!r} names none of {alternatives!r}")


@pytest.fixture(params=["engine", "naive"])
def GM(request):
    return gmemfast.GuestMemfd if request.param == "engine" else naive.GuestMemfd


PINS = {}  # id(prepared gmem) -> its pin on page 3


def prepared(GM, **policies):
    """8 pages, MMAP|INIT_SHARED: page 0 and 5 written, page 3 pinned, page 6 private."""
    g = GM(SIZE, MMAP | SHARED, **policies)
    g.host_write(0, b"\x11" * PS)
    g.host_write(5 * PS + 10, b"\x55" * 100)
    g.host_read(2 * PS, 1)
    pin = g.pin(3 * PS)
    g.set_memory_attributes(6 * PS, PS, PRIVATE)
    PINS[id(g)] = pin
    return g


def check_error(g, fn, args, err, *, error_offset=None, names=(), cls=GmemError,
                zapped=None):
    """Call fn(*args): it must raise cls with errno/error_offset/message, state unchanged.

    ``zapped`` = (first, end) pages whose host mappings may be cleared (failed to-private).
    """
    before = normalize_dump(g.dump())
    with pytest.raises(cls) as info:
        fn(*args)
    e = info.value
    if cls is GmemError:
        assert not isinstance(e, SigBusError), f"unexpected SIGBUS: {e!r}"
    assert e.errno == err, f"errno {errno.errorcode.get(e.errno, e.errno)}, wanted " \
                           f"{errno.errorcode[err]}: {e}"
    assert e.error_offset == error_offset, f"error_offset {e.error_offset!r} != {error_offset!r}: {e}"
    assert_names(e, *names)
    after = normalize_dump(g.dump())
    if zapped is not None:
        a, b = zapped
        expect = list(before["host_mapped"])
        expect[a:b] = [0] * (b - a)
        assert after["host_mapped"] == expect, "host mappings of the range must be zapped"
        before["host_mapped"] = expect
    for key in before:
        assert after[key] == before[key], f"{key} changed by a failed call {fn.__name__}{args}"
    return e


# ------------------------------------------------------------------ creation
CREATE_EINVAL = [
    # (size, flags, kwargs, names)
    (PS, 1 << 4, {}, ["0x10", 16]),
    (PS, 1 << 63, {}, [1 << 63]),
    (PS, MMAP | (1 << 5), {}, ["0x21", 33, "0x20"]),
    (0, 0, {}, ["size"]),
    (1, 0, {}, [1]),
    (4095, 0, {}, [4095]),
    (4097, 0, {}, [4097]),
    (-PS, 0, {}, [-PS, "-0x1000"]),
    (PS, HUGETLB, {"page_order": 9}, [PS]),
    (3 << 20, HUGETLB, {"page_order": 9}, [3 << 20]),
    (2 << 20, HUGETLB, {"page_order": 18}, [2 << 20]),
    (2 << 20, 0, {"page_order": 9}, ["page_order", "HUGETLB"]),
    (2 << 20, HUGETLB, {"page_order": 12}, [12]),
    (2 << 20, HUGETLB, {"page_order": 0}, ["page_order", "order"]),
    (PS, 0, {"page_order": 18}, ["page_order", "HUGETLB"]),
    (PS, GUEST_MEMFD_FLAG_NO_DIRECT_MAP, {"direct_map": "keep"}, ["keep", "NO_DIRECT_MAP"]),
]


@pytest.mark.parametrize("size,flags,kwargs,names", CREATE_EINVAL)
def test_create_einval(GM, size, flags, kwargs, names):
    with pytest.raises(GmemError) as info:
        GM(size, flags, **kwargs)
    assert info.value.errno == errno.EINVAL
    assert info.value.error_offset is None
    assert_names(info.value, *names)


def test_create_types(GM):
    with pytest.raises(TypeError):
        GM(PS, "1")
    with pytest.raises(TypeError):
        GM(4096.0)
    with pytest.raises(TypeError):
        GM(PS, 0, page_order="9")
    assert GM("8K").size == 8192                     # human sizes are accepted here
    assert GM("2M", HUGETLB, page_order=9).nr_pages == 512


def test_create_unknown_policy_value():
    with pytest.raises(ValueError) as info:
        gmemfast.GuestMemfd(PS, 0, direct_map="sometimes")
    assert not isinstance(info.value, GmemError)          # a Python argument error, no errno
    assert "sometimes" in str(info.value)


# ---------------------------------------------------------------- fallocate
FALLOC_CASES = [
    # (mode, offset, size, errno, error_offset, names)
    (0, 0, PS, errno.EOPNOTSUPP, None, ["KEEP_SIZE", 0]),
    (PUNCH, 0, PS, errno.EOPNOTSUPP, None, ["KEEP_SIZE", PUNCH]),
    (KEEP | 0x10, 0, PS, errno.EOPNOTSUPP, None, [0x11, 0x10]),
    (KEEP | PUNCH | 0x8, 0, PS, errno.EOPNOTSUPP, None, [0xB, 0x8]),
    (KEEP, PS + 1, PS, errno.EINVAL, None, [PS + 1]),
    (KEEP, 0, PS + 1, errno.EINVAL, None, [PS + 1]),
    (KEEP | PUNCH, 100, PS, errno.EINVAL, None, [100]),
    (KEEP, 0, 0, errno.EINVAL, None, ["size", "len", "length", 0]),
    (KEEP, -PS, PS, errno.EINVAL, None, [-PS]),
    (KEEP, SIZE, PS, errno.EINVAL, None, [SIZE]),
    (KEEP, SIZE + PS, PS, errno.EINVAL, None, [SIZE + PS, SIZE]),
    (KEEP, SIZE - PS, 2 * PS, errno.EINVAL, None, [SIZE + PS, SIZE, 2 * PS]),
    (KEEP, (1 << 64) - PS, 2 * PS, errno.EINVAL, None, [(1 << 64) - PS, (1 << 64) + PS, 2 * PS]),
]


@pytest.mark.parametrize("mode,offset,size,err,error_offset,names", FALLOC_CASES)
def test_fallocate_errors(GM, mode, offset, size, err, error_offset, names):
    g = prepared(GM)
    check_error(g, g.fallocate, (mode, offset, size), err, error_offset=error_offset,
                names=names)


HUGE_PS = 512 * PS


@pytest.mark.parametrize("offset,size", [(0, 4 * HUGE_PS), (3 * PS, PS), (3 * PS, 1 << 40),
                                         (2 * PS, 1 << 40)])
def test_punch_pinned_hugetlb_eagain(GM, offset, size):
    """With hugetlb backing a pinned page fails the whole punch at that page (clamped
    ranges included), nothing changed; after the release the punch succeeds."""
    g = GM(4 * HUGE_PS, HUGETLB | MMAP, page_order=9)
    g.set_memory_attributes(0, HUGE_PS, 0)
    g.host_write(0, b"\x33" * (4 * PS))
    pin = g.pin(3 * PS)
    check_error(g, g.fallocate, (KEEP | PUNCH, offset, size), errno.EAGAIN, error_offset=3 * PS,
                names=[3 * PS])
    pin.release()
    g.fallocate(KEEP | PUNCH, offset, size)
    assert g.folio_order(3 * PS) == -1


def test_punch_pinned_4k_is_a_truncate(GM):
    """With 4 KiB backing a punch removes pinned pages anyway: the range reads as zeroes,
    the page is a hole, and releasing the orphaned pin later changes nothing."""
    g = prepared(GM)
    pin = PINS.pop(id(g))
    g.host_write(3 * PS, b"\x77" * 16)
    g.fallocate(KEEP | PUNCH, 2 * PS, 3 * PS)
    assert g.folio_order(3 * PS) == -1
    assert g.host_read(3 * PS, 16) == bytes(16)              # faults a new page in
    d = normalize_dump(g.dump())
    assert d["pins"][3] == 0 and d["refcount"][3] == 1
    second = g.pin(3 * PS)                                    # a pin on the new page
    before = normalize_dump(g.dump())
    pin.release()                                             # the orphan: nothing changes
    assert normalize_dump(g.dump()) == before
    with pytest.raises(GmemError) as info:
        pin.release()
    assert info.value.errno == errno.EINVAL
    second.release()
    g.set_memory_attributes(0, SIZE, PRIVATE)                 # no pin left anywhere


def test_fallocate_types(GM):
    g = prepared(GM)
    before = normalize_dump(g.dump())
    for args in ((KEEP, "0", PS), (KEEP, 0, "4096"), ("1", 0, PS), (KEEP, 0.0, PS)):
        with pytest.raises(TypeError):
            g.fallocate(*args)
    assert normalize_dump(g.dump()) == before


# ------------------------------------------------------------------ host access
def test_host_access_without_mmap(GM):
    g = GM(SIZE, 0)
    g.fallocate(KEEP, 0, SIZE)
    for fn, args in ((g.host_read, (0, 1)), (g.host_write, (0, b"x")),
                     (g.host_read, (SIZE, 1)), (g.pin, (0, PS))):
        check_error(g, fn, args, errno.ENODEV, names=["MMAP", "mmap"])
    if hasattr(g, "mmap"):
        check_error(g, g.mmap, (), errno.ENODEV, names=["MMAP", "mmap"])


SIGBUS_CASES = [
    # (fn name, offset, length, error_offset): the first page touched faults, nothing changes
    ("host_read", 6 * PS, 1, 6 * PS),                 # private
    ("host_write", 6 * PS + 123, 10, 6 * PS),
    ("host_read", SIZE, 1, SIZE),                     # past the end
    ("host_write", SIZE + 5 * PS + 3, 1, SIZE + 5 * PS),
]


@pytest.mark.parametrize("name,offset,length,error_offset", SIGBUS_CASES)
def test_host_access_sigbus(GM, name, offset, length, error_offset):
    g = prepared(GM)
    fn = getattr(g, name)
    arg = b"\xee" * length if name == "host_write" else length
    check_error(g, fn, (offset, arg), errno.EFAULT, error_offset=error_offset,
                names=[error_offset], cls=SigBusError)


PARTIAL_CASES = [
    # (fn name, offset, length, error_offset): pages before the faulting one are touched
    ("host_write", 5 * PS + 4000, 200, 6 * PS),       # shared page, then private page
    ("host_read", 4 * PS, 3 * PS, 6 * PS),            # spans into the private page
    ("host_write", SIZE - 1, 2, SIZE),                # straddles the end
    ("host_read", 7 * PS, 2 * PS, SIZE),
    ("host_write", 7 * PS, 3 * PS, SIZE),
]


@pytest.mark.parametrize("name,offset,length,error_offset", PARTIAL_CASES)
def test_host_access_partial(GM, name, offset, length, error_offset):
    """Like memset/memcpy on the mapping: SIGBUS at the faulting page's offset, the pages
    before it faulted in (and, for a write, holding what was written), the rest untouched."""
    g = prepared(GM)
    before = normalize_dump(g.dump())
    fn = getattr(g, name)
    with pytest.raises(SigBusError) as info:
        fn(offset, b"\xee" * length if name == "host_write" else length)
    assert info.value.errno == errno.EFAULT and info.value.error_offset == error_offset
    assert_names(info.value, error_offset)
    after = normalize_dump(g.dump())
    touched = range(offset // PS, error_offset // PS)
    assert touched, "a partial case must touch a page before the fault"
    for p in range(NPAGES):
        if p in touched:
            assert after["host_mapped"][p] and after["allocated"][p], p
        else:
            for key in ("host_mapped", "allocated", "private", "pins"):
                assert after[key][p] == before[key][p], (key, p)
    if name == "host_write":
        written = g.host_read(offset, error_offset - offset)
        assert written == b"\xee" * (error_offset - offset)
    for p, c in before["contents"].items():
        if p not in touched or name == "host_read":
            assert after["contents"].get(p) == c, p


def test_sigbus_through_mmap_object():
    g = prepared(gmemfast.GuestMemfd)
    m = g.mmap()
    check_error(g, m.read, (6 * PS, 1), errno.EFAULT, error_offset=6 * PS, cls=SigBusError)
    check_error(g, m.write, (SIZE, b"x"), errno.EFAULT, error_offset=SIZE, cls=SigBusError)


def test_host_access_types(GM):
    g = prepared(GM)
    with pytest.raises(TypeError):
        g.host_read("0", 1)
    with pytest.raises(TypeError):
        g.host_write("0", b"x")
    with pytest.raises(TypeError):
        g.pin("0")


# ------------------------------------------------------------------ pins
PIN_CASES = [
    # (offset, size, errno, names)
    (PS + 1, PS, errno.EINVAL, [PS + 1]),
    (0, PS + 1, errno.EINVAL, [PS + 1]),
    (0, 0, errno.EINVAL, ["size", 0]),
    (-PS, PS, errno.EINVAL, [-PS]),
    (6 * PS, PS, errno.EFAULT, [6 * PS]),            # private
    (4 * PS, 3 * PS, errno.EFAULT, [6 * PS]),        # range reaches the private page
    (SIZE, PS, errno.EFAULT, [SIZE]),                # past the end
    (7 * PS, 2 * PS, errno.EFAULT, [SIZE]),
]


@pytest.mark.parametrize("offset,size,err,names", PIN_CASES)
def test_pin_errors(GM, offset, size, err, names):
    g = prepared(GM)
    # GUP reports no offset: error_offset is None
    check_error(g, g.pin, (offset, size), err, names=names)


def test_pin_double_release(GM):
    g = prepared(GM)
    pin = g.pin(4 * PS, 2 * PS)
    pin.release()
    check_error(g, pin.release, (), errno.EINVAL)
    PINS.pop(id(g)).release()
    g.fallocate(KEEP | PUNCH, 0, SIZE)               # nothing pinned any more


# ------------------------------------------------------------------ conversion
CONVERT_EINVAL = [
    # (offset, size, attributes, flags, names)
    (0, PS, 1, 0, [1, "attributes"]),
    (0, PS, 1 << 4, 0, [1 << 4]),
    (0, PS, PRIVATE | (1 << 40), 0, [PRIVATE | (1 << 40), 1 << 40]),
    (0, PS, PRIVATE, 4, [4]),
    (0, PS, 0, 1 << 10, [1 << 10]),
    (0, PS, PRIVATE, PRESERVE | ZERO, [PRESERVE | ZERO, "PRESERVE", "ZERO"]),
    (0, 0, PRIVATE, 0, ["size", 0]),
    (PS + 8, PS, PRIVATE, 0, [PS + 8]),
    (0, PS - 8, PRIVATE, 0, [PS - 8]),
    ((1 << 64) - PS, 2 * PS, PRIVATE, 0, [(1 << 64) - PS, 2 * PS]),
    (SIZE, PS, PRIVATE, 0, [SIZE]),
    (SIZE + PS, PS, 0, 0, [SIZE + PS]),
    (SIZE - PS, 2 * PS, PRIVATE, 0, [SIZE + PS, SIZE - PS]),
    (0, SIZE + PS, 0, 0, [SIZE + PS]),
]


@pytest.mark.parametrize("offset,size,attributes,flags,names", CONVERT_EINVAL)
def test_convert_einval(GM, offset, size, attributes, flags, names):
    g = prepared(GM)
    check_error(g, g.set_memory_attributes, (offset, size, attributes, flags), errno.EINVAL,
                names=names)


@pytest.mark.parametrize("vm_type", ["snp", "tdx"])
def test_convert_preserve_to_shared_on_coco(GM, vm_type):
    g = GM(SIZE, MMAP, vm_type=vm_type)
    g.set_memory_attributes(0, PS, 0, 0)
    check_error(g, g.set_memory_attributes, (PS, PS, 0, PRESERVE), errno.EOPNOTSUPP,
                error_offset=PS, names=["PRESERVE", PRESERVE])
    g.set_memory_attributes(PS, PS, PRIVATE, PRESERVE)   # to private: allowed before launch


def test_convert_eagain(GM):
    g = prepared(GM)
    e = check_error(g, g.set_memory_attributes, (0, SIZE, PRIVATE, 0), errno.EAGAIN,
                    error_offset=3 * PS, names=[3 * PS], zapped=(0, NPAGES))
    assert e.error_offset == 3 * PS
    # the pinned page alone, and a range starting at it
    check_error(g, g.set_memory_attributes, (3 * PS, PS, PRIVATE, 0), errno.EAGAIN,
                error_offset=3 * PS, names=[3 * PS], zapped=(3, 4))
    check_error(g, g.set_memory_attributes, (2 * PS, 2 * PS, PRIVATE, PRESERVE), errno.EAGAIN,
                error_offset=3 * PS, names=[3 * PS], zapped=(2, 4))
    # zapped pages are still shared and fault back in with their contents
    assert g.host_read(0, 1) == b"\x11"
    PINS.pop(id(g)).release()
    g.set_memory_attributes(0, SIZE, PRIVATE, 0)


def test_convert_eagain_two_pins_reports_first(GM):
    g = GM(SIZE, MMAP | SHARED)
    g.pin(5 * PS)
    g.pin(2 * PS)
    g.host_write(0, b"a" * SIZE)
    check_error(g, g.set_memory_attributes, (PS, 6 * PS, PRIVATE, 0), errno.EAGAIN,
                error_offset=2 * PS, names=[2 * PS], zapped=(1, 7))


def test_convert_enomem_injected(GM):
    g = prepared(GM)
    g.inject_enomem(1)
    # a conversion that has nothing to do returns before reserving metadata
    g.set_memory_attributes(6 * PS, PS, PRIVATE, 0)
    check_error(g, g.set_memory_attributes, (4 * PS, 2 * PS, PRIVATE, 0), errno.ENOMEM,
                error_offset=4 * PS, names=[4 * PS])
    g.set_memory_attributes(4 * PS, 2 * PS, PRIVATE, 0)     # consumed: works now
    assert g.is_private(4 * PS, 3 * PS)
    g.inject_enomem(2)
    for _ in range(2):
        check_error(g, g.set_memory_attributes, (0, PS, PRIVATE, 0), errno.ENOMEM,
                    error_offset=0, names=[0])
    g.set_memory_attributes(0, PS, PRIVATE, 0)


def test_convert_enomem_to_shared_does_not_zap(GM):
    g = GM(SIZE, MMAP | SHARED)
    g.host_write(0, b"z" * SIZE)
    g.set_memory_attributes(2 * PS, PS, PRIVATE)
    g.inject_enomem(1)
    check_error(g, g.set_memory_attributes, (0, SIZE, PRIVATE, 0), errno.ENOMEM,
                error_offset=0)      # ENOMEM comes before the zap: mappings untouched


def test_convert_enomem_metadata_limit(GM):
    g = GM(SIZE, MMAP, metadata_limit=2)
    g.set_memory_attributes(0, 2 * PS, 0)            # 2 ranges: fine
    check_error(g, g.set_memory_attributes, (4 * PS, PS, 0, 0), errno.ENOMEM,
                error_offset=4 * PS, names=[4 * PS])
    g.set_memory_attributes(2 * PS, PS, 0)           # extends the first range: fine
    g.set_memory_attributes(0, SIZE, 0)              # one range


def test_convert_types(GM):
    g = prepared(GM)
    before = normalize_dump(g.dump())
    for args in (("0", PS, PRIVATE, 0), (0, "4096", PRIVATE, 0), (0, PS, "8", 0),
                 (0, PS, PRIVATE, None), (0.0, PS, PRIVATE, 0)):
        with pytest.raises(TypeError):
            g.set_memory_attributes(*args)
    assert normalize_dump(g.dump()) == before


def test_convert_many_reports_each_item(GM):
    g = prepared(GM)
    res = g.set_memory_attributes_many([0, PS + 8, 3 * PS, SIZE, 7 * PS], PS, PRIVATE, 0)
    assert [int(x) for x in res.errno] == [0, errno.EINVAL, errno.EAGAIN, errno.EINVAL, 0]
    assert [int(x) for x in res.error_offset] == [-1, -1, 3 * PS, -1, -1]
    assert g.is_private(0) and g.is_private(7 * PS) and not g.is_private(3 * PS)
    # attribute bits are validated per item exactly as in the single call
    before = normalize_dump(g.dump())
    for bad in (1, 2, 4, PRIVATE | 2, 1 << 4):
        res = g.set_memory_attributes_many([4 * PS], [PS], bad, 0)
        assert [int(x) for x in res.errno] == [errno.EINVAL], f"attributes {bad:#x}"
    assert normalize_dump(g.dump()) == before


# ------------------------------------------------------------------ VM level
def test_legacy_mode_gmem_conversion_enotty():
    for vm_type in ("sw-protected", "snp", "tdx"):
        vm = VM(vm_type, in_place=False)
        g = vm.create_guest_memfd(SIZE, 0)
        before = normalize_dump(g.dump())
        with pytest.raises(GmemError) as info:
            g.set_memory_attributes(0, PS, PRIVATE)
        assert info.value.errno == errno.ENOTTY
        assert info.value.error_offset is None
        assert normalize_dump(g.dump()) == before


@pytest.mark.parametrize("vm_type", ["snp", "tdx"])
def test_legacy_coco_gmem_cannot_mmap(vm_type):
    vm = VM(vm_type, in_place=False)
    with pytest.raises(GmemError) as info:
        vm.create_guest_memfd(SIZE, MMAP)
    assert info.value.errno == errno.EINVAL and info.value.error_offset is None
    assert_names(info.value, "mmap", "MMAP", "legacy")
    assert vm.create_guest_memfd(SIZE, 0).size == SIZE


@pytest.mark.parametrize("vm_type", ["snp", "tdx"])
def test_convert_preserve_after_finalize(vm_type):
    vm = VM(vm_type)
    g = vm.create_guest_memfd(SIZE, MMAP | SHARED)
    vm.set_user_memory_region(0, 4 << 30, SIZE, g)
    g.host_write(0, b"launch data")
    g.set_memory_attributes(PS, PS, PRIVATE, PRESERVE)       # before launch: allowed
    if vm_type == "tdx":
        vm.tdx_finalize()
    else:
        vm.snp_launch_finish()
    check_error(g, g.set_memory_attributes, (0, PS, PRIVATE, PRESERVE), errno.EOPNOTSUPP,
                error_offset=0, names=["PRESERVE", "finalized"])     # step 1: nothing zapped
    g.set_memory_attributes(0, PS, PRIVATE, 0)               # without PRESERVE: fine


def test_vm_private_attribute_in_place_einval():
    vm = VM("sw-protected")
    g = vm.create_guest_memfd(SIZE, MMAP | SHARED)
    vm.set_user_memory_region(0, 4 << 30, SIZE, g)
    before = normalize_dump(g.dump())
    with pytest.raises(GmemError) as info:
        vm.set_memory_attributes(4 << 30, PS, PRIVATE)
    assert info.value.errno == errno.EINVAL
    assert_names(info.value, "PRIVATE", "in-place", "in place", PRIVATE)
    assert normalize_dump(g.dump()) == before
    assert not vm.is_private(4 << 30)


# ------------------------------------------------------------------ save / load
@pytest.fixture
def saved(tmp_path):
    g = prepared(gmemfast.GuestMemfd)
    path = tmp_path / "gmem.save"
    g.save(str(path))
    loaded = gmemfast.GuestMemfd.load(str(path))
    assert normalize_dump(loaded.dump()) == normalize_dump(g.dump())
    return path


def _expect_value_error(path):
    with pytest.raises(ValueError) as info:
        gmemfast.GuestMemfd.load(str(path))
    return info.value


def test_load_truncated(saved):
    data = saved.read_bytes()
    for cut in (0, 1, 16, len(data) // 2, len(data) - 1):
        saved.write_bytes(data[:cut])
        _expect_value_error(saved)


def test_load_corrupted(saved):
    data = bytearray(saved.read_bytes())
    for pos in (len(data) // 3, len(data) // 2, len(data) - 8):
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        saved.write_bytes(bytes(damaged))
        _expect_value_error(saved)


def test_load_foreign(tmp_path):
    cases = {
        "text.txt": b"hello, this is not a guest_memfd\n",
        "empty": b"",
        "pickle.pkl": pickle.dumps({"size": 4096, "private": [True]}),
        "random.bin": os.urandom(4096),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        _expect_value_error(path)
    npz = tmp_path / "arrays.npz"
    np.savez(npz, state=np.zeros(16, dtype=np.uint16))
    _expect_value_error(npz)


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_pages_per_populate_refused(value):
    """A populate limit that would loop forever or is not a count is refused up front."""
    with pytest.raises((ValueError, TypeError)) as info:
        VM("snp", pages_per_populate=value)
    assert "pages_per_populate" in str(info.value)
    assert VM("snp", pages_per_populate=3).pages_per_populate == 3
