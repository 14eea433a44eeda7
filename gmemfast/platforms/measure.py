"""Launch measurements of confidential VMs, as pure accumulators.

Nothing here knows about guest_memfd, memslots or page state: the VM adapters call these
classes once per page (or per 256-byte chunk) that the trusted entity measures, in the
order the firmware would see them.

SEV-SNP: the AMD-SP keeps a launch digest (LD) per guest. Each ``SNP_LAUNCH_UPDATE`` of
a page builds the 112-byte ``PAGE_INFO`` structure (SEV-SNP firmware ABI, table
"PAGE_INFO") from the current LD and sets ``LD = SHA-384(PAGE_INFO)``; the page is then
guest-owned in the RMP. ``SNP_LAUNCH_FINISH`` measures the VMSAs the same way.

TDX: the TDX module keeps MRTD as a running SHA-384 over 128-byte blocks. Each
``TDH.MEM.PAGE.ADD`` hashes one block naming the GPA (not the contents); each
``TDH.MR.EXTEND`` hashes one block naming the chunk's GPA and then the 256-byte chunk.
``TDH.MR.FINALIZE`` closes the hash.
"""
from __future__ import annotations

import hashlib

from ..uapi import (KVM_SEV_SNP_PAGE_TYPE_CPUID, KVM_SEV_SNP_PAGE_TYPE_NORMAL,
                    KVM_SEV_SNP_PAGE_TYPE_SECRETS, KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
                    KVM_SEV_SNP_PAGE_TYPE_VMSA, KVM_SEV_SNP_PAGE_TYPE_ZERO, SNP_PAGE_TYPE_NAMES)
from ..units import PAGE_SIZE

__all__ = [
    "KVM_SEV_SNP_PAGE_TYPE_NORMAL",
    "KVM_SEV_SNP_PAGE_TYPE_VMSA",
    "KVM_SEV_SNP_PAGE_TYPE_ZERO",
    "KVM_SEV_SNP_PAGE_TYPE_UNMEASURED",
    "KVM_SEV_SNP_PAGE_TYPE_SECRETS",
    "KVM_SEV_SNP_PAGE_TYPE_CPUID",
    "SNP_PAGE_TYPE_NAMES",
    "SNP_VMSA_GPA",
    "MEASUREMENT_SIZE",
    "SNP_PAGE_INFO_SIZE",
    "TDX_MR_EXTEND_CHUNK",
    "TDX_MRTD_BLOCK",
    "SnpLaunchDigest",
    "TdxMrtd",
]

# The firmware records a VMSA page with GPA (u64)-1, page aligned and cut to 52 bits.
SNP_VMSA_GPA = 0xFFFFFFFFF000

MEASUREMENT_SIZE = 48          # SHA-384 digest: the LD and MRTD are both this long
SNP_PAGE_INFO_SIZE = 0x70      # PAGE_INFO is 112 bytes; its own length field says so
TDX_MR_EXTEND_CHUNK = 256      # TDH.MR.EXTEND measures 256 bytes per call
TDX_MRTD_BLOCK = 128           # MRTD is extended in SHA-384 blocks of 128 bytes

_ZERO_HASH = bytes(MEASUREMENT_SIZE)
_HASHED_CONTENTS = (KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_VMSA)
_MAX_GPA = 1 << 64


def _check_gpa(gpa, align: int, what: str) -> int:
    if isinstance(gpa, bool) or not isinstance(gpa, int):
        raise TypeError(f"{what}: gpa must be an int, not {type(gpa).__name__}")
    if not 0 <= gpa < _MAX_GPA:
        raise ValueError(f"{what}: gpa {gpa:#x} is not a 64-bit guest physical address")
    if gpa % align:
        raise ValueError(f"{what}: gpa {gpa:#x} is not {align}-byte aligned")
    return gpa


class SnpLaunchDigest:
    """The SEV-SNP launch digest, extended one ``PAGE_INFO`` at a time.

    It starts as 48 zero bytes. :meth:`update` builds PAGE_INFO (112 bytes, little
    endian)::

        0x00  DIGEST_CUR    48  the current launch digest
        0x30  CONTENTS      48  SHA-384 of the 4 KiB page for NORMAL and VMSA, else zeroes
        0x60  LENGTH         2  0x70
        0x62  PAGE_TYPE      1
        0x63  IMI_PAGE       1  0 (not an incoming-migration image page)
        0x64  VMPL3_PERMS    1  0
        0x65  VMPL2_PERMS    1  0
        0x66  VMPL1_PERMS    1  0
        0x67  reserved       1  0
        0x68  GPA            8

    and sets ``digest = SHA-384(PAGE_INFO)``. ``hash_bytes`` counts every byte fed to
    SHA-384 (PAGE_INFO and, for NORMAL and VMSA, the page), for the cost counters.
    """

    __slots__ = ("_ld", "hash_bytes")

    def __init__(self) -> None:
        self._ld = bytes(MEASUREMENT_SIZE)
        self.hash_bytes = 0

    @property
    def digest(self) -> bytes:
        """The current launch digest (48 bytes)."""
        return self._ld

    def update(self, page_type: int, gpa: int, contents=None) -> None:
        """Measure one page the firmware makes guest-owned, as SNP_LAUNCH_UPDATE does.

        ``contents`` must be the 4096-byte page (any bytes-like) for NORMAL and VMSA; it
        is ignored for ZERO, UNMEASURED, SECRETS and CPUID, whose PAGE_INFO carries a
        zero contents hash. ``gpa`` is page aligned (VMSAs use :data:`SNP_VMSA_GPA`).
        """
        if page_type not in SNP_PAGE_TYPE_NAMES:
            raise ValueError(
                f"SNP page type {page_type!r} is unknown: use one of "
                + ", ".join(f"{v}={k}" for k, v in SNP_PAGE_TYPE_NAMES.items())
            )
        _check_gpa(gpa, PAGE_SIZE, "SNP PAGE_INFO")
        if page_type in _HASHED_CONTENTS:
            if contents is None:
                raise ValueError(
                    f"SNP {SNP_PAGE_TYPE_NAMES[page_type]} page at {gpa:#x}: contents are "
                    "required, the launch digest hashes them"
                )
            page = memoryview(contents).cast("B")
            if page.nbytes != PAGE_SIZE:
                raise ValueError(
                    f"SNP {SNP_PAGE_TYPE_NAMES[page_type]} page at {gpa:#x}: contents must "
                    f"be {PAGE_SIZE} bytes, got {page.nbytes}"
                )
            contents_hash = hashlib.sha384(page).digest()
            self.hash_bytes += PAGE_SIZE
        else:
            contents_hash = _ZERO_HASH
        page_info = (
            self._ld
            + contents_hash
            + SNP_PAGE_INFO_SIZE.to_bytes(2, "little")
            + bytes((page_type, 0, 0, 0, 0, 0))  # type, IMI, VMPL3..1 perms, reserved
            + gpa.to_bytes(8, "little")
        )
        self._ld = hashlib.sha384(page_info).digest()
        self.hash_bytes += SNP_PAGE_INFO_SIZE


def _mrtd_header(operation: bytes, gpa: int) -> bytes:
    """The 128-byte block that names a TDX measurement operation and its GPA."""
    return operation.ljust(16, b"\0") + gpa.to_bytes(8, "little") + bytes(104)


class TdxMrtd:
    """The TD's build-time measurement register MRTD (a running SHA-384).

    * :meth:`page_add` is what ``TDH.MEM.PAGE.ADD`` hashes: one 128-byte block of
      ``b"MEM.PAGE.ADD"`` zero-padded to 16 bytes, the GPA as 8 little-endian bytes and
      104 zero bytes. The page contents are not measured.
    * :meth:`mr_extend` is what one ``TDH.MR.EXTEND`` hashes: the same kind of block
      with ``b"MR.EXTEND"`` and the chunk's GPA, then the 256-byte chunk (two blocks).
    * :meth:`finalize` is ``TDH.MR.FINALIZE``: the 48-byte digest (SHA-384 of nothing
      when no page was added). It does not lock the accumulator; refusing later adds
      is the VM's job.

    ``hash_bytes`` counts the bytes fed to SHA-384, for the cost counters. The measured
    stream is kept (not a live hash object) so that a TD under construction can be
    pickled or copied like the rest of the model's state; it is 128 bytes per page added
    plus 384 per chunk extended.
    """

    __slots__ = ("_stream", "hash_bytes")

    def __init__(self) -> None:
        self._stream = bytearray()
        self.hash_bytes = 0

    def page_add(self, gpa: int) -> None:
        """Measure ``TDH.MEM.PAGE.ADD`` of the 4 KiB page at ``gpa``."""
        _check_gpa(gpa, PAGE_SIZE, "TDH.MEM.PAGE.ADD")
        self._stream += _mrtd_header(b"MEM.PAGE.ADD", gpa)
        self.hash_bytes += TDX_MRTD_BLOCK

    def mr_extend(self, gpa: int, chunk) -> None:
        """Measure ``TDH.MR.EXTEND`` of the 256-byte ``chunk`` at ``gpa`` (256-aligned)."""
        _check_gpa(gpa, TDX_MR_EXTEND_CHUNK, "TDH.MR.EXTEND")
        data = memoryview(chunk).cast("B")
        if data.nbytes != TDX_MR_EXTEND_CHUNK:
            raise ValueError(
                f"TDH.MR.EXTEND at {gpa:#x}: chunk must be {TDX_MR_EXTEND_CHUNK} bytes, "
                f"got {data.nbytes}"
            )
        self._stream += _mrtd_header(b"MR.EXTEND", gpa)
        self._stream += data
        self.hash_bytes += TDX_MRTD_BLOCK + TDX_MR_EXTEND_CHUNK

    def add_page(self, gpa: int, page, extend: bool) -> None:
        """One page of ``KVM_TDX_INIT_MEM_REGION``: PAGE.ADD, then (when ``extend``, i.e.
        ``KVM_TDX_MEASURE_MEMORY_REGION``) sixteen MR.EXTENDs over the page's chunks."""
        self.page_add(gpa)
        if extend:
            data = memoryview(page).cast("B")
            if data.nbytes != PAGE_SIZE:
                raise ValueError(
                    f"TDX page at {gpa:#x}: contents must be {PAGE_SIZE} bytes, got {data.nbytes}"
                )
            for off in range(0, PAGE_SIZE, TDX_MR_EXTEND_CHUNK):
                self.mr_extend(gpa + off, data[off:off + TDX_MR_EXTEND_CHUNK])

    def finalize(self) -> bytes:
        """The MRTD value (48 bytes) over everything measured so far."""
        return hashlib.sha384(self._stream).digest()
