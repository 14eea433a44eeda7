"""Sweeps: one scenario run once per configuration of a grid of parameter values, on
``dask.distributed`` (needs the ``sweep`` extra: ``pip install "gmemfast[sweep]"``).

A grid maps scenario parameters to lists of values (``{"direct_map": ["keep",
"on-conversion"], "seed": [0, 1, 2]}``); every combination is a configuration, and each
configuration is one task. By default the tasks run on a local cluster of worker
processes (one per core) started and stopped here; given a ``distributed.Client``, on
its cluster. Guests never cross the network: each task builds its own guest, runs the
scenario, and only a small result row comes back.

Each row holds the configuration (every parameter as a typed column), the estimated
CPU and wall time in total and per phase (``cpu_ns``, ``wall_ns``, ``cpu_ns:PHASE``,
``wall_ns:PHASE``), the final state (huge pages left, direct-map entries by size, bytes
mapped at 4 KiB, attribute ranges, errors by errno), the launch measurement where the
scenario has one, and the model's run time on the worker (``run_seconds``). A
configuration gives the same row, ``run_seconds`` aside, wherever it runs and as
``gmemfast run ... --json`` does. A configuration that fails becomes a row whose
``error`` says why; the others go on.

With an output file (:func:`run_sweep`, ``gmemfast sweep --out``), rows are written as
they complete, each write replacing the file atomically, so a sweep stopped at any
moment leaves a readable file of complete rows, and ``resume=True`` runs only the
configurations not already in it. A worker that dies loses nothing: the scheduler runs
its tasks again on other workers, and rows are kept by configuration, so none appears
twice. Before the grid starts, every worker compiles the model's kernels (or loads
them from numba's cache) in a warm-up task, so the first configurations are not
charged for it.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import _warm
from .report import format_sweep
from .scenarios import (COMMON_PARAMS, SCENARIOS, ScenarioError, get_scenario, load_scenario_file,
                        resolve_params, run_any, run_scenario)
from .scenarios.params import show_value
from .scenarios.running import trace_params
from .trace import read_trace

__all__ = ["EXTRA_HINT", "Config", "SweepPlan", "plan_sweep", "run_config", "warm_up", "sweep",
           "run_sweep", "default_workers", "rows_frame", "read_rows", "write_rows", "add_arguments", "cli_run"]

EXTRA_HINT = 'pip install "gmemfast[sweep]"'
FORMATS = (".parquet", ".csv")
TIME_PREFIXES = ("cpu_ns", "wall_ns")
STRING_COLUMNS = ("config", "config_id", "scenario", "profile", "error", "errors_by_errno",
                  "measurement", "measurement_kind")
POLL_SECONDS = 0.02

# Tiny runs that reach the kernels the scenarios use: both tracking modes, every
# backing order, launches on both platforms.
WARM_UP_RUNS = (
    ("fragmentation", {"size": "2G", "conversions": 64, "window": 16}),
    ("fragmentation", {"size": "2G", "conversions": 64, "window": 16, "tracking": "legacy"}),
    ("fragmentation", {"size": "64M", "conversions": 64, "window": 16, "page_order": 9}),
    ("fragmentation", {"size": "64M", "conversions": 64, "window": 16, "page_order": 0,
                       "direct_map": "keep"}),
    ("boot", {"size": "256M", "kernel": "1M"}),
    ("boot", {"size": "256M", "kernel": "1M", "platform": "tdx", "tracking": "legacy"}),
    ("swiotlb-churn", {"size": "1G", "conversions": 64}),
    ("balloon", {"size": "1G"}),
)


def require_extra():
    """Import what a sweep needs, or raise ImportError naming the extra to install."""
    missing = []
    for mod in ("distributed", "pandas", "pyarrow"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"sweeps need the sweep extra ({', '.join(missing)} not installed): "
                          f"{EXTRA_HINT}")


# ============================================================================ the plan

@dataclass(frozen=True)
class Config:
    """One configuration: its label (the swept values), id, the raw parameters a run
    takes, and the row's parameter columns."""
    label: str
    config_id: str
    params: dict
    columns: dict


@dataclass
class SweepPlan:
    """A checked grid: the scenario, its parameters, and every configuration."""
    target: str
    scenario: str
    swept: list
    grid_shown: dict
    param_names: list
    configs: list = field(default_factory=list)
    profile: str | None = None
    cost_overrides: dict | None = None

    def by_id(self) -> dict:
        return {c.config_id: c for c in self.configs}


def _json_param(v):
    return v if isinstance(v, (bool, int, str, type(None))) else show_value(v)


def _target(target: str):
    """(parameter specs, resolve(raw) -> parsed parameters, scenario name) of a target."""
    if target in SCENARIOS:
        scn = get_scenario(target)
        return scn.all_params(), (lambda raw: resolve_params(scn, raw)), scn.name
    low = target.lower()
    if low.endswith(".toml") or low.endswith((".csv", ".jsonl", ".ndjson", ".json")):
        if not os.path.isfile(target):
            what = "scenario file" if low.endswith(".toml") else "trace file"
            raise ScenarioError(f"{what} {target!r} does not exist")
        if low.endswith(".toml"):
            sf = load_scenario_file(target)
            return COMMON_PARAMS, (lambda raw: trace_params(sf.guest, raw)), sf.name
        ops = read_trace(target)
        return COMMON_PARAMS, (lambda raw: trace_params(ops.guest, raw)), Path(target).name
    get_scenario(target)          # raises: an unknown name, with the list of scenarios
    raise AssertionError("unreachable")


def plan_sweep(target: str, grid: dict, params: dict | None = None, *, profile=None,
               cost_overrides=None) -> SweepPlan:
    """Check a grid before any work starts; ScenarioError names the parameter and value
    (unknown parameter, a value the scenario refuses, an empty list, a configuration the
    scenario refuses)."""
    spec, resolve, name = _target(target)
    fixed = {k.replace("-", "_"): v for k, v in (params or {}).items() if v is not None}
    for k in fixed:
        if k not in spec:
            raise ScenarioError(f"{k}: not a parameter of {name!r} (its parameters: {', '.join(spec)})")
    if not isinstance(grid, dict):
        raise ScenarioError("grid: give a dict of parameter -> list of values")
    axes = []
    for key, values in grid.items():
        k = str(key).replace("-", "_")
        if k not in spec:
            raise ScenarioError(f"grid {key}: not a parameter of {name!r} (its parameters: "
                                f"{', '.join(spec)}; see 'gmemfast scenarios')")
        if any(k == a for a, _ in axes):
            raise ScenarioError(f"grid {key}: given twice")
        if k in fixed:
            raise ScenarioError(f"grid {key}: also given as a fixed value ({fixed[k]!r}); "
                                "sweep it or fix it, not both")
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ScenarioError(f"grid {key}: give a list of values, not {values!r}")
        values = list(values)
        if not values:
            raise ScenarioError(f"grid {key}: empty list of values")
        seen = {}
        for v in values:
            try:
                parsed = spec[k].parse(v)
            except (ValueError, TypeError) as exc:
                raise ScenarioError(f"grid {key}={v}: {exc}") from None
            shown = spec[k].show(parsed)
            if shown in seen:
                raise ScenarioError(f"grid {key}: {v!r} repeats {seen[shown]!r}")
            seen[shown] = v
        axes.append((k, values))
    try:
        resolve(fixed)
    except ScenarioError as exc:
        raise ScenarioError(f"fixed parameters: {exc}") from None
    # workers open a scenario file or trace by its absolute path (their working folder
    # may differ)
    run_target = target if target in SCENARIOS else os.path.abspath(target)
    plan = SweepPlan(run_target, name, [k for k, _ in axes],
                     {k: [spec[k].show(spec[k].parse(v)) for v in vals] for k, vals in axes},
                     list(spec), profile=profile, cost_overrides=dict(cost_overrides or {}) or None)
    resolved_all = []
    for combo in itertools.product(*[vals for _k, vals in axes]):
        raw = dict(fixed)
        raw.update({k: v for (k, _), v in zip(axes, combo)})
        label = " ".join(f"{k}={spec[k].show(spec[k].parse(v))}" for (k, _), v in zip(axes, combo))
        try:
            resolved = resolve(raw)
        except ScenarioError as exc:
            raise ScenarioError(f"configuration {label}: {exc}") from None
        resolved_all.append((label, raw, resolved))
    # a column whose values differ in type ("auto" and sizes, say) holds them as text
    mixed = {k for k in plan.param_names
             if len({type(_json_param(r.get(k))) for _l, _raw, r in resolved_all}) > 1}
    for label, raw, resolved in resolved_all:
        columns = {k: (spec[k].show(resolved.get(k)) if k in mixed else _json_param(resolved.get(k)))
                   for k in plan.param_names}
        key = json.dumps({"scenario": name, "params": {k: _json_param(v) for k, v in resolved.items()},
                          "profile": profile, "cost": sorted((plan.cost_overrides or {}).items())},
                         sort_keys=True, default=str)
        plan.configs.append(Config(label, hashlib.sha256(key.encode()).hexdigest()[:16], raw, columns))
    return plan


# ============================================================================ on the worker

def _flatten(summary: dict, into: dict, taken) -> None:
    for k, v in summary.items():
        name = k if k not in taken else f"summary_{k}"
        if k == "direct_map" and isinstance(v, dict):     # entries by size, as in the timeline
            for sub, x in v.items():
                into[f"dmap_{str(sub).lower()}"] = x
        elif k == "errors" and isinstance(v, dict):
            into[name] = int(sum(v.values()))
            into[f"{name}_by_errno"] = json.dumps(dict(sorted(v.items())))
        elif isinstance(v, dict):
            for sub, x in v.items():
                into[f"{name}_{str(sub).lower()}"] = x
        elif isinstance(v, (list, tuple)):
            into[name] = json.dumps(v)
        else:
            into[name] = v


def _flatten_memory(mem, into: dict, prefix: str = "mem") -> None:
    """The host-memory figures as columns: ``mem_total``, ``mem_resident_shared``,
    ``mem_vfio_iommu_mappings_peak``, ... (docs/model.md §13)."""
    for k, v in mem.items():
        name = f"{prefix}_{k}"
        if isinstance(v, dict):
            _flatten_memory(v, into, name)
        else:
            into[name] = v


def result_fields(d: dict, taken=()) -> dict:
    """A row's result columns from ``ScenarioResult.to_dict()``: times in total and per
    phase, the summary, the host memory (``mem_*``), the scalar extras (the launch
    measurement among them)."""
    out = {"profile": d.get("profile"),
           "cpu_ns": float(d.get("cpu_ns", d["total_ns"])),
           "wall_ns": float(d["wall_ns"]) if d.get("wall_ns") is not None else None}
    for ph, v in d.get("phases", {}).items():
        out[f"cpu_ns:{ph}"] = float(v.get("cpu_ns", v.get("ns", 0.0)))
        out[f"wall_ns:{ph}"] = float(v["wall_ns"]) if v.get("wall_ns") is not None else None
    taken = set(taken) | set(out)
    _flatten(d.get("summary", {}), out, taken)
    _flatten_memory(d.get("memory", {}), out)
    for k, v in d.get("extra", {}).items():
        if isinstance(v, (bool, int, float, str)):
            out[k if k not in taken and k not in out else f"extra_{k}"] = v
    return out


def run_config(target: str, params: dict, profile=None, cost_overrides=None, taken=()) -> dict:
    """Run one configuration (on a worker): its result columns, ``run_seconds`` and
    ``error`` (None, or why the run failed)."""
    t0 = time.perf_counter()
    try:
        res = run_any(target, params, profile=profile, cost_overrides=cost_overrides)
        out = result_fields(res.to_dict(), taken)
        out["error"] = None
    except Exception as exc:          # the row says what went wrong; the sweep goes on
        out = {"error": f"{type(exc).__name__}: {exc}"}
    out["run_seconds"] = time.perf_counter() - t0
    return out


def warm_up() -> float:
    """Compile the model's kernels (or load them from numba's cache) with tiny runs of
    every built-in scenario; returns the seconds it took. Nothing to do without the JIT."""
    t0 = time.perf_counter()
    from numba import config
    if not config.DISABLE_JIT:
        for kind in _warm.KINDS:          # every kernel, also those compiled when first needed
            _warm.ensure_compiled(kind)
        for name, p in WARM_UP_RUNS:
            run_scenario(name, p)
    return time.perf_counter() - t0


# ============================================================================ rows and files

def _plain(v):
    """A cell as plain Python: numpy scalars unwrapped, missing values None."""
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    try:
        if v != v:                     # NaN
            return None
    except (TypeError, ValueError):   # pandas.NA
        return None
    if type(v).__name__ == "NAType":
        return None
    return v


def _dtype(column: str, values: list) -> str:
    present = [v for v in values if v is not None]
    if column in ("run_seconds",) or column.split(":")[0] in TIME_PREFIXES:
        return "Float64"
    if column in STRING_COLUMNS or not present:
        return "string"
    kinds = {type(v) for v in present}
    if kinds == {bool}:
        return "boolean"
    if kinds == {int}:
        return "Int64"
    if kinds <= {int, float}:
        return "Float64"
    return "string"


def rows_frame(rows: list, columns: list | None = None):
    """A pandas DataFrame of rows (dicts), each column typed (nullable dtypes)."""
    import pandas as pd
    if columns is None:
        columns = list(dict.fromkeys(c for r in rows for c in r))
    data = {}
    for c in columns:
        vals = [_plain(r.get(c)) for r in rows]
        dt = _dtype(c, vals)
        if dt == "string":
            vals = [None if v is None else str(v) for v in vals]
        data[c] = pd.array(vals, dtype=dt)
    return pd.DataFrame(data, columns=columns)


def _format(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out {path}: give a .parquet or .csv file")
    return suffix


def write_rows(path, frame) -> None:
    """Replace ``path`` with ``frame`` atomically: write a file beside it, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if _format(path) == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rows(path, string_columns=()) -> list:
    """The rows of a sweep file, as dicts of plain values."""
    import pandas as pd
    if _format(path) == ".parquet":
        frame = pd.read_parquet(path)
    else:
        head = pd.read_csv(path, nrows=0).columns
        dtypes = {c: "string" for c in head if c in STRING_COLUMNS or c in string_columns}
        frame = pd.read_csv(path, dtype=dtypes, dtype_backend="numpy_nullable", keep_default_na=True)
    cols = list(frame.columns)
    return [{c: _plain(v) for c, v in zip(cols, rec)} for rec in frame.itertuples(index=False, name=None)]


def _columns(plan: SweepPlan, rows: list) -> list:
    head = ["config", "config_id", "scenario", "profile", *plan.param_names,
            "cpu_ns", "wall_ns", "run_seconds", "error"]
    rest = dict.fromkeys(c for r in rows for c in r if c not in head)
    phases = [c for c in rest if c.split(":")[0] in TIME_PREFIXES and ":" in c]
    return head + phases + [c for c in rest if c not in phases]


def _complete(plan: SweepPlan, rows: list) -> list:
    """Rows in grid order, a phase a row did not run counted as 0 ns."""
    cols = _columns(plan, rows)
    phase_cols = [c for c in cols if ":" in c and c.split(":")[0] in TIME_PREFIXES]
    order = {c.config_id: i for i, c in enumerate(plan.configs)}
    out = []
    for r in sorted(rows, key=lambda r: order.get(r["config_id"], len(order))):
        r = dict(r)
        if r.get("error") is None:
            for c in phase_cols:
                if r.get(c) is None and (c.startswith("cpu_ns") or r.get("wall_ns") is not None):
                    r[c] = 0.0
        out.append(r)
    return out


# ============================================================================ running

def _cluster(client, workers):
    """(client, local cluster or None): a local cluster of processes unless given one."""
    from distributed import Client, LocalCluster
    if client is not None:
        if workers is not None:
            raise ValueError("workers= applies to the local cluster; a given client's cluster has "
                             "its own workers")
        return client, None
    n = workers if workers is not None else default_workers()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"workers={workers!r}: give a number of worker processes >= 1")
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


def default_workers() -> int:
    """Worker processes of a local cluster: one per core this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _warm_workers(client, token: str) -> None:
    from distributed import wait
    addrs = list(client.nthreads())
    futs = [client.submit(warm_up, key=f"gmemfast-warm-up-{token}-{i}", workers=[a],
                          allow_other_workers=True, pure=False) for i, a in enumerate(addrs)]
    wait(futs)


def _remaining(elapsed: float, done: int, todo: int) -> str:
    if not done:
        return ""
    s = elapsed / done * (todo - done)
    return f", {s / 60:.0f}m{s % 60:02.0f}s left" if s >= 60 else f", {s:.0f}s left"


def run_sweep(target: str, grid: dict, params: dict | None = None, *, client=None, workers=None,
              out=None, resume=False, profile=None, cost_overrides=None, progress=None,
              plan: SweepPlan | None = None):
    """Run a sweep; return its DataFrame (rows in grid order). ``out``: a .parquet or .csv
    file written as rows complete; ``resume``: keep the rows already in it (failed ones
    run again). ``progress(label, done, total)`` is called as the sweep goes.

    The frame's ``attrs`` hold ``resumed`` (rows kept from ``out``) and ``seconds``: the
    warm-up's and the grid's elapsed time (from the first task sent to the last row)."""
    plan = plan or plan_sweep(target, grid, params, profile=profile, cost_overrides=cost_overrides)
    require_extra()
    kept: dict[str, dict] = {}
    if out is not None:
        _format(out)
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out {out}: folder {folder} does not exist")
        if os.path.exists(out):
            if not resume:
                raise ValueError(f"--out {out} exists: add --resume to continue that sweep, or "
                                 "give another file")
            kept = _resumable(plan, out)
    todo = [c for c in plan.configs if c.config_id not in kept]
    rows = dict(kept)
    seconds = {"warm_up": 0.0, "grid": 0.0}
    if todo:
        client, cluster = _cluster(client, workers)
        try:
            seconds = _run_tasks(plan, todo, client, rows, out, progress)
        finally:
            if cluster is not None:
                client.close()
                cluster.close()
    final = _complete(plan, [rows[c.config_id] for c in plan.configs if c.config_id in rows])
    frame = rows_frame(final, _columns(plan, final))
    frame.attrs["resumed"] = len(kept)
    frame.attrs["seconds"] = seconds
    return frame


def _frame_args(plan, rows):
    rows = _complete(plan, rows)
    return rows, _columns(plan, rows)


def _resumable(plan: SweepPlan, out) -> dict:
    """The finished rows of an earlier run of this sweep in ``out``, by configuration."""
    strings = [k for k in plan.param_names
               if any(isinstance(c.columns.get(k), str) for c in plan.configs)]
    try:
        old = read_rows(out, strings)
    except Exception as exc:
        raise ValueError(f"--resume: cannot read {out} ({type(exc).__name__}: {exc})") from None
    by_id = plan.by_id()
    foreign = [r for r in old if r.get("config_id") not in by_id]
    if foreign:
        raise ValueError(f"--resume: {out} holds {len(foreign)} row(s) of other configurations "
                         f"(first: {foreign[0].get('config') or foreign[0].get('config_id')}); give "
                         "the same scenario, grid and options, or another --out")
    kept = {}
    for r in old:
        if r.get("error") is None and r["config_id"] not in kept:
            kept[r["config_id"]] = r
    return kept


def _run_tasks(plan: SweepPlan, todo: list, client, rows: dict, out, progress) -> dict:
    if not client.nthreads():
        client.wait_for_workers(1, timeout=60)
    token = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    _warm_workers(client, token)
    t1 = time.perf_counter()
    taken = ["config", "config_id", "scenario", *plan.param_names]
    configs = {}
    futures = []
    for c in todo:
        f = client.submit(run_config, plan.target, c.params, plan.profile, plan.cost_overrides, taken,
                          key=f"gmemfast-sweep-{token}-{c.config_id}", pure=False, retries=1)
        configs[f.key] = c
        futures.append(f)
    start = time.monotonic()
    done = failed = 0

    def report():
        if progress is not None:
            progress(f"sweep{_fail_text(failed)}{_remaining(time.monotonic() - start, done, len(todo))}",
                     done, len(todo))
    pending = list(futures)
    try:
        while pending:
            # each future's own status, polled: a result is taken once its task is done
            ready = [f for f in pending if f.done()]
            if not ready:
                report()
                time.sleep(POLL_SECONDS)
                continue
            taken_now = {id(f) for f in ready}
            pending = [f for f in pending if id(f) not in taken_now]
            for fut in ready:
                c = configs[fut.key]
                if c.config_id in rows:          # never two rows of one configuration
                    continue
                result = _task_result(fut)
                rows[c.config_id] = {"config": c.label, "config_id": c.config_id,
                                     "scenario": plan.scenario, **c.columns, **result}
                done += 1
                failed += rows[c.config_id].get("error") is not None
            if out is not None:
                write_rows(out, rows_frame(*_frame_args(plan, list(rows.values()))))
            report()
    finally:
        left = [f for f in futures if not f.done()]
        if left:
            client.cancel(left)
    return {"warm_up": t1 - t0, "grid": time.perf_counter() - t1}


def _task_result(fut) -> dict:
    """A finished task's row fields, or the error of one that failed or was cancelled."""
    try:
        if fut.status == "finished":
            result = fut.result()
            if isinstance(result, dict):
                return result
            exc = TypeError(f"a configuration returned {type(result).__name__}")
        else:
            exc = fut.exception() if fut.status == "error" else RuntimeError(f"task {fut.status}")
    except Exception as e:            # the result could not be fetched (its worker died)
        exc = e
    return {"error": f"{type(exc).__name__}: {exc}", "run_seconds": None}


def _fail_text(failed: int) -> str:
    return f" ({failed} failed)" if failed else ""


def sweep(scenario, grid, params=None, *, client=None, workers=None):
    """Run ``scenario`` (a built-in name, a .toml scenario file or a .csv/.jsonl trace)
    once per combination of ``grid`` ({parameter: [values]}) with ``params`` fixed, and
    return a pandas DataFrame with one row per configuration (see the module docs).

    Runs on a local cluster of ``workers`` processes (default: one per core) started and
    stopped here, or on the cluster of the ``dask.distributed.Client`` given. A bad grid
    raises ScenarioError before any work starts. Needs the ``sweep`` extra."""
    return run_sweep(scenario, grid, params, client=client, workers=workers)


# ============================================================================ command line

def parse_grid(text: str):
    """``NAME=V1,V2,...`` -> (name, [values])."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=V1,V2,... e.g. seed=0,1,2")
    name, values = text.split("=", 1)
    return name.strip().replace("-", "_"), [v.strip() for v in values.split(",") if v.strip()]


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``gmemfast sweep`` that are its own (the guest and cost options
    are the ones ``run`` takes). Added after those, they win where a scenario parameter
    has the same name (``--workers``, say); that parameter is then given with ``-p``."""
    p.conflict_handler = "resolve"
    p.add_argument("scenario", metavar="SCENARIO",
                   help="a built-in scenario (gmemfast scenarios), a .toml scenario file, or a "
                        ".csv/.jsonl trace")
    g = p.add_argument_group("sweep")
    g.add_argument("--grid", action="append", type=parse_grid, required=True, metavar="NAME=V1,V2,...",
                   help="values of one scenario parameter (repeatable: every combination runs)")
    g.add_argument("--out", required=True, metavar="FILE.parquet|FILE.csv",
                   help="rows, written as they complete")
    g.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out and run only the others")
    g.add_argument("--workers", type=_positive, metavar="N",
                   help="worker processes of the local cluster (default: one per core)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on an existing cluster (tcp://HOST:PORT of 'dask scheduler')")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print JSON for programs instead of a table")
    o.add_argument("--plot", metavar="FILE.png",
                   help="save a picture: wall time and huge pages left against each swept parameter")
    o.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="always show the progress bar (default: on a terminal)")
    o.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="never show the progress bar")
    p.conflict_handler = "error"


def cli_run(args, params: dict, *, profile=None, cost_overrides=None, progress=None) -> int:
    """``gmemfast sweep``: ``params`` are the fixed scenario parameters given as options."""
    grid = {}
    for name, values in args.grid:
        if name in grid:
            raise ValueError(f"--grid {name}: given twice")
        grid[name] = values
    plan = plan_sweep(args.scenario, grid, params, profile=profile, cost_overrides=cost_overrides)
    if args.scheduler and args.workers:
        raise ValueError("--workers is for the local cluster; with --scheduler the cluster has its "
                         "own workers")
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise ValueError(f"--plot {args.plot}: folder {folder} does not exist")
        from .plot import require_matplotlib
        require_matplotlib()
    try:
        require_extra()
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    client = None
    if args.scheduler:
        from distributed import Client
        try:
            client = Client(args.scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise OSError(f"--scheduler {args.scheduler}: cannot connect ({exc})") from None
    where = f"the cluster at {args.scheduler}" if client else \
        f"{args.workers or default_workers()} local worker processes"
    print(f"sweep: {len(plan.configs)} configurations of {plan.scenario} on {where}", file=sys.stderr)
    try:
        frame = run_sweep(args.scenario, grid, params, client=client, workers=args.workers,
                          out=args.out, resume=args.resume, progress=progress, plan=plan)
    finally:
        if progress is not None and hasattr(progress, "close"):
            progress.close()
        if client is not None:
            client.close()
    rows = [{c: _plain(v) for c, v in r.items()} for r in frame.to_dict("records")]
    if args.plot:
        from .plot import plot_sweep
        plot_sweep(rows, plan.swept, args.plot, title=f"gmemfast sweep {plan.scenario}")
    failed = sum(r.get("error") is not None for r in rows)
    if args.json:
        print(json.dumps({"command": "sweep", "scenario": plan.scenario, "grid": plan.grid_shown,
                          "out": args.out, "configurations": len(rows), "failed": failed,
                          "resumed": frame.attrs.get("resumed", 0), "rows": rows},
                         indent=1, default=_json_default))
    else:
        print(format_sweep(rows, plan.swept))
        print(f"\n{len(rows)} rows in {args.out}" + (f" ({failed} failed)" if failed else "")
              + (f"; plot saved to {args.plot}" if args.plot else ""))
    return 0


def _json_default(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)
