"""OVMF / TDVF firmware images and the launch plans built from them.

An OVMF image is mapped by QEMU so that it ends at 4 GiB: the byte at file offset ``o``
sits at GPA ``4 GiB - len(image) + o``. Its last bytes hold the *OVMF footer GUID
table*: 32 bytes before the end is a footer entry (``u16`` size of the whole table, then
the footer GUID ``96b582de-...``); the entries before it are walked backwards, each laid
out as ``data, u16 size (data + 18), GUID`` (GUIDs in the little-endian EFI byte order).
The entries this module reads:

* SEV metadata offset (``dc886566-...``): ``u32`` offset from the end of the image to the
  ``"ASEV"`` header (``u32`` size, ``u32`` version 1, ``u32`` count), followed by
  sections of ``u32 gpa, u32 size, u32 type`` (:class:`SevSectionType`).
* SEV-ES reset block (``00f771de-...``): ``u32`` reset EIP of the application
  processors, used for their VMSAs.
* SEV hash table (``7255371f-...``): ``u32 gpa, u32 size`` of the kernel hashes table.
* TDX metadata offset (``e47a6535-...``): ``u32`` offset from the end of the image to the
  ``"TDVF"`` header (``u32`` length, ``u32`` version 1, ``u32`` count), followed by
  sections of ``u32 DataOffset, u32 RawDataSize, u64 MemoryAddress, u64 MemoryDataSize,
  u32 Type, u32 Attributes`` (:class:`TdvfSectionType`; attribute bit 0 = MR.EXTEND).

Parsing (:class:`OvmfImage`) checks structure only and raises :class:`ValueError` for a
file that is not an OVMF image. The plans check meaning: :func:`snp_launch_plan` lists
the pages ``SNP_LAUNCH_UPDATE`` measures in the order sev-snp-measure (and QEMU) use, and
:func:`vmsa_pages` builds the VMSAs ``SNP_LAUNCH_FINISH`` measures;
:func:`tdx_launch_plan` lists the pages ``KVM_TDX_INIT_MEM_REGION`` adds (TDH.MEM.PAGE.ADD)
and extends (TDH.MR.EXTEND), in the order QEMU issues them.

The SEV parts follow sev-snp-measure (IBM, Apache-2.0: ``ovmf.py``, ``guest.py``,
``vmsa.py``, ``vcpu_types.py``, ``sev_hashes.py``), which the tests use as the oracle;
the TDX parts follow QEMU's ``hw/i386/tdvf.c`` and ``target/i386/kvm/tdx.c``.
"""
from __future__ import annotations

import enum
import hashlib
import os
import random
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

from .platforms.measure import SNP_VMSA_GPA, SnpLaunchDigest, TdxMrtd
from .platforms.vmsa import CPU_SIGNATURES, VMM_TYPES, vmm_profile, vmsa_pages
from .uapi import (KVM_SEV_SNP_PAGE_TYPE_CPUID, KVM_SEV_SNP_PAGE_TYPE_NORMAL,
                   KVM_SEV_SNP_PAGE_TYPE_SECRETS, KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
                   KVM_SEV_SNP_PAGE_TYPE_VMSA, KVM_SEV_SNP_PAGE_TYPE_ZERO, SNP_PAGE_TYPE_NAMES)
from .units import PAGE_SIZE

__all__ = [
    "FOUR_GIB",
    "OVMF_TABLE_FOOTER_GUID",
    "SEV_ES_RESET_BLOCK_GUID",
    "OVMF_SEV_METADATA_GUID",
    "SEV_HASH_TABLE_RV_GUID",
    "TDX_METADATA_OFFSET_GUID",
    "SevSectionType",
    "TdvfSectionType",
    "TDVF_ATTR_MR_EXTEND",
    "SevSection",
    "TdvfSection",
    "OvmfImage",
    "DEFAULT_SEV_SECTIONS",
    "default_tdvf_layout",
    "synthetic_ovmf",
    "find_ovmf_images",
    "CPU_SIGNATURES",
    "VMM_TYPES",
    "vmsa_pages",
    "SnpPage",
    "SnpRun",
    "SnpLaunchPlan",
    "snp_launch_plan",
    "TdxPage",
    "TdxRun",
    "TdxLaunchPlan",
    "tdx_launch_plan",
]

FOUR_GIB = 1 << 32

OVMF_TABLE_FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
SEV_ES_RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
OVMF_SEV_METADATA_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"
SEV_HASH_TABLE_RV_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
TDX_METADATA_OFFSET_GUID = "e47a6535-984a-4798-865e-4685a7bf8ec2"

_ENTRY_HEADER = struct.Struct("<H16s")         # footer table entry trailer: size, GUID
_FOOTER_OFFSET_FROM_END = 32                    # the table ends 32 bytes before the end
_SEV_HEADER = struct.Struct("<4sIII")            # "ASEV", size, version, count
_SEV_SECTION = struct.Struct("<III")             # gpa, size, type
_TDVF_HEADER = struct.Struct("<4sIII")           # "TDVF", length, version, count
_TDVF_SECTION = struct.Struct("<IIQQII")         # offset, raw size, address, size, type, attrs


class SevSectionType(enum.IntEnum):
    """Types of OVMF SEV metadata sections (edk2 ``OvmfSevMetadata.asm``)."""

    SNP_SEC_MEM = 1          # SEC-phase memory: ZERO pages (UNMEASURED on GCE)
    SNP_SECRETS = 2          # the SNP secrets page: SECRETS
    CPUID = 3                # the SNP CPUID table page: CPUID
    SVSM_CAA = 4             # SVSM calling-area address page: ZERO
    SNP_KERNEL_HASHES = 0x10  # kernel/initrd/cmdline hashes: NORMAL, or ZERO if no kernel


class TdvfSectionType(enum.IntEnum):
    """Types of TDVF metadata sections (TDVF design guide; QEMU supports 0 to 3)."""

    BFV = 0              # boot firmware volume: copied from the image
    CFV = 1              # configuration firmware volume (variables): copied from the image
    TD_HOB = 2           # the TD hand-off block list: host-provided memory
    TEMP_MEM = 3         # temporary memory for the firmware: host-provided memory
    PERM_MEM = 4
    PAYLOAD = 5
    PAYLOAD_PARAM = 6


TDVF_ATTR_MR_EXTEND = 1 << 0   # measure the section with TDH.MR.EXTEND


def _enum_or_int(enum_type, value: int):
    try:
        return enum_type(value)
    except ValueError:
        return value


class SevSection(NamedTuple):
    """One OVMF SEV metadata section: ``(gpa, size, section_type)``."""

    gpa: int
    size: int
    section_type: int        # a SevSectionType when the value is known


class TdvfSection(NamedTuple):
    """One TDVF metadata section, with the TDVF design guide's fields."""

    data_offset: int         # file offset of the data (BFV, CFV)
    raw_data_size: int       # bytes of data in the file (0 for TD_HOB and TEMP_MEM)
    memory_address: int      # GPA of the section
    memory_data_size: int    # bytes of guest memory of the section
    section_type: int        # a TdvfSectionType when the value is known
    attributes: int          # bit 0: MR.EXTEND

    @property
    def mr_extend(self) -> bool:
        """True when the section is measured with TDH.MR.EXTEND."""
        return bool(self.attributes & TDVF_ATTR_MR_EXTEND)


def _u32_entry(table: dict, guid: str, what: str) -> int | None:
    entry = table.get(guid)
    if entry is None:
        return None
    if len(entry) < 4:
        raise ValueError(f"OVMF footer table: the {what} entry ({guid}) has {len(entry)} data bytes, needs 4")
    return int.from_bytes(entry[:4], "little")


def _parse_footer_table(data: bytes) -> dict[str, bytes]:
    size = len(data)
    footer_start = size - _FOOTER_OFFSET_FROM_END - _ENTRY_HEADER.size
    if footer_start < 0:
        raise ValueError(f"not an OVMF image: {size} bytes is too short to hold the OVMF footer table")
    table_size, guid = _ENTRY_HEADER.unpack_from(data, footer_start)
    if uuid.UUID(bytes_le=guid) != uuid.UUID(OVMF_TABLE_FOOTER_GUID):
        raise ValueError(
            f"not an OVMF image: no OVMF table footer GUID {OVMF_TABLE_FOOTER_GUID} "
            f"{_FOOTER_OFFSET_FROM_END + _ENTRY_HEADER.size} bytes before the end"
        )
    body_size = table_size - _ENTRY_HEADER.size
    if body_size < 0 or body_size > footer_start:
        raise ValueError(
            f"OVMF footer table: size {table_size} does not fit in the {size}-byte image"
        )
    body = data[footer_start - body_size:footer_start]
    table: dict[str, bytes] = {}
    while len(body) >= _ENTRY_HEADER.size:
        entry_size, guid = _ENTRY_HEADER.unpack_from(body, len(body) - _ENTRY_HEADER.size)
        if entry_size < _ENTRY_HEADER.size or entry_size > len(body):
            raise ValueError(
                f"OVMF footer table: entry {uuid.UUID(bytes_le=guid)} has size {entry_size}, "
                f"outside [{_ENTRY_HEADER.size}, {len(body)}]"
            )
        name = str(uuid.UUID(bytes_le=guid))
        if name in table:
            raise ValueError(f"OVMF footer table: GUID {name} appears twice")
        table[name] = bytes(body[len(body) - entry_size:len(body) - _ENTRY_HEADER.size])
        body = body[:len(body) - entry_size]
    return table


def _metadata_start(data: bytes, offset_from_end: int, header_size: int, what: str) -> int:
    start = len(data) - offset_from_end
    if offset_from_end > len(data) or start + header_size > len(data):
        raise ValueError(
            f"{what}: offset {offset_from_end:#x} from the end points outside the {len(data)}-byte image"
        )
    return start


def _metadata_sections(data: bytes, offset_from_end: int, header, section, signature: bytes,
                       what: str, exact: bool) -> list[tuple]:
    """The raw section tuples of a metadata block (``signature``, length, version 1,
    section count, then the sections). SEV metadata may be longer than its sections
    (``exact=False``); TDVF metadata must match them exactly."""
    start = _metadata_start(data, offset_from_end, header.size, what)
    sig, length, version, count = header.unpack_from(data, start)
    if sig != signature:
        raise ValueError(f"{what}: signature is {sig!r}, expected {signature!r}")
    if version != 1:
        raise ValueError(f"{what}: version {version} is not supported (only 1 is)")
    expected = header.size + count * section.size
    if (length != expected if exact else length < expected) or start + length > len(data):
        if exact:
            raise ValueError(f"{what}: length {length:#x} does not match {count} sections "
                             f"({expected:#x}) inside the image")
        raise ValueError(f"{what}: size {length:#x} does not hold {count} sections "
                         f"(needs {expected:#x}) inside the image")
    return [section.unpack_from(data, start + header.size + i * section.size) for i in range(count)]


def _parse_sev_metadata(data: bytes, offset_from_end: int) -> list[SevSection]:
    raw = _metadata_sections(data, offset_from_end, _SEV_HEADER, _SEV_SECTION, b"ASEV",
                             "OVMF SEV metadata", exact=False)
    return [SevSection(gpa, sz, _enum_or_int(SevSectionType, stype)) for gpa, sz, stype in raw]


def _parse_tdvf_metadata(data: bytes, offset_from_end: int) -> list[TdvfSection]:
    raw = _metadata_sections(data, offset_from_end, _TDVF_HEADER, _TDVF_SECTION, b"TDVF",
                             "TDVF metadata", exact=True)
    return [TdvfSection(off, rawsz, addr, msize, _enum_or_int(TdvfSectionType, stype), attrs)
            for off, rawsz, addr, msize, stype, attrs in raw]


@dataclass(frozen=True, eq=False)
class OvmfImage:
    """A parsed OVMF (or TDVF) firmware image, placed to end at 4 GiB.

    ``table`` maps each footer-table GUID (lower-case string) to its entry data.
    ``sev_sections`` / ``tdvf_sections`` are empty when the image has no such metadata;
    ``sev_es_reset_eip`` is ``None`` without a SEV-ES reset block.
    """

    data: bytes
    table: dict
    sev_sections: list
    tdvf_sections: list
    sev_es_reset_eip: int | None

    @classmethod
    def from_bytes(cls, data) -> "OvmfImage":
        """Parse an image held in memory; ``ValueError`` if it is not an OVMF image."""
        data = bytes(data)
        size = len(data)
        if size == 0 or size % PAGE_SIZE or size > FOUR_GIB:
            raise ValueError(
                f"not a usable OVMF image: its size {size} must be a non-zero multiple of "
                f"{PAGE_SIZE} bytes, at most 4 GiB (it is mapped page by page below 4 GiB)"
            )
        table = _parse_footer_table(data)
        sev_off = _u32_entry(table, OVMF_SEV_METADATA_GUID, "SEV metadata")
        tdx_off = _u32_entry(table, TDX_METADATA_OFFSET_GUID, "TDX metadata")
        return cls(
            data=data,
            table=table,
            sev_sections=[] if sev_off is None else _parse_sev_metadata(data, sev_off),
            tdvf_sections=[] if tdx_off is None else _parse_tdvf_metadata(data, tdx_off),
            sev_es_reset_eip=_u32_entry(table, SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block"),
        )

    @classmethod
    def from_file(cls, path) -> "OvmfImage":
        """Read and parse an image file (``OVMF.fd``, ``OVMF.amdsev.fd``, ...)."""
        try:
            return cls.from_bytes(Path(path).read_bytes())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def gpa(self) -> int:
        """The load address: the image ends at 4 GiB."""
        return FOUR_GIB - len(self.data)

    @property
    def has_tdvf(self) -> bool:
        """True when the image carries TDVF metadata."""
        return bool(self.tdvf_sections)

    @property
    def sev_hashes_table_gpa(self) -> int | None:
        """GPA of the SEV kernel hashes table, or ``None`` if the image has none (no
        entry, or address 0 as in images built without measured direct boot)."""
        gpa = _u32_entry(self.table, SEV_HASH_TABLE_RV_GUID, "SEV hash table")
        return gpa or None


# ---------------------------------------------------------------------------
# Synthetic images

DEFAULT_SEV_SECTIONS = (
    SevSection(0x800000, 0x9000, SevSectionType.SNP_SEC_MEM),
    SevSection(0x80A000, 0x1000, SevSectionType.SVSM_CAA),
    SevSection(0x80D000, 0x1000, SevSectionType.SNP_SECRETS),
    SevSection(0x80E000, 0x1000, SevSectionType.CPUID),
    SevSection(0x80F000, 0x1000, SevSectionType.SNP_KERNEL_HASHES),
)
_HASH_TABLE_OFFSET_IN_PAGE = 0xC00   # where the synthetic image puts the hashes table
_HASH_TABLE_SIZE = 0x400


def default_tdvf_layout(image_size: int, vars_size: int = 0) -> list[TdvfSection]:
    """The TDVF layout of an OVMF-like image of ``image_size`` bytes ending at 4 GiB.

    Like edk2's ``IntelTdxMetadata.asm``: the code (BFV, measured with MR.EXTEND) after
    ``vars_size`` bytes of variables (CFV, added but not extended; none when 0), then a
    TD_HOB and TEMP_MEM at the addresses OVMF uses. :func:`tdx_launch_plan` uses it for
    images without TDVF metadata (``vars_size`` 0: the whole image is the BFV).
    """
    if vars_size < 0 or vars_size % PAGE_SIZE or vars_size >= image_size:
        raise ValueError(
            f"TDVF layout: vars_size {vars_size:#x} must be a multiple of {PAGE_SIZE} below "
            f"the image size {image_size:#x}"
        )
    base = FOUR_GIB - image_size
    sections = [TdvfSection(vars_size, image_size - vars_size, base + vars_size,
                            image_size - vars_size, TdvfSectionType.BFV, TDVF_ATTR_MR_EXTEND)]
    if vars_size:
        sections.append(TdvfSection(0, vars_size, base, vars_size, TdvfSectionType.CFV, 0))
    sections.append(TdvfSection(0, 0, 0x809000, 0x2000, TdvfSectionType.TD_HOB, 0))
    sections.append(TdvfSection(0, 0, 0x800000, 0x6000, TdvfSectionType.TEMP_MEM, 0))
    return sections


def _table_entry(guid: str, payload: bytes) -> bytes:
    return payload + _ENTRY_HEADER.pack(len(payload) + _ENTRY_HEADER.size, uuid.UUID(guid).bytes_le)


def synthetic_ovmf(size: int = 0x40000, *, seed: int = 0, reset_eip: int | None = 0x80B004,
                   sev_sections: Iterable | None = None, tdvf_sections: Iterable | None = None,
                   vars_size: int = 0x10000) -> bytes:
    """Build a small OVMF-like image that parses like a real one.

    The bytes are pseudo-random (from ``seed``) except for the metadata at the end: the
    SEV metadata (``sev_sections``; default :data:`DEFAULT_SEV_SECTIONS`, one section of
    each type, plus a SEV hash table entry inside the kernel-hashes page), the TDVF
    metadata (``tdvf_sections``; default ``default_tdvf_layout(size, vars_size)``), a
    SEV-ES reset block with ``reset_eip``, and the footer GUID table. Pass an empty
    sequence to leave out a metadata block, ``reset_eip=None`` to leave out the reset
    block. Returns the image bytes (feed them to :meth:`OvmfImage.from_bytes` or write
    them to a file for sev-snp-measure).
    """
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"synthetic OVMF: size {size} must be a positive multiple of {PAGE_SIZE}")
    sev = list(DEFAULT_SEV_SECTIONS if sev_sections is None else (SevSection(*s) for s in sev_sections))
    tdvf = (default_tdvf_layout(size, vars_size) if tdvf_sections is None
            else [TdvfSection(*s) for s in tdvf_sections])

    # Metadata blocks, placed (16-byte aligned) just before the footer table.
    blocks = []
    if sev:
        blocks.append((OVMF_SEV_METADATA_GUID,
                       _SEV_HEADER.pack(b"ASEV", _SEV_HEADER.size + len(sev) * _SEV_SECTION.size, 1, len(sev))
                       + b"".join(_SEV_SECTION.pack(*s) for s in sev)))
    if tdvf:
        blocks.append((TDX_METADATA_OFFSET_GUID,
                       _TDVF_HEADER.pack(b"TDVF", _TDVF_HEADER.size + len(tdvf) * _TDVF_SECTION.size,
                                         1, len(tdvf))
                       + b"".join(_TDVF_SECTION.pack(*s) for s in tdvf)))

    entries = []  # nearest the footer first
    if reset_eip is not None:
        entries.append(_table_entry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", reset_eip)))
    hashes = [s for s in sev if s.section_type == SevSectionType.SNP_KERNEL_HASHES]
    if hashes:
        entries.append(_table_entry(SEV_HASH_TABLE_RV_GUID, struct.pack(
            "<II", hashes[0].gpa + _HASH_TABLE_OFFSET_IN_PAGE, _HASH_TABLE_SIZE)))
    # The table's length is known before the blocks are placed (each metadata entry
    # holds a 4-byte offset), so the blocks go right below it, 16-byte aligned.
    table_end = size - _FOOTER_OFFSET_FROM_END - _ENTRY_HEADER.size
    body_len = sum(map(len, entries)) + len(blocks) * (4 + _ENTRY_HEADER.size)
    cursor = table_end - body_len
    placed = []
    for guid, block in blocks:
        cursor = (cursor - len(block)) & ~15
        placed.append((cursor, block))
        entries.append(_table_entry(guid, struct.pack("<I", size - cursor)))
    if cursor < 0:
        raise ValueError(f"synthetic OVMF: size {size:#x} is too small for its metadata")

    image = bytearray(random.Random(seed).randbytes(size))
    for offset, block in placed:
        image[offset:offset + len(block)] = block
    body = b"".join(reversed(entries))
    image[table_end - len(body):table_end] = body
    image[table_end:table_end + _ENTRY_HEADER.size] = _ENTRY_HEADER.pack(
        len(body) + _ENTRY_HEADER.size, uuid.UUID(OVMF_TABLE_FOOTER_GUID).bytes_le)
    return bytes(image)


_OVMF_DIRS = ("/usr/share/ovmf", "/usr/share/OVMF", "/usr/share/edk2/ovmf", "/usr/share/edk2/x64")


def find_ovmf_images(env: str = "GMEMFAST_OVMF") -> list[Path]:
    """Candidate real OVMF images on this machine, most specific first.

    The entries of environment variable ``env`` (files or folders, separated by
    ``os.pathsep``) come first, then the usual distribution folders
    (``/usr/share/ovmf``, ``/usr/share/OVMF``, ``/usr/share/edk2/...``). From a folder,
    every ``*.fd`` file that is not a variable store (``*VARS*``) is taken. Symlinks to
    a file already listed are dropped. Files are listed, not parsed: parse them with
    :meth:`OvmfImage.from_file`.
    """
    folders_and_files = [Path(item) for item in os.environ.get(env, "").split(os.pathsep) if item]
    folders_and_files += [Path(folder) for folder in _OVMF_DIRS]
    found: list[Path] = []
    seen: set[Path] = set()
    for item in folders_and_files:
        candidates = [item] if item.is_file() else sorted(item.glob("*.fd")) if item.is_dir() else []
        for path in candidates:
            if "VARS" in path.name.upper() or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            found.append(path)
    return found


# ---------------------------------------------------------------------------
# SEV-SNP: the launch plan

class SnpPage(NamedTuple):
    """One page of an SNP launch: ``contents`` is ``None`` for ZERO pages (no source)."""

    gpa: int
    page_type: int
    contents: bytes | None


class SnpRun(NamedTuple):
    """Consecutive pages of one type: one ``KVM_SEV_SNP_LAUNCH_UPDATE`` call's worth."""

    gpa: int
    page_type: int
    contents: bytes | None     # nr_pages * 4096 bytes, or None for ZERO
    nr_pages: int


@dataclass(frozen=True, eq=False)
class SnpLaunchPlan:
    """What an SNP launch measures, in order: ``pages`` through ``SNP_LAUNCH_UPDATE``,
    then ``vmsas`` through ``SNP_LAUNCH_FINISH`` (each at :data:`SNP_VMSA_GPA`)."""

    pages: list                # SnpPage, in order
    vmsas: list                # 4096-byte VMSA pages: BSP, then APs

    @property
    def runs(self) -> list[SnpRun]:
        """``pages`` merged into runs of one type at consecutive GPAs, in order."""
        groups: list[list[SnpPage]] = []
        for page in self.pages:
            last = groups[-1][-1] if groups else None
            if last and page.page_type == last.page_type and page.gpa == last.gpa + PAGE_SIZE:
                groups[-1].append(page)
            else:
                groups.append([page])
        return [SnpRun(g[0].gpa, g[0].page_type,
                       None if g[0].contents is None else b"".join(p.contents for p in g), len(g))
                for g in groups]

    def digest(self) -> bytes:
        """The launch digest this plan must produce (48 bytes)."""
        ld = SnpLaunchDigest()
        for page in self.pages:
            ld.update(page.page_type, page.gpa, page.contents)
        for vmsa in self.vmsas:
            ld.update(KVM_SEV_SNP_PAGE_TYPE_VMSA, SNP_VMSA_GPA, vmsa)
        return ld.digest


_SEV_TYPES = frozenset(t.value for t in SevSectionType)
_HASH_TABLE_GUID = "9438d606-4f22-4cc9-b479-a793d411fd21"
_HASH_ENTRY_GUIDS = (("cmdline", "97d02dd8-bd20-4c94-aa78-e7714d36ab2a"),
                     ("initrd", "44baf731-3a2f-4bd7-9af1-41e29169781d"),
                     ("kernel", "4de79437-abd2-427f-b835-d5b172d2045b"))


def _kernel_hashes_page(offset: int, kernel: bytes, initrd: bytes | None, append: str | None) -> bytes:
    """QEMU's SEV hashes table (``SevHashTable``, padded to 16 bytes) at ``offset`` in a
    zero page: a GUID-tagged header, then the SHA-256 of the command line (with its NUL),
    the initrd and the kernel, each as a GUID-tagged entry."""
    digests = {
        "cmdline": hashlib.sha256((append or "").encode() + b"\0").digest(),
        "initrd": hashlib.sha256(initrd or b"").digest(),
        "kernel": hashlib.sha256(kernel).digest(),
    }
    entry = struct.Struct("<16sH32s")
    body = b"".join(entry.pack(uuid.UUID(g).bytes_le, entry.size, digests[name])
                    for name, g in _HASH_ENTRY_GUIDS)
    table_len = 16 + 2 + len(body)
    table = uuid.UUID(_HASH_TABLE_GUID).bytes_le + struct.pack("<H", table_len) + body
    table += bytes(-table_len % 16)
    if offset + len(table) > PAGE_SIZE:
        raise ValueError(f"SEV hashes table at page offset {offset:#x} does not fit in the page")
    return bytes(offset) + table + bytes(PAGE_SIZE - offset - len(table))


def snp_launch_plan(ovmf: OvmfImage, vcpus: int = 1, vcpu_type: str = "EPYC-v4",
                    vmm_type: str = "QEMU", guest_features: int = 0x1, *,
                    vcpu_sig: int | None = None, kernel: bytes | None = None,
                    initrd: bytes | None = None, append: str | None = None) -> SnpLaunchPlan:
    """The pages an SNP launch of ``ovmf`` measures, in sev-snp-measure's order.

    1. Every page of the image, NORMAL, from its load address up.
    2. Each SEV metadata section, in metadata order, page by page: SNP_SEC_MEM ZERO
       (UNMEASURED on GCE), SNP_SECRETS one SECRETS page, CPUID one CPUID page (on EC2
       all CPUID pages come after every other section), SVSM_CAA ZERO, and
       SNP_KERNEL_HASHES the hashes table page as NORMAL when ``kernel`` is given, else
       ZERO pages.
    3. ``vmsas``: :func:`vmsa_pages` (BSP, then APs).

    SECRETS, CPUID and UNMEASURED pages carry zeroed 4 KiB contents (the kernel copies a
    source for every type but ZERO; the firmware does not hash it; a real VMM would
    write its CPUID table there). ``ValueError`` for an unknown or unaligned section,
    two pages at one GPA, or ``initrd``/``append`` without ``kernel``.
    """
    vmm = str(vmm_type).upper()
    vmm_profile(vmm)
    if kernel is None and (initrd is not None or append is not None):
        raise ValueError("initrd and append are measured only with a kernel: pass kernel too")
    pages = [SnpPage(ovmf.gpa + off, KVM_SEV_SNP_PAGE_TYPE_NORMAL, ovmf.data[off:off + PAGE_SIZE])
             for off in range(0, ovmf.size, PAGE_SIZE)]
    zero_page = bytes(PAGE_SIZE)

    def add(section: SevSection, page_type: int, nr_pages: int) -> None:
        contents = None if page_type == KVM_SEV_SNP_PAGE_TYPE_ZERO else zero_page
        pages.extend(SnpPage(section.gpa + i * PAGE_SIZE, page_type, contents) for i in range(nr_pages))

    for s in ovmf.sev_sections:
        if s.section_type not in _SEV_TYPES:
            raise ValueError(f"OVMF SEV metadata: section at {s.gpa:#x} has unknown type {s.section_type:#x}")
        if s.gpa % PAGE_SIZE or s.size % PAGE_SIZE or s.size == 0:
            raise ValueError(
                f"OVMF SEV metadata: {s.section_type.name} section at {s.gpa:#x} size {s.size:#x} "
                f"is not a non-empty run of whole {PAGE_SIZE}-byte pages"
            )
    has_hashes = any(s.section_type == SevSectionType.SNP_KERNEL_HASHES for s in ovmf.sev_sections)
    if kernel is not None and not has_hashes:
        raise ValueError("a kernel is measured only into an SNP_KERNEL_HASHES section; the image has none")

    for s in ovmf.sev_sections:
        t = s.section_type
        if t == SevSectionType.SNP_SEC_MEM:
            add(s, KVM_SEV_SNP_PAGE_TYPE_UNMEASURED if vmm == "GCE" else KVM_SEV_SNP_PAGE_TYPE_ZERO,
                s.size // PAGE_SIZE)
        elif t == SevSectionType.SNP_SECRETS:
            add(s, KVM_SEV_SNP_PAGE_TYPE_SECRETS, 1)
        elif t == SevSectionType.CPUID:
            if vmm != "EC2":
                add(s, KVM_SEV_SNP_PAGE_TYPE_CPUID, 1)
        elif t == SevSectionType.SVSM_CAA:
            add(s, KVM_SEV_SNP_PAGE_TYPE_ZERO, s.size // PAGE_SIZE)
        elif kernel is None:  # SNP_KERNEL_HASHES without a kernel
            add(s, KVM_SEV_SNP_PAGE_TYPE_ZERO, s.size // PAGE_SIZE)
        else:
            table_gpa = ovmf.sev_hashes_table_gpa
            if table_gpa is None:
                raise ValueError(f"the image has no SEV hash table address ({SEV_HASH_TABLE_RV_GUID})")
            if s.size != PAGE_SIZE:
                raise ValueError(
                    f"SNP_KERNEL_HASHES section at {s.gpa:#x} is {s.size:#x} bytes, not one page")
            page = _kernel_hashes_page(table_gpa % PAGE_SIZE, kernel, initrd, append)
            pages.append(SnpPage(s.gpa, KVM_SEV_SNP_PAGE_TYPE_NORMAL, page))
    if vmm == "EC2":
        for s in ovmf.sev_sections:
            if s.section_type == SevSectionType.CPUID:
                add(s, KVM_SEV_SNP_PAGE_TYPE_CPUID, 1)

    seen: dict[int, int] = {}
    for p in pages:
        if p.gpa in seen:
            raise ValueError(
                f"SNP launch: GPA {p.gpa:#x} is measured twice ({SNP_PAGE_TYPE_NAMES[seen[p.gpa]]} and "
                f"{SNP_PAGE_TYPE_NAMES[p.page_type]}): the image's sections overlap"
            )
        seen[p.gpa] = p.page_type
    vmsas = vmsa_pages(ovmf, vcpus, vcpu_type, vmm, guest_features, vcpu_sig=vcpu_sig)
    return SnpLaunchPlan(pages=pages, vmsas=vmsas)


# ---------------------------------------------------------------------------
# TDX: the TDVF launch plan

class TdxPage(NamedTuple):
    """One page of ``KVM_TDX_INIT_MEM_REGION``: TDH.MEM.PAGE.ADD, plus TDH.MR.EXTEND of
    its sixteen 256-byte chunks when ``measure``."""

    gpa: int
    contents: bytes
    measure: bool


class TdxRun(NamedTuple):
    """One TDVF section: one ``KVM_TDX_INIT_MEM_REGION`` call as QEMU makes it."""

    gpa: int
    contents: bytes            # nr_pages * 4096 bytes
    nr_pages: int
    measure: bool              # KVM_TDX_MEASURE_MEMORY_REGION
    section_type: int


@dataclass(frozen=True, eq=False)
class TdxLaunchPlan:
    """What a TDX launch adds, section by section in metadata order.

    ``sections`` is the TDVF layout used; ``synthetic`` says it was made up by
    :func:`default_tdvf_layout` because the image has no TDVF metadata.
    """

    sections: list
    synthetic: bool
    runs: list                 # TdxRun per section, in order

    @property
    def pages(self) -> list[TdxPage]:
        """Every page, in order."""
        return [TdxPage(run.gpa + off, run.contents[off:off + PAGE_SIZE], run.measure)
                for run in self.runs for off in range(0, len(run.contents), PAGE_SIZE)]

    def mrtd(self) -> bytes:
        """The MRTD this plan must produce (48 bytes)."""
        acc = TdxMrtd()
        for page in self.pages:
            acc.add_page(page.gpa, page.contents, page.measure)
        return acc.finalize()


_TDX_FROM_IMAGE = (TdvfSectionType.BFV, TdvfSectionType.CFV)
_TDX_HOST_MEMORY = (TdvfSectionType.TD_HOB, TdvfSectionType.TEMP_MEM)


def tdx_launch_plan(ovmf: OvmfImage) -> TdxLaunchPlan:
    """The pages a TDX launch of ``ovmf`` adds, as QEMU's ``tdx_finalize_vm`` does.

    Sections come in TDVF metadata order. BFV and CFV load ``memory_data_size`` bytes of
    the image from ``data_offset`` (QEMU maps the section straight from the image);
    TD_HOB and TEMP_MEM are zero pages (QEMU writes its HOB list into TD_HOB; neither is
    extended, so MRTD does not depend on it). A section is measured with MR.EXTEND when
    its attribute bit 0 is set. Images without TDVF metadata get
    ``default_tdvf_layout(len(image))``. ``ValueError`` for a section QEMU would reject
    (unaligned, raw data larger than memory, data in a TD_HOB/TEMP_MEM or none in a
    BFV/CFV, an unsupported type, data past the end of the image), no TD_HOB, or two
    pages at one GPA.
    """
    synthetic = not ovmf.has_tdvf
    sections = default_tdvf_layout(ovmf.size) if synthetic else list(ovmf.tdvf_sections)
    runs = []
    seen: set[int] = set()
    for s in sections:
        where = f"TDVF section {getattr(s.section_type, 'name', s.section_type)} at {s.memory_address:#x}"
        if s.section_type not in _TDX_FROM_IMAGE + _TDX_HOST_MEMORY:
            raise ValueError(f"{where}: type {int(s.section_type)} is not supported "
                             "(QEMU supports BFV, CFV, TD_HOB and TEMP_MEM)")
        if s.memory_address % PAGE_SIZE or s.memory_data_size % PAGE_SIZE or s.memory_data_size == 0:
            raise ValueError(f"{where}: address and size {s.memory_data_size:#x} must be "
                             "page aligned and non-zero")
        if s.raw_data_size > s.memory_data_size:
            raise ValueError(f"{where}: raw data size {s.raw_data_size:#x} exceeds memory "
                             f"size {s.memory_data_size:#x}")
        if s.section_type in _TDX_FROM_IMAGE:
            if s.raw_data_size == 0:
                raise ValueError(f"{where}: a firmware volume needs data, RawDataSize is 0")
            end = s.data_offset + s.memory_data_size
            if end > ovmf.size:
                raise ValueError(
                    f"{where}: data [{s.data_offset:#x}, {end:#x}) lies past the end of the "
                    f"{ovmf.size:#x}-byte image (a split OVMF_CODE.fd? TDX needs the whole image)"
                )
            contents = ovmf.data[s.data_offset:end]
        else:
            if s.raw_data_size:
                raise ValueError(f"{where}: host-memory section has RawDataSize "
                                 f"{s.raw_data_size:#x}, expected 0")
            contents = bytes(s.memory_data_size)
        for gpa in range(s.memory_address, s.memory_address + s.memory_data_size, PAGE_SIZE):
            if gpa in seen:
                raise ValueError(f"{where}: GPA {gpa:#x} is added twice: the sections overlap")
            seen.add(gpa)
        runs.append(TdxRun(s.memory_address, contents, s.memory_data_size // PAGE_SIZE,
                           s.mr_extend, s.section_type))
    if not any(s.section_type == TdvfSectionType.TD_HOB for s in sections):
        raise ValueError("TDVF metadata has no TD_HOB section (QEMU requires one)")
    return TdxLaunchPlan(sections=sections, synthetic=synthetic, runs=runs)
