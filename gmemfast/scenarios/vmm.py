"""What the VMM does around a conversion of the guest's memory (docs/model.md §13): the
legacy flow's KVM_SET_MEMORY_ATTRIBUTES per request with QEMU's discards, and the IOMMU
mappings of an assigned device (``--vfio``) around conversions in place. ``Runner`` takes
these as a mixin; they use its guest (``vm``, ``gmem``, ``vfio``), its memslots and its
failure records."""
from __future__ import annotations

import errno

import numpy as np

from ..errors import GmemError
from ..uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
from ..units import PAGE_SIZE, check_range

__all__ = ["VmmConversions", "punch_error"]


def punch_error(err: int, off: int, size: int, at: int) -> GmemError:
    """The error ``GuestMemfd.fallocate`` raises for a punch that ``fallocate_many`` refused
    (a pinned page: the only way a validated punch fails)."""
    return GmemError(err, f"punch hole [{off:#x}, {off + size:#x}): page at {at:#x} is pinned",
                     at if at >= 0 else None)


class VmmConversions:
    """The VMM's side of conversions, for ``Runner``."""

    def _legacy_convert_many(self, offs, sizes, attrs, lines, label) -> np.ndarray:
        """Legacy tracking: KVM_SET_MEMORY_ATTRIBUTES on the VM, per request. Around it the
        VMM (docs/model.md §13), as QEMU's kvm_convert_memory(): to private, unmaps the
        range from the IOMMU first (``vfio``) and discards its separate shared copy after
        (``discard_on_private``: ram_block_discard_range); to shared, punches the
        guest_memfd range (``discard_on_share``: ram_block_discard_guest_memfd_range) and
        maps the shared copy in the IOMMU. Content flags do not exist there."""
        n = len(offs)
        errs = np.zeros(n, np.int32)
        vm, g = self.vm, self.gmem
        if n > 1 and self.vfio is None and self._disjoint(offs, sizes):
            return self._legacy_convert_batched(offs, sizes, attrs, lines)
        every = max(1, n // 200)
        for i, (off, size, a) in enumerate(zip(offs.tolist(), sizes.tolist(), attrs.tolist())):
            undo = []
            try:
                check_range(off, size, self.size, "convert")
                pieces = self._gpa_pieces(off, size)
                if a and self.vfio is not None:
                    for gpa, sz in pieces:
                        undo += self.vfio.unmap(gpa, sz)
                for gpa, sz in pieces:
                    vm.set_memory_attributes(gpa, sz, a)
                undo = []
                if a and self.discard_on_private:
                    for gpa, sz in pieces:     # QEMU's ram_block_discard_range
                        vm.discard_shared(gpa, sz)
                if not a and self.discard_on_share:   # ram_block_discard_guest_memfd_range
                    g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, size)
                if not a and self.vfio is not None:
                    for gpa, sz in pieces:
                        self.vfio.map(gpa, sz)
            except GmemError as exc:
                errs[i] = exc.errno
                self._fail(exc, "convert", off, size, int(lines[i]) if lines is not None else 0)
                if undo:
                    self.vfio.remap(undo)
            self.steps += 1
            if n > 1000 and i % every == 0 and label is not None:
                self.progress(label, i, n)
        if n > 1000 and label is not None:
            self.progress(label, n, n)
        return errs

    def _before_convert(self, offs, sizes, attrs: int):
        """In place, before conversions to private: the VMM unmaps the pages from the IOMMU
        (a pinned page cannot go private). Returns what to map again if one fails."""
        if not attrs or self.vfio is None:
            return None
        undo = []
        for off, size in zip(offs.tolist(), sizes.tolist()):
            undo.append([r for gpa, sz in self._valid_pieces(off, size) for r in self.vfio.unmap(gpa, sz)])
        return undo

    def _after_convert(self, offs, sizes, attrs: int, flags, errs, undo) -> None:
        """In place, after conversions: the discard policy punches the pages whose contents
        are no longer wanted (not those converted with PRESERVE); to shared, the VMM maps
        them in the IOMMU; a failed conversion to private maps back what was unmapped
        before it (docs/model.md §13)."""
        policy = self.discard_on_private if attrs else self.discard_on_share
        for i, (off, size) in enumerate(zip(offs.tolist(), sizes.tolist())):
            discard = policy and not flags[i] & KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
            try:
                if errs[i]:
                    if undo is not None and undo[i]:
                        self.vfio.remap(undo[i])
                    continue
                if discard:
                    self.gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, size)
                if not attrs and self.vfio is not None:
                    for gpa, sz in self._valid_pieces(off, size):
                        self.vfio.map(gpa, sz)
            except GmemError as exc:
                self._fail(exc, "discard" if discard else "vfio map", off, size)

    def _valid_pieces(self, off: int, size: int):
        """(gpa, size) pieces of a file range, or none if the range is not a valid one."""
        if off < 0 or size <= 0 or (off | size) % PAGE_SIZE or off + size > self.size:
            return []
        return self._gpa_pieces(off, size)

    @staticmethod
    def _disjoint(offs, sizes) -> bool:
        """Whether no two of the ranges share a page (then the order in which the VM's
        attributes and the file's punches interleave changes nothing)."""
        o = np.argsort(offs, kind="stable")
        a, z = offs[o], sizes[o]
        return bool((z > 0).all() and (a[1:] >= a[:-1] + z[:-1]).all())

    def _legacy_convert_batched(self, offs, sizes, attrs, lines) -> np.ndarray:
        """``_legacy_convert_many`` for disjoint ranges, through the batched forms: every
        item's attributes (per memslot piece) in one call, then the punches of the items
        converted to shared (with the discard policies), and the discards of the separate
        shared memory of those converted to private. Items are disjoint, so this is their
        per-item order's result. Not with ``--vfio``: mapping follows each item."""
        n = len(offs)
        errs = np.zeros(n, np.int32)
        bad = (sizes <= 0) | (offs < 0) | (((offs | sizes) & (PAGE_SIZE - 1)) != 0) | (offs >= self.size) \
            | (sizes > self.size - offs)
        errs[bad] = errno.EINVAL
        item, gpas, gsizes = [], [], []
        for gpa, o, size in self._slots():                 # the memslot pieces of each item
            a = np.maximum(offs, o)
            b = np.minimum(offs + sizes, o + size)
            mine = ~bad & (a < b)
            item.append(np.flatnonzero(mine))
            gpas.append(gpa + a[mine] - o)
            gsizes.append((b - a)[mine])
        item, gpas, gsizes = (np.concatenate(v) for v in (item, gpas, gsizes))
        o = np.argsort(item, kind="stable")                # each item's pieces in turn
        item, gpas, gsizes = item[o], gpas[o], gsizes[o]
        r = self.vm.set_memory_attributes_many(gpas, gsizes, attrs[item])
        np.maximum.at(errs, item, r.errno)
        attr_failed = errs != 0
        if self.discard_on_private:                        # QEMU's ram_block_discard_range
            for i in np.flatnonzero(~bad & ~attr_failed & (attrs != 0)).tolist():
                for gpa, sz in self._gpa_pieces(int(offs[i]), int(sizes[i])):
                    self.vm.discard_shared(gpa, sz)
        share = np.flatnonzero(~bad & ~attr_failed & (attrs == 0)) if self.discard_on_share \
            else np.zeros(0, np.int64)
        if len(share):
            r = self.gmem.fallocate_many(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offs[share], sizes[share])
            errs[share] = r.errno
        self.steps += n
        for i in np.flatnonzero(errs).tolist():
            # the failed step again, alone (it changed nothing): the error it raises
            off, size = int(offs[i]), int(sizes[i])
            try:
                if bad[i]:
                    check_range(off, size, self.size, "convert")
                elif attr_failed[i]:
                    for gpa, sz in self._gpa_pieces(off, size):
                        self.vm.set_memory_attributes(gpa, sz, int(attrs[i]))
                else:
                    raise punch_error(int(errs[i]), off, size, int(r.error_offset[np.searchsorted(share, i)]))
            except GmemError as exc:
                self._fail(exc, "convert", off, size, int(lines[i]) if lines is not None else 0)
        return errs
