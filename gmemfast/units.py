"""Sizes, alignment, and the range and chunk rules used everywhere (docs/model.md §1)."""
from __future__ import annotations

import errno
import numbers
import re

from .errors import GmemError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ACCEPT_CHUNKS = (PAGE_SIZE, 2 << 20)    # the guest accepts 4 KiB or 2 MiB pages

#: The largest guest_memfd the model holds: 2^57 bytes (128P), so that page indices and
#: byte offsets stay in 64-bit integer arithmetic everywhere.
MAX_FILE_SIZE = 1 << 57
#: Guest physical addresses lie below 2^52: x86-64's largest physical address width.
MAX_GPA = 1 << 52

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(value) -> int:
    """Turn ``"1T"``, ``"512G"``, ``"2M"``, ``"4KiB"`` or an int into bytes (binary units)."""
    if isinstance(value, bool):
        raise TypeError(f"size must be an int or a string like '1T', not {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(
                f"cannot read size {value!r}: use a number with an optional binary unit, "
                "like '4096', '2M', '512G' or '1T'"
            )
        return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise TypeError(f"size must be an int or a string like '1T', not {type(value).__name__}")


def format_size(nbytes: int) -> str:
    """The shortest exact binary form: 1099511627776 -> '1T', 12288 -> '12K'."""
    for unit in "PTGMK":
        mult = _UNITS[unit]
        if nbytes and nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return f"{nbytes}B"


def as_int(value, name: str) -> int:
    """An API integer argument: ints (and numpy ints) only, else TypeError."""
    if type(value) is int:          # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    return int(value)


def check_count(value, name: str, *, optional: bool = False):
    """A count argument: an int of at least 1 (or ``None`` when ``optional``), else
    ``ValueError`` naming the argument."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1{' (or None)' if optional else ''}, "
                         f"not {value!r}")
    return int(value)


def broadcast_column(value, n: int, name: str, first: str = "offsets"):
    """``value`` (a scalar or a 1-D array) as ``n`` items, for a batched call whose
    ``first`` array has ``n``; arrays of another length are a ``ValueError`` naming both."""
    import numpy as np
    if getattr(value, "ndim", 0) == 1 and value.shape[0] != n:
        raise ValueError(f"{name} has {value.shape[0]:,} items but {first} has {n:,}: give arrays "
                         "of the same length, or a scalar for all")
    return np.ascontiguousarray(np.broadcast_to(value, (n,)))


def check_range(offset, size, limit: int, what: str = "range", *, allow_past_end: bool = False):
    """Validate a byte range ``[offset, offset+size)`` against a file of ``limit`` bytes.

    Returns ``(first_page, end_page)``. Size 0, unaligned values, overflow, negative
    values and (unless ``allow_past_end``) a range past the end raise ``EINVAL``.
    """
    offset = as_int(offset, "offset")
    size = as_int(size, "size")
    if size == 0:
        raise GmemError(errno.EINVAL, f"{what}: size is 0")
    if offset < 0 or size < 0:
        raise GmemError(errno.EINVAL, f"{what}: negative offset {offset} or size {size}")
    if offset % PAGE_SIZE:
        raise GmemError(errno.EINVAL, f"{what}: offset {offset:#x} is not page aligned")
    if size % PAGE_SIZE:
        raise GmemError(errno.EINVAL, f"{what}: size {size:#x} is not page aligned")
    end = offset + size
    if end >= 1 << 64:
        raise GmemError(errno.EINVAL, f"{what}: offset {offset:#x} + size {size:#x} overflows")
    if not allow_past_end:
        if offset >= limit:
            raise GmemError(errno.EINVAL, f"{what}: offset {offset:#x} is at or past the end ({limit:#x})")
        if end > limit:
            raise GmemError(errno.EINVAL, f"{what}: end {end:#x} is past the end ({limit:#x})")
    return offset >> PAGE_SHIFT, end >> PAGE_SHIFT


def check_accept_chunk(chunk) -> int:
    """The guest's accept (TDX) / validate (SNP) granularity: 4 KiB or 2 MiB, in bytes.
    Anything else is ``EINVAL``."""
    chunk = as_int(chunk, "chunk")
    if chunk not in ACCEPT_CHUNKS:
        raise GmemError(errno.EINVAL, f"accept chunk {chunk:#x}: must be 4 KiB (4K) or 2 MiB (2M)")
    return chunk
