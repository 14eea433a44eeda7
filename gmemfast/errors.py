"""Errors raised by the model.

They mirror what the kernel returns: an ``OSError`` with ``errno`` (and, where the
kernel reports one, ``error_offset``), a SIGBUS for host access to memory the host may
not touch, and the two VM exits a guest access can cause.
"""
from __future__ import annotations

import errno as _errno

__all__ = ["GmemError", "SigBusError", "MemoryFaultExit", "MmioExit", "errno_name"]


def errno_name(err: int) -> str:
    """The kernel's name of an errno value: ``EAGAIN``, ``EOPNOTSUPP`` (the name the kernel
    uses for 95, where Python's table says ``ENOTSUP``)."""
    if err == _errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return _errno.errorcode.get(err, str(err))


class GmemError(OSError):
    """An error the kernel would return from an ioctl, fallocate or GUP.

    ``errno`` is an :mod:`errno` value; ``error_offset`` is the byte offset the kernel
    reports with it (``KVM_SET_MEMORY_ATTRIBUTES2``'s ``error_offset``), else ``None``.
    """

    def __init__(self, err: int, message: str, error_offset: int | None = None):
        text = f"{errno_name(err)}: {message}"
        if error_offset is not None:
            text += f" (error_offset={error_offset:#x})"
        super().__init__(err, text)
        self.error_offset = error_offset
        self.detail = message

    def __reduce__(self):
        return (type(self), (self.errno, self.detail, self.error_offset))


class SigBusError(GmemError):
    """The host touched a guest_memfd page it may not: a private page, or past the end.

    ``error_offset`` is the file offset of the faulting page.
    """

    def __init__(self, message: str, error_offset: int | None = None):
        super().__init__(_errno.EFAULT, "SIGBUS: " + message, error_offset)

    def __reduce__(self):
        return (type(self), (self.detail[len("SIGBUS: "):], self.error_offset))


class MemoryFaultExit(Exception):
    """``KVM_EXIT_MEMORY_FAULT``: the guest's private/shared view disagrees with the page.

    ``private`` is what the guest asked for (``KVM_MEMORY_EXIT_FLAG_PRIVATE``).
    """

    def __init__(self, gpa: int, size: int, private: bool):
        kind = "private" if private else "shared"
        super().__init__(
            f"KVM_EXIT_MEMORY_FAULT: guest accessed gpa {gpa:#x} (+{size:#x}) as {kind}, "
            f"but the page is {'shared' if private else 'private'}"
        )
        self.gpa = gpa
        self.size = size
        self.private = private

    def __reduce__(self):
        return (type(self), (self.gpa, self.size, self.private))


class MmioExit(Exception):
    """``KVM_EXIT_MMIO``: the guest touched a GPA that no memslot covers."""

    def __init__(self, gpa: int):
        super().__init__(f"KVM_EXIT_MMIO: no memslot covers gpa {gpa:#x}")
        self.gpa = gpa

    def __reduce__(self):
        return (type(self), (self.gpa,))

