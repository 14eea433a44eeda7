"""Turn work counters into estimated time.

Every operation of the model adds to the counters named in
:data:`gmemfast._layout.COUNTER_NAMES` (host PTEs zapped, bytes zeroed, SEAMCALLs by
leaf, ...). A :class:`CostModel` gives each counter a figure in **nanoseconds per unit**,
where the unit is what one count of that counter means (:data:`COUNTER_UNITS`: a host
PTE, a byte zeroed in 4 KiB chunks, one SEAMCALL, ...), and every figure names its
source. :meth:`CostModel.estimate` multiplies the counts by the figures and returns an
:class:`Estimate` that can be printed as a table or saved as JSON.

Profiles are TOML files. Three are built in (``snp``, ``tdx``, ``sw-protected``, in
``gmemfast/profiles/``); a user profile has the same shape::

    [profile]
    name = "my-host"                   # optional; defaults to the file name
    description = "what machine this describes"

    [counters.attr_writes_page]
    ns = 96.86                         # nanoseconds per unit (here: per entry written)
    source = "calibrated: 26 s / 2^28 pages, from ..."

    [counters.bytes_zeroed_4k]
    gb_per_s = 13.7                    # byte counters may give a bandwidth instead,
    source = "published: ..."          # in 10^9 bytes per second (ns per byte = 1 / gb_per_s)

Every entry needs a ``source``: a public source (paper, LKML thread subject and date,
vendor document) or ``estimate:`` followed by the reasoning. The built-in profiles
start each source with one of ``published:``, ``calibrated:``, ``estimate:``,
``no cost:`` or ``not applicable:``. A counter a profile does not mention costs
nothing but is reported as *unpriced*, so no work is dropped silently.

A profile also names the **resources** the work shares, for wall-clock time
(:mod:`gmemfast.wallclock`, docs/model.md §10)::

    [resources.psp]
    kind = "serial"                    # one at a time: a lock, a firmware engine
    scope = "host"                     # "host": shared by every VM; "vm": one per VM
    what = "the AMD Secure Processor runs one firmware command at a time"
    counters = ["snp_fw_launch_update", "snp_fw_launch_finish"]   # whole figure held
    source = "published: drivers/crypto/ccp/sev-dev.c, sev_cmd_mutex"

    [resources.td_private_fault.holds]  # serial: ns of the resource each count keeps busy
    tdx_seamcall_page_aug = 1700.0

    [resources.membw]
    kind = "bandwidth"                 # saturates: bytes / gb_per_s bounds the time
    gb_per_s = 150.0
    counters = ["bytes_zeroed_4k"]     # byte counters; others give bytes_each
    bytes_each = { guest_pages_touched = 8192 }

A ``kind = "shared"`` resource (a lock taken for read) bounds nothing; it documents why
its counters run in parallel. ``[profile] base = "snp"`` starts from a built-in profile:
its counters and resources are kept unless the file gives them again.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from ._layout import COUNTER_NAMES
from .report import estimate_table, format_ns

__all__ = [
    "BUILTIN_PROFILES",
    "PROFILE_ALIASES",
    "RESOURCE_KINDS",
    "Resource",
    "BYTE_COUNTERS",
    "COUNTER_UNITS",
    "CostModel",
    "Estimate",
    "UNATTRIBUTED",
    "format_ns",
]

BUILTIN_PROFILES = ("snp", "tdx", "sw-protected", "snp-genoa", "tdx-gnr")
#: Other names of built-in profiles: the CPU generation of each platform's default.
PROFILE_ALIASES: Mapping[str, str] = MappingProxyType({"snp-milan": "snp", "tdx-spr": "tdx"})
#: Kinds of resource: serial (one holder at a time), bandwidth (saturates), shared (no bound).
RESOURCE_KINDS = ("serial", "bandwidth", "shared")
_SCOPES = ("vm", "host")

#: What one count of each counter means; a profile's figure is nanoseconds per this unit.
COUNTER_UNITS: Mapping[str, str] = MappingProxyType({
    "host_faults": "host page fault mapping one page into a process",
    "host_ptes_zapped": "host userspace PTE cleared",
    "tlb_invlpg": "page invalidated with INVLPG on the local CPU",
    "tlb_flush_full": "full local TLB flush",
    "tlb_shootdowns": "remote TLB shootdown (IPIs to the other CPUs and the wait for them)",
    "guest_invalidations": "guest-mapping invalidation of one range (mmu lock, walk, VM-wide TLB flush)",
    "guest_ptes_zapped": "stage-2 (NPT/EPT) leaf entry zapped",
    "folios_checked": "folio whose reference count was checked",
    "lru_drains": "lru_add_drain_all() call",
    "folio_splits_2m": "2 MiB folio split into 4 KiB folios",
    "folio_splits_1g": "1 GiB folio split into 4 KiB folios",
    "folio_merges_2m": "2 MiB folio merged back from 4 KiB folios",
    "folio_merges_1g": "1 GiB folio merged back from 4 KiB folios",
    "vmemmap_pages_restored": "4 KiB vmemmap page restored (hugetlb vmemmap optimisation undone)",
    "vmemmap_pages_freed": "4 KiB vmemmap page freed (hugetlb vmemmap optimisation applied)",
    "pages_allocated": "4 KiB page allocated",
    "pages_freed": "4 KiB page freed",
    "pins": "long-term pin taken",
    "unpins": "long-term pin released",
    "pages_zeroed": "4 KiB page zeroed",
    "bytes_zeroed_4k": "byte zeroed in 4 KiB chunks",
    "bytes_zeroed_2m": "byte zeroed in 2 MiB chunks",
    "bytes_zeroed_1g": "byte zeroed in 1 GiB chunks",
    "bytes_copied": "byte copied by a kernel memcpy: the host's, or the guest's SWIOTLB bounce copies",
    "dmap_entries_changed": "kernel direct-map entry changed (removed or restored)",
    "dmap_splits_1g": "1 GiB direct-map entry split into 2 MiB entries",
    "dmap_splits_2m": "2 MiB direct-map entry split into 4 KiB entries",
    "attr_writes_page": "per-page attribute entry written (legacy per-GFN store)",
    "attr_writes_range": "attribute range stored (per-file range store)",
    "pages_to_private": "4 KiB page converted to private",
    "pages_to_shared": "4 KiB page converted to shared",
    "convert_calls": "conversion ioctl call",
    "convert_noop": "conversion call that found nothing to change",
    "convert_einval": "conversion call refused with EINVAL (bad arguments)",
    "convert_eopnotsupp": "conversion call refused with EOPNOTSUPP (content mode not supported)",
    "convert_enomem": "conversion call failed with ENOMEM",
    "convert_eagain": "conversion call failed with EAGAIN",
    "fallocate_calls": "fallocate() call",
    "punch_calls": "fallocate(PUNCH_HOLE) call",
    "punch_eagain": "punch-hole call failed with EAGAIN",
    "vm_attr_calls": "KVM_SET_MEMORY_ATTRIBUTES call on the VM",
    "rmp_updates": "RMPUPDATE instruction",
    "psmash": "PSMASH instruction (2 MiB RMP entry split into 4 KiB entries)",
    "snp_fw_launch_update": "SNP_LAUNCH_UPDATE firmware (PSP) command, one per page",
    "snp_fw_launch_finish": "SNP_LAUNCH_FINISH firmware (PSP) command",
    "snp_pvalidate_4k": "4 KiB page validated by the guest",
    "snp_pvalidate_2m": "2 MiB page validated by the guest",
    "tdx_seamcall_page_add": "TDH.MEM.PAGE.ADD SEAMCALL",
    "tdx_seamcall_mr_extend": "TDH.MR.EXTEND SEAMCALL",
    "tdx_seamcall_page_aug": "TDH.MEM.PAGE.AUG SEAMCALL",
    "tdx_seamcall_block": "TDH.MEM.RANGE.BLOCK SEAMCALL",
    "tdx_seamcall_track": "TDH.MEM.TRACK SEAMCALL",
    "tdx_seamcall_demote": "TDH.MEM.PAGE.DEMOTE SEAMCALL",
    "tdx_seamcall_page_remove": "TDH.MEM.PAGE.REMOVE SEAMCALL",
    "tdx_accepts": "TDG.MEM.PAGE.ACCEPT of a 4 KiB page by the guest",
    "guest_exits": "guest exit to the host and re-entry",
    "hash_bytes": "byte hashed (SHA-384) for a launch measurement",
    "pages_populated_inplace": "page populated in place",
    "pages_populated_legacy": "page populated from a separate source",
    "accept_fallbacks": "2 MiB accept or validation refused because the host maps the range at 4 KiB "
                        "(retried at 4 KiB)",
    "prefault_calls": "KVM_PRE_FAULT_MEMORY ioctl by the VMM (the pages it maps are priced apart)",
    "tdx_busy_retries": "SEAMCALL refused with TDX_OPERAND_BUSY and retried after kicking the vCPUs out",
    "accept_memory_calls": "guest accept_memory() call for one unit of the unaccepted-memory bitmap",
    "guest_pages_touched": "4 KiB page the guest's workload touches for the first time (fault, "
                           "allocation, zeroing, filling)",
})

#: Counters whose unit is a byte: their figures may be given as a bandwidth.
BYTE_COUNTERS = frozenset(
    {"bytes_zeroed_4k", "bytes_zeroed_2m", "bytes_zeroed_1g", "bytes_copied", "hash_bytes"}
)

#: The operation name under which work not attributed to any named operation is shown.
UNATTRIBUTED = "(unattributed)"

_KNOWN = frozenset(COUNTER_NAMES)


def _unit(name: str) -> str:
    return COUNTER_UNITS.get(name, "count")


def _unknown_counters_message(names, what: str) -> str:
    parts = []
    for name in sorted(names, key=str):
        close = difflib.get_close_matches(str(name), COUNTER_NAMES, n=1)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"{what}: unknown counter name(s) {', '.join(parts)}; `gmemfast counters` lists them with their figures and sources"


def _check_ns(value, what: str) -> float:
    """A figure in ns per unit: a real number, finite and not negative."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}: a figure must be a number of nanoseconds, not {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}: a figure must be a finite number of nanoseconds >= 0, not {value!r}")
    return value


def _clean_counts(counters, what: str) -> dict[str, int]:
    """Validate a mapping counter name -> count and keep the nonzero counts as ints."""
    if not isinstance(counters, Mapping):
        raise TypeError(f"{what} must be a mapping of counter name to count, not {type(counters).__name__}")
    unknown = [name for name in counters if name not in _KNOWN]
    if unknown:
        raise ValueError(_unknown_counters_message(unknown, what))
    clean = {}
    for name, count in counters.items():
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise TypeError(f"{what}[{name!r}] must be an int count, not {type(count).__name__} ({count!r})")
        if count < 0:
            raise ValueError(f"{what}[{name!r}] is negative ({count}); counts are >= 0")
        if count:
            clean[name] = int(count)
    return clean


@dataclasses.dataclass(frozen=True)
class Resource:
    """Something the work of several threads shares (docs/model.md §10).

    ``kind`` is ``"serial"`` (one holder at a time: a lock, the PSP), ``"bandwidth"``
    (memory bandwidth, ``gb_per_s``) or ``"shared"`` (taken for read: no bound). ``scope``
    is ``"vm"`` (one per VM) or ``"host"`` (one for every VM on the host). ``counters``
    hold the resource for their whole figure (serial) or move their bytes through it
    (bandwidth: byte counters, or ``bytes_each`` bytes per count); ``holds`` gives, for
    a serial resource, the nanoseconds of the resource each count keeps busy when that
    is not the counter's whole figure.
    """

    name: str
    kind: str
    scope: str
    source: str
    what: str = ""
    counters: tuple[str, ...] = ()
    holds: Mapping[str, float] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    gb_per_s: float | None = None
    bytes_each: Mapping[str, float] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def touches(self) -> tuple[str, ...]:
        """Every counter whose work this resource bounds or documents, in counter order."""
        names = set(self.counters) | set(self.holds) | set(self.bytes_each)
        return tuple(n for n in COUNTER_NAMES if n in names)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "scope": self.scope, "what": self.what, "source": self.source,
               "counters": list(self.counters)}
        if self.holds:
            out["holds"] = dict(self.holds)
        if self.gb_per_s is not None:
            out["gb_per_s"] = self.gb_per_s
        if self.bytes_each:
            out["bytes_each"] = dict(self.bytes_each)
        return out


def _read_resource(name: str, entry, where: str) -> Resource:
    """One [resources.<name>] table -> Resource; ValueError naming what is wrong."""
    what = f"{where}: resources.{name}"
    if not isinstance(entry, dict):
        raise ValueError(f"{what} must be a table, not {entry!r}")
    known = {"kind", "scope", "what", "source", "counters", "holds", "gb_per_s", "bytes_each"}
    extra = sorted(set(entry) - known)
    if extra:
        raise ValueError(f"{what}: unknown key(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
    kind = entry.get("kind")
    if kind not in RESOURCE_KINDS:
        raise ValueError(f"{what}: kind must be one of {', '.join(RESOURCE_KINDS)}, not {kind!r}")
    scope = entry.get("scope", "vm")
    if scope not in _SCOPES:
        raise ValueError(f"{what}: scope must be 'vm' or 'host', not {scope!r}")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{what} has no source: every resource must name a public source or say "
                         "'estimate: <reasoning>'")
    text = entry.get("what", "")
    if not isinstance(text, str):
        raise ValueError(f"{what}: 'what' must be a string, not {text!r}")
    counters = entry.get("counters", [])
    if not isinstance(counters, list) or not all(isinstance(c, str) for c in counters):
        raise ValueError(f"{what}: counters must be a list of counter names, not {counters!r}")
    holds = _number_table(entry.get("holds", {}), f"{what}.holds")
    bytes_each = _number_table(entry.get("bytes_each", {}), f"{what}.bytes_each")
    unknown = [c for c in (*counters, *holds, *bytes_each) if c not in _KNOWN]
    if unknown:
        raise ValueError(_unknown_counters_message(set(unknown), what))
    if len(set(counters)) != len(counters):
        raise ValueError(f"{what}: a counter is listed twice in counters")
    gb_per_s = entry.get("gb_per_s")
    if kind == "bandwidth":
        if isinstance(gb_per_s, bool) or not isinstance(gb_per_s, (int, float)) or not (
                math.isfinite(gb_per_s) and gb_per_s > 0):
            raise ValueError(f"{what}: a bandwidth resource needs gb_per_s, a finite number > 0, "
                             f"not {gb_per_s!r}")
        not_bytes = [c for c in counters if c not in BYTE_COUNTERS]
        if not_bytes:
            raise ValueError(f"{what}: {', '.join(not_bytes)} count(s) no bytes: list them under "
                             "bytes_each with the bytes of one count")
        if holds:
            raise ValueError(f"{what}: holds is for serial resources")
        gb_per_s = float(gb_per_s)
    else:
        if gb_per_s is not None or bytes_each:
            raise ValueError(f"{what}: gb_per_s and bytes_each are for bandwidth resources")
        if kind == "shared" and holds:
            raise ValueError(f"{what}: a shared resource bounds nothing, so it holds nothing")
        both = sorted(set(counters) & set(holds))
        if both:
            raise ValueError(f"{what}: {', '.join(both)} both held whole (counters) and in part (holds)")
    return Resource(name, kind, scope, source.strip(), text, tuple(counters),
                    MappingProxyType(holds), gb_per_s, MappingProxyType(bytes_each))


def _number_table(table, what: str) -> dict[str, float]:
    if not isinstance(table, dict):
        raise ValueError(f"{what} must be a table of counter = number, not {table!r}")
    out = {}
    for k, v in table.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}.{k} must be a finite number >= 0, not {v!r}")
        out[k] = float(v)
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Counts priced by one cost profile.

    ``by_counter`` maps every counter with a nonzero count to its nanoseconds (0.0 for
    unpriced counters), most expensive first; ``total_ns`` is their sum. ``ns_each``
    holds the figure used for each priced counter, ``unpriced`` the counters that had a
    count but no figure. ``by_operation`` maps operation names to their own
    :class:`Estimate` when the caller asked for a breakdown.
    """

    profile: str
    counts: Mapping[str, int]
    ns_each: Mapping[str, float]
    by_counter: Mapping[str, float]
    unpriced: tuple[str, ...]
    total_ns: float
    by_operation: Mapping[str, Estimate] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def table(self) -> str:
        """An aligned table: counter, count, ns each, total, share, most expensive first.

        Unpriced counters appear with ``unpriced`` in the ns-each column and are named
        again below the total; a per-operation summary follows when there is one.
        """
        return estimate_table(self)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        """Plain data for JSON: ``json.loads(json.dumps(e.to_dict())) == e.to_dict()``.

        ``counters`` maps each counted counter to ``{"count", "ns_each", "ns"}``
        (``ns_each`` is ``None`` when unpriced); ``by_operation`` maps operation names
        to dicts of the same shape.
        """
        return {
            "profile": self.profile,
            "total_ns": self.total_ns,
            "counters": {
                name: {"count": self.counts[name], "ns_each": self.ns_each.get(name), "ns": ns}
                for name, ns in self.by_counter.items()
            },
            "unpriced": list(self.unpriced),
            "by_operation": {op: est.to_dict() for op, est in self.by_operation.items()},
        }


class CostModel:
    """Figures in nanoseconds per unit for the counters, each with its source.

    Usually made with :meth:`from_profile`. ``ns_per_unit`` maps counter names (a
    subset of ``COUNTER_NAMES``) to non-negative finite numbers; ``sources`` must give a
    non-empty source text for every one of them. Counters without a figure cost
    nothing and are reported as unpriced by :meth:`estimate`.
    """

    def __init__(self, name: str, ns_per_unit: Mapping[str, float], sources: Mapping[str, str], *,
                 description: str = "", resources=()):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a cost model needs a non-empty name, not {name!r}")
        what = f"cost model {name!r}"
        unknown = [n for n in (*ns_per_unit, *sources) if n not in _KNOWN]
        if unknown:
            raise ValueError(_unknown_counters_message(set(unknown), what))
        missing = sorted(set(ns_per_unit) - set(sources))
        if missing:
            raise ValueError(f"{what}: no source for {', '.join(missing)}; every figure must name its source")
        extra = sorted(set(sources) - set(ns_per_unit))
        if extra:
            raise ValueError(f"{what}: a source but no figure for {', '.join(extra)}")
        self._name = name
        self._description = description
        # Keep the canonical counter order so tables and dumps are stable.
        self._ns = {n: _check_ns(ns_per_unit[n], f"{what}: {n}") for n in COUNTER_NAMES if n in ns_per_unit}
        self._sources = {}
        for n in self._ns:
            text = sources[n]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{what}: the source of {n} must be a non-empty string, not {text!r}")
            self._sources[n] = text.strip()
        self._resources: dict[str, Resource] = {}
        for r in resources:
            if not isinstance(r, Resource):
                raise TypeError(f"{what}: resources must be Resource objects, not {type(r).__name__}")
            if r.name in self._resources:
                raise ValueError(f"{what}: resource {r.name!r} given twice")
            self._resources[r.name] = r

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_profile(cls, name_or_path: str | os.PathLike, /, **overrides: float) -> CostModel:
        """Load a built-in profile (``"snp"``, ``"tdx"``, ``"sw-protected"``) or a TOML file.

        ``overrides`` replace single figures, in nanoseconds per unit (ns per byte for
        byte counters), e.g. ``from_profile("snp", attr_writes_page=50.0)``. A bad file
        (not TOML, a figure without source, a negative figure, an unknown counter) and
        an unknown override name raise ``ValueError``; a missing file raises
        ``FileNotFoundError``.
        """
        if isinstance(name_or_path, str) and (name_or_path in BUILTIN_PROFILES
                                              or name_or_path in PROFILE_ALIASES):
            model = cls._builtin(PROFILE_ALIASES.get(name_or_path, name_or_path))
        elif isinstance(name_or_path, os.PathLike) or (
            isinstance(name_or_path, str)
            and (name_or_path.endswith(".toml") or os.sep in name_or_path or os.path.exists(name_or_path))
        ):
            path = Path(name_or_path)
            where = f"profile file {str(path)!r}"
            try:
                text = path.read_text(encoding="utf-8-sig")   # a byte-order mark is fine
            except UnicodeDecodeError as err:
                raise ValueError(f"{where} is not UTF-8 text: {err}") from None
            model = cls._from_toml(text, where, path.stem)
        elif isinstance(name_or_path, str):
            raise ValueError(
                f"unknown cost profile {name_or_path!r}: use one of "
                f"{', '.join((*BUILTIN_PROFILES, *PROFILE_ALIASES))} or the path of a TOML profile file"
            )
        else:
            raise TypeError(
                f"a profile is a built-in name or a path, not {type(name_or_path).__name__} ({name_or_path!r})"
            )
        return model.with_overrides(**overrides) if overrides else model

    @classmethod
    def _builtin(cls, name: str, _seen=()) -> CostModel:
        resource = resources.files(__package__) / "profiles" / f"{name}.toml"
        return cls._from_toml(resource.read_text(encoding="utf-8"), f"built-in profile {name!r}", name,
                              _seen=_seen)

    @classmethod
    def _from_toml(cls, text: str, where: str, default_name: str, _seen=()) -> CostModel:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{where} is not valid TOML: {err}") from None
        extra = sorted(set(data) - {"profile", "counters", "resources"})
        if extra:
            raise ValueError(
                f"{where}: unknown top-level key(s) {', '.join(extra)}; "
                "a profile has a [profile] table, [counters.<name>] and [resources.<name>] tables"
            )
        meta = data.get("profile", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'profile' must be a table, not {meta!r}")
        extra = sorted(set(meta) - {"name", "description", "base"})
        if extra:
            raise ValueError(f"{where}: unknown key(s) {', '.join(extra)} in [profile]; known: name, "
                             "description, base")
        name = meta.get("name", default_name)
        description = meta.get("description", "")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: profile.name must be a non-empty string, not {name!r}")
        if not isinstance(description, str):
            raise ValueError(f"{where}: profile.description must be a string, not {description!r}")
        ns_per_unit, sources, res = {}, {}, {}
        base = meta.get("base")
        if base is not None:
            base = PROFILE_ALIASES.get(base, base)
            if base not in BUILTIN_PROFILES:
                raise ValueError(f"{where}: profile.base must name a built-in profile "
                                 f"({', '.join(BUILTIN_PROFILES)}), not {base!r}")
            if base in _seen or base == default_name and where.startswith("built-in"):
                raise ValueError(f"{where}: profile.base {base!r} leads back to itself")
            parent = cls._builtin(base, _seen=(*_seen, default_name))
            ns_per_unit, sources = dict(parent.ns_per_unit), parent.sources()
            res = dict(parent.resources)
        counters = data.get("counters")
        if counters is None and base is None:
            raise ValueError(f"{where}: no [counters] table, so nothing is priced")
        counters = {} if counters is None else counters
        if not isinstance(counters, dict):
            raise ValueError(f"{where}: 'counters' must be a table of [counters.<name>] tables, not {counters!r}")
        unknown = [n for n in counters if n not in _KNOWN]
        if unknown:
            raise ValueError(_unknown_counters_message(unknown, where))
        for counter, entry in counters.items():
            ns_per_unit[counter], sources[counter] = cls._read_entry(entry, f"{where}: counters.{counter}", counter)
        tables = data.get("resources", {})
        if not isinstance(tables, dict):
            raise ValueError(f"{where}: 'resources' must be a table of [resources.<name>] tables, not {tables!r}")
        for rname, entry in tables.items():
            res[rname] = _read_resource(rname, entry, where)
        return cls(name, ns_per_unit, sources, description=description, resources=res.values())

    @staticmethod
    def _read_entry(entry, what: str, counter: str) -> tuple[float, str]:
        """One [counters.<name>] table -> (ns per unit, source)."""
        if not isinstance(entry, dict):
            raise ValueError(f"{what} must be a table with 'ns' (or 'gb_per_s') and 'source', not {entry!r}")
        extra = sorted(set(entry) - {"ns", "gb_per_s", "source"})
        if extra:
            raise ValueError(f"{what}: unknown key(s) {', '.join(extra)}; known: ns, gb_per_s, source")
        source = entry.get("source")
        if source is None:
            raise ValueError(
                f"{what} has no source: every figure must name a public source or say 'estimate: <reasoning>'"
            )
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{what}: source must be a non-empty string, not {source!r}")
        if ("ns" in entry) == ("gb_per_s" in entry):
            raise ValueError(f"{what} must give exactly one of 'ns' (ns per unit) or 'gb_per_s' (bandwidth)")
        if "gb_per_s" in entry:
            if counter not in BYTE_COUNTERS:
                raise ValueError(
                    f"{what}: gb_per_s is only for byte counters ({', '.join(sorted(BYTE_COUNTERS))}); "
                    f"give 'ns' per {_unit(counter)} instead"
                )
            bandwidth = entry["gb_per_s"]
            if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
                raise ValueError(f"{what}: gb_per_s must be a number, not {bandwidth!r}")
            if not math.isfinite(bandwidth) or bandwidth <= 0:
                raise ValueError(f"{what}: gb_per_s must be a finite bandwidth > 0, not {bandwidth!r}")
            return 1.0 / bandwidth, source
        ns = entry["ns"]
        if isinstance(ns, bool) or not isinstance(ns, (int, float)):
            raise ValueError(f"{what}: ns must be a number of nanoseconds, not {ns!r}")
        if not math.isfinite(ns) or ns < 0:
            raise ValueError(f"{what}: ns must be a finite number >= 0, not {ns!r}")
        return float(ns), source

    def with_overrides(self, **overrides: float) -> CostModel:
        """A copy with some figures replaced (nanoseconds per unit); unknown names raise ValueError."""
        unknown = [n for n in overrides if n not in _KNOWN]
        if unknown:
            raise ValueError(_unknown_counters_message(unknown, "overrides"))
        ns = dict(self._ns)
        sources = dict(self._sources)
        for counter, value in overrides.items():
            ns[counter] = _check_ns(value, f"override {counter}")
            before = (f"profile {self._name!r} had {self._ns[counter]!r} ns" if counter in self._ns
                      else f"unpriced in profile {self._name!r}")
            sources[counter] = f"override: set by the caller ({before})"
        return CostModel(self._name, ns, sources, description=self._description,
                         resources=self._resources.values())

    # -- inspection ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def ns_per_unit(self) -> Mapping[str, float]:
        """Counter name -> nanoseconds per unit (see COUNTER_UNITS), for priced counters."""
        return MappingProxyType(self._ns)

    @property
    def unpriced_counters(self) -> tuple[str, ...]:
        """The counters of COUNTER_NAMES this profile gives no figure."""
        return tuple(n for n in COUNTER_NAMES if n not in self._ns)

    @property
    def resources(self) -> Mapping[str, Resource]:
        """Resource name -> :class:`Resource`: what the work shares (docs/model.md §10)."""
        return MappingProxyType(self._resources)

    def resources_of(self, counter: str) -> tuple[str, ...]:
        """The resources a counter's work is attributed to beside the phase's threads."""
        return tuple(r.name for r in self._resources.values() if counter in r.touches())

    def sources(self) -> dict[str, str]:
        """Counter name -> the source text of its figure, for every priced counter."""
        return dict(self._sources)

    def describe(self) -> str:
        """Every figure with its unit and source, one block per counter."""
        lines = [f"cost profile: {self._name}"]
        if self._description:
            lines.append(self._description)
        for counter, ns in self._ns.items():
            lines.append(f"{counter}: {format_ns(ns)} per {_unit(counter)}")
            lines.append(f"    source: {self._sources[counter]}")
            shared = self.resources_of(counter)
            if shared:
                lines.append(f"    resources: {', '.join(shared)}")
        if self.unpriced_counters:
            lines.append("unpriced: " + ", ".join(self.unpriced_counters))
        for r in self._resources.values():
            size = f", {r.gb_per_s:g} GB/s" if r.gb_per_s is not None else ""
            lines.append(f"resource {r.name}: {r.kind}, one per {r.scope}{size}"
                         + (f": {r.what}" if r.what else ""))
            if r.holds:
                lines.append("    holds: " + ", ".join(f"{c} {format_ns(v)} each" for c, v in r.holds.items()))
            lines.append(f"    source: {r.source}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"CostModel(name={self._name!r}, priced={len(self._ns)}, "
                f"unpriced={len(self.unpriced_counters)}, resources={len(self._resources)})")

    # -- pricing ------------------------------------------------------------------------

    def estimate(self, counters: Mapping[str, int] | None = None, *,
                 by_operation: Mapping[str, Mapping[str, int]] | None = None) -> Estimate:
        """Price ``counters`` (counter name -> count, e.g. ``GuestMemfd.counters``).

        With ``by_operation`` (operation name -> counters, e.g. ``{"launch": {...},
        "accept": {...}}``) the estimate also breaks down per operation. If
        ``counters`` is given too, it is the total: an operation may not count more
        than the total, and what the operations leave over is shown as the operation
        ``"(unattributed)"``; without ``counters`` the total is the operations' sum.
        Unknown counter names raise ``ValueError``; counts must be ints >= 0.
        """
        if counters is None and by_operation is None:
            raise TypeError("estimate() needs counters, by_operation, or both")
        operations: dict[str, dict[str, int]] = {}
        if by_operation is not None:
            if not isinstance(by_operation, Mapping):
                raise TypeError(
                    f"by_operation must map operation names to counters, not {type(by_operation).__name__}"
                )
            for op, op_counters in by_operation.items():
                if not isinstance(op, str) or not op:
                    raise TypeError(f"operation names must be non-empty strings, not {op!r}")
                if op == UNATTRIBUTED:
                    raise ValueError(f"the operation name {UNATTRIBUTED!r} is reserved for work no operation claims")
                operations[op] = _clean_counts(op_counters, f"by_operation[{op!r}]")
        attributed: dict[str, int] = {}
        for op_counts in operations.values():
            for name, count in op_counts.items():
                attributed[name] = attributed.get(name, 0) + count
        if counters is None:
            total = attributed
        else:
            total = _clean_counts(counters, "counters")
            if operations:
                over = [f"{n} (operations {c:,}, total {total.get(n, 0):,})"
                        for n, c in attributed.items() if c > total.get(n, 0)]
                if over:
                    raise ValueError("the operations count more than the total for " + ", ".join(over))
                rest = {n: c - attributed.get(n, 0) for n, c in total.items() if c > attributed.get(n, 0)}
                if rest:
                    operations[UNATTRIBUTED] = rest
        breakdown = MappingProxyType({op: self._price(c) for op, c in operations.items()})
        return dataclasses.replace(self._price(total), by_operation=breakdown)

    def _price(self, counts: dict[str, int]) -> Estimate:
        ns_each = {n: self._ns[n] for n in counts if n in self._ns}
        cost = {n: counts[n] * ns_each[n] if n in ns_each else 0.0 for n in counts}
        # most expensive first; among equals priced before unpriced, then by name
        order = sorted(counts, key=lambda n: (-cost[n], n not in ns_each, n))
        unpriced = tuple(sorted(n for n in counts if n not in ns_each))
        return Estimate(
            profile=self._name,
            counts=MappingProxyType({n: counts[n] for n in order}),
            ns_each=MappingProxyType({n: ns_each[n] for n in order if n in ns_each}),
            by_counter=MappingProxyType({n: cost[n] for n in order}),
            unpriced=unpriced,
            total_ns=math.fsum(cost.values()),
        )
