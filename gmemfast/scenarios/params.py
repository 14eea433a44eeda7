"""Scenario parameters: their parsers, the common ones, and the scenario registry."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..platforms.vmsa import MAX_VCPUS
from ..units import ACCEPT_CHUNKS, MAX_FILE_SIZE, MAX_GPA, PAGE_SIZE, format_size, parse_size

__all__ = ["COMMON_PARAMS", "MAX_CONVERSIONS", "MAX_GUEST_SIZE", "OperationFailed", "Param", "Scenario",
           "ScenarioError", "SCENARIOS", "TRACE_SCENARIO", "get_scenario", "resolve_params", "scenario",
           "guest_record"]


class ScenarioError(ValueError):
    """A scenario, its parameters or a scenario file is wrong (the message says how)."""


class OperationFailed(Exception):
    """An operation on guest memory failed in a strict run (``strict=True``); the message
    says which, where and with what errno. Not bad input: the input was read, and the
    model answered an error."""


#: Guest memory above 2 GiB sits at 4 GiB and up (as q35 lays it out), below GPA 2^52.
MAX_GUEST_SIZE = MAX_GPA - (2 << 30)
#: The most conversions (or pieces) one workload step makes: the model holds one 8-byte
#: offset per conversion in memory, 2 GiB at this limit (every 4 KiB page of 1 TiB).
MAX_CONVERSIONS = 1 << 28


def _size(value) -> int:
    try:
        return parse_size(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _check_size_limit(n: int, value) -> int:
    if n > MAX_FILE_SIZE:
        raise ValueError(f"{value!r} is larger than {format_size(MAX_FILE_SIZE)} (2^57 bytes), the "
                         "largest file the model holds")
    return n


def parse_size_param(value) -> int:
    """The guest's memory size: positive, at most :data:`MAX_GUEST_SIZE`."""
    n = _size(value)
    if n <= 0:
        raise ValueError(f"size must be positive, not {value!r}")
    if n > MAX_GUEST_SIZE:
        raise ValueError(f"size {value!r} is larger than the model's largest guest, "
                         f"{format_size(MAX_GUEST_SIZE)} (its memory above 2G starts at 4G and "
                         f"ends below GPA 2^52)")
    return n


def parse_order(value) -> int:
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


def parse_int(value) -> int:
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


def parse_count(value) -> int:
    """A count of at least 1 (zero or negative counts are refused)."""
    n = parse_int(value)
    if n < 1:
        raise ValueError(f"expected a count of at least 1, not {value!r}")
    return n


def parse_conversions(value) -> int:
    """A number of conversions: from 1 to :data:`MAX_CONVERSIONS`."""
    n = parse_count(value)
    if n > MAX_CONVERSIONS:
        raise ValueError(f"{value!r} conversions: at most {MAX_CONVERSIONS:,} (2^28) per step, as the "
                         "model keeps each one's offset in memory (8 bytes each)")
    return n


def parse_seed(value) -> int:
    n = parse_int(value)
    if n < 0:
        raise ValueError(f"a seed is an integer >= 0, not {value!r}")
    return n


def parse_vcpus(value) -> int:
    n = parse_count(value)
    if n > MAX_VCPUS:
        raise ValueError(f"{value!r} vCPUs: at most {MAX_VCPUS} (KVM_MAX_VCPUS)")
    return n


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def parse_name(value) -> str:
    """A name (a phase, a pin id): a non-empty string (or an integer, used as text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"expected a name (text), not {type(value).__name__} {value!r}")
    text = str(value).strip()
    if not text:
        raise ValueError("expected a name, not an empty string")
    return text


def parse_granule(value) -> int:
    n = _size(value)
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"granule {value!r} must be a positive multiple of 4K")
    return _check_size_limit(n, value)


def parse_chunk(value) -> int:
    n = _size(value)
    if n not in ACCEPT_CHUNKS:
        raise ValueError(f"chunk {value!r} must be 4K or 2M (the guest accepts 4 KiB or 2 MiB pages)")
    return n


def parse_mapping(value):
    """The host's private mapping level: ``"auto"`` or 4K, 2M, 1G (bytes)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    n = parse_size(value)
    if n not in (PAGE_SIZE, 2 << 20, 1 << 30):
        raise ValueError(f"private mapping {value!r} must be auto, 4K, 2M or 1G")
    return n


parse_mapping.choices = ("auto", "4K", "2M", "1G")


def parse_size_or_auto(value):
    if isinstance(value, str) and value.strip().lower() in ("auto", "all"):
        return value.strip().lower()
    n = _size(value)
    if n < 0 or n % PAGE_SIZE:
        raise ValueError(f"{value!r} must be a multiple of 4K (or 'auto')")
    return _check_size_limit(n, value)


def parse_size_or_percent(value):
    """``"25%"`` -> 0.25 (a fraction of the guest), else a size in bytes."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            f = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage like '25%'") from None
        if not 0 < f <= 1:
            raise ValueError(f"{value!r}: a percentage must be in (0, 100]")
        return f
    n = _size(value)
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"{value!r} must be a positive multiple of 4K or a percentage like '25%'")
    return _check_size_limit(n, value)


def choice(*choices):
    def parse(value):
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text
    parse.choices = choices
    return parse


def optionalchoice(*choices):
    inner = choice(*choices)

    def parse(value):
        if value is None or str(value).strip().lower() in ("", "auto", "default"):
            return None
        return inner(value)
    parse.choices = choices
    return parse


def show_value(value) -> str:
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
        return show_value(value)


COMMON_PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("size", parse_size_param, 64 << 30, "guest memory size (4G, 512G, 4T: binary units)", True),
    Param("platform", choice("snp", "tdx", "sw-protected"), "snp", "VM type"),
    Param("page_order", parse_order, 0, "backing page order: 0 (4K), 9 (2M hugetlb), 18 (1G hugetlb)"),
    Param("direct_map", choice("keep", "no-direct-map", "on-conversion"), "keep",
          "direct-map policy"),
    Param("tracking", choice("in-place", "legacy"), "in-place",
          "attribute tracking: per guest_memfd (in-place) or per GFN on the VM (legacy)"),
    Param("flow", optionalchoice("in-place", "legacy"), None,
          "launch populate flow (default: same as tracking; in-place needs in-place tracking)"),
    Param("merge", choice("eager", "never"), "eager", "huge-page re-merge on conversion to private"),
    Param("private_mapping", parse_mapping, "auto",
          "level at which the host maps private memory: 4K, 2M, 1G, bounded by the page order "
          "(auto: what upstream KVM does: 4K on TDX, the page order elsewhere, at most 2M on SNP)", True),
    Param("prefault", parse_bool, False, "the VMM maps private memory before the guest accepts it "
                                         "(KVM_PRE_FAULT_MEMORY; QEMU does it on SNP page-state changes)"),
    Param("seed", parse_seed, 0, "random seed (an integer >= 0)"),
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
    check_common(out)
    return out


def check_common(p: dict) -> None:
    if p["flow"] is None:
        p["flow"] = p["tracking"]
    if p["flow"] == "in-place" and p["tracking"] == "legacy":
        raise ScenarioError("flow 'in-place' needs tracking 'in-place': a legacy VM cannot "
                            "host-map guest_memfd to load it while shared")
    unit = PAGE_SIZE << p["page_order"]
    if p["size"] % unit:
        raise ScenarioError(f"size {format_size(p['size'])} is not a multiple of the backing "
                            f"page size {format_size(unit)}")


# Trace replays and scenario files run on a guest described by the common parameters only.
TRACE_SCENARIO = Scenario("trace", "replay of an operation trace", None, {}, {})


def guest_record(p: dict) -> dict:
    """The guest parameters as a trace ``guest`` record (``flow`` only where it is not
    the default, the tracking mode, so that a replay under other tracking follows it)."""
    rec = {"size": format_size(p["size"]), "platform": p["platform"], "page_order": p["page_order"],
           "direct_map": p["direct_map"], "tracking": p["tracking"]}
    if p["flow"] not in (None, p["tracking"]):
        rec["flow"] = p["flow"]
    rec["merge"] = p["merge"]
    return rec


def show_params(spec: dict, values: dict) -> dict:
    """Each parameter's value as a person types it (``spec``: name -> :class:`Param`)."""
    return {k: (spec[k].show(v) if k in spec else show_value(v)) for k, v in values.items()}
