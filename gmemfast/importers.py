"""Conversions recorded on real guests, read into the trace format (docs/model.md §12).

Three recordings are read (``gmemfast import FORMAT FILE -o trace.jsonl``;
``examples/README.md`` gives the commands that make each):

``trace-cmd``
    ``trace-cmd report`` text of KVM's tracepoints on the host. The conversions are, in
    this order of preference (the first one the file has is used, the others are
    counted): ``kvm:kvm_vm_set_mem_attributes`` (the VMM's ``KVM_SET_MEMORY_ATTRIBUTES``:
    a GFN range and the attribute), ``kvm:kvm_hypercall`` with ``nr 0xc``
    (``KVM_HC_MAP_GPA_RANGE`` from the guest: GPA, 4 KiB pages, bit 4 of the attributes
    is "encrypted"), ``kvm:kvm_vmgexit_msr_protocol_enter`` carrying an SNP page-state
    change in the GHCB MSR (request 0x014, GFN in bits 51:12, operation 1 private / 2
    shared in bits 55:52).
``bpftrace``
    The output of ``examples/gmemfast-conversions.bt``: one line per event,
    ``NSECS attrs START_GFN END_GFN ATTR``, ``NSECS map_gpa GPA NPAGES ATTRS`` or
    ``NSECS ghcb_msr VALUE`` (hexadecimal), chosen as above.
``qemu``
    QEMU's trace log (``-trace kvm_convert_memory``, log backend): ``kvm_convert_memory
    start 0x... size 0x... shared_to_private|private_to_shared`` (a GPA range), else
    ``ram_block_attributes_state_change offset 0x... size 0x... from '...' to
    'discarded'|'populated'`` (an offset in the RAM block: discarded is private).

**Addresses.** The model's traces use offsets in the guest_memfd, which holds guest
memory laid out as QEMU's q35 does: the first 2 GiB at GPA 0 and the rest at 4 GiB (a
guest of at most 2.75 GiB is all below 4 GiB). A GPA below 4 GiB is its own offset; a
GPA at or above 4 GiB is offset GPA - 2 GiB. Ranges in the hole between the end of low
memory and 4 GiB (firmware, MMIO) or past the guest's memory are left out and counted.
Without ``size`` the guest's size is taken from the highest address converted, rounded
up to 1 GiB (2 MiB for a guest that stays below 2.75 GiB).

A line of an event that is read but cannot be parsed is a :class:`TraceError` naming
the file and line; lines of other events are counted and skipped.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .trace import CONVERT, OpList, TraceError, TraceOps, write_trace
from .uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from .units import PAGE_SIZE, format_size, parse_size

__all__ = ["FORMATS", "Imported", "gpa_of", "import_trace", "low_memory", "offset_of", "parse_text",
           "render", "configure_cli", "cli_run"]

FORMATS = ("trace-cmd", "bpftrace", "qemu")
FOUR_GIB = 1 << 32
LOW_SPLIT = 2 << 30            # q35: above 2.75 GiB of RAM, the first 2 GiB stay low
LOW_MAX = 0xB0000000
KVM_HC_MAP_GPA_RANGE = 12      # include/uapi/linux/kvm_para.h
MAP_GPA_ENCRYPTED = 1 << 4     # KVM_MAP_GPA_RANGE_ENCRYPTED
GHCB_MSR_PSC_REQ = 0x014
PSC_PRIVATE, PSC_SHARED = 1, 2


def low_memory(size: int) -> int:
    """Bytes of guest memory below 4 GiB (q35)."""
    return size if size <= LOW_MAX else LOW_SPLIT


def offset_of(gpa: int) -> int:
    """The guest_memfd offset of a RAM GPA (q35)."""
    return gpa if gpa < FOUR_GIB else gpa - FOUR_GIB + LOW_SPLIT


def gpa_of(offset: int, size: int) -> int:
    """The GPA of a guest_memfd offset of a guest of ``size`` bytes (q35)."""
    low = low_memory(size)
    return offset if offset < low else FOUR_GIB + offset - low


@dataclass
class Imported:
    """What an import read: ``ops`` (the conversions, as a trace), the event each line
    was (``events``), the event the conversions came from (``used``), ranges left out
    (``skipped``: reason -> count) and the guest (``guest``: its size and what else the
    recording tells)."""
    ops: TraceOps
    fmt: str
    source: str
    used: str
    events: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    guest: dict = field(default_factory=dict)
    size_inferred: bool = False
    lines: int = 0

    def summary(self) -> dict:
        return {"format": self.fmt, "source": self.source, "conversions": len(self.ops),
                "used": self.used, "guest": dict(self.guest), "size_inferred": self.size_inferred,
                "lines": self.lines, "events": dict(self.events), "skipped": dict(self.skipped)}


# ---------------------------------------------------------------------------- parsing

_HEX = r"(?:0x)?([0-9a-fA-F]+)"
_TC_LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
                      r"(?:(?P<flags>[^\s:]{2,6})\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>[\w:]+):\s?(?P<body>.*)$")
_TC_HEADER = re.compile(r"^\s*(cpus=\d+|version\s*=.*|CPU\s*\d+ is empty|CPU:\d+ \[LOST \d+ EVENTS\]|#.*"
                        r"|trace-cmd: .*)\s*$")
_ATTRS = re.compile(r"^\s*(?:\.\s+)?" + _HEX + r"\s+--\s+" + _HEX + r"\s+\[0x([0-9a-fA-F]+)\]\s*$")
_ATTRS_CNT = re.compile(r"^\s*gfn 0x([0-9a-fA-F]+), cnt 0x([0-9a-fA-F]+), attributes 0x([0-9a-fA-F]+)\s*$")
_HCALL = re.compile(r"^\s*nr 0x([0-9a-fA-F]+) a0 0x([0-9a-fA-F]+) a1 0x([0-9a-fA-F]+) "
                    r"a2 0x([0-9a-fA-F]+) a3 0x([0-9a-fA-F]+)\s*$")
_MSR = re.compile(r"^\s*vcpu (\d+), ghcb_gpa ([0-9a-fA-F]+)\s*$")
_BT_LINE = re.compile(r"^(\d+) (attrs|map_gpa|ghcb_msr)((?: [0-9a-fA-F]+)+)\s*$")
_BT_NOISE = re.compile(r"^(Attaching \d+ probes?\.\.\.|Lost \d+ events|\s*)$")
_QEMU_LINE = re.compile(r"^(?:(\d+)@(\d+\.\d+):)?([a-z_][a-z0-9_]*) (.*)$")
_QEMU_CONVERT = re.compile(r"^start 0x([0-9a-fA-F]+) size 0x([0-9a-fA-F]+) "
                           r"(shared_to_private|private_to_shared)\s*$")
_QEMU_RBA = re.compile(r"^offset 0x([0-9a-fA-F]+) size 0x([0-9a-fA-F]+) from '(\w+)' to "
                       r"'(discarded|populated)'\s*$")

# The conversion sources of each format, most trusted first: name -> kind of address.
_SOURCES = {
    "trace-cmd": ("kvm_vm_set_mem_attributes", "kvm_hypercall", "kvm_vmgexit_msr_protocol_enter"),
    "bpftrace": ("attrs", "map_gpa", "ghcb_msr"),
    "qemu": ("kvm_convert_memory", "ram_block_attributes_state_change"),
}


def _attrs(value: int, what: str) -> bool:
    if value & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
        raise ValueError(f"{what}: attributes 0x{value:x} has bits other than PRIVATE (0x8)")
    return bool(value)


def _range(start: int, end: int, what: str) -> tuple[int, int]:
    if end <= start:
        raise ValueError(f"{what}: the range 0x{start:x} -- 0x{end:x} is empty")
    return start, end


def _set_attrs(fields, what):
    """(gpa, bytes, private) of a kvm_vm_set_mem_attributes event's GFN range."""
    start, end, attr = fields
    start, end = _range(start, end, what)
    return start * PAGE_SIZE, (end - start) * PAGE_SIZE, _attrs(attr, what)


def _map_gpa(gpa, npages, attrs, what):
    if npages <= 0:
        raise ValueError(f"{what}: 0 pages")
    if gpa % PAGE_SIZE:
        raise ValueError(f"{what}: GPA 0x{gpa:x} is not page aligned")
    return gpa, npages * PAGE_SIZE, bool(attrs & MAP_GPA_ENCRYPTED)


def _msr(value, what):
    """An SNP MSR-protocol page-state change, or None for another GHCB MSR request."""
    if value & 0xFFF != GHCB_MSR_PSC_REQ:
        return None
    op = (value >> 52) & 0xF
    if op not in (PSC_PRIVATE, PSC_SHARED):
        return None                  # PSMASH / UNSMASH: no conversion
    gfn = (value >> 12) & ((1 << 40) - 1)
    return gfn * PAGE_SIZE, PAGE_SIZE, op == PSC_PRIVATE


def _trace_cmd(lines, source, events):
    """(line, source event, (gpa, bytes, private) or None) of a trace-cmd report."""
    seen_event = False
    for no, raw in lines:
        m = _TC_LINE.match(raw)
        if not m:
            if not raw.strip() or _TC_HEADER.match(raw) or not seen_event:
                continue
            raise TraceError(f"not a trace-cmd report line: {raw.strip()[:80]!r}", source=source, line=no)
        seen_event = True
        event = m.group("event").split(":")[-1]
        events[event] += 1
        body = m.group("body")
        what = f"{event} {body.strip()[:60]!r}"
        try:
            if event == "kvm_vm_set_mem_attributes":
                a = _ATTRS.match(body)
                if a:
                    yield no, event, _set_attrs([int(x, 16) for x in a.groups()], what)
                    continue
                c = _ATTRS_CNT.match(body)
                if not c:
                    raise ValueError(f"{what}: expected 'START -- END [0xATTR]'")
                gfn, cnt, attr = (int(x, 16) for x in c.groups())
                yield no, event, _set_attrs((gfn, gfn + cnt, attr), what)
            elif event == "kvm_hypercall":
                h = _HCALL.match(body)
                if not h:
                    raise ValueError(f"{what}: expected 'nr 0x.. a0 0x.. a1 0x.. a2 0x.. a3 0x..'")
                nr, a0, a1, a2, _a3 = (int(x, 16) for x in h.groups())
                if nr == KVM_HC_MAP_GPA_RANGE:
                    yield no, event, _map_gpa(a0, a1, a2, what)
            elif event == "kvm_vmgexit_msr_protocol_enter":
                x = _MSR.match(body)
                if not x:
                    raise ValueError(f"{what}: expected 'vcpu N, ghcb_gpa HEX'")
                conv = _msr(int(x.group(2), 16), what)
                if conv is not None:
                    yield no, event, conv
        except ValueError as exc:
            raise TraceError(str(exc), source=source, line=no) from None


def _bpftrace(lines, source, events):
    for no, raw in lines:
        m = _BT_LINE.match(raw)
        if not m:
            if _BT_NOISE.match(raw):
                continue
            raise TraceError("not a line of examples/gmemfast-conversions.bt ('NSECS attrs|map_gpa|"
                             f"ghcb_msr HEX...'): {raw.strip()[:80]!r}", source=source, line=no)
        kind = m.group(2)
        events[kind] += 1
        vals = [int(x, 16) for x in m.group(3).split()]
        want = {"attrs": 3, "map_gpa": 3, "ghcb_msr": 1}[kind]
        what = f"{kind} {raw.strip()[:60]!r}"
        try:
            if len(vals) != want:
                raise ValueError(f"{what}: {kind} takes {want} hexadecimal values, not {len(vals)}")
            if kind == "attrs":
                yield no, kind, _set_attrs(vals, what)
            elif kind == "map_gpa":
                yield no, kind, _map_gpa(*vals, what)
            else:
                conv = _msr(vals[0], what)
                if conv is not None:
                    yield no, kind, conv
        except ValueError as exc:
            raise TraceError(str(exc), source=source, line=no) from None


def _qemu(lines, source, events):
    for no, raw in lines:
        m = _QEMU_LINE.match(raw.strip())
        if not m:
            events["(other lines)"] += 1 if raw.strip() else 0
            continue
        event, body = m.group(3), m.group(4)
        events[event] += 1
        what = f"{event} {body.strip()[:60]!r}"
        if event == "kvm_convert_memory":
            c = _QEMU_CONVERT.match(body)
            if not c:
                raise TraceError(f"{what}: expected 'start 0x.. size 0x.. shared_to_private|private_to_shared'",
                                 source=source, line=no)
            start, size = int(c.group(1), 16), int(c.group(2), 16)
            if size == 0 or start % PAGE_SIZE or size % PAGE_SIZE:
                raise TraceError(f"{what}: start and size must be whole pages, size not 0",
                                 source=source, line=no)
            yield no, event, (start, size, c.group(3) == "shared_to_private")
        elif event == "ram_block_attributes_state_change":
            r = _QEMU_RBA.match(body)
            if not r:
                raise TraceError(f"{what}: expected \"offset 0x.. size 0x.. from '..' to "
                                 "'discarded|populated'\"", source=source, line=no)
            off, size = int(r.group(1), 16), int(r.group(2), 16)
            if size == 0 or off % PAGE_SIZE or size % PAGE_SIZE:
                raise TraceError(f"{what}: offset and size must be whole pages, size not 0",
                                 source=source, line=no)
            # an offset in the RAM block, that is in guest_memfd: marked so it is not mapped again
            yield no, event, (-1 - off, size, r.group(4) == "discarded")


_READERS = {"trace-cmd": _trace_cmd, "bpftrace": _bpftrace, "qemu": _qemu}


def _infer_size(records) -> int:
    high = [gpa + n for gpa, n, _p in records if gpa >= 0 and gpa + n > FOUR_GIB]
    if high:
        need = LOW_SPLIT + max(high) - FOUR_GIB
        return -(-need // (1 << 30)) * (1 << 30)
    ends = [gpa + n for gpa, n, _p in records if gpa >= 0 and gpa + n <= LOW_MAX]
    ends += [-1 - gpa + n for gpa, n, _p in records if gpa < 0]
    need = max(ends, default=1 << 30)
    size = -(-need // (1 << 30)) * (1 << 30)
    return size if size <= LOW_MAX else -(-need // (2 << 20)) * (2 << 20)


def _pieces(gpa: int, n: int, size: int, skipped: Counter):
    """File (offset, bytes) pieces of the GPA range [gpa, gpa+n) that are guest RAM."""
    if gpa < 0:                                   # already a guest_memfd offset
        off = -1 - gpa
        end = min(off + n, size)
        if end <= off:
            skipped["beyond the guest's memory"] += 1
            return []
        if end < off + n:
            skipped["beyond the guest's memory"] += 1
        return [(off, end - off)]
    low = low_memory(size)
    out = []
    a, b = gpa, gpa + n
    lo_a, lo_b = a, min(b, low)
    if lo_a < lo_b:
        out.append((lo_a, lo_b - lo_a))
    hole_a, hole_b = max(a, low), min(b, FOUR_GIB)
    if hole_a < hole_b:
        skipped["below 4 GiB, not guest RAM (firmware, MMIO)"] += 1
    hi_a, hi_b = max(a, FOUR_GIB), b
    if hi_a < hi_b:
        off_a, off_b = offset_of(hi_a), min(offset_of(hi_b), size)
        if off_a < off_b:
            out.append((off_a, off_b - off_a))
        if offset_of(hi_b) > size:
            skipped["beyond the guest's memory"] += 1
    return out


def parse_text(fmt: str, text: str, *, source: str = "<text>", size=None, platform=None) -> Imported:
    """Read a recording (``fmt`` one of :data:`FORMATS`) given as text."""
    if fmt not in _READERS:
        raise ValueError(f"unknown import format {fmt!r}: the formats are {', '.join(FORMATS)}")
    events: Counter = Counter()
    lines = list(enumerate(text.splitlines(), 1))
    found = list(_READERS[fmt](lines, source, events))
    by_source = Counter(src for _no, src, _c in found)
    used = next((s for s in _SOURCES[fmt] if by_source[s]), None)
    if used is None:
        want = ", ".join(_SOURCES[fmt])
        raise TraceError(f"no conversions found: a {fmt} recording needs events {want} "
                         "(examples/README.md has the recording commands)", source=source)
    records = [(no, c) for no, src, c in found if src == used]
    inferred = size is None
    if size is None:
        size = _infer_size([c for _no, c in records])
    else:
        size = parse_size(size)
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size {format_size(size)} must be a positive multiple of 4K")
    skipped: Counter = Counter()
    cols: tuple[list, list, list, list] = ([], [], [], [])
    for no, (gpa, n, private) in records:
        for off, nbytes in _pieces(gpa, n, size, skipped):
            for col, v in zip(cols, (off, nbytes, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0, no)):
                col.append(v)
    ops = OpList(source)
    if cols[0]:
        ops.add_many(CONVERT, cols[0], cols[1], cols[2], 0, cols[3])
    guest = {"size": format_size(size)}
    if platform:
        guest["platform"] = platform
    elif any(e.startswith("kvm_vmgexit") for e in events) or by_source["ghcb_msr"]:
        guest["platform"] = "snp"
    if used in ("kvm_vm_set_mem_attributes", "attrs"):
        guest["tracking"] = "legacy"          # the VMM set attributes per GFN on the VM
    ops.guest = dict(guest)
    return Imported(ops.build(), fmt, source, used, events, skipped, guest, inferred, len(lines))


def import_trace(fmt: str, path, *, size=None, platform=None) -> Imported:
    """Read a recording file (see the module docs)."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise TraceError("not a text file", source=source) from None
    return parse_text(fmt, text, source=source, size=size, platform=platform)


# ---------------------------------------------------------------------------- rendering

def _hex16(v: int) -> str:
    """printf's ``%#016llx``."""
    return f"{v:#016x}" if v else "0" * 16


def render(fmt: str, ops: TraceOps, size: int, *, platform: str = "snp", pid: int = 4242,
           start_ns: int = 1_000_000_000, step_ns: int = 37_000) -> str:
    """The conversions of ``ops`` as recorded in ``fmt``, on a guest of ``size`` bytes: how
    the examples are made (``examples/make_import_examples.py``). Deterministic."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: the formats are {', '.join(FORMATS)}")
    out = []
    if fmt == "trace-cmd":
        out.append("cpus=4")
    elif fmt == "bpftrace":
        out.append("Attaching 3 probes...")
    t = start_ns
    for i in range(len(ops)):
        if int(ops.kind[i]) != CONVERT:
            continue
        off, n, private = int(ops.offset[i]), int(ops.size[i]), bool(ops.a[i])
        low = low_memory(size)
        pieces = [(off, min(n, low - off))] if off < low else []
        if off + n > low:
            a = max(off, low)
            pieces.append((a, off + n - a))
        for o, nb in pieces:
            gpa = gpa_of(o, size)
            t += step_ns
            cpu = i % 4
            sec = f"{t // 1_000_000_000}.{t % 1_000_000_000 // 1000:06d}"
            if fmt == "trace-cmd":
                vcpu = f"       CPU {cpu}/KVM-{pid + 1 + cpu} [{cpu:03d}] ..... {sec}: "
                if platform == "snp":
                    out.append(f"{vcpu}kvm_vmgexit_enter: vcpu {cpu}, exit_reason 80000010, exit_info1 0, "
                               "exit_info2 0")
                out.append(f"{vcpu}kvm_userspace_exit: reason KVM_EXIT_HYPERCALL (2)")
                # %#016llx: the 0x counts in the width, and 0 prints without it
                out.append(f" qemu-system-x86-{pid} [{cpu:03d}] ..... {sec}: kvm_vm_set_mem_attributes: "
                           f"{_hex16(gpa >> 12)} -- {_hex16((gpa + nb) >> 12)} [0x{8 if private else 0:x}]")
            elif fmt == "bpftrace":
                out.append(f"{t} attrs {gpa >> 12:x} {(gpa + nb) >> 12:x} {8 if private else 0:x}")
            else:
                out.append(f"{pid}@{sec}:kvm_convert_memory start 0x{gpa:x} size 0x{nb:x} "
                           f"{'shared_to_private' if private else 'private_to_shared'}")
                out.append(f"{pid}@{sec}:ram_block_attributes_state_change offset 0x{o:x} size 0x{nb:x} "
                           f"from '{'populated' if private else 'discarded'}' to "
                           f"'{'discarded' if private else 'populated'}'")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- the command

def configure_cli(p) -> None:
    p.add_argument("format", choices=FORMATS, help="what recorded it: trace-cmd report text, the "
                                                   "bpftrace script's output, or QEMU's trace log")
    p.add_argument("file", metavar="FILE", help="the recording")
    p.add_argument("-o", "--output", required=True, metavar="TRACE",
                   help="the trace to write (.jsonl, or .csv)")
    p.add_argument("--size", metavar="SIZE", help="the guest's memory (default: from the highest "
                                                  "address converted)")
    p.add_argument("--platform", choices=("snp", "tdx", "sw-protected"),
                   help="the guest's platform, written into the trace's guest record")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def cli_run(args) -> int:
    import json
    import sys
    out = Path(args.output)
    if not out.parent.is_dir():
        raise ValueError(f"-o {args.output}: folder {out.parent} does not exist")
    if not Path(args.file).is_file():
        raise ValueError(f"{args.file}: no such file")
    if args.size is not None:
        try:
            parse_size(args.size)
        except ValueError as exc:
            raise ValueError(f"--size {args.size}: {exc}") from None
    res = import_trace(args.format, args.file, size=args.size, platform=args.platform)
    # write beside the target, then move it into place: no partial output file
    fd, tmp = tempfile.mkstemp(prefix=".gmemfast-import-", suffix=out.suffix or ".jsonl", dir=out.parent)
    os.close(fd)
    try:
        n = write_trace(tmp, res.ops, res.guest)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    summary = {"command": "import", **res.summary(), "output": str(out), "records": n}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    guest = ", ".join(f"{k} {v}" for k, v in res.guest.items())
    print(f"imported {len(res.ops):,} conversions from {args.file} ({args.format}: {res.used}) "
          f"into {out}")
    print(f"guest: {guest}" + (" (size from the highest address converted; --size to set it)"
                               if res.size_inferred else ""))
    other = {k: v for k, v in res.events.items() if k != res.used and v}
    if other:
        print("other events (not used): " + ", ".join(f"{k} {v:,}" for k, v in other.items()))
    if res.skipped:
        print("left out: " + ", ".join(f"{k} {v:,}" for k, v in res.skipped.items()), file=sys.stdout)
    print(f"replay it: gmemfast run {out} [--platform ...] [--tracking in-place|legacy]")
    return 0
