"""The engine's VM against the reference VM (naive.VM), driven by a hypothesis state machine.

One VM per example (sw-protected or SNP; in-place or legacy tracking) with two guest_memfds
of its own and one of another VM. Random steps go to both: memslot changes
(``set_user_memory_region``: create, delete, move, resize, re-issue, unaligned values,
overlaps, a file range bound twice, another VM's file, ordinary memslots without a
guest_memfd), guest reads and writes with either view at GPAs biased to slot edges and
gaps, conversions (on the files in place, on the VM in legacy mode), and host accesses that
run from shared into private pages or past the end. After every step the outcome must
agree (same exit and its fields, or same errno and error_offset, or same bytes) and so must
the memslots, the VM's view of private memory and both files' complete state.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

import naive
from conftest import SMALL, assert_same_state

gmemfast = pytest.importorskip("gmemfast")
from gmemfast import GmemError, MemoryFaultExit, MmioExit  # noqa: E402

PS = 4096
MMAP = naive.GUEST_MEMFD_FLAG_MMAP
SHARED = naive.GUEST_MEMFD_FLAG_INIT_SHARED
PRIVATE = naive.KVM_MEMORY_ATTRIBUTE_PRIVATE
FILE_PAGES = 1024                 # each file: 4 MiB
GPA_PAGES = 4096                  # the guest physical space the steps use: 16 MiB
EDGES = [0, 1, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049, 2560, 3071, 3072, 4095]

_gpa_page = st.one_of(st.sampled_from(EDGES), st.integers(0, GPA_PAGES))
_slot = st.sampled_from([0, 1, 2, 3, 1 << 15])
_size_pages = st.sampled_from([0, 0, 1, 16, 512, 1024, 1025])
_offset_pages = st.sampled_from([0, 0, 512, 1000, 1023, 1024])
_unaligned = st.sampled_from([0, 0, 0, 0, 1, 2048])


def outcome(fn, *args, **kwargs):
    """("ok", value), ("err", errno, error_offset), ("memory_fault", gpa, size, private)
    or ("mmio", gpa), from the engine or the reference alike."""
    try:
        return ("ok", fn(*args, **kwargs))
    except GmemError as e:
        return ("err", e.errno, e.error_offset)
    except MemoryFaultExit as e:
        return ("memory_fault", e.gpa, e.size, e.private)
    except MmioExit as e:
        return ("mmio", e.gpa)
    except naive.MemoryFault as e:
        return tuple(e.args)


class VmComparison(RuleBasedStateMachine):
    @initialize(in_place=st.booleans(), vm_type=st.sampled_from(["sw-protected", "sw-protected", "snp", "tdx"]),
                init_shared=st.booleans(), order=st.sampled_from([0, 0, 9]))
    def create(self, in_place, vm_type, init_shared, order):
        if vm_type != "sw-protected" and not in_place:
            flags = 0                  # legacy CoCo: no mmap, private files
        else:
            flags = MMAP | (SHARED if init_shared else 0)
        if order:
            flags |= naive.GUEST_MEMFD_FLAG_HUGETLB
        note(f"VM({vm_type!r}, in_place={in_place}); files flags {flags:#x}, page order {order}")
        self.eng = gmemfast.VM(vm_type, in_place=in_place)
        self.ref = naive.VM(vm_type, in_place=in_place)
        self.files = [(self.eng.create_guest_memfd(FILE_PAGES * PS, flags, page_order=order),
                       self.ref.create_guest_memfd(FILE_PAGES * PS, flags, page_order=order))
                      for _ in range(2)]
        other_eng, other_ref = gmemfast.VM(vm_type), naive.VM(vm_type)
        self.foreign = (other_eng.create_guest_memfd(FILE_PAGES * PS, flags, page_order=order),
                        other_ref.create_guest_memfd(FILE_PAGES * PS, flags, page_order=order))
        self.flags = flags
        # the usual layout to start from: each file in a memslot, the second at 8 MiB
        for slot, (gpa, pair) in enumerate(((0, self.files[0]), (2048 * PS, self.files[1]))):
            for vm, g in ((self.eng, pair[0]), (self.ref, pair[1])):
                vm.set_user_memory_region(slot, gpa, FILE_PAGES * PS, g, 0)
        if not in_place:              # a legacy VMM marks guest memory private at start-up
            self.both("set_memory_attributes(vm)", self.eng.set_memory_attributes,
                      self.ref.set_memory_attributes, 0, GPA_PAGES * PS, PRIVATE)

    def both(self, what, fe, fr, *args, **kwargs):
        e = outcome(fe, *args, **kwargs)
        r = outcome(fr, *args, **kwargs)
        note(f"{what}{args}: engine {e}, reference {r}")
        event(f"{what}: {r[0] if r[0] != 'err' else 'errno %d' % r[1]}")
        assert e == r, f"{what}{args}: engine {e} != reference {r}"
        return e

    def _file(self, which):
        if which == "none":
            return None, None
        if which == "foreign":
            return self.foreign
        return self.files[which]

    # ---------------------------------------------------------------- memslots
    @rule(slot=_slot, gpa=_gpa_page, pages=_size_pages, which=st.sampled_from([0, 1, 0, 1, "none", "foreign"]),
          offset=_offset_pages, gpa_bump=_unaligned, off_bump=_unaligned)
    def set_memslot(self, slot, gpa, pages, which, offset, gpa_bump, off_bump):
        ge, gr = self._file(which)
        args = (slot, gpa * PS + gpa_bump, pages * PS, None, offset * PS + off_bump)
        e = outcome(self.eng.set_user_memory_region, *args[:3], ge, args[4])
        r = outcome(self.ref.set_user_memory_region, *args[:3], gr, args[4])
        note(f"set_user_memory_region{args} file {which}: engine {e}, reference {r}")
        assert e == r, f"set_user_memory_region{args} file {which}: engine {e} != reference {r}"
        got = sorted((s.slot, s.gpa, s.size, s.gmem_offset) for s in self.eng.memslots.values())
        assert got == self.ref.memslot_list()

    # ---------------------------------------------------------------- guest access
    @rule(gpa=_gpa_page, delta=st.sampled_from([0, 0, 1, 4095]),
          length=st.sampled_from([1, 100, PS, PS + 1, 3 * PS, 9 * PS]), private=st.booleans(),
          write=st.booleans(), fill=st.integers(1, 255))
    def guest_access(self, gpa, delta, length, private, write, fill):
        addr = gpa * PS + delta
        if write:
            self.both("guest_write", self.eng.guest_write, self.ref.guest_write, addr,
                      bytes([fill]) * length, private=private)
        else:
            self.both("guest_read", self.eng.guest_read, self.ref.guest_read, addr, length,
                      private=private)

    # ---------------------------------------------------------------- conversions
    @rule(which=st.sampled_from([0, 1]), first=st.sampled_from([0, 1, 511, 512, 1000, 1023]),
          pages=st.sampled_from([1, 2, 16, 512, 1024]), private=st.booleans())
    def convert_file(self, which, first, pages, private):
        ge, gr = self.files[which]
        pages = min(pages, FILE_PAGES - first)
        self.both("set_memory_attributes(file)", ge.set_memory_attributes, gr.set_memory_attributes,
                  first * PS, pages * PS, PRIVATE if private else 0)

    @rule(gpa=_gpa_page, pages=st.sampled_from([1, 2, 512, 1024, 4096]), private=st.booleans())
    def convert_vm(self, gpa, pages, private):
        self.both("set_memory_attributes(vm)", self.eng.set_memory_attributes,
                  self.ref.set_memory_attributes, gpa * PS, pages * PS, PRIVATE if private else 0)

    # ---------------------------------------------------------------- acceptance
    @rule(gpa=_gpa_page, pages=st.sampled_from([1, 2, 16, 512, 1024]),
          chunk=st.sampled_from([PS, PS, 2 << 20, 2 << 20, 12345]),
          mapping=st.sampled_from([None, None, PS, 2 << 20, 1 << 30, 8192]), prefault=st.booleans())
    def guest_accept(self, gpa, pages, chunk, mapping, prefault):
        if chunk == 2 << 20 and pages % 512 == 0:
            gpa -= gpa % 512           # mostly aligned to the chunk, as a guest accepts
        self.both("guest_accept", self.eng.guest_accept, self.ref.guest_accept, gpa * PS, pages * PS,
                  chunk=chunk, mapping=mapping, prefault=prefault)

    @rule(which=st.sampled_from([0, 1]), first=st.sampled_from([0, 1, 510, 512]),
          chunk=st.sampled_from([PS, 2 << 20]), mapping=st.sampled_from([None, PS, 2 << 20, 1 << 30]),
          prefault=st.booleans(), share=st.sampled_from([1, 2, 512]))
    def accept_then_share(self, which, first, chunk, mapping, prefault, share):
        """The guest accepts a block of the file's memory, then gives some of it back to the
        host: acceptance at each mapping level, then the trusted entity's give-back."""
        ge, gr = self.files[which]
        base = 2048 * which           # the usual layout; moved slots just give exits
        if chunk == 2 << 20:
            first = first - first % 512
        self.both("guest_accept", self.eng.guest_accept, self.ref.guest_accept,
                  (base + first) * PS, 512 * PS, chunk=chunk, mapping=mapping, prefault=prefault)
        if self.eng.in_place:
            self.both("set_memory_attributes(file)", ge.set_memory_attributes,
                      gr.set_memory_attributes, (first + 1) * PS, share * PS, 0)
        else:
            self.both("set_memory_attributes(vm)", self.eng.set_memory_attributes,
                      self.ref.set_memory_attributes, (base + first + 1) * PS, share * PS, 0)

    # ---------------------------------------------------------------- batched forms
    def batch_vs_calls(self, what, batch, calls):
        """A batched call on the engine against the reference's calls one by one: the same
        errno, error_offset (an exit's GPA for EFAULT) and value, item by item."""
        want = []
        for call in calls:
            r = call()
            if r[0] == "ok":
                want.append((0, -1, r[1]))
            elif r[0] == "err":
                want.append((r[1], -1 if r[2] is None else r[2], None))
            else:                         # an exit: the batched form's EFAULT at its GPA
                want.append((errno.EFAULT, r[1], None))
        got = [(int(e), int(o), None if batch.value is None or e else int(batch.value[i]))
               for i, (e, o) in enumerate(zip(batch.errno, batch.error_offset))]
        want = [(e, o, None if batch.value is None or e else v) for e, o, v in want]
        note(f"{what}: engine {got}, reference {want}")
        for e, _o, _v in want:
            event(f"{what} item: {errno.errorcode.get(e, 'ok')}")
        assert got == want, f"{what}: engine {got} != reference {want}"

    @rule(items=st.lists(st.tuples(_gpa_page, st.sampled_from([1, 1, 2, 16, 512, 1024])),
                         min_size=1, max_size=6),
          chunk=st.sampled_from([PS, PS, 2 << 20]), mapping=st.sampled_from([None, None, PS, 2 << 20, 1 << 30]),
          prefault=st.booleans(), misalign=st.sampled_from([0, 0, 0, 1]))
    def guest_accept_many(self, items, chunk, mapping, prefault, misalign):
        """``VM.guest_accept_many`` against the reference's ``guest_accept`` item by item."""
        gpas, sizes = [], []
        for gpa, pages in items:
            if chunk == 2 << 20:
                gpa -= gpa % 512
                pages = max(512, pages - pages % 512)
            gpas.append(gpa * PS + misalign * PS)
            sizes.append(pages * PS)
        batch = self.eng.guest_accept_many(np.array(gpas, np.int64), np.array(sizes, np.int64),
                                           chunk=chunk, mapping=mapping, prefault=prefault)
        self.batch_vs_calls("guest_accept_many", batch, [
            (lambda g=g, z=z: outcome(self.ref.guest_accept, g, z, chunk=chunk, mapping=mapping,
                                      prefault=prefault)) for g, z in zip(gpas, sizes)])

    @rule(items=st.lists(st.tuples(_gpa_page, st.sampled_from([1, 2, 512, 1024, 4096]), st.booleans(),
                                   st.sampled_from([0, 0, 0, 1, 8 | 16])), min_size=1, max_size=6))
    def convert_vm_many(self, items):
        """``VM.set_memory_attributes_many`` against the reference's per-GFN calls one by one."""
        gpas = [g * PS + (1 if bad == 1 else 0) for g, _p, _v, bad in items]
        sizes = [p * PS for _g, p, _v, _b in items]
        attrs = [(PRIVATE if v else 0) | (bad if bad > 1 else 0) for _g, _p, v, bad in items]
        batch = self.eng.set_memory_attributes_many(gpas, sizes, attrs)
        self.batch_vs_calls("set_memory_attributes_many(vm)", batch, [
            (lambda g=g, z=z, a=a: outcome(self.ref.set_memory_attributes, g, z, a))
            for g, z, a in zip(gpas, sizes, attrs)])

    @rule(which=st.sampled_from([0, 1]), items=st.lists(st.tuples(
        st.sampled_from([0, 1, 511, 512, 1000, 1023]), st.sampled_from([1, 2, 512, 1024, 2000]),
        st.sampled_from([3, 3, 3, 1, 2])), min_size=1, max_size=5))
    def fallocate_many(self, which, items):
        """``fallocate_many`` on a file of the VM (trusted-entity state, guest mappings)
        against the reference's ``fallocate`` item by item."""
        ge, gr = self.files[which]
        modes = [m for _f, _p, m in items]
        offs = [f * PS for f, _p, _m in items]
        sizes = [p * PS for _f, p, _m in items]
        batch = ge.fallocate_many(modes, offs, sizes)
        self.batch_vs_calls("fallocate_many", batch, [
            (lambda m=m, o=o, z=z: outcome(gr.fallocate, m, o, z)) for m, o, z in zip(modes, offs, sizes)])

    # ---------------------------------------------------------------- host access
    @rule(which=st.sampled_from([0, 1]), page=st.sampled_from([0, 1, 511, 1022, 1023, 1024]),
          delta=st.sampled_from([0, 7, 4000]),
          length=st.sampled_from([1, PS, 3 * PS, 20 * PS]), write=st.booleans())
    def host_access(self, which, page, delta, length, write):
        """Host accesses that may run from shared pages into private ones or past the end."""
        ge, gr = self.files[which]
        off = page * PS + delta
        if write:
            self.both("host_write", ge.host_write, gr.host_write, off, b"\x5a" * length)
        else:
            e = outcome(ge.host_read, off, length)
            r = outcome(gr.host_read, off, length)
            if e[0] == "ok" and r[0] == "ok":
                assert bytes(e[1]) == r[1]
            else:
                assert e == r, f"host_read({off:#x}, {length}): engine {e} != reference {r}"

    # ---------------------------------------------------------------- state
    def check_state(self):
        for n, (ge, gr) in enumerate(self.files):
            assert_same_state(ge, gr, f"file {n}")
            ge.check()
        for page in sorted(set(EDGES) | set(range(0, GPA_PAGES, 97))):
            gpa = page * PS
            assert self.eng.is_private(gpa) == self.ref.is_private(gpa), f"is_private({gpa:#x})"
        assert self.eng.shared_memory_pages() == self.ref.shared_memory_pages()
        e, r = self.eng.counters, self.ref.counters
        bad = {n: (int(e[n]), r[n]) for n in naive.COUNTERS if int(e[n]) != r[n]}
        assert not bad, f"VM counters differ (engine, reference): {bad}"

    def teardown(self):
        if getattr(self, "eng", None) is not None:
            self.check_state()

    @rule()
    def compare(self):
        self.check_state()


@pytest.mark.parametrize("seed", [0])
def test_vm_against_reference(seed):
    examples, steps = (40, 25) if SMALL else (200, 40)
    run_state_machine_as_test(VmComparison, settings=settings(max_examples=examples,
                                                              stateful_step_count=steps,
                                                              deadline=None))


def test_vm_comparison_catches_a_wrong_exit(monkeypatch):
    """The machine can fail: an engine that reports MMIO where the reference has a memory
    fault (legacy private GFN without a memslot) is caught."""
    vm_e, vm_r = gmemfast.VM("sw-protected", in_place=False), naive.VM("sw-protected", in_place=False)
    vm_e.set_memory_attributes(0, PS, PRIVATE)
    vm_r.set_memory_attributes(0, PS, PRIVATE)
    assert outcome(vm_e.guest_read, 0, 1, private=True) == ("memory_fault", 0, PS, True)
    assert outcome(vm_r.guest_read, 0, 1, private=True) == ("memory_fault", 0, PS, True)
    monkeypatch.setattr(vm_e, "in_place", True)     # an engine that forgot the legacy rule
    assert outcome(vm_e.guest_read, 0, 1, private=True) == ("mmio", 0)


@pytest.mark.parametrize("vm_type", ["snp", "tdx"])
@pytest.mark.parametrize("order", [0, 9, 18])
@pytest.mark.parametrize("mapping", [None, PS, 2 << 20, 1 << 30])
def test_accept_every_mapping_level_against_reference(vm_type, order, mapping):
    """Every acceptance case (chunk x the host's mapping level x prefault), then a page
    given back (splitting a huge folio), on the engine and the reference: same counters."""
    size = max(4 << 20, PS << order)
    flags = MMAP | (naive.GUEST_MEMFD_FLAG_HUGETLB if order else 0)
    for chunk in (PS, 2 << 20):
        for prefault in (False, True):
            vms = []
            for V in (gmemfast.VM, naive.VM):
                vm = V(vm_type)
                g = vm.create_guest_memfd(size, flags, page_order=order)
                vm.set_user_memory_region(0, 0, size, g, 0)
                vm.guest_accept(0, 2 << 20, chunk=chunk, mapping=mapping, prefault=prefault)
                g.set_memory_attributes(3 * PS, PS, 0)
                vms.append((vm, g))
            (ve, ge), (vr, gr) = vms
            assert_same_state(ge, gr, f"chunk {chunk:#x} prefault {prefault}")
            e, r = ve.counters, vr.counters
            bad = {n: (int(e[n]), r[n]) for n in naive.COUNTERS if int(e[n]) != r[n]}
            assert not bad, f"chunk {chunk:#x}, prefault {prefault}: counters differ {bad}"


@pytest.mark.parametrize("order", [0, 9])
@pytest.mark.parametrize("vm_type", ["sw-protected", "tdx"])
def test_accept_many_refills_the_block_of_a_page(order, vm_type):
    """Accepting one page of a 2 MiB folio with a punched hole allocates the whole block
    again, page by page or batched; the batched form agrees with the reference's calls."""
    flags = MMAP | (naive.GUEST_MEMFD_FLAG_HUGETLB if order else 0)
    vms = []
    for V in (gmemfast.VM, naive.VM):
        vm = V(vm_type)
        g = vm.create_guest_memfd(4 << 20, flags, page_order=order)
        vm.set_user_memory_region(0, 0, 4 << 20, g, 0)
        vm.guest_accept(0, 4 << 20, chunk=PS)
        g.fallocate(3, 5 * PS, PS)                   # a hole in the first 2 MiB block
        vms.append((vm, g))
    (ve, ge), (vr, gr) = vms
    batch = ve.guest_accept_many([7 * PS, 600 * PS], PS, chunk=PS)
    want = [vr.guest_accept(g, PS, chunk=PS) for g in (7 * PS, 600 * PS)]
    assert not batch.errno.any() and [int(v) for v in batch.value] == want
    assert_same_state(ge, gr, f"order {order}")
    e, r = ve.counters, vr.counters
    bad = {n: (int(e[n]), r[n]) for n in naive.COUNTERS if int(e[n]) != r[n]}
    assert not bad, f"counters differ {bad}"
