"""Launch measurements and firmware images.

The SEV-SNP oracle is the sev-snp-measure package (its GCTX, VMSA, OVMF parser and
``snp_calc_launch_digest``). The TDX MRTD golden values come from the straightforward
implementation below (``reference_mrtd``), not from ``TdxMrtd``.

Real OVMF images are used when present: set ``GMEMFAST_OVMF`` to image files or folders
(``os.pathsep``-separated), or install Debian's ``ovmf`` package (``/usr/share/ovmf``).
Without one, a single test says so (skipped) and the real-image tests are not generated.
"""
from __future__ import annotations

import hashlib
import random
import struct
import uuid

import pytest

from gmemfast.firmware import (
    CPU_SIGNATURES,
    DEFAULT_SEV_SECTIONS,
    FOUR_GIB,
    OvmfImage,
    SevSectionType,
    SnpPage,
    TdvfSection,
    TdvfSectionType,
    TdxPage,
    default_tdvf_layout,
    find_ovmf_images,
    snp_launch_plan,
    synthetic_ovmf,
    tdx_launch_plan,
    vmsa_pages,
)
from gmemfast.platforms.measure import (
    KVM_SEV_SNP_PAGE_TYPE_CPUID,
    KVM_SEV_SNP_PAGE_TYPE_NORMAL,
    KVM_SEV_SNP_PAGE_TYPE_SECRETS,
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
    KVM_SEV_SNP_PAGE_TYPE_VMSA,
    KVM_SEV_SNP_PAGE_TYPE_ZERO,
    SNP_VMSA_GPA,
    SnpLaunchDigest,
    TdxMrtd,
)

sevsnpmeasure = pytest.importorskip("sevsnpmeasure")
from sevsnpmeasure import guest as ssm_guest  # noqa: E402
from sevsnpmeasure.gctx import GCTX  # noqa: E402
from sevsnpmeasure.ovmf import OVMF  # noqa: E402
from sevsnpmeasure.sev_mode import SevMode  # noqa: E402
from sevsnpmeasure.vcpu_types import CPU_SIGS  # noqa: E402
from sevsnpmeasure.vmm_types import VMMType  # noqa: E402
from sevsnpmeasure.vmsa import VMSA  # noqa: E402

PAGE = 4096
SHA384_EMPTY = bytes.fromhex(
    "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da"
    "274edebfe76f65fbd51ad2f14898b95b"
)
SSM_VMM = {"QEMU": VMMType.QEMU, "EC2": VMMType.ec2, "GCE": VMMType.gce}


def rand_page(rng: random.Random) -> bytes:
    return rng.randbytes(PAGE)


def write(tmp_path, data: bytes, name: str = "ovmf.fd") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def oracle_snp_digest(path: str, vcpus: int = 1, vcpu_type: str = "EPYC-v4", vmm: str = "QEMU",
                      guest_features: int = 0x1, kernel=None, initrd=None, append=None) -> bytes:
    return ssm_guest.calc_launch_digest(
        SevMode.SEV_SNP, vcpus, CPU_SIGS[vcpu_type], path, kernel, initrd, append,
        guest_features, "", SSM_VMM[vmm])


def reference_mrtd(pages) -> bytes:
    """MRTD over (gpa, contents, measure) pages, written out plainly from docs/model.md §4.7."""
    stream = bytearray()
    for gpa, contents, measure in pages:
        stream += b"MEM.PAGE.ADD" + bytes(4) + gpa.to_bytes(8, "little") + bytes(104)
        if measure:
            for off in range(0, PAGE, 256):
                stream += b"MR.EXTEND" + bytes(7) + (gpa + off).to_bytes(8, "little") + bytes(104)
                stream += contents[off:off + 256]
    return hashlib.sha384(bytes(stream)).digest()


# ---------------------------------------------------------------------------
# SnpLaunchDigest against sev-snp-measure's GCTX

def test_snp_digest_starts_at_zero():
    ld = SnpLaunchDigest()
    assert ld.digest == bytes(48) == GCTX().ld()
    assert ld.hash_bytes == 0


def test_snp_digest_every_page_type_matches_gctx():
    rng = random.Random(7)
    ours, ref = SnpLaunchDigest(), GCTX()
    expected_bytes = 0
    for step in range(60):
        gpa = rng.randrange(0, 1 << 40) & ~0xFFF
        kind = step % 6
        if kind == 0:
            page = rand_page(rng)
            ours.update(KVM_SEV_SNP_PAGE_TYPE_NORMAL, gpa, page)
            ref.update_normal_pages(gpa, page)
            expected_bytes += 112 + PAGE
        elif kind == 1:
            page = rand_page(rng)
            ours.update(KVM_SEV_SNP_PAGE_TYPE_VMSA, SNP_VMSA_GPA, bytearray(page))
            ref.update_vmsa_page(page)
            expected_bytes += 112 + PAGE
        elif kind == 2:
            ours.update(KVM_SEV_SNP_PAGE_TYPE_ZERO, gpa, None)
            ref.update_zero_pages(gpa, PAGE)
            expected_bytes += 112
        elif kind == 3:
            ours.update(KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, gpa, rand_page(rng))  # contents ignored
            ref.update_unmeasured_pages(gpa, PAGE)
            expected_bytes += 112
        elif kind == 4:
            ours.update(KVM_SEV_SNP_PAGE_TYPE_SECRETS, gpa, None)
            ref.update_secrets_page(gpa)
            expected_bytes += 112
        else:
            ours.update(KVM_SEV_SNP_PAGE_TYPE_CPUID, gpa, bytes(PAGE))
            ref.update_cpuid_page(gpa)
            expected_bytes += 112
        assert ours.digest == ref.ld(), f"step {step} (kind {kind})"
    assert ours.hash_bytes == expected_bytes


def test_snp_page_info_layout_written_out():
    """One PAGE_INFO built by hand, field by field, as docs/model.md §4.7 lists them."""
    page = bytes(range(256)) * 16
    gpa = 0x1234_5000
    page_info = (bytes(48) + hashlib.sha384(page).digest() + b"\x70\x00" + b"\x01" + b"\x00"
                 + bytes(4) + gpa.to_bytes(8, "little"))
    assert len(page_info) == 112
    ld = SnpLaunchDigest()
    ld.update(KVM_SEV_SNP_PAGE_TYPE_NORMAL, gpa, page)
    assert ld.digest == hashlib.sha384(page_info).digest()


@pytest.mark.parametrize("args, match", [
    ((7, 0, bytes(PAGE)), "page type 7 is unknown"),
    ((KVM_SEV_SNP_PAGE_TYPE_NORMAL, 0, None), "contents are required"),
    ((KVM_SEV_SNP_PAGE_TYPE_VMSA, SNP_VMSA_GPA, bytes(100)), "must be 4096 bytes"),
    ((KVM_SEV_SNP_PAGE_TYPE_ZERO, 0x1001, None), "not 4096-byte aligned"),
    ((KVM_SEV_SNP_PAGE_TYPE_ZERO, 1 << 64, None), "not a 64-bit"),
])
def test_snp_digest_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        SnpLaunchDigest().update(*args)


# ---------------------------------------------------------------------------
# TdxMrtd against the plain reference

def test_mrtd_of_nothing_is_sha384_of_nothing():
    assert TdxMrtd().finalize() == SHA384_EMPTY == reference_mrtd([])


def test_mrtd_page_add_and_extend_match_reference():
    rng = random.Random(11)
    pages = [(rng.randrange(0, 1 << 36) & ~0xFFF, rand_page(rng), rng.random() < 0.5) for _ in range(12)]
    mrtd = TdxMrtd()
    for gpa, contents, measure in pages:
        mrtd.page_add(gpa)
        if measure:
            for off in range(0, PAGE, 256):
                mrtd.mr_extend(gpa + off, contents[off:off + 256])
    assert mrtd.finalize() == reference_mrtd(pages)
    assert mrtd.finalize() == reference_mrtd(pages)  # finalize does not consume
    extended = sum(measure for *_, measure in pages)
    assert mrtd.hash_bytes == 128 * len(pages) + extended * 16 * (128 + 256)

    again = TdxMrtd()
    for gpa, contents, measure in pages:
        again.add_page(gpa, memoryview(contents), measure)
    assert again.finalize() == reference_mrtd(pages)


def test_mrtd_page_add_ignores_contents():
    a, b = TdxMrtd(), TdxMrtd()
    a.add_page(0x5000, bytes(PAGE), extend=False)
    b.add_page(0x5000, b"\xff" * PAGE, extend=False)
    assert a.finalize() == b.finalize() == reference_mrtd([(0x5000, b"", False)])


@pytest.mark.parametrize("call, match", [
    (lambda m: m.page_add(0x800), "not 4096-byte aligned"),
    (lambda m: m.mr_extend(0x80, bytes(256)), "not 256-byte aligned"),
    (lambda m: m.mr_extend(0x100, bytes(255)), "must be 256 bytes"),
    (lambda m: m.add_page(0x1000, bytes(10), True), "must be 4096 bytes"),
    (lambda m: m.page_add(-PAGE), "not a 64-bit"),
])
def test_mrtd_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(TdxMrtd())


# ---------------------------------------------------------------------------
# Image parsing

def test_synthetic_image_parses_like_sev_snp_measure(tmp_path):
    data = synthetic_ovmf(0x40000, seed=3)
    img = OvmfImage.from_bytes(data)
    ref = OVMF(write(tmp_path, data))
    assert img.gpa == ref.gpa() == FOUR_GIB - 0x40000
    assert img.data == ref.data()
    assert img.sev_es_reset_eip == ref.sev_es_reset_eip() == 0x80B004
    assert img.sev_sections == [(m.gpa, m.size, m.section_type_int) for m in ref.metadata_items()]
    assert img.sev_sections == list(DEFAULT_SEV_SECTIONS)
    assert {s.section_type for s in img.sev_sections} == set(SevSectionType)
    assert img.sev_hashes_table_gpa == ref.sev_hashes_table_gpa() == 0x80FC00
    assert set(img.table) == set(ref._table)
    assert img.has_tdvf
    assert img.tdvf_sections == default_tdvf_layout(0x40000, 0x10000)
    assert [s.section_type for s in img.tdvf_sections] == [
        TdvfSectionType.BFV, TdvfSectionType.CFV, TdvfSectionType.TD_HOB, TdvfSectionType.TEMP_MEM]
    assert [s.mr_extend for s in img.tdvf_sections] == [True, False, False, False]


def test_synthetic_image_options():
    bare = OvmfImage.from_bytes(synthetic_ovmf(0x2000, reset_eip=None, sev_sections=(), tdvf_sections=()))
    assert bare.sev_sections == [] and bare.tdvf_sections == [] and bare.sev_es_reset_eip is None
    assert not bare.has_tdvf and bare.sev_hashes_table_gpa is None
    assert synthetic_ovmf(seed=1) != synthetic_ovmf(seed=2)
    assert synthetic_ovmf(seed=1) == synthetic_ovmf(seed=1)


def test_from_file_reads_the_image(tmp_path):
    data = synthetic_ovmf(0x10000, vars_size=0x4000)
    assert OvmfImage.from_file(write(tmp_path, data)).data == data


def _corrupt(data: bytes, offset: int, new: bytes) -> bytes:
    out = bytearray(data)
    out[offset:offset + len(new)] = new
    return bytes(out)


def test_not_an_ovmf_image(tmp_path):
    with pytest.raises(ValueError, match="no OVMF table footer GUID"):
        OvmfImage.from_bytes(random.Random(0).randbytes(0x10000))
    with pytest.raises(ValueError, match=r"junk\.fd: not an OVMF image"):
        OvmfImage.from_file(write(tmp_path, bytes(0x1000), "junk.fd"))
    for size in (0, 100, 0x1800):
        with pytest.raises(ValueError, match="multiple of 4096"):
            OvmfImage.from_bytes(bytes(size))


def test_malformed_tables_raise_value_error():
    data = synthetic_ovmf(0x10000, vars_size=0x4000)
    footer = len(data) - 32 - 18
    with pytest.raises(ValueError, match="does not fit"):
        OvmfImage.from_bytes(_corrupt(data, footer, struct.pack("<H", 0xFFFF)))
    with pytest.raises(ValueError, match="has size 3"):  # the entry just before the footer
        OvmfImage.from_bytes(_corrupt(data, footer - 18, struct.pack("<H", 3)))
    img = OvmfImage.from_bytes(data)
    sev_start = len(data) - int.from_bytes(img.table["dc886566-984a-4798-a75e-5585a7bf67cc"][:4], "little")
    tdx_start = len(data) - int.from_bytes(img.table["e47a6535-984a-4798-865e-4685a7bf8ec2"][:4], "little")
    with pytest.raises(ValueError, match="expected b'ASEV'"):
        OvmfImage.from_bytes(_corrupt(data, sev_start, b"XSEV"))
    with pytest.raises(ValueError, match="version 2"):
        OvmfImage.from_bytes(_corrupt(data, sev_start + 8, struct.pack("<I", 2)))
    with pytest.raises(ValueError, match="does not hold 99 sections"):
        OvmfImage.from_bytes(_corrupt(data, sev_start + 12, struct.pack("<I", 99)))
    with pytest.raises(ValueError, match="expected b'TDVF'"):
        OvmfImage.from_bytes(_corrupt(data, tdx_start, b"TDVX"))
    with pytest.raises(ValueError, match="does not match 3 sections"):
        OvmfImage.from_bytes(_corrupt(data, tdx_start + 12, struct.pack("<I", 3)))


def test_duplicate_guid_rejected():
    data = synthetic_ovmf(0x10000, vars_size=0x4000)
    footer = len(data) - 32 - 18
    reset_guid = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e").bytes_le
    # the entry right before the footer is the reset block; make the next one claim its GUID
    second_guid = footer - (4 + 18) - 16
    with pytest.raises(ValueError, match="appears twice"):
        OvmfImage.from_bytes(_corrupt(data, second_guid, reset_guid))


# ---------------------------------------------------------------------------
# VMSAs

@pytest.mark.parametrize("vmm", ["QEMU", "EC2", "GCE"])
@pytest.mark.parametrize("vcpu_type", ["EPYC", "EPYC-v4", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa", "EPYC-Turin"])
def test_vmsa_pages_match_sev_snp_measure(vmm, vcpu_type):
    img = OvmfImage.from_bytes(synthetic_ovmf(0x10000, vars_size=0x4000, reset_eip=0x80B004))
    for features in (0x1, 0x21):
        ref = VMSA(SevMode.SEV_SNP, img.sev_es_reset_eip, CPU_SIGS[vcpu_type], features, SSM_VMM[vmm])
        ours = vmsa_pages(img, 3, vcpu_type, vmm.lower(), features)  # names are case-blind
        assert ours == list(ref.pages(3))
        assert all(len(p) == PAGE for p in ours)
        assert ours[0] != ours[1] == ours[2]


def test_vmsa_cpu_signatures_match_sev_snp_measure():
    assert CPU_SIGNATURES == CPU_SIGS


def test_vmsa_explicit_signature_and_errors():
    img = OvmfImage.from_bytes(synthetic_ovmf(0x10000, vars_size=0x4000))
    assert vmsa_pages(img, 1, vcpu_sig=0x800F12) == vmsa_pages(img, 1, "EPYC")
    no_reset = OvmfImage.from_bytes(synthetic_ovmf(0x10000, vars_size=0x4000, reset_eip=None))
    assert len(vmsa_pages(no_reset, 1)) == 1
    with pytest.raises(ValueError, match="no SEV-ES reset block"):
        vmsa_pages(no_reset, 2)
    with pytest.raises(ValueError, match="unknown vCPU type 'EPYC-v9'"):
        vmsa_pages(img, 1, "EPYC-v9")
    with pytest.raises(ValueError, match="unknown VMM type 'kvmtool'"):
        vmsa_pages(img, 1, vmm_type="kvmtool")
    with pytest.raises(ValueError, match="vcpus must be"):
        vmsa_pages(img, 0)


# ---------------------------------------------------------------------------
# SNP launch plans against snp_calc_launch_digest

LAYOUTS = {
    "default": dict(),
    "no-metadata": dict(sev_sections=()),
    "ovmf-like": dict(sev_sections=[
        (0x800000, 0x9000, 1), (0x80A000, 0x3000, 1), (0x80D000, 0x1000, 2),
        (0x80E000, 0x1000, 3), (0x80F000, 0x11000, 1)]),
    "cpuid-first": dict(sev_sections=[
        (0x80E000, 0x1000, 3), (0x900000, 0x4000, 4), (0x80D000, 0x1000, 2),
        (0x700000, 0x2000, 0x10), (0x600000, 0x1000, 1)]),
    "big-image": dict(size=0x100000, vars_size=0x40000),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("vmm", ["QEMU", "EC2", "GCE"])
def test_snp_plan_digest_matches_sev_snp_measure(tmp_path, layout, vmm):
    kwargs = dict(LAYOUTS[layout])
    data = synthetic_ovmf(kwargs.pop("size", 0x20000), seed=len(layout), **kwargs)
    path = write(tmp_path, data)
    img = OvmfImage.from_file(path)
    for vcpus, vcpu_type, features in ((1, "EPYC-v4", 0x1), (4, "EPYC-Milan", 0x1), (2, "EPYC-Genoa", 0x5)):
        plan = snp_launch_plan(img, vcpus, vcpu_type, vmm, features)
        assert plan.digest() == oracle_snp_digest(path, vcpus, vcpu_type, vmm, features)
        assert len(plan.vmsas) == vcpus


def test_snp_plan_feeds_digest_page_by_page(tmp_path):
    """What an adapter does: feed each page, then each VMSA, to SnpLaunchDigest."""
    data = synthetic_ovmf(0x20000)
    img = OvmfImage.from_bytes(data)
    plan = snp_launch_plan(img, 2)
    ld = SnpLaunchDigest()
    for gpa, page_type, contents in plan.pages:
        ld.update(page_type, gpa, contents)
    for vmsa in plan.vmsas:
        ld.update(KVM_SEV_SNP_PAGE_TYPE_VMSA, SNP_VMSA_GPA, vmsa)
    assert ld.digest == oracle_snp_digest(write(tmp_path, data), 2)


def test_snp_plan_order_and_contents():
    data = synthetic_ovmf(0x20000)
    img = OvmfImage.from_bytes(data)
    plan = snp_launch_plan(img)
    nfw = 0x20000 // PAGE
    assert plan.pages[:nfw] == [SnpPage(img.gpa + i * PAGE, KVM_SEV_SNP_PAGE_TYPE_NORMAL, data[i * PAGE:(i + 1) * PAGE])
                                for i in range(nfw)]
    rest = [(p.gpa, p.page_type) for p in plan.pages[nfw:]]
    assert rest == ([(0x800000 + i * PAGE, KVM_SEV_SNP_PAGE_TYPE_ZERO) for i in range(9)]
                    + [(0x80A000, KVM_SEV_SNP_PAGE_TYPE_ZERO), (0x80D000, KVM_SEV_SNP_PAGE_TYPE_SECRETS),
                       (0x80E000, KVM_SEV_SNP_PAGE_TYPE_CPUID), (0x80F000, KVM_SEV_SNP_PAGE_TYPE_ZERO)])
    for page in plan.pages[nfw:]:
        if page.page_type == KVM_SEV_SNP_PAGE_TYPE_ZERO:
            assert page.contents is None
        else:
            assert page.contents == bytes(PAGE)
    runs = plan.runs
    assert [(r.gpa, r.page_type, r.nr_pages) for r in runs] == [
        (img.gpa, KVM_SEV_SNP_PAGE_TYPE_NORMAL, nfw), (0x800000, KVM_SEV_SNP_PAGE_TYPE_ZERO, 9),
        (0x80A000, KVM_SEV_SNP_PAGE_TYPE_ZERO, 1), (0x80D000, KVM_SEV_SNP_PAGE_TYPE_SECRETS, 1),
        (0x80E000, KVM_SEV_SNP_PAGE_TYPE_CPUID, 1), (0x80F000, KVM_SEV_SNP_PAGE_TYPE_ZERO, 1)]
    assert runs[0].contents == data and runs[1].contents is None


def test_snp_plan_vmm_specific_order():
    img = OvmfImage.from_bytes(synthetic_ovmf(0x10000, vars_size=0x4000))
    ec2 = [p.page_type for p in snp_launch_plan(img, vmm_type="EC2").pages if p.gpa < img.gpa]
    assert ec2[-1] == KVM_SEV_SNP_PAGE_TYPE_CPUID and ec2.count(KVM_SEV_SNP_PAGE_TYPE_CPUID) == 1
    gce = [p for p in snp_launch_plan(img, vmm_type="gce").pages if 0x800000 <= p.gpa < 0x809000]
    assert {p.page_type for p in gce} == {KVM_SEV_SNP_PAGE_TYPE_UNMEASURED}


def test_snp_plan_kernel_hashes_match_sev_snp_measure(tmp_path):
    data = synthetic_ovmf(0x20000, seed=9)
    path = write(tmp_path, data)
    kernel, initrd = random.Random(1).randbytes(5000), random.Random(2).randbytes(3000)
    kpath, ipath = write(tmp_path, kernel, "vmlinuz"), write(tmp_path, initrd, "initrd")
    img = OvmfImage.from_file(path)
    for args, oracle in (
        (dict(kernel=kernel), dict(kernel=kpath)),
        (dict(kernel=kernel, initrd=initrd), dict(kernel=kpath, initrd=ipath)),
        (dict(kernel=kernel, initrd=initrd, append="console=ttyS0 root=/dev/vda"),
         dict(kernel=kpath, initrd=ipath, append="console=ttyS0 root=/dev/vda")),
    ):
        plan = snp_launch_plan(img, 2, **args)
        assert plan.digest() == oracle_snp_digest(path, 2, **oracle)
        hashes = [p for p in plan.pages if p.gpa == 0x80F000]
        assert len(hashes) == 1 and hashes[0].page_type == KVM_SEV_SNP_PAGE_TYPE_NORMAL
    assert snp_launch_plan(img, kernel=kernel).digest() != snp_launch_plan(img).digest()


def test_snp_plan_errors():
    img = OvmfImage.from_bytes(synthetic_ovmf(0x10000, vars_size=0x4000))
    with pytest.raises(ValueError, match="pass kernel too"):
        snp_launch_plan(img, initrd=b"x")
    no_hashes = OvmfImage.from_bytes(synthetic_ovmf(0x10000, sev_sections=[(0x800000, 0x1000, 1)], tdvf_sections=()))
    with pytest.raises(ValueError, match="has none"):
        snp_launch_plan(no_hashes, kernel=b"k")
    overlap = OvmfImage.from_bytes(synthetic_ovmf(
        0x10000, sev_sections=[(0x800000, 0x3000, 1), (0x802000, 0x1000, 2)], tdvf_sections=()))
    with pytest.raises(ValueError, match="0x802000 is measured twice"):
        snp_launch_plan(overlap)
    unknown = OvmfImage.from_bytes(synthetic_ovmf(0x10000, sev_sections=[(0x800000, 0x1000, 9)], tdvf_sections=()))
    with pytest.raises(ValueError, match="unknown type 0x9"):
        snp_launch_plan(unknown)
    unaligned = OvmfImage.from_bytes(synthetic_ovmf(0x10000, sev_sections=[(0x800000, 0x800, 1)], tdvf_sections=()))
    with pytest.raises(ValueError, match="whole 4096-byte pages"):
        snp_launch_plan(unaligned)


# ---------------------------------------------------------------------------
# TDX launch plans

def test_tdx_plan_of_synthetic_tdvf():
    size, vars_size = 0x20000, 0x8000
    data = synthetic_ovmf(size, vars_size=vars_size, seed=5)
    plan = tdx_launch_plan(OvmfImage.from_bytes(data))
    base = FOUR_GIB - size
    expected = (
        [TdxPage(base + off, data[off:off + PAGE], True) for off in range(vars_size, size, PAGE)]
        + [TdxPage(base + off, data[off:off + PAGE], False) for off in range(0, vars_size, PAGE)]
        + [TdxPage(0x809000 + off, bytes(PAGE), False) for off in range(0, 0x2000, PAGE)]
        + [TdxPage(0x800000 + off, bytes(PAGE), False) for off in range(0, 0x6000, PAGE)]
    )
    assert not plan.synthetic
    assert plan.pages == expected
    assert plan.mrtd() == reference_mrtd(expected)
    assert [(r.gpa, r.nr_pages, r.measure, r.section_type) for r in plan.runs] == [
        (base + vars_size, (size - vars_size) // PAGE, True, TdvfSectionType.BFV),
        (base, vars_size // PAGE, False, TdvfSectionType.CFV),
        (0x809000, 2, False, TdvfSectionType.TD_HOB),
        (0x800000, 6, False, TdvfSectionType.TEMP_MEM)]


def test_tdx_plan_without_tdvf_metadata_is_synthetic():
    data = synthetic_ovmf(0x10000, tdvf_sections=(), seed=6)
    plan = tdx_launch_plan(OvmfImage.from_bytes(data))
    base = FOUR_GIB - 0x10000
    expected = ([TdxPage(base + off, data[off:off + PAGE], True) for off in range(0, 0x10000, PAGE)]
                + [TdxPage(0x809000 + off, bytes(PAGE), False) for off in range(0, 0x2000, PAGE)]
                + [TdxPage(0x800000 + off, bytes(PAGE), False) for off in range(0, 0x6000, PAGE)])
    assert plan.synthetic
    assert plan.pages == expected
    assert plan.mrtd() == reference_mrtd(expected)


def _tdx_image(sections):
    return OvmfImage.from_bytes(synthetic_ovmf(0x10000, tdvf_sections=sections))


BFV = TdvfSection(0, 0x8000, FOUR_GIB - 0x10000, 0x8000, 0, 1)
HOB = TdvfSection(0, 0, 0x809000, 0x1000, 2, 0)


@pytest.mark.parametrize("sections, match", [
    ([BFV, HOB._replace(raw_data_size=0x1000)], "RawDataSize 0x1000, expected 0"),
    ([BFV._replace(raw_data_size=0), HOB], "RawDataSize is 0"),
    ([BFV._replace(data_offset=0xC000), HOB], "past the end of the 0x10000-byte image"),
    ([BFV._replace(memory_data_size=0x7800), HOB], "page aligned"),
    ([BFV._replace(raw_data_size=0x9000), HOB], "exceeds memory size"),
    ([BFV, HOB._replace(section_type=4)], "type 4 is not supported"),
    ([BFV, HOB._replace(section_type=3)], "no TD_HOB"),
    ([BFV, HOB, HOB._replace(section_type=3)], "0x809000 is added twice"),
])
def test_tdx_plan_rejects_what_qemu_rejects(sections, match):
    with pytest.raises(ValueError, match=match):
        tdx_launch_plan(_tdx_image(sections))


# ---------------------------------------------------------------------------
# Real OVMF images: every image found must parse and measure right; with none installed,
# one test says so (skipped) and the others are not generated.

REAL_IMAGES = find_ovmf_images()


def test_real_ovmf_images_are_installed():
    if not REAL_IMAGES:
        pytest.skip("no real OVMF image: the real-image tests did not run (install Debian's "
                    "ovmf package or set GMEMFAST_OVMF)")


@pytest.fixture(params=REAL_IMAGES, ids=lambda p: p.name)
def real_image(request):
    """A real image found on this machine: it must parse (a failure here is a failure)."""
    return str(request.param), OvmfImage.from_file(request.param)


def test_real_image_parses_like_sev_snp_measure(real_image):
    path, img = real_image
    ref = OVMF(path)
    assert img.gpa == ref.gpa()
    assert img.sev_sections == [(m.gpa, m.size, m.section_type_int) for m in ref.metadata_items()]
    assert set(img.table) == set(ref._table)
    if img.sev_es_reset_eip is not None:
        assert img.sev_es_reset_eip == ref.sev_es_reset_eip()


def test_real_image_snp_digest_matches_sev_snp_measure(real_image):
    path, img = real_image
    for vcpus, vcpu_type, vmm in ((1, "EPYC-v4", "QEMU"), (4, "EPYC-Milan", "QEMU"), (2, "EPYC-Genoa", "EC2")):
        assert snp_launch_plan(img, vcpus, vcpu_type, vmm).digest() == oracle_snp_digest(path, vcpus, vcpu_type, vmm)


def test_real_image_tdx_plan(real_image):
    _, img = real_image
    try:
        plan = tdx_launch_plan(img)
    except ValueError as exc:
        # OVMF_CODE.fd carries the combined image's TDVF metadata: its BFV lies past its end.
        assert "past the end" in str(exc)
        return
    expected = []
    for s in plan.sections:
        if s.section_type in (TdvfSectionType.BFV, TdvfSectionType.CFV):
            blob = img.data[s.data_offset:s.data_offset + s.memory_data_size]
        else:
            blob = bytes(s.memory_data_size)
        expected += [(s.memory_address + off, blob[off:off + PAGE], bool(s.attributes & 1))
                     for off in range(0, s.memory_data_size, PAGE)]
    assert plan.pages == expected
    assert plan.mrtd() == reference_mrtd(expected)
    assert plan.synthetic == (not img.has_tdvf)
