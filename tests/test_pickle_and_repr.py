"""A pickled file keeps the VM it was created on (sweeps send VMs and files between
processes), and the ``repr()`` of files, pins and VMs names the values a person debugging
needs (size, flags, offsets, held or released)."""
from __future__ import annotations

import pickle
import re

from conftest import normalize_dump
from gmemfast import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, VM, GuestMemfd

P = 4096
M2 = 2 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def _legacy_vm():
    vm = VM("snp", in_place=False)
    g = vm.create_guest_memfd(M2)
    vm.set_user_memory_region(0, 0, M2, g)
    vm.set_memory_attributes(0, 16 * P, PRIVATE)
    vm.guest_accept(0, 16 * P, chunk=P)
    return vm, g


def test_a_pickled_vm_keeps_its_files_bound_to_it():
    vm, g = _legacy_vm()
    copy = pickle.loads(pickle.dumps(vm))
    (cg,) = copy.gmems
    assert cg.vm is copy and cg.in_place is False
    assert copy.memslots[0].gmem is cg
    assert normalize_dump(cg.dump()) == normalize_dump(g.dump())
    assert dict(copy.counters) == dict(vm.counters)
    # the copy goes on as a legacy VM of its own: its per-GFN store converts
    copy.set_memory_attributes(0, 16 * P, 0)
    assert copy.private_gfns(0, M2) == 0 and vm.private_gfns(0, M2) == 16


def test_a_file_pickled_alone_brings_its_vm():
    vm, g = _legacy_vm()
    cg = pickle.loads(pickle.dumps(g))
    assert isinstance(cg.vm, VM) and cg.vm is not vm
    assert cg.vm.gmems == [cg] and cg.vm.private_gfns(0, M2) == 16
    assert cg.in_place is False


def test_a_file_made_directly_stays_on_its_own():
    g = GuestMemfd(M2, GUEST_MEMFD_FLAG_MMAP)
    cg = pickle.loads(pickle.dumps(g))
    assert cg.vm is None and cg.in_place is True


def test_reprs_name_what_a_person_debugging_needs():
    g = GuestMemfd(6 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    r = repr(g)
    assert "6M" in r and f"{GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED:#x}" in r
    pin = g.pin(5 * P, 3 * P)
    r = repr(pin)
    assert "0x5000" in r and "0x3000" in r and re.search(r"\bheld\b", r)
    pin.release()
    assert re.search(r"\breleased\b", repr(pin))
