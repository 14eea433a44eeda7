"""Ready-made workloads, user scenario files and trace replay, with costs per operation.

A scenario builds a VM and its guest memory (one guest_memfd, laid out like QEMU's q35:
the first 2 GiB at GPA 0, the rest at 4 GiB), runs a workload against it through the
model's public API, and returns a :class:`ScenarioResult`: the work counters per phase
("operation") and in total, their estimated time under a cost profile, a timeline of
samples (huge pages left, direct-map entries by size, private pages, estimated time so
far) and a summary.

Built-in scenarios (``SCENARIOS``; ``gmemfast scenarios`` lists them):

``boot``
    Launch firmware and a kernel image (in place or legacy flow, measured on SNP/TDX),
    then the guest accepts all its memory in 2 MiB or 4 KiB chunks, then converts its
    SWIOTLB bounce-buffer region to shared.
``swiotlb-churn``
    Bounce-buffer pages converted to shared and back at 4 KiB, a few in flight at once.
``fragmentation``
    Random 4 KiB conversions to shared over memory backed by 1 GiB pages, each page going
    back to private later: how many huge pages survive and how the direct map fragments.
``balloon``
    A balloon inflates (punches holes in guest memory) and deflates (the guest accepts
    the pages again), round after round.

Every scenario takes the common parameters (:data:`COMMON_PARAMS`: size, platform,
page_order, direct_map, tracking, flow, merge, seed) plus its own. ``tracking`` is the
attribute-tracking mode: ``in-place`` (per file, ``KVM_SET_MEMORY_ATTRIBUTES2`` on the
guest_memfd) or ``legacy`` (per GFN on the VM; then, like QEMU, the VMM punches the
guest_memfd range when the guest converts it to shared). ``flow`` is the populate flow
of the launch (``in-place`` needs in-place tracking).

Conversions the guest asks for (SWIOTLB, churn, fragmentation) cost the guest one exit
to the VMM each (``guest_exits``), on top of what the conversion ioctl counts.

Large workloads go through the batched API (``set_memory_attributes_many``) in chunks,
reporting progress through a callback ``progress(label, done, total)``.

Users describe their own workloads in TOML scenario files (:func:`load_scenario_file`;
the schema is in ``examples/README.md``) or replay operation traces
(:mod:`gmemfast.trace`).
"""
from __future__ import annotations

import errno
import math
import os
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import trace as T
from ._layout import COUNTER_NAMES
from .cost import CostModel, Estimate
from .errors import GmemError, MemoryFaultExit, MmioExit
from .gmem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_HUGETLB,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
)
from .units import PAGE_SHIFT, PAGE_SIZE, format_size, parse_size
from .vm import VM

__all__ = [
    "COMMON_PARAMS",
    "Param",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "SCENARIOS",
    "Runner",
    "get_scenario",
    "load_scenario_file",
    "resolve_params",
    "run_scenario",
    "run_trace",
]

FOUR_GIB = 1 << 32
TWO_MIB = 2 << 20
ONE_GIB = 1 << 30
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
BATCH = 1 << 16                 # conversions per batched call (progress granularity)
TIMELINE_POINTS = 100           # about this many samples per long phase
KERNEL_GPA = 16 << 20           # LOAD_PHYSICAL_ADDR of x86-64 kernels


class ScenarioError(ValueError):
    """A scenario, its parameters or a scenario file is wrong (the message says how)."""


# ============================================================================ parameters

def _parse_size_param(value) -> int:
    n = parse_size(value)
    if n <= 0:
        raise ValueError(f"size must be positive, not {value!r}")
    return n


def _parse_order(value) -> int:
    named = {"4K": 0, "2M": 9, "1G": 18}
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        if text in named:
            return named[text]
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or value not in (0, 9, 18):
        raise ValueError(f"page order {value!r} must be 0 (4K), 9 (2M) or 18 (1G)")
    return int(value)


def _parse_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text, 0)
        except ValueError:
            try:
                f = float(text)          # 1e6
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
    raise ValueError(f"expected an integer, not {value!r}")


def _parse_count(value) -> int:
    n = _parse_int(value)
    if n < 0:
        raise ValueError(f"expected a count >= 0, not {value!r}")
    return n


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def _parse_granule(value) -> int:
    n = parse_size(value)
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"granule {value!r} must be a positive multiple of 4K")
    return n


def _parse_chunk(value) -> int:
    n = parse_size(value)
    if n not in (PAGE_SIZE, TWO_MIB):
        raise ValueError(f"chunk {value!r} must be 4K or 2M (the guest accepts 4 KiB or 2 MiB pages)")
    return n


def _parse_size_or_auto(value):
    if isinstance(value, str) and value.strip().lower() in ("auto", "all"):
        return value.strip().lower()
    n = parse_size(value)
    if n < 0 or n % PAGE_SIZE:
        raise ValueError(f"{value!r} must be a multiple of 4K (or 'auto')")
    return n


def _parse_size_or_percent(value):
    """``"25%"`` -> 0.25 (a fraction of the guest), else a size in bytes."""
    if isinstance(value, str) and value.strip().endswith("%"):
        f = float(value.strip()[:-1]) / 100
        if not 0 < f <= 1:
            raise ValueError(f"{value!r}: a percentage must be in (0, 100]")
        return f
    n = parse_size(value)
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"{value!r} must be a positive multiple of 4K or a percentage like '25%'")
    return n


def _choice(*choices):
    def parse(value):
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text
    parse.choices = choices
    return parse


def _optional_choice(*choices):
    inner = _choice(*choices)

    def parse(value):
        if value is None or str(value).strip().lower() in ("", "auto", "default"):
            return None
        return inner(value)
    parse.choices = choices
    return parse


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "auto"
    if isinstance(value, float):
        return f"{value * 100:g}%"
    return str(value)


@dataclass(frozen=True)
class Param:
    """One scenario parameter: ``parse`` turns text (CLI) or a TOML value into its type."""
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    size_like: bool = False          # shown with format_size

    @property
    def choices(self):
        return getattr(self.parse, "choices", None)

    def show(self, value) -> str:
        if self.size_like and isinstance(value, int) and not isinstance(value, bool):
            return format_size(value) if value else "0"
        return _show(value)


COMMON_PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("size", _parse_size_param, 64 << 30, "guest memory size (4G, 512G, 4T: binary units)", True),
    Param("platform", _choice("snp", "tdx", "sw-protected"), "snp", "VM type"),
    Param("page_order", _parse_order, 0, "backing page order: 0 (4K), 9 (2M hugetlb), 18 (1G hugetlb)"),
    Param("direct_map", _choice("keep", "no-direct-map", "on-conversion"), "keep",
          "direct-map policy"),
    Param("tracking", _choice("in-place", "legacy"), "in-place",
          "attribute tracking: per guest_memfd (in-place) or per GFN on the VM (legacy)"),
    Param("flow", _optional_choice("in-place", "legacy"), None,
          "launch populate flow (default: same as tracking; in-place needs in-place tracking)"),
    Param("merge", _choice("eager", "never"), "eager", "huge-page re-merge on conversion to private"),
    Param("seed", _parse_int, 0, "random seed"),
)}


@dataclass(frozen=True)
class Scenario:
    """A named workload: ``func(runner, params)`` with its own parameters and defaults."""
    name: str
    description: str
    func: Callable
    params: dict                      # scenario-specific Param by name
    defaults: dict                    # overrides of the common defaults
    doc: str = ""

    def all_params(self) -> dict:
        out = {}
        for name, p in COMMON_PARAMS.items():
            if name in self.defaults:
                p = Param(p.name, p.parse, self.defaults[name], p.help, p.size_like)
            out[name] = p
        out.update(self.params)
        return out


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, description: str, params=(), defaults=None):
    """Register a scenario function ``func(runner, params)``."""
    def register(func):
        SCENARIOS[name] = Scenario(name, description, func, {p.name: p for p in params},
                                   dict(defaults or {}), (func.__doc__ or "").strip())
        return func
    return register


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        import difflib
        close = difflib.get_close_matches(name, SCENARIOS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ScenarioError(f"unknown scenario {name!r}{hint}: the scenarios are "
                            f"{', '.join(SCENARIOS)}, or give a .toml scenario file or a "
                            ".csv/.jsonl trace") from None


def resolve_params(scn: Scenario, given: dict | None = None) -> dict:
    """Defaults plus ``given`` (raw values), each parsed and checked; ScenarioError if bad."""
    spec = scn.all_params()
    given = dict(given or {})
    unknown = [k for k in given if k not in spec]
    if unknown:
        raise ScenarioError(f"scenario {scn.name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                            f"its parameters are {', '.join(spec)}")
    out = {}
    for name, p in spec.items():
        if name in given and given[name] is not None:
            try:
                out[name] = p.parse(given[name])
            except (ValueError, TypeError) as exc:
                raise ScenarioError(f"parameter {name}: {exc}") from None
        else:
            out[name] = p.default
    _check_common(out)
    return out


def _check_common(p: dict) -> None:
    if p["flow"] is None:
        p["flow"] = p["tracking"]
    if p["flow"] == "in-place" and p["tracking"] == "legacy":
        raise ScenarioError("flow 'in-place' needs tracking 'in-place': a legacy VM cannot "
                            "host-map guest_memfd to load it while shared")
    unit = PAGE_SIZE << p["page_order"]
    if p["size"] % unit:
        raise ScenarioError(f"size {format_size(p['size'])} is not a multiple of the backing "
                            f"page size {format_size(unit)}")


# ============================================================================ results

@dataclass
class ScenarioResult:
    """What a scenario did and what it would cost.

    ``phases`` maps each operation (phase) to its counter deltas; ``counters`` is the
    total; ``estimate`` prices both (``estimate.by_operation`` per phase). ``timeline``
    is a list of samples (dicts: step, phase, huge_pages, dmap_1g, dmap_2m, dmap_4k,
    private_pages, allocated_pages, est_ns, wall_s); ``summary`` holds the final state;
    ``extra`` what a scenario adds (a launch measurement, say). ``ops`` holds the
    operations applied to the guest memory when the run was recorded.
    """
    name: str
    description: str
    params: dict
    phases: dict
    counters: dict
    estimate: Estimate
    timeline: list
    summary: dict
    extra: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    ops: Any = None

    @property
    def total_ns(self) -> float:
        return self.estimate.total_ns

    def params_json(self) -> dict:
        out = {}
        for k, v in self.params.items():
            out[k] = v if isinstance(v, (bool, int, str, type(None))) else _show(v)
        return out

    def to_dict(self) -> dict:
        """Plain JSON-safe data (``json.dumps`` works on it as is)."""
        est = self.estimate.to_dict()
        phases = {}
        for name, counts in self.phases.items():
            op = self.estimate.by_operation.get(name)
            phases[name] = {"ns": op.total_ns if op else 0.0, "counters": dict(counts)}
        return {
            "scenario": self.name,
            "description": self.description,
            "params": self.params_json(),
            "profile": self.estimate.profile,
            "total_ns": self.estimate.total_ns,
            "phases": phases,
            "counters": dict(self.counters),
            "estimate": est,
            "summary": _json_safe(self.summary),
            "timeline": [_json_safe(s) for s in self.timeline],
            "extra": _json_safe(self.extra),
            "wall_seconds": self.wall_seconds,
        }


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    return v


# ============================================================================ the runner

class Runner:
    """The guest a scenario runs on, and the bookkeeping around its operations.

    Memory: one guest_memfd of ``size`` bytes (``gmem``), its first ``low`` bytes at GPA
    0 (memslot 0) and the rest at 4 GiB (memslot 1), as QEMU's q35 lays out RAM. All
    operation methods take byte offsets in that file. Operations that fail are counted
    by errno in ``errors`` (``strict`` raises instead).
    """

    def __init__(self, params: dict, cost_model: CostModel, *, progress=None, record=False,
                 strict=False):
        self.p = params
        self.cost = cost_model
        self.progress_cb = progress
        self.strict = strict
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
        self.errors: Counter = Counter()
        self.steps = 0
        self.timeline: list[dict] = []
        self.extra: dict = {}
        self.phase_name: str | None = None
        self._phase_counts: dict[str, np.ndarray] = {}
        self._extra_counts = np.zeros(len(COUNTER_NAMES), np.int64)
        self._ns = np.array([cost_model.ns_per_unit.get(n, 0.0) for n in COUNTER_NAMES])
        self._phase_start = self._snap()
        self._t0 = time.perf_counter()
        self.ops = T.OpList("<scenario>") if record else None
        self._pins: dict[str, list] = {}
        self.phase("setup")

    # ------------------------------------------------------------ bookkeeping
    def _snap(self) -> np.ndarray:
        return np.fromiter(self.vm.counters.values(), np.int64, len(COUNTER_NAMES)) + self._extra_counts

    def count(self, counter: str, n: int = 1) -> None:
        """Add work the scenario does outside the model's API (a guest exit, say)."""
        self._extra_counts[COUNTER_NAMES.index(counter)] += n

    def phase(self, name: str) -> None:
        """Report the work that follows under operation ``name``."""
        if name == self.phase_name:
            return
        now = self._snap()
        if self.phase_name is not None:
            d = now - self._phase_start
            acc = self._phase_counts.get(self.phase_name)
            self._phase_counts[self.phase_name] = d if acc is None else acc + d
        self._phase_start = now
        self.phase_name = name
        if self.ops is not None:
            self.ops.add(T.PHASE, a=self.ops.name(name))

    def progress(self, label: str, done: int, total: int) -> None:
        if self.progress_cb is not None:
            self.progress_cb(label, done, total)

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
            "est_ns": float(snap @ self._ns),
            "wall_s": time.perf_counter() - self._t0,
        })

    def is_private(self, off: int, size: int) -> bool:
        """Every page of the file range is private (per the mode's source of truth)."""
        if self.in_place:
            return self.gmem.is_private(off, size)
        return all(self.vm._attrs.covered(g >> PAGE_SHIFT, (g + n) >> PAGE_SHIFT) == n >> PAGE_SHIFT
                   for g, n in self._gpa_pieces(off, size))

    def private_pages(self) -> int:
        """Private pages of guest memory per the mode's source of truth."""
        if self.in_place:
            return self.gmem.private_pages()
        n = 0
        for gpa, _off, size in self._slots():
            n += self.vm._attrs.covered(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT)
        return n

    def _fail(self, exc: Exception, what: str, line: int = 0) -> None:
        name = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
        if self.strict:
            where = f"line {line}: " if line else ""
            raise ScenarioError(f"{where}{what} failed: {exc}") from exc
        self.errors[name] += 1

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

    def _resolve(self, off: int, size: int) -> int:
        return self.size - off if size == T.ALL else size

    def _check_range(self, off: int, size: int, what: str) -> None:
        if size <= 0 or off < 0 or off % PAGE_SIZE or size % PAGE_SIZE or off + size > self.size:
            raise GmemError(errno.EINVAL, f"{what} [{off:#x}, +{size:#x}): not a page-aligned range "
                                          f"inside the guest memory ({format_size(self.size)})")

    # ------------------------------------------------------------ operations
    def convert_many(self, offs, sizes, attrs, flags=0, *, exits=False, lines=None,
                     label="converting") -> np.ndarray:
        """Conversions in order (batched); returns the errno per item.

        ``exits``: each is a guest request and costs one guest exit.
        """
        offs = np.ascontiguousarray(offs, np.int64)
        n = len(offs)
        sizes = np.broadcast_to(np.asarray(sizes, np.int64), (n,))
        if (sizes == T.ALL).any():
            sizes = np.where(sizes == T.ALL, self.size - offs, sizes)
        attrs = np.broadcast_to(np.asarray(attrs, np.int64), (n,))
        flags = np.broadcast_to(np.asarray(flags, np.int64), (n,))
        if self.ops is not None:
            self.ops.add_many(T.CONVERT, offs, sizes, attrs, flags)
        if exits:
            self.count("guest_exits", n)
        errs = np.zeros(n, np.int32)
        if not self.in_place:
            return self._legacy_convert_many(offs, sizes, attrs, lines, label)
        step = BATCH
        for s in range(0, n, step):
            e = min(n, s + step)
            res = self.gmem.set_memory_attributes_many(offs[s:e], np.ascontiguousarray(sizes[s:e]),
                                                       np.ascontiguousarray(attrs[s:e]),
                                                       np.ascontiguousarray(flags[s:e]))
            errs[s:e] = res.errno
            self.steps += e - s
            if n > step:
                self.progress(label, e, n)
        bad = np.flatnonzero(errs)
        if len(bad):
            if self.strict:
                i = int(bad[0])
                line = int(lines[i]) if lines is not None else 0
                raise ScenarioError(
                    (f"line {line}: " if line else "")
                    + f"convert [{int(offs[i]):#x}, +{int(sizes[i]):#x}) to "
                    f"{'private' if attrs[i] else 'shared'} failed: "
                    f"{errno.errorcode.get(int(errs[i]), errs[i])}")
            for code, c in zip(*np.unique(errs[bad], return_counts=True)):
                self.errors[errno.errorcode.get(int(code), str(code))] += int(c)
        return errs

    def _legacy_convert_many(self, offs, sizes, attrs, lines, label) -> np.ndarray:
        """Legacy tracking: KVM_SET_MEMORY_ATTRIBUTES on the VM, per request; converting to
        shared, the VMM also discards the guest_memfd range (QEMU's
        ram_block_discard_guest_memfd_range). Content flags do not exist there."""
        n = len(offs)
        errs = np.zeros(n, np.int32)
        vm, g = self.vm, self.gmem
        every = max(1, n // 200)
        for i, (off, size, a) in enumerate(zip(offs.tolist(), sizes.tolist(), attrs.tolist())):
            try:
                self._check_range(off, size, "convert")
                for gpa, sz in self._gpa_pieces(off, size):
                    vm.set_memory_attributes(gpa, sz, a)
                if not a:
                    g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, size)
            except GmemError as exc:
                errs[i] = exc.errno
                self._fail(exc, f"convert [{off:#x}, +{size:#x})",
                           int(lines[i]) if lines is not None else 0)
            self.steps += 1
            if n > 1000 and i % every == 0:
                self.progress(label, i, n)
        if n > 1000:
            self.progress(label, n, n)
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
        size = self._resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.ALLOCATE, off, size)
        self.steps += 1
        try:
            self.gmem.fallocate(FALLOC_FL_KEEP_SIZE, off, size)
        except GmemError as exc:
            self._fail(exc, f"allocate [{off:#x}, +{size:#x})", line)

    def punch(self, off: int, size: int, line: int = 0) -> None:
        size = self._resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.PUNCH, off, size)
        self.steps += 1
        try:
            self.gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, size)
        except GmemError as exc:
            self._fail(exc, f"punch [{off:#x}, +{size:#x})", line)

    def write(self, off: int, size: int, fill: int = T.DEFAULT_FILL, line: int = 0, data=None) -> None:
        """The host writes through its mmap (``data``, or ``size`` bytes of ``fill``)."""
        size = self._resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.WRITE, off, size, fill)
        self.steps += 1
        try:
            if data is None:
                if size > (256 << 20):
                    raise GmemError(errno.EINVAL, f"host write of {format_size(size)}: the model keeps "
                                                  "written bytes; write at most 256M at once")
                data = bytes([fill]) * size
            self.gmem.host_write(off, data)
        except GmemError as exc:
            self._fail(exc, f"host write [{off:#x}, +{size:#x})", line)

    def read(self, off: int, size: int, line: int = 0) -> None:
        size = self._resolve(off, size)
        if self.ops is not None:
            self.ops.add(T.READ, off, size)
        self.steps += 1
        try:
            if size > (256 << 20):
                raise GmemError(errno.EINVAL, f"host read of {format_size(size)}: read at most 256M at once")
            self.gmem.host_read(off, size)
        except GmemError as exc:
            self._fail(exc, f"host read [{off:#x}, +{size:#x})", line)

    def pin(self, off: int, size: int, pin_id: str, line: int = 0) -> None:
        if self.ops is not None:
            self.ops.add(T.PIN, off, size, self.ops.name(pin_id))
        self.steps += 1
        try:
            self._pins.setdefault(pin_id, []).append(self.gmem.pin(off, size))
        except GmemError as exc:
            self._fail(exc, f"pin [{off:#x}, +{size:#x})", line)

    def unpin(self, pin_id: str, line: int = 0) -> None:
        if self.ops is not None:
            self.ops.add(T.UNPIN, a=self.ops.name(pin_id), b=1)
        self.steps += 1
        held = self._pins.get(pin_id)
        if not held:
            self._fail(GmemError(errno.EINVAL, f"unpin: no pin {pin_id!r} is held"), "unpin", line)
            return
        held.pop().release()

    def accept(self, off: int, size: int, chunk: int = TWO_MIB, *, line: int = 0, slices: int = 1,
               label: str = "accepting") -> int:
        """The guest accepts (TDX) / validates (SNP) private memory, ``chunk`` at a time.

        An unaligned head or tail is accepted at 4 KiB, as a guest does. ``slices`` splits
        the work into that many calls (for progress and the timeline).
        """
        size = self._resolve(off, size)
        try:
            self._check_range(off, size, "accept")
        except GmemError as exc:
            if self.ops is not None:
                self.ops.add(T.ACCEPT, off, size, chunk)
            self._fail(exc, "accept", line)
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
                self._guest_accept(gpa, n, c)
            except (GmemError, MemoryFaultExit, MmioExit) as exc:
                self._fail(exc, f"accept gpa [{gpa:#x}, +{n:#x})", line)
            self.steps += n // c
            done += n
            if slices > 1:
                self.progress(label, done, total)
                self.sample()
        return done

    def _guest_accept(self, gpa: int, size: int, chunk: int) -> None:
        self.vm.guest_accept(gpa, size, chunk=chunk)

    def accept_many(self, offs, size: int, chunk: int = PAGE_SIZE, *, label="accepting",
                    just_converted=False) -> None:
        """The guest accepts many small ranges (after converting them back to private).

        ``just_converted``: every range was converted to private without error right
        before, so VM.guest_accept's checks (memslot, private view, alignment) hold and
        are skipped: its per-call Python overhead (~40 us) would dominate churns.
        """
        offs = np.asarray(offs, np.int64)
        if self.ops is not None:
            self.ops.add_many(T.ACCEPT, offs, size, chunk, 0)
        n = len(offs)
        every = max(1, n // 200)
        fast = (just_converted and self.in_place and size % chunk == 0
                and not (offs % chunk).any())
        if fast:
            from ._layout import RMP_VALIDATED, SEPT_MAPPED
            state = {"tdx": SEPT_MAPPED, "snp": RMP_VALIDATED}.get(self.platform, 0)
            acc, cp, npg = self.gmem._accept, chunk >> PAGE_SHIFT, size >> PAGE_SHIFT
            for i, p in enumerate((offs >> PAGE_SHIFT).tolist()):
                acc(p, p + npg, cp, state)
                if n > 5000 and i % every == 0:
                    self.progress(label, i, n)
        else:
            for i, off in enumerate(offs.tolist()):
                try:
                    self._guest_accept(self.gpa(off), size, chunk)
                except (GmemError, MemoryFaultExit, MmioExit) as exc:
                    self._fail(exc, f"accept [{off:#x}, +{size:#x})")
                if n > 5000 and i % every == 0:
                    self.progress(label, i, n)
        self.steps += n

    # ------------------------------------------------------------ trace replay
    def apply(self, ops: T.TraceOps, *, label="replaying") -> None:
        """Apply recorded operations in order; runs of conversions go in one batch."""
        kind = ops.kind
        n = len(kind)
        conv = kind == T.CONVERT
        i = 0
        src = ops.source
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
            if counts:
                phases[ph] = counts
        totals = {names[i]: int(total[i]) for i in np.flatnonzero(total)}
        est = self.cost.estimate(totals, by_operation=phases) if phases else self.cost.estimate(totals)
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
            "attribute_ranges": g.attribute_ranges if self.in_place else len(self.vm._attrs),
            "operations": self.steps,
            "errors": dict(self.errors),
            "state_bytes": g.memory_footprint(),
        }
        wall = time.perf_counter() - self._t0
        if self.ops is not None:
            self.ops.guest = guest_record(self.p)
        return ScenarioResult(scn_name, description, dict(self.p), phases, totals, est,
                              self.timeline, summary, self.extra, wall,
                              self.ops.build() if self.ops is not None else None)


def guest_record(p: dict) -> dict:
    """The guest parameters as a trace ``guest`` record."""
    return {"size": format_size(p["size"]), "platform": p["platform"], "page_order": p["page_order"],
            "direct_map": p["direct_map"], "tracking": p["tracking"], "flow": p["flow"],
            "merge": p["merge"]}


# ============================================================================ building blocks

def _batches(n: int, batch: int):
    for s in range(0, n, batch):
        yield s, min(n, s + batch)


def swiotlb_default(size: int) -> int:
    """Linux's SWIOTLB size for a confidential guest: 6% of memory, clamped to
    [64 MiB, 1 GiB] (mem_encrypt_setup_arch), 2 MiB aligned; at most a quarter of a
    tiny guest."""
    s = min(max(size * 6 // 100, 64 << 20), ONE_GIB)
    s = min(s, size // 4)
    return max(PAGE_SIZE, s // TWO_MIB * TWO_MIB or s // PAGE_SIZE * PAGE_SIZE)


def swiotlb_region(run: Runner, size) -> tuple[int, int]:
    """(offset, size) of the SWIOTLB pool: memblock puts it at the top of low memory."""
    nbytes = swiotlb_default(run.size) if size in ("auto", None) else (
        run.size if size == "all" else size)
    if nbytes <= 0 or nbytes > run.low:
        raise ScenarioError(f"SWIOTLB size {format_size(nbytes)} does not fit the guest's low "
                            f"memory ({format_size(run.low)})")
    top = run.low
    off = (top - nbytes) // TWO_MIB * TWO_MIB
    if off < 0:
        off = 0
    return off, nbytes


def do_launch(run: Runner, ovmf="synthetic", kernel: int = 16 << 20, vcpus: int = 1) -> None:
    """Launch: the firmware image below 4 GiB and a kernel image at 16 MiB, loaded by the
    run's flow and measured by the platform (SNP launch digest / TDX MRTD)."""
    from .firmware import OvmfImage, snp_launch_plan, synthetic_ovmf, tdx_launch_plan
    if ovmf in (None, "synthetic"):
        image = OvmfImage.from_bytes(synthetic_ovmf())
    elif isinstance(ovmf, OvmfImage):
        image = ovmf
    else:
        try:
            image = OvmfImage.from_file(ovmf)
        except (OSError, ValueError) as exc:
            raise ScenarioError(f"ovmf: {exc}") from None
    vm, flow, platform = run.vm, run.p["flow"], run.platform
    if KERNEL_GPA + kernel > run.low:
        raise ScenarioError(f"kernel image of {format_size(kernel)} at 16M does not fit the guest's "
                            f"low memory ({format_size(run.low)})")
    if run.low < 0x1000000:
        raise ScenarioError(f"boot needs at least 16M of guest memory (firmware data sits at 8M), "
                            f"not {format_size(run.size)}")
    # The flash: its own guest_memfd ending at 4 GiB (memslot 2).
    fw_flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED if flow == "in-place" else (
        GUEST_MEMFD_FLAG_MMAP if platform == "sw-protected" else 0)
    fw = vm.create_guest_memfd(image.size, fw_flags)
    vm.set_user_memory_region(2, image.gpa, image.size, fw)
    if not run.in_place:
        vm.set_memory_attributes(image.gpa, image.size, PRIVATE)

    if platform == "snp":
        plan = snp_launch_plan(image, vcpus)
        runs = [(r.gpa, r.nr_pages, r.contents, r.page_type) for r in plan.runs]
    elif platform == "tdx":
        plan = tdx_launch_plan(image)
        runs = [(r.gpa, r.nr_pages, r.contents, bool(r.measure)) for r in plan.runs]
    else:
        plan = None
        runs = [(image.gpa, image.size >> PAGE_SHIFT, image.data, None)]
    if kernel:
        data = np.random.default_rng(run.p["seed"]).integers(0, 256, kernel, np.uint8).tobytes()
        runs.append((KERNEL_GPA, kernel >> PAGE_SHIFT, data, 1 if platform == "snp" else True))

    total = sum(r[1] for r in runs)
    done = 0
    for gpa, nr, contents, kind in runs:
        _load_and_populate(run, gpa, nr, contents, kind)
        done += nr
        run.steps += 1
        run.progress("launching", done, total)
    if platform == "snp":
        digest = vm.snp_launch_finish(plan.vmsas)
        run.extra["measurement"] = digest.hex()
        run.extra["measurement_kind"] = "SNP launch digest"
    elif platform == "tdx":
        digest = vm.tdx_finalize()
        run.extra["measurement"] = digest.hex()
        run.extra["measurement_kind"] = "TDX MRTD"
    run.extra["launch_pages"] = total
    run.extra["firmware_bytes"] = image.size
    run.extra["kernel_bytes"] = kernel


def _load_and_populate(run: Runner, gpa: int, nr: int, contents, kind) -> None:
    """Load one run of pages and hand it to the platform, by the run's flow."""
    vm, flow, platform = run.vm, run.p["flow"], run.platform
    ms = vm.memslot_for(gpa)
    if ms is None:
        raise ScenarioError(f"launch page at gpa {gpa:#x} is outside guest memory")
    g = ms.gmem
    off = ms.gmem_offset + gpa - ms.gpa
    length = nr << PAGE_SHIFT
    main = g is run.gmem
    if flow == "in-place":
        # create (or convert to) shared -> load while shared -> to private with PRESERVE
        if main:
            run.convert(off, length, 0)
            if contents is not None:
                run.write(off, length, data=contents)
            run.convert(off, length, PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)
        else:
            g.set_memory_attributes(off, length, 0)
            if contents is not None:
                g.host_write(off, contents)
            g.set_memory_attributes(off, length, PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE)
        source = None
    else:
        source = contents
    if main and run.ops is not None:               # populate faults the pages in, one by one
        run.ops.add_many(T.ALLOCATE, np.arange(off, off + length, PAGE_SIZE), PAGE_SIZE, 0, 0)
    if platform == "snp":
        upd = vm.snp_launch_update(gpa >> PAGE_SHIFT, source, length, kind)
        while upd.len:
            upd = vm.snp_launch_update(upd.gfn_start, upd.uaddr, upd.len, upd.type)
    elif platform == "tdx":
        from .platforms.tdx import KVM_TDX_MEASURE_MEMORY_REGION
        region = vm.tdx_init_mem_region(source, gpa, nr, KVM_TDX_MEASURE_MEMORY_REGION if kind else 0)
        while region.nr_pages:
            region = vm.tdx_init_mem_region(region.source_addr, region.gpa, region.nr_pages,
                                            KVM_TDX_MEASURE_MEMORY_REGION if kind else 0)
    else:
        if flow != "in-place" and contents is not None:
            vm.guest_write(gpa, contents, private=True)
        elif contents is None:
            g.fallocate(FALLOC_FL_KEEP_SIZE, off, length)


def do_accept_all(run: Runner, chunk: int, skip=(), points: int = 10) -> None:
    """The guest accepts all its memory (except ``skip`` ranges, already accepted)."""
    ranges = [(0, run.size)]
    for s_off, s_len in sorted(skip):
        out = []
        for a, b in ranges:
            if s_off >= b or s_off + s_len <= a:
                out.append((a, b))
                continue
            if a < s_off:
                out.append((a, s_off))
            if s_off + s_len < b:
                out.append((s_off + s_len, b))
        ranges = out
    total = sum(b - a for a, b in ranges)
    for a, b in ranges:
        slices = max(1, round(points * (b - a) / total)) if total else 1
        run.accept(a, b - a, chunk, slices=slices)


def do_swiotlb(run: Runner, size="auto", chunk: int = TWO_MIB) -> tuple[int, int]:
    """The guest converts its SWIOTLB pool to shared, ``chunk`` per request."""
    off, nbytes = swiotlb_region(run, size)
    chunk = nbytes if chunk in (0, None) else chunk
    offs = np.arange(off, off + nbytes, chunk, dtype=np.int64)
    sizes = np.minimum(chunk, off + nbytes - offs)
    run.convert_many(offs, sizes, 0, exits=True, label="swiotlb")
    run.extra["swiotlb_offset"] = off
    run.extra["swiotlb_bytes"] = nbytes
    return off, nbytes


def do_window(run: Runner, region_off: int, region_size: int, count: int, *, window: int,
              granule: int = PAGE_SIZE, reaccept: bool = True, exits: bool = True,
              pages=None, shared_phase="to-shared", private_phase="to-private") -> None:
    """``count`` guest conversions of random ``granule`` pieces of a region to shared;
    each piece goes back to private (and is accepted again) ``window`` conversions
    later. The last ``window`` pieces stay shared. Batched; one sample per batch."""
    nslots = region_size // granule
    if nslots <= 0:
        raise ScenarioError(f"region of {format_size(region_size)} holds no {format_size(granule)} piece")
    if pages is None:
        pages = run.rng.integers(0, nslots, count, dtype=np.int64)
    offs = region_off + pages * granule
    window = max(1, window)
    every = max(1, -(-count // TIMELINE_POINTS))
    batch = max(1, min(window, every, BATCH))
    back = 0
    next_sample = every
    for s, e in _batches(count, batch):
        run.phase(shared_phase)
        run.convert_many(offs[s:e], granule, 0, exits=exits)
        upto = max(0, e - window)
        if upto > back:
            run.phase(private_phase)
            errs = run.convert_many(offs[back:upto], granule, PRIVATE, exits=exits)
            if reaccept:
                run.accept_many(offs[back:upto], granule, PAGE_SIZE if granule < TWO_MIB else TWO_MIB,
                                just_converted=not errs.any())
            back = upto
        run.progress("converting", e, count)
        if e >= next_sample or e == count:
            run.sample()
            next_sample = e + every


def do_balloon(run: Runner, nbytes: int, granule: int, rounds: int, *, chunk: int = TWO_MIB) -> None:
    """Balloon rounds: inflate (punch random ``granule`` blocks) then deflate (the guest
    accepts them again)."""
    nblocks = run.size // granule
    want = nbytes // granule
    if want <= 0:
        raise ScenarioError(f"balloon of {format_size(nbytes)} holds no {format_size(granule)} block")
    if want > nblocks:
        raise ScenarioError(f"balloon of {format_size(nbytes)} is larger than the guest")
    chunk = chunk if granule % chunk == 0 else PAGE_SIZE
    for r in range(rounds):
        if run.private_pages() == run.gmem.nr_pages:
            blocks = np.sort(run.rng.choice(nblocks, want, replace=False)) * granule
        else:
            # the guest balloons out private memory only: take random wholly private blocks
            picked = []
            for b in run.rng.permutation(nblocks).tolist():
                if run.is_private(b * granule, granule):
                    picked.append(b)
                    if len(picked) == want:
                        break
            if len(picked) < want:
                raise ScenarioError(f"balloon of {format_size(nbytes)}: only {len(picked)} wholly "
                                    f"private {format_size(granule)} blocks left")
            blocks = np.sort(np.array(picked, np.int64)) * granule
        run.phase("inflate")
        every = max(1, want // 50)
        for i, off in enumerate(blocks.tolist()):
            run.punch(off, granule)
            if i % every == 0:
                run.progress(f"inflating (round {r + 1}/{rounds})", i, want)
                if want >= 200:
                    run.sample()
        run.sample()
        run.phase("deflate")
        for i, off in enumerate(blocks.tolist()):
            run.accept(off, granule, chunk)
            if i % every == 0:
                run.progress(f"deflating (round {r + 1}/{rounds})", i, want)
                if want >= 200:
                    run.sample()
        run.sample()


# ============================================================================ built-ins

_OVMF = Param("ovmf", str, "synthetic", "OVMF image file for the launch ('synthetic': a small "
                                         "generated image)")
_KERNEL = Param("kernel", _parse_size_or_auto, 16 << 20, "kernel image loaded at 16M and measured "
                                                         "(0 for none)", True)


@scenario("boot", "launch firmware and kernel, accept all memory, convert SWIOTLB to shared",
          params=(
              _OVMF, _KERNEL,
              Param("vcpus", _parse_count, 1, "vCPUs (SNP: one VMSA each)"),
              Param("accept_chunk", _parse_chunk, TWO_MIB, "guest accept granularity: 2M or 4K", True),
              Param("swiotlb", _parse_size_or_auto, "auto",
                    "SWIOTLB pool size ('auto': 6% of memory in [64M, 1G])", True),
              Param("swiotlb_chunk", _parse_size_or_auto, TWO_MIB,
                    "bytes per guest conversion request for SWIOTLB (0: one request)", True),
          ))
def _boot(run: Runner, p: dict) -> None:
    """Boot a confidential guest.

    1. ``set-private`` (legacy tracking only): the VMM marks all memory private per GFN.
    2. ``launch``: the firmware image (below 4 GiB, its own guest_memfd) and the kernel
       image (at 16 MiB) are loaded by the populate flow and measured.
    3. ``accept``: the guest accepts all its other memory in ``accept_chunk`` pieces.
    4. ``swiotlb``: the guest converts its SWIOTLB pool to shared.
    """
    if p["kernel"] in ("auto", "all"):
        raise ScenarioError("kernel: give a size (16M) or 0")
    if not run.in_place:
        run.phase("set-private")
        run.set_private_all()
        run.sample()
    run.phase("launch")
    do_launch(run, p["ovmf"], p["kernel"], max(1, p["vcpus"]))
    run.sample()
    run.phase("accept")
    skip = [(KERNEL_GPA, p["kernel"])] if p["kernel"] else []
    do_accept_all(run, p["accept_chunk"], skip, points=TIMELINE_POINTS)
    run.phase("swiotlb")
    chunk = p["swiotlb_chunk"]
    do_swiotlb(run, p["swiotlb"], 0 if chunk in ("auto", "all") else chunk)
    run.sample()


@scenario("swiotlb-churn", "bounce-buffer pages converted to shared and back at 4 KiB",
          params=(
              Param("region", _parse_size_or_auto, "auto",
                    "bounce-buffer region ('auto': the SWIOTLB size, 6% of memory in [64M, 1G])", True),
              Param("conversions", _parse_count, 200_000, "conversions to shared (each goes back later)"),
              Param("in_flight", _parse_count, 64, "pages shared at once"),
              Param("granule", _parse_granule, PAGE_SIZE, "bytes per conversion", True),
              Param("reaccept", _parse_bool, True, "the guest accepts each page again after it "
                                                   "returns to private"),
          ))
def _swiotlb_churn(run: Runner, p: dict) -> None:
    """Dynamic bounce buffers: the guest converts a 4 KiB page of its bounce-buffer region
    to shared for a DMA, and back to private (accepting it again) when ``in_flight``
    later DMAs have started. Setup: all memory accepted at 2 MiB."""
    if not run.in_place:
        run.phase("set-private")
        run.set_private_all()
    run.phase("accept")
    do_accept_all(run, TWO_MIB)
    off, nbytes = swiotlb_region(run, p["region"])
    run.extra["region_offset"] = off
    run.extra["region_bytes"] = nbytes
    do_window(run, off, nbytes, p["conversions"], window=p["in_flight"], granule=p["granule"],
              reaccept=p["reaccept"])


@scenario("fragmentation", "random 4 KiB conversions over 1 GiB pages: huge pages and direct map "
                           "over time",
          params=(
              Param("conversions", _parse_count, 200_000, "random conversions to shared"),
              Param("window", _parse_count, 50_000,
                    "conversions after which a page goes back to private"),
              Param("granule", _parse_granule, PAGE_SIZE, "bytes per conversion", True),
              Param("reaccept", _parse_bool, False,
                    "the guest accepts each page as soon as it returns to private (default: "
                    "later, when it next uses it, outside the scenario)"),
          ),
          defaults={"page_order": 18, "direct_map": "on-conversion"})
def _fragmentation(run: Runner, p: dict) -> None:
    """All memory accepted (huge folios of the backing order), then random 4 KiB pages
    anywhere in memory go shared, each returning to private ``window`` conversions later.
    Shared pages split their huge folio; a block re-merges when all its pages are private
    again, but the direct map's broken entries never come back."""
    if not run.in_place:
        run.phase("set-private")
        run.set_private_all()
    run.phase("accept")
    do_accept_all(run, TWO_MIB)
    do_window(run, 0, run.size, p["conversions"], window=p["window"], granule=p["granule"],
              reaccept=p["reaccept"])


@scenario("balloon", "a balloon punches holes in guest memory and the guest refills them",
          params=(
              Param("balloon", _parse_size_or_percent, 0.0625,
                    "balloon size per round: bytes or a percentage of memory", True),
              Param("granule", _parse_granule, TWO_MIB, "bytes per balloon block (punch)", True),
              Param("rounds", _parse_count, 2, "inflate/deflate rounds"),
              Param("accept_chunk", _parse_chunk, TWO_MIB, "guest accept granularity on deflate", True),
          ),
          defaults={"page_order": 9})
def _balloon(run: Runner, p: dict) -> None:
    """All memory accepted, then ``rounds`` times: the balloon inflates by ``balloon``
    bytes of random ``granule`` blocks (the VMM punches them out of guest_memfd, as
    free-page reporting does) and deflates (the guest accepts the blocks again)."""
    nbytes = p["balloon"]
    if isinstance(nbytes, float):
        nbytes = int(run.size * nbytes) // p["granule"] * p["granule"]
    if not run.in_place:
        run.phase("set-private")
        run.set_private_all()
    run.phase("accept")
    do_accept_all(run, TWO_MIB)
    do_balloon(run, nbytes, p["granule"], p["rounds"], chunk=p["accept_chunk"])
    run.extra["balloon_bytes"] = nbytes


# ============================================================================ running

def _cost_model(platform: str, profile=None, overrides=None) -> CostModel:
    name = profile or platform
    try:
        return CostModel.from_profile(name, **(overrides or {}))
    except FileNotFoundError:
        raise ScenarioError(f"cost profile {name!r}: no such built-in profile or file "
                            "(built-in: snp, tdx, sw-protected)") from None
    except ValueError as exc:
        raise ScenarioError(f"cost profile: {exc}") from None


def run_scenario(name, params: dict | None = None, *, profile=None, cost_overrides=None,
                 cost_model: CostModel | None = None, progress=None, record=False,
                 strict=False) -> ScenarioResult:
    """Run a built-in scenario (a name or a :class:`Scenario`) with ``params`` (raw values,
    parsed here). The cost profile defaults to the platform's."""
    scn = name if isinstance(name, Scenario) else get_scenario(name)
    p = resolve_params(scn, params)
    cost = cost_model or _cost_model(p["platform"], profile, cost_overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict)
    scn.func(run, p)
    return run.finish(scn.name, scn.description)


# ----------------------------------------------------------------------------- traces

_TRACE_SCENARIO = Scenario("trace", "replay of an operation trace", None, {}, {})


def _trace_params(guest: dict, params: dict | None) -> dict:
    raw = dict(guest)
    if "in_place" in raw:
        raw["tracking"] = "in-place" if _parse_bool(raw.pop("in_place")) else "legacy"
    raw.update({k: v for k, v in (params or {}).items() if v is not None})
    return resolve_params(_TRACE_SCENARIO, raw)


def run_trace(source, params: dict | None = None, *, profile=None, cost_overrides=None,
              cost_model=None, progress=None, record=False, strict=False) -> ScenarioResult:
    """Replay a trace (a path or :class:`gmemfast.trace.TraceOps`) on a guest described by
    the trace's ``guest`` record, overridden by ``params``."""
    ops = source if isinstance(source, T.TraceOps) else T.read_trace(source)
    p = _trace_params(ops.guest, params)
    cost = cost_model or _cost_model(p["platform"], profile, cost_overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict)
    run.phase("replay")
    run.sample()
    run.apply(ops)
    name = Path(ops.source).name if not isinstance(source, T.TraceOps) else "trace"
    res = run.finish(name, f"replay of {len(ops):,} trace records")
    res.extra["records"] = len(ops)
    return res


# ----------------------------------------------------------------------------- TOML files

_STEP_KEYS_COMMON = {"op", "phase", "repeat"}
_STEP_KEYS = {
    "convert": ({"offset", "size", "attrs"}, {"flags", "exits"}),
    "allocate": ({"offset", "size"}, set()),
    "punch": ({"offset", "size"}, set()),
    "write": ({"offset", "size"}, {"fill"}),
    "read": ({"offset", "size"}, set()),
    "pin": ({"offset"}, {"size", "id"}),
    "unpin": ({"id"}, set()),
    "accept": (set(), {"offset", "size", "chunk"}),
    "random": ({"count"}, {"offset", "size", "granule", "attrs", "window", "reaccept", "exits", "seed"}),
    "churn": ({"offset", "size"}, {"iterations", "granule", "order", "reaccept", "exits", "seed"}),
    "balloon": ({"size"}, {"granule", "rounds", "chunk"}),
    "launch": (set(), {"ovmf", "kernel", "vcpus"}),
    "swiotlb": (set(), {"size", "chunk"}),
    "set-private": (set(), set()),
    "trace": ({"file"}, set()),
}


@dataclass
class ScenarioFile:
    """A user scenario read from TOML: guest parameters, cost settings and steps."""
    path: str
    name: str
    description: str
    guest: dict
    profile: str | None
    cost_overrides: dict
    steps: list


def load_scenario_file(path) -> ScenarioFile:
    """Read and check a TOML scenario file (schema: ``examples/README.md``)."""
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{where}: not valid TOML ({exc})") from None
    extra = sorted(set(data) - {"scenario", "guest", "cost", "steps", "step"})
    if extra:
        raise ScenarioError(f"{where}: unknown table(s) {', '.join(extra)} (known: scenario, guest, "
                            "cost, steps)")
    meta = data.get("scenario", {})
    bad = sorted(set(meta) - {"name", "description"})
    if bad:
        raise ScenarioError(f"{where}: [scenario]: unknown key(s) {', '.join(bad)} (known: name, description)")
    guest = dict(data.get("guest", {}))
    if "in_place" in guest:
        guest["tracking"] = "in-place" if _parse_bool(guest.pop("in_place")) else "legacy"
    bad = sorted(set(guest) - set(COMMON_PARAMS))
    if bad:
        raise ScenarioError(f"{where}: [guest]: unknown key(s) {', '.join(bad)} "
                            f"(known: {', '.join(COMMON_PARAMS)})")
    try:
        resolve_params(_TRACE_SCENARIO, guest)
    except ScenarioError as exc:
        raise ScenarioError(f"{where}: [guest]: {exc}") from None
    cost = data.get("cost", {})
    bad = sorted(set(cost) - {"profile", "set"})
    if bad:
        raise ScenarioError(f"{where}: [cost]: unknown key(s) {', '.join(bad)} (known: profile, set)")
    overrides = dict(cost.get("set", {}))
    steps = data.get("steps", data.get("step", []))
    if not isinstance(steps, list) or not steps:
        raise ScenarioError(f"{where}: no steps: add [[steps]] tables (each with an op)")
    base = path.parent
    for i, step in enumerate(steps, 1):
        _check_step(step, f"{where}: step {i}", base)
    return ScenarioFile(where, meta.get("name", path.stem), meta.get("description", f"scenario file {path.name}"),
                        guest, cost.get("profile"), overrides, steps)


def _check_step(step, what: str, base: Path) -> None:
    if not isinstance(step, dict) or "op" not in step:
        raise ScenarioError(f"{what}: a step is a table with an 'op' (one of {', '.join(_STEP_KEYS)})")
    op = step["op"]
    if op not in _STEP_KEYS:
        raise ScenarioError(f"{what}: unknown op {op!r} (known: {', '.join(_STEP_KEYS)})")
    required, optional = _STEP_KEYS[op]
    missing = sorted(required - set(step))
    if missing:
        raise ScenarioError(f"{what} ({op}): missing key(s) {', '.join(missing)}")
    bad = sorted(set(step) - required - optional - _STEP_KEYS_COMMON)
    if bad:
        raise ScenarioError(f"{what} ({op}): unknown key(s) {', '.join(bad)} (known: "
                            f"{', '.join(sorted(required | optional | _STEP_KEYS_COMMON))})")
    if op == "trace":
        step["file"] = str(base / step["file"])
    if op == "launch" and step.get("ovmf") not in (None, "synthetic"):
        step["ovmf"] = str(base / step["ovmf"])


def _num(step, key, default=None, *, what, allow_all=False):
    if key not in step:
        if default is None:
            raise ScenarioError(f"{what}: missing {key}")
        return default
    try:
        return T.parse_number(step[key], key, allow_all=allow_all)
    except ValueError as exc:
        raise ScenarioError(f"{what}: {exc}") from None


def _run_step(run: Runner, step: dict, what: str) -> None:
    op = step["op"]
    run.phase(step.get("phase", op))
    try:
        if op in ("allocate", "punch", "write", "read", "convert", "accept", "pin"):
            off = _num(step, "offset", 0, what=what)
            size = run._resolve(off, _num(step, "size", T.ALL if op in ("accept",) else PAGE_SIZE,
                                          what=what, allow_all=True))
            if op == "allocate":
                run.allocate(off, size)
            elif op == "punch":
                run.punch(off, size)
            elif op == "write":
                run.write(off, size, _num(step, "fill", T.DEFAULT_FILL, what=what))
            elif op == "read":
                run.read(off, size)
            elif op == "pin":
                run.pin(off, size, str(step.get("id", off)))
            elif op == "convert":
                run.convert(off, size, T.parse_attrs(step["attrs"]), T.parse_flags(step.get("flags")),
                            exits=_parse_bool(step.get("exits", False)))
            else:
                run.accept(off, size, _parse_chunk(step.get("chunk", "2M")), slices=20)
        elif op == "unpin":
            run.unpin(str(step["id"]))
        elif op == "random":
            off = _num(step, "offset", 0, what=what)
            size = run._resolve(off, _num(step, "size", T.ALL, what=what, allow_all=True))
            granule = _parse_granule(step.get("granule", "4K"))
            count = _parse_count(step["count"])
            to = T.parse_attrs(step.get("attrs", "shared"))
            if "seed" in step:
                run.rng = np.random.default_rng(_parse_int(step["seed"]))
            if to:
                raise ScenarioError(f"{what}: random conversions go to shared (and back with "
                                    "'window'); attrs = 'private' is not supported")
            window = _parse_count(step.get("window", count))
            do_window(run, off, size, count, window=window, granule=granule,
                      reaccept=_parse_bool(step.get("reaccept", True)),
                      exits=_parse_bool(step.get("exits", True)),
                      shared_phase=step.get("phase", "to-shared"),
                      private_phase=step.get("phase", "to-private"))
        elif op == "churn":
            off = _num(step, "offset", 0, what=what)
            size = run._resolve(off, _num(step, "size", T.ALL, what=what, allow_all=True))
            granule = _parse_granule(step.get("granule", "4K"))
            n = size // granule
            order = str(step.get("order", "random"))
            if order not in ("random", "sequential"):
                raise ScenarioError(f"{what}: order must be 'random' or 'sequential'")
            if "seed" in step:
                run.rng = np.random.default_rng(_parse_int(step["seed"]))
            for _ in range(_parse_count(step.get("iterations", 1))):
                pages = run.rng.permutation(n) if order == "random" else np.arange(n)
                do_window(run, off, size, n, window=n, granule=granule, pages=pages,
                          reaccept=_parse_bool(step.get("reaccept", True)),
                          exits=_parse_bool(step.get("exits", True)),
                          shared_phase=step.get("phase", "to-shared"),
                          private_phase=step.get("phase", "to-private"))
                run.phase(step.get("phase", "to-private"))
                offs = off + pages * granule
                run.convert_many(offs, granule, PRIVATE, exits=_parse_bool(step.get("exits", True)))
                if _parse_bool(step.get("reaccept", True)):
                    run.accept_many(offs, granule, PAGE_SIZE if granule < TWO_MIB else TWO_MIB)
                run.sample()
        elif op == "balloon":
            size = _parse_size_or_percent(step["size"])
            granule = _parse_granule(step.get("granule", "2M"))
            if isinstance(size, float):
                size = int(run.size * size) // granule * granule
            do_balloon(run, size, granule, _parse_count(step.get("rounds", 1)),
                       chunk=_parse_chunk(step.get("chunk", "2M")))
        elif op == "launch":
            kernel = _parse_size_or_auto(step.get("kernel", 0))
            do_launch(run, step.get("ovmf", "synthetic"), 0 if isinstance(kernel, str) else kernel,
                      _parse_count(step.get("vcpus", 1)))
        elif op == "swiotlb":
            chunk = _parse_size_or_auto(step.get("chunk", "2M"))
            do_swiotlb(run, _parse_size_or_auto(step.get("size", "auto")),
                       0 if isinstance(chunk, str) else chunk)
        elif op == "set-private":
            if run.in_place:
                raise ScenarioError(f"{what}: set-private is the legacy VMM's startup step "
                                    "(tracking = 'legacy')")
            run.set_private_all()
        elif op == "trace":
            run.apply(T.read_trace(step["file"]))
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ScenarioError) and str(exc).startswith(what):
            raise
        raise ScenarioError(f"{what} ({op}): {exc}") from None
    run.sample()


def run_scenario_file(source, params: dict | None = None, *, profile=None, cost_overrides=None,
                      cost_model=None, progress=None, record=False, strict=False) -> ScenarioResult:
    """Run a TOML scenario file (a path or :class:`ScenarioFile`); ``params`` override its
    [guest] table, ``profile``/``cost_overrides`` its [cost] table."""
    sf = source if isinstance(source, ScenarioFile) else load_scenario_file(source)
    p = _trace_params(sf.guest, params)
    overrides = {**sf.cost_overrides, **(cost_overrides or {})}
    cost = cost_model or _cost_model(p["platform"], profile or sf.profile, overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict)
    run.sample()
    for i, step in enumerate(sf.steps, 1):
        for _ in range(_parse_count(step.get("repeat", 1))):
            _run_step(run, step, f"{sf.path}: step {i}")
    return run.finish(sf.name, sf.description)


def run_any(target: str, params: dict | None = None, **kwargs) -> ScenarioResult:
    """A built-in scenario name, a ``.toml`` scenario file, or a trace file."""
    if target in SCENARIOS:
        return run_scenario(target, params, **kwargs)
    low = target.lower()
    if low.endswith(".toml"):
        if not os.path.exists(target):
            raise ScenarioError(f"scenario file {target!r} does not exist")
        return run_scenario_file(target, params, **kwargs)
    if low.endswith((".csv", ".jsonl", ".ndjson", ".json")):
        if not os.path.exists(target):
            raise ScenarioError(f"trace file {target!r} does not exist")
        return run_trace(target, params, **kwargs)
    get_scenario(target)          # raises with the list of scenarios
    raise AssertionError("unreachable")
