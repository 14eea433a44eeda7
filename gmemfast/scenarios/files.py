"""User scenarios in TOML files: reading and checking them, and running their steps
(the schema is in ``examples/README.md``)."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import trace as T
from ..units import PAGE_SIZE
from .params import (COMMON_PARAMS, TRACE_SCENARIO, ScenarioError, parse_bool, parse_chunk,
                     parse_count, parse_granule, parse_int, parse_size_or_auto,
                     parse_size_or_percent, resolve_params)
from .runner import PRIVATE, TWO_MIB, Runner
from .workloads import do_balloon, do_launch, do_swiotlb, do_window

__all__ = ["STEPS", "ScenarioFile", "load_scenario_file", "run_step"]


_STEP_KEYS_COMMON = {"op", "phase", "repeat"}
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
        guest["tracking"] = "in-place" if parse_bool(guest.pop("in_place")) else "legacy"
    bad = sorted(set(guest) - set(COMMON_PARAMS))
    if bad:
        raise ScenarioError(f"{where}: [guest]: unknown key(s) {', '.join(bad)} "
                            f"(known: {', '.join(COMMON_PARAMS)})")
    try:
        resolve_params(TRACE_SCENARIO, guest)
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
        raise ScenarioError(f"{what}: a step is a table with an 'op' (one of {', '.join(STEPS)})")
    op = step["op"]
    if op not in STEPS:
        raise ScenarioError(f"{what}: unknown op {op!r} (known: {', '.join(STEPS)})")
    required, optional, _run = STEPS[op]
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


def _range(run: Runner, step: dict, what: str, default_size) -> tuple[int, int]:
    off = _num(step, "offset", 0, what=what)
    return off, run.resolve(off, _num(step, "size", default_size, what=what, allow_all=True))


def _step_allocate(run, step, what):
    run.allocate(*_range(run, step, what, PAGE_SIZE))


def _step_punch(run, step, what):
    run.punch(*_range(run, step, what, PAGE_SIZE))


def _step_write(run, step, what):
    off, size = _range(run, step, what, PAGE_SIZE)
    run.write(off, size, _num(step, "fill", T.DEFAULT_FILL, what=what))


def _step_read(run, step, what):
    run.read(*_range(run, step, what, PAGE_SIZE))


def _step_pin(run, step, what):
    off, size = _range(run, step, what, PAGE_SIZE)
    run.pin(off, size, str(step.get("id", off)))


def _step_unpin(run, step, what):
    run.unpin(str(step["id"]))


def _step_convert(run, step, what):
    off, size = _range(run, step, what, PAGE_SIZE)
    run.convert(off, size, T.parse_attrs(step["attrs"]), T.parse_flags(step.get("flags")),
                exits=parse_bool(step.get("exits", False)))


def _step_accept(run, step, what):
    off, size = _range(run, step, what, T.ALL)
    run.accept(off, size, parse_chunk(step.get("chunk", "2M")), slices=20)


def _window_options(step) -> dict:
    return {"reaccept": parse_bool(step.get("reaccept", True)),
            "exits": parse_bool(step.get("exits", True)),
            "shared_phase": step.get("phase", "to-shared"),
            "private_phase": step.get("phase", "to-private")}


def _reseed(run, step):
    if "seed" in step:
        run.rng = np.random.default_rng(parse_int(step["seed"]))


def _step_random(run, step, what):
    off, size = _range(run, step, what, T.ALL)
    granule = parse_granule(step.get("granule", "4K"))
    count = parse_count(step["count"])
    to = T.parse_attrs(step.get("attrs", "shared"))
    _reseed(run, step)
    if to:
        raise ScenarioError(f"{what}: random conversions go to shared (and back with "
                            "'window'); attrs = 'private' is not supported")
    window = parse_count(step.get("window", count))
    do_window(run, off, size, count, window=window, granule=granule, **_window_options(step))


def _step_churn(run, step, what):
    off, size = _range(run, step, what, T.ALL)
    granule = parse_granule(step.get("granule", "4K"))
    n = size // granule
    order = str(step.get("order", "random"))
    if order not in ("random", "sequential"):
        raise ScenarioError(f"{what}: order must be 'random' or 'sequential'")
    _reseed(run, step)
    opts = _window_options(step)
    for _ in range(parse_count(step.get("iterations", 1))):
        pages = run.rng.permutation(n) if order == "random" else np.arange(n)
        do_window(run, off, size, n, window=n, granule=granule, pages=pages, **opts)
        run.phase(opts["private_phase"])
        offs = off + pages * granule
        run.convert_many(offs, granule, PRIVATE, exits=opts["exits"])
        if opts["reaccept"]:
            run.accept_many(offs, granule, PAGE_SIZE if granule < TWO_MIB else TWO_MIB)
        run.sample()


def _step_balloon(run, step, what):
    size = parse_size_or_percent(step["size"])
    granule = parse_granule(step.get("granule", "2M"))
    if isinstance(size, float):
        size = int(run.size * size) // granule * granule
    do_balloon(run, size, granule, parse_count(step.get("rounds", 1)),
               chunk=parse_chunk(step.get("chunk", "2M")))


def _step_launch(run, step, what):
    kernel = parse_size_or_auto(step.get("kernel", 0))
    do_launch(run, step.get("ovmf", "synthetic"), 0 if isinstance(kernel, str) else kernel,
              parse_count(step.get("vcpus", 1)))


def _step_swiotlb(run, step, what):
    chunk = parse_size_or_auto(step.get("chunk", "2M"))
    do_swiotlb(run, parse_size_or_auto(step.get("size", "auto")),
               0 if isinstance(chunk, str) else chunk)


def _step_set_private(run, step, what):
    if run.in_place:
        raise ScenarioError(f"{what}: set-private is the legacy VMM's startup step "
                            "(tracking = 'legacy')")
    run.set_private_all()


def _step_trace(run, step, what):
    run.apply(T.read_trace(step["file"]))


# op -> (required keys, optional keys, what it does)
STEPS = {
    "convert": ({"offset", "size", "attrs"}, {"flags", "exits"}, _step_convert),
    "allocate": ({"offset", "size"}, set(), _step_allocate),
    "punch": ({"offset", "size"}, set(), _step_punch),
    "write": ({"offset", "size"}, {"fill"}, _step_write),
    "read": ({"offset", "size"}, set(), _step_read),
    "pin": ({"offset"}, {"size", "id"}, _step_pin),
    "unpin": ({"id"}, set(), _step_unpin),
    "accept": (set(), {"offset", "size", "chunk"}, _step_accept),
    "random": ({"count"}, {"offset", "size", "granule", "attrs", "window", "reaccept", "exits", "seed"},
               _step_random),
    "churn": ({"offset", "size"}, {"iterations", "granule", "order", "reaccept", "exits", "seed"},
              _step_churn),
    "balloon": ({"size"}, {"granule", "rounds", "chunk"}, _step_balloon),
    "launch": (set(), {"ovmf", "kernel", "vcpus"}, _step_launch),
    "swiotlb": (set(), {"size", "chunk"}, _step_swiotlb),
    "set-private": (set(), set(), _step_set_private),
    "trace": ({"file"}, set(), _step_trace),
}


def run_step(run: Runner, step: dict, what: str) -> None:
    """Run one checked step of a scenario file, then take a timeline sample."""
    op = step["op"]
    run.phase(step.get("phase", op))
    try:
        STEPS[op][2](run, step, what)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ScenarioError) and str(exc).startswith(what):
            raise
        raise ScenarioError(f"{what} ({op}): {exc}") from None
    run.sample()
