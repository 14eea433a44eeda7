"""Operation traces: read, write and describe the records a simulation replays.

A trace is a list of operations on one guest_memfd (the guest's memory), in order. It is
stored as **CSV** (``.csv``) or **JSON lines** (any other extension, usually
``.jsonl``). ``gmemfast run FILE.jsonl`` replays one; scenarios can record theirs with
``--record FILE``. Replaying a trace under different policies (``gmemfast compare``)
shows what the same workload costs with each.

Records
-------
Every record has an ``op``; the other fields depend on it (a missing optional field
takes its default; fields an op does not use must be empty or absent).

=========  ==============================================================================
op         fields
=========  ==============================================================================
convert    ``offset``, ``size``, ``attrs`` (``private`` / ``shared``, or the number 8 / 0),
           ``flags`` (optional: ``preserve`` / ``zero`` / 0, or the numbers 1 / 2).
           ``KVM_SET_MEMORY_ATTRIBUTES2`` on the guest_memfd; in legacy attribute tracking
           the VMM's ``KVM_SET_MEMORY_ATTRIBUTES`` on the VM instead (and, converting to
           shared, a punch hole of the guest_memfd range, as QEMU discards it).
           Consecutive ``convert`` records are applied in one batched call.
allocate   ``offset``, ``size``: ``fallocate(KEEP_SIZE)``.
punch      ``offset``, ``size``: ``fallocate(KEEP_SIZE | PUNCH_HOLE)``.
write      ``offset``, ``size``, ``fill`` (optional byte 0-255, default 0xa5): the host
           writes through its ``mmap`` of the file (faults pages in).
read       ``offset``, ``size``: the host reads through its ``mmap``.
pin        ``offset``, ``size`` (optional, default 4K), ``id`` (optional name, default
           the offset): a long-term pin (GUP ``FOLL_LONGTERM``).
unpin      ``id`` (or ``offset``) of an earlier pin: releases it.
accept     ``offset``, ``size``, ``chunk`` (optional ``4K`` or ``2M``, default 2M): the
           guest accepts (TDX) or validates (SNP) private memory.
phase      ``name``: the operations that follow are reported under this operation name.
=========  ==============================================================================

Numbers (``offset``, ``size``, ``chunk``, ``fill``, ``attrs``, ``flags``) are decimal,
hexadecimal (``0x1000``) or, for offsets and sizes, human sizes in binary units
(``4K``, ``2M``, ``1G``). A ``size`` of ``all`` means "to the end of the file".
Offsets are byte offsets in the guest_memfd (the guest's memory, which the model maps
at GPA 0 up to 2 GiB and at 4 GiB above that, like QEMU's q35).

Failed operations (``EAGAIN`` on a pinned page, say) are counted by errno and the replay
goes on, as a simulation would; ``strict`` stops at the first one instead. A record
that cannot be read is a :class:`TraceError` naming the file and line.

The guest
---------
A trace may say which guest it was recorded on; command-line options override it.
In JSON lines: a first record ``{"op": "guest", "size": "64G", "platform": "snp",
"page_order": 9, "direct_map": "on-conversion", "tracking": "in-place"}``. In CSV: a
comment line ``# gmemfast: size=64G platform=snp page_order=9``.

CSV
---
A header row naming the columns (any order, any subset of ``op, offset, size, attrs,
flags, fill, chunk, id, name``), then one record per row; empty cells are absent
fields; lines starting with ``#`` are comments. Example::

    # gmemfast: size=1G platform=snp page_order=9
    op,offset,size,attrs,flags
    phase,,,,
    convert,0x200000,4K,shared,
    convert,0x200000,4K,private,zero

JSON lines
----------
One JSON object per line; blank lines and lines starting with ``#`` are skipped::

    {"op": "guest", "size": "1G", "platform": "snp", "page_order": 9}
    {"op": "phase", "name": "bounce"}
    {"op": "convert", "offset": "2M", "size": "4K", "attrs": "shared"}
    {"op": "convert", "offset": 2097152, "size": 4096, "attrs": 8, "flags": "zero"}
"""
from __future__ import annotations

import csv
import difflib
import errno
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .uapi import (KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
                   KVM_SET_MEMORY_ATTRIBUTES2_ZERO)
from .errors import errno_name
from .units import MAX_FILE_SIZE, PAGE_SIZE, format_size, parse_size

__all__ = [
    "TraceError",
    "TraceOps",
    "OP_NAMES",
    "GUEST_KEYS",
    "read_trace",
    "parse_records",
    "write_trace",
    "parse_attrs",
    "parse_flags",
    "parse_number",
    "parse_error_counts",
    "ERROR_KINDS",
]

# Operation codes (the ``kind`` column of TraceOps).
CONVERT, ALLOCATE, PUNCH, WRITE, READ, PIN, UNPIN, ACCEPT, PHASE = range(1, 10)
OP_NAMES = {CONVERT: "convert", ALLOCATE: "allocate", PUNCH: "punch", WRITE: "write",
            READ: "read", PIN: "pin", UNPIN: "unpin", ACCEPT: "accept", PHASE: "phase"}
_OP_CODES = {name: code for code, name in OP_NAMES.items()}
_OP_ALIASES = {"set_memory_attributes": CONVERT, "fallocate": ALLOCATE, "punch_hole": PUNCH,
               "host_write": WRITE, "host_read": READ, "release": UNPIN}

#: The fields each op takes (required ones first), besides ``op``.
_FIELDS = {
    CONVERT: ({"offset", "size", "attrs"}, {"flags"}),
    ALLOCATE: ({"offset", "size"}, set()),
    PUNCH: ({"offset", "size"}, set()),
    WRITE: ({"offset", "size"}, {"fill"}),
    READ: ({"offset", "size"}, set()),
    PIN: ({"offset"}, {"size", "id"}),
    UNPIN: (set(), {"id", "offset"}),
    ACCEPT: ({"offset", "size"}, {"chunk"}),
    PHASE: ({"name"}, set()),
}
_ALL_FIELDS = ("op", "offset", "size", "attrs", "flags", "fill", "chunk", "id", "name")

#: Keys a ``guest`` record (or CSV ``# gmemfast:`` line) may give.
GUEST_KEYS = ("size", "platform", "page_order", "direct_map", "tracking", "flow", "merge", "seed")
#: The key of the guest record that declares the failed operations a replay expects.
EXPECT_KEY = "expect_errors"

#: What a failed operation is counted as: its errno name (EAGAIN, EINVAL, EFAULT for a
#: SIGBUS, ...), or one of the two VM exits a guest access can cause.
ERROR_KINDS = frozenset(errno_name(e) for e in errno.errorcode) | {"MemoryFaultExit", "MmioExit"}

ALL = -1            # size "all": to the end of the file
DEFAULT_FILL = 0xA5
HOST_ACCESS_MAX = 256 << 20     # the model keeps written bytes: one host access is at most this


class TraceError(ValueError):
    """A trace record that cannot be read: says which file and line, and why."""

    def __init__(self, message: str, *, source: str = "<trace>", line: int | None = None):
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line
        self.detail = message


@dataclass
class TraceOps:
    """Operations as columns (so a million records cost arrays, not objects).

    ``kind`` is the op code; ``offset``/``size`` are bytes (size -1 = to the end);
    ``a`` is attrs (convert), fill byte (write), chunk (accept), or an index into
    ``names`` (pin / unpin ids, phase names); ``b`` is flags (convert), or for unpin 1
    when ``a`` names an id (else ``offset`` says which pin); ``line`` is the source line
    (0 when the ops were made by a scenario).
    """

    kind: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    a: np.ndarray
    b: np.ndarray
    line: np.ndarray
    names: list = field(default_factory=list)
    source: str = "<ops>"
    guest: dict = field(default_factory=dict)
    expect: dict | None = None      # the failed operations a replay expects (errno name -> count)

    def __len__(self):
        return len(self.kind)

    @classmethod
    def empty(cls, source="<ops>"):
        z = np.zeros(0, np.int64)
        return cls(z.astype(np.int8), z, z, z, z, z, [], source)

    def records(self):
        """The operations as plain dicts (the JSON-lines form), in order."""
        for i in range(len(self)):
            yield self.record(i)

    def record(self, i: int) -> dict:
        k = int(self.kind[i])
        rec = {"op": OP_NAMES[k]}
        off, size, a, b = int(self.offset[i]), int(self.size[i]), int(self.a[i]), int(self.b[i])
        if k == PHASE:
            rec["name"] = self.names[a]
            return rec
        if k == UNPIN:
            if b:
                rec["id"] = self.names[a]
            else:
                rec["offset"] = off
            return rec
        rec["offset"] = off
        rec["size"] = "all" if size == ALL else size
        if k == CONVERT:
            rec["attrs"] = "private" if a else "shared"
            if b:
                rec["flags"] = {1: "preserve", 2: "zero"}.get(b, b)
        elif k == WRITE and a != DEFAULT_FILL:
            rec["fill"] = a
        elif k == ACCEPT:
            rec["chunk"] = format_size(a)
        elif k == PIN:
            rec["id"] = self.names[a]
        return rec


class OpList:
    """Build a TraceOps one op (or one batch of conversions) at a time."""

    def __init__(self, source="<ops>"):
        self._cols = [[] for _ in range(6)]    # lists of arrays, concatenated at the end
        self._names: list[str] = []
        self._name_index: dict[str, int] = {}
        self.source = source
        self.guest: dict = {}
        self.expect: dict | None = None

    def name(self, text: str) -> int:
        i = self._name_index.get(text)
        if i is None:
            i = self._name_index[text] = len(self._names)
            self._names.append(text)
        return i

    def add(self, kind, offset=0, size=0, a=0, b=0, line=0):
        for col, v in zip(self._cols, (kind, offset, size, a, b, line)):
            col.append(np.array([v], np.int64))

    def add_many(self, kind, offsets, sizes, a, b, line=0):
        n = len(offsets)
        for col, v in zip(self._cols, (kind, offsets, sizes, a, b, line)):
            col.append(np.broadcast_to(np.asarray(v, np.int64), (n,)).copy())

    def build(self) -> TraceOps:
        cols = [np.concatenate(c) if c else np.zeros(0, np.int64) for c in self._cols]
        return TraceOps(cols[0].astype(np.int8), cols[1], cols[2], cols[3], cols[4], cols[5],
                        list(self._names), self.source, dict(self.guest),
                        None if self.expect is None else dict(self.expect))


# ---------------------------------------------------------------------------- values

def parse_number(value, what: str, *, sizes: bool = True, allow_all: bool = False,
                 limit: int | None = None) -> int:
    """An int from a record field: ints, ``"0x1000"``, ``"4096"``, or (``sizes``) ``"2M"``.

    With ``limit`` the value must lie in ``[0, limit]`` (``ValueError`` naming the limit).
    """
    if allow_all and isinstance(value, str) and value.strip().lower() in ("all", "rest"):
        return ALL
    n = _number(value, what, sizes, False)
    if limit is not None:
        if n < 0:
            raise ValueError(f"{what}: {value!r} is negative")
        if n > limit:
            raise ValueError(f"{what}: {value!r} is larger than {format_size(limit)}"
                             + (" (2^57 bytes), the largest file the model holds" if limit == MAX_FILE_SIZE
                                else ""))
    return n


def _number(value, what, sizes, allow_all) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if allow_all and text.lower() in ("all", "rest"):
            return ALL
        try:
            return int(text.replace("_", ""), 0)
        except ValueError:
            pass
        if sizes:
            try:
                return parse_size(text)
            except ValueError:
                pass
        kinds = "a number (4096, 0x1000)" + (" or a size (4K, 2M, 1G)" if sizes else "")
        if allow_all:
            kinds += " or 'all'"
        raise ValueError(f"{what}: cannot read {value!r}: expected {kinds}")
    raise ValueError(f"{what}: expected a number, not {type(value).__name__} {value!r}")


def parse_error_counts(value, what: str = EXPECT_KEY) -> dict:
    """Expected failed operations: a mapping ``{"EAGAIN": 1}`` or text ``"EAGAIN:1,EINVAL:2"``
    (``"none"`` or empty: none) -> ``{name: count}`` without zero counts. Names are
    :data:`ERROR_KINDS`; counts are integers >= 0."""
    if isinstance(value, str):
        text = value.strip()
        items = {}
        if text.lower() not in ("", "none"):
            for part in text.split(","):
                name, sep, count = part.replace("=", ":").partition(":")
                if not sep:
                    raise ValueError(f"{what}: {part.strip()!r} is not NAME:COUNT (e.g. EAGAIN:1)")
                items[name.strip()] = count.strip()
        value = items
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a table of errno names and counts like {{EAGAIN = 1}}, "
                         f"not {type(value).__name__} {value!r}")
    out = {}
    for name, count in value.items():
        if name not in ERROR_KINDS:
            close = difflib.get_close_matches(str(name).upper(), ERROR_KINDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{what}: {name!r} is not an errno name like EAGAIN or EINVAL{hint}")
        n = _number(count, f"{what}.{name}", False, False)
        if n < 0:
            raise ValueError(f"{what}.{name}: a count is >= 0, not {count!r}")
        if n:
            out[name] = n
    return out


def parse_attrs(value) -> int:
    """``private`` / ``shared`` / 8 / 0 -> the attribute value (8 or 0)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("private", "p", "priv"):
            return KVM_MEMORY_ATTRIBUTE_PRIVATE
        if text in ("shared", "s", "share"):
            return 0
    try:
        n = parse_number(value, "attrs", sizes=False)
    except ValueError:
        n = None
    if n not in (0, KVM_MEMORY_ATTRIBUTE_PRIVATE):
        raise ValueError(f"attrs: {value!r} is not 'private', 'shared', "
                         f"{KVM_MEMORY_ATTRIBUTE_PRIVATE} (KVM_MEMORY_ATTRIBUTE_PRIVATE) or 0")
    return n


def parse_flags(value) -> int:
    """``preserve`` / ``zero`` / ``none`` / 0 / 1 / 2 -> KVM_SET_MEMORY_ATTRIBUTES2 flags."""
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip().lower()
        named = {"": 0, "none": 0, "preserve": KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
                 "zero": KVM_SET_MEMORY_ATTRIBUTES2_ZERO}
        if text in named:
            return named[text]
    try:
        n = parse_number(value, "flags", sizes=False)
    except ValueError:
        raise ValueError(f"flags: {value!r} is not 'preserve', 'zero', 'none' or a number") from None
    if n < 0:
        raise ValueError(f"flags: {value!r} is negative")
    if n >= 1 << 63:
        raise ValueError(f"flags: {value!r} does not fit the model's 63-bit flags (below 2^63)")
    return n     # other bits are passed on: the model answers EINVAL like the kernel


def _chunk(value) -> int:
    n = parse_number(value, "chunk")
    if n not in (PAGE_SIZE, 2 << 20):
        raise ValueError(f"chunk: {value!r} must be 4K or 2M (the guest accepts in 4 KiB or 2 MiB pages)")
    return n


# ---------------------------------------------------------------------------- reading

def _add_record(ops: OpList, rec: dict, line: int):
    """Validate one record (a dict of raw field values) and append it to ``ops``."""
    if "op" not in rec or rec["op"] in (None, ""):
        raise ValueError("record has no 'op'")
    name = str(rec["op"]).strip().lower()
    kind = _OP_CODES.get(name) or _OP_ALIASES.get(name)
    if kind is None:
        known = ", ".join(OP_NAMES.values())
        raise ValueError(f"unknown op {rec['op']!r}: the ops are {known}")
    present = {k for k, v in rec.items() if k != "op" and v is not None and v != ""}
    required, optional = _FIELDS[kind]
    missing = sorted(required - present)
    if missing:
        raise ValueError(f"op {name!r} needs field(s) {', '.join(missing)}")
    extra = sorted(present - required - optional)
    if extra:
        allowed = ", ".join(sorted(required | optional)) or "none"
        raise ValueError(f"op {name!r} does not take field(s) {', '.join(extra)} (it takes: {allowed})")
    get = rec.get
    if kind == PHASE:
        ops.add(PHASE, a=ops.name(_text(get("name"), "name")), line=line)
        return
    if kind == UNPIN:
        if "id" in present:
            ops.add(UNPIN, a=ops.name(_text(get("id"), "id")), b=1, line=line)
        elif "offset" in present:
            off = parse_number(get("offset"), "offset", limit=MAX_FILE_SIZE)
            ops.add(UNPIN, offset=off, a=ops.name(str(off)), b=1, line=line)
        else:
            raise ValueError("unpin needs 'id' (or the 'offset' of the pin)")
        return
    off = parse_number(get("offset"), "offset", limit=MAX_FILE_SIZE)
    if kind == PIN:
        size = parse_number(get("size"), "size", limit=MAX_FILE_SIZE) if "size" in present else PAGE_SIZE
        pid = _text(get("id"), "id") if "id" in present else str(off)
        ops.add(PIN, off, size, ops.name(pid), line=line)
        return
    size = parse_number(get("size"), "size", allow_all=True, limit=MAX_FILE_SIZE)
    if kind in (WRITE, READ) and size > HOST_ACCESS_MAX:
        raise ValueError(f"size: {get('size')!r}: one host access is at most {format_size(HOST_ACCESS_MAX)} "
                         "(the model keeps the bytes written)")
    if kind == CONVERT:
        ops.add(CONVERT, off, size, parse_attrs(get("attrs")), parse_flags(get("flags")), line)
    elif kind == WRITE:
        fill = parse_number(get("fill"), "fill", sizes=False) if "fill" in present else DEFAULT_FILL
        if not 0 <= fill <= 255:
            raise ValueError(f"fill: {get('fill')!r} is not a byte value 0-255")
        ops.add(WRITE, off, size, fill, line=line)
    elif kind == ACCEPT:
        chunk = _chunk(get("chunk")) if "chunk" in present else 2 << 20
        ops.add(ACCEPT, off, size, chunk, line=line)
    else:
        ops.add(kind, off, size, line=line)


def _text(value, what: str) -> str:
    """A name field (pin id, phase name): text or an integer, not empty."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{what}: expected a name, not {type(value).__name__} {value!r}")
    text = str(value).strip()
    if not text:
        raise ValueError(f"{what} is empty")
    return text


def _guest_record(rec: dict, ops: "OpList") -> None:
    """Take a guest record (or CSV directive) into ``ops``: guest keys and expected errors."""
    extra = sorted(set(rec) - set(GUEST_KEYS) - {"op", EXPECT_KEY})
    if extra:
        raise ValueError(f"guest record: unknown key(s) {', '.join(extra)} "
                         f"(known: {', '.join(GUEST_KEYS)}, {EXPECT_KEY})")
    if EXPECT_KEY in rec:
        ops.expect = parse_error_counts(rec[EXPECT_KEY])
    ops.guest.update({k: v for k, v in rec.items() if k not in ("op", EXPECT_KEY)})


def parse_records(records, *, source="<records>", ops: "OpList | None" = None) -> TraceOps:
    """TraceOps from an iterable of ``(line, dict)`` records (the reader's output)."""
    ops = OpList(source) if ops is None else ops
    first = True
    for line, rec in records:
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"a record must be an object with an 'op', not {type(rec).__name__}")
            if str(rec.get("op", "")).strip().lower() == "guest":
                if not first:
                    raise ValueError("the 'guest' record must come first")
                _guest_record(rec, ops)
            else:
                _add_record(ops, rec, line)
        except TraceError:
            raise
        except (ValueError, TypeError) as exc:
            raise TraceError(str(exc), source=source, line=line) from None
        first = False
    return ops.build()


def _jsonl_records(text: str, source: str):
    for line, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            rec = json.loads(s)
        except json.JSONDecodeError as exc:
            raise TraceError(f"not valid JSON ({exc.msg} at column {exc.colno})", source=source,
                             line=line) from None
        except RecursionError:
            raise TraceError("not valid JSON (nested too deeply)", source=source, line=line) from None
        except ValueError as exc:        # a number too long to convert, say
            raise TraceError(f"not valid JSON ({exc})", source=source, line=line) from None
        yield line, rec


def _csv_directive(text: str, source: str, line: int, ops: "OpList") -> None:
    out = {}
    for item in text.split():
        if "=" not in item:
            raise TraceError(f"'# gmemfast:' line: {item!r} is not key=value", source=source, line=line)
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    try:
        _guest_record(out, ops)
    except ValueError as exc:
        raise TraceError(str(exc), source=source, line=line) from None


def _csv_rows(reader, source: str):
    """The reader's rows; a row the csv module cannot read is a TraceError naming its line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise TraceError(f"not valid CSV ({exc})", source=source, line=reader.line_num) from None
        yield row


def _csv_records(text: str, source: str, ops: "OpList"):
    header = None
    reader = csv.reader(io.StringIO(text))
    for row in _csv_rows(reader, source):
        line = reader.line_num
        if not row or not any(c.strip() for c in row):
            continue
        if row[0].lstrip().startswith("#"):
            joined = ",".join(row).lstrip()[1:].strip()
            if joined.lower().startswith("gmemfast:"):
                _csv_directive(joined[len("gmemfast:"):], source, line, ops)
            continue
        cells = [c.strip() for c in row]
        if header is None:
            unknown = [c for c in cells if c not in _ALL_FIELDS]
            if "op" not in cells or unknown:
                raise TraceError(
                    "the first row must be a header naming the columns "
                    f"(op and any of {', '.join(_ALL_FIELDS[1:])})"
                    + (f"; unknown column(s) {', '.join(map(repr, unknown))}" if unknown else ""),
                    source=source, line=line)
            header = cells
            continue
        if len(cells) > len(header):
            raise TraceError(f"{len(cells)} cells but the header names {len(header)} columns",
                             source=source, line=line)
        yield line, {k: v for k, v in zip(header, cells) if v != ""}
    if header is None:
        raise TraceError("no header row (op,offset,size,...)", source=source)


def trace_format(path) -> str:
    """``"csv"`` for ``.csv`` files, else ``"jsonl"``."""
    return "csv" if str(path).lower().endswith(".csv") else "jsonl"


def read_trace(path) -> TraceOps:
    """Read a CSV or JSON-lines trace file (see the module docs). A UTF-8 byte-order mark
    at the start is allowed."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TraceError("not a text file (UTF-8)", source=source) from None
    except OSError as exc:
        raise TraceError(f"cannot read: {exc.strerror or exc}", source=source) from None
    ops = OpList(source)
    if trace_format(path) == "csv":
        return parse_records(_csv_records(text, source, ops), source=source, ops=ops)
    return parse_records(_jsonl_records(text, source), source=source, ops=ops)


# ---------------------------------------------------------------------------- writing

def write_trace(path, ops: TraceOps, guest: dict | None = None) -> int:
    """Write ``ops`` as CSV (``.csv``) or JSON lines; returns the number of records.
    The guest record carries the expected errors (``ops.expect``) if there are any."""
    guest = {k: v for k, v in (guest if guest is not None else ops.guest).items() if v is not None}
    if ops.expect:
        guest[EXPECT_KEY] = (",".join(f"{k}:{v}" for k, v in ops.expect.items())
                             if trace_format(path) == "csv" else dict(ops.expect))
    path = Path(path)
    n = 0
    with open(path, "w", newline="") as f:
        if trace_format(path) == "csv":
            if guest:
                f.write("# gmemfast: " + " ".join(f"{k}={v}" for k, v in guest.items()) + "\n")
            cols = ["op", "offset", "size", "attrs", "flags", "fill", "chunk", "id", "name"]
            w = csv.writer(f)
            w.writerow(cols)
            for rec in ops.records():
                w.writerow(["" if rec.get(c) is None else rec[c] for c in cols])
                n += 1
        else:
            if guest:
                f.write(json.dumps({"op": "guest", **guest}) + "\n")
            for rec in ops.records():
                f.write(json.dumps(rec) + "\n")
                n += 1
    return n
