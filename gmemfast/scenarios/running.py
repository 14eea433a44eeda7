"""Running scenarios: built-in ones by name, scenario files and trace replays."""
from __future__ import annotations

import os
from pathlib import Path

from .. import trace as T
from ..cost import CostModel
from . import builtin  # noqa: F401  (registers the built-in scenarios)
from .files import ScenarioFile, load_scenario_file, run_step
from .params import (COMMON_PARAMS, SCENARIOS, TRACE_SCENARIO, Scenario, ScenarioError,
                     get_scenario, parse_bool, parse_count, resolve_params, show_params)
from .results import ScenarioResult
from .runner import Runner

__all__ = ["cost_model_for", "run_any", "run_scenario", "run_scenario_file", "run_trace",
           "trace_params"]


def cost_model_for(platform: str, profile=None, overrides=None) -> CostModel:
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
    cost = cost_model or cost_model_for(p["platform"], profile, cost_overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict)
    scn.func(run, p)
    res = run.finish(scn.name, scn.description)
    res.params_shown = show_params(scn.all_params(), p)
    return res


def trace_params(guest: dict, params: dict | None) -> dict:
    raw = dict(guest)
    if "in_place" in raw:
        raw["tracking"] = "in-place" if parse_bool(raw.pop("in_place")) else "legacy"
    raw.update({k: v for k, v in (params or {}).items() if v is not None})
    return resolve_params(TRACE_SCENARIO, raw)


def run_trace(source, params: dict | None = None, *, profile=None, cost_overrides=None,
              cost_model=None, progress=None, record=False, strict=False) -> ScenarioResult:
    """Replay a trace (a path or :class:`gmemfast.trace.TraceOps`) on a guest described by
    the trace's ``guest`` record, overridden by ``params``."""
    ops = source if isinstance(source, T.TraceOps) else T.read_trace(source)
    p = trace_params(ops.guest, params)
    cost = cost_model or cost_model_for(p["platform"], profile, cost_overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict)
    run.phase("replay")
    run.sample()
    run.apply(ops)
    name = Path(ops.source).name if not isinstance(source, T.TraceOps) else "trace"
    res = run.finish(name, f"replay of {len(ops):,} trace records")
    res.extra["records"] = len(ops)
    res.params_shown = show_params(COMMON_PARAMS, p)
    return res




def run_scenario_file(source, params: dict | None = None, *, profile=None, cost_overrides=None,
                      cost_model=None, progress=None, record=False, strict=False) -> ScenarioResult:
    """Run a TOML scenario file (a path or :class:`ScenarioFile`); ``params`` override its
    [guest] table, ``profile``/``cost_overrides`` its [cost] table."""
    sf = source if isinstance(source, ScenarioFile) else load_scenario_file(source)
    p = trace_params(sf.guest, params)
    overrides = {**sf.cost_overrides, **(cost_overrides or {})}
    cost = cost_model or cost_model_for(p["platform"], profile or sf.profile, overrides)
    run = Runner(p, cost, progress=progress, record=record, strict=strict)
    run.sample()
    for i, step in enumerate(sf.steps, 1):
        for _ in range(parse_count(step.get("repeat", 1))):
            run_step(run, step, f"{sf.path}: step {i}")
    res = run.finish(sf.name, sf.description)
    res.params_shown = show_params(COMMON_PARAMS, p)
    return res


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
    return run_scenario(target, params, **kwargs)     # an unknown name: lists the scenarios
