"""Running scenarios: built-in ones by name, scenario files and trace replays."""
from __future__ import annotations

import os
from pathlib import Path

from .. import trace as T
from ..cost import BUILTIN_PROFILES, CostModel
from . import builtin  # noqa: F401  (registers the built-in scenarios)
from .files import ScenarioFile, check_for_guest, load_scenario_file, parse_step, run_step
from .params import (COMMON_PARAMS, SCENARIOS, TRACE_SCENARIO, Scenario, ScenarioError,
                     get_scenario, parse_bool, resolve_params, show_params)
from .results import ScenarioResult
from .runner import Runner

__all__ = ["cost_model_for", "cost_source", "load_target", "run_any", "run_scenario", "run_scenario_file",
           "run_trace", "target_params", "trace_params"]


def cost_model_for(platform: str, profile=None, overrides=None) -> CostModel:
    name = profile or platform
    try:
        return CostModel.from_profile(name, **(overrides or {}))
    except FileNotFoundError:
        raise ScenarioError(f"cost profile {name!r}: no such built-in profile or file "
                            "(built-in: snp, tdx, sw-protected)") from None
    except IsADirectoryError:
        raise ScenarioError(f"cost profile {name!r} is a directory, not a profile file") from None
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"cost profile: {exc}") from None


def cost_source(platform: str, profile=None) -> str:
    """Where a run's cost figures come from, and how to list them."""
    name = profile or platform
    kind = "built-in profile" if name in BUILTIN_PROFILES else "profile file"
    return f"{kind} {name} (gmemfast counters --profile {name} lists each figure and its source)"


def _finish(run: Runner, name: str, description: str, spec: dict, p: dict, platform: str, profile):
    res = run.finish(name, description)
    res.params_shown = show_params(spec, p)
    res.cost_source = cost_source(platform, profile)
    return res


def run_scenario(name, params: dict | None = None, *, profile=None, cost_overrides=None,
                 cost_model: CostModel | None = None, progress=None, record=False,
                 strict=False) -> ScenarioResult:
    """Run a built-in scenario (a name or a :class:`Scenario`) with ``params`` (raw values,
    parsed here). The cost profile defaults to the platform's."""
    scn = name if isinstance(name, Scenario) else get_scenario(name)
    p = resolve_params(scn, params)
    cost = cost_model or cost_model_for(p["platform"], profile, cost_overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict)
    scn.func(run, p)
    return _finish(run, scn.name, scn.description, scn.all_params(), p, p["platform"],
                   cost.name if cost_model else profile)


def trace_params(guest: dict, params: dict | None, source: str | None = None) -> dict:
    """The guest of a trace or scenario file (``guest``), overridden by ``params``. A
    ``flow`` the guest gives only as its tracking mode's default follows an overridden
    tracking mode. Errors name ``source``."""
    raw = dict(guest)
    given = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        if "in_place" in raw:
            raw["tracking"] = "in-place" if parse_bool(raw.pop("in_place")) else "legacy"
        if "tracking" in given and "flow" not in given and raw.get("flow") == raw.get("tracking", "in-place"):
            raw.pop("flow", None)
        raw.update(given)
        return resolve_params(TRACE_SCENARIO, raw)
    except (ScenarioError, ValueError) as exc:
        if source is None:
            raise
        raise ScenarioError(f"{source}: guest: {exc}") from None


def run_trace(source, params: dict | None = None, *, profile=None, cost_overrides=None,
              cost_model=None, progress=None, record=False, strict=False) -> ScenarioResult:
    """Replay a trace (a path or :class:`gmemfast.trace.TraceOps`) on a guest described by
    the trace's ``guest`` record, overridden by ``params``. With legacy tracking the VMM
    first marks all memory private, as at a legacy VM's startup."""
    ops = source if isinstance(source, T.TraceOps) else T.read_trace(source)
    p = trace_params(ops.guest, params, ops.source)
    cost = cost_model or cost_model_for(p["platform"], profile, cost_overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict, expect=ops.expect)
    if not run.in_place:
        # a legacy VMM marks all guest memory private at startup (as the scenarios do)
        # before the guest runs: the recorded operations start from there
        run.phase("set-private")
        run.set_private_all()
    run.phase("replay")
    run.sample()
    run.apply(ops)
    name = Path(ops.source).name if not ops.source.startswith("<") else "trace"
    res = _finish(run, name, f"replay of {len(ops):,} trace records", COMMON_PARAMS, p, p["platform"],
                  cost.name if cost_model else profile)
    res.extra["records"] = len(ops)
    return res




def run_scenario_file(source, params: dict | None = None, *, profile=None, cost_overrides=None,
                      cost_model=None, progress=None, record=False, strict=False) -> ScenarioResult:
    """Run a TOML scenario file (a path or :class:`ScenarioFile`); ``params`` override its
    [guest] table, ``profile``/``cost_overrides`` its [cost] table."""
    sf = source if isinstance(source, ScenarioFile) else load_scenario_file(source)
    p = trace_params(sf.guest, params, sf.path)
    overrides = {**sf.cost_overrides, **(cost_overrides or {})}
    cost = cost_model or cost_model_for(p["platform"], profile or sf.profile, overrides)
    check_for_guest(sf, p["size"])
    steps = [(i, parse_step(step, f"{sf.path}: step {i}", traces=sf.traces))
             for i, step in enumerate(sf.steps, 1)]
    run = Runner(p, cost, progress=progress, record=record, strict=strict, expect=sf.expect)
    run.sample()
    total, k = sum(a["repeat"] for _i, a in steps), 0
    for i, a in steps:
        what = f"{sf.path}: step {i}"
        run.mark(f"step {i} {a['phase'] or a['op']}")
        for r in range(a["repeat"]):
            label = f"step {i}/{len(steps)} {a['op']}" + (f" ({r + 1}/{a['repeat']})" if a["repeat"] > 1 else "")
            with run.part(k, total, label):
                run_step(run, None, what, parsed=a)
            k += 1
    return _finish(run, sf.name, sf.description, COMMON_PARAMS, p, p["platform"],
                   cost.name if cost_model else (profile or sf.profile))


TRACE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")


def load_target(target):
    """What ``target`` names, read and checked: a built-in scenario name (a
    :class:`Scenario`), a ``.toml`` scenario file (a :class:`ScenarioFile`) or a trace
    file (a :class:`gmemfast.trace.TraceOps`). Loaded objects are returned as they are."""
    if isinstance(target, (Scenario, ScenarioFile, T.TraceOps)):
        return target
    if target in SCENARIOS:
        return SCENARIOS[target]
    low = target.lower()
    if low.endswith(".toml"):
        if not os.path.exists(target):
            raise ScenarioError(f"scenario file {target!r} does not exist")
        return load_scenario_file(target)
    if low.endswith(TRACE_SUFFIXES):
        if not os.path.exists(target):
            raise ScenarioError(f"trace file {target!r} does not exist")
        return T.read_trace(target)
    return get_scenario(target)     # an unknown name: the error lists the scenarios


def target_params(target, params: dict | None = None) -> dict:
    """The parameters a run of ``target`` (as :func:`load_target` takes) with ``params``
    would use, checked without running anything (``ScenarioError`` if bad)."""
    obj = load_target(target)
    if isinstance(obj, Scenario):
        return resolve_params(obj, params)
    if isinstance(obj, ScenarioFile):
        p = trace_params(obj.guest, params, obj.path)
        check_for_guest(obj, p["size"])
        return p
    return trace_params(obj.guest, params, obj.source)


def run_any(target, params: dict | None = None, **kwargs) -> ScenarioResult:
    """A built-in scenario name, a ``.toml`` scenario file, or a trace file (or what
    :func:`load_target` made of one)."""
    obj = load_target(target)
    if isinstance(obj, Scenario):
        return run_scenario(obj, params, **kwargs)
    if isinstance(obj, ScenarioFile):
        return run_scenario_file(obj, params, **kwargs)
    return run_trace(obj, params, **kwargs)
