"""User scenarios in TOML files: reading and checking them, and running their steps
(the schema is in ``examples/README.md``).

Every value of a file is read and checked when the file is loaded, so a bad value is
reported (file, step, key and why) before anything runs.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import trace as T
from ..cost import BUILTIN_PROFILES, CostModel
from ..units import MAX_FILE_SIZE, PAGE_SIZE, format_size
from .params import (COMMON_PARAMS, MAX_CONVERSIONS, TRACE_SCENARIO, ScenarioError, choice,
                     parse_bool, parse_chunk, parse_conversions, parse_count, parse_granule,
                     parse_name, parse_seed, parse_size_or_auto, parse_size_or_percent,
                     parse_vcpus, resolve_params)
from .runner import PRIVATE, TWO_MIB, Runner
from .workloads import do_balloon, do_launch, do_swiotlb, do_window

__all__ = ["STEPS", "ScenarioFile", "load_scenario_file", "parse_step", "run_step"]

@dataclass
class ScenarioFile:
    """A user scenario read from TOML: guest parameters, cost settings, steps, and the
    failed operations it expects (``expect``: errno name -> count, or ``None`` when the
    file does not say)."""
    path: str
    name: str
    description: str
    guest: dict
    profile: str | None
    cost_overrides: dict
    steps: list
    expect: dict | None = None
    traces: dict = field(default_factory=dict, repr=False)     # trace file -> TraceOps, read once


# ---------------------------------------------------------------------------- values

def _offset(value):
    return T.parse_number(value, "offset", limit=MAX_FILE_SIZE)


def _range_size(value):
    return T.parse_number(value, "size", allow_all=True, limit=MAX_FILE_SIZE)


def _access_size(value):
    n = _range_size(value)
    if n > T.HOST_ACCESS_MAX:
        raise ValueError(f"size: {value!r}: one host access is at most {format_size(T.HOST_ACCESS_MAX)} "
                         "(the model keeps the bytes written)")
    return n


def _fill(value):
    n = T.parse_number(value, "fill", sizes=False)
    if not 0 <= n <= 255:
        raise ValueError(f"fill: {value!r} is not a byte value 0-255")
    return n


def _path(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file name, not {type(value).__name__} {value!r}")
    return value


def _kernel(value):
    n = parse_size_or_auto(value)
    if isinstance(n, str):
        raise ValueError(f"kernel: give a size like '16M', or 0 for none, not {value!r}")
    return n


def _shared_only(value):
    if T.parse_attrs(value):
        raise ValueError("random conversions go to shared (and back with 'window'); "
                         "attrs = 'private' is not supported")
    return 0


def _swiotlb_chunk(value):
    n = parse_size_or_auto(value)
    return 0 if isinstance(n, str) else n


# ---------------------------------------------------------------------------- steps

def _range(run: Runner, a: dict) -> tuple[int, int]:
    return a["offset"], run.resolve(a["offset"], a["size"])


def _step_allocate(run, a, what):
    run.allocate(*_range(run, a))


def _step_punch(run, a, what):
    run.punch(*_range(run, a))


def _step_write(run, a, what):
    run.write(*_range(run, a), a["fill"])


def _step_read(run, a, what):
    run.read(*_range(run, a))


def _step_pin(run, a, what):
    run.pin(*_range(run, a), a["id"] if a["id"] is not None else str(a["offset"]))


def _step_unpin(run, a, what):
    run.unpin(a["id"])


def _step_convert(run, a, what):
    off, size = _range(run, a)
    run.convert(off, size, a["attrs"], a["flags"], exits=a["exits"])


def _step_accept(run, a, what):
    run.accept(*_range(run, a), a["chunk"], slices=20)


def _window_options(a) -> dict:
    return {"reaccept": a["reaccept"], "exits": a["exits"],
            "shared_phase": a["phase"] or "to-shared", "private_phase": a["phase"] or "to-private"}


def _reseed(run, a):
    if a["seed"] is not None:
        run.rng = np.random.default_rng(a["seed"])


def _step_random(run, a, what):
    off, size = _range(run, a)
    _reseed(run, a)
    window = a["window"] if a["window"] is not None else a["count"]
    do_window(run, off, size, a["count"], window=window, granule=a["granule"], **_window_options(a))


def _churn_pieces(a: dict, guest_size: int) -> int:
    size = guest_size - a["offset"] if a["size"] == T.ALL else a["size"]
    n = max(0, size) // a["granule"]
    if n > MAX_CONVERSIONS:
        raise ScenarioError(f"churn over {format_size(size)} in {format_size(a['granule'])} pieces: "
                            f"{n:,} pieces, at most {MAX_CONVERSIONS:,} (2^28); use a larger granule")
    return n


def _step_churn(run, a, what):
    off, size = _range(run, a)
    granule = a["granule"]
    n = _churn_pieces(a, run.size)
    _reseed(run, a)
    opts = _window_options(a)
    iterations = a["iterations"]
    for it in range(iterations):
        with run.part(it, iterations, f"iteration {it + 1}/{iterations}" if iterations > 1 else ""):
            pages = run.rng.permutation(n) if a["order"] == "random" else np.arange(n)
            with run.part(0, 3, "to shared"):
                do_window(run, off, size, n, window=n, granule=granule, pages=pages, **opts)
            run.phase(opts["private_phase"])
            offs = off + pages * granule
            with run.part(1, 3):
                run.convert_many(offs, granule, PRIVATE, exits=opts["exits"], label="to private")
            if opts["reaccept"]:
                with run.part(2, 3):
                    run.accept_many(offs, granule, PAGE_SIZE if granule < TWO_MIB else TWO_MIB)
            run.sample()


def _balloon_bytes(a: dict, guest_size: int) -> int:
    size = a["size"]
    if isinstance(size, float):
        size = int(guest_size * size) // a["granule"] * a["granule"]
    return size


def _step_balloon(run, a, what):
    do_balloon(run, _balloon_bytes(a, run.size), a["granule"], a["rounds"], chunk=a["chunk"])


def _step_launch(run, a, what):
    do_launch(run, a["ovmf"], a["kernel"], a["vcpus"])


def _step_swiotlb(run, a, what):
    do_swiotlb(run, a["size"], a["chunk"])


def _step_set_private(run, a, what):
    if run.in_place:
        raise ScenarioError(f"{what}: set-private is the legacy VMM's startup step "
                            "(tracking = 'legacy')")
    run.set_private_all()


def _step_trace(run, a, what):
    run.apply(a["trace"])


@dataclass(frozen=True)
class Step:
    """One op of a scenario file: its keys (required ones and optional ones with their
    defaults), each with the parser that reads it, and the function that runs it."""
    required: dict
    optional: dict          # key -> (parser, default)
    run: Callable


_R = (_offset, 0)
STEPS = {
    "convert": Step({"offset": _offset, "size": _range_size, "attrs": T.parse_attrs},
                    {"flags": (T.parse_flags, 0), "exits": (parse_bool, False)}, _step_convert),
    "allocate": Step({"offset": _offset, "size": _range_size}, {}, _step_allocate),
    "punch": Step({"offset": _offset, "size": _range_size}, {}, _step_punch),
    "write": Step({"offset": _offset, "size": _access_size}, {"fill": (_fill, T.DEFAULT_FILL)}, _step_write),
    "read": Step({"offset": _offset, "size": _access_size}, {}, _step_read),
    "pin": Step({"offset": _offset}, {"size": (_range_size, PAGE_SIZE), "id": (parse_name, None)}, _step_pin),
    "unpin": Step({"id": parse_name}, {}, _step_unpin),
    "accept": Step({}, {"offset": _R, "size": (_range_size, T.ALL), "chunk": (parse_chunk, TWO_MIB)},
                   _step_accept),
    "random": Step({"count": parse_conversions},
                   {"offset": _R, "size": (_range_size, T.ALL), "granule": (parse_granule, PAGE_SIZE),
                    "attrs": (_shared_only, 0), "window": (parse_count, None),
                    "reaccept": (parse_bool, True), "exits": (parse_bool, True), "seed": (parse_seed, None)},
                   _step_random),
    "churn": Step({"offset": _offset, "size": _range_size},
                  {"iterations": (parse_count, 1), "granule": (parse_granule, PAGE_SIZE),
                   "order": (choice("random", "sequential"), "random"), "reaccept": (parse_bool, True),
                   "exits": (parse_bool, True), "seed": (parse_seed, None)}, _step_churn),
    "balloon": Step({"size": parse_size_or_percent},
                    {"granule": (parse_granule, TWO_MIB), "rounds": (parse_count, 1),
                     "chunk": (parse_chunk, TWO_MIB)}, _step_balloon),
    "launch": Step({}, {"ovmf": (_path, "synthetic"), "kernel": (_kernel, 0), "vcpus": (parse_vcpus, 1)},
                   _step_launch),
    "swiotlb": Step({}, {"size": (parse_size_or_auto, "auto"), "chunk": (_swiotlb_chunk, TWO_MIB)},
                    _step_swiotlb),
    "set-private": Step({}, {}, _step_set_private),
    "trace": Step({"file": _path}, {}, _step_trace),
}
_STEP_KEYS_COMMON = {"op": None, "phase": (parse_name, None), "repeat": (parse_count, 1)}


def _parse_value(parser, value, key: str, what: str, op: str):
    try:
        return parser(value)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        raise ScenarioError(f"{what} ({op}): " + (msg if msg.startswith(f"{key}:") else f"{key}: {msg}")) from None


def parse_step(step, what: str, *, traces: dict | None = None) -> dict:
    """Read and check one step (a table of a scenario file): its values, parsed, with
    the defaults filled in (``op``, ``phase``, ``repeat`` and the op's keys). A step of
    op ``trace`` reads its trace file (kept in ``traces``, by path, when given)."""
    if not isinstance(step, dict) or "op" not in step:
        raise ScenarioError(f"{what}: a step is a table with an 'op' (one of {', '.join(STEPS)})")
    op = step["op"]
    if not isinstance(op, str) or op not in STEPS:
        raise ScenarioError(f"{what}: unknown op {op!r} (known: {', '.join(STEPS)})")
    spec = STEPS[op]
    missing = sorted(set(spec.required) - set(step))
    if missing:
        raise ScenarioError(f"{what} ({op}): missing key(s) {', '.join(missing)}")
    known = set(spec.required) | set(spec.optional) | set(_STEP_KEYS_COMMON)
    bad = sorted(set(step) - known)
    if bad:
        raise ScenarioError(f"{what} ({op}): unknown key(s) {', '.join(map(str, bad))} (known: "
                            f"{', '.join(sorted(known))})")
    out = {"op": op}
    for key, (parser, default) in {**{k: v for k, v in _STEP_KEYS_COMMON.items() if v},
                                   **spec.optional}.items():
        out[key] = _parse_value(parser, step[key], key, what, op) if key in step else default
    for key, parser in spec.required.items():
        out[key] = _parse_value(parser, step[key], key, what, op)
    if op == "trace":
        path = out["file"]
        ops = traces.get(path) if traces is not None else None
        if ops is None:
            try:
                ops = T.read_trace(path)
            except T.TraceError as exc:
                raise ScenarioError(f"{what} (trace): {exc}") from None
            if traces is not None:
                traces[path] = ops
        out["trace"] = ops
    return out


def _check_for_guest(a: dict, guest_size: int, what: str) -> None:
    """The checks of a parsed step that depend on the guest's size."""
    if a["op"] == "churn":
        try:
            _churn_pieces(a, guest_size)
        except ScenarioError as exc:
            raise ScenarioError(f"{what} (churn): {exc}") from None
    if a["op"] == "balloon" and guest_size // a["granule"] > MAX_CONVERSIONS:
        raise ScenarioError(f"{what} (balloon): the guest holds {guest_size // a['granule']:,} "
                            f"{format_size(a['granule'])} blocks, at most {MAX_CONVERSIONS:,} (2^28); "
                            "use a larger granule")


# ---------------------------------------------------------------------------- the file

def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: '{key}' must be a table ([{key}]), not {type(value).__name__} "
                            f"{value!r}")
    return value


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ScenarioError(f"{what} must be text, not {type(value).__name__} {value!r}")
    return value


def _cost_table(data: dict, where: str, base: Path) -> tuple[str | None, dict]:
    cost = _table(data, "cost", where)
    bad = sorted(set(cost) - {"profile", "set"})
    if bad:
        raise ScenarioError(f"{where}: [cost]: unknown key(s) {', '.join(bad)} (known: profile, set)")
    profile = cost.get("profile")
    if profile is not None:
        profile = _text(profile, f"{where}: [cost]: profile")
        if profile not in BUILTIN_PROFILES and not Path(profile).is_absolute():
            profile = str(base / profile)           # a profile file, next to the scenario file
        try:
            CostModel.from_profile(profile)
        except OSError:
            raise ScenarioError(f"{where}: [cost]: profile {profile!r}: no such built-in profile or file "
                                f"(built-in: {', '.join(BUILTIN_PROFILES)})") from None
        except (ValueError, TypeError) as exc:
            raise ScenarioError(f"{where}: [cost]: profile: {exc}") from None
    overrides = cost.get("set", {})
    if not isinstance(overrides, dict):
        raise ScenarioError(f"{where}: [cost]: set must be a table of counter = ns, like "
                            f"{{ guest_exits = 2000.0 }}, not {type(overrides).__name__} {overrides!r}")
    try:
        CostModel.from_profile("snp").with_overrides(**overrides)   # names and figures checked
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"{where}: [cost]: set: {exc}") from None
    return profile, dict(overrides)


def _expect_table(data: dict, where: str) -> dict | None:
    if "expect" not in data:
        return None
    expect = _table(data, "expect", where)
    bad = sorted(set(expect) - {"errors"})
    if bad:
        raise ScenarioError(f"{where}: [expect]: unknown key(s) {', '.join(bad)} (known: errors)")
    try:
        return T.parse_error_counts(expect.get("errors", {}), "errors")
    except ValueError as exc:
        raise ScenarioError(f"{where}: [expect]: {exc}") from None


def load_scenario_file(path) -> ScenarioFile:
    """Read and check a TOML scenario file (schema: ``examples/README.md``); every value
    is checked here. A UTF-8 byte-order mark at the start is allowed."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ScenarioError(f"{where}: not a text file (UTF-8)") from None
    except OSError as exc:
        raise ScenarioError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{where}: not valid TOML ({exc})") from None
    except (RecursionError, ValueError) as exc:      # nested too deeply, a number too long
        raise ScenarioError(f"{where}: not valid TOML ({exc or 'nested too deeply'})") from None
    extra = sorted(set(data) - {"scenario", "guest", "cost", "steps", "step", "expect"})
    if extra:
        raise ScenarioError(f"{where}: unknown table(s) {', '.join(extra)} (known: scenario, guest, "
                            "cost, expect, steps)")
    meta = _table(data, "scenario", where)
    bad = sorted(set(meta) - {"name", "description"})
    if bad:
        raise ScenarioError(f"{where}: [scenario]: unknown key(s) {', '.join(bad)} (known: name, description)")
    name = _text(meta.get("name", path.stem), f"{where}: [scenario]: name")
    description = _text(meta.get("description", f"scenario file {path.name}"),
                        f"{where}: [scenario]: description")
    guest = dict(_table(data, "guest", where))
    bad = sorted(set(guest) - set(COMMON_PARAMS) - {"in_place"})
    if bad:
        raise ScenarioError(f"{where}: [guest]: unknown key(s) {', '.join(bad)} "
                            f"(known: {', '.join(COMMON_PARAMS)})")
    try:
        if "in_place" in guest:
            guest["tracking"] = "in-place" if parse_bool(guest.pop("in_place")) else "legacy"
        resolve_params(TRACE_SCENARIO, guest)
    except (ScenarioError, ValueError) as exc:
        raise ScenarioError(f"{where}: [guest]: {exc}") from None
    base = path.parent
    profile, overrides = _cost_table(data, where, base)
    expect = _expect_table(data, where)
    steps = data.get("steps", data.get("step", []))
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ScenarioError(f"{where}: steps must be tables: write each as [[steps]] with an op")
    if not steps:
        raise ScenarioError(f"{where}: no steps: add [[steps]] tables (each with an op)")
    sf = ScenarioFile(where, name, description, guest, profile, overrides, steps, expect)
    for i, step in enumerate(steps, 1):
        for key in ("file", "ovmf"):       # files are named relative to the scenario file
            if (step.get("op") == ("trace" if key == "file" else "launch") and isinstance(step.get(key), str)
                    and step[key] != "synthetic"):
                step[key] = str(base / step[key])
        parse_step(step, f"{where}: step {i}", traces=sf.traces)
    return sf


def check_for_guest(sf: ScenarioFile, guest_size: int) -> None:
    """The checks of a scenario file's steps that depend on the guest's size (so a step
    too large for its guest is refused before anything runs)."""
    for i, step in enumerate(sf.steps, 1):
        what = f"{sf.path}: step {i}"
        _check_for_guest(parse_step(step, what, traces=sf.traces), guest_size, what)


def run_step(run: Runner, step: dict, what: str, *, traces: dict | None = None, parsed=None) -> None:
    """Run one step of a scenario file (``parsed``: its values as :func:`parse_step`
    returns them, else read from ``step``), then take a timeline sample."""
    a = parsed if parsed is not None else parse_step(step, what, traces=traces)
    op = a["op"]
    run.phase(a["phase"] or op)
    run.where = f"{what} ({op})"
    try:
        STEPS[op].run(run, a, what)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ScenarioError) and str(exc).startswith(what):
            raise
        raise ScenarioError(f"{what} ({op}): {exc}") from None
    finally:
        run.where = ""
    run.sample()
