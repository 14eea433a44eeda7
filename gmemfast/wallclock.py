"""Wall-clock time from counted work: the threads a phase runs on and the resources its
work shares (docs/model.md §10).

CPU time is the sum of the work (:meth:`gmemfast.cost.CostModel.estimate`). Wall time is
bounded below by the busiest resource, as in the roofline model:

* the phase's **threads** (the guest vCPUs that really run it, or the VMM's threads):
  all the phase's work divided by their number;
* each **serial** resource of the profile (a lock, the TDX module's per-TD path, the
  PSP): the work done holding it, which does not divide;
* each **bandwidth** resource (memory bandwidth): the bytes moved through it divided
  by its bandwidth, which divides over threads only up to that limit.

A phase's wall time is the largest bound, and the bound that sets it is what limits the
phase. Every bound is at most the CPU time, the threads bound is the CPU time on one
thread and shrinks with more, and no other bound depends on the threads, so:
wall <= cpu; wall == cpu on one thread; more threads never make a phase slower. Phases
run one after another, so a run's wall time is the sum of its phases'. The one exception
to wall <= cpu is a phase given an external bound, time that is not work (a device
serving the phase's I/O): it may last longer than its work.

Contention that adds work (``TDX_OPERAND_BUSY`` retries) is counted as work by the
callers (docs/model.md §4.9), not added here.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType

from .cost import CostModel
from .report import format_ns, table

__all__ = ["THREADS", "PhaseTime", "WallTime", "phase_time", "wall_time"]

#: The name of the bound set by the phase's threads.
THREADS = "threads"


@dataclasses.dataclass(frozen=True)
class PhaseTime:
    """One phase's CPU and wall time.

    ``threads`` ran it (on ``vms`` VMs); ``bounds`` maps ``"threads"`` and every resource
    with work in the phase to the lower bound it sets on the wall time, in ns;
    ``limit`` names the largest (the threads on a tie).
    """

    name: str
    threads: int
    cpu_ns: float
    wall_ns: float
    limit: str
    bounds: Mapping[str, float]
    vms: int = 1

    def to_dict(self) -> dict:
        return {"threads": self.threads, "vms": self.vms, "cpu_ns": self.cpu_ns, "wall_ns": self.wall_ns,
                "limited_by": self.limit, "bounds": dict(self.bounds)}


@dataclasses.dataclass(frozen=True)
class WallTime:
    """The phases of a run, in order, each with its CPU and wall time."""

    profile: str
    phases: Mapping[str, PhaseTime]

    @property
    def cpu_ns(self) -> float:
        return math.fsum(p.cpu_ns for p in self.phases.values())

    @property
    def wall_ns(self) -> float:
        return math.fsum(p.wall_ns for p in self.phases.values())

    def to_dict(self) -> dict:
        return {"profile": self.profile, "cpu_ns": self.cpu_ns, "wall_ns": self.wall_ns,
                "phases": {n: p.to_dict() for n, p in self.phases.items()}}

    def table(self) -> str:
        """Phase, threads, CPU time, wall time and what limits it."""
        rows = [[n, str(p.threads), format_ns(p.cpu_ns), format_ns(p.wall_ns), p.limit]
                for n, p in self.phases.items()]
        rows.append(["total", "", format_ns(self.cpu_ns), format_ns(self.wall_ns), ""])
        return table(rows, ["phase", "threads", "cpu", "wall", "limited by"], "lrrrl",
                     rule_after=(len(rows) - 2,))


def _check_threads(threads, what: str) -> int:
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"{what}: threads must be an int >= 1, not {threads!r}")
    return int(threads)


def phase_time(model: CostModel, counts: Mapping[str, int], threads: int = 1, *, vms: int = 1,
               name: str = "", external: Mapping[str, float] | None = None) -> PhaseTime:
    """The wall time of one phase whose work is ``counts`` (counter -> count, the work of
    all ``vms`` VMs together), run on ``threads`` threads.

    ``vms`` > 1 models that many VMs doing the same work at once (concurrent launches):
    a resource of scope ``"vm"`` is one per VM, so its work divides by ``vms``; a
    ``"host"`` resource (the PSP, memory bandwidth) is shared by all of them.

    ``external`` adds bounds that are not work, in ns by name: the time the phase's I/O
    takes on its device, say. They are not capped at the CPU time, so a phase with one
    can take longer than its work (docs/model.md §10.1).
    """
    threads = _check_threads(threads, f"phase {name!r}")
    vms = _check_threads(vms, f"phase {name!r} (vms)")
    ns = model.ns_per_unit
    work = {c: n * ns.get(c, 0.0) for c, n in counts.items() if n}
    cpu = math.fsum(work.values())
    bounds = {THREADS: cpu / threads}
    for r in model.resources.values():
        if r.kind == "shared":
            continue
        share = 1.0 if r.scope == "host" else 1.0 / vms
        if r.kind == "serial":
            held = [work.get(c, 0.0) for c in r.counters]
            held += [counts.get(c, 0) * h for c, h in r.holds.items()]
            busy = math.fsum(held) * share
        else:
            # bytes through the bandwidth; never more than the time the same work takes
            # at the counters' own (one-thread) figures
            moved = []
            for c in r.counters:
                moved.append(min(counts.get(c, 0) / r.gb_per_s, work.get(c, 0.0)))
            for c, b in r.bytes_each.items():
                moved.append(min(counts.get(c, 0) * b / r.gb_per_s, work.get(c, 0.0)))
            busy = math.fsum(moved) * share
        if busy > 0:
            bounds[r.name] = min(busy, cpu * share)
    for key, ns in (external or {}).items():
        if not math.isfinite(ns) or ns < 0:
            raise ValueError(f"phase {name!r}: bound {key!r} must be a finite time >= 0, not {ns!r}")
        if ns > 0:
            bounds[key] = max(bounds.get(key, 0.0), float(ns))
    limit = THREADS
    for key, value in bounds.items():
        if value > bounds[limit]:
            limit = key
    return PhaseTime(name, threads, cpu, bounds[limit], limit, MappingProxyType(bounds), vms)


def wall_time(model: CostModel, by_phase: Mapping[str, Mapping[str, int]],
              threads: Mapping[str, int] | int = 1, *, vms: int = 1,
              external: Mapping[str, Mapping[str, float]] | None = None) -> WallTime:
    """The phases of a run, in order: ``by_phase`` maps phase name -> counts, ``threads``
    gives each phase's threads (a mapping, missing phases run on one; or one number for
    all); ``external`` a phase's bounds that are not work (see :func:`phase_time`)."""
    out = {}
    for name, counts in by_phase.items():
        t = threads if not isinstance(threads, Mapping) else threads.get(name, 1)
        out[name] = phase_time(model, counts, t, vms=vms, name=name,
                               external=(external or {}).get(name))
    return WallTime(model.name, MappingProxyType(out))

