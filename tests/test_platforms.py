"""TDX and SNP adapters: populate in both flows, launch measurements, every ioctl error.

Launch digests are checked against the ``sev-snp-measure`` package (the oracle) and
MRTD against a plain SHA-384 written here, never against the engine's own accumulators.
"""
from __future__ import annotations

import errno
import hashlib

import numpy as np
import pytest

from gmemfast import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
    KVM_SEV_SNP_PAGE_TYPE_CPUID,
    KVM_SEV_SNP_PAGE_TYPE_NORMAL,
    KVM_SEV_SNP_PAGE_TYPE_SECRETS,
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
    KVM_SEV_SNP_PAGE_TYPE_ZERO,
    KVM_TDX_MEASURE_MEMORY_REGION,
    PAGE_SIZE,
    VM,
    GmemError,
    GmemRange,
    snp_measure_ovmf,
    tdx_measure_ovmf,
)
from gmemfast._layout import RMP_VALIDATED, SEPT_MAPPED, TE_NONE
from gmemfast.firmware import OvmfImage, find_ovmf_images, synthetic_ovmf, tdx_launch_plan

P = PAGE_SIZE
PRIV = KVM_MEMORY_ATTRIBUTE_PRIVATE
PRESERVE = KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
MB = 1 << 20


def snp_oracle(path, vcpus=1, vcpu_type="EPYC-v4", vmm="QEMU"):
    ssm = pytest.importorskip("sevsnpmeasure")
    from sevsnpmeasure import guest
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vcpu_types import CPU_SIGS
    from sevsnpmeasure.vmm_types import VMMType
    del ssm
    vmm_t = {"QEMU": VMMType.QEMU, "EC2": VMMType.ec2}[vmm]
    return guest.calc_launch_digest(SevMode.SEV_SNP, vcpus, CPU_SIGS[vcpu_type], str(path),
                                    None, None, None, 0x1, "", vmm_t)


def plain_mrtd(pages):
    """MRTD written out from docs/model.md §4.7: 128-byte blocks, SHA-384."""
    h = hashlib.sha384()
    for gpa, contents, measure in pages:
        h.update(b"MEM.PAGE.ADD".ljust(16, b"\0") + gpa.to_bytes(8, "little") + bytes(104))
        if measure:
            for off in range(0, P, 256):
                h.update(b"MR.EXTEND".ljust(16, b"\0") + (gpa + off).to_bytes(8, "little") + bytes(104))
                h.update(contents[off:off + 256])
    return h.digest()


def snp_page_info_digest(pages):
    """The SNP launch digest written out from docs/model.md §4.7 (PAGE_INFO chain)."""
    ld = bytes(48)
    for gpa, ptype, contents in pages:
        chash = hashlib.sha384(contents).digest() if ptype in (1, 2) else bytes(48)
        info = ld + chash + (0x70).to_bytes(2, "little") + bytes([ptype, 0]) + bytes(4) \
            + gpa.to_bytes(8, "little")
        assert len(info) == 0x70
        ld = hashlib.sha384(info).digest()
    return ld


def coco_vm(vm_type, in_place=True, size=8 * MB, **policies):
    """A VM with one guest_memfd at gpa 0: shared and mappable in place, private and
    unmappable in legacy mode."""
    vm = VM(vm_type, in_place=in_place, **policies)
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED if in_place else 0
    g = vm.create_guest_memfd(size, flags)
    vm.set_user_memory_region(0, 0, size, g)
    return vm, g


def snp_vm(in_place=True, **kw):
    return coco_vm("snp", in_place, **kw)


def tdx_vm(in_place=True, **kw):
    return coco_vm("tdx", in_place, **kw)


def page(seed):
    return np.random.default_rng(seed).integers(0, 256, P, dtype=np.uint8).tobytes()


# --------------------------------------------------------------------------- whole launches

@pytest.mark.parametrize("layout", ["default", "no-metadata", "big"])
@pytest.mark.parametrize("flow", ["in-place", "legacy"])
def test_snp_launch_digest_equals_sev_snp_measure(tmp_path, layout, flow):
    kw = {"default": {}, "no-metadata": {"sev_sections": ()},
          "big": {"size": 0x80000, "vars_size": 0x20000}}[layout]
    kw = dict(kw)
    path = tmp_path / "ovmf.fd"
    path.write_bytes(synthetic_ovmf(kw.pop("size", 0x20000), seed=3, **kw))
    for vcpus, vcpu_type, vmm in ((1, "EPYC-v4", "QEMU"), (3, "EPYC-Milan", "EC2")):
        r = snp_measure_ovmf(path, vcpus=vcpus, vcpu_type=vcpu_type, vmm_type=vmm, flow=flow)
        assert r.digest == snp_oracle(path, vcpus, vcpu_type, vmm)
        r.gmem.check()


REAL = find_ovmf_images()


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
@pytest.mark.parametrize("flow", ["in-place", "legacy"])
def test_snp_launch_of_real_ovmf_equals_sev_snp_measure(flow, path):
    """Every real image found must parse and give sev-snp-measure's digest (none found:
    no test; test_measure says so once)."""
    OvmfImage.from_file(path)
    r = snp_measure_ovmf(path, vcpus=2, flow=flow)
    assert r.digest == snp_oracle(path, 2)


def _final_state(r):
    """Pages, contents and trusted-entity state, with "private" as the VM sees it (the
    file's shareability in place, the per-GFN store in legacy mode)."""
    d = r.gmem.dump()
    state = {k: d[k] for k in ("allocated", "folio_order", "contents")}
    used = np.flatnonzero(d["allocated"])
    state["private"] = np.array([r.vm.is_private(int(p) * P) for p in used])
    return state, r.gmem.te_states()


def _eq(a, b):
    (da, ta), (db, tb) = a, b
    assert np.array_equal(ta, tb)
    for k in da:
        if isinstance(da[k], np.ndarray):
            assert np.array_equal(da[k], db[k]), k
        else:
            assert da[k] == db[k], k


@pytest.mark.parametrize("platform", ["snp", "tdx"])
def test_flows_give_same_measurement_and_state_but_different_counters(platform):
    img = OvmfImage.from_bytes(synthetic_ovmf(0x20000, seed=9))
    launch = snp_measure_ovmf if platform == "snp" else tdx_measure_ovmf
    a = launch(img, flow="in-place")
    b = launch(img, flow="legacy")
    assert a.digest == b.digest
    _eq(_final_state(a), _final_state(b))
    ca, cb = a.counters, b.counters
    assert ca["pages_populated_inplace"] > 0 and ca["pages_populated_legacy"] == 0
    assert cb["pages_populated_legacy"] > 0
    # in place: conversion through the file; legacy: the per-GFN store, and the copy
    assert ca["attr_writes_range"] > 0 and ca["attr_writes_page"] == 0
    assert cb["attr_writes_page"] > 0 and cb["attr_writes_range"] == 0
    if platform == "snp":
        assert cb["bytes_copied"] > 0 and ca["bytes_copied"] == 0
    else:
        assert ca["tdx_seamcall_page_add"] == cb["tdx_seamcall_page_add"] > 0


@pytest.mark.parametrize("flow", ["in-place", "legacy"])
def test_tdx_mrtd_matches_plain_sha384(flow):
    img = OvmfImage.from_bytes(synthetic_ovmf(0x20000, seed=5))
    r = tdx_measure_ovmf(img, flow=flow)
    plan = tdx_launch_plan(img)
    pages = [(run.gpa + off, run.contents[off:off + P], run.measure)
             for run in plan.runs for off in range(0, run.nr_pages * P, P)]
    assert r.digest == plain_mrtd(pages)
    measured = sum(1 for _, _, m in pages if m)
    assert r.counters["tdx_seamcall_page_add"] == len(pages)
    assert r.counters["tdx_seamcall_mr_extend"] == 16 * measured
    assert r.gmem.te_states((pages[0][0]), P)[0] == SEPT_MAPPED


# --------------------------------------------------------------------------- SNP ioctl

def test_snp_every_page_type_in_place_matches_page_info_chain():
    vm, g = snp_vm()
    expect = []
    for n, ptype in enumerate((KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_ZERO,
                               KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, KVM_SEV_SNP_PAGE_TYPE_SECRETS,
                               KVM_SEV_SNP_PAGE_TYPE_CPUID)):
        gpa = n * 2 * P
        data = page(n) + page(n + 100)
        g.host_write(gpa, data)
        g.set_memory_attributes(gpa, 2 * P, PRIV, PRESERVE)
        upd = vm.snp_launch_update(gpa // P, None, 2 * P, ptype)
        assert upd.len == 0 and upd.gfn_start == gpa // P + 2
        for k in range(2):
            c = data[k * P:(k + 1) * P]
            expect.append((gpa + k * P, ptype, c if ptype == 1 else None))
        if ptype == KVM_SEV_SNP_PAGE_TYPE_ZERO:
            assert g.store.page_bytes(gpa // P) == bytes(P)
    vmsa = page(77)
    digest = vm.snp_launch_finish([vmsa])
    chain = [(gpa, t, c if c is not None else b"") for gpa, t, c in expect]
    chain.append((0xFFFFFFFFF000, 2, vmsa))
    assert digest == snp_page_info_digest(chain)
    assert set(g.te_states(0, 10 * P).tolist()) == {RMP_VALIDATED}
    g.check()


def test_snp_legacy_copies_source_and_advances_uaddr():
    vm, g = snp_vm(in_place=False, pages_per_populate=3)
    vm.set_memory_attributes(0, 8 * P, PRIV)
    src = b"".join(page(i) for i in range(8))
    upd = vm.snp_launch_update(0, src, 8 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert (upd.gfn_start, upd.len, len(upd.uaddr)) == (3, 5 * P, 5 * P)
    assert bytes(upd.uaddr[:P]) == src[3 * P:4 * P]
    while upd.len:
        upd = vm.snp_launch_update(upd.gfn_start, upd.uaddr, upd.len, upd.type)
    for i in range(8):
        assert vm.guest_read(i * P, P, private=True) == src[i * P:(i + 1) * P]
    assert vm.counters["bytes_copied"] == 8 * P
    # ZERO pages do not advance uaddr
    vm.set_memory_attributes(8 * P, 4 * P, PRIV)
    upd = vm.snp_launch_update(8, src, 4 * P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    assert upd.uaddr is src and upd.len == P


def test_snp_source_can_be_a_shared_guest_memfd_range():
    vm, g = snp_vm()
    data = page(1) + page(2)
    g.host_write(4 * MB, data)
    g.set_memory_attributes(0, 2 * P, PRIV)
    upd = vm.snp_launch_update(0, GmemRange(g, 4 * MB), 2 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert upd.len == 0 and upd.uaddr == GmemRange(g, 4 * MB + 2 * P)
    assert vm.guest_read(0, 2 * P, private=True) == data
    assert vm.counters["bytes_copied"] == 2 * P
    # a private source page cannot be read by the host
    g.set_memory_attributes(4 * MB, P, PRIV)
    g.set_memory_attributes(2 * P, P, PRIV)
    with pytest.raises(GmemError) as info:
        vm.snp_launch_update(2, GmemRange(g, 4 * MB), P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert info.value.errno == errno.EFAULT


def test_snp_errors():
    vm, g = snp_vm()
    g.set_memory_attributes(0, 4 * P, PRIV)
    before = g.dump()
    cases = [
        (dict(length=0), "len"),
        (dict(length=P + 1), "len"),
        (dict(flags=1), "flags"),
        (dict(page_type=2), "page type 2"),
        (dict(page_type=7), "page type 7"),
        (dict(gfn_start=4), "not private"),     # shared destination
        (dict(gfn_start=4096), "no memslot"),   # past the slot
    ]
    for kw, words in cases:
        args = dict(gfn_start=0, uaddr=None, length=P, page_type=1, flags=0)
        args.update(kw)
        with pytest.raises(GmemError) as info:
            vm.snp_launch_update(**args)
        assert info.value.errno == errno.EINVAL, kw
        assert words in str(info.value), (kw, str(info.value))
    after = g.dump()
    assert all(np.array_equal(before[k], after[k]) for k in ("private", "allocated"))
    assert not g.te_states().any()
    # RMP entry already guest-owned -> EEXIST
    vm.snp_launch_update(0, None, P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    with pytest.raises(GmemError) as info:
        vm.snp_launch_update(0, None, P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    assert info.value.errno == errno.EEXIST
    # partial progress: pages before the owned one are done, the error comes next call
    upd = vm.snp_launch_update(1, None, 3 * P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    assert upd.len == 0
    with pytest.raises(TypeError):
        vm.snp_launch_update(0, 12345, P, 1)
    vm.snp_launch_finish()
    with pytest.raises(GmemError, match="already launched") as info:
        vm.snp_launch_update(2, None, P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    with pytest.raises(GmemError, match="already launched"):
        vm.snp_launch_finish()


def test_snp_firmware_calls_are_counted_by_command():
    vm, g = snp_vm()
    g.set_memory_attributes(0, 3 * P, PRIV)
    vm.snp_launch_update(0, None, 3 * P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    vm.snp_launch_finish([page(1), page(2)])
    c = vm.counters
    # one LAUNCH_UPDATE per page and per VMSA, one LAUNCH_FINISH
    assert (c["snp_fw_launch_update"], c["snp_fw_launch_finish"]) == (5, 1)
    assert c["rmp_updates"] == 5


def test_snp_legacy_needs_a_source():
    vm, g = snp_vm(in_place=False)
    vm.set_memory_attributes(0, P, PRIV)
    with pytest.raises(GmemError, match="needs a source") as info:
        vm.snp_launch_update(0, None, P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert info.value.errno == errno.EINVAL
    vm.snp_launch_update(0, None, P, KVM_SEV_SNP_PAGE_TYPE_ZERO)


def test_populate_stops_on_interrupt_with_progress():
    vm, g = snp_vm()
    g.set_memory_attributes(0, 8 * P, PRIV)
    vm.interrupt = lambda done: done == 5
    upd = vm.snp_launch_update(0, None, 8 * P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    assert upd.gfn_start == 5 and upd.len == 3 * P
    vm.interrupt = lambda done: True
    with pytest.raises(GmemError) as info:
        vm.snp_launch_update(5, None, 3 * P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    assert info.value.errno == errno.EINTR


def test_populate_is_clamped_to_the_memslot():
    vm = VM("snp")
    g = vm.create_guest_memfd(8 * MB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region(0, 0, 4 * P, g)
    vm.set_user_memory_region(1, 1 * MB, 4 * P, g, gmem_offset=1 * MB)
    g.set_memory_attributes(0, 8 * MB, PRIV)
    upd = vm.snp_launch_update(0, None, 8 * P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    assert upd.gfn_start == 4 and upd.len == 4 * P
    with pytest.raises(GmemError, match="no memslot"):
        vm.snp_launch_update(upd.gfn_start, None, upd.len, KVM_SEV_SNP_PAGE_TYPE_ZERO)


def test_conversion_to_shared_gives_rmp_entries_back():
    vm, g = snp_vm()
    g.set_memory_attributes(0, 4 * P, PRIV)
    vm.snp_launch_update(0, None, 4 * P, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    rmp = vm.counters["rmp_updates"]
    g.set_memory_attributes(P, 2 * P, 0)
    assert g.te_states(0, 4 * P).tolist() == [RMP_VALIDATED, TE_NONE, TE_NONE, RMP_VALIDATED]
    assert vm.counters["rmp_updates"] == rmp + 2
    g.check()


def test_tdx_conversion_to_shared_removes_secure_ept_entries():
    vm, g = tdx_vm()
    g.set_memory_attributes(0, 4 * P, PRIV)
    vm.tdx_init_mem_region(None, 0, 4, 0)
    g.set_memory_attributes(0, 4 * P, 0)
    c = vm.counters
    assert not g.te_states(0, 4 * P).any()
    assert c["tdx_seamcall_page_remove"] == 4 and c["tdx_seamcall_block"] == 4
    assert c["tdx_seamcall_track"] >= 1


def test_populate_never_converts():
    vm, g = snp_vm()
    g.host_write(0, page(3))
    with pytest.raises(GmemError, match="not private"):
        vm.snp_launch_update(0, None, P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert not g.is_private(0)


# --------------------------------------------------------------------------- TDX ioctl

def test_tdx_errors_and_partial_progress():
    vm, g = tdx_vm()
    g.set_memory_attributes(0, 8 * P, PRIV)
    src = b"".join(page(i) for i in range(8))
    for kw, words in [(dict(flags=2), "flags"), (dict(gpa=P + 8), "aligned"), (dict(nr_pages=0), "nr_pages"),
                      (dict(gpa=(1 << 52) - P, nr_pages=2), "overflow"), (dict(gpa=8 * P), "not private")]:
        args = dict(source=src, gpa=0, nr_pages=1, flags=0)
        args.update(kw)
        with pytest.raises(GmemError) as info:
            vm.tdx_init_mem_region(**args)
        assert info.value.errno == errno.EINVAL and words in str(info.value), (kw, str(info.value))
    assert not g.te_states().any()
    vm.tdx_init_mem_region(src[2 * P:], 2 * P, 1, KVM_TDX_MEASURE_MEMORY_REGION)
    # pages 0, 1 go in, page 2 is already mapped: the error carries the advanced region
    with pytest.raises(GmemError) as info:
        vm.tdx_init_mem_region(src, 0, 4, KVM_TDX_MEASURE_MEMORY_REGION)
    r = info.value.region
    assert info.value.errno == errno.EIO
    assert (r.gpa, r.nr_pages, bytes(r.source_addr[:P])) == (2 * P, 2, src[2 * P:3 * P])
    assert g.te_states(0, 4 * P).tolist() == [SEPT_MAPPED] * 3 + [TE_NONE]
    mrtd = vm.tdx_finalize()
    assert mrtd == plain_mrtd([(2 * P, src[2 * P:3 * P], True), (0, src[:P], True), (P, src[P:2 * P], True)])
    with pytest.raises(GmemError, match="finalized"):
        vm.tdx_init_mem_region(src, 4 * P, 1, 0)
    with pytest.raises(GmemError, match="finalized"):
        vm.tdx_finalize()


def test_tdx_finalize_of_nothing_is_sha384_of_nothing():
    vm, _ = tdx_vm()
    assert vm.tdx_finalize() == hashlib.sha384(b"").digest()


def test_platform_ioctls_on_the_wrong_vm_type():
    vm, _ = snp_vm()
    with pytest.raises(GmemError) as info:
        vm.tdx_init_mem_region(None, 0, 1)
    assert info.value.errno == errno.ENOTTY
    vm2, _ = tdx_vm()
    with pytest.raises(GmemError) as info:
        vm2.snp_launch_finish()
    assert info.value.errno == errno.ENOTTY


def test_preserve_only_before_finalize_and_only_to_private_on_coco():
    vm, g = tdx_vm()
    with pytest.raises(GmemError, match="PRESERVE to shared"):
        g.set_memory_attributes(0, P, 0, PRESERVE)
    g.set_memory_attributes(0, P, PRIV, PRESERVE)
    vm.tdx_finalize()
    with pytest.raises(GmemError, match="finalized"):
        g.set_memory_attributes(P, P, PRIV, PRESERVE)


# --------------------------------------------------------------------------- populate_converts

def test_populate_converts_surfaces_eagain_with_offset():
    vm, g = snp_vm(populate_converts=True)
    g.host_write(0, page(1) * 4)
    pin = g.pin(2 * P)
    with pytest.raises(GmemError) as info:
        vm.snp_launch_update(0, None, 4 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert info.value.errno == errno.EAGAIN and info.value.error_offset == 2 * P
    assert not g.is_private(0, 4 * P) and not g.te_states().any()
    pin.release()
    upd = vm.snp_launch_update(0, None, 4 * P, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert upd.len == 0 and g.is_private(0, 4 * P)
    assert vm.guest_read(0, P, private=True) == page(1)


def test_populate_converts_surfaces_enomem():
    vm, g = tdx_vm(populate_converts=True)
    g.inject_enomem(1)
    with pytest.raises(GmemError) as info:
        vm.tdx_init_mem_region(None, 0, 2, 0)
    assert info.value.errno == errno.ENOMEM and info.value.error_offset == 0
    vm.tdx_init_mem_region(None, 0, 2, 0)


# --------------------------------------------------------------------------- guest accept

@pytest.mark.parametrize("platform,state", [("snp", RMP_VALIDATED), ("tdx", SEPT_MAPPED)])
def test_guest_accept_counts_chunks(platform, state):
    vm = VM(platform)
    g = vm.create_guest_memfd(64 * MB)
    vm.set_user_memory_region(0, 0, 64 * MB, g)
    assert vm.guest_accept(0, 32 * MB, chunk=2 * MB) == 16
    assert vm.guest_accept(32 * MB, 32 * MB, chunk=P) == 8192
    assert vm.guest_accept(0, 64 * MB) == 0          # already accepted: no work
    c = vm.counters
    if platform == "tdx":
        assert c["tdx_seamcall_page_aug"] == c["tdx_accepts"] == 16 + 8192
    else:
        assert (c["snp_pvalidate_2m"], c["snp_pvalidate_4k"]) == (16, 8192)
    assert (g.te_states() == state).all()
    assert g.allocated_pages() == g.nr_pages
    with pytest.raises(GmemError) as info:
        vm.guest_accept(P, 2 * MB)                   # not aligned to the 2 MiB chunk
    assert info.value.errno == errno.EINVAL
    g.check()
