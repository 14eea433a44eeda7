"""The runner: the guest a scenario runs on, its operations, and the bookkeeping around
them (phases, timeline samples, errors, recording)."""
from __future__ import annotations

import errno
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np

from .. import _warm
from .. import trace as T
from .._layout import COUNTER_NAMES
from ..cost import CostModel
from ..errors import GmemError, MemoryFaultExit, MmioExit, errno_name
from ..memory import Vfio, host_memory, timeline_figures
from ..uapi import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_HUGETLB,
                    GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP, KVM_MEMORY_ATTRIBUTE_PRIVATE)
from ..units import PAGE_SHIFT, PAGE_SIZE, broadcast_column, check_range, format_size
from ..vm import VM
from ..wallclock import phase_time, wall_time
from .params import OperationFailed, ScenarioError, guest_record
from .results import ScenarioResult
from .vmm import VmmConversions, punch_error

__all__ = ["Runner", "ACCEPT_UNIT", "BATCH", "FOUR_GIB", "TWO_MIB", "ONE_GIB", "PRIVATE",
           "PROGRESS_SCALE", "private_mapping"]

FOUR_GIB = 1 << 32
TWO_MIB = 2 << 20
ONE_GIB = 1 << 30
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
BATCH = 1 << 16                 # conversions per batched call (progress granularity)
PROGRESS_SCALE = 10_000         # progress(label, done, PROGRESS_SCALE): done/total of the whole run
ACCEPT_UNIT = 4 << 20           # the guest kernel accepts in MAX_PAGE_ORDER blocks (docs/model.md §10.3)
_UNIT_PAGES = ACCEPT_UNIT >> PAGE_SHIFT
_DEMOTE = COUNTER_NAMES.index("tdx_seamcall_demote")
_SNP_PSC_ENTRIES = 64           # VMGEXIT_PSC_MAX_ENTRY: entries per page-state-change request


def _direction_runs(attrs, s: int, e: int):
    """``[a, b)`` runs of ``attrs[s:e]`` converting the same way (to private or to shared)."""
    priv = attrs[s:e] != 0
    cuts = (np.flatnonzero(priv[1:] != priv[:-1]) + 1 + s).tolist()
    bounds = [s, *cuts, e]
    return list(zip(bounds[:-1], bounds[1:]))


def private_mapping(platform: str, policy, page_order: int) -> int:
    """The level (bytes) at which the host maps private memory: ``policy`` is ``"auto"``
    (what upstream KVM does: 4 KiB on TDX, else the backing page size, at most 2 MiB on
    SNP) or a size, bounded by the backing page size (and 2 MiB on SNP)."""
    backing = PAGE_SIZE << page_order
    if policy in (None, "auto"):
        level = PAGE_SIZE if platform == "tdx" else backing
    else:
        level = min(int(policy), backing)
    if platform == "snp":
        level = min(level, TWO_MIB)
    return level


class Runner(VmmConversions):
    """The guest a scenario runs on, and the bookkeeping around its operations.

    Memory: one guest_memfd of ``size`` bytes (``gmem``), its first ``low`` bytes at GPA
    0 (memslot 0) and the rest at 4 GiB (memslot 1), as QEMU's q35 lays out RAM. All
    operation methods take byte offsets in that file. Operations that fail are counted
    by errno in ``errors``, and the first failure of each kind (operation and errno) is
    kept in ``failures`` with where it happened (``where``: the step a scenario file is
    at; a trace's file and line). ``expect`` (errno name -> count) declares the failures
    the run expects; ``strict`` raises :class:`OperationFailed` at the first failure
    beyond them.

    Progress: ``progress(label, done, total)`` is called with ``done / total`` the part
    of the whole run done so far (it never goes back) and a label naming the current
    step and its own count. Workloads mark their parts with :meth:`span` / :meth:`part`.
    """

    def __init__(self, params: dict, cost_model: CostModel, *, progress=None, record=False,
                 strict=False, expect=None):
        self.p = params
        self.cost = cost_model
        self.progress_cb = progress
        self.strict = strict
        self.expect = None if expect is None else dict(expect)
        self.failures: dict[tuple[str, str], dict] = {}
        self.where = ""
        self._span = (0.0, 1.0, "")     # the current part of the run's progress: start, width, label
        self._pos = 0.0
        self.in_place = params["tracking"] == "in-place"
        self.platform = params["platform"]
        self.size = params["size"]
        self.order = params["page_order"]
        self.vm = VM(self.platform, in_place=self.in_place, direct_map=params["direct_map"],
                     merge=params["merge"])
        flags = GUEST_MEMFD_FLAG_MMAP if (self.in_place or self.platform == "sw-protected") else 0
        if self.order:
            flags |= GUEST_MEMFD_FLAG_HUGETLB
        if params["direct_map"] == "no-direct-map":
            flags |= GUEST_MEMFD_FLAG_NO_DIRECT_MAP
        self.gmem = self.vm.create_guest_memfd(self.size, flags, page_order=self.order)
        self.low = self.size if self.size <= 0xB0000000 else 2 << 30
        self.vm.set_user_memory_region(0, 0, self.low, self.gmem, 0)
        if self.size > self.low:
            self.vm.set_user_memory_region(1, FOUR_GIB, self.size - self.low, self.gmem, self.low)
        self.rng = np.random.default_rng(params["seed"])
        self.mapping = private_mapping(self.platform, params.get("private_mapping", "auto"), self.order)
        self.prefault = bool(params.get("prefault", False))
        # the VMM's side (docs/model.md §13): device assignment and what it discards
        self.vfio = Vfio(self.vm) if params.get("vfio") else None
        auto = not self.in_place           # QEMU discards the other side in legacy mode
        ds, dp = params.get("discard_on_share"), params.get("discard_on_private")
        self.discard_on_share = auto if ds is None else bool(ds)
        self.discard_on_private = auto if dp is None else bool(dp)
        self._unit_pages = np.zeros(-(-self.gmem.nr_pages // _UNIT_PAGES), np.int32)
        self.errors: Counter = Counter()
        self.steps = 0
        self.timeline: list[dict] = []
        self.marks: list[dict] = []
        self.extra: dict = {}
        self.phase_name: str | None = None
        self._phase_counts: dict[str, np.ndarray] = {}
        self._phase_threads: dict[str, int] = {}
        self._bounds: dict[str, dict[str, float]] = {}
        self._extra_counts = np.zeros(len(COUNTER_NAMES), np.int64)
        self._ns = np.array([cost_model.ns_per_unit.get(n, 0.0) for n in COUNTER_NAMES])
        self._phase_start = self._snap()
        self._t0 = time.perf_counter()
        self._compile0 = _warm.compile_seconds()
        self.ops = T.OpList("<scenario>") if record else None
        self.source = "<trace>"        # the trace being applied (failures name its lines)
        self._pins: dict[str, list] = {}
        self.phase("setup")

    # ------------------------------------------------------------ bookkeeping
    def _snap(self) -> np.ndarray:
        return np.fromiter(self.vm.counters.values(), np.int64, len(COUNTER_NAMES)) + self._extra_counts

    def mark(self, label: str) -> None:
        """Mark the start of a stage of the run (plots draw it at the current step)."""
        self.marks.append({"step": self.steps, "label": label})

    def counts_now(self) -> dict[str, int]:
        """Every counter's total so far, the scenario's own (:meth:`count`) included."""
        return dict(zip(COUNTER_NAMES, self._snap().tolist()))

    def count(self, counter: str, n: int = 1) -> None:
        """Add work the scenario does outside the model's API (a guest exit, say)."""
        self._extra_counts[COUNTER_NAMES.index(counter)] += n

    def phase(self, name: str, threads: int = 1) -> None:
        """Report the work that follows under operation ``name``, run on ``threads``
        threads (the guest vCPUs that really do it, or the VMM's threads)."""
        if name == self.phase_name:
            self._phase_threads[name] = max(1, int(threads))
            return
        now = self._snap()
        if self.phase_name is not None:
            d = now - self._phase_start
            if self._phase_threads.get(self.phase_name, 1) > 1 and d[_DEMOTE]:
                # a split with other vCPUs in the TD is refused once with TDX_OPERAND_BUSY
                # and retried after kicking them out (docs/model.md §4.9)
                self.count("tdx_busy_retries", int(d[_DEMOTE]))
                now = self._snap()
                d = now - self._phase_start
            acc = self._phase_counts.get(self.phase_name)
            self._phase_counts[self.phase_name] = d if acc is None else acc + d
        self._phase_start = now
        self.phase_name = name
        self._phase_threads[name] = max(1, int(threads))
        if self.ops is not None:
            self.ops.add(T.PHASE, a=self.ops.name(name))

    def bound(self, name: str, ns: float) -> None:
        """The current phase lasts at least ``ns``, for a reason that is not work: its I/O
        on the device, say (``name`` is what the result says limits it; docs/model.md
        §10.1). A later call for the same name replaces it."""
        self._bounds.setdefault(self.phase_name, {})[name] = float(ns)

    def _wall_so_far(self, now: np.ndarray) -> float:
        """Estimated wall time of the work so far (docs/model.md §10), in ns."""
        names = COUNTER_NAMES
        phases = dict(self._phase_counts)
        if self.phase_name is not None:
            d = now - self._phase_start
            phases[self.phase_name] = d if self.phase_name not in phases else phases[self.phase_name] + d
        total = 0.0
        for ph, vec in phases.items():
            counts = {names[i]: int(vec[i]) for i in np.flatnonzero(vec)}
            total += phase_time(self.cost, counts, self._phase_threads.get(ph, 1),
                                external=self._bounds.get(ph)).wall_ns
        return total

    def progress(self, label: str, done: int, total: int) -> None:
        """Report ``done`` of ``total`` of the current part of the run (see :meth:`span`)."""
        if self.progress_cb is None:
            return
        start, width, prefix = self._span
        frac = min(1.0, done / total) if total else 1.0
        self._pos = max(self._pos, min(1.0, start + width * frac))
        text = f"{label} {done:,}/{total:,}" if total else label
        self.progress_cb(f"{prefix}: {text}" if prefix else text, round(self._pos * PROGRESS_SCALE),
                         PROGRESS_SCALE)

    @contextmanager
    def span(self, lo: float, hi: float, label: str = ""):
        """The work inside is the fraction [lo, hi) of the current part of the run's progress
        (parts nest); ``label`` names it in the progress line."""
        start, width, prefix = saved = self._span
        label = f"{prefix}, {label}" if prefix and label else (prefix or label)
        self._span = (start + width * lo, width * (hi - lo), label)
        try:
            yield
        finally:
            self._span = saved
            if self.progress_cb is not None:
                self._pos = max(self._pos, min(1.0, start + width * hi))
                self.progress_cb(label or "running", round(self._pos * PROGRESS_SCALE), PROGRESS_SCALE)

    def part(self, k: int, n: int, label: str = ""):
        """Part ``k`` (from 0) of ``n`` equal parts of the current span: ``with run.part(...)``."""
        return self.span(k / n, (k + 1) / n, label)

    def sample(self) -> None:
        """Append a timeline sample of the current state."""
        g = self.gmem
        dm = g.direct_map_entries()
        snap = self._snap()
        self.timeline.append({
            "step": self.steps,
            "phase": self.phase_name,
            "huge_pages": g.huge_folios(),
            "dmap_1g": dm["1G"], "dmap_2m": dm["2M"], "dmap_4k": dm["4K"],
            "private_pages": self.private_pages(),
            "allocated_pages": g.allocated_pages(),
            **timeline_figures(self.vm, self.vfio),
            "est_ns": float(snap @ self._ns),
            "wall_ns": self._wall_so_far(snap),
            "wall_s": self.run_seconds(),
        })

    def run_seconds(self) -> float:
        """The model's run time so far: since the guest was set up, leaving out any first
        compile of kernels the run needed part way (``_warm.compile_seconds``)."""
        return time.perf_counter() - self._t0 - (_warm.compile_seconds() - self._compile0)

    def memory(self) -> dict:
        """The guest's host memory now (docs/model.md §13; ``gmemfast.memory``)."""
        return host_memory(self.vm, mapping=self.mapping, vfio=self.vfio,
                           discard_on_share=self.discard_on_share,
                           discard_on_private=self.discard_on_private)

    def is_private(self, off: int, size: int) -> bool:
        """Every page of the file range is private (per the mode's source of truth)."""
        if self.in_place:
            return self.gmem.is_private(off, size)
        return all(self.vm.private_gfns(g, n) == n >> PAGE_SHIFT for g, n in self._gpa_pieces(off, size))

    def private_pages(self) -> int:
        """Private pages of guest memory per the mode's source of truth."""
        if self.in_place:
            return self.gmem.private_pages()
        return sum(self.vm.private_gfns(gpa, size) for gpa, _off, size in self._slots())

    def _fail(self, exc: Exception, op: str, offset: int, size: int, line: int = 0) -> None:
        """Count a failed operation (an exception from the model)."""
        code = getattr(exc, "errno", None)
        name = errno_name(code) if code else type(exc).__name__
        eoff = getattr(exc, "error_offset", None)
        if eoff is None and isinstance(exc, (MemoryFaultExit, MmioExit)):
            eoff = self.offset_of(exc.gpa)
        self.failed(op, name, offset, size, line=line, error_offset=eoff, message=str(exc))

    def failed(self, op: str, name: str, offset: int, size: int, *, line: int = 0, error_offset=None,
               message: str = "", count: int = 1) -> None:
        """Count ``count`` failed ``op`` operations of kind ``name`` (an errno name); keep the
        first of each kind with where it happened."""
        self.errors[name] += count
        key = (op, name)
        first = self.failures.get(key)
        if first is not None:
            first["count"] += count
        else:
            where = f"{self.source}:{line}" if line else (self.where or f"operation {self.phase_name}")
            first = self.failures[key] = {
                "errno": name, "op": op, "count": count, "where": where, "offset": int(offset),
                "size": int(size), "error_offset": None if error_offset is None else int(error_offset),
                "message": message}
        if self.strict and self.errors[name] > (self.expect or {}).get(name, 0):
            eo = first["error_offset"]
            raise OperationFailed(
                f"{first['where']}: {op} [{int(offset):#x}, +{int(size):#x}) failed: "
                + (message or name) + (f" (at {eo:#x})" if eo is not None and "error_offset" not in message
                                       else ""))

    # ------------------------------------------------------------ address layout
    def _slots(self):
        """(gpa, file offset, size) of the guest memory's memslots."""
        out = [(0, 0, self.low)]
        if self.size > self.low:
            out.append((FOUR_GIB, self.low, self.size - self.low))
        return out

    def gpa(self, off: int) -> int:
        return off if off < self.low else FOUR_GIB + off - self.low

    def offset_of(self, gpa: int) -> int:
        return gpa if gpa < self.low else gpa - FOUR_GIB + self.low

    def _gpa_pieces(self, off: int, size: int):
        """(gpa, size) pieces of the file range [off, off+size)."""
        out = []
        for gpa, o, n in self._slots():
            a, b = max(off, o), min(off + size, o + n)
            if a < b:
                out.append((gpa + a - o, b - a))
        return out

    def resolve(self, off: int, size: int) -> int:
        return self.size - off if size == T.ALL else size

    # ------------------------------------------------------------ operations
    def convert_many(self, offs, sizes, attrs, flags=0, *, exits=False, lines=None,
                     label="converting") -> np.ndarray:
        """Conversions in order (batched); returns the errno per item.

        ``exits``: each is a guest request and costs one guest exit. ``label`` names the
        progress of a long batch (``None``: report none, the caller does).
        """
        offs = np.ascontiguousarray(offs, np.int64)
        n = len(offs)
        sizes = broadcast_column(np.asarray(sizes, np.int64), n, "sizes")
        if (sizes == T.ALL).any():
            sizes = np.where(sizes == T.ALL, self.size - offs, sizes)
        attrs = broadcast_column(np.asarray(attrs, np.int64), n, "attrs")
        flags = broadcast_column(np.asarray(flags, np.int64), n, "flags")
        if self.ops is not None:
            self.ops.add_many(T.CONVERT, offs, sizes, attrs, flags)
        if exits:
            self.count("guest_exits", n)
        errs = np.zeros(n, np.int32)
        if not self.in_place:
            return self._legacy_convert_many(offs, sizes, attrs, lines, label)
        eoffs = np.full(n, -1, np.int64)
        step = BATCH
        hooks = self.vfio is not None or self.discard_on_share or self.discard_on_private
        for s in range(0, n, step):
            e = min(n, s + step)
            for a, b in (_direction_runs(attrs, s, e) if hooks else ((s, e),)):
                undo = self._before_convert(offs[a:b], sizes[a:b], attrs[a]) if hooks else None
                res = self.gmem.set_memory_attributes_many(
                    offs[a:b], np.ascontiguousarray(sizes[a:b]), np.ascontiguousarray(attrs[a:b]),
                    np.ascontiguousarray(flags[a:b]))
                errs[a:b] = res.errno
                eoffs[a:b] = res.error_offset
                if hooks:
                    self._after_convert(offs[a:b], sizes[a:b], attrs[a], flags[a:b], res.errno, undo)
            self.steps += e - s
            if n > step and label is not None:
                self.progress(label, e, n)
        bad = np.flatnonzero(errs)
        if len(bad):
            codes, first, counts = np.unique(errs[bad], return_index=True, return_counts=True)
            for k in np.argsort(first):        # in the order they first happened
                i = int(bad[first[k]])
                name = errno_name(int(codes[k]))
                eo = int(eoffs[i])
                self.failed("convert", name, int(offs[i]), int(sizes[i]),
                            line=int(lines[i]) if lines is not None else 0,
                            error_offset=eo if eo >= 0 else None, count=int(counts[k]),
                            message=f"{name}: converting to {'private' if attrs[i] else 'shared'}")
        return errs

    def convert(self, off: int, size: int, attrs: int, flags: int = 0, *, exits=False) -> int:
        return int(self.convert_many([off], size, attrs, flags, exits=exits)[0])

    def set_private_all(self) -> None:
        """Legacy tracking: the VMM marks all guest memory private at startup (QEMU's
        kvm_set_memory_attributes_private for each guest_memfd RAM block)."""
        for gpa, _off, size in self._slots():
            self.vm.set_memory_attributes(gpa, size, PRIVATE)
            self.steps += 1

    def allocate(self, off: int, size: int, line: int = 0) -> None:
        size = self.resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.ALLOCATE, off, size)
        self.steps += 1
        try:
            self.gmem.fallocate(FALLOC_FL_KEEP_SIZE, off, size)
        except GmemError as exc:
            self._fail(exc, "allocate", off, size, line)

    def punch(self, off: int, size: int, line: int = 0) -> None:
        size = self.resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.PUNCH, off, size)
        self.steps += 1
        try:
            self.gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, size)
        except GmemError as exc:
            self._fail(exc, "punch", off, size, line)

    def punch_many(self, offs, size: int) -> None:
        """Punch holes over many ranges (in order, one batched call)."""
        offs = np.ascontiguousarray(offs, np.int64)
        if self.ops is not None:
            self.ops.add_many(T.PUNCH, offs, size, 0, 0)
        self.steps += len(offs)
        r = self.gmem.fallocate_many(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offs, size)
        for i in np.flatnonzero(r.errno).tolist():
            off = int(offs[i])
            self._fail(punch_error(int(r.errno[i]), off, size, int(r.error_offset[i])), "punch", off, size)

    def write(self, off: int, size: int, fill: int = T.DEFAULT_FILL, line: int = 0, data=None) -> None:
        """The host writes through its mmap (``data``, or ``size`` bytes of ``fill``)."""
        size = self.resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.WRITE, off, size, fill)
        self.steps += 1
        try:
            if data is None:
                if size > T.HOST_ACCESS_MAX:
                    raise GmemError(errno.EINVAL, f"host write of {format_size(size)}: the model keeps "
                                                  "written bytes; write at most 256M at once")
                data = bytes([fill]) * size
            self.gmem.host_write(off, data)
        except GmemError as exc:
            self._fail(exc, "write", off, size, line)

    def read(self, off: int, size: int, line: int = 0) -> None:
        size = self.resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.READ, off, size)
        self.steps += 1
        try:
            if size > T.HOST_ACCESS_MAX:
                raise GmemError(errno.EINVAL, f"host read of {format_size(size)}: read at most 256M at once")
            self.gmem.host_read(off, size)
        except GmemError as exc:
            self._fail(exc, "read", off, size, line)

    def pin(self, off: int, size: int, pin_id: str, line: int = 0) -> None:
        if self.ops is not None:
            self.ops.add(T.PIN, off, size, self.ops.name(pin_id))
        self.steps += 1
        try:
            self._pins.setdefault(pin_id, []).append(self.gmem.pin(off, size))
        except GmemError as exc:
            self._fail(exc, "pin", off, size, line)

    def unpin(self, pin_id: str, line: int = 0) -> None:
        if self.ops is not None:
            self.ops.add(T.UNPIN, a=self.ops.name(pin_id), b=1)
        self.steps += 1
        held = self._pins.get(pin_id)
        if not held:
            self._fail(GmemError(errno.EINVAL, f"unpin: no pin {pin_id!r} is held"), "unpin", 0, 0, line)
            return
        held.pop().release()

    def accept(self, off: int, size: int, chunk: int = TWO_MIB, *, line: int = 0, slices: int = 1,
               label: str = "accepting") -> int:
        """The guest accepts (TDX) / validates (SNP) private memory, ``chunk`` at a time.

        An unaligned head or tail is accepted at 4 KiB, as a guest does. ``slices`` splits
        the work into that many calls (for progress and the timeline).
        """
        size = self.resolve(off, size)
        try:
            check_range(off, size, self.size, "accept")
        except GmemError as exc:
            if self.ops is not None:
                self.ops.add(T.ACCEPT, off, size, chunk)
            self._fail(exc, "accept", off, size, line)
            return 0
        pieces = []
        for gpa, n in self._gpa_pieces(off, size):
            a, b = gpa, gpa + n
            ca, cb = -(-a // chunk) * chunk, b // chunk * chunk
            if ca >= cb:
                pieces.append((a, b - a, PAGE_SIZE))
                continue
            if a < ca:
                pieces.append((a, ca - a, PAGE_SIZE))
            step = max(chunk, -(-(cb - ca) // max(1, slices)) // chunk * chunk)
            for s in range(ca, cb, step):
                pieces.append((s, min(step, cb - s), chunk))
            if cb < b:
                pieces.append((cb, b - cb, PAGE_SIZE))
        done = 0
        total = sum(n for _g, n, _c in pieces)
        for gpa, n, c in pieces:
            if self.ops is not None:       # one record per call made, so a replay does the same
                self.ops.add(T.ACCEPT, self.offset_of(gpa), n, c)
            try:
                self.vm.guest_accept(gpa, n, chunk=c, mapping=self.mapping, prefault=self.prefault)
            except (GmemError, MemoryFaultExit, MmioExit) as exc:
                self._fail(exc, "accept", self.offset_of(gpa), n, line)
            self.steps += n // c
            done += n
            if slices > 1:
                self.progress(label, done, total)
                self.sample()
        return done

    def accept_many(self, offs, size: int, chunk: int = PAGE_SIZE, *, label="accepting",
                    just_converted=False) -> None:
        """The guest accepts many small ranges (after converting them back to private), in
        order, through ``VM.guest_accept_many``. Failed items are counted as
        :meth:`accept` counts them. (``just_converted`` is accepted for callers that know
        the ranges are private; the batched form needs no hint.)"""
        offs = np.asarray(offs, np.int64)
        if self.ops is not None:
            self.ops.add_many(T.ACCEPT, offs, size, chunk, 0)
        n = len(offs)
        step = max(BATCH, -(-n // 200))
        gpas = np.where(offs < self.low, offs, FOUR_GIB + offs - self.low)
        within = (offs < self.low) == (offs + size <= self.low)
        for s in range(0, n, step):
            e = min(n, s + step)
            r = self.vm.guest_accept_many(gpas[s:e], size, chunk=chunk, mapping=self.mapping,
                                          prefault=self.prefault)
            for i in np.flatnonzero(r.errno | ~within[s:e]).tolist():
                off = int(offs[s + i])
                try:        # alone: the exit or error it raises, or over the 2 GiB hole, in pieces
                    pieces = [(int(gpas[s + i]), size)] if within[s + i] else self._gpa_pieces(off, size)
                    for gpa, nbytes in pieces:
                        self.vm.guest_accept(gpa, nbytes, chunk=chunk, mapping=self.mapping,
                                             prefault=self.prefault)
                except (GmemError, MemoryFaultExit, MmioExit) as exc:
                    self._fail(exc, "accept", off, size)
            if n > 5000 and label is not None:
                self.progress(label, e, n)
        self.steps += n * -(-size // chunk)       # each chunk accepted is one operation

    def accept_units(self, off: int, size: int, chunk: int = TWO_MIB, *, slices: int = 1,
                     label: str = "accepting", kernel: bool = True) -> tuple[int, int]:
        """The guest accepts ``[off, off+size)`` as its kernel's accept_memory() does: in
        units of :data:`ACCEPT_UNIT`, ``chunk`` at a time. Besides the accept itself it
        counts, per unit with pages still to accept, one ``accept_memory_calls`` (not for
        the firmware: ``kernel=False``); on SNP the page-state-change requests (an exit to
        the VMM, which sets the range private); with ``prefault`` the VMM's
        KVM_PRE_FAULT_MEMORY calls (docs/model.md §10.3). Returns (units, pages) newly
        accepted."""
        if size <= 0:
            return 0, 0
        calls, pages = self._take_units(off, size)
        self.accept(off, size, chunk, slices=slices, label=label)
        if calls and self.platform in ("snp", "tdx"):
            if kernel:
                self.count("accept_memory_calls", calls)
            requests = calls
            if self.platform == "snp":
                # the guest asks for private first: entries of the chunk's size, at most
                # 64 per request; KVM passes each to the VMM (KVM_HC_MAP_GPA_RANGE)
                requests = calls * -(-_UNIT_PAGES // (_SNP_PSC_ENTRIES * (chunk >> PAGE_SHIFT)))
                self.count("guest_exits", requests)
                if self.in_place:
                    self.count("convert_calls", requests)
                    self.count("convert_noop", requests)
                else:
                    self.count("vm_attr_calls", requests)
            if self.prefault:
                self.count("prefault_calls", requests)
        return calls, pages

    def mark_accepted(self, off: int, size: int) -> None:
        """Record ``[off, off+size)`` as accepted without accept_memory() (launch pages
        are accepted from the start)."""
        self._take_units(off, size)

    def _take_units(self, off: int, size: int) -> tuple[int, int]:
        """Book ``[off, off+size)`` as accepted: (units that had pages left, new pages)."""
        p0, p1 = off >> PAGE_SHIFT, (off + size) >> PAGE_SHIFT
        u0, u1 = p0 // _UNIT_PAGES, -(-p1 // _UNIT_PAGES)
        first = np.arange(u0, u1, dtype=np.int64) * _UNIT_PAGES
        full = np.minimum(first + _UNIT_PAGES, self.gmem.nr_pages) - first
        take = np.minimum(first + _UNIT_PAGES, p1) - np.maximum(first, p0)
        done = self._unit_pages[u0:u1]
        after = np.minimum(done + take, full)
        calls = int(np.count_nonzero(after > done))
        pages = int((after - done).sum())
        self._unit_pages[u0:u1] = after
        return calls, pages

    # ------------------------------------------------------------ trace replay
    def apply(self, ops: T.TraceOps, *, label="replaying") -> None:
        """Apply recorded operations in order; runs of conversions go in one batch."""
        kind = ops.kind
        n = len(kind)
        conv = kind == T.CONVERT
        i = 0
        src = self.source = ops.source
        while i < n:
            k = int(kind[i])
            line = int(ops.line[i])
            try:
                if k == T.CONVERT:
                    # the run of consecutive conversions starting here
                    rest = np.flatnonzero(~conv[i:])
                    j = i + (int(rest[0]) if len(rest) else n - i)
                    j = min(j, i + BATCH)
                    self.convert_many(ops.offset[i:j], ops.size[i:j], ops.a[i:j], ops.b[i:j],
                                      lines=ops.line[i:j], label=label)
                    self.progress(label, j, n)
                    i = j
                    continue
                off, size, a = int(ops.offset[i]), int(ops.size[i]), int(ops.a[i])
                if k == T.PHASE:
                    self.phase(ops.names[a])
                elif k == T.ALLOCATE:
                    self.allocate(off, size, line)
                elif k == T.PUNCH:
                    self.punch(off, size, line)
                elif k == T.WRITE:
                    self.write(off, size, a, line)
                elif k == T.READ:
                    self.read(off, size, line)
                elif k == T.PIN:
                    self.pin(off, size, ops.names[a], line)
                elif k == T.UNPIN:
                    self.unpin(ops.names[a], line)
                elif k == T.ACCEPT:
                    self.accept(off, size, a, line=line)
            except ScenarioError as exc:
                raise ScenarioError(f"{src}: {exc}") from None
            i += 1
            if i % 4096 == 0:
                self.progress(label, i, n)
                if i % (1 << 16) == 0:
                    self.sample()
        self.progress(label, n, n)

    # ------------------------------------------------------------ the result
    def finish(self, scn_name: str, description: str) -> ScenarioResult:
        self.phase("(end)")          # closes the last phase
        self.sample()
        total = self._snap()
        names = COUNTER_NAMES
        phases = {}
        for ph, d in self._phase_counts.items():
            counts = {names[i]: int(d[i]) for i in np.flatnonzero(d)}
            if counts or self._bounds.get(ph):
                phases[ph] = counts
        totals = {names[i]: int(total[i]) for i in np.flatnonzero(total)}
        est = self.cost.estimate(totals, by_operation=phases) if phases else self.cost.estimate(totals)
        threads = {ph: self._phase_threads.get(ph, 1) for ph in est.by_operation}
        wall = wall_time(self.cost, {ph: e.counts for ph, e in est.by_operation.items()}
                         if est.by_operation else {"(all)": est.counts}, threads, external=self._bounds)
        g = self.gmem
        dm = g.direct_map_entries()
        blocks = self.size >> (PAGE_SHIFT + self.order) if self.order else 0
        private = self.private_pages()
        summary = {
            "guest_size": self.size,
            "guest_pages": g.nr_pages,
            "private_pages": private,
            "shared_pages": g.nr_pages - private,
            "allocated_pages": g.allocated_pages(),
            "huge_pages_left": g.huge_folios(),
            "huge_pages_max": blocks,
            "direct_map": dm,
            "direct_map_entries": dm["1G"] + dm["2M"] + dm["4K"],
            "direct_map_4k_bytes": dm["4K"] * PAGE_SIZE,
            "attribute_ranges": g.attribute_ranges if self.in_place else self.vm.attribute_ranges(),
            "operations": self.steps,
            "errors": dict(self.errors),
            "failures": list(self.failures.values()),
            "expected_errors": self.expect,
            "errors_as_expected": dict(self.errors) == (self.expect or {}),
            "state_bytes": g.memory_footprint(),
        }
        if self.ops is not None:
            self.ops.guest = guest_record(self.p)
            self.ops.expect = self.expect
        res = ScenarioResult(scn_name, description, dict(self.p), phases, totals, est,
                             self.timeline, summary, self.extra, self.run_seconds(),
                             self.ops.build() if self.ops is not None else None, wall=wall)
        res.marks = list(self.marks)
        res.memory = self.memory()
        return res
