"""``kvm_gmem_populate``: the generic loop that loads initial private memory, page by
page, through a platform's ``post_populate`` callback (docs/model.md §4.7).

Populate does not convert: the destination must already be private as the VM tracks it
(guest_memfd's shareability in place, the VM's per-GFN attributes in legacy mode). The
source is shared memory — a bytes-like buffer (separate host memory) or a
:class:`GmemRange` naming shared guest_memfd memory — or ``None``, meaning in place. The
``populate_converts`` policy is the alternative design the model can measure: populate
then converts the destination to private itself.

The loop works on any VM-like object with ``memslot_for(gpa)``, ``in_place``,
``is_private(gpa)``, ``interrupt`` and the ``populate_converts`` /
``pages_per_populate`` policies (:class:`gmemfast.vm.VM`).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ._layout import HMAP, PRIV
from .errors import GmemError
from .uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
from .units import PAGE_SHIFT, PAGE_SIZE

__all__ = ["GmemRange", "advance_source", "check_source", "gmem_populate"]


@dataclass(frozen=True)
class GmemRange:
    """A populate source in shared guest_memfd memory: ``gmem`` from byte ``offset``."""
    gmem: object
    offset: int = 0

    def advanced(self, nbytes: int) -> "GmemRange":
        return GmemRange(self.gmem, self.offset + nbytes)


def advance_source(source, nbytes: int):
    """A populate source moved ``nbytes`` on: bytes-like sources are sliced, a
    :class:`GmemRange` moves its offset, ``None`` (in place) stays ``None``."""
    if source is None:
        return None
    if isinstance(source, GmemRange):
        return source.advanced(nbytes)
    return memoryview(source).cast("B")[nbytes:]


def check_source(source, what: str) -> None:
    """``TypeError`` unless ``source`` is ``None``, a :class:`GmemRange` or bytes-like."""
    if source is None or isinstance(source, GmemRange):
        return
    try:
        memoryview(source)
    except TypeError:
        raise TypeError(f"{what}: the source must be bytes-like, a GmemRange or None, not "
                        f"{type(source).__name__}") from None


def _source_page(source, k: int, what: str):
    """Page ``k`` of a populate source: its bytes, or ``None`` for in place. A page that
    cannot be read is ``EFAULT``, as GUP on the source would fail."""
    if source is None:
        return None
    if isinstance(source, GmemRange):
        off = source.offset + (k << PAGE_SHIFT)
        g = source.gmem
        if off % PAGE_SIZE or off < 0 or off + PAGE_SIZE > g.size:
            raise GmemError(errno.EFAULT, f"{what}: source guest_memfd offset {off:#x} is not a "
                                          "page inside the file")
        p = off >> PAGE_SHIFT
        if g.store.word(p) & PRIV:
            raise GmemError(errno.EFAULT, f"{what}: source guest_memfd page {off:#x} is private "
                                          "(the host cannot read it)")
        g.store.fault_in(p, p + 1, HMAP)
        return g.store.page_bytes(p)
    mv = memoryview(source).cast("B")
    a = k << PAGE_SHIFT
    if a + PAGE_SIZE > len(mv):
        raise GmemError(errno.EFAULT, f"{what}: source buffer ends at byte {len(mv)}, page {k} "
                                      "needs more")
    return bytes(mv[a:a + PAGE_SIZE])


def _populate_convert(vm, ms, p0: int, nr: int, what: str) -> None:
    """The design the in-place conversion series argues against: populate converts the
    shared destination to private itself, so conversion errors (``EAGAIN`` with its
    offset, ``ENOMEM``) surface through the platform call."""
    if not vm.in_place:
        raise GmemError(errno.EINVAL, f"{what}: populate_converts needs an in-place VM")
    g = ms.gmem
    if g.store.count(p0, p0 + nr, PRIV, PRIV):
        raise GmemError(errno.EINVAL, f"{what}: with populate_converts the destination must "
                                      "be shared")
    g.set_memory_attributes(p0 << PAGE_SHIFT, nr << PAGE_SHIFT, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                            KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)   # keep what was loaded


def gmem_populate(vm, gpa: int, nr_pages: int, source, post_populate, *, what: str) -> int:
    """Load ``nr_pages`` private pages from ``gpa`` through ``post_populate(memslot, page,
    gpa, source_page) -> errno``.

    The count is clamped to the memslot and to the ``pages_per_populate`` policy; the
    caller's ``vm.interrupt(pages_done)`` hook stops the loop with ``EINTR``. Returns the
    pages done; raises the error if the first page failed.
    """
    ms = vm.memslot_for(gpa)
    if ms is None or ms.gmem is None:
        raise GmemError(errno.EINVAL, f"{what}: no memslot with a guest_memfd covers gpa {gpa:#x}")
    p0 = (ms.gmem_offset + gpa - ms.gpa) >> PAGE_SHIFT
    nr = min(nr_pages, (ms.end - gpa) >> PAGE_SHIFT)
    if vm.pages_per_populate:
        nr = min(nr, int(vm.pages_per_populate))
    if vm.populate_converts:
        _populate_convert(vm, ms, p0, nr, what)
    store = ms.gmem.store
    err, why = 0, ""
    done = 0
    for k in range(nr):
        g = gpa + (k << PAGE_SHIFT)
        p = p0 + k
        private = store.word(p) & PRIV if vm.in_place else vm.is_private(g)
        if not private:
            err, why = errno.EINVAL, f"destination gpa {g:#x} is not private"
            break
        if vm.interrupt is not None and vm.interrupt(done):
            err, why = errno.EINTR, f"interrupted after {done} pages"
            break
        try:
            src = _source_page(source, k, what)
        except GmemError as exc:
            err, why = exc.errno, exc.detail
            break
        err = post_populate(ms, p, g, src)
        if err:
            why = f"gpa {g:#x}: {os.strerror(err)}"
            break
        done += 1
    if done == 0 and err:
        raise GmemError(err, f"{what}: {why}")
    return done
