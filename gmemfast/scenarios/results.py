"""What a scenario run returns: counters per phase, their estimate, timeline, summary."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cost import Estimate
from ..wallclock import WallTime
from .params import show_value

__all__ = ["ScenarioResult", "json_safe"]


@dataclass
class ScenarioResult:
    """What a scenario did and what it would cost.

    ``phases`` maps each operation (phase) to its counter deltas; ``counters`` is the
    total; ``estimate`` prices both (``estimate.by_operation`` per phase): the CPU time,
    all work on every thread. ``wall`` is the estimated elapsed time of each phase on
    the threads that ran it, and what limits it (docs/model.md §10). ``timeline``
    is a list of samples (dicts: step, phase, huge_pages, dmap_1g, dmap_2m, dmap_4k,
    private_pages, allocated_pages, est_ns (CPU time so far), wall_ns (wall time so
    far), wall_s (the model's own run time)); ``marks`` the starts of the run's stages
    (dicts: step, label); ``summary`` holds the final state, with the failed operations
    (``errors`` by errno, ``failures``: the first of each kind, and whether they were
    the ones expected); ``extra`` what a scenario adds (a launch measurement, say).
    ``ops`` holds the operations applied to the guest memory when the run was recorded.
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
    params_shown: dict = field(default_factory=dict)   # parameter -> text, as a person types it
    wall: WallTime | None = None
    marks: list = field(default_factory=list)
    cost_source: str = ""           # where the cost figures come from (a built-in profile or a file)

    @property
    def errors_as_expected(self) -> bool:
        """No operation failed, or exactly the failures the scenario declared it expects."""
        return dict(self.summary.get("errors", {})) == (self.summary.get("expected_errors") or {})

    @property
    def total_ns(self) -> float:
        """The CPU time: all work, every thread (the same as :attr:`cpu_ns`)."""
        return self.estimate.total_ns

    @property
    def cpu_ns(self) -> float:
        return self.estimate.total_ns

    @property
    def wall_ns(self) -> float:
        """Estimated elapsed time: the phases' wall times, one after another."""
        return self.wall.wall_ns if self.wall is not None else self.estimate.total_ns

    @property
    def vcpus(self) -> int:
        return int(self.params.get("vcpus", 1) or 1)

    def phase_wall_ns(self, name: str) -> float:
        if self.wall is not None and name in self.wall.phases:
            return self.wall.phases[name].wall_ns
        op = self.estimate.by_operation.get(name)
        return op.total_ns if op else 0.0

    def params_json(self) -> dict:
        out = {}
        for k, v in self.params.items():
            out[k] = v if isinstance(v, (bool, int, str, type(None))) else show_value(v)
        return out

    def to_dict(self) -> dict:
        """Plain JSON-safe data (``json.dumps`` works on it as is)."""
        est = self.estimate.to_dict()
        phases = {}
        for name, counts in self.phases.items():
            op = self.estimate.by_operation.get(name)
            cpu = op.total_ns if op else 0.0
            ph = {"ns": cpu, "cpu_ns": cpu, "wall_ns": self.phase_wall_ns(name)}
            if self.wall is not None and name in self.wall.phases:
                t = self.wall.phases[name]
                ph.update(threads=t.threads, limited_by=t.limit, bounds=dict(t.bounds))
            ph["counters"] = dict(counts)
            phases[name] = ph
        return {
            "scenario": self.name,
            "description": self.description,
            "params": self.params_json(),
            "profile": self.estimate.profile,
            "vcpus": self.vcpus,
            "wall_ns": self.wall_ns,
            "cpu_ns": self.cpu_ns,
            "total_ns": self.estimate.total_ns,
            "phases": phases,
            "counters": dict(self.counters),
            "estimate": est,
            "summary": json_safe(self.summary),
            "timeline": [json_safe(s) for s in self.timeline],
            "marks": json_safe(self.marks),
            "extra": json_safe(self.extra),
            "wall_seconds": self.wall_seconds,
        }


def json_safe(v):
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    return v
