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
``swiotlb-io``
    I/O through the guest's SWIOTLB pool as Linux runs it: bounce copies, slot
    exhaustion, dynamic growth converting memory to shared (docs/model.md §11).

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

Operations that fail (an ``EAGAIN`` on a pinned page, say) are counted and the run goes
on; the result's summary names the first failure of each kind. A scenario file (or a
trace's guest record) may declare the failures it expects; ``errors_as_expected`` on
the result says whether exactly those happened. Bad input (a value that cannot be read,
or is beyond what the model holds) raises :class:`ScenarioError` before anything runs.
"""
from __future__ import annotations

from .files import ScenarioFile, load_scenario_file, run_step
from .params import (COMMON_PARAMS, MAX_CONVERSIONS, MAX_GUEST_SIZE, SCENARIOS, TRACE_SCENARIO,
                     OperationFailed, Param, Scenario, ScenarioError, get_scenario, guest_record,
                     resolve_params, scenario)
from .results import ScenarioResult
from .runner import Runner
from .running import (cost_model_for, load_target, run_any, run_scenario, run_scenario_file, run_trace,
                      target_params)
from .workloads import (TIMELINE_POINTS, do_accept_all, do_balloon, do_launch, do_swiotlb, do_window,
                        swiotlb_default, swiotlb_region)

__all__ = [
    "COMMON_PARAMS",
    "MAX_CONVERSIONS",
    "MAX_GUEST_SIZE",
    "OperationFailed",
    "Param",
    "Scenario",
    "ScenarioError",
    "ScenarioFile",
    "ScenarioResult",
    "SCENARIOS",
    "TIMELINE_POINTS",
    "TRACE_SCENARIO",
    "Runner",
    "cost_model_for",
    "do_accept_all",
    "do_balloon",
    "do_launch",
    "do_swiotlb",
    "do_window",
    "get_scenario",
    "guest_record",
    "load_scenario_file",
    "load_target",
    "resolve_params",
    "run_any",
    "run_scenario",
    "run_scenario_file",
    "run_step",
    "run_trace",
    "scenario",
    "swiotlb_default",
    "swiotlb_region",
    "target_params",
]
